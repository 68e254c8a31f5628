"""Every config composes and instantiates; the CLI runs and rejects bad input with one clear line."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from helpers import REPO, python, summaries, train

CONF = REPO / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
NEEDS_NETWORK_OR_ARGS = {("model", "hf"), ("model", "smollm2")}
OPTIONAL_PACKAGE = {("logger", "wandb"): "wandb", ("logger", "tensorboard"): "tensorboard"}


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["trainer.default_root_dir=/tmp/x", "logger.save_dir=/tmp/x",
                                                        *overrides])


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_composes_and_instantiates(group, option, tmp_path, task_data):
    cfg = _compose(f"{group}={option}")
    if (group, option) in NEEDS_NETWORK_OR_ARGS:
        assert cfg[group]["_target_"].startswith("lightning_zo.recipe.models.")
        return
    if group == "experiment":  # a bundle of overrides: its offline parts instantiate, its model is named
        assert "???" not in str(cfg.model.get("name", ""))
        if cfg.task.get("data_dir_required"):  # the user's data: required, never a path of ours
            cfg.task.data_dir = str(task_data / cfg.task.name)
        assert instantiate(cfg.task).name == cfg.task.name and instantiate(cfg.quantization) is not None
        assert instantiate(cfg.optimizer).keywords["lr"] == cfg.optimizer.lr
        return
    node = cfg[group]
    if (group, option) in OPTIONAL_PACKAGE:
        pytest.importorskip(OPTIONAL_PACKAGE[group, option])
    if group == "task" and cfg.task.data_dir is None and option != "sentiment":
        cfg.task.data_dir = str(task_data / option)
    if group in ("task", "quantization", "model", "logger"):
        assert instantiate(node) is not None
    elif group == "callbacks":
        assert all(instantiate(c) is not None for c in node.values())
    elif group == "trainer":
        cfg.trainer.default_root_dir = str(tmp_path)
        if cfg.trainer.accelerator in ("gpu", "cuda"):
            return  # composes; instantiating needs the device
        assert instantiate(cfg.trainer, logger=False).max_steps == cfg.trainer.max_steps


def test_smoke_run_writes_the_run_directory(tmp_path):
    proc = train(tmp_path, "trainer.max_steps=12", "trainer.val_check_interval=6")
    (s,) = summaries(tmp_path)
    assert s["steps"] == 12 and s["world_size"] == 1 and s["payload_bytes_per_step"] == 1
    assert 0 <= s["val_acc_zero_shot"] <= 1 and 0 <= s["val_acc_final"] <= 1
    assert len(s["weights_sha256"]) == 64
    # the weights once, as the directory from_pretrained loads (issue 43: not also as weights.safetensors)
    assert (tmp_path / "model" / "model.safetensors").stat().st_size > 100_000
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "weights.safetensors").exists()
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/acc" in metrics
    assert "val_acc_zero_shot" in proc.stdout


def test_eval_file_is_reported(tmp_path, task_data):
    lines = (task_data / "sst2" / "train.tsv").read_text().splitlines()[:301]
    (tmp_path / "eval.tsv").write_text("\n".join(lines) + "\n")
    train(tmp_path, "task=sst2", f"task.data_dir={task_data / 'sst2'}", "task.train_per_class=8",
          "task.val_per_class=8", f"task.eval_file={tmp_path / 'eval.tsv'}", "trainer.max_steps=2")
    (s,) = summaries(tmp_path)
    assert 0 <= s["eval_acc_final"] <= 1 and "eval_acc_zero_shot" in s


@pytest.mark.parametrize("overrides,message", [
    (["task.name=nope"], "unknown task 'nope'"),
    (["optimizer.eps=0"], "optimizer: eps must be a positive"),
    (["optimizer.eps=-0.001"], "optimizer: eps must be a positive"),
    (["task.data_dir=/does/not/exist"], "task.data_dir not found: /does/not/exist"),
    (["task.eval_file=/does/not/exist.tsv"], "data file not found: /does/not/exist.tsv"),
    (["task.val_per_class=500"], "task sentiment: the training split is empty"),
    (["model.dtype=float8"], "unknown dtype"),
    (["data.partition=zipf"], "data.partition must be one of iid, dirichlet"),
    (["data.max_length=0"], "data.max_length must be an integer >= 2"),
    (["data.max_length=1"], "data.max_length must be an integer >= 2"),
    (["data.max_length=-1"], "data.max_length must be an integer >= 2"),
    (["data.max_length=2"], "data.max_length=2 is too short for task sentiment's prompt"),
])
def test_bad_input_is_one_clear_line(overrides, message, capsys):
    from lightning_zo.cli import build
    from lightning_zo.cli import user_errors

    cfg = _compose("model=tiny", *overrides)
    with pytest.raises(SystemExit) as e, user_errors():
        build(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err  # one line


def test_bad_input_from_the_command_line_exits_2_without_traceback(tmp_path):
    proc = train(tmp_path, "optimizer.eps=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: optimizer: eps must be a positive finite number, got 0"
    assert "Traceback" not in proc.stderr
    # the run's own log says why it did not start (it was left empty)
    assert "error: optimizer: eps must be a positive finite number, got 0" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=-1e-5"], "optimizer: lr must be >= 0"),
    (["optimizer=adam", "optimizer.lr=-1"], "optimizer: Invalid learning rate: -1"),
    (["optimizer.k=0"], "optimizer: k (perturbations per rank per step) must be a positive integer"),
    (["data.partition=zipf"], "data.partition must be one of iid, dirichlet"),
    (["data.max_length=1"], "data.max_length must be an integer >= 2"),
    (["data.batch_size=0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    (["task.name=nope"], "unknown task 'nope'"),
    (["task.data_dir=/does/not/exist"], "task.data_dir not found: /does/not/exist"),
    (["task.val_per_class=500"], "task sentiment: the training split is empty"),
])
def test_optimizer_and_data_are_checked_before_the_model_loads(overrides, message, capsys, monkeypatch):
    """The issue's `optimizer.lr=-1e-5` was refused after SmolLM2's weights had loaded."""
    from lightning_zo import cli

    def model_loads(cfg):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli, "build_model", model_loads)
    cfg = _compose("model=tiny", *overrides)
    with pytest.raises(SystemExit) as e, cli.user_errors():
        cli.build(cfg)
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")


def test_malformed_tsv_reports_file_and_line(tmp_path):
    from lightning_zo.core.errors import UserError
    from lightning_zo.recipe.tasks import TASKS, read_tsv

    path = tmp_path / "train.tsv"
    for text, message in [("sentence\tlabel\ngood film\t1\nbad film\t0\textra\n",
                           f"{path}:3: expected 2 tab-separated fields, got 3"),
                          ("sentence\tlabel\ngood film\tpositive\n", f"{path}:2: unknown label 'positive'"),
                          ("text\tlabel\ngood film\t1\n", f"{path}:1: missing column(s) sentence"),
                          ("", f"{path}: empty file"), ("sentence\tlabel\n", f"{path}: no examples"),
                          (b"sentence\tlabel\ngood\t1\ncaf\xe9 noir\t0\n",
                           f"{path}:3: not UTF-8 text (byte 0xe9 at column 4)"),
                          (b"sentence\tlabel\ngood\t1\n" + b"x" * (48 << 20) + b"\t0\n",
                           f"{path}:3: a field longer than 131072 characters")]:
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_tsv(path, TASKS["sst2"])


@pytest.mark.parametrize("argv,message", [
    (["task=sst3"], "unknown task 'sst3'; choose one of cb, copa, rte, sentiment, sst2, sst5, trec"),
    (["model=foo"], "unknown model 'foo'; choose one of hf, smollm2, tiny"),
    (["quantization=foo"], "unknown quantization 'foo'; choose one of linear, log, none, sign"),
    (["logger=foo"], "unknown logger 'foo'; choose one of csv, tensorboard, wandb"),
    (["optimizer.lrr=1"], "unknown key 'optimizer.lrr'; did you mean optimizer.lr? (to add a new key on purpose: "
                          "+optimizer.lrr=1)"),
    (["trainer.max_stepz=3"], "unknown key 'trainer.max_stepz'; did you mean trainer.max_steps?"),
    (["optimizer.lr=1,2"], "Ambiguous value for argument 'optimizer.lr=1,2'"),
    (["-m", "model=tiny,foo"], "unknown model 'foo'"),  # every value of a sweep, not only the first
    (["-m", "model=tiny", "optimizer.lr=1e-5,1e-4", "data.batch_sise=1,2"], "unknown key 'data.batch_sise'"),
    (["--cfg", "job", "task=sst3"], "unknown task 'sst3'"),
    # a value of the wrong type for its key's default: refused while composing, not by a TypeError in the run
    (["model=tiny", "trainer.max_steps=ten"], "trainer.max_steps=ten: expected an integer (the config's default is "
                                              "300)"),
    (["experiment=quick", "trainer.max_steps=1.5"], "trainer.max_steps=1.5: expected an integer (the config's default "
                                                    "is 20)"),
    (["optimizer.lr=fast"], "optimizer.lr=fast: expected a number (the config's default is 1e-05)"),
    (["trainer.enable_progress_bar=yes"], "trainer.enable_progress_bar=yes: expected true or false"),
    (["-m", "optimizer.k=1,two"], "optimizer.k=two: expected an integer"),
    # an option spelled as other tools do
    (["--model", "tiny"], "--model tiny: not an option of this command; settings are written key=value: model=tiny"),
    (["--trainer.max_steps=5"], "--trainer.max_steps=5: not an option of this command; settings are written "
                                "key=value: trainer.max_steps=5"),
])
def test_unknown_group_options_and_keys_are_one_clear_line(argv, message):
    from lightning_zo.precheck import precheck
    from lightning_zo.core.errors import UserError

    with pytest.raises(UserError) as e:
        precheck(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["model=tiny"], ["-m", "model=tiny", "optimizer.lr=1e-5,1e-4"], ["--help"],
                                  ["--cfg", "job", "model=tiny"], ["hydra/launcher=slurm", "model=tiny"],
                                  ["model=tiny", 'hydra.run.dir="/tmp/a b"', "hydra.job.name=train_ddp_process_1",
                                   "hydra.output_subdir=null"], ["-cp", "/nowhere", "-cn", "config.yaml"],
                                  ["+callbacks.extra._target_=helpers.Diverge", "model=tiny"],
                                  ["trainer.devices=auto", "trainer.val_check_interval=0.5", "optimizer.lr=1",
                                   "progress.every_n_steps=5", "trainer.max_steps=null", "data.seed=${seed}"]])
def test_precheck_lets_valid_command_lines_through(argv):
    from lightning_zo.precheck import precheck

    precheck(argv)


def test_command_line_errors_exit_2_with_one_line(tmp_path):
    for argv, message in [(["task=sst3"], "error: unknown task 'sst3'; choose one of cb, copa, rte, sentiment, sst2, "
                                           "sst5, trec"),
                          (["model=tiny", "trainer.max_steps=0"], "error: trainer.max_steps=0: nothing would be "
                                                                  "trained"),
                          (["model=tiny", "trainer.max_steps=ten"], "error: trainer.max_steps=ten: expected an "
                                                                    "integer"),
                          (["--model", "tiny"], "error: --model tiny: not an option of this command; settings are "
                                                "written key=value: model=tiny")]:
        proc = python("-m", "lightning_zo", *argv, f"hydra.run.dir={tmp_path}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "trajectory.zot").exists()


def test_help_lists_groups_and_names_nothing_outside_the_repository():
    proc = python("-m", "lightning_zo", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model: hf, smollm2, tiny" in proc.stdout and "logger: csv, tensorboard, wandb" in proc.stdout
    assert "../" not in proc.stdout and "shared" not in proc.stdout


def test_slurm_sweep_launcher_ties_tasks_to_devices(tmp_path):
    proc = python(str(REPO / "train.py"), "hydra/launcher=slurm", "model=tiny", "trainer=multi_node",
                  "trainer.devices=4", "trainer.num_nodes=3", "--cfg", "all", "--resolve", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "SlurmLauncher" in out
    assert "tasks_per_node: 4" in out and "gpus_per_node: 4" in out and "nodes: 3" in out


def test_loggers_write_where_their_name_says(tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path, "logger=tensorboard", "trainer.max_steps=3")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "csv").exists()


def test_wandb_logger_is_offline_by_default_or_says_how_to_install_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        proc = train(tmp_path, "logger=wandb", "trainer.max_steps=2", check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == \
            'error: the optional package wandb is not installed: pip install "lightning-zo[wandb]"'
    else:
        train(tmp_path, "logger=wandb", "trainer.max_steps=2")
        assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_lightning_checkpoint_and_ckpt_path_resume_exactly(tmp_path):
    full, first, resumed = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    train(full, "trainer.max_steps=6")
    train(first, "trainer.max_steps=4", "checkpoint.enabled=true", "checkpoint.every_n_train_steps=2")
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    train(resumed, "trainer.max_steps=6", f"ckpt_path={ckpt}", "~callbacks.trajectory")
    assert summaries(resumed)[0]["weights_sha256"] == summaries(full)[0]["weights_sha256"]
    # With the trajectory log on, a Lightning checkpoint cannot be continued: refused in one line, not a broken log.
    proc = train(tmp_path / "refused", "trainer.max_steps=6", f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2 and "the trajectory log cannot continue from a Lightning checkpoint" in proc.stderr
    proc = train(tmp_path / "missing", f"ckpt_path={tmp_path}/nope.ckpt", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"ckpt_path={tmp_path}/nope.ckpt: no such checkpoint file")

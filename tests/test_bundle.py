"""ZO training for a LightningModule of the user's own (tests/plain_module.py, not ZOClassifier): automatic and manual
optimization, 1 and 2 ranks, kill -9 and resume with an LR scheduler, replay from Python-made runs, LoRA, the errors
a user meets, and the layers' import rules."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, env, logged_steps, python, summaries

SCRIPT = REPO / "tests" / "plain_module.py"


def fit(run_dir: Path, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = python(str(SCRIPT), str(run_dir), *args, cwd=REPO / "tests", timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"plain_module.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def replay(run_dir: Path, *args: str) -> dict:
    proc = python("-m", "lightning_zo.replay", str(run_dir), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["automatic", "manual"])
def test_own_module_trains_and_replays(tmp_path, mode):
    proc = fit(tmp_path, "--max-steps", "12", *(["--manual", "--k", "2"] if mode == "manual" else []))
    assert "patches left after fit: []" in proc.stdout  # the strategy undid what it changed in Lightning
    (s,) = summaries(tmp_path)
    assert s["steps"] == 12 and s["k"] == (2 if mode == "manual" else 1)
    if mode == "automatic":  # no task metrics: the module's last logged metrics are reported
        assert "train/loss" in s
    assert replay(tmp_path, "--model", "plain_module:build_model")["weights_sha256"] == s["weights_sha256"]
    assert (tmp_path / "model" / "config.json").exists()  # the run directory's model loads with from_pretrained


def test_the_weights_are_written_once_in_the_format_users_load(tmp_path, tiny_lm):
    """A Hugging Face model: model/ only (what from_pretrained loads), not also weights.safetensors (issue 43: both
    were 1.08 GB for a 135 M model); a module of another kind: weights.safetensors."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_zo.integration.callbacks import save_model

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "weights.safetensors").write_bytes(b"an earlier version's copy, from before a resume")
    save_model(tiny_lm.model, tmp_path / "hf", tiny_lm.tokenizer)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "model")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_lm.model.state_dict().values()))
    plain = torch.nn.Linear(3, 2)
    (tmp_path / "plain").mkdir()
    save_model(plain, tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["weights.safetensors"]
    assert torch.equal(safetensors.torch.load_file(tmp_path / "plain" / "weights.safetensors")["weight"], plain.weight)


def test_own_module_on_two_ranks_stays_identical(tmp_path):
    fit(tmp_path, "--devices", "2", "--strategy", "zo_spawn", "--max-steps", "10")
    s = summaries(tmp_path)
    assert [x["rank"] for x in s] == [0, 1] and s[0]["weights_sha256"] == s[1]["weights_sha256"]
    assert s[0]["payload_bytes_per_step"] == 2
    assert replay(tmp_path, "--model", "plain_module:build_model")["weights_sha256"] == s[0]["weights_sha256"]


def test_kill_9_and_resume_with_a_scheduler_equals_the_uninterrupted_run(tmp_path):
    args = ["--max-steps", "40", "--scheduler"]
    fit(tmp_path / "whole", *args)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run), *args], cwd=REPO / "tests", env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while logged_steps(run / "trajectory.zot") < 15 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 15 <= logged_steps(run / "trajectory.zot") < 40, "the run was not interrupted mid-training"
    resumed = fit(run, *args)
    assert "replayed" in resumed.stdout + resumed.stderr
    (whole,), (again,) = summaries(tmp_path / "whole"), summaries(run)
    assert again["steps"] == 40 and again["weights_sha256"] == whole["weights_sha256"]
    from lightning_zo.core import trajectory

    lrs = [r.lr for r in trajectory.read(run / "trajectory.zot").records]
    assert lrs == [r.lr for r in trajectory.read(tmp_path / "whole" / "trajectory.zot").records]
    assert lrs[0] > lrs[-1]  # the schedule really ran


def test_rerun_of_a_finished_run_trains_nothing_and_changes_nothing(tmp_path):
    fit(tmp_path, "--max-steps", "5")
    def files():  # the lock file only records the pid of the last process that held it
        return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lightning_zo.lock"}

    before = files()
    proc = fit(tmp_path, "--max-steps", "5", check=False)
    assert proc.returncode == 2 and "already holds a finished run of 5 steps" in proc.stderr
    after = files()
    assert after == before


def test_resume_with_another_learning_rate_is_refused(tmp_path):
    fit(tmp_path, "--max-steps", "4")
    proc = fit(tmp_path, "--max-steps", "8", "--manual", check=False)  # hparams differ: manual=True
    assert proc.returncode == 2 and "resuming" in proc.stderr and "module.manual: 'False' -> 'True'" in proc.stderr


def test_lora_trains_only_the_adapter_and_replays(tmp_path):
    from lightning_zo.core import trajectory

    fit(tmp_path, "--max-steps", "8", "--lora")
    (s,) = summaries(tmp_path)
    header = trajectory.read(tmp_path / "trajectory.zot").header
    (adapter,) = header["model"]["adapter"].values()
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 2
    from plain_module import build_lora_model

    lora_numel = sum(p.numel() for n, p in build_lora_model().named_parameters() if "lora_" in n)
    assert header["numel"] == lora_numel  # only the adapter is perturbed and updated
    out = tmp_path / "export"
    info = replay(tmp_path, "--model", "plain_module:build_lora_model", "--out", str(out))
    assert info["weights_sha256"] == s["weights_sha256"]
    assert (out / "adapter" / "adapter_config.json").exists() and (tmp_path / "adapter").is_dir()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_replay_of_a_python_run_needs_no_config_when_the_model_has_a_directory(tmp_path):
    from plain_module import build_model

    build_model().save_pretrained(tmp_path / "base")
    fit(tmp_path / "run", "--max-steps", "6", "--hf-dir", str(tmp_path / "base"))
    (s,) = summaries(tmp_path / "run")
    assert replay(tmp_path / "run")["weights_sha256"] == s["weights_sha256"]


def test_a_module_without_the_loss_is_told_what_to_do(tmp_path):
    proc = fit(tmp_path, "--manual", "--k", "0", "--max-steps", "2", check=False)
    assert proc.returncode != 0 and "opt.step(loss_fn=lambda j:" in proc.stderr


def test_another_optimizer_is_refused_with_the_fix(tmp_path):
    proc = fit(tmp_path, "--optimizer", "sgd", "--max-steps", "2", check=False)
    assert proc.returncode == 2 and "needs configure_optimizers to return one lightning_zo.ZOOptimizer" in proc.stderr


def test_active_dropout_is_switched_off_for_the_forwards_with_a_warning(tmp_path):
    proc = fit(tmp_path / "dropout", "--dropout", "0.5", "--max-steps", "6")
    assert "run in eval mode" in proc.stderr
    fit(tmp_path / "plain", "--max-steps", "6")
    # In eval mode the dropout modules are the identity: the same steps as the model without them, bit for bit.
    (with_dropout,), (without,) = summaries(tmp_path / "dropout"), summaries(tmp_path / "plain")
    assert with_dropout["weights_sha256"] == without["weights_sha256"]


LAYERS = {"core": set(), "integration": {"core"}, "recipe": {"core", "integration"}}
FORBIDDEN = {"core": {"lightning", "pytorch_lightning", "hydra", "omegaconf"}, "integration": {"hydra", "omegaconf"},
             "recipe": {"hydra", "omegaconf"}}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards(layer):
    """core never imports Lightning (or Hydra), nor anything above it; integration only core; recipe no tools."""
    for path in sorted((REPO / "lightning_zo" / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = [*path.relative_to(REPO).parts[:-node.level], *(node.module or "").split(".")]
                target = parts[1] if len(parts) > 1 else ""
                if target != layer and parts[0] == "lightning_zo":
                    assert target in LAYERS[layer], f"{path}: imports lightning_zo.{target}"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN[layer], f"{path}: imports {name}"
                if name.startswith("lightning_zo."):
                    assert name.split(".")[1] in LAYERS[layer] | {layer}, f"{path}: imports {name}"


def test_the_core_loads_without_lightning_and_the_face_registers_the_strategy():
    """In fresh interpreters: every core module (and the package's face) loads no Lightning, Hydra or torchmetrics;
    `Trainer(strategy="zo")` then works whether lightning_zo or Lightning was imported first."""
    core = sorted(f"lightning_zo.core.{p.stem}" for p in (REPO / "lightning_zo" / "core").glob("*.py"))
    heavy = "sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'omegaconf', 'torchmetrics'))"
    code = f"import sys, lightning_zo, {', '.join(core)}; print({heavy})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    for first, second in (("lightning_zo", "lightning"), ("lightning", "lightning_zo")):
        code = (f"import {first}, {second}; from lightning.pytorch.strategies import StrategyRegistry; "
                "print(sorted(n for n in ('zo', 'zo_spawn') if n in StrategyRegistry))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "['zo', 'zo_spawn']", (first, out)


def test_the_run_directory_loads_with_from_pretrained(tmp_path):
    from helpers import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(tmp_path, "trainer.max_steps=2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    from lightning_zo import weights_digest

    assert weights_digest(model) == summaries(tmp_path)[0]["weights_sha256"]
    ids = tokenizer("the film was", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_logs_written_before_the_layers_still_name_their_codec():
    from lightning_zo.core.codecs import LinearCodec, LogCodec, codec_from_config

    old = codec_from_config({"_target_": "lightning_zo.codecs.LinearCodec", "init_scale": 0.5, "target": 16.0,
                             "beta": 0.9, "stochastic_rounding": True})
    assert isinstance(old, LinearCodec) and old.scale == 0.5
    assert isinstance(codec_from_config({"_target_": "lightning_zo.codecs.LogCodec", "min_exp": -20}), LogCodec)
    assert codec_from_config(LinearCodec().config()).config() == LinearCodec().config()


def test_a_resume_with_another_aggregation_rule_is_refused(tmp_path):
    from helpers import train

    train(tmp_path, "trainer.max_steps=3")
    proc = train(tmp_path, "trainer.max_steps=6", "optimizer.aggregation=median", check=False)
    assert proc.returncode == 2 and "aggregation: log {'name': 'mean'} != run {'name': 'median'}" in proc.stderr


def test_the_cli_trains_a_lora_adapter_that_replays_from_the_log_alone(tmp_path):
    import shutil

    from helpers import train

    train(tmp_path, "peft=lora", "trainer.max_steps=3")
    (s,) = summaries(tmp_path)
    shutil.rmtree(tmp_path / ".hydra")  # the log's header alone says how to rebuild the base model and adapter
    info = replay(tmp_path, "--out", str(tmp_path / "export"))
    assert info["weights_sha256"] == s["weights_sha256"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "export" / "config.json").exists()

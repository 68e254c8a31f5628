"""The report: legends (task, rule, seed, then what differs), the plots (bytes only for runs that sent any), a bytes
axis that fits, a loss curve over full windows, output under the run, a table without matplotlib."""

import json
import sys

import pytest

from lightning_zo.report import _bytes_scale, _moving_average, build_report, human_bytes, labels, main, \
    standard_error


def _fake_run(path, lr=1e-5, k=1, model="lightning_zo.recipe.models.tiny", payload=1, steps=20, final=0.6,
              world_size=1, **summary):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(
        f"model:\n  _target_: {model}\n  hidden_size: {32 if 'tiny' in model else 768}\n"
        f"optimizer:\n  lr: {lr}\n  k: {k}\n  rule: sgd\n  seed: ${{seed}}\nseed: 0\ntask:\n  name: sentiment\n"
        f"trainer:\n  max_steps: {steps}\n  default_root_dir: ${{hydra:runtime.output_dir}}\n")
    (path / "summary.rank0.json").write_text(json.dumps({
        "val_acc_zero_shot": 0.5, "val_acc_final": final, "steps": steps, "world_size": world_size, "k": k,
        "codec": "linear", "payload_bytes_per_step": payload, "weights_sha256": "ab" * 32, **summary}))
    (path / "csv").mkdir()
    rows = ["epoch,step,train/loss,val/acc"] + [f"0,{i},{0.7 - i / 100},{0.55 if i == 9 else ''}" for i in range(steps)]
    (path / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return path


def test_legends_name_what_differs_between_runs():
    base = {"optimizer.lr": 1e-5, "optimizer.k": 1, "model._target_": "x.tiny", "model.hidden_size": 32,
            "trainer.default_root_dir": "${hydra:runtime.output_dir}", "model.seed": 0}
    assert labels([base, base | {"optimizer.lr": 1e-3}], ["0", "1"]) == ["lr=1e-05", "lr=0.001"]
    assert labels([base, base | {"optimizer.k": 4, "optimizer.lr": 1e-3}], ["0", "1"]) == \
        ["k=1, lr=1e-05", "k=4, lr=0.001"]
    # a different group choice is named by the group; the keys that come with it are not listed
    assert labels([base, base | {"model._target_": "x.pretrained", "model.hidden_size": 768}], ["a", "b"]) == \
        ["model=tiny", "model=pretrained"]
    assert labels([base, base], ["run_a", "run_b"]) == ["run_a", "run_b"]  # nothing to tell them by: directories
    assert labels([base, base, base | {"optimizer.lr": 1.0}], ["a", "b", "c"]) == \
        ["lr=1e-05 (a)", "lr=1e-05 (b)", "lr=1"]


def test_legends_read_task_rule_and_seed_not_the_runs_timestamp():
    run = {"task.name": "sentiment", "optimizer._target_": "lightning_zo.ZOOptimizer", "optimizer.rule": "sgd",
           "optimizer.lr": 1e-5, "seed": 0, "optimizer.seed": "${seed}", "model.seed": 0}
    assert labels([run], ["2026-12-07_08-59-01"]) == ["sentiment, rule=sgd, seed=0"]
    assert labels([run, run | {"optimizer.lr": 1e-3}], ["0", "1"]) == \
        ["sentiment, rule=sgd, seed=0, lr=1e-05", "sentiment, rule=sgd, seed=0, lr=0.001"]
    # two keys with the same last part keep their full names
    assert labels([run, run | {"seed": 1, "model.seed": 1}], ["a", "b"]) == \
        ["sentiment, rule=sgd, seed=0, model.seed=0", "sentiment, rule=sgd, seed=1, model.seed=1"]
    adam = {"task.name": "sst2", "optimizer._target_": "torch.optim.AdamW", "optimizer.lr": 1e-5, "seed": 0,
            "model.seed": 0}
    assert labels([run, adam], ["a", "b"]) == ["sentiment, rule=sgd, seed=0", "sst2, rule=AdamW, seed=0"]
    assert labels([run, run], ["a", "b"]) == ["sentiment, rule=sgd, seed=0 (a)", "sentiment, rule=sgd, seed=0 (b)"]


def test_the_smoothed_loss_starts_after_a_full_window_and_accuracy_has_its_standard_error():
    assert _moving_average([4.0, 0.0, 2.0, 2.0, 8.0], 2) == [2.0, 1.0, 2.0, 5.0]  # no one-batch point at the start
    assert _moving_average([1.0, 3.0], 1) == [1.0, 3.0]
    assert _moving_average([1.0, 3.0], 3) == []
    assert standard_error(0.5, 120) == pytest.approx(0.0456, abs=1e-4) and standard_error(1.0, 120) == 0


def test_bytes_axis_is_log_only_when_payloads_differ_widely():
    assert _bytes_scale([1, 1], "auto") == "linear" and _bytes_scale([1, 4], "auto") == "linear"
    assert _bytes_scale([1, 64], "auto") == "log" and _bytes_scale([1, 64], "linear") == "linear"
    assert [human_bytes(x) for x in (0, 12, 1500, 2.5e6)] == ["0 B", "12 B", "1.5 kB", "2.5 MB"]


def test_report_writes_the_plots_and_a_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", lr=1e-5, val_examples=120)
    _fake_run(sweep / "1", lr=1e-3, k=64, payload=64, final=0.7)
    assert main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| sentiment, rule=sgd, seed=0, k=1, lr=1e-05 | " in out
    assert "| sentiment, rule=sgd, seed=0, k=64, lr=0.001 | " in out
    report = (tmp_path / "rep" / "report.md").read_text()
    for png in ("accuracy_vs_steps.png", "loss_vs_steps.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    assert report.count("\n| ") == 2
    assert not (tmp_path / "rep" / "accuracy_vs_forwards.png").exists()  # neither run counted its forwards
    assert not (tmp_path / "rep" / "accuracy_vs_bytes.png").exists()  # one rank each: nothing crossed a wire


def test_accuracy_vs_bytes_only_for_the_runs_that_sent_bytes(tmp_path):
    _fake_run(tmp_path / "runs" / "0")
    _fake_run(tmp_path / "runs" / "1", lr=1e-3, world_size=2, payload=2)
    _, written, _ = build_report([tmp_path / "runs" / "0", tmp_path / "runs" / "1"], tmp_path / "rep")
    assert "accuracy_vs_bytes.png" in written


def test_the_report_goes_under_the_run_unless_named(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main([str(run)]) == 0
    assert (run / "report" / "report.md").is_file() and not (tmp_path / "report").exists()
    other = _fake_run(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        main([str(run), str(other)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: several run directories: name the report's directory with --out DIR"


def test_runs_that_count_their_forwards_are_plotted_against_them(tmp_path):
    _fake_run(tmp_path / "runs" / "0", forwards=40)
    _fake_run(tmp_path / "runs" / "1", k=4, payload=4, forwards=100)  # one-sided, k + 1 = 5 forwards per step
    _fake_run(tmp_path / "runs" / "2", lr=1e-3)  # made before forwards were counted: in the table, not the plot
    table, written, _ = build_report([tmp_path / "runs" / str(i) for i in range(3)], tmp_path / "rep")
    assert "accuracy_vs_forwards.png" in written
    assert "| linear | 20 | 40 | 1 |" in table and "| linear | 20 | 100 | 4 |" in table
    assert "| linear | 20 |  | 1 |" in table


def test_without_matplotlib_the_table_is_written_and_one_line_says_why(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails as if not installed
    assert main([str(run), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err.strip()
    assert err == 'no plots: matplotlib is not installed (pip install "lightning-zo[report]")'
    assert not list((tmp_path / "rep").glob("*.png"))
    assert "No plots: matplotlib is not installed" in (tmp_path / "rep" / "report.md").read_text()
    _, written, why = build_report([run], tmp_path / "rep2")
    assert written == [] and "matplotlib" in why


def test_no_run_found_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no run found (no summary.rank0.json below it)"

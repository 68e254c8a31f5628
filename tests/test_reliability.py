"""Ranks that disagree, runs that collide, SIGTERM before the first step, SIGTERM then resume, and every shipped
experiment's first steps (real processes, gloo on CPU, the tiny model)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, TORCHRUN, children, env, free_port, logged_steps, summaries, train


def _two_nodes(run_dir: Path, node_overrides: list[list[str]], *common: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for node, extra in enumerate(node_overrides):
        cmd = [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lzo-agree", str(REPO / "train.py"), *TINY,
               f"hydra.run.dir={run_dir}", "trainer.num_nodes=2", "trainer.devices=1", *common, *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return [(p, p.communicate(timeout=300)[0]) for p in procs]


def test_ranks_with_different_settings_stop_with_one_message(tmp_path):
    (p0, out0), (p1, out1) = _two_nodes(tmp_path, [[], ["seed=1", "optimizer.lr=1e-3"]], "trainer.max_steps=5")
    assert p0.returncode != 0 and p1.returncode != 0
    for out in (out0, out1):
        assert "error: ranks disagree on the step's settings or base weights" in out, out[-3000:]
        assert "seed: rank 0 has 0, rank(s) [1] differ (1)" in out and "lr: rank 0 has [1e-05, 1e-05], rank(s) [1] differ ([0.001, 0.001])" in out
    assert not list(tmp_path.glob("summary.rank*.json"))


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={tmp_path}", "trainer.max_steps=100000"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "trajectory.zot").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = train(tmp_path, "trainer.max_steps=5", check=False)
        assert second.returncode == 2 and "is in use by another run (pid" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
    # The lock died with its process (kill -9): the directory resumes normally, and nothing of it was lost.
    done = logged_steps(tmp_path / "trajectory.zot")
    train(tmp_path, f"trainer.max_steps={done + 2}")
    assert summaries(tmp_path)[0]["steps"] == done + 2


def _sigterm_to_rank_1_at(cmd: list[str], marker: str) -> tuple[subprocess.Popen, str]:
    """Run a 2-rank torchrun command, SIGTERM its rank 1 once `marker` is printed; (the process, all its output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    workers = sorted(children(proc.pid))
    assert len(workers) == 2, "".join(lines)
    os.kill(workers[1], signal.SIGTERM)
    return proc, "".join(lines) + proc.communicate(timeout=120)[0]


def test_sigterm_before_the_first_step_stops_every_rank(tmp_path):
    """SIGTERM to one rank while every rank is still before its first step (replay, zero-shot evaluation): no hang,
    every rank ends within seconds, writes its summary and says it stopped by the signal, having trained nothing."""
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(REPO / "train.py"), *TINY,
           f"hydra.run.dir={tmp_path}", "trainer.devices=2", "trainer.max_steps=100000",
           "+callbacks.slow._target_=helpers.SlowStart", "+callbacks.slow.seconds=8"]
    proc, out = _sigterm_to_rank_1_at(cmd, "slow start rank 1")
    assert proc.returncode == 0, out[-4000:]
    s = summaries(tmp_path)
    assert [x["steps"] for x in s] == [0, 0] and all(x["stopped_by_signal"] for x in s)
    assert "stopped by SIGTERM after 0 steps" in out


def test_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path):
    """The STOP step is not applied, so rerunning the command redoes it with every rank's estimate: exact."""
    args = ["trainer.max_steps=60", "optimizer.lr=1e-3"]
    train(tmp_path / "whole", *args)
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run}", *args],
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while logged_steps(run / "trajectory.zot") < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    (stopped,) = summaries(run)
    assert stopped["stopped_by_signal"] and 10 <= stopped["steps"] < 60
    assert logged_steps(run / "trajectory.zot") == stopped["steps"]
    train(run, *args)
    (whole,), (resumed,) = summaries(tmp_path / "whole"), summaries(run)
    assert resumed["steps"] == 60 and resumed["weights_sha256"] == whole["weights_sha256"]


EXPERIMENTS = {  # the model swapped for the tiny one (TINY) of the same kind: the rest of each experiment as shipped
    "quick": [],
    "smollm2_sst2": [],
    "mezo_roberta_k16": ["~model.name", "model.kind=masked", "task=sst2"],
    "mezo_roberta_k512": ["~model.name", "model.kind=masked", "task=sst2"],
    "mezo_opt13b": ["~model.name", "model.dtype=float32", "task=sst2"],
}


def test_every_shipped_experiment_is_listed_here():
    shipped = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert shipped == set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_shipped_experiment_runs_its_first_steps(tmp_path, task_data, experiment):
    data = [] if experiment == "quick" else [f"task.data_dir={task_data / 'sst2'}"]
    train(tmp_path, f"experiment={experiment}", *EXPERIMENTS[experiment], *data, "trainer=cpu",
          "trainer.precision=32-true", "trainer.max_steps=2")
    (s,) = summaries(tmp_path)
    assert s["steps"] == 2 and "val_acc_final" in s


def test_a_refused_rerun_keeps_the_metrics_and_a_resume_appends_to_them(tmp_path):
    train(tmp_path, "trainer.max_steps=4")
    metrics = tmp_path / "csv" / "metrics.csv"
    before = metrics.read_bytes()
    refused = train(tmp_path, "trainer.max_steps=4", check=False)
    assert refused.returncode == 2 and "already holds a finished run of 4 steps" in refused.stderr
    assert metrics.read_bytes() == before
    train(tmp_path, "trainer.max_steps=7")
    import csv

    steps = [int(row["step"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert steps == list(range(7))


def _checksums(run_dir: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_refused_or_finished_rerun_leaves_every_file_byte_identical(tmp_path, task_data, ranks):
    """Hydra wrote .hydra/ (and we the lock's pid) before any check: a refused rerun replaced the run's record with
    the settings it refused (a run trained on `sentiment` was reported as `sst2`). Now only an accepted start
    writes, and .hydra/ keeps the first accepted start's configuration."""
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node=2"] if ranks == 2 else None
    common = [f"trainer.devices={ranks}"]
    train(tmp_path, *common, "trainer.max_steps=4", launcher=launcher)
    before = _checksums(tmp_path)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".lightning_zo.lock"} <= set(before)
    refusals = [(["optimizer.lr=1e-3"], "lr: [1e-05, 1e-05] -> [0.001, 0.001]"), (["optimizer.k=2"], "k: 1 -> 2"),
                (["task=sst2", f"task.data_dir={task_data / 'sst2'}"], "with changed settings"),
                (["trainer.max_steps=4"], "already holds a finished run of 4 steps")]
    if ranks == 2:  # each kind once (a changed setting, a finished run): two ranks refuse as one does
        refusals = [refusals[0], refusals[-1]]
    for overrides, message in refusals:
        refused = train(tmp_path, *common, "trainer.max_steps=6", *overrides, launcher=launcher, check=False)
        assert refused.returncode != 0 and message in refused.stderr, (overrides, refused.stderr[-3000:])
        assert _checksums(tmp_path) == before, overrides
    train(tmp_path, *common, "trainer.max_steps=6", launcher=launcher)  # accepted: it trains, and keeps the record
    after = _checksums(tmp_path)
    assert after["trajectory.zot"] != before["trajectory.zot"]
    assert all(after[f] == before[f] for f in before if f.startswith(".hydra/"))
    assert "max_steps: 4" in (tmp_path / ".hydra" / "config.yaml").read_text()


def test_sigterm_while_starting_stops_cleanly_and_a_rerun_continues(tmp_path):
    """Before fit reaches setup (imports, building the model and data) a SIGTERM killed the rank (-15, torchrun's
    ChildFailedError traceback). Now: during the imports (1 rank) or the build (one rank of 2), exit 0, every rank
    stopped before its first step with one line, and the same command continues the run."""
    one = tmp_path / "one"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={one}",
                             "trainer.max_steps=5"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    time.sleep(1)  # the imports alone take seconds
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "received SIGTERM while starting" in out and "stopped by SIGTERM after 0 steps" in out
    assert [s["steps"] for s in summaries(one)] == [0]

    two = tmp_path / "two"
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(REPO / "train.py"), *TINY, f"hydra.run.dir={two}",
           "trainer.devices=2", "trainer.max_steps=5", "+callbacks.slow._target_=helpers.SlowInit",
           "+callbacks.slow.seconds=6"]
    proc, out = _sigterm_to_rank_1_at(cmd, "slow init rank 1")
    assert proc.returncode == 0 and "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    assert "rank 1 received SIGTERM while starting" in out
    s = summaries(two)
    assert [x["steps"] for x in s] == [0, 0] and all(x["stopped_by_signal"] for x in s)

    for run, ranks in ((one, 1), (two, 2)):
        launcher = [*TORCHRUN, "--standalone", "--nproc-per-node=2"] if ranks == 2 else None
        train(run, f"trainer.devices={ranks}", "trainer.max_steps=5", launcher=launcher)
        assert [x["steps"] for x in summaries(run)] == [5] * ranks



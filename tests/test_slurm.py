"""SLURM for real: a two-node cluster on this machine (scripts/slurm_cluster.sh: slurmctld + slurmd node1, node2 on
loopback, one CPU each), `sbatch scripts/slurm.sbatch` with 2 nodes x 1 task, preemption and requeue, a Hydra sweep
through the submitit launcher. CPU and the tiny model. Skipped, with the reason, where the cluster cannot be
started (not root, slurm-wlm not installed, a real SLURM configuration on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

from helpers import REPO, TINY, env, python, summaries
from lightning_zo.core import trajectory

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
# 2 nodes x 1 task, no GPUs: the #SBATCH lines a CPU user overrides (docs/clusters.md)
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
STEPS = 45
RUN = [*TINY, f"trainer.max_steps={STEPS}", "optimizer.lr=1e-3"]
INTERRUPTS = (10, 20, 30)  # records in the trajectory log when the job is interrupted
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL")


class PauseWhile(pl.Callback):
    """Loaded into the ranks (Hydra override): after a step, wait while `flag` exists (at most 120 s). Lets a test
    deliver a signal whose timing SLURM decides (the time limit's) while training is sure to still be running."""

    def __init__(self, flag: str):
        self.flag = Path(flag)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        deadline = time.time() + 120
        while self.flag.exists() and time.time() < deadline:
            time.sleep(0.05)


def _cluster_reason() -> str | None:
    """None when the local cluster is up (started here if needed), else why the tests skip."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        return "slurm-wlm is not installed (as root: bash scripts/slurm_cluster.sh start installs and starts it)"
    if subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "the local SLURM cluster is not running and starting it needs root (scripts/slurm_cluster.sh start)"
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "scripts/slurm_cluster.sh start failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


def job_env(**extra: str) -> dict:
    e = env()
    e.update(GLOO_SOCKET_IFNAME="lo", PYTHON=sys.executable, **extra)  # loopback only
    return e


def sbatch(run_dir: Path, *overrides: str, options: tuple[str, ...] = ()) -> str:
    cmd = ["sbatch", "--parsable", *CPU_JOB, f"--output={run_dir}.out", *options, "scripts/slurm.sbatch", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(RUN_DIR=str(run_dir)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def job_output(run_dir: Path) -> str:
    """slurm-JOBID.out of every start of the job (--open-mode=append)."""
    out = Path(f"{run_dir}.out")
    return out.read_text(errors="replace") if out.exists() else "(no job output)"


def log_tail(run_dir: Path) -> str:
    return job_output(run_dir)[-6000:]


def wait_for(job_id: str, run_dir: Path, done, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job(job_id)
        if done(state):
            return state
        time.sleep(0.3)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id}: {what} did not happen in {timeout:.0f} s ({job(job_id)}):\n"
                         + log_tail(run_dir))


def finished(state: dict) -> bool:
    return state.get("JobState") in FINAL


def records(run_dir: Path) -> list:
    try:
        return trajectory.read(run_dir / "trajectory.zot").records
    except Exception:  # not written yet, or a record half written
        return []


def wait_records(job_id: str, run_dir: Path, n: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while len(records(run_dir)) < n:
        state = job(job_id)
        assert not finished(state) and time.time() < deadline, \
            f"job {job_id} never reached step {n} ({state.get('JobState')}):\n{log_tail(run_dir)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """An uninterrupted job: the weights every interrupted one must end with."""
    run = tmp_path_factory.mktemp("slurm") / "whole"
    job_id = sbatch(run, *RUN)
    state = wait_for(job_id, run, finished, 300, "completion")
    return job_id, run, state


def test_sbatch_two_nodes_one_task_each_same_weights(reference):
    job_id, run, state = reference
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "0"), log_tail(run)
    s = summaries(run)
    assert [x["world_size"] for x in s] == [2, 2] and [x["steps"] for x in s] == [STEPS, STEPS]
    assert s[0]["weights_sha256"] == s[1]["weights_sha256"]
    assert s[0]["payload_bytes_per_step"] == 2 and not s[0]["stopped_by_signal"]
    out = job_output(run)
    assert f"job {job_id}, start 1, 2 nodes, RUN_DIR={run}" in out


def _compare_with_uninterrupted(run: Path, whole: Path, how: str) -> None:
    s, ref = summaries(run), summaries(whole)
    assert [x["steps"] for x in s] == [STEPS, STEPS], log_tail(run)
    assert s[0]["weights_sha256"] == s[1]["weights_sha256"]
    if s[0]["weights_sha256"] == ref[0]["weights_sha256"]:
        ours, theirs = records(run), records(whole)
        assert [r.codes for r in ours] == [r.codes for r in theirs]
        return
    ours, theirs = records(run), records(whole)
    step = next((a.step for a, b in zip(ours, theirs) if a.codes != b.codes or a.step != b.step), None)
    stop = [r.step for r in ours if r.stop]
    why = (f"the resumed log holds a STOP record at step(s) {stop}: the step during which SIGTERM arrived was "
           "applied with the stopping ranks' slots empty, and the rerun continued after it"
           if stop and stop[0] == step else "not a STOP step: an unexplained divergence")
    if stop and stop[0] == step:
        pytest.xfail(f"{how}: weights differ from the uninterrupted run from step {step} on; {why}")
    raise AssertionError(f"{how}: weights differ from the uninterrupted run from step {step} on; {why}")


def test_preempted_three_ways_requeues_itself_and_ends_exact(reference, tmp_path):
    """One job, interrupted three times, comes back by itself each time with the same job id, finds its RUN_DIR
    (runs/$SLURM_JOB_ID by default; here RUN_DIR from the submission's environment) and resumes from the log:

    1. `scancel --signal=TERM`: the ranks only, as SLURM signals them before the time limit; they stop, srun
       returns 0 and slurm.sbatch requeues its own job;
    2. the time limit with slurm.sbatch's own `#SBATCH --signal=SIGTERM@120`: the running job's limit is cut to
       2 minutes, so SLURM signals the ranks at its next time-limit check; the script requeues the job, whose limit
       goes back to 10 minutes while it waits in the queue (else the rerun would be signalled at once too);
    3. `scontrol requeue`, what preemption (PreemptMode=REQUEUE) and an administrator do: SIGTERM to the batch
       shell and every rank, SIGKILL after KillWait, and SLURM queues the job again.
    """
    run, pause = tmp_path / "preempted", tmp_path / "pause"
    job_id = sbatch(run, *RUN, "+callbacks.pause._target_=test_slurm.PauseWhile", f"+callbacks.pause.flag={pause}")

    def interrupt(at: int, restarts: int, *command: str) -> None:
        wait_records(job_id, run, at)
        subprocess.run(list(command), check=True, timeout=30)
        wait_for(job_id, run, lambda s: s.get("Restarts") == str(restarts), 180, f"requeue {restarts} ({command})")

    interrupt(INTERRUPTS[0], 1, "scancel", "--signal=TERM", job_id)
    # 2: SLURM sends the time limit's signal when its periodic check sees less than 120 s left: the ranks wait
    # after a step (PauseWhile) until a rank got it, so the run cannot end first. Not until both: a rank that saw no
    # flag yet is already in the next step's all-reduce, waiting for the paused one, and Python runs its handler
    # only when that call returns. The STOP a rank sends with its next codes stops every rank at the same step.
    wait_records(job_id, run, INTERRUPTS[1])
    signalled = job_output(run).count("received SIGTERM")
    pause.touch()
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=2"], check=True, timeout=30)
    deadline = time.time() + 120
    while job_output(run).count("received SIGTERM") == signalled:
        assert time.time() < deadline, f"no SIGTERM 120 s after the time limit was cut:\n{log_tail(run)}"
        time.sleep(0.2)
    pause.unlink()
    wait_for(job_id, run, lambda s: s.get("Restarts") == "2", 180, "requeue 2 (time limit)")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, timeout=30)
    interrupt(INTERRUPTS[2], 3, "scontrol", "requeue", job_id)
    state = wait_for(job_id, run, finished, 300, "completion")
    out = job_output(run)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "3"), out[-6000:]
    assert f"job {job_id}, start 4, 2 nodes, RUN_DIR={run}" in out
    assert out.count(f"requeueing job {job_id}") == 2  # 1 and 2; in 3 SLURM requeues the job, the shell is killed
    assert out.count("resumed from") == 3 and "received SIGTERM" in out
    _compare_with_uninterrupted(run, reference[1], "interrupted by scancel --signal=TERM at step "
                                f"{INTERRUPTS[0]}, the time limit at {INTERRUPTS[1]}, scontrol requeue at "
                                f"{INTERRUPTS[2]}")


def test_sigusr1_lightnings_slurm_auto_requeue(reference, tmp_path):
    """SIGUSR1 is the signal Lightning's SLURMEnvironment (auto_requeue=True) handles: it saves an HPC checkpoint
    (hpc_ckpt_N.ckpt, the full weights) and runs `scontrol requeue`; the rerun restores that checkpoint. This records
    what that does to a ZO run today; slurm.sbatch uses SIGTERM instead."""
    run = tmp_path / "usr1"
    job_id = sbatch(run, *RUN)
    wait_records(job_id, run, INTERRUPTS[0])
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    deadline, seen, since = time.time() + 300, -1, time.time()
    while True:
        state = job(job_id)
        if finished(state):
            break
        n = len(records(run))
        if n != seen:
            seen, since = n, time.time()
        if state.get("Restarts") == "0" and state.get("JobState") == "RUNNING" and time.time() - since > 30:
            subprocess.run(["scancel", job_id])
            pytest.xfail(f"SIGUSR1 at step {seen}: the job hangs (no step for 30 s, never requeued): Lightning's "
                         "SIGUSR1 handler saves a checkpoint (trainer.save_checkpoint, a barrier) from a signal "
                         "handler in the middle of a step, outside the one int8 exchange per step")
        assert time.time() < deadline, f"job {job_id}: no outcome after SIGUSR1 ({state}):\n{log_tail(run)}"
        time.sleep(0.3)
    out = job_output(run)
    if state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0":
        _compare_with_uninterrupted(run, reference[1], "SIGUSR1")
        return
    if "refusing to replay" in out and list(run.glob("hpc_ckpt_*.ckpt")):
        pytest.xfail(f"SIGUSR1 at step {len(records(run))}: Lightning saved {next(run.glob('hpc_ckpt_*.ckpt')).name} "
                     "and requeued; the rerun restored those trained weights as if they were the base model, so the "
                     "trajectory log refuses to replay onto them and the job fails (exit 2)")
    raise AssertionError(f"job {job_id} after SIGUSR1: {state.get('JobState')} {state.get('ExitCode')}:\n{out[-6000:]}")


def test_hydra_sweep_through_the_submitit_launcher(slurm, tmp_path):
    """Two sweep points, one SLURM job each (1 node x 1 task, CPU), then lightning_zo.report compares them."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", *TINY, "trainer.max_steps=5",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep}", "optimizer.lr=1e-4,1e-3"]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)  # array tasks
    assert len(jobs) == 2 and all(list((sweep / ".submitit" / j).glob("*_result.pkl")) for j in jobs), jobs
    points = [json.loads((sweep / str(i) / "summary.rank0.json").read_text()) for i in range(2)]
    assert [p["steps"] for p in points] == [5, 5] and [p["world_size"] for p in points] == [1, 1]
    assert points[0]["weights_sha256"] != points[1]["weights_sha256"]
    report = python("-m", "lightning_zo.report", str(sweep), "--out", str(tmp_path / "r"), timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "r" / "report.md").read_text()
    for p in points:  # one row per sweep point
        assert table.count(p["weights_sha256"][:12]) == 1, table

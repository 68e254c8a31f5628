"""A resumed run continues with the batch an uninterrupted run would see, with the user's own DataLoader and no code
in the user's module (integration/data_position.py, issue 41): kill -9 mid-run, rerun the same command, and the
weights equal the uninterrupted run's, on 1 and 2 ranks, across an epoch boundary; a stateful loader with its own
shuffle (torchdata's StatefulDataLoader(shuffle=True)) continues from its state kept beside the log."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, env, logged_steps, python, summaries

SCRIPT = REPO / "tests" / "plain_module.py"
STEPS = 20  # 96 examples in batches of 8: 12 batches per epoch on one rank, 6 per rank on two


def fit(run_dir, *args, check=True):
    proc = python(str(SCRIPT), str(run_dir), *args, cwd=REPO / "tests")
    if check and proc.returncode != 0:
        raise AssertionError(f"plain_module.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def kill_9_at(run_dir, steps, *args):
    """Start the run, SIGKILL its process group once its log holds `steps` steps."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), *args], cwd=REPO / "tests", env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while logged_steps(run_dir / "trajectory.zot") < steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = logged_steps(run_dir / "trajectory.zot")
    assert steps <= killed_at < STEPS, "the run was not interrupted mid-training"
    return killed_at


# Every loader on one rank; on two, those whose path differs there: a seeded sampler on each rank, Lightning's injected
# DistributedSampler (its shards, set_epoch), a stateful loader with the injected sampler (one state per rank). In order
# (`plain`) and torchdata's own shuffle (`stateful_shuffle`) take on two ranks the path of `random` and `stateful`.
@pytest.mark.parametrize("loader,devices", [(loader, 1) for loader in ("plain", "random", "stateful",
                                                                       "stateful_shuffle", "distributed")]
                         + [(loader, 2) for loader in ("random", "stateful", "distributed")])
def test_kill_9_and_rerun_continue_with_the_uninterrupted_batches(tmp_path, loader, devices):
    args = ["--max-steps", str(STEPS), "--manual", "--scheduler", "--loader", loader]
    if devices == 2:
        args += ["--devices", "2", "--strategy", "zo_spawn"]
    whole = tmp_path / "whole"
    fit(whole, *args)
    run = tmp_path / "killed"
    killed_at = kill_9_at(run, 8 if devices == 2 else 14, *args)  # past the first epoch
    resumed = fit(run, *args)
    per_epoch = 6 if loader in ("distributed", "stateful") and devices == 2 else 12  # DistributedSampler shards
    epoch, batch = divmod(killed_at, per_epoch)
    assert (f"resuming at step {killed_at}: the training data continues at epoch {epoch}, batch {batch}"
            in resumed.stdout + resumed.stderr)
    expected = summaries(whole)
    got = summaries(run)
    assert [s["steps"] for s in got] == [STEPS] * devices
    assert [s["weights_sha256"] for s in got] == [expected[0]["weights_sha256"]] * devices


def test_an_unseeded_shuffle_is_said_on_resume(tmp_path):
    args = ["--max-steps", "6", "--loader", "unseeded"]
    fit(tmp_path, "--max-steps", "3", "--loader", "unseeded")
    proc = fit(tmp_path, *args)
    assert ("the training sampler (RandomSampler) shuffles with the unseeded global generator, so the resumed run's "
            "order differs" in proc.stdout + proc.stderr)
    assert [s["steps"] for s in summaries(tmp_path)] == [6]


def test_a_batch_that_steps_twice_is_said(tmp_path):
    """Resume positions the data at one batch per step: a module that steps twice per batch is told so."""
    proc = fit(tmp_path, "--max-steps", "4", "--manual", "--steps-per-batch", "2")
    assert "a training batch stepped the ZO optimizer 2 times" in proc.stdout + proc.stderr


@pytest.mark.parametrize("stop_at", [12, 14])  # the first epoch's end; mid-way through the second
def test_a_stateful_loaders_own_shuffle_continues_exactly(tmp_path, stop_at):
    """torchdata's StatefulDataLoader(shuffle=True, generator=...) draws each epoch's order (and its iterators' base
    seeds) from its generator when an iterator is made: a run stopped at an epoch's end or mid-epoch and continued
    into a third epoch equals the uninterrupted run (the loader's state and its generators' are kept beside the
    log, data_state.rank0.pt)."""
    args = ["--manual", "--loader", "stateful_shuffle"]
    fit(tmp_path / "whole", "--max-steps", "30", *args)
    run = tmp_path / "stopped"
    fit(run, "--max-steps", str(stop_at), *args)
    resumed = fit(run, "--max-steps", "30", *args)
    epoch, batch = divmod(stop_at, 12)
    assert (f"resuming at step {stop_at}: the training data continues at epoch {epoch}, batch {batch} (the "
            "DataLoader's own state)" in resumed.stdout + resumed.stderr)
    assert summaries(run)[0]["weights_sha256"] == summaries(tmp_path / "whole")[0]["weights_sha256"]

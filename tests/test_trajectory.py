"""Trajectory log: replay == live, resume after kill -9, elastic world size, corruption, mismatched base."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, env, summaries, train
from lightning_zo.core import trajectory
from lightning_zo.core.errors import UserError
from lightning_zo.replay import replay

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _replayed_sha(run_dir, **kw):
    return replay(Path(run_dir), progress=False, **kw)[1]["weights_sha256"]


@pytest.mark.parametrize("world_size,codec", [(1, "linear"), (1, "log"), (1, "sign"), (1, "none"), (2, "linear"),
                                              (3, "log")])
def test_replay_equals_live_weights(tmp_path, world_size, codec):
    strategy = ["trainer.strategy=zo_spawn", f"trainer.devices={world_size}"] if world_size > 1 else []
    train(tmp_path, *strategy, f"quantization={codec}", "trainer.max_steps=12", "data.batch_size=4",
          "optimizer.lr=1e-3")
    live = summaries(tmp_path)
    assert len(live) == world_size and len({s["weights_sha256"] for s in live}) == 1
    log = trajectory.read(tmp_path / "trajectory.zot")
    assert len(log.records) == 12 and all(r.world_size == world_size for r in log.records)
    assert _replayed_sha(tmp_path) == live[0]["weights_sha256"]
    slot_bytes = 4 if codec == "none" else 1
    assert (tmp_path / "trajectory.zot").stat().st_size == (
        len(trajectory.MAGIC) + 8 + len(json.dumps(log.header, sort_keys=True))
        + 12 * trajectory.record_size(world_size, slot_bytes))


def test_bf16_true_run_replays_exactly(tmp_path):
    train(tmp_path, "trainer.precision=bf16-true", "trainer.max_steps=8", "optimizer.lr=1e-3")
    (live,) = summaries(tmp_path)
    assert trajectory.read(tmp_path / "trajectory.zot").header["param_dtype"] == "bfloat16"
    assert _replayed_sha(tmp_path) == live["weights_sha256"]


def test_replay_cli_prints_the_hash_last_and_exports(tmp_path):
    train(tmp_path, "trainer.max_steps=6", "optimizer.lr=1e-3")
    out = subprocess.run([sys.executable, "-m", "lightning_zo.replay", str(tmp_path), "--to-step", "6", "--out",
                          str(tmp_path / "hf")], cwd=REPO, env=env(), capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["weights_sha256"] == summaries(tmp_path)[0]["weights_sha256"] and info["steps"] == 6
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def _records(path: Path) -> int:
    try:
        return len(trajectory.read(path).records)
    except Exception:
        return 0


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    args = ["trainer.devices=2", "trainer.max_steps=150", "optimizer.lr=1e-3"]
    train(tmp_path / "whole", *args, launcher=TORCHRUN)
    run = tmp_path / "killed"
    cmd = [*TORCHRUN, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while _records(run / "trajectory.zot") < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _records(run / "trajectory.zot")
    assert 40 <= done < 150, "the run was not interrupted mid-training"
    assert not list(run.glob("summary.rank*.json"))
    proc = train(run, *args, launcher=TORCHRUN)
    whole, resumed = summaries(tmp_path / "whole"), summaries(run)
    assert [s["steps"] for s in resumed] == [150, 150]
    assert resumed[0]["weights_sha256"] == resumed[1]["weights_sha256"] == whole[0]["weights_sha256"]
    assert _replayed_sha(run) == whole[0]["weights_sha256"]


def test_world_size_2_then_3_joins_from_the_log(tmp_path):
    train(tmp_path, "trainer.strategy=zo_spawn", "trainer.devices=2", "trainer.max_steps=10", "data.batch_size=4",
          "optimizer.lr=1e-3")
    proc = train(tmp_path, "trainer.strategy=zo_spawn", "trainer.devices=3", "trainer.max_steps=20",
                 "data.batch_size=4", "optimizer.lr=1e-3")
    assert "replayed 10 steps" in proc.stdout
    s = summaries(tmp_path)
    assert [x["world_size"] for x in s] == [3, 3, 3] and len({x["weights_sha256"] for x in s}) == 1
    log = trajectory.read(tmp_path / "trajectory.zot")
    assert [r.world_size for r in log.records] == [2] * 10 + [3] * 10
    seeds = {(r.step, slot) for r in log.records for slot in range(r.world_size * r.k)}
    assert len(seeds) == 50
    assert _replayed_sha(tmp_path) == s[0]["weights_sha256"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("logged")
    train(run, "trainer.max_steps=10", "optimizer.lr=1e-3")
    return run


def _corrupt(run: Path, tmp_path: Path, record_index: int | None, truncate: int = 0) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = copy / "trajectory.zot"
    data = bytearray(path.read_bytes())
    header_len = len(trajectory.MAGIC) + 8 + len(json.dumps(trajectory.read(run / "trajectory.zot").header,
                                                            sort_keys=True))
    size = trajectory.record_size(1, 1)
    if record_index is not None:
        data[header_len + record_index * size + 10] ^= 0xFF  # flip a byte inside the record body
    if truncate:
        data = data[:-truncate]
    path.write_bytes(bytes(data))
    return copy


def test_corrupt_middle_record_reports_last_good_step(logged_run, tmp_path):
    copy = _corrupt(logged_run, tmp_path, record_index=4)
    with pytest.raises(trajectory.CorruptLog, match="the last good record is step 3") as e:
        trajectory.read(copy / "trajectory.zot")
    assert e.value.last_good_step == 3
    proc = subprocess.run([sys.executable, "-m", "lightning_zo.replay", str(copy)], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "fails its checksum; the last good record is step 3" in proc.stderr


def test_corrupt_last_record_is_detected(logged_run, tmp_path):
    copy = _corrupt(logged_run, tmp_path, record_index=9)
    with pytest.raises(trajectory.CorruptLog, match="last good record is step 8"):
        trajectory.read(copy / "trajectory.zot")


def test_torn_tail_is_dropped_with_a_warning(logged_run, tmp_path):
    copy = _corrupt(logged_run, tmp_path, record_index=None, truncate=5)
    with pytest.warns(UserWarning, match="torn final record"):
        log = trajectory.read(copy / "trajectory.zot")
    assert log.last_step == 8
    assert _replayed_sha(copy, to_step=9) == _replayed_sha(logged_run, to_step=9)


def test_mismatched_base_weights_are_refused(logged_run, tmp_path):
    from lightning_zo.recipe.models import tiny

    with pytest.raises(UserError, match="do not match the log"):
        replay(logged_run, model=tiny(seed=1).model, progress=False)
    proc = train(logged_run, "model.seed=1", "trainer.max_steps=12", check=False)
    assert proc.returncode == 2 and "refusing to replay" in proc.stderr

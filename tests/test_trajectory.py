"""Trajectory log: replay == live, resume after kill -9, elastic world size, corruption, mismatched base."""

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, kill_9_when_logged, python, summaries, train
from lightning_zo.core import trajectory
from lightning_zo.core.errors import UserError
from lightning_zo.core.optimizer import StepRecord
from lightning_zo.replay import replay

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _replayed_sha(run_dir, **kw):
    return replay(Path(run_dir), progress=False, **kw)[1]["weights_sha256"]


@pytest.mark.parametrize("world_size,codec,extra", [
    (1, "linear", ()), (1, "log", ()), (1, "sign", ()), (1, "none", ()), (2, "linear", ()),
    (1, "linear", ("quantization.rule=ema",)),  # the scale rule of logs written before the robust one
    (3, "linear", ("optimizer.aggregation=trimmed_mean", "optimizer.trim=0.3")),
    (2, "log", ("optimizer.aggregation=median", "optimizer.k=2")),
    (2, "linear", ("optimizer.aggregation=sign_vote", "optimizer.k=2")),
    (3, "log", ("optimizer.rule=normalized", "optimizer.lr=1e-2")),  # 3 ranks, log codes; the rule's state rebuilt
])
def test_replay_equals_live_weights(tmp_path, world_size, codec, extra):
    strategy = ["trainer.strategy=zo_spawn", f"trainer.devices={world_size}"] if world_size > 1 else []
    train(tmp_path, *strategy, f"quantization={codec}", "trainer.max_steps=12", "data.batch_size=4",
          "optimizer.lr=1e-3", *extra)
    live = summaries(tmp_path)
    assert len(live) == world_size and len({s["weights_sha256"] for s in live}) == 1
    log = trajectory.read(tmp_path / "trajectory.zot")
    assert len(log.records) == 12 and all(r.world_size == world_size for r in log.records)
    assert _replayed_sha(tmp_path) == live[0]["weights_sha256"]
    k = next((int(x.split("=")[1]) for x in extra if x.startswith("optimizer.k=")), 1)
    slot_bytes = 4 if codec == "none" else 1
    assert (tmp_path / "trajectory.zot").stat().st_size == (
        len(trajectory.MAGIC) + 8 + len(json.dumps(log.header, sort_keys=True))
        + 12 * trajectory.record_size(world_size * k, slot_bytes))
    aggregation = next((x.split("=")[1] for x in extra if x.startswith("optimizer.aggregation=")), "mean")
    assert log.header["aggregation"]["name"] == aggregation


def test_bf16_true_run_replays_exactly(tmp_path):
    train(tmp_path, "trainer.precision=bf16-true", "trainer.max_steps=8", "optimizer.lr=1e-3")
    (live,) = summaries(tmp_path)
    assert trajectory.read(tmp_path / "trajectory.zot").header["param_dtype"] == "bfloat16"
    assert _replayed_sha(tmp_path) == live["weights_sha256"]


def test_replay_cli_prints_the_hash_last_and_exports(tmp_path):
    train(tmp_path, "trainer.max_steps=6", "optimizer.lr=1e-3")
    out = python("-m", "lightning_zo.replay", str(tmp_path), "--to-step", "6", "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["weights_sha256"] == summaries(tmp_path)[0]["weights_sha256"] and info["steps"] == 6
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    args = ["trainer.devices=2", "trainer.max_steps=150", "optimizer.lr=1e-3"]
    train(tmp_path / "whole", *args, launcher=TORCHRUN)
    run = tmp_path / "killed"
    done = kill_9_when_logged([*TORCHRUN, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run}", *args], run, 40)
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
    proc = python("-m", "lightning_zo.replay", str(copy))
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


def _synthetic_log(path: Path, steps: int, version: int = 2, slots: int = 1) -> bytes:
    header = {"format_version": version, "payload_dtype": "int8"}
    writer = trajectory.Writer(path, header, slots=slots if version == 2 else None)
    for step in range(steps):
        writer.append(StepRecord(step=step, world_size=slots, k=1, lr=1e-3, codes=[(step % 50) - 25] * slots))
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_a_flipped_length_byte_is_damage_not_a_torn_tail(tmp_path, version):
    """The issue's case: record 15's length field with its high byte flipped made the 510 bytes after step 14 look
    like one torn record (replay gave 15 of 30 steps; a resume rewrote the log without the 15 good records)."""
    path = tmp_path / "t.zot"
    data = bytearray(_synthetic_log(path, 30, version))
    start = trajectory.read(path).ends[14]
    data[start + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(trajectory.CorruptLog, match="the 510 bytes after step 14 .* not a torn final record.*"
                                                    "the last good record is step 14") as e:
        trajectory.read(path)
    assert e.value.last_good_step == 14
    with pytest.raises(trajectory.CorruptLog):  # the writer validates before it touches anything
        trajectory.Writer(path, {"format_version": version, "payload_dtype": "int8"})
    assert path.read_bytes() == bytes(data)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("left", [1, 3, 4, 11, 12, 19, 20, 33])
def test_a_record_cut_anywhere_is_a_torn_tail_and_the_writer_continues(tmp_path, version, left):
    path = tmp_path / "t.zot"
    data = _synthetic_log(path, 30, version)
    size = trajectory.record_size(1, 1)
    assert size == 34
    path.write_bytes(data[:len(data) - size + left])  # `left` bytes of the final record survive
    with pytest.warns(UserWarning, match=f"dropping a torn final record \\({left} bytes"):
        log = trajectory.read(path)
    assert log.last_step == 28 and log.torn_bytes == left
    writer = trajectory.Writer(path, log.header, log.records)  # same header: cut the tail, then append
    writer.append(StepRecord(step=29, world_size=1, k=1, lr=1e-3, codes=[29 - 25]))
    writer.close()
    assert path.read_bytes() == data


@pytest.mark.parametrize("garbage", [b"\x01" * 10, b"\x00" * 34, bytes(range(200))])
def test_bytes_that_cannot_be_a_record_are_damage(tmp_path, garbage):
    path = tmp_path / "t.zot"
    path.write_bytes(_synthetic_log(path, 5) + garbage)
    with pytest.raises(trajectory.CorruptLog, match="the last good record is step 4"):
        trajectory.read(path)


def test_a_torn_record_of_a_new_world_size_after_an_elastic_resume(tmp_path):
    """Format 1 (no record_slots): the torn record's own world size and k justify another length."""
    path = tmp_path / "t.zot"
    _synthetic_log(path, 4, version=1, slots=2)
    bigger = trajectory.encode_record(StepRecord(step=4, world_size=3, k=1, lr=1e-3, codes=[1, 2, 3]), "int8")
    with path.open("ab") as f:
        f.write(bigger[:-2])
    with pytest.warns(UserWarning, match="torn final record"):
        assert trajectory.read(path).last_step == 3


def test_the_writer_appends_and_rewrites_only_a_changed_header(tmp_path):
    path = tmp_path / "t.zot"
    data = _synthetic_log(path, 6)
    log = trajectory.read(path)
    trajectory.Writer(path, log.header, log.records).close()
    assert path.read_bytes() == data  # nothing rewritten
    changed = {**log.header, "changes": [{"step": 6, "changed": ["lr"]}]}
    trajectory.Writer(path, changed, log.records).close()
    again = trajectory.read(path)
    assert again.header["changes"] and again.records == log.records
    assert path.read_bytes()[again.header_end:] == data[log.header_end:]  # the records' bytes, verbatim
    with pytest.raises(ValueError, match="not rewriting"):
        trajectory.Writer(path, changed, log.records[:3])
    assert trajectory.read(path).records == log.records


def test_resume_and_replay_refuse_a_damaged_log_and_leave_it_untouched(logged_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(logged_run, copy)
    path = copy / "trajectory.zot"
    data = bytearray(path.read_bytes())
    data[trajectory.read(path).ends[4] + 3] ^= 0xFF  # record 5's length field, high byte
    path.write_bytes(bytes(data))
    proc = train(copy, "trainer.max_steps=12", "optimizer.lr=1e-3", check=False)
    assert proc.returncode == 2 and "the last good record is step 4" in proc.stderr, proc.stderr[-2000:]
    assert path.read_bytes() == bytes(data)
    proc = python("-m", "lightning_zo.replay", str(copy))
    assert proc.returncode == 2 and "not a torn final record" in proc.stderr and "step 4" in proc.stderr


def test_every_rank_fails_with_the_same_one_line_error_on_a_damaged_log(tmp_path):
    """The issue's case: 2 ranks resuming from a log with one flipped byte. Rank 0 read the log and broadcast the
    error; rank 1 died unpickling it (a TypeError). Every rank now says the same line, each on its own line."""
    args = ["trainer.devices=2", "trainer.max_steps=6", "optimizer.lr=1e-3"]
    train(tmp_path, *args, launcher=TORCHRUN)
    path = tmp_path / "trajectory.zot"
    data = bytearray(path.read_bytes())
    data[trajectory.read(path).ends[2] + 10] ^= 0xFF  # inside record 3's body
    path.write_bytes(bytes(data))
    proc = train(tmp_path, "trainer.devices=2", "trainer.max_steps=8", "optimizer.lr=1e-3", launcher=TORCHRUN,
                 check=False)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 2 and errors[0] == errors[1], out[-4000:]
    assert errors[0].startswith("error: cannot resume: ") and "fails its checksum" in errors[0]
    assert "the last good record is step 2" in errors[0] and "TypeError" not in out
    assert path.read_bytes() == bytes(data)

"""A run killed (kill -9) and rerun, twice, leaves exactly the record of an uninterrupted run: the metrics CSV (every
training and validation row at the same steps, the same columns), the summary and the weights (1 and 2 ranks)."""

import csv
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, TORCHRUN, kill_9_when_logged, summaries, train

ARGS = ["trainer.max_steps=40", "trainer.val_check_interval=10", "optimizer.lr=1e-3"]
# Measured per process, not part of what the run computed: the time, and the generator calls (a resume adds replay's).
LOCAL = ("train_seconds", "steps_trained", "generator_calls")


def _launcher(ranks: int) -> list[str] | None:
    return [*TORCHRUN, "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else None


def _kill_9_after(run, ranks: int, steps: int) -> int:
    launcher = _launcher(ranks) or [sys.executable]
    cmd = [*launcher, str(REPO / "train.py"), *TINY, f"hydra.run.dir={run}", f"trainer.devices={ranks}", *ARGS]
    return kill_9_when_logged(cmd, run, steps)


def _metrics(run) -> tuple[list[str], list[dict]]:
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_killed_twice_leaves_the_uninterrupted_runs_record(tmp_path, ranks):
    train(tmp_path / "whole", f"trainer.devices={ranks}", *ARGS, launcher=_launcher(ranks))
    run = tmp_path / "killed"
    first = _kill_9_after(run, ranks, 14)
    assert 14 <= first < 40 and not list(run.glob("summary.rank*.json")), "the run was not interrupted"
    second = _kill_9_after(run, ranks, first + 13)  # resumed (it replays the log), then killed again
    assert first < second < 40, "the resumed run was not interrupted"
    train(run, f"trainer.devices={ranks}", *ARGS, launcher=_launcher(ranks))

    whole_columns, whole_rows = _metrics(tmp_path / "whole")
    columns, rows = _metrics(run)
    assert [r["step"] for r in whole_rows if r["val/acc"]] == ["9", "19", "29", "39"]
    assert columns == whole_columns
    assert rows == whole_rows  # every row, values included, in order
    whole, resumed = summaries(tmp_path / "whole"), summaries(run)
    assert len(resumed) == ranks
    for a, b in zip(whole, resumed):
        assert (a["steps_trained"], b["steps_trained"]) == (40, 40 - second)  # what train_seconds timed
        assert {k: v for k, v in a.items() if k not in LOCAL} == {k: v for k, v in b.items() if k not in LOCAL}
    weights = Path("model") / "model.safetensors"
    assert (run / weights).read_bytes() == (tmp_path / "whole" / weights).read_bytes()
    assert (run / "trajectory.zot").read_bytes() == (tmp_path / "whole" / "trajectory.zot").read_bytes()


def test_a_resume_keeps_the_rows_of_the_logs_steps_and_drops_a_torn_row(tmp_path):
    from lightning_zo.integration.loggers import ResumableCSVLogger

    logger = ResumableCSVLogger(save_dir=tmp_path, name="csv", version="")
    path = tmp_path / "csv" / "metrics.csv"
    path.parent.mkdir()
    whole = "epoch,step,train/loss,val/acc\r\n0,0,0.7,\r\n0,1,0.6,\r\n0,1,,0.5\r\n0,2,0.5,\r\n"
    path.write_bytes((whole + "0,3,0.").encode())  # a kill -9 cut the last row short
    logger.keep_steps_before(5)
    assert path.read_bytes() == whole.encode()
    logger.keep_steps_before(5)  # nothing to drop: the file is not rewritten
    assert path.read_bytes() == whole.encode()
    logger.keep_steps_before(2)  # the log holds steps 0 and 1: the rows of step 2 are redone by the resumed run
    assert path.read_bytes() == whole.rsplit("0,2,", 1)[0].encode()
    logger.keep_steps_before(1)  # the validation row of step 1 goes, and its column with it (no kept row has it)
    assert path.read_bytes() == b"epoch,step,train/loss\r\n0,0,0.7\r\n"

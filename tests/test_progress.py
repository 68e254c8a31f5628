"""Progress: a plain periodic line where stdout is not a terminal (also in RUN_DIR/train.log), steps not epochs."""

import io
import re

import pytest

from helpers import train
from lightning_zo.integration.progress import LogProgress, StepProgressBar, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_is_chosen_by_whether_stdout_is_a_terminal():
    assert isinstance(progress_bar(stream=io.StringIO()), LogProgress)
    assert isinstance(progress_bar(stream=_Terminal()), StepProgressBar)
    assert isinstance(progress_bar("bar", stream=io.StringIO()), StepProgressBar)
    assert isinstance(progress_bar("log", stream=_Terminal()), LogProgress)
    with pytest.raises(ValueError, match="progress.mode must be one of auto, bar, log"):
        progress_bar("fancy")
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LogProgress(every_n_steps=0)


def test_the_terminal_bar_counts_steps_not_epochs():
    assert "Epoch" not in StepProgressBar()._get_train_description(0)
    assert StepProgressBar()._get_train_description(0).strip() == "train steps"


def test_a_log_file_gets_periodic_step_lines(tmp_path):
    proc = train(tmp_path, "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.enable_progress_bar=true",
                 "progress.every_n_steps=4")
    pattern = re.compile(r"step (\d+)/12 \(\d+%\) \| loss \d\.\d{4} \| .*(it/s|s/it) \| elapsed \d+:\d\d \| ETA \d+:\d\d")
    logged = (tmp_path / "train.log").read_text()
    steps = [int(m.group(1)) for m in pattern.finditer(logged)]
    assert steps[0] == 1 and steps[-1] == 12 and {4, 8, 12} <= set(steps), logged
    assert "val/acc" in logged  # the latest validation accuracy rides along once there is one
    assert [int(m.group(1)) for m in pattern.finditer(proc.stdout)] == steps  # the console shows the same lines
    assert "Epoch" not in proc.stdout + proc.stderr
    assert "val_acc_final" in logged  # the run summary reaches train.log too


def test_no_progress_lines_when_the_bar_is_disabled(tmp_path):
    train(tmp_path, "trainer.max_steps=3")  # helpers.TINY sets trainer.enable_progress_bar=false
    assert "step 3/3" not in (tmp_path / "train.log").read_text()


def test_a_run_stopped_at_step_0_prints_no_step_line(tmp_path):
    """The STOP step is not applied, though Lightning counts it: a run stopped at step 0 printed `step 1/30`."""
    import signal
    import subprocess
    import sys

    from helpers import REPO, TINY, env

    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"hydra.run.dir={tmp_path}", "trainer.max_steps=30",
           "trainer.enable_progress_bar=true", "progress.mode=log", "+callbacks.slow._target_=helpers.SlowInit",
           "+callbacks.slow.seconds=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "slow init rank 0" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped by SIGTERM after 0 steps" in out, out[-3000:]
    assert "training: 30 steps" in out and "step 1/30" not in out

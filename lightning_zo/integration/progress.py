"""Training progress: Lightning's rich bar on a terminal, a plain periodic line everywhere else (a log file, SLURM).

A ZO run is one endless "epoch" of max_steps steps, so both show steps, not epochs (Lightning's bar said
`Epoch 0/-2` for max_epochs=-1). The plain line goes through `logging.getLogger("lightning_zo")`, so Hydra's job
logging puts it both on the console and in RUN_DIR/train.log:

    step 150/300 (50%) | loss 0.4123 | val/acc 0.8500 | 0.61 it/s | elapsed 4:05 | ETA 4:05
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from .callbacks import find_zo_optimizer

log = logging.getLogger("lightning_zo")

MODES = ("auto", "bar", "log")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def emit(line: str) -> None:
    """Log a line; where nothing configured logging (e.g. a rank started by a spawn launcher), print it."""
    if logging.getLogger().hasHandlers() or log.handlers:
        log.info(line)
    else:
        print(line, flush=True)


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, described by what it counts (steps), not by epochs."""

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's hook (lightning<2.7)
        return f"{'train steps':{len(self.validation_description)}}"


class LogProgress(ProgressBar):
    """One line every `every_n_steps` steps (None: about 20 lines per run) and at the last step, or sooner when
    `every_s` seconds have passed: step, loss, the latest validation accuracy, steps per second, elapsed, ETA."""

    def __init__(self, every_n_steps: int | None = None, every_s: float | None = 300.0):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"progress.every_n_steps must be >= 1 or null, got {every_n_steps}")
        self.every_n_steps, self.every_s = every_n_steps, every_s
        self._enabled = True
        self._t0 = self._last = 0.0
        self._start_step = 0
        self.lines: list[str] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _interval(self, trainer) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        return max(1, trainer.max_steps // 20) if trainer.max_steps and trainer.max_steps > 0 else 50

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.monotonic()
        self._start_step = trainer.global_step  # a resumed run starts past 0: the rate counts this run's steps
        if self._enabled:
            emit(f"training: {trainer.max_steps} steps" +
                 (f", resuming at step {trainer.global_step}" if trainer.global_step else ""))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = find_zo_optimizer(trainer)
        if not self._enabled or (opt is not None and opt.last_record is not None and opt.last_record.stop):
            return  # a STOP step is not applied (Lightning counts it): a run stopped at step 0 showed `step 1/N`
        step, total = trainer.global_step, trainer.max_steps
        now = time.monotonic()
        due = step % self._interval(trainer) == 0 or step == total or step == self._start_step + 1
        if not due and not (self.every_s is not None and now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = now - self._t0
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 else float("nan")
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total and total > 0 else f"step {step}"]
        metrics = self.get_metrics(trainer, pl_module)
        for key in ("loss", "val/acc"):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{key} {value:.4f}")
        parts.append(f"{rate:.2f} it/s" if rate >= 0.1 else f"{1 / rate:.1f} s/it" if rate > 0 else "- it/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and total > 0 and rate > 0:
            parts.append(f"ETA {_clock((total - step) / rate)}")
        line = " | ".join(parts)
        self.lines.append(line)
        emit(line)


def progress_bar(mode: str = "auto", every_n_steps: int | None = None, every_s: float | None = 300.0,
                 stream=None) -> ProgressBar:
    """`auto`: the rich bar when stdout is a terminal, plain lines otherwise; `bar` or `log` to choose."""
    if mode not in MODES:
        raise ValueError(f"progress.mode must be one of {', '.join(MODES)}, got {mode!r}")
    stream = sys.stdout if stream is None else stream
    if mode == "bar" or (mode == "auto" and getattr(stream, "isatty", lambda: False)()):
        return StepProgressBar()
    return LogProgress(every_n_steps=every_n_steps, every_s=every_s)


__all__ = ["LogProgress", "StepProgressBar", "progress_bar", "emit"]

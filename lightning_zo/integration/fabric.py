"""Zeroth-order steps in a Lightning Fabric loop: your loop, your model, one int8 all-reduce per step (issue 41).

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model = build_model().to(fabric.device)              # not fabric.setup(model): no DDP wrapper, no gradients
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3)
    run = ZOFabric(fabric, opt, "runs/mine")              # resumes from runs/mine/trajectory.zot if it is there
    for batch in run.batches(fabric.setup_dataloaders(loader), max_steps=100):
        run.step(loss_fn=lambda j: loss_of(model, batch))
    run.close()                                           # the summary, with weights_sha256

`ZOFabric` does for Fabric what ZOStrategy and TrajectoryLog do for the Trainer: it attaches the optimizer to
Fabric's processes (rank, world size, the one all_reduce of the int8 payload per step), checks once that every
rank has the same step rules and base weights, writes the trajectory log (rank 0) and continues a killed run
exactly: rerunning the same script replays the log onto the freshly built base weights, and `batches` continues
the data at the batch an uninterrupted run would see. `python -m lightning_zo.replay RUN_DIR --model pkg:build`
rebuilds the weights from the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import BatchSampler

from ..core import trajectory
from ..core.layout import weights_digest
from ..core.optimizer import ZOOptimizer
from .callbacks import ensure_visible_logs, restore_logs
from .trajectory_log import log_header, resume_from_log
from .data_position import StartAt, starts_over, unrepeatable_order
from .run_record import RunLock
from .strategy import all_reduce_codes, verify_agreement, wire_device

log = logging.getLogger(__name__)


class ZOFabric:
    """`opt` trained in `fabric`'s processes, logged and resumable in `run_dir` (see the module's docstring).

    `settings`: what else a resume must find unchanged (e.g. your hyperparameters), unless `allow_changes` (then
    the log's header records the change); `start_step`: the step this process continues from (the log's length, 0
    for a new run).
    """

    def __init__(self, fabric, opt: ZOOptimizer, run_dir: str | Path, settings: dict | None = None,
                 fsync: bool = False, allow_changes: bool = False):
        self._logs = ensure_visible_logs()
        self.fabric, self.opt = fabric, opt
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = fabric.global_rank, fabric.world_size
        opt.attach(self.rank, self.world_size, self._exchange)
        header = log_header(opt, {k: str(v) for k, v in (settings or {}).items()})
        if self.world_size > 1:  # nothing broadcasts rank 0's weights: they must already agree (DESIGN I6)
            verify_agreement({k: header[k] for k in ("base_weights_sha256", "run", *opt.describe())}, self.world_size)
        self.lock = None
        if self.rank == 0:
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
        path = self.run_dir / "trajectory.zot"
        broadcast = fabric.broadcast if self.world_size > 1 else None
        try:
            records, header = resume_from_log(opt, path, header, self.rank == 0, broadcast, -1, "max_steps",
                                              allow_changes)
        except BaseException:
            self._release()  # a refused start leaves the directory as it found it
            raise
        if records and self.rank == 0:
            log.info("resumed from %s: replayed %d steps", path, len(records))
        self.start_step = opt.step_count
        self.writer = None
        if self.rank == 0:
            self.lock.keep()
            self.writer = trajectory.Writer(path, header, records or [], fsync=fsync,
                                            slots=self.world_size * opt.k)

    def _exchange(self, payload: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return payload
        return all_reduce_codes(payload, self.opt, self.rank, wire_device(self.fabric.device))

    def step(self, loss_fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """One ZO step (`ZOOptimizer.step(loss_fn=...)`), logged."""
        loss = self.opt.step(loss_fn=loss_fn)
        record = self.opt.last_record
        if self.writer is not None and not record.stop:
            self.writer.append(record)
        return loss

    def batches(self, loader: Iterable, max_steps: int) -> Iterator:
        """The batches of `loader` (a DataLoader, or what `fabric.setup_dataloaders` returns), epoch after epoch,
        from the one an uninterrupted run would see at `start_step` to the one of step max_steps - 1: a resumed
        run continues its data exactly (integration/data_position.py; the sampler's `set_epoch` each epoch)."""
        # Fabric's wrapper (setup_dataloaders) numbers epochs by its own iterations, from 0 in every process: iterate
        # the DataLoader inside it, set each epoch's number here, and move the batches as the wrapper would.
        inner = getattr(loader, "_dataloader", loader)
        n = len(inner)
        epoch, skip = divmod(self.start_step, n)
        if self.start_step and isinstance(getattr(inner, "batch_sampler", None), BatchSampler):
            sampler, size = inner.batch_sampler.sampler, inner.batch_sampler.batch_size
            drawn = unrepeatable_order(inner, self.start_step, "Fabric's setup_dataloaders")
            if drawn and self.rank == 0:
                log.warning(drawn)
            inner.batch_sampler.sampler = StartAt(sampler, epoch, skip * size, min(len(sampler), n * size))
        elif self.start_step and self.rank == 0:
            log.warning(starts_over(self.start_step, "the loader has no torch BatchSampler"))
        step = self.start_step
        while step < max_steps:
            _set_sampler_epoch(inner, epoch)
            for batch in inner:
                if step >= max_steps:
                    return
                yield self.fabric.to_device(batch)
                step += 1
            epoch += 1

    def close(self) -> dict:
        """Close the log; write `summary.rank{r}.json` (steps, world size, payload, weights_sha256) and return it."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.opt.close()  # every step applied, our hooks off the model
        summary = {"steps": self.opt.step_count, "world_size": self.world_size, "k": self.opt.k,
                   "rank": self.rank, "forwards": self.opt.forwards,
                   "payload_bytes_per_step": self.world_size * self.opt.k * self.opt.codec.bytes_per_slot,
                   "weights_sha256": weights_digest(self.opt.model)}
        (self.run_dir / f"summary.rank{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        self._release()
        restore_logs(self._logs)
        self._logs = None
        return summary

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

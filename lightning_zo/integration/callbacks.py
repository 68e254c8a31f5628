"""Callbacks: the run summary (accuracies, weights, sha256), the trajectory log (and resume), replica checksums."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import safetensors.torch

from ..core import trajectory
from ..core.errors import UserError
from ..core.optimizer import ZOOptimizer
from ..core.layout import weights_digest
from .strategy import ZOStrategy


def _zo_optimizer(trainer: "pl.Trainer") -> ZOOptimizer:
    opt = trainer.optimizers[0]
    if not isinstance(opt, ZOOptimizer):
        raise TypeError("lightning_zo callbacks need a ZOOptimizer")
    return opt


def _payload_per_step(strategy, opt: ZOOptimizer) -> int:
    """What the strategy actually put on the wire per step (the payload size, without ZOStrategy)."""
    if isinstance(strategy, ZOStrategy) and strategy.exchanges:
        return strategy.payload_bytes // strategy.exchanges
    return opt.world_size * opt.k * opt.codec.bytes_per_slot


class RunSummary(pl.Callback):
    """Zero-shot accuracy before the first step; final accuracy, weights and `summary.rank{r}.json` at the end.

    Evaluation runs on every rank's shard and is combined by torchmetrics (a collective, outside training steps).
    """

    def __init__(self, out_dir: str | None = None, save_weights: bool = True):
        self.out_dir, self.save_weights = out_dir, save_weights
        self.results: dict = {}
        self._t0 = 0.0

    def _dir(self, trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir)

    def _accuracies(self, trainer, pl_module, when: str) -> None:
        dm = trainer.datamodule
        self.results[f"val_acc_{when}"] = pl_module.evaluate(dm.val_dataloader(), pl_module.val_acc)
        if dm.evaluation is not None:
            self.results[f"eval_acc_{when}"] = pl_module.evaluate(dm.test_dataloader(), pl_module.eval_acc)
        shown = ", ".join(f"{k} = {v:.4f}" for k, v in self.results.items() if k.endswith(when))
        if trainer.is_global_zero:
            print(f"[lightning_zo] {shown}", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        saved = self._dir(trainer) / "zero_shot.json"
        if trainer.global_step > 0 and saved.exists():  # a resumed run: measured before its first step
            self.results.update(json.loads(saved.read_text()))
        elif "val_acc_zero_shot" not in self.results:
            self._accuracies(trainer, pl_module, "zero_shot")
            if trainer.is_global_zero:
                self._dir(trainer).mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(self.results))
        self._t0 = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        train_seconds = time.time() - self._t0
        self._accuracies(trainer, pl_module, "final")
        opt = _zo_optimizer(trainer)
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        steps = opt.step_count
        summary = {
            **self.results,
            "steps": steps,
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "k": opt.k,
            "codec": opt.codec.name,
            "distribution": opt.distribution,
            "payload_bytes_per_step": _payload_per_step(trainer.strategy, opt),
            "trajectory_bytes_per_step": trajectory.record_size(opt.world_size * opt.k, opt.codec.bytes_per_slot),
            "stopped_by_signal": bool(opt.last_record and opt.last_record.stop),
            "train_seconds": round(train_seconds, 3),
            "weights_sha256": weights_digest(pl_module.model),
        }
        if self.save_weights and trainer.is_global_zero:
            tmp = out / f".weights.{os.getpid()}.safetensors"
            safetensors.torch.save_model(pl_module.model, str(tmp))
            tmp.replace(out / "weights.safetensors")
        path = out / f"summary.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if trainer.is_global_zero:
            print(f"[lightning_zo] steps = {steps}, world_size = {summary['world_size']}, "
                  f"payload = {summary['payload_bytes_per_step']} B/step, weights_sha256 = "
                  f"{summary['weights_sha256'][:16]}…, summary: {path}", flush=True)


class TrajectoryLog(pl.Callback):
    """Writes `trajectory.zot` (rank 0) and resumes from it: rerunning a killed run's command continues exactly.

    At fit start rank 0 reads the run directory's log and broadcasts it (a setup collective); every rank checks it
    against its freshly loaded base weights and replays it. This is also how a rank that joins with only the base
    weights catches up, and how a run continues at another world size: each record keeps its own world size.
    """

    def __init__(self, filename: str = "trajectory.zot", fsync: bool = False, out_dir: str | None = None):
        self.filename, self.fsync, self.out_dir = filename, fsync, out_dir
        self.writer: trajectory.Writer | None = None

    def path(self, trainer) -> Path:
        return Path(self.out_dir or trainer.default_root_dir) / self.filename

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = _zo_optimizer(trainer)
        header = {"format_version": trajectory.FORMAT_VERSION, **opt.describe(),
                  "base_model": getattr(pl_module.model, "name_or_path", type(pl_module.model).__name__),
                  "base_weights_sha256": weights_digest(pl_module.model)}
        path = self.path(trainer)
        found: object = None
        if trainer.is_global_zero and path.exists():
            try:
                found = trajectory.read(path)
            except UserError as e:
                found = e
        found = trainer.strategy.broadcast(found, src=0)
        if isinstance(found, Exception):
            raise UserError(f"cannot resume: {found}")
        records = []
        if found is not None:
            check_compatible(found.header, header, path)
            records = found.records
            for record in records:
                opt.apply(record)
            loop = trainer.fit_loop.epoch_loop
            loop.manual_optimization.optim_step_progress.total.ready = opt.step_count
            loop.manual_optimization.optim_step_progress.total.completed = opt.step_count
            loop._batches_that_stepped = opt.step_count
            trainer.datamodule.start_step = opt.step_count
            if trainer.is_global_zero:
                print(f"[lightning_zo] resumed from {path}: replayed {len(records)} steps", flush=True)
        if trainer.is_global_zero:
            self.writer = trajectory.Writer(path, header, records, fsync=self.fsync)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.writer is not None:
            self.writer.append(_zo_optimizer(trainer).last_record)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check_compatible(logged: dict, current: dict, path) -> None:
    """A log only continues (or replays onto) the run it was written by: same base weights and step rules."""
    if logged["base_weights_sha256"] != current["base_weights_sha256"]:
        raise UserError(f"{path} was written for base weights {logged['base_weights_sha256'][:16]}… "
                        f"({logged.get('base_model')}), but the loaded base model has "
                        f"{current['base_weights_sha256'][:16]}… ({current.get('base_model')}): refusing to replay")
    keys = ("generator", "distribution", "norm", "eps", "seed", "weight_decay", "codec", "payload_dtype", "numel")
    diff = [f"{k}: log {logged.get(k)!r} != run {current.get(k)!r}" for k in keys if logged.get(k) != current.get(k)]
    if diff:
        raise UserError(f"{path} belongs to a run with other settings ({'; '.join(diff)})")


class ReplicaChecksum(pl.Callback):
    """Every n steps, one int64 all_reduce of per-rank weight digests; a divergence names the step and ranks."""

    def __init__(self, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or trainer.world_size == 1:
            return
        import torch
        import torch.distributed as dist

        digests = torch.zeros(trainer.world_size, dtype=torch.int64, device=trainer.strategy.wire_device())
        digests[trainer.global_rank] = int(weights_digest(pl_module.model)[:15], 16)
        dist.all_reduce(digests)
        values = digests.tolist()
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            majority = max(groups.values(), key=len)
            odd = sorted(r for r in range(len(values)) if r not in majority)
            raise RuntimeError(f"replicas diverged at step {step}: rank(s) {odd} differ from rank(s) {majority}")

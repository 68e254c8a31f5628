"""Callbacks: the run summary (accuracies, weights, sha256) written by every rank."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import safetensors.torch

from .optimizer import ZOOptimizer
from .strategy import ZOStrategy, weights_digest


def _zo_optimizer(trainer: "pl.Trainer") -> ZOOptimizer:
    opt = trainer.optimizers[0]
    if not isinstance(opt, ZOOptimizer):
        raise TypeError("lightning_zo callbacks need a ZOOptimizer")
    return opt


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
        if trainer.global_step == 0 and "val_acc_zero_shot" not in self.results:
            self._accuracies(trainer, pl_module, "zero_shot")
        self._t0 = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        train_seconds = time.time() - self._t0
        self._accuracies(trainer, pl_module, "final")
        opt = _zo_optimizer(trainer)
        strategy = trainer.strategy
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
            "payload_bytes_per_step": (opt.world_size * opt.k * opt.codec.bytes_per_slot),
            "collectives_per_step": (strategy.collectives / steps if isinstance(strategy, ZOStrategy) and steps
                                     else None),
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

"""Callbacks for any LightningModule whose optimizer is a ZOOptimizer: the run summary (weights, sha256, the module's
own metrics) and replica checksums; the trajectory log (and exact resume) is in trajectory_log.py.

They find the model through the optimizer (`ZOOptimizer.model`), never through attributes of the module.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import safetensors.torch
import torch
import torch.distributed as dist

from ..core import trajectory
from ..core.errors import UserError
from ..core.layout import weights_digest
from ..core.optimizer import ZOOptimizer
from .strategy import ZOStrategy, wire_device

log = logging.getLogger("lightning_zo")


def ensure_visible_logs() -> tuple | None:
    """Our INFO lines reach the console where nothing configured logging (a spawned rank, a plain script); under
    Hydra they propagate to its handlers (console and the run's train.log). Returns what it changed, for
    `restore_logs` (at teardown: the package logger is the user's again), or None."""
    changed = None
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[lightning_zo] %(message)s"))
        log.addHandler(handler)
        changed = (handler, log.level)
    if log.getEffectiveLevel() > logging.INFO:
        changed = (changed[0] if changed else None, log.level)
        log.setLevel(logging.INFO)
    return changed


def restore_logs(changed: tuple | None) -> None:
    """Undo `ensure_visible_logs`."""
    if changed is not None:
        handler, level = changed
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(level)


def find_zo_optimizer(trainer: "pl.Trainer") -> ZOOptimizer | None:
    """The trainer's one ZOOptimizer, or None (another optimizer, or several)."""
    opts = [getattr(o, "optimizer", o) for o in trainer.optimizers]
    return opts[0] if len(opts) == 1 and isinstance(opts[0], ZOOptimizer) else None


def zo_optimizer(trainer: "pl.Trainer") -> ZOOptimizer:
    opt = find_zo_optimizer(trainer)
    if opt is None:
        raise UserError("lightning_zo callbacks need configure_optimizers to return one lightning_zo.ZOOptimizer")
    return opt


def _payload_per_step(strategy, opt: ZOOptimizer) -> int:
    """What the strategy actually put on the wire per step (the payload size, without ZOStrategy)."""
    if isinstance(strategy, ZOStrategy) and strategy.exchanges:
        return strategy.payload_bytes // strategy.exchanges
    return opt.world_size * opt.k * opt.codec.bytes_per_slot


def _run_dir(trainer, out_dir: str | None) -> Path:
    return Path(out_dir or trainer.default_root_dir)


def describe_model(model: torch.nn.Module) -> dict:
    """How replay can rebuild the base model when no config says so: class, hub id or directory, dtype, adapter."""
    info = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "name_or_path": getattr(model, "name_or_path", None) or None,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        def plain(value):  # peft configs hold sets and enums: JSON for the log's header
            return sorted(value) if isinstance(value, set) else str(value)

        info["adapter"] = json.loads(json.dumps({name: cfg.to_dict() for name, cfg in peft_config.items()},
                                                default=plain))
    return info


class RunSummary(pl.Callback):
    """At the end: `summary.rank{r}.json` on every rank (steps, world size, bytes on the wire, weights_sha256 and the
    module's metrics), and on rank 0 the final weights, once (save_model): `model/`, loadable with `from_pretrained`,
    for a Hugging Face model (`adapter/` too for a peft adapter, `model/` merged), else `weights.safetensors`.

    Metrics: a module with `summary_metrics(trainer) -> dict[str, float]` is measured before the first step
    (`<name>_zero_shot`) and at the end (`<name>_final`); otherwise the last logged metrics are reported.
    """

    def __init__(self, out_dir: str | None = None, save_weights: bool = True, tokenizer=None):
        self.out_dir, self.save_weights, self.tokenizer = out_dir, save_weights, tokenizer
        self.results: dict = {}
        self._t0 = 0.0

    def _measure(self, trainer, pl_module, when: str) -> None:
        measure = getattr(pl_module, "summary_metrics", None)
        if measure is None:
            return
        values = {f"{name}_{when}": float(v) for name, v in measure(trainer).items()}
        self.results.update(values)
        if trainer.is_global_zero:
            log.info("%s", ", ".join(f"{k} = {v:.4f}" for k, v in values.items()))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._logs = ensure_visible_logs()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        restore_logs(getattr(self, "_logs", None))
        self._logs = None

    def on_train_start(self, trainer, pl_module) -> None:
        saved = _run_dir(trainer, self.out_dir) / "zero_shot.json"
        if trainer.global_step > 0 and saved.exists():  # a resumed run: measured before its first step
            self.results.update(json.loads(saved.read_text()))
        elif not any(k.endswith("_zero_shot") for k in self.results):
            self._measure(trainer, pl_module, "zero_shot")
            if trainer.is_global_zero and self.results:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(self.results))
        self._t0, self._first_step = time.time(), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        train_seconds = time.time() - self._t0
        self._measure(trainer, pl_module, "final")
        if not hasattr(pl_module, "summary_metrics"):
            self.results.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        out = _run_dir(trainer, self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        opt = find_zo_optimizer(trainer)
        if opt is None:
            self._first_order_summary(trainer, pl_module, out, train_seconds)
            return
        record = opt.last_record
        backend = opt.backend
        summary = {
            **self.results,
            "steps": opt.step_count,
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "k": opt.k,
            "estimator": opt.estimator,
            "population": opt.population,
            "forwards": opt.forwards,  # this rank's, of the steps the weights hold: the cost of ZO (issue 44)
            "codec": opt.codec.name,
            "distribution": opt.distribution,
            "payload_bytes_per_step": _payload_per_step(trainer.strategy, opt),
            "trajectory_bytes_per_step": trajectory.record_size(opt.world_size * opt.k, opt.codec.bytes_per_slot),
            "stopped_by_signal": bool(record and record.stop),
            "train_seconds": round(train_seconds, 3),
            "steps_trained": opt.step_count - self._first_step,  # in train_seconds; a resumed run replayed the rest
            # which generator ran the perturbations and updates (a GPU rank: Triton launches; a CPU rank: C kernel)
            "generator_calls": {"triton": backend.launches, "cpu_kernel": backend.cpu_calls,
                                "other": backend.other_calls},
            "weights_sha256": weights_digest(opt.model),
            **_validation_size(trainer),
        }
        if self.save_weights and trainer.is_global_zero:
            save_model(opt.model, out, self.tokenizer)
        path = out / f"summary.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if trainer.is_global_zero:
            if summary["stopped_by_signal"]:
                log.warning("stopped by SIGTERM after %d steps; rerun the same command to resume",
                            opt.step_count)
            log.info("steps = %d, world_size = %d, payload = %d B/step, weights_sha256 = %s…, "
                     "summary: %s", opt.step_count, summary["world_size"], summary["payload_bytes_per_step"],
                     summary["weights_sha256"][:16], path)


    def _first_order_summary(self, trainer, pl_module, out: Path, train_seconds: float) -> None:
        """A reference run by another optimizer (backprop): the same metrics; what data parallelism would put on
        the wire is every gradient, 4 bytes per trainable parameter per rank per step (0 on one rank)."""
        model = getattr(pl_module, "model", pl_module)  # the module's own model, as ZOOptimizer.model is
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary = {**self.results, "steps": trainer.global_step, "forwards": trainer.global_step,  # and a backward
                   "world_size": trainer.world_size,
                   "rank": trainer.global_rank,
                   "optimizer": ", ".join(type(getattr(o, "optimizer", o)).__name__ for o in trainer.optimizers),
                   "payload_bytes_per_step": 4 * numel * trainer.world_size if trainer.world_size > 1 else 0,
                   "gradient_bytes_per_rank_per_step": 4 * numel, "train_seconds": round(train_seconds, 3),
                   "steps_trained": trainer.global_step - self._first_step, "weights_sha256": weights_digest(model),
                   **_validation_size(trainer)}
        if self.save_weights and trainer.is_global_zero:
            save_model(model, out, self.tokenizer)
        path = out / f"summary.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if trainer.is_global_zero:
            log.info("steps = %d (%s, first order), summary: %s", summary["steps"], summary["optimizer"], path)


def _validation_size(trainer) -> dict:
    """{"val_examples": N} where the data module says how many examples the accuracies are measured on: the report
    draws their binomial standard error (120 sentences: about 4.5 points at 50 %)."""
    val = getattr(getattr(trainer, "datamodule", None), "val", None)
    return {"val_examples": len(val)} if isinstance(val, (list, tuple)) else {}


def save_model(model: torch.nn.Module, out: Path, tokenizer=None) -> None:
    """The final weights, written once: a Hugging Face model as `model/`, the directory `from_pretrained` loads (its
    model.safetensors, config and tokenizer; a peft model also writes its small `adapter/`, and `model/` merged);
    any other module as `weights.safetensors` (its tensors; the module's code rebuilds the rest). A run used to write
    both (1.08 GB for a 135 M model); `python -m lightning_zo.replay RUN_DIR --out DIR` rebuilds a Hugging Face model's
    directory from the log (of any module, replay checks the weights' digest).
    Each is written to a temporary name and renamed, so a crash leaves the previous copy."""
    def atomic(target: Path, write) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        write(tmp)
        if target.is_dir():
            import shutil
            shutil.rmtree(target)
        tmp.replace(target)

    if not hasattr(model, "save_pretrained"):
        atomic(out / "weights.safetensors", lambda tmp: safetensors.torch.save_model(model, str(tmp)))
        return
    if getattr(model, "peft_config", None):
        atomic(out / "adapter", lambda tmp: model.save_pretrained(str(tmp)))
        model = copy.deepcopy(model).merge_and_unload()  # a copy: the trained adapter model stays as it is

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    atomic(out / "model", write)
    # A run resumed from an earlier version's directory: its weights.safetensors holds the weights before the resume.
    (out / "weights.safetensors").unlink(missing_ok=True)


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
        digests = torch.zeros(trainer.world_size, dtype=torch.int64, device=wire_device(trainer.strategy.root_device))
        digests[trainer.global_rank] = int(weights_digest(zo_optimizer(trainer).model)[:15], 16)
        dist.all_reduce(digests)
        values = digests.tolist()
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            majority = max(groups.values(), key=len)
            odd = sorted(r for r in range(len(values)) if r not in majority)
            raise RuntimeError(f"replicas diverged at step {step}: rank(s) {odd} differ from rank(s) {majority}")

"""Callbacks for any LightningModule whose optimizer is a ZOOptimizer: the trajectory log (and exact resume), the
run summary (weights, sha256, the module's own metrics), replica checksums.

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
from ..core.optimizer import StepRecord, ZOOptimizer
from .data_position import DataStates, stateful
from .loggers import ResumableCSVLogger
from .run_record import RunLock
from .strategy import ZOStrategy, module_settings

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
        self._t0 = time.time()

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
                   "weights_sha256": weights_digest(model), **_validation_size(trainer)}
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


class TrajectoryLog(pl.Callback):
    """Writes `trajectory.zot` (rank 0) and resumes from it: rerunning a killed run's command continues exactly.

    At fit start rank 0 reads the run directory's log and broadcasts it (a setup collective); every rank checks it
    against its freshly loaded base weights and replays it. This is also how a rank that joins with only the base
    weights catches up, and how a run continues at another world size: each record keeps its own world size.

    On resume the trainer's step counters (and so `trainer.global_step`), the LR schedulers (stepped once per
    replayed step) and the codec state continue where the log ends; under ZOStrategy the training DataLoader continues
    at the batch an uninterrupted run would see (integration/data_position.py). A rerun that
    changes a setting recorded in the header's `run` section (lr, k, the module's and datamodule's hparams) is refused
    unless `allow_changes=True`; a rerun of a finished run trains nothing and changes nothing.
    """

    def __init__(self, filename: str = "trajectory.zot", fsync: bool = False, out_dir: str | None = None,
                 model_config: dict | None = None, allow_changes: bool = False):
        self.filename, self.fsync, self.out_dir = filename, fsync, out_dir
        self.model_config = model_config  # how to rebuild the base model (the Hydra `model` config), for replay
        self.allow_changes = allow_changes
        self.writer: trajectory.Writer | None = None
        self.pending: StepRecord | None = None  # the last step's record, appended when the next step starts
        self.lock: RunLock | None = None

    def path(self, trainer) -> Path:
        return _run_dir(trainer, self.out_dir) / self.filename

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._logs = ensure_visible_logs()
        if trainer.is_global_zero and stage == "fit":
            self.lock = RunLock(self.path(trainer).parent)
            self.lock.acquire()

    def header(self, trainer, pl_module, opt: ZOOptimizer) -> dict:
        return log_header(opt, module_settings(trainer, pl_module), self.model_config)

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = zo_optimizer(trainer)
        path = self.path(trainer)
        broadcast = trainer.strategy.broadcast if trainer.world_size > 1 else None
        records, header = resume_from_log(opt, path, self.header(trainer, pl_module, opt), trainer.is_global_zero,
                                          broadcast, trainer.max_steps, "trainer.max_steps", self.allow_changes)
        if records is not None:
            resume_counters(trainer, opt.step_count)
            if trainer.is_global_zero:
                for logger in trainer.loggers:  # rows of steps the log does not hold are redone by this run
                    if isinstance(logger, ResumableCSVLogger):
                        logger.keep_steps_before(len(records))
                log.info("resumed from %s: replayed %d steps", path, len(records))
        if trainer.is_global_zero:
            if self.lock is not None:
                self.lock.keep()
            self.writer = trajectory.Writer(path, header, records or [], fsync=self.fsync,
                                            slots=opt.world_size * opt.k)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = zo_optimizer(trainer).last_record
        if self.writer is not None and record is not None and not record.stop:  # a STOP step is not applied
            self.pending = record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if stateful(loader):  # kept before the last step's record reaches the log (data_position.DataStates)
            self.data_states(trainer).keep(trainer.global_step, loader)
        self._append_pending()

    def data_states(self, trainer) -> DataStates:
        """This rank's stateful-loader states beside the log (ZOStrategy positions a resumed run's data with it)."""
        if getattr(self, "_data_states", None) is None:
            self._data_states = DataStates(self.path(trainer).parent, trainer.global_rank)
        return self._data_states

    def _append_pending(self) -> None:
        """A step's record reaches the log once everything of that step is on disk (its metrics rows, its
        validation), at the next step's start: a resume keeps exactly the metrics of the log's steps and redoes
        the rest, so the record of a run killed anywhere equals the uninterrupted run's."""
        if self.writer is not None and self.pending is not None:
            self.writer.append(self.pending)
        self.pending = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()
        if self.lock is not None:  # a refused start puts the lock file's old content back
            self.lock.release()
            self.lock = None
        restore_logs(getattr(self, "_logs", None))
        self._logs = None

    def close(self) -> None:
        self._append_pending()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def log_header(opt: ZOOptimizer, settings: dict, model_config: dict | None = None) -> dict:
    """The trajectory log's header: the step's rules (`opt.describe()`), the base model and its weights' digest, and
    the run's settings (lr, k, and `settings`: e.g. the module's hyperparameters), which a resume compares."""
    run = {"lr": [g["lr"] for g in opt.param_groups], "k": opt.k, **settings}
    model = {"config": model_config, **describe_model(opt.model)}
    described = opt.describe()
    return {"format_version": trajectory.format_version(described), **described,
            "base_model": model["name_or_path"] or model["class"], "model": model,
            "base_weights_sha256": weights_digest(opt.model), "run": run}


def resume_from_log(opt: ZOOptimizer, path: Path, header: dict, is_zero: bool, broadcast, max_steps: int,
                    max_steps_name: str, allow_changes: bool = False) -> tuple[list | None, dict]:
    """Continue the run whose log is at `path`, if there is one: rank 0 reads it and `broadcast(obj, src=0)` (None
    on one rank) shares it, every rank checks that it continues this run and replays it onto `opt`. Returns the
    replayed records (None without a log) and the header to write on (the log's, with changed settings recorded)."""
    found: object = None
    if is_zero and path.exists():
        try:
            found = trajectory.read(path)
        except UserError as e:
            found = str(e)  # the message, not the exception: every rank raises the same line from it
    if broadcast is not None:
        found = broadcast(found, src=0)
    if isinstance(found, str):
        raise UserError(f"cannot resume: {found}")
    if found is None:
        return None, header
    changed = check_compatible(found.header, header, path, allow_changes=allow_changes)
    records = found.records
    opt.follow_log(found.header)
    if max_steps >= 0 and len(records) >= max_steps:
        raise RunComplete(f"{path.parent} already holds a finished run of {len(records)} steps ({max_steps_name}="
                          f"{max_steps}): nothing to train. Raise {max_steps_name} to continue it, or use another "
                          "run directory")
    for record in records:
        opt.apply(record)
    if not changed:
        return records, found.header
    # recorded in the log: the new settings, and at which step they took effect
    return records, {**found.header, "run": header["run"],
                     "changes": [*found.header.get("changes", []), {"step": len(records), "changed": changed}]}


class RunComplete(UserError):
    """A rerun of a run that already reached max_steps."""


def resume_counters(trainer: "pl.Trainer", steps: int) -> None:
    """Continue Lightning's loop at `steps` as its own checkpoint restore would: the step counters behind
    `trainer.global_step` (manual and automatic optimization), and every step-interval LR scheduler stepped once per
    replayed step (the same arithmetic an uninterrupted run did, so the learning rates are bit-identical)."""
    loop = trainer.fit_loop.epoch_loop
    for progress in (loop.manual_optimization.optim_step_progress.total,
                     loop.automatic_optimization.optim_progress.optimizer.step.total):
        progress.ready = progress.completed = steps
    loop._batches_that_stepped = steps
    # The batch count that val_check_interval counts (check_val_every_n_epoch=None): validation stays at the global
    # steps of an uninterrupted run (it restarted from 0 at the resume: steps 9, 23, 33 instead of 9, 19, 29).
    total = loop.batch_progress.total
    total.ready = total.started = total.processed = total.completed = steps
    for config in trainer.lr_scheduler_configs:
        if config.interval != "step":
            log.warning("LR scheduler %s steps per epoch: not advanced on resume",
                        type(config.scheduler).__name__)
            continue
        for _ in range(steps // config.frequency):
            config.scheduler.step()


def check_compatible(logged: dict, current: dict, path, allow_changes: bool = False) -> list[str]:
    """A log only continues (or replays onto) the run it was written by: same base weights and step rules; the
    run's settings only change when the rerun says so (`allow_changes`). Returns the changed settings."""
    if logged["base_weights_sha256"] != current["base_weights_sha256"]:
        raise UserError(f"{path} was written for base weights {logged['base_weights_sha256'][:16]}… "
                        f"({logged.get('base_model')}), but the loaded base model has "
                        f"{current['base_weights_sha256'][:16]}… ({current.get('base_model')}): refusing to replay")
    defaults = {"aggregation": {"name": "mean"}, "rule": {"name": "sgd"}, "estimator": "two_sided",
                "population": "none", "mask": None}  # what logs before the keys used
    keys = ("generator", "distribution", "norm", "eps", "seed", "weight_decay", "codec", "aggregation", "rule",
            "estimator", "population", "mask", "payload_dtype", "numel")
    diff = [f"{k}: log {logged.get(k, defaults.get(k))!r} != run {current.get(k)!r}" for k in keys
            if logged.get(k, defaults.get(k)) != current.get(k)]
    if diff:
        raise UserError(f"{path} belongs to a run with other settings ({'; '.join(diff)})")
    before, now = logged.get("run", {}), current.get("run", {})
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before and before.get(k) != now.get(k)]
    if changed and not allow_changes:
        raise UserError(f"resuming {path} with changed settings ({'; '.join(changed)}); rerun with the original "
                        "settings, or say the change is intended with callbacks.trajectory.allow_changes=true")
    if changed:
        log.warning("resuming %s with changed settings: %s", path, "; ".join(changed))
    return changed


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
        digests = torch.zeros(trainer.world_size, dtype=torch.int64, device=trainer.strategy.wire_device())
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

"""TrajectoryLog: the callback that writes a run's trajectory log (DESIGN I4) and resumes a rerun from it exactly,
and the log header's checks that ZOFabric shares (`log_header`, `resume_from_log`, `check_compatible`)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from ..core import trajectory
from ..core.errors import UserError
from ..core.layout import weights_digest
from ..core.optimizer import StepRecord, ZOOptimizer
from .callbacks import _run_dir, describe_model, ensure_visible_logs, log, restore_logs, zo_optimizer
from .data_position import DataStates, stateful
from .loggers import ResumableCSVLogger
from .run_record import RunLock
from .strategy import module_settings


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

"""The command line: `lightning-zo`, `python -m lightning_zo` and `python train.py` compose the Hydra config in
conf/ (config_dir()), instantiate everything from its `_target_`s, and fit."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from .core.errors import UserError
from .precheck import config_dir, precheck


# Optional packages and the extra that brings each (pyproject.toml).
EXTRAS = {"gguf": "smollm2", "accelerate": "smollm2", "peft": "lora", "tensorboard": "tensorboard",
          "tensorboardX": "tensorboard", "wandb": "wandb", "matplotlib": "report", "datasets": "hub",
          "hydra_plugins.hydra_submitit_launcher": "slurm", "submitit": "slurm"}


def _missing_extra(e: ImportError) -> str | None:
    """One line for an optional package that is not installed, or None for any other ImportError (a bug)."""
    text = f"{e.name or ''} {e}"
    for package, extra in EXTRAS.items():
        if re.search(rf"\b{re.escape(package)}\b", text):
            name = package.split(".")[-1]
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if isinstance(e, ModuleNotFoundError) or "not met" in first or not first:
                return f"the optional package {name} is not installed: pip install \"lightning-zo[{extra}]\""
            return f"{first} (optional package {name}: pip install \"lightning-zo[{extra}]\")"
    return None


@contextlib.contextmanager
def user_errors():
    """Bad input ends the run with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (UserError, InstantiationException, ValueError, ImportError, MissingMandatoryValue) as e:
        root = e
        while isinstance(root, InstantiationException) and root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ImportError):
            message = _missing_extra(root)
            if message is None:
                raise
        elif isinstance(root, MissingMandatoryValue):
            key = root.full_key or "a value"
            message = f"{key} is required (??? in the config): set it on the command line, {key}=..."
        elif isinstance(root, (UserError, ValueError)):
            message = str(root).strip().split("\n")[0] or type(root).__name__
        else:
            raise
        say_line(f"error: {message}")
        _log_files_line(f"error: {message}")
        sys.exit(2)


def _log_files_line(line: str) -> None:
    """The line also in the log files that Hydra opened for this run (RUN_DIR/train.log), where they hold nothing yet:
    a refused first start leaves its reason beside the run, not an empty log, while a refused rerun of an accepted
    run leaves its directory byte-identical. Not through logging's console handler: stderr has it already."""
    import logging

    record = logging.LogRecord("lightning_zo", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.flush()
            if not os.path.exists(handler.baseFilename) or os.path.getsize(handler.baseFilename) == 0:
                handler.handle(record)


def say_line(text: str) -> None:
    """One line on stderr in one write: print() writes the text and its newline separately, and the ranks of a run
    share one stderr, where two ranks' `error:` lines came out joined."""
    line = f"{text}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr that is no file (captured, redirected in Python)
        sys.stderr.write(line)
        return
    sys.stderr.flush()
    os.write(fd, line.encode(errors="replace"))


def build_model(cfg: DictConfig):
    """The `model` group's language model, wrapped in the `peft` group's adapter if one is chosen."""
    from hydra.utils import instantiate

    lm = instantiate(cfg.model)
    if cfg.get("peft"):
        lm.model = instantiate(cfg.peft)(lm.model)
    return lm


def build(cfg: DictConfig, extra_callbacks: list = ()):
    """(trainer, module, datamodule) from a composed config (and callbacks the config does not name)."""
    from hydra.utils import instantiate

    from .core.optimizer import validate_hparams
    from .integration.callbacks import RunSummary
    from .integration.trajectory_log import TrajectoryLog
    from .recipe.classifier import is_zo
    from .recipe.data import PromptDataModule, check_data_settings

    # Every check that needs no model first: a bad setting costs one line, not a model's load time.
    optimizer = instantiate(cfg.optimizer)
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    ranks = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) and devices > 0 else None
    try:
        if is_zo(optimizer):
            validate_hparams(**optimizer.keywords, world_size=ranks)
        else:  # a torch optimizer checks its arguments when built: build it once over a stand-in parameter
            import torch

            optimizer([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as e:
        raise UserError(f"optimizer: {e}") from e
    task = instantiate(cfg.task)
    codec = instantiate(cfg.quantization)
    check_data_settings(**cfg.data)
    if not task.per_rank_data:
        task.load()  # the files read and sampled now (kept for the data module): their errors too
    lm = build_model(cfg)
    if codec.breaks_one_byte and is_zo(optimizer):
        warnings.warn(f"quantization={codec.name}: the payload is {codec.bytes_per_slot} bytes per slot; "
                      "this ablation breaks the one-byte-per-step property", stacklevel=1)
    dm = PromptDataModule(task, lm.tokenizer, lm.kind, **cfg.data)
    if not task.per_rank_data:
        dm.setup()  # fail on bad data here, in one process, before any rank starts
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(cfg.module)(lm=lm, task=task, optimizer=optimizer, codec=codec, scheduler=scheduler)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for callback in callbacks:  # what only the config knows: how replay rebuilds the model, what the output needs
        if isinstance(callback, TrajectoryLog) and callback.model_config is None:
            callback.model_config = {  # resolved where they stand, so ${seed} and the like find their values
                "model": OmegaConf.to_container(cfg.model, resolve=True),
                "peft": OmegaConf.to_container(cfg.peft, resolve=True) if cfg.get("peft") else None}
        if isinstance(callback, RunSummary) and callback.tokenizer is None:
            callback.tokenizer = lm.tokenizer
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, *extra_callbacks], logger=logger)
    if not is_zo(optimizer) and trainer.world_size > 1:
        raise UserError(f"optimizer={cfg.optimizer._target_.rsplit('.', 1)[-1]} is the one-rank first-order "
                        f"reference; this trainer has {trainer.world_size} ranks (trainer.devices=1 "
                        "trainer.num_nodes=1)")
    return trainer, module, dm


def run(cfg: DictConfig, record: "ConfigRecord | None" = None) -> None:
    """Fit the composed config; `record` writes the run's configuration once the start is accepted."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is None or max_steps < 1:
        raise UserError(f"trainer.max_steps={max_steps}: nothing would be trained (the step stream is endless, "
                        "so the step count is the run's length); give trainer.max_steps >= 1")
    ckpt = cfg.get("checkpoint") or {}
    if ckpt.get("enabled"):  # Lightning's ModelCheckpoint, into RUN_DIR/checkpoints unless dirpath is given
        args = {k: v for k, v in ckpt.items() if k != "enabled"}
        with open_dict(cfg):
            cfg.callbacks = cfg.get("callbacks") or {}
            cfg.callbacks.model_checkpoint = {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", **args}
            if cfg.callbacks.model_checkpoint.get("dirpath") is None:
                cfg.callbacks.model_checkpoint.dirpath = os.path.join(cfg.trainer.default_root_dir, "checkpoints")
            cfg.trainer.enable_checkpointing = True
    progress = cfg.get("progress")
    if progress is not None and cfg.trainer.get("enable_progress_bar", True):
        # Our choice of bar (Lightning adds its own only when the callbacks hold none): see integration/progress.py
        with open_dict(cfg):
            cfg.callbacks = cfg.get("callbacks") or {}
            cfg.callbacks.progress = {"_target_": "lightning_zo.integration.progress.progress_bar", **progress}
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and ckpt_path not in ("last", "best") and not os.path.isfile(ckpt_path):
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    if ckpt_path is not None and (cfg.get("callbacks") or {}).get("trajectory") is not None:
        # Measured: the trajectory log would start mid-run (replay refuses it) or refuse the restored weights.
        raise UserError("ckpt_path: the trajectory log cannot continue from a Lightning checkpoint; rerun in the "
                        "run's own hydra.run.dir without ckpt_path (the log resumes it exactly), or drop the log "
                        "with ~callbacks.trajectory")
    trainer, module, dm = build(cfg, [record] if record is not None else [])
    from .integration.strategy import StartupSigterm, ZOStrategy

    if not isinstance(trainer.strategy, ZOStrategy):  # the first-order reference: Lightning's own SIGTERM handling
        StartupSigterm.hand_over()
    if trainer.is_global_zero:
        print(OmegaConf.to_yaml(cfg, resolve=True) if cfg.get("print_config") else "", end="")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if _stopped_by_signal(trainer) and _elastic_restarts_left():
        # torchrun --max-restarts restarts the ranks only when one fails, and the rerun resumes exactly: a SIGTERM to a
        # rank (not to torchrun, which then ends anyway) continues the run instead of ending it half done.
        say_line(f"stopped by SIGTERM: exit {EXIT_RESTART} so that torchrun restarts the ranks (--max-restarts)")
        sys.exit(EXIT_RESTART)
    # The run is complete and its outputs written: a late SIGTERM (a cluster's time limit arriving now) must not turn
    # it into a failed job (exit 143) while the process winds down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


EXIT_RESTART = 75  # EX_TEMPFAIL: stopped cleanly, to be run again


def _stopped_by_signal(trainer) -> bool:
    from .integration.callbacks import find_zo_optimizer

    opt = find_zo_optimizer(trainer)
    return opt is not None and opt.last_record is not None and opt.last_record.stop


def _elastic_restarts_left() -> bool:
    """Under torchrun with --max-restarts, whether the agent would restart the ranks if this one failed."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    return restarts > int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def hydra_record(cfg: DictConfig) -> "ConfigRecord":
    """The files Hydra writes into RUN_DIR/.hydra (config.yaml, hydra.yaml, overrides.yaml), as Hydra writes them.
    Our config turns Hydra's own writing off (hydra.output_subdir: null): it happens before any check, so a refused
    rerun (a changed lr, k or task; a finished run) replaced the run's record with the settings it refused."""
    from hydra.core.hydra_config import HydraConfig

    from .integration.run_record import ConfigRecord

    hydra_cfg = HydraConfig.get()
    written = {**OmegaConf.to_container(hydra_cfg), "output_subdir": ".hydra"}  # what Hydra itself would record
    files = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml({"hydra": written}),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}
    return ConfigRecord(files, hydra_cfg.runtime.output_dir, subdir=".hydra")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg, hydra_record(cfg))  # before run() adds to cfg: the record is the config as composed


def main() -> None:
    """`lightning-zo [OVERRIDES]`: Hydra's command line (--help, -m, --cfg job, ...) with one-line errors."""
    from .integration.strategy import StartupSigterm

    StartupSigterm.install()  # a preemption while starting stops the run cleanly, as one during training does
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # one that train.py held during the imports
    with user_errors():
        precheck(sys.argv[1:])
    _app()
    # Here, not in the strategy's teardown: under torchrun or Lightning's popen launcher the process ends with the
    # command, while a user's own script may go on to use the group after fit.
    from .integration.strategy import release_process_group

    release_process_group()

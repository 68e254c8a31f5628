"""The command line: `lightning-zo`, `python -m lightning_zo` and `python train.py` compose the Hydra config in
conf/ (config_dir()), instantiate everything from its `_target_`s, and fit."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from .core.errors import UserError


def config_dir() -> Path:
    """The Hydra configs: lightning_zo/conf inside an installed wheel (pyproject.toml maps conf/ there), conf/ at the
    top level of a checkout (or an editable install of one)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


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


# Hydra's own flags: a pre-check of the overrides would be in their way (they print, or use another config).
_NO_PRECHECK = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc",
                "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}


def _overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) from Hydra's command line, or None when a flag means we must not interfere."""
    overrides, multirun, skip = [], False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _NO_PRECHECK:
            return None
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--resolve", "-r", "--run"):
            continue
        elif flag in _FLAGS_WITH_VALUE:
            skip = "=" not in arg
        elif arg.startswith("--") and len(arg) > 2:
            raise UserError(_key_value_hint(argv, i))
        elif arg.startswith("-"):
            return None  # a flag we do not know: let Hydra handle (and explain) it
        else:
            overrides.append(arg)
    return overrides, multirun


def _key_value_hint(argv: list[str], i: int) -> str:
    """`--model tiny` (or `--model=tiny`), an option as other tools spell it: Hydra's overrides are `model=tiny`."""
    key, _, value = argv[i][2:].partition("=")
    following = argv[i + 1] if i + 1 < len(argv) else ""
    if not value and following and not following.startswith("-") and "=" not in following:
        value = following
    given = " ".join(argv[i:i + 2]) if value and value == following else argv[i]
    return f"{given}: not an option of this command; settings are written key=value: {key}={value or 'VALUE'}"


def _sweep_jobs(overrides: list[str], limit: int = 64) -> list[list[str]]:
    """Override lists to pre-check for a multirun: every sweep at its first value, then each sweep value in turn
    with the others at their first (`a=1,2 b=x,y` -> [a=1 b=x], [a=2 b=x], [a=1 b=y]); Hydra runs the product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [text]
              for text, o in zip(overrides, parsed)]
    keyed = [[v if not o.is_sweep_override() else f"{o.get_key_element()}={v}" for v in vals] or [text]
             for text, o, vals in zip(overrides, parsed, values)]
    first = [vals[0] for vals in keyed]
    jobs = [first]
    for i, vals in enumerate(keyed):
        jobs += [first[:i] + [v] + first[i + 1:] for v in vals[1:]]
    return jobs[:limit]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _unknown_key_message(key: str, override: str, overrides: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    hint = ""
    try:
        cfg = _compose([o for o in overrides if o != override])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            keys = [str(k) for k in node.keys() if parent or k != "hydra"]
            close = difflib.get_close_matches(leaf, keys, n=1)
            hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
                f"; {parent or 'the config'} has: {', '.join(keys)}"
    except Exception:  # the hint is a courtesy; the message stands without it
        pass
    return f"unknown key {key!r}{hint} (to add a new key on purpose: +{override.lstrip('+~')})"


# Numeric keys of Lightning's Trainer that take more than their default's type: devices="auto" or "0,1"; a fraction
# of an epoch (a float) where the default counts batches or steps.
_WORDS_ALLOWED = {"trainer.devices"}
_FRACTIONS_ALLOWED = {"trainer.val_check_interval", "trainer.limit_train_batches", "trainer.limit_val_batches",
                      "trainer.limit_test_batches", "trainer.overfit_batches"}


def _check_types(overrides: list[str], cfg: DictConfig) -> None:
    """A value of the wrong type for its key's default (trainer.max_steps=ten, optimizer.lr=fast, a word for a flag)
    is one line here, during composition: the config has no schema, and it ended in a TypeError deep in a run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import Container

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = {o.key_or_group: (text, o.value()) for text, o in zip(overrides, parsed)
              if o.type == OverrideType.CHANGE and "/" not in o.key_or_group and o.package is None
              and o.value() is not None and not (isinstance(o.value(), str) and "${" in o.value())}
    groups = OmegaConf.select(cfg, "hydra.runtime.choices") or {}  # model=tiny, experiment=quick: choices, not values
    leaves = {key for key in values if key not in groups
              and not isinstance(OmegaConf.select(cfg, key, throw_on_resolution_failure=False), Container)}
    if not leaves:
        return
    defaults = _compose([text for text, o in zip(overrides, parsed) if o.key_or_group not in leaves])
    for key in sorted(leaves):
        text, value = values[key]
        default = OmegaConf.select(defaults, key, throw_on_resolution_failure=False)
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok = (isinstance(value, int) and not isinstance(value, bool)
                  or key in _FRACTIONS_ALLOWED and isinstance(value, float)
                  or key in _WORDS_ALLOWED and isinstance(value, str))
            expected = "an integer"
        elif isinstance(default, float):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        if not ok:
            shown = str(default).lower() if isinstance(default, bool) else default
            raise UserError(f"{text}: expected {expected} (the config's default is {shown})")


def precheck(argv: list[str]) -> None:
    """Compose the config from the command line's overrides before Hydra runs, so that an unknown group option
    or key is one `error:` line (UserError) instead of Hydra's multi-line report and exit code 1."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    parsed = _overrides(argv)
    if parsed is None:
        return
    overrides, multirun = parsed
    try:
        for overrides in _sweep_jobs(overrides) if multirun else [overrides]:
            _check_types(overrides, _compose(overrides))
    except MissingConfigException as e:
        group, _, option = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            raise UserError(f"unknown {group} {option!r}; choose one of {', '.join(e.options)}") from None
        raise UserError(str(e).strip().splitlines()[0]) from None
    except ConfigCompositionException as e:
        text = str(e)
        match = re.match(r"Could not override '([^']+)'", text)
        if match:
            key = match.group(1)
            override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
            raise UserError(_unknown_key_message(key, override, overrides)) from None
        if text.startswith("Ambiguous value"):
            raise UserError(text.splitlines()[0] + ": quote it ('a,b'), make it a list ([a,b]) or sweep with -m") \
                from None
        raise UserError(text.strip().splitlines()[0]) from None
    except HydraException as e:
        raise UserError(f"bad override: {str(e).strip().splitlines()[0]}") from None


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

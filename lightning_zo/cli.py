"""The command line: `lightning-zo`, `python -m lightning_zo` and `python train.py` compose the Hydra config in
lightning_zo/conf, instantiate everything from its `_target_`s, and fit."""

from __future__ import annotations

import contextlib
import sys
import warnings

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from .core.errors import UserError


@contextlib.contextmanager
def user_errors():
    """Bad input ends the run with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (UserError, InstantiationException, ValueError) as e:
        root = e
        while isinstance(root, InstantiationException) and root.__cause__ is not None:
            root = root.__cause__
        if not isinstance(root, (UserError, ValueError)):
            raise
        print(f"error: {root}", file=sys.stderr)
        sys.exit(2)


def build_model(cfg: DictConfig):
    """The `model` group's language model, wrapped in the `peft` group's adapter if one is chosen."""
    from hydra.utils import instantiate

    lm = instantiate(cfg.model)
    if cfg.get("peft"):
        lm.model = instantiate(cfg.peft)(lm.model)
    return lm


def build(cfg: DictConfig):
    """(trainer, module, datamodule) from a composed config."""
    from hydra.utils import instantiate

    from .core.optimizer import validate_hparams
    from .integration.callbacks import RunSummary, TrajectoryLog
    from .recipe.data import PromptDataModule

    lm = build_model(cfg)
    task = instantiate(cfg.task)
    codec = instantiate(cfg.quantization)
    optimizer = instantiate(cfg.optimizer)
    try:
        validate_hparams(**optimizer.keywords)
    except ValueError as e:
        raise UserError(f"optimizer: {e}") from e
    if codec.breaks_one_byte:
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
            callback.model_config = OmegaConf.to_container(
                OmegaConf.create({"model": cfg.model, "peft": cfg.get("peft")}), resolve=True)
        if isinstance(callback, RunSummary) and callback.tokenizer is None:
            callback.tokenizer = lm.tokenizer
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return trainer, module, dm


def run(cfg: DictConfig) -> None:
    trainer, module, dm = build(cfg)
    if trainer.is_global_zero:
        print(OmegaConf.to_yaml(cfg, resolve=True) if cfg.get("print_config") else "", end="")
    trainer.fit(module, datamodule=dm)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)

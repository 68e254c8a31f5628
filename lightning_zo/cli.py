"""What train.py does with a composed config: instantiate everything from `_target_`s, then fit."""

from __future__ import annotations

import warnings

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data import PromptDataModule, label_word_ids
from .errors import UserError
from .module import ZOClassifier
from .optimizer import validate_hparams


def build(cfg: DictConfig):
    """(trainer, module, datamodule) from a composed config."""
    lm = instantiate(cfg.model)
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
    module = ZOClassifier(lm.model, label_word_ids(lm.tokenizer, task.spec.label_words, lm.kind), lm.kind,
                          optimizer=optimizer, codec=codec, scheduler=scheduler)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return trainer, module, dm


def run(cfg: DictConfig) -> None:
    trainer, module, dm = build(cfg)
    if trainer.is_global_zero:
        print(OmegaConf.to_yaml(cfg, resolve=True) if cfg.get("print_config") else "", end="")
    trainer.fit(module, datamodule=dm)

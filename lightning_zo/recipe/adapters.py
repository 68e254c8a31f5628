"""Adapters through the `peft` library: ZO then perturbs and updates only the adapter's parameters.

The adapter's initial weights come from torch's generator, so they are drawn under a fixed seed: every rank (and a
replay) builds the same adapter, which the setup checks and the trajectory log's base digest then cover.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError


def lora(model: torch.nn.Module, r: int = 8, alpha: float = 16.0, targets: list[str] | None = None,
         dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """`model` wrapped in a LoRA adapter of rank `r` on the modules named in `targets` (peft's default for the
    architecture when None); only the adapter is trainable."""
    try:
        import peft
    except ImportError as e:
        raise UserError("peft=lora needs the peft package: pip install peft (or pip install 'lightning-zo[peft]')") \
            from e
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise UserError(f"peft: r must be >= 1, alpha > 0 and 0 <= dropout < 1 (got r={r}, alpha={alpha}, "
                        f"dropout={dropout})")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if targets else None,
                             lora_dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules not found in the model
            raise UserError(f"peft: {e}") from e

"""Sparse perturbation masks (Sparse-MeZO, Liu et al. 2024; issue 44): perturb and update only the smallest-magnitude
fraction `keep` of each trainable tensor.

The mask is a function of the weights alone: every `every` steps (step 0 first), before the step's perturbations,
each tensor keeps the elements with |theta| <= its k-th smallest |theta| (k = ceil(keep * numel); ties at the
threshold are kept too). Every rank holds the same weights (DESIGN I1) and selection and comparison are exact, so
every rank, and replay (which passes through the same refresh steps), computes the same masks. A masked element sees
theta + eps * z * m in the forward and theta * decay + sum c * z * m in the update, so the ones left out stay
exactly as they are until a refresh lets them in.

Cost: one bool per trainable element (a quarter of fp32 weights' memory; kept in the optimizer's state_dict for
checkpoint resume), a selection per tensor at each refresh, and masked tensors go through the backend's torch-op
path (the kernels have no mask), which costs more than the fused passes.
"""

from __future__ import annotations

import math

import torch

from .layout import ParamLayout


def validate(keep: float = 1.0, every: int = 100) -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"mask_keep (the fraction of each tensor perturbed) must be in (0, 1], got {keep!r}")
    if int(every) != every or every < 1:
        raise ValueError(f"mask_every (steps between mask refreshes) must be a positive integer, got {every!r}")


class SparseMasks:
    """Each trainable parameter's mask (by id), refreshed from the weights every `every` steps; off at keep = 1."""

    def __init__(self, layout: ParamLayout, keep: float = 1.0, every: int = 100):
        validate(keep, every)
        self.layout, self.keep, self.every = layout, float(keep), int(every)
        self.step: int | None = None  # the step that computed the masks in use
        self._masks: dict[int, torch.Tensor] = {}

    @property
    def on(self) -> bool:
        return self.keep < 1.0

    def describe(self) -> dict | None:
        """For the log's header (None when off, so dense runs' headers are as before)."""
        return {"keep": self.keep, "every": self.every} if self.on else None

    def due(self, step: int) -> bool:
        """Whether step `step` starts with a refresh (always once before the first step this process runs)."""
        return self.on and self.step != step and (step % self.every == 0 or self.step is None)

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """Masks from the weights as they are now (every update before `step` applied)."""
        for span in self.layout:
            magnitude = span.param.detach().abs().float()
            k = max(1, math.ceil(self.keep * magnitude.numel()))
            threshold = magnitude.reshape(-1).kthvalue(k).values
            self._masks[id(span.param)] = magnitude <= threshold
        self.step = step

    def of(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        return self._masks.get(id(param))

    def state_dict(self) -> dict:
        return {"step": self.step, "masks": [self._masks.get(id(s.param)) for s in self.layout]}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self._masks = {id(s.param): m for s, m in zip(self.layout, state["masks"]) if m is not None}

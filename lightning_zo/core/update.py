"""Each step's update of the weights: applied at once, or pending until the next perturbation's pass (`fuse_update`).

A pending update is applied by whichever comes first: the next perturbation's pass over a block (one read of theta
for both, the same bits: `Backend.apply(..., update=...)`), or anything that reads the weights outside a
perturbation: a forward of any of the model's modules (a global forward pre-hook, installed only while an update is
pending), `state_dict`/`load_state_dict` (pre-hooks), `flush()`, `close()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .backend import Backend, Piece, Terms
from .layout import ParamLayout, ParamSpan


def no_mask(param: torch.nn.Parameter) -> None:  # a function, not a lambda: a model with our hooks still pickles
    return None


@dataclass(eq=False)
class Pending:
    """An update not yet applied: its terms, each waiting parameter's span (by id) and decay factor."""

    terms: Terms
    spans: dict[int, ParamSpan]
    decay: dict[int, float] = field(default_factory=dict)


class Updater:
    """Applies updates to `model`'s parameters with `backend`; holds at most one pending update."""

    def __init__(self, model: torch.nn.Module, backend: Backend):
        self.backend = backend
        self.pending: Pending | None = None
        self.perturbing = False  # a perturbation's own forwards apply the pending update block by block
        self._members = {id(m) for m in model.modules()}
        self.mask_of: Callable[[torch.nn.Parameter], torch.Tensor | None] = no_mask  # core/masks.py
        self._guard = None
        self._state_hooks = [model.register_state_dict_pre_hook(self._flush_hook),
                             model.register_load_state_dict_pre_hook(self._flush_hook)]

    def __deepcopy__(self, memo):  # a copy of the model would hold its weights without the pending update
        self._refuse_copy("copying")
        copy = object.__new__(Updater)  # nothing pending, no hooks: the copy's own optimizer makes its own
        copy.__dict__.update(backend=Backend(self.backend.threads), pending=None, perturbing=False, _members=set(),
                             _guard=None, _state_hooks=[], mask_of=no_mask)
        return copy

    def __getstate__(self) -> dict:
        self._refuse_copy("pickling")
        return {**self.__dict__, "_guard": None}

    def _refuse_copy(self, what: str) -> None:
        if self.pending is not None:
            raise RuntimeError(f"{what} a model whose last update is still pending (fuse_update): call the "
                               "optimizer's flush() first")

    def _flush_hook(self, *args, **kwargs) -> None:
        self.flush()

    @torch.no_grad()
    def apply(self, layout: ParamLayout, terms: Terms, decay: dict[int, float] | None = None) -> None:
        """theta <- theta * decay_p + terms now, for every parameter of `layout` (a pending update first)."""
        self.flush()
        self._apply(list(layout), terms, decay or {})

    def defer(self, layout: ParamLayout, terms: Terms, decay: dict[int, float] | None = None) -> None:
        """`apply`, left pending for the next perturbation's pass (see the module's docstring)."""
        self.flush()
        if not terms.seeds:  # a decay alone (every estimate skipped): nothing for a pass to carry
            self._apply(list(layout), terms, decay or {})
            return
        self.pending = Pending(terms, {id(s.param): s for s in layout}, dict(decay or {}))
        if self._guard is None:
            self._guard = torch.nn.modules.module.register_module_forward_pre_hook(self._guarded)

    def _guarded(self, module, args) -> None:
        if not self.perturbing and id(module) in self._members:
            self.flush()

    def waiting(self, param: torch.nn.Parameter) -> bool:
        return self.pending is not None and id(param) in self.pending.spans

    def take(self, spans: Sequence[ParamSpan]) -> Pending | None:
        """The pending update, with `spans` marked applied (the caller applies it to them now)."""
        pending = self.pending
        if pending is None:
            return None
        for s in spans:
            pending.spans.pop(id(s.param), None)
        if not pending.spans:
            self.pending = None
            if self._guard is not None:
                self._guard.remove()
                self._guard = None
        return pending

    @torch.no_grad()
    def flush(self, spans: Sequence[ParamSpan] | None = None) -> None:
        """Apply the pending update now, to `spans` (those of them still waiting) or to every waiting parameter."""
        if self.pending is None:
            return
        chosen = list(self.pending.spans.values()) if spans is None else [s for s in spans if self.waiting(s.param)]
        if chosen:
            pending = self.take(chosen)
            self._apply(chosen, pending.terms, pending.decay)

    def _apply(self, spans: list[ParamSpan], terms: Terms, decay: dict[int, float]) -> None:
        update_pass(self.backend, spans, terms, decay, self.mask_of)

    def close(self) -> None:
        """Apply a pending update and take the hooks off the model."""
        self.flush()
        for h in self._state_hooks:
            h.remove()
        self._state_hooks.clear()


def apply_update(layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
                 decay: dict[int, float] | None = None, rounding_seed: int | None = None) -> None:
    """theta <- theta * decay_p + sum_i coeffs[i] * z(seeds[i]) for every parameter of `layout`, with the sum in
    `noise.term_sum`'s order, each product rounded once to float32, the decayed weight rounded once and the final
    add rounded once into the storage dtype: to nearest, or for bfloat16 weights with `rounding_seed`,
    stochastically from the shared generator (so updates far below one bf16 ulp still move the weights in
    expectation, DESIGN I5). A one-off call on a throwaway backend; the optimizer keeps its own `Updater`."""
    backend = Backend()
    try:
        update_pass(backend, list(layout), Terms(seeds, coeffs, distribution, rounding_seed), decay or {})
    finally:
        backend.close()


def update_pass(backend: Backend, spans: list[ParamSpan], terms: Terms, decay: dict[int, float],
                mask_of: Callable | None = None) -> None:
    """theta <- theta * decay_p + terms, in place, for each of `spans` (one pass per kind of tensor)."""
    pieces = [Piece(s.param.data, s.offset, decay=decay.get(id(s.param), 1.0),
                    mask=None if mask_of is None else mask_of(s.param)) for s in spans]
    with torch.profiler.record_function("lightning_zo.update"):  # a range in profiles (the kernels are opaque)
        backend.apply([p for p in pieces if terms.seeds or p.decay != 1.0], terms, key="update")

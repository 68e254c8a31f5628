"""Which trainable parameters a perturbed forward reads unperturbed: checked, not assumed (issue 41).

The perturbed forward (core/perturbation.py) perturbs a parameter while the block (module subtree) that holds it runs its forward. A user's module can
read a weight elsewhere: a parent calling `F.linear(x, self.child.weight)` without calling the child, a hand-written
tied output layer `h @ self.embed.weight.T` beside a row-wise embedding lookup. Such a read sees theta instead of
theta + eps*z, silently (a zero or biased estimate). `ParameterReads` is a `TorchFunctionMode` that sees every torch
function call of a forward and records each one that reads a trainable parameter while it is not perturbed, or that
reads the master weights through another tensor that shares their storage (a view made before training, which the
perturbed forward cannot reach). `PerturbedForward.evaluate` runs the first perturbed forward under it, holds every parameter
it names perturbed for the whole forward, and refuses what it cannot cover; `check_coverage` is the same check for
users.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UserError
from .layout import ParamLayout

# Calls that read a value without returning a tensor (metadata reads such as .dtype or .size() return none).
_SCALAR_READS = {"item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__array__"}


def _name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return getattr(getattr(func, "__self__", None), "__name__", "") if name == "__get__" else name


class ParameterReads(TorchFunctionMode):
    """Records the reads of `layout`'s parameters inside a forward that do not see their perturbed values.

    `perturbed(param)`: whether the parameter now holds its perturbed copy; `allowed(param)`: a read the perturbed
    forward accounts for otherwise (an embedding's own lookup, whose output it recomputes from the perturbed rows).
    The perturbed forward's own work on the master weights runs under `paused()`.
    """

    def __init__(self, layout: ParamLayout, perturbed: Callable[[torch.nn.Parameter], bool],
                 allowed: Callable[[torch.nn.Parameter], bool] = lambda p: False):
        super().__init__()
        self.layout, self.perturbed, self.allowed = layout, perturbed, allowed
        # The masters' storages as they are now, before the perturbation swaps copies in.
        self._masters = {p.untyped_storage().data_ptr(): s.name for s in layout
                         if (p := s.param).numel() and p.device.type != "meta"}
        self.unperturbed: dict[str, str] = {}  # parameter name -> the first call that read it unperturbed
        self.aliased: dict[str, str] = {}  # parameter name -> the first call that read its storage through an alias
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._paused:
            return result
        if not (_name(func) in _SCALAR_READS or any(isinstance(r, torch.Tensor) for r in tree_leaves(result))):
            return result  # metadata (.dtype, .shape, .device, .size()): no value read
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            span = self.layout.span_of(t)
            if span is not None:
                if not self.perturbed(t) and not self.allowed(t):
                    self.unperturbed.setdefault(span.name, _name(func))
            elif t.numel() and t.device.type != "meta":
                name = self._masters.get(t.untyped_storage().data_ptr())
                if name is not None:
                    self.aliased.setdefault(name, _name(func))
        return result


@dataclass
class Coverage:
    """What the check found: the parameters now held perturbed for the whole forward (read outside their block), by
    name with the call that read them, and the extra scratch memory that holding them costs."""

    held: dict[str, str] = field(default_factory=dict)
    held_bytes: int = 0

    def __str__(self) -> str:
        if not self.held:
            return "every trainable parameter is read perturbed inside its own block"
        names = ", ".join(f"{n} (read by {f})" for n, f in self.held.items())
        return (f"held perturbed for the whole forward, read outside their own module's forward: {names}; "
                f"{self.held_bytes / 2**20:.1f} MiB more scratch memory per perturbed forward")


def refuse_aliases(aliased: dict[str, str]) -> None:
    """What the perturbed forward cannot cover: a read of the master weights through a tensor that is not the parameter."""
    if aliased:
        name, func = next(iter(aliased.items()))
        raise UserError(f"cannot perturb {name}: the forward reads its storage through another tensor ({func}), "
                        "e.g. a view or `.data` kept from before training; read the parameter itself in the forward")


def check_coverage(model: torch.nn.Module, forward: Callable[[], object], distribution: str = "rademacher",
                   seed: int = 0, eps: float = 1e-3) -> Coverage:
    """Run `forward()` (e.g. `lambda: model(batch)`) once under a perturbation, as ZOOptimizer's first step does, and
    say which trainable parameters the perturbed forward must hold perturbed for the whole forward; raises UserError, naming
    the parameter, for one it cannot cover. The model's weights are unchanged afterwards."""
    from .perturbation import PerturbedForward  # which uses this module's check

    hooks = PerturbedForward(model, ParamLayout(model), distribution)
    try:
        with torch.no_grad():
            hooks.evaluate(seed, eps, forward)
        return hooks.coverage
    finally:
        hooks.remove()

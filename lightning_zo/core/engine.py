"""Applying the noise to weights: the perturbed forward and the update. Used by training and by replay.

Exact restore (DESIGN I1/I3): the master weights are never perturbed in place. While a perturbation is active, a
forward pre-hook swaps each module's own parameters for theta + eps*z, materialised just for that module's forward,
and the forward hook swaps the untouched originals back. Peak memory grows by the largest module's parameters.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from . import triton_kernel
from .layout import ParamLayout
from .noise import add_noise, add_noise_sum, round_to_bfloat16


class BufferPool:
    """Reusable flat scratch tensors. Fresh large tensors are fresh mmap'd pages on the CPU, and faulting them in
    costs as much as generating the noise; reuse keeps the extra memory at the largest module's size."""

    def __init__(self):
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.numel() >= numel and buf.device == device and buf.dtype == dtype:
                return self._free.pop(i)[:numel]
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        base = tensor if tensor._base is None else tensor._base
        if base.dim() == 1:
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel)


def _fused(t: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this tensor as it is (one launch for many tensors)."""
    return t.is_contiguous() and t.dtype in FUSED_DTYPES and triton_kernel.available(t.device)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PerturbedForward:
    """Hooks on every module that owns trainable parameters; inactive (free) outside `perturb(...)`."""

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, distribution: str):
        self.layout = layout
        self.distribution = distribution
        self._active: tuple[int, float] | None = None
        self._saved: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self._swapped: set[int] = set()  # ids of the parameters that now hold their perturbed copy
        self._pool = BufferPool()
        self._handles = []
        for module in model.modules():
            if any(layout.slot_of(p) for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_pre_hook(self._swap_in))
                self._handles.append(module.register_forward_hook(self._swap_out))

    def _swap_in(self, module: torch.nn.Module, args) -> None:
        if self._active is None:
            return
        # A parameter owned by nested modules (RoBERTa's lm_head.bias is lm_head.decoder.bias) is swapped in once, by
        # the outermost: the inner hook would otherwise add eps*z to the already perturbed copy (DESIGN I5).
        params = [(p, slot) for p in module.parameters(recurse=False)
                  if (slot := self.layout.slot_of(p)) is not None and id(p) not in self._swapped]
        if not params:
            return
        # theta + eps*z in fp32 (product and sum rounded separately: no FMA), one rounding to the storage dtype.
        seed, coeff = self._active
        originals = [p.data for p, _ in params]
        if all(_fused(t) for t in originals):  # the module's parameters in one launch
            perturbed = [self._pool.take(t.numel(), t.device, t.dtype) for t in originals]
            triton_kernel.noise_sum(perturbed, [t.view(-1) for t in originals], [s.offset for _, s in params],
                                    [seed], [float(np.float32(coeff))], self.distribution)
        else:
            perturbed = []
            for original, (_, slot) in zip(originals, params):
                theta = original.reshape(-1)
                buffer = add_noise(self._pool.take(theta.numel(), theta.device), theta.float(), seed, slot.offset,
                                   coeff, self.distribution)
                if original.dtype != torch.float32:
                    buffer, narrow = self._pool.take(theta.numel(), theta.device, original.dtype).copy_(buffer), buffer
                    self._pool.give(narrow)
                perturbed.append(buffer)
        for (p, _), original, t in zip(params, originals, perturbed):
            p.data = t.view_as(original)
            self._swapped.add(id(p))
        self._saved.setdefault(id(module), []).extend(zip((p for p, _ in params), originals))

    def _swap_out(self, module: torch.nn.Module, args, output) -> None:
        for p, original in self._saved.pop(id(module), []):
            perturbed, p.data = p.data, original
            self._swapped.discard(id(p))
            self._pool.give(perturbed.reshape(-1))

    @contextlib.contextmanager
    def perturb(self, seed: int, coeff: float) -> Iterator[None]:
        """Forwards inside see theta + coeff * z(seed); the weights are bit-identical afterwards."""
        self._active = (seed, coeff)
        try:
            yield
        finally:
            self._active = None
            for saved in self._saved.values():  # a forward that raised midway
                for p, original in saved:
                    p.data = original
            self._saved.clear()
            self._swapped.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


_UPDATE_POOL = BufferPool()


@torch.no_grad()
def apply_update(layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
                 decay: dict[int, float] | None = None, rounding_seed: int | None = None) -> None:
    """theta <- theta * decay_p + sum_i coeffs[i] * z(seeds[i]), with a device-independent rounding order.

    The sum is accumulated in float32 in the given order (slot order), each product rounded once; the decayed
    weight (if any) is rounded once; the final add rounds once into the storage dtype: to nearest, or for
    bfloat16 weights with `rounding_seed`, stochastically from the shared generator (so updates far below one
    bf16 ulp still move the weights in expectation, DESIGN I5).
    """
    decay = decay or {}
    coeffs = [float(np.float32(c)) for c in coeffs]
    fused: dict[tuple, list] = {}  # (device, dtype) -> [(flat theta, offset, factor)]: one launch each
    for slot in layout:
        p = slot.param
        factor = decay.get(id(p), 1.0)
        if not seeds and factor == 1.0:
            continue
        if _fused(p.data):
            fused.setdefault((p.device, p.dtype), []).append((p.data.view(-1), slot.offset, factor))
        else:
            _update_one(p, slot.offset, seeds, coeffs, distribution, factor, rounding_seed)
    for (_, dtype), group in fused.items():
        flats, offsets, factors = (list(column) for column in zip(*group))
        triton_kernel.noise_sum(flats, flats, offsets, list(seeds), coeffs, distribution, factors,
                                rounding_seed if dtype == torch.bfloat16 else None)


def _update_one(p: torch.nn.Parameter, offset: int, seeds: Sequence[int], coeffs: Sequence[float],
                distribution: str, factor: float, rounding_seed: int | None) -> None:
    contiguous = p.data.is_contiguous()
    flat = p.data.view(-1) if contiguous else p.data.reshape(-1)
    if contiguous and p.dtype == torch.float32 and factor == 1.0:
        add_noise_sum(flat, flat, seeds, coeffs, offset, distribution)  # one read + write of theta
        return
    acc = None
    if seeds:
        acc = add_noise_sum(_UPDATE_POOL.take(p.numel(), p.device), None, seeds, coeffs, offset, distribution)
    theta = flat.float()
    if factor != 1.0:
        theta = theta * torch.tensor(factor, dtype=torch.float32, device=theta.device)
    if acc is not None:
        theta = theta + acc
    if p.dtype == torch.bfloat16 and rounding_seed is not None:
        theta = round_to_bfloat16(theta, rounding_seed, offset)
    p.data.copy_(theta.view_as(p.data))
    if acc is not None:
        _UPDATE_POOL.give(acc)

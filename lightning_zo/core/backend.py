"""The one computation of the method, dst = src * decay + sum_s c_s z_s, and the object that runs it.

`Backend.apply` takes a list of `Piece`s (a weight tensor, its offset in the flat parameter space, and where the
result goes) and the `Terms` (seeds, float32 coefficients, distribution). Each piece runs on one of three
implementations, chosen here and only here, once per tensor kind:

- "triton": CUDA tensors of float32, bfloat16 or float16 (core/triton_kernel.py): all pieces of one dtype in one
  launch; decay, bf16 stochastic rounding and an update fused into a perturbation's pass included;
- "kernel": contiguous float32 CPU tensors without decay (core/cpu_kernel.py, compiled on first use): one threaded
  pass over all pieces, an update fused into it;
- "torch": everything else, in torch ops (core/noise.py), the reference whose bits the other two must reproduce
  (tests/test_noise.py, tests/test_triton.py hold them to it).

Every implementation sums the terms in `noise.term_sum`'s order with each product and sum rounded in float32 and
rounds once into the destination's dtype, so a replica's bits never depend on which one ran (DESIGN I1).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import cpu_kernel, triton_kernel
from .noise import add_noise_sum, generator_for, round_to_bfloat16

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Terms:
    """sum_s coeffs[s] * z(seeds[s]) of one distribution, the coefficients rounded to float32 once; with
    `rounding_seed`, what this sum updates in place in bfloat16 is rounded stochastically (DESIGN I5). Uploads
    itself once per device for the Triton kernel (`on`)."""

    def __init__(self, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
                 rounding_seed: int | None = None):
        self.seeds = list(seeds)
        self.coeffs = [float(np.float32(c)) for c in coeffs]
        self.distribution = distribution
        self.rounding_seed = rounding_seed
        self._uploaded: dict = {}

    def on(self, device: torch.device, stochastic: bool):
        """The seeds and coefficients (and rounding seed where `stochastic`) as the Triton kernel reads them."""
        rounding = self.rounding_seed if stochastic else None
        if (device, rounding) not in self._uploaded:
            self._uploaded[device, rounding] = triton_kernel.step_state(self.seeds, self.coeffs, rounding, device)
        return self._uploaded[device, rounding]


@dataclass(eq=False)
class Piece:
    """One weight tensor's share of a pass: `dst` (flat, contiguous, the weight's dtype) = theta + the terms, or
    theta itself updated in place where `dst` is None; `decay` multiplies theta in its update; `mask` (bool, theta's
    shape; core/masks.py): only its elements get the terms and the update, the rest keep theta exactly."""

    theta: torch.Tensor
    offset: int
    dst: torch.Tensor | None = None
    decay: float = 1.0
    mask: torch.Tensor | None = None


class BufferPool:
    """Reusable flat scratch tensors. Fresh large tensors are fresh mmap'd pages on the CPU, and faulting them in
    costs as much as generating the noise; reuse keeps the extra memory at the largest block's size."""

    def __init__(self):
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.numel() >= numel and buf.device == device and buf.dtype == dtype:
                return self._free.pop(i)[:numel]
        # None fits: drop the smaller free ones of this kind first, so the pool holds about one largest block
        # (blocks come one at a time), not one buffer per block size (measured: 2x the largest block of RSS).
        self._free = [b for b in self._free if b.device != device or b.dtype != dtype]
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        base = tensor if tensor._base is None else tensor._base
        if base.dim() == 1:
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel)


class Backend:
    """What one optimizer owns to apply noise: scratch buffers, the Triton launcher (descriptor tables per block),
    the CPU worker threads, and counts of calls per implementation (the run summary's generator_calls; nothing
    reads them to decide)."""

    def __init__(self, threads: int | None = None):
        self.pool = BufferPool()
        self.launcher = triton_kernel.Launcher()
        self.threads = threads or max(1, torch.get_num_threads())
        self.cpu_calls = 0  # C-kernel calls (one per pass on OpenMP, else one per thread's share)
        self.other_calls = 0  # torch-op pieces
        self._executor: ThreadPoolExecutor | None = None
        self.generators: dict[torch.device, str] = {}  # chosen once per device (`noise.generator_for`)

    def kind_of(self, t: torch.Tensor) -> str:
        """Which implementation takes a tensor as it is: "triton", "kernel" or "torch" (this backend's choice for
        its device, where the tensor's dtype and layout suit it)."""
        if t.device not in self.generators:
            self.generators[t.device] = generator_for(t.device)
        kind = self.generators[t.device]
        if kind == "triton" and t.dtype in TRITON_DTYPES and t.is_contiguous():
            return "triton"
        if kind == "kernel" and t.dtype == torch.float32 and t.is_contiguous():
            return "kernel"
        return "torch"

    def __deepcopy__(self, memo) -> "Backend":  # copying a model copies its hooks: threads cannot be copied
        return Backend(self.threads)

    def __getstate__(self) -> dict:  # pickling a model pickles its hooks: leave the threads behind
        return {**self.__dict__, "_executor": None}

    @property
    def launches(self) -> int:
        return self.launcher.launches

    def _workers(self) -> ThreadPoolExecutor | None:
        if self.threads > 1 and self._executor is None and not cpu_kernel.uses_openmp():
            self._executor = ThreadPoolExecutor(max_workers=self.threads - 1)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    @torch.no_grad()
    def apply(self, pieces: Sequence[Piece], terms: Terms, update: Terms | None = None, key=None) -> None:
        """Each piece's dst = theta + terms, rounded to nearest in dst's dtype; a piece without dst: theta = theta *
        decay + terms in place. `update`: first theta = theta * decay + update in place (the bits of an update pass
        followed by this one, one read of theta in the kernels). `key` names a recurring pass (the Triton kernel
        keeps its descriptor table)."""
        fused = update is None or update.distribution == terms.distribution  # the kernels take one distribution
        groups: dict[tuple, list[Piece]] = {}
        for piece in pieces:
            kind = self.kind_of(piece.theta) if fused and piece.mask is None else "torch"  # the kernels have no mask
            if kind == "kernel" and piece.decay != 1.0:
                kind = "torch"
            groups.setdefault((kind, piece.theta.device, piece.theta.dtype), []).append(piece)
        for (kind, device, dtype), group in groups.items():
            if kind == "triton":
                self._triton(group, terms, update, (key, dtype), device, dtype)
            elif kind == "kernel":
                in_place = group[0].dst is None
                self.cpu_calls += cpu_kernel.fill_many(
                    [(p.theta.view(-1) if in_place else p.dst, p.theta.view(-1), p.offset) for p in group],
                    terms.seeds, terms.coeffs, terms.distribution, self._workers(), self.threads,
                    None if update is None else (update.seeds, update.coeffs))
            else:
                for piece in group:
                    self._reference(piece, terms, update)

    def _triton(self, group: list[Piece], terms: Terms, update: Terms | None, key, device, dtype) -> None:
        stochastic = dtype == torch.bfloat16
        thetas = [p.theta.view(-1) for p in group]
        dsts = thetas if group[0].dst is None else [p.dst for p in group]
        decays = [p.decay for p in group]
        rounded = update if update is not None else terms  # the sum that writes the weights
        self.launcher.noise_sum(
            dsts, thetas, [p.offset for p in group], terms.seeds, terms.coeffs, terms.distribution,
            decays if update is not None or group[0].dst is None else None,
            rounded.rounding_seed if stochastic else None, key=key,
            state=terms.on(device, stochastic and update is None and group[0].dst is None),
            update=None if update is None else (update.seeds, update.coeffs, update.on(device, stochastic)))

    def _reference(self, piece: Piece, terms: Terms, update: Terms | None) -> None:
        self.other_calls += 1
        if update is not None:
            self._update_in_place(piece, update)
        if piece.dst is None:
            self._update_in_place(piece, terms)
            return
        theta = piece.theta.reshape(-1).float()
        out = add_noise_sum(self.pool.take(theta.numel(), theta.device), theta, terms.seeds, terms.coeffs,
                            piece.offset, terms.distribution)
        if piece.mask is not None:
            out = torch.where(piece.mask.reshape(-1), out, theta)
        piece.dst.copy_(out)  # one rounding to the weight's dtype (to nearest)
        self.pool.give(out)

    def _update_in_place(self, piece: Piece, terms: Terms) -> None:
        p = piece.theta
        acc = None
        if terms.seeds:
            acc = add_noise_sum(self.pool.take(p.numel(), p.device), None, terms.seeds, terms.coeffs, piece.offset,
                                terms.distribution)
        theta = before = p.reshape(-1).float()
        if piece.decay != 1.0:
            theta = theta * torch.tensor(piece.decay, dtype=torch.float32, device=theta.device)
        if acc is not None:
            theta = theta + acc
        if piece.mask is not None:  # the elements left out keep their value exactly (it rounds to itself)
            theta = torch.where(piece.mask.reshape(-1), theta, before)
        if p.dtype == torch.bfloat16 and terms.rounding_seed is not None:
            theta = round_to_bfloat16(theta, terms.rounding_seed, piece.offset)
        p.copy_(theta.view_as(p))
        if acc is not None:
            self.pool.give(acc)

    def rows(self, dst: torch.Tensor, theta: torch.Tensor, offsets: torch.Tensor, terms: Terms) -> None:
        """Row i of dst = row i of theta + terms at flat elements offsets[i]..: an embedding's looked-up rows (2-d
        contiguous float32 CPU tensors), in one pass of the C kernel."""
        self.cpu_calls += cpu_kernel.fill_rows(dst, theta, offsets, terms.seeds, terms.coeffs, terms.distribution,
                                    self._workers(), self.threads)

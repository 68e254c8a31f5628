"""The perturbation z, regenerated on demand from (seed, logical element index), never stored.

Reference semantics (every backend must reproduce these bits; tests/test_noise.py holds them to it):

* Element g of the flat trainable-parameter space (see `ParamLayout`) draws from Philox4x32-10 keyed by the
  64-bit seed.
* Rademacher: counter block g // 128, bit g % 128 of the 16 little-endian output bytes (byte b = bit // 8, LSB
  first); a set bit means z = -1, a clear bit z = +1. One Philox call feeds 128 elements.
* Gaussian: counter block g // 8, lane g % 8 = the little-endian uint16 at bytes 2*lane..2*lane+1; z is
  GAUSSIAN_TABLE[uint16], a 65536-level inverse-CDF table (integer indexing only, so identical on every device).
* What callers get is coeff * z in float32, one IEEE multiply (exact for Rademacher).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import cpu_kernel, triton_kernel
from .gaussian import gaussian_table
from .philox import philox_blocks_torch

DISTRIBUTIONS = ("rademacher", "gaussian")
CHUNK = 1 << 22  # elements generated at a time: bounds the temporaries, not the result


@functools.cache
def _sign_bits() -> np.ndarray:
    """float32 [256, 8]: the +-1 signs of the 8 elements a byte encodes (bit set = -1)."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits == 1, -1.0, 1.0).astype(np.float32)


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")


def _torch_chunk(seed: int, start: int, n: int, coeff: float, distribution: str, device) -> torch.Tensor:
    c = torch.tensor(coeff, dtype=torch.float32, device=device)
    if distribution == "rademacher":
        first, last = start >> 7, (start + n - 1) >> 7
        raw = philox_blocks_torch(first, last - first + 1, seed, device).reshape(-1)
        table = torch.from_numpy(_sign_bits()).to(device) * c
        return table[raw.long()].reshape(-1)[start - (first << 7):][:n]
    first, last = start >> 3, (start + n - 1) >> 3
    raw = philox_blocks_torch(first, last - first + 1, seed, device).reshape(-1, 2).long()
    lanes = raw[:, 0] | (raw[:, 1] << 8)
    z = torch.from_numpy(gaussian_table()).to(device)[lanes[start - (first << 3):][:n]]
    return z * c


BACKENDS = ("auto", "kernel", "torch", "triton")


def generator_for(device: torch.device) -> str:
    """The fastest implementation on `device` (the one place that chooses; core/backend.py asks it too): Triton on
    CUDA (and on the CPU under Triton's interpreter, for tests), the C kernel on the CPU, torch ops elsewhere."""
    if triton_kernel.available(device):
        return "triton"
    return "kernel" if device.type == "cpu" and cpu_kernel.load() is not None else "torch"


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return generator_for(device)
    if backend == "kernel" and cpu_kernel.load() is None:
        raise RuntimeError("the CPU noise kernel is not available (no C compiler?)")
    if backend == "triton" and not triton_kernel.available(device):
        raise RuntimeError(f"the Triton backend cannot run on {device} (needs CUDA and triton, or TRITON_INTERPRET=1)")
    return backend


def add_noise(dst: torch.Tensor, src: torch.Tensor | None, seed: int, offset: int, coeff: float, distribution: str,
              backend: str = "auto") -> torch.Tensor:
    """dst = src + coeff * z (or dst = coeff * z without src) over flat elements offset..offset+dst.numel()-1.

    dst and src are flat contiguous float32 on one device. Backends give identical bits: "kernel" (fused C, CPU),
    "torch" (any device, the reference), "triton" (CUDA); "auto" picks the fastest for the device.
    """
    _check_distribution(distribution)
    c32 = np.float32(coeff)
    backend = _resolve(backend, dst.device)
    if backend == "kernel":
        cpu_kernel.fill_sum(dst, src, [seed], [c32], offset, distribution)
        return dst
    if backend == "triton":
        triton_kernel.noise_sum([dst], [src], [offset], [seed], [float(c32)], distribution)
        return dst
    for lo in range(0, dst.numel(), CHUNK):
        n = min(CHUNK, dst.numel() - lo)
        cz = _torch_chunk(seed, offset + lo, n, float(c32), distribution, dst.device)
        if src is None:
            dst[lo:lo + n] = cz
        else:
            torch.add(src[lo:lo + n], cz, out=dst[lo:lo + n])  # one IEEE add, no alpha (no FMA)
    return dst


GROUP = 4  # terms summed left to right into one partial sum (see `term_sum`)


def term_sum(terms):
    """The association of every sum of several terms c_s z_s (generator version 2; `GENERATOR_VERSION`), on anything that adds:

        g_j = ((t_4j + t_4j+1) + t_4j+2) + t_4j+3           groups of 4 terms, left to right
        o_k = g_2k + g_2k+1  (g_2k alone if it is the last)  pairs of groups
        sum = ((o_0 + o_1) + o_2) + ...                      pairs left to right

    For 4 terms or fewer this is the plain left-to-right sum (version 1's, so those logs replay unchanged). It lets
    a kernel look a group's 16 possible Rademacher sums up by 4 sign bits instead of adding term by term: the table
    entries are computed in the same order, so the bits are the same."""
    total = first = group = None  # first: a pair's first group, waiting for its second
    count = 0
    for t in terms:  # streamed: at most four operands are alive, whatever the number of terms
        group = t if count % GROUP == 0 else group + t
        count += 1
        if count % GROUP == 0:
            first, total = _close_group(group, first, total)
            group = None
    if count == 0:
        raise ValueError("term_sum needs at least one term")
    if group is not None:
        first, total = _close_group(group, first, total)
    if first is not None:
        total = first if total is None else total + first
    return total


def _close_group(group, first, total):
    if first is None:
        return group, total
    pair = first + group
    return None, pair if total is None else total + pair


GENERATOR_VERSION = 2  # 1: one left-to-right sum over all terms; 2: `term_sum`'s groups (same bits for <= 4 terms)


def add_noise_sum(dst: torch.Tensor, src: torch.Tensor | None, seeds: list[int], coeffs: list[float], offset: int,
                  distribution: str, backend: str = "auto") -> torch.Tensor:
    """dst = src + term_sum(c_s z_s) (or dst = the sum without src): every term at once.

    The kernel and triton backends read and write dst once for all terms; the others generate term by term and add
    in `term_sum`'s order, with the same roundings.
    """
    _check_distribution(distribution)
    if not seeds:
        raise ValueError("add_noise_sum needs at least one seed")
    backend = _resolve(backend, dst.device)
    if backend == "kernel":
        cpu_kernel.fill_sum(dst, src, list(seeds), [np.float32(c) for c in coeffs], offset, distribution)
        return dst
    if backend == "triton":
        triton_kernel.noise_sum([dst], [src], [offset], list(seeds), [float(np.float32(c)) for c in coeffs],
                                distribution)
        return dst
    if src is None or len(seeds) > 1:
        acc = term_sum(add_noise(torch.empty_like(dst), None, seed, offset, c, distribution, backend)
                       for seed, c in zip(seeds, coeffs))
        return dst.copy_(acc) if src is None else torch.add(src, acc, out=dst)
    return add_noise(dst, src, seeds[0], offset, coeffs[0], distribution, backend)


def scaled_noise(seed: int, offset: int, numel: int, coeff: float, distribution: str,
                 device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """coeff * z for flat elements offset..offset+numel-1, as a float32 tensor on `device`."""
    out = torch.empty(numel, dtype=torch.float32, device=torch.device(device))
    return add_noise(out, None, seed, offset, coeff, distribution, backend)


def random_uint16(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """16 shared random bits per element (the Gaussian lane layout), as int32 in [0, 65536)."""
    device = torch.device(device)
    if numel == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    first, last = offset >> 3, (offset + numel - 1) >> 3
    raw = philox_blocks_torch(first, last - first + 1, seed, device).reshape(-1, 2).int()
    return (raw[:, 0] | (raw[:, 1] << 8))[offset - (first << 3):][:numel]


def round_to_bfloat16(x: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Stochastic rounding of float32 to bfloat16 with shared randomness: unbiased, identical on every rank.

    Adding 16 random bits below the bf16 mantissa, then truncating, rounds away from zero with probability
    equal to the dropped fraction.
    """
    bits = x.contiguous().view(torch.int32)
    r = random_uint16(seed, offset, x.numel(), x.device).view_as(bits)
    rounded = (bits + r) & ~0xFFFF
    return rounded.view(torch.float32).to(torch.bfloat16)


def reference_noise(seed: int, offset: int, numel: int, coeff: float, distribution: str) -> torch.Tensor:
    """The torch-op implementation on the CPU: the cross-check for the C kernel's and Triton's bits."""
    return scaled_noise(seed, offset, numel, coeff, distribution, backend="torch")

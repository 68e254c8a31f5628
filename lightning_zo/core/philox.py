"""Philox4x32-10 (Salmon et al., Random123) and the 64-bit seed mix.

Two implementations of the same integer function: numpy uint64 on the CPU (exact, well-defined wraparound,
4x faster than torch int64 here) and torch int64 for any torch device (CUDA). Products of two 32-bit words fit
in 64 bits, so both are exact; the torch path masks after each shift because int64 shifts sign-extend.
"""

from __future__ import annotations

import numpy as np
import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
ROUNDS = 10


def splitmix64(x: int) -> int:
    """One step of splitmix64's output function: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


# The streams of shared randomness (derive_seed's `stream`), all declared here: one value, one use.
DIRECTION_STREAM = 0  # the perturbation of payload slot rank * k + j
ROUNDING_STREAM = 1  # stochastic rounding of low-precision weights in an update
CODEC_STREAM = 2  # stochastic rounding of codes
VOTE_STREAM = 3  # the directions that the robust aggregation rules share between ranks


def derive_seed(run_seed: int, step: int, slot: int, stream: int = DIRECTION_STREAM) -> int:
    """The 64-bit seed of perturbation `slot` (= rank * k + j) at `step`.

    Keyed by the global slot rather than (rank, j) so that one rank simulating k machines draws exactly the seeds
    those k machines would. `stream` separates other uses of shared randomness (stochastic rounding, codecs).
    """
    h = splitmix64(run_seed & MASK64)
    for part in (stream, step, slot):
        h = splitmix64(h ^ (part & MASK64))
    return h


def _key_schedule(seed: int) -> list[tuple[int, int]]:
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    keys = []
    for _ in range(ROUNDS):
        keys.append((k0, k1))
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return keys


def philox_numpy(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, seed: int):
    """Philox4x32-10 on uint64 arrays holding 32-bit words; returns the four output words."""
    u32, m0, m1, mask = np.uint64(32), np.uint64(M0), np.uint64(M1), np.uint64(MASK32)
    for k0, k1 in _key_schedule(seed):
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> u32) ^ c1 ^ np.uint64(k0), p1 & mask, (p0 >> u32) ^ c3 ^ np.uint64(k1), p0 & mask
    return c0, c1, c2, c3


def philox_torch(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int):
    """Philox4x32-10 on int64 tensors holding 32-bit words (any device); returns the four output words."""
    for k0, k1 in _key_schedule(seed):
        p0 = c0 * M0  # may wrap past 2**63: the low 64 bits are still exact
        p1 = c2 * M1
        c0, c1, c2, c3 = ((p1 >> 32) & MASK32) ^ c1 ^ k0, p1 & MASK32, ((p0 >> 32) & MASK32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def philox_blocks_numpy(first: int, count: int, seed: int) -> np.ndarray:
    """The 16 output bytes (little-endian words) of counters first..first+count-1 as uint8 [count, 16].

    Counter block n is (n mod 2**32, n >> 32, 0, 0).
    """
    n = np.arange(first, first + count, dtype=np.uint64)
    zero = np.zeros(count, dtype=np.uint64)
    words = philox_numpy(n & np.uint64(MASK32), n >> np.uint64(32), zero, zero, seed)
    out = np.empty((count, 4), dtype="<u4")
    for i, w in enumerate(words):
        out[:, i] = w
    return out.view(np.uint8)


def philox_blocks_torch(first: int, count: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Same bytes as `philox_blocks_numpy`, computed with torch ops on `device`; uint8 [count, 16]."""
    n = torch.arange(first, first + count, dtype=torch.int64, device=device)
    zero = torch.zeros_like(n)
    words = philox_torch(n & MASK32, n >> 32, zero, zero, seed)
    stacked = torch.stack(words, dim=1)  # [count, 4] of 32-bit values in int64
    shifts = torch.arange(0, 32, 8, device=device)
    return ((stacked.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(count, 16)

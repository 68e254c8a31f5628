"""The fused Triton kernel: every slot's noise applied to many tensors in one launch, one read and one write each.

Same bits as noise.py's reference semantics (tests hold it to them, on CUDA and through Triton's CPU interpreter):

    x = src * factor (if decayed) + noise.slot_sum(c0 z0, c1 z1, ...)      every product and sum rounded in fp32
    dst = x rounded to dst's dtype: to nearest, or for bfloat16 stochastically with 16 shared random bits

Compiled with `enable_fp_fusion=False`, so no multiply-add is contracted into an FMA (the CPU kernel is built with
-ffp-contract=off for the same reason). One launch covers a list of tensors: a program finds its tensor by binary
search over the programs' starts, and reaches it as an element offset from the first tensor's address (one flat
address space on a device), so a whole model's update is one launch per dtype, and a module's perturbation one.

Layout of work: a program owns `elems(distribution, layout, slots)` logical elements aligned to that many in the
flat parameter space. Rademacher (LIGHTNING_ZO_TRITON_LAYOUT: "rounds", the default; "runs" and "words" are kept
for same-run comparisons on a GPU) has three tiles:
- "runs" tile: RUNS = 128 runs of 128 elements, one run per thread for the generator: each thread makes the Philox
  call of its own run (a [RUNS] tensor, one element per thread), and the program walks the run's 4 words in halves
  as [RUNS, 16] tiles (a warp stores 16 consecutive elements of 2 runs). Each word reaches the tile's layout through
  shared memory (`_per_thread`). A sum of one slot in a launch that rounds to nearest makes each run's call once
  (`_shape`'s ONE): one call per 128 elements. Otherwise a thread makes one call per 16 elements per slot, and sums
  of several slots look each group of 4 slots' sum up by its 4 sign bits (`group_tables`).
- "rounds" tile (the default layout's, for launches with a sum of several slots): 16 runs, taken 8 slots a round;
  thread (run, slot) makes that run's and slot's call, one call per 128 elements and slot; the sign bits reach the
  elements through a sum over each group's 4 slots, and each element looks its pair's sum up by the byte of its 8
  signs (`_rounds_sum`, `pair_tables`).
- "words" (the older layout) tiles 1024 elements as [8 Philox blocks, 4 words, 32 bits]: there every thread
  repeats the call of each block it touches, one call per element per slot.
Gaussian: [128 blocks, 4 words, 2 halves] over 1024 elements, 16-bit lanes into the inverse-CDF table.
All give the same bits (the same Philox calls, the same sums in the same order).
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: noise.py falls back to torch ops on CUDA
    triton = None

ELEMS = 1024  # elements per program: Gaussian, and Rademacher in the "words" layout
RUNS = 128  # 128-element runs per program in the Rademacher "runs" layout: 32 * num_warps, one per thread
ROUND_RUNS = 16  # runs per program in the "rounds" layout: 8 slots x 16 runs = one Philox call per thread a round
LAYOUTS = ("rounds", "runs", "words")
# No FMA contraction: products and sums rounded separately, as in the CPU reference. num_warps: Triton's default.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def layout() -> str:
    """The Rademacher layout: LIGHTNING_ZO_TRITON_LAYOUT, "rounds" (default), or "runs" or "words" (for
    comparisons)."""
    name = os.environ.get("LIGHTNING_ZO_TRITON_LAYOUT", "rounds")
    if name not in LAYOUTS:
        raise ValueError(f"LIGHTNING_ZO_TRITON_LAYOUT={name!r}: expected one of {', '.join(LAYOUTS)}")
    return name


def _shape(distribution: str, rademacher_layout: str, slots: int = 1, update_slots: int = 0,
           stochastic: bool = False) -> dict:
    """The constexprs that set a launch's layout (for the launcher and `ptx` alike), from its sums' slots (the
    noise's, and a fused update's) and whether it rounds stochastically:
    - ELEMS, elements per program; RUNS, runs per program in the [runs, 16] "runs" tile (0: not that tile);
      ROUNDS, the "rounds" tile. The "rounds" layout takes the runs tile for sums of one slot, the rounds tile for
      sums of several.
    - ONE / UONE: in the runs tile, the noise's / the update's sum of one slot calls Philox once per run instead of
      once per tile, in a launch whose sums all have one slot and that rounds to nearest (every perturbation without
      a fused update, a one-slot update). Elsewhere the words held across the tiles cost registers (compiled for
      sm_90: 128 instead of 96 beside a 5-slot update, 180 instead of 142 with stochastic rounding)."""
    if distribution == "gaussian" or rademacher_layout == "words":
        tile = {"ELEMS": ELEMS, "RUNS": 0, "ROUNDS": False}
    elif rademacher_layout == "rounds" and max(slots, update_slots) > 1:
        tile = {"ELEMS": ROUND_RUNS * 128, "RUNS": 0, "ROUNDS": True}
    else:
        tile = {"ELEMS": RUNS * 128, "RUNS": RUNS, "ROUNDS": False}
    hoist = tile["RUNS"] > 0 and not stochastic and slots <= 1 and update_slots <= 1
    return {**tile, "ONE": hoist and slots == 1, "UONE": hoist and update_slots == 1}


def elems(distribution: str, rademacher_layout: str = "rounds", slots: int = 1) -> int:
    """Logical elements per program (programs are aligned to this many in the flat parameter space)."""
    return _shape(distribution, rademacher_layout, slots)["ELEMS"]


def available(device: torch.device) -> bool:
    """Whether this backend can run on `device`: CUDA with Triton, or the CPU under Triton's interpreter."""
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):  # first: asked per tensor per block
        return False
    return triton is not None and os.environ.get("LIGHTNING_ZO_TRITON", "1") != "0"


if triton is not None:

    @triton.jit
    def _philox(c0, c1, k0, k1):
        """Philox4x32-10 on uint32 counters (c0, c1, 0, 0) with key (k0, k1); returns the four output words."""
        c2 = tl.zeros_like(c0)
        c3 = tl.zeros_like(c0)
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _pick(w, x0, x1, x2, x3):
        """Word w (0..3) of a Philox output, broadcast from per-block words to w's shape."""
        return tl.where(w == 0, x0, tl.where(w == 1, x1, tl.where(w == 2, x2, x3)))

    @triton.jit
    def _pick4(WORD: tl.constexpr, x0, x1, x2, x3):
        """x_WORD, chosen at compile time."""
        return x0 if WORD == 0 else x1 if WORD == 1 else x2 if WORD == 2 else x3

    @triton.jit
    def _run_call(seeds, b0, b1, ON: tl.constexpr):
        """ON: the four words of slot 0's Philox call for each run (b0, b1); else nothing is computed (b0, unused)."""
        if ON:
            k0, k1 = _key(seeds, 0)
            x0, x1, x2, x3 = _philox(b0, b1, k0, k1)
        else:
            x0, x1, x2, x3 = b0, b0, b0, b0
        return x0, x1, x2, x3

    @triton.jit
    def _per_thread(x):
        """x itself (the max of x and x), through a join and a reduction: Triton then keeps what computed x in x's own
        layout (one run per thread) and moves the result to its users' layout through shared memory. Without it,
        Triton 3.6 recomputes x's Philox call in the tile's layout, once per element (mul.hi counts in the PTX)."""
        return tl.max(tl.join(x, x), axis=1)

    @triton.jit
    def _key(seeds, s):
        seed = tl.load(seeds + s)
        return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)

    @triton.jit
    def _signed(coeffs, s, bit):
        """coeff_s with its sign flipped where bit is 1: exactly +-coeff, branch-free."""
        c = tl.load(coeffs + s).to(tl.uint32, bitcast=True)
        return (c ^ (bit << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _gaussian(gauss, word, half):
        """The table value of 16-bit lane `half` (0 low, 1 high) of each word."""
        return tl.load(gauss + ((word >> (half * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32))

    @triton.jit
    def _word_of(seeds, s, b0, b1, WORD: tl.constexpr):
        """Word WORD of slot s's Philox call for each run (b0, b1)."""
        k0, k1 = _key(seeds, s)
        x0, x1, x2, x3 = _philox(b0, b1, k0, k1)
        return _pick4(WORD, x0, x1, x2, x3)

    @triton.jit
    def _term(seeds, coeffs, gauss, s, b0, b1, w, h, GAUSSIAN: tl.constexpr, WORD: tl.constexpr):
        """coeff_s * z_s over the tile: one Philox call per block (b0, b1), its words broadcast to the elements. WORD
        >= 0 (the Rademacher "runs" layout): the tile is [runs, 16] and takes word WORD of its run's call."""
        if WORD >= 0:
            word = _per_thread(_word_of(seeds, s, b0, b1, WORD))[:, None]
        else:
            k0, k1 = _key(seeds, s)
            x0, x1, x2, x3 = _philox(b0, b1, k0, k1)
            word = _pick(w, x0[:, None, None], x1[:, None, None], x2[:, None, None], x3[:, None, None])
        if GAUSSIAN:
            term = tl.load(coeffs + s) * _gaussian(gauss, word, h)
        else:
            term = _signed(coeffs, s, (word >> h.to(tl.uint32)) & 1)
        return term

    @triton.jit
    def _spread(x):
        """Bit i of x's low byte to bit 4i."""
        x = x & 0xFF
        x = (x | (x << 12)) & 0x000F000F
        x = (x | (x << 6)) & 0x03030303
        return (x | (x << 3)) & 0x11111111

    @triton.jit
    def _close_group(group, pair, acc, s, m):
        """A group of slots closed at slot s (noise.slot_sum): a pair's first group waits, the second joins it, the
        pair joins the total (the first one assigned). Returns the pair and the total."""
        if s % 8 < 4:
            pair = group
        else:
            pair = pair + group
        if (s % 8 >= 4) | (s == m - 1):
            if s < 8:
                acc = pair
            else:
                acc = acc + pair
        return pair, acc

    @triton.jit
    def _table_sum(seeds, coeffs, m, b0, b1, local, first_bit, shape, WORD: tl.constexpr):
        """noise.slot_sum over a [runs, 16] tile of the "runs" layout by table: each group of 4 slots has 16 possible
        sums (+-c0 +- c1 +- c2 +- c3, added in slot order on the host: `group_tables`, after the m coefficients). A
        thread gathers its run's sign bits of a group's slots into one nibble per element, 8 elements a word (bit
        spreads on whole words, before the words reach the tile), and each element looks its group's sum up instead
        of adding 4 signed terms. Groups close into pairs and the total as in `_slot_sum`."""
        pair = tl.zeros(shape, tl.float32)
        acc = tl.zeros(shape, tl.float32)
        low = (local & 8) == 0  # the tile's first 8 bits, else its last 8
        shift = ((local & 7) * 4).to(tl.uint32)
        low_nibbles = tl.zeros_like(b0)
        high_nibbles = tl.zeros_like(b0)
        s = 0
        while s < m:
            word = _word_of(seeds, s, b0, b1, WORD)
            j = (s % 4).to(tl.uint32)
            low_nibbles = low_nibbles | (_spread(word >> first_bit) << j)
            high_nibbles = high_nibbles | (_spread(word >> (first_bit + 8)) << j)
            if (s % 4 == 3) | (s == m - 1):
                nibbles = tl.where(low, _per_thread(low_nibbles)[:, None], _per_thread(high_nibbles)[:, None])
                group = tl.load(coeffs + m + (s // 4) * 16 + ((nibbles >> shift) & 15).to(tl.int32))
                pair, acc = _close_group(group, pair, acc, s, m)
                low_nibbles = tl.zeros_like(b0)
                high_nibbles = tl.zeros_like(b0)
            s += 1
        return acc

    @triton.jit
    def _rounds_sum(seeds, coeffs, m, g0, RUN_COUNT: tl.constexpr):
        """noise.slot_sum over the "rounds" tile [runs, 4 words, 4 bytes, 8 bits] (element run * 128 + word * 32 +
        byte * 8 + bit) by table, 8 slots a round: thread (run, slot) makes the round's Philox call of its run and
        slot, one call per 128 elements and slot; it spreads its words' sign bits into nibbles on whole words
        (`_spread`, at the slot's bit), the 4 slots of each group are summed into one nibble word (their bits are
        disjoint: the sum is an OR), and each element looks its pair's sum up by the byte of its 8 signs
        (`pair_tables`: the two groups' sums added as slot_sum adds them). Pairs join the total in order, the first
        one assigned: slot_sum's bits. Slots past m have seed 0; the tables ignore their bits."""
        run = tl.arange(0, RUN_COUNT)[:, None]
        j = tl.arange(0, 8)[None, :]  # the slot within the round
        block = (g0 >> 7) + run + 0 * j
        b0 = block.to(tl.uint32)
        b1 = (block >> 32).to(tl.uint32)
        byte = (tl.arange(0, 4) * 8).to(tl.uint32)[None, None, None, :]
        nibble = (tl.arange(0, 8) * 4).to(tl.uint32)[None, None, None, :]
        acc = tl.zeros([RUN_COUNT, 4, 4, 8], tl.float32)
        pairs = coeffs + m + (m + 3) // 4 * 16  # after the coefficients and the group tables
        s0 = 0
        while s0 < m:
            seed = tl.load(seeds + s0 + j, mask=s0 + j < m, other=0) + 0 * run
            x0, x1, x2, x3 = _philox(b0, b1, seed.to(tl.uint32), (seed >> 32).to(tl.uint32))
            words = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [RUN_COUNT, 8, 4])  # [.., .., word]
            spread = _spread(words[:, :, :, None] >> byte) << (j % 4).to(tl.uint32)[:, :, None, None]
            groups = tl.sum(tl.reshape(spread, [RUN_COUNT, 2, 4, 4, 4]), axis=2)  # [run, group, word, byte]
            first, second = tl.split(tl.permute(groups, [0, 2, 3, 1]))
            signs = ((first[:, :, :, None] >> nibble) & 15) | (((second[:, :, :, None] >> nibble) & 15) << 4)
            pair = tl.load(pairs + (s0 // 8) * 256 + signs.to(tl.int32))
            if s0 == 0:
                acc = pair
            else:
                acc = acc + pair
            s0 += 8
        return acc

    @triton.jit
    def _bfloat16_nearest(x):
        """x rounded to the nearest bfloat16 (ties to even), still as float32: integer ops, so the final conversion
        is exact on every backend (Triton 3.6's CPU interpreter does not round this conversion to nearest-even)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)

    @triton.jit
    def _slot_sum(seeds, coeffs, m, gauss, b0, b1, w, h, shape, GAUSSIAN: tl.constexpr, WORD: tl.constexpr):
        """noise.slot_sum(c_0 z_0, ..., c_{m-1} z_{m-1}) over the tile, slot by slot (as cpu_kernel.c's close_slot):
        a group of 4 closes after its 4th slot or the last; a pair's first group waits, the second joins it, the
        pair joins the total. The first term of each sum is assigned, not added to 0: a -0.0 stays, as on the CPU."""
        group = tl.zeros(shape, tl.float32)
        pair = tl.zeros(shape, tl.float32)
        acc = tl.zeros(shape, tl.float32)
        s = 0
        while s < m:  # not `for s in range(m)`: Triton 3.6's interpreter cannot range over a runtime int
            term = _term(seeds, coeffs, gauss, s, b0, b1, w, h, GAUSSIAN, WORD)
            if s % 4 == 0:
                group = term
            else:
                group = group + term
            if (s % 4 == 3) | (s == m - 1):
                pair, acc = _close_group(group, pair, acc, s, m)
            s += 1
        return acc

    @triton.jit
    def _sum(seeds, coeffs, m, gauss, b0, b1, w, h, local, given, g0, GAUSSIAN: tl.constexpr, WORD: tl.constexpr,
             GIVEN: tl.constexpr):
        """The tile's slot sum: by table for more than one slot in the Rademacher "runs" layout (WORD >= 0; w is
        then the tile's first bit of the word), else slot by slot. GIVEN (one slot, "runs" layout): `given` is word
        WORD of each run's call, made once per run by the caller (a sum of one term is the term). WORD == -2: the
        "rounds" tile (`_rounds_sum`)."""
        if WORD == -2:
            x = _rounds_sum(seeds, coeffs, m, g0, local.shape[0])
        elif GIVEN:
            x = _signed(coeffs, 0, (_per_thread(given)[:, None] >> h.to(tl.uint32)) & 1)
        elif WORD >= 0:
            if m > 1:
                x = _table_sum(seeds, coeffs, m, b0, b1, local, w, local.shape, WORD)
            else:
                x = _slot_sum(seeds, coeffs, m, gauss, b0, b1, w, h, local.shape, GAUSSIAN, WORD)
        else:
            x = _slot_sum(seeds, coeffs, m, gauss, b0, b1, w, h, local.shape, GAUSSIAN, WORD)
        return x

    @triton.jit
    def _run_word(w, block, high, k0, k1):
        """Word w (a tile of 0..3) of each run's Philox call for block (block, high) under key (k0, k1): the call
        made once per run, its words moved to the tile's layout."""
        x0, x1, x2, x3 = _philox(block, high, k0, k1)
        return _pick(w, _per_thread(x0)[:, None], _per_thread(x1)[:, None], _per_thread(x2)[:, None],
                     _per_thread(x3)[:, None])

    @triton.jit
    def _rounded(x, g0, local, run_local, seeds, m, STOCHASTIC: tl.constexpr, BFLOAT16: tl.constexpr,
                 WORD: tl.constexpr):
        """x rounded for a bfloat16 store (still float32): stochastically with 16 shared random bits below bfloat16's
        mantissa, from the seed after the m slot seeds (noise.round_to_bfloat16), or to nearest; else x.

        Element g = g0 + local takes lane g & 7 of Philox block g >> 3; g0 is a multiple of ELEMS (1024 or more, a
        power of 2) and local < ELEMS, so a block's low word is (g0 >> 3) + (local >> 3) without a carry. In the
        "runs" layout (run_local: each run's first local element, a [RUNS] tensor, for a [RUNS, 16] tile) a thread
        makes the two calls of its run's 16 elements; in the "rounds" tile (WORD == -2; run_local: each block's
        first local element, the tile's shape with 1 bit) a block is a tile row of 8 bits and its call is made once;
        otherwise each element makes its block's call."""
        if STOCHASTIC:
            r0, r1 = _key(seeds, m)
            lane = (local & 7).to(tl.uint32)
            if WORD == -2:
                first = (g0 >> 3).to(tl.uint32) + (run_local >> 3).to(tl.uint32)
                y0, y1, y2, y3 = _philox(first, (g0 >> 35).to(tl.uint32) + tl.zeros_like(first), r0, r1)
                word = _pick(lane >> 1, y0, y1, y2, y3)
            elif run_local is None:
                y0, y1, y2, y3 = _philox((g0 >> 3).to(tl.uint32) + (local >> 3).to(tl.uint32),
                                         (g0 >> 35).to(tl.uint32) + tl.zeros_like(local).to(tl.uint32), r0, r1)
                word = _pick(lane >> 1, y0, y1, y2, y3)
            else:
                first = (g0 >> 3).to(tl.uint32) + (run_local >> 3).to(tl.uint32)
                high = (g0 >> 35).to(tl.uint32) + tl.zeros_like(first)
                w = lane >> 1
                word = tl.where((local & 8) == 0, _run_word(w, first, high, r0, r1),
                                _run_word(w, first + 1, high, r0, r1))
            bits16 = (word >> ((lane & 1) * 16)) & 0xFFFF
            rounded = (x.to(tl.int32, bitcast=True) + bits16.to(tl.int32)) & -65536
            x = rounded.to(tl.float32, bitcast=True)
        elif BFLOAT16:
            x = _bfloat16_nearest(x)
        return x

    @triton.jit
    def _tile(dst, src, factor, seeds, coeffs, m, gauss, useeds, ucoeffs, mu, g0, local, run_local, mask, b0, b1, w, h,
              given, ugiven, GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr, ACCUMULATE: tl.constexpr,
              DECAY: tl.constexpr, STOCHASTIC: tl.constexpr, UPDATE: tl.constexpr, WORD: tl.constexpr,
              ONE: tl.constexpr, UONE: tl.constexpr):
        """One tile: logical elements g0 + local (int32 local: fewer registers than int64 indices) at dst + local and
        src + local (where mask): read, update, perturb, round, store. ONE / UONE: the noise / the update has one slot,
        whose word for this tile is `given` / `ugiven` (see `_sum`)."""
        if ACCUMULATE:
            x = tl.load(src + local, mask=mask).to(tl.float32)
            if DECAY:
                x = x * factor
            if UPDATE:
                # src is theta: first its update (decay above, mu slots, rounded into theta's dtype, written back),
                # then the perturbation of the updated value, as an update launch followed by this one would.
                x = x + _sum(useeds, ucoeffs, mu, gauss, b0, b1, w, h, local, ugiven, g0, GAUSSIAN, WORD, UONE)
                x = _rounded(x, g0, local, run_local, useeds, mu, STOCHASTIC, src.dtype.element_ty == tl.bfloat16,
                             WORD)
                theta = x.to(src.dtype.element_ty)
                tl.store(src + local, theta, mask=mask)
                x = theta.to(tl.float32)
            if HAS_NOISE:
                x = x + _sum(seeds, coeffs, m, gauss, b0, b1, w, h, local, given, g0, GAUSSIAN, WORD, ONE)
        else:
            x = _sum(seeds, coeffs, m, gauss, b0, b1, w, h, local, given, g0, GAUSSIAN, WORD, ONE)
        # A fused launch's perturbed copy rounds to nearest (its stochastic rounding was theta's).
        x = _rounded(x, g0, local, run_local, seeds, m, STOCHASTIC and not UPDATE, dst.dtype.element_ty == tl.bfloat16,
                     WORD)
        tl.store(dst + local, x.to(dst.dtype.element_ty), mask=mask)

    # m, mu and n_tensors stay runtime ints when they are 1: Triton would make them constants, the slot loop
    # `while s < m` then folds away, and Triton 3.6.0's TritonGPUCoalesce pass crashes on the Gaussian kernel for one
    # slot ("PassManager::run failed"; reproduced ahead of time with triton.compile for sm_90, docs/PERFORMANCE.md).
    @triton.jit(do_not_specialize=["m", "n_tensors", "mu"])
    def _noise_sum_kernel(dst, src, table, starts, seeds, coeffs, m, gauss, n_tensors, useeds, ucoeffs, mu,
                          GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr,
                          ACCUMULATE: tl.constexpr, DECAY: tl.constexpr, STOCHASTIC: tl.constexpr,
                          UPDATE: tl.constexpr, ELEMS: tl.constexpr, RUNS: tl.constexpr, ROUNDS: tl.constexpr,
                          ONE: tl.constexpr, UONE: tl.constexpr):
        pid = tl.program_id(0)
        # The tensor this program works on: the last t with starts[t] <= pid, by bisection. A runtime loop, so that
        # one compile serves every tensor count (a compile-time count made a compile per block size, up to 15 s
        # each for a fused bf16 update on Triton 3.6.0).
        lo = 0
        hi = n_tensors
        while hi - lo > 1:
            mid = (lo + hi) // 2
            go_right = tl.load(starts + mid) <= pid
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        t = lo
        dst_at = tl.load(table + 5 * t)
        src_at = tl.load(table + 5 * t + 1)
        offset = tl.load(table + 5 * t + 2)
        numel = tl.load(table + 5 * t + 3)
        factor = tl.load(table + 5 * t + 4).to(tl.int32).to(tl.float32, bitcast=True)
        g0 = ((offset // ELEMS) + (pid - tl.load(starts + t))) * ELEMS  # this program's first logical element
        # Element g0 + local is index g0 + local - offset of the tensor: the pointers and the bounds of local for it.
        dst = dst + dst_at + (g0 - offset)
        src = src + src_at + (g0 - offset)
        first = tl.minimum(tl.maximum(offset - g0, 0), ELEMS).to(tl.int32)
        end = tl.minimum(tl.maximum(offset + numel - g0, 0), ELEMS).to(tl.int32)

        if RUNS > 0:  # Rademacher only
            # The "runs" layout: thread k makes the Philox call of run k (b0, b1: one element per thread), and the
            # run's words are taken in turn, each over two [RUNS, 16] tiles of the elements its bits sign.
            block = (g0 >> 7) + tl.arange(0, RUNS)
            b0 = block.to(tl.uint32)
            b1 = (block >> 32).to(tl.uint32)
            r = tl.arange(0, RUNS)
            # A sum of one slot (ONE: the noise, UONE: the update) makes its run's call once, here, for all 8 tiles.
            p0, p1, p2, p3 = _run_call(seeds, b0, b1, ONE)
            u0, u1, u2, u3 = _run_call(useeds, b0, b1, UONE)
            for word in tl.static_range(4):
                for half in tl.static_range(2):  # 16 elements a thread at a time: 32 took ~250 registers
                    h = half * 16 + tl.arange(0, 16)[None, :]  # the bits of the word
                    local = r[:, None] * 128 + word * 32 + h
                    _tile(dst, src, factor, seeds, coeffs, m, gauss, useeds, ucoeffs, mu, g0, local,
                          r * 128 + word * 32 + half * 16,
                          (local >= first) & (local < end), b0, b1, half * 16, h, _pick4(word, p0, p1, p2, p3),
                          _pick4(word, u0, u1, u2, u3), GAUSSIAN, HAS_NOISE, ACCUMULATE, DECAY, STOCHASTIC, UPDATE,
                          word, ONE, UONE)
        elif ROUNDS:  # Rademacher sums of several slots: the "rounds" tile
            r = tl.arange(0, ELEMS // 128)[:, None, None, None]
            w = tl.arange(0, 4)[None, :, None, None]
            q = tl.arange(0, 4)[None, None, :, None]
            row = r * 128 + w * 32 + q * 8  # each stochastic rounding block's first element
            local = row + tl.arange(0, 8)[None, None, None, :]
            _tile(dst, src, factor, seeds, coeffs, m, gauss, useeds, ucoeffs, mu, g0, local, row,
                  (local >= first) & (local < end), None, None, None, None, None, None, GAUSSIAN, HAS_NOISE,
                  ACCUMULATE, DECAY, STOCHASTIC, UPDATE, -2, False, False)
        else:
            if GAUSSIAN:
                r = tl.arange(0, ELEMS // 8)[:, None, None]
                w = tl.arange(0, 4)[None, :, None]
                h = tl.arange(0, 2)[None, None, :]
                local = r * 8 + w * 2 + h
                block = (g0 >> 3) + tl.arange(0, ELEMS // 8)
            else:
                r = tl.arange(0, ELEMS // 128)[:, None, None]
                w = tl.arange(0, 4)[None, :, None]
                h = tl.arange(0, 32)[None, None, :]
                local = r * 128 + w * 32 + h
                block = (g0 >> 7) + tl.arange(0, ELEMS // 128)
            _tile(dst, src, factor, seeds, coeffs, m, gauss, useeds, ucoeffs, mu, g0, local, None,
                  (local >= first) & (local < end), block.to(tl.uint32), (block >> 32).to(tl.uint32), w, h,
                  None, None, GAUSSIAN, HAS_NOISE, ACCUMULATE, DECAY, STOCHASTIC, UPDATE, -1, False, False)


@functools.cache
def _gauss_table(device: torch.device) -> torch.Tensor:
    from .gaussian import gaussian_table
    return torch.from_numpy(gaussian_table()).to(device)


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the queue (pinned memory, non-blocking copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _elements_between(base: torch.Tensor, t: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError("tensors in one launch must be aligned to their element size")
    return delta // t.element_size()


def _signature(dsts, srcs, offsets, factors) -> tuple:
    """What a descriptor table depends on: each tensor's position relative to the first one's (dst and src), its
    logical offset, numel and factor. A flat scratch buffer cut the same way gives the same signature at any
    address, so a block's table is reused whichever buffer the pool hands out."""
    d0, s0 = dsts[0], srcs[0] if srcs[0] is not None else dsts[0]
    return tuple((_elements_between(d0, d), _elements_between(s0, d if s is None else s), o, d.numel(), f)
                 for d, s, o, f in zip(dsts, srcs, offsets, factors))


def _build_table(signature: tuple, per_program: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows, starts, programs = [], [], 0
    for d_at, s_at, o, numel, f in signature:
        factor_bits = struct.unpack("<i", struct.pack("<f", f))[0]
        rows.append([d_at, s_at, o, numel, factor_bits])
        starts.append(programs)
        programs += (o + numel - 1) // per_program - o // per_program + 1
    return _upload(rows, torch.int64, device), _upload(starts, torch.int64, device), programs


def group_tables(coeffs: list[float]) -> np.ndarray:
    """For each group of 4 slots (noise.slot_sum's groups), its 16 possible Rademacher sums in float32, in slot
    order: entry n is t_0 + t_1 + ... with t_j = -c_j where bit j of n is set, else c_j (the first term assigned,
    each add rounded: the kernel's own operations, so the same bits). Bits of slots past the last are ignored."""
    c = np.asarray(coeffs, dtype=np.float32)
    n = np.arange(16)
    tables = []
    for first in range(0, len(c), 4):
        terms = [np.where((n >> j) & 1, -c[first + j], c[first + j]).astype(np.float32)
                 for j in range(min(4, len(c) - first))]
        tables.append(functools.reduce(np.add, terms))
    return np.concatenate(tables) if tables else np.zeros(0, np.float32)


def pair_tables(coeffs: list[float]) -> np.ndarray:
    """For each pair of groups (8 slots, noise.slot_sum's pairs), its 256 possible Rademacher sums in float32: entry n
    is group 2p's sum for the low nibble of n plus group 2p + 1's for the high one (`group_tables`), added in
    float32 as the kernel would add them, so the same bits; a pair without a second group takes the first's sum
    itself (not + 0.0, which would turn a -0.0 into +0.0)."""
    groups = group_tables(coeffs).reshape(-1, 16)
    n = np.arange(256)
    tables = [groups[g][n & 15] + groups[g + 1][n >> 4] if g + 1 < len(groups) else groups[g][n & 15]
              for g in range(0, len(groups), 2)]
    return np.concatenate(tables).astype(np.float32) if tables else np.zeros(0, np.float32)


def step_state(seeds: list[int], coeffs: list[float], rounding_seed: int | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step kernel arguments on `device`: slot seeds (+ the rounding seed after them) as int64 bit patterns,
    and the float32 coefficients followed by their `group_tables` and `pair_tables`. Upload once per perturbation or
    update and pass to every launch of it."""
    keys = [s - (1 << 64) if s >= 1 << 63 else s for s in [*seeds, rounding_seed or 0]]
    values = (np.concatenate([np.asarray(coeffs, dtype=np.float32), group_tables(coeffs), pair_tables(coeffs)])
              if coeffs else [0.0])
    return _upload(keys, torch.int64, device), _upload([float(v) for v in values], torch.float32, device)


class Launcher:
    """Launch state that one optimizer owns (no module-level caches): the descriptor table of each recurring launch
    (a block of the perturbed forward, the update of one dtype), rebuilt only when its tensors move, and a count of
    launches (for tests and the benchmark)."""

    def __init__(self):
        self._tables: dict[object, tuple[tuple, tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.launches = 0

    def _table(self, key, dsts, srcs, offsets, factors, per_program) -> tuple[torch.Tensor, torch.Tensor, int]:
        signature = _signature(dsts, srcs, offsets, factors)
        key = None if key is None else (key, per_program, dsts[0].device)  # per layout (programs) and device
        cached = self._tables.get(key) if key is not None else None
        if cached is not None and cached[0] == signature:
            return cached[1]
        table = _build_table(signature, per_program, dsts[0].device)
        if key is not None:
            self._tables[key] = (signature, table)
        return table

    def noise_sum(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor | None], offsets: list[int],
                  seeds: list[int], coeffs: list[float], distribution: str, factors: list[float] | None = None,
                  rounding_seed: int | None = None, key=None,
                  state: tuple[torch.Tensor, torch.Tensor] | None = None,
                  update: tuple[list[int], list[float], tuple[torch.Tensor, torch.Tensor] | None] | None = None
                  ) -> None:
        """For each tensor: dst = src * factor + sum_s coeffs[s] * z(seeds[s]) at logical elements offset.., in one
        launch.

        dsts share one dtype and device (float32, bfloat16 or float16), as do the srcs; all flat and contiguous. A
        src of None means no src term (dst = the sum). `rounding_seed` rounds bfloat16 dsts stochastically. `key`
        names a recurring launch whose descriptor table is kept; `state` is `step_state(seeds, coeffs,
        rounding_seed, device)` already on the device (else uploaded here).

        `update` = (useeds, ucoeffs, its state or None): the srcs are weights that first get that update in the same
        launch, src = src * factor + sum_u (rounded into src's dtype, stochastically for bfloat16 with
        `rounding_seed`, and written back), and dst = the updated src + sum_s, rounded to nearest: the bits of an
        update launch followed by this one, with one read of src instead of two.
        """
        if not dsts:
            return
        if len({t.dtype for t in dsts}) > 1 or len({t.dtype for t in srcs if t is not None}) > 1:
            raise ValueError("one launch takes one dtype of dst and one of src")
        accumulate = srcs[0] is not None
        if any((s is not None) != accumulate for s in srcs):
            raise ValueError("either every tensor has a src or none has")
        if not accumulate and not seeds:
            raise ValueError("dst = noise needs at least one seed")
        if update is not None and not (accumulate and update[0]):
            raise ValueError("an update in the same launch needs its seeds and every tensor's src (the weights)")
        factors = factors or [1.0] * len(dsts)
        device = dsts[0].device
        rounded = srcs[0] if update is not None else dsts[0]  # what the rounding seed rounds
        stochastic = rounding_seed is not None and rounded.dtype == torch.bfloat16
        shape = _shape(distribution, layout(), len(seeds), len(update[0]) if update is not None else 0, stochastic)
        table, starts, programs = self._table(key, dsts, srcs, offsets, factors, shape["ELEMS"])
        seed_t, coeff_t = state if state is not None else step_state(seeds, coeffs, None if update else rounding_seed,
                                                                     device)
        useed_t, ucoeff_t, mu = seed_t, coeff_t, 0
        if update is not None:
            useeds, ucoeffs, ustate = update
            useed_t, ucoeff_t = ustate if ustate is not None else step_state(useeds, ucoeffs, rounding_seed, device)
            mu = len(useeds)
        _noise_sum_kernel[(programs,)](
            dsts[0], srcs[0] if accumulate else dsts[0], table, starts, seed_t, coeff_t, len(seeds),
            _gauss_table(device), len(dsts), useed_t, ucoeff_t, mu,
            GAUSSIAN=distribution == "gaussian",
            HAS_NOISE=bool(seeds), ACCUMULATE=accumulate, DECAY=any(f != 1.0 for f in factors),
            STOCHASTIC=stochastic, UPDATE=update is not None, **shape, **COMPILE_OPTIONS)
        self.launches += 1


def noise_sum(dsts: list[torch.Tensor], srcs: list[torch.Tensor | None], offsets: list[int], seeds: list[int],
              coeffs: list[float], distribution: str, factors: list[float] | None = None,
              rounding_seed: int | None = None) -> None:
    """`Launcher.noise_sum` without kept state: for one-off calls (noise.add_noise's triton backend, tests)."""
    Launcher().noise_sum(dsts, srcs, offsets, seeds, coeffs, distribution, factors, rounding_seed)


_PTX_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _launch_spec(name: str, value: int) -> tuple[str, object]:
    """How the JIT launcher types an int argument: Triton turns an int equal to 1 into a compile-time constant unless
    the kernel lists it in do_not_specialize (then it stays a runtime i32)."""
    if value == 1 and name not in _noise_sum_kernel.do_not_specialize:
        return "constexpr", 1
    return "i32", None


def ptx(distribution: str, dtype: torch.dtype = torch.float32, stochastic: bool = False, capability: int = 90,
        options: dict | None = None, slots: int = 3, tensors: int = 2, update: int = 0,
        rademacher_layout: str = "rounds", stage: str = "ptx") -> str:
    """The kernel's PTX for an NVIDIA GPU of `capability`, compiled ahead of time (no GPU needed): to inspect it
    (tests check it has no FMA) and to compile it as the launcher would for `slots` slots over `tensors` tensors
    (ints equal to 1 are specialized unless do_not_specialize says otherwise); `update`: the slots of an update
    fused into the same launch (0: none). `stage`: "ttgir" for the layouts Triton chose."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ty = _PTX_TYPES[dtype]
    signature = {"dst": "*" + ty, "src": "*" + ty, "table": "*i64", "starts": "*i64", "seeds": "*i64",
                 "coeffs": "*fp32", "m": "i32", "gauss": "*fp32", "n_tensors": "i32", "useeds": "*i64",
                 "ucoeffs": "*fp32", "mu": "i32"}
    constants = {"GAUSSIAN": distribution == "gaussian",
                 "HAS_NOISE": True, "ACCUMULATE": True, "DECAY": True, "STOCHASTIC": stochastic,
                 "UPDATE": update > 0, **_shape(distribution, rademacher_layout, slots, update, stochastic)}
    for name, value in (("m", slots), ("n_tensors", tensors), ("mu", update)):
        signature[name], constant = _launch_spec(name, value)
        if constant is not None:
            constants[name] = constant
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=_noise_sum_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options or COMPILE_OPTIONS)
    return compiled.asm[stage]

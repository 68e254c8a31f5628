"""The fused Triton kernel: every slot's noise applied to many tensors in one launch, one read and one write each.

Same bits as noise.py's reference semantics (tests hold it to them, on CUDA and through Triton's CPU interpreter):

    x = src * factor (if decayed) + noise.term_sum(c0 z0, c1 z1, ...)      every product and sum rounded in fp32
    dst = x rounded to dst's dtype: to nearest, or for bfloat16 stochastically with 16 shared random bits

Compiled with `enable_fp_fusion=False`, so no multiply-add is contracted into an FMA (the CPU kernel is built with
-ffp-contract=off for the same reason). One launch covers a list of tensors: a program finds its tensor by binary
search over the programs' starts, and reaches it as an element offset from the first tensor's address (one flat
address space on a device), so a whole model's update is one launch per dtype, and a block's perturbation one.

Layout of work: a program owns ELEMS = 1024 logical elements aligned to 1024 in the flat parameter space.
Rademacher tiles them as [8 Philox blocks, 4 words, 32 bits], so one Philox call per block gives its 128 signs;
Gaussian as [128 blocks, 4 words, 2 halves] with 16-bit lanes into the inverse-CDF table. Each thread makes the call
of every block its elements belong to (in Rademacher, one call per element and slot): the layout the only GPU
measurement ran (docs/PERFORMANCE.md, "GPU: the Triton kernel").
"""

from __future__ import annotations

import os
import struct

import torch

from .gaussian import gaussian_table

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: noise.py falls back to torch ops on CUDA
    triton = None

ELEMS = 1024  # logical elements per program
# No FMA contraction: products and sums rounded separately, as in the CPU reference. num_warps: Triton's default.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    def _term(seeds, coeffs, gauss, s, b0, b1, w, h, GAUSSIAN: tl.constexpr):
        """coeff_s * z_s over the tile: one Philox call per block (b0, b1), its words broadcast to the elements."""
        k0, k1 = _key(seeds, s)
        x0, x1, x2, x3 = _philox(b0, b1, k0, k1)
        word = _pick(w, x0[:, None, None], x1[:, None, None], x2[:, None, None], x3[:, None, None])
        if GAUSSIAN:
            term = tl.load(coeffs + s) * _gaussian(gauss, word, h)
        else:
            term = _signed(coeffs, s, (word >> h.to(tl.uint32)) & 1)
        return term

    @triton.jit
    def _term_sum(seeds, coeffs, m, gauss, b0, b1, w, h, shape, GAUSSIAN: tl.constexpr):
        """noise.term_sum(c_0 z_0, ..., c_{m-1} z_{m-1}) over the tile, slot by slot (as cpu_kernel.c's close_slot):
        a group of 4 closes after its 4th slot or the last; a pair's first group waits, the second joins it, the
        pair joins the total. The first term of each sum is assigned, not added to 0: a -0.0 stays, as on the CPU."""
        group = tl.zeros(shape, tl.float32)
        pair = tl.zeros(shape, tl.float32)
        acc = tl.zeros(shape, tl.float32)
        s = 0
        while s < m:  # not `for s in range(m)`: Triton 3.6's interpreter cannot range over a runtime int
            term = _term(seeds, coeffs, gauss, s, b0, b1, w, h, GAUSSIAN)
            if s % 4 == 0:
                group = term
            else:
                group = group + term
            if (s % 4 == 3) | (s == m - 1):
                if s % 8 < 4:
                    pair = group
                else:
                    pair = pair + group
                if (s % 8 >= 4) | (s == m - 1):
                    if s < 8:
                        acc = pair
                    else:
                        acc = acc + pair
            s += 1
        return acc

    @triton.jit
    def _bfloat16_nearest(x):
        """x rounded to the nearest bfloat16 (ties to even), still as float32: integer ops, so the final conversion
        is exact on every backend (Triton 3.6's CPU interpreter does not round this conversion to nearest-even)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)

    @triton.jit
    def _rounded(x, g0, local, seeds, m, STOCHASTIC: tl.constexpr, BFLOAT16: tl.constexpr):
        """x rounded for a bfloat16 store (still float32): stochastically with 16 shared random bits below bfloat16's
        mantissa, from the seed after the m slot seeds (noise.round_to_bfloat16), or to nearest; else x.

        Element g = g0 + local takes lane g & 7 of Philox block g >> 3; g0 is a multiple of ELEMS and local < ELEMS,
        so the block's low word is (g0 >> 3) + (local >> 3) without a carry. Each element makes its block's call."""
        if STOCHASTIC:
            r0, r1 = _key(seeds, m)
            lane = (local & 7).to(tl.uint32)
            y0, y1, y2, y3 = _philox((g0 >> 3).to(tl.uint32) + (local >> 3).to(tl.uint32),
                                     (g0 >> 35).to(tl.uint32) + tl.zeros_like(local).to(tl.uint32), r0, r1)
            bits16 = (_pick(lane >> 1, y0, y1, y2, y3) >> ((lane & 1) * 16)) & 0xFFFF
            rounded = (x.to(tl.int32, bitcast=True) + bits16.to(tl.int32)) & -65536
            x = rounded.to(tl.float32, bitcast=True)
        elif BFLOAT16:
            x = _bfloat16_nearest(x)
        return x

    # m, mu and n_tensors stay runtime ints when they are 1: Triton would make them constants, the slot loop
    # `while s < m` then folds away, and Triton 3.6.0's TritonGPUCoalesce pass crashes on the Gaussian kernel for one
    # slot ("PassManager::run failed"; reproduced ahead of time with triton.compile for sm_90, docs/PERFORMANCE.md).
    @triton.jit(do_not_specialize=["m", "n_tensors", "mu"])
    def _noise_sum_kernel(dst, src, table, starts, seeds, coeffs, m, gauss, n_tensors, useeds, ucoeffs, mu,
                          GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr, ACCUMULATE: tl.constexpr,
                          DECAY: tl.constexpr, STOCHASTIC: tl.constexpr, UPDATE: tl.constexpr, ELEMS: tl.constexpr):
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
        # Element g0 + local is index g0 + local - offset of the tensor: the pointers and the bounds of local for it
        # (int32 local: fewer registers than int64 indices).
        dst = dst + dst_at + (g0 - offset)
        src = src + src_at + (g0 - offset)
        first = tl.minimum(tl.maximum(offset - g0, 0), ELEMS).to(tl.int32)
        end = tl.minimum(tl.maximum(offset + numel - g0, 0), ELEMS).to(tl.int32)

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
        mask = (local >= first) & (local < end)
        b0 = block.to(tl.uint32)
        b1 = (block >> 32).to(tl.uint32)

        if ACCUMULATE:
            x = tl.load(src + local, mask=mask).to(tl.float32)
            if DECAY:
                x = x * factor
            if UPDATE:
                # src is theta: first its update (decay above, mu slots, rounded into theta's dtype, written back),
                # then the perturbation of the updated value, as an update launch followed by this one would.
                x = x + _term_sum(useeds, ucoeffs, mu, gauss, b0, b1, w, h, local.shape, GAUSSIAN)
                x = _rounded(x, g0, local, useeds, mu, STOCHASTIC, src.dtype.element_ty == tl.bfloat16)
                theta = x.to(src.dtype.element_ty)
                tl.store(src + local, theta, mask=mask)
                x = theta.to(tl.float32)
            if HAS_NOISE:
                x = x + _term_sum(seeds, coeffs, m, gauss, b0, b1, w, h, local.shape, GAUSSIAN)
        else:
            x = _term_sum(seeds, coeffs, m, gauss, b0, b1, w, h, local.shape, GAUSSIAN)
        # A fused launch's perturbed copy rounds to nearest (its stochastic rounding was theta's).
        x = _rounded(x, g0, local, seeds, m, STOCHASTIC and not UPDATE, dst.dtype.element_ty == tl.bfloat16)
        tl.store(dst + local, x.to(dst.dtype.element_ty), mask=mask)


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


def _build_table(signature: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows, starts, programs = [], [], 0
    for d_at, s_at, o, numel, f in signature:
        factor_bits = struct.unpack("<i", struct.pack("<f", f))[0]
        rows.append([d_at, s_at, o, numel, factor_bits])
        starts.append(programs)
        programs += (o + numel - 1) // ELEMS - o // ELEMS + 1
    return _upload(rows, torch.int64, device), _upload(starts, torch.int64, device), programs


def step_state(seeds: list[int], coeffs: list[float], rounding_seed: int | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step kernel arguments on `device`: slot seeds (+ the rounding seed after them) as int64 bit patterns,
    and the float32 coefficients. Upload once per perturbation or update and pass to every launch of it."""
    keys = [s - (1 << 64) if s >= 1 << 63 else s for s in [*seeds, rounding_seed or 0]]
    return _upload(keys, torch.int64, device), _upload([float(c) for c in coeffs] or [0.0], torch.float32, device)


class Launcher:
    """Launch state that one optimizer owns (no module-level caches): the descriptor table of each recurring launch
    (a block of the perturbed forward, the update of one dtype), rebuilt only when its tensors move, and a count of
    launches (for tests and the benchmark)."""

    def __init__(self):
        self._tables: dict[object, tuple[tuple, tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._gauss: dict[torch.device, torch.Tensor] = {}  # the inverse-CDF table on each device (256 KB)
        self.launches = 0

    def _gauss_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._gauss:
            self._gauss[device] = torch.from_numpy(gaussian_table()).to(device)
        return self._gauss[device]

    def _table(self, key, dsts, srcs, offsets, factors) -> tuple[torch.Tensor, torch.Tensor, int]:
        signature = _signature(dsts, srcs, offsets, factors)
        key = None if key is None else (key, dsts[0].device)
        cached = self._tables.get(key) if key is not None else None
        if cached is not None and cached[0] == signature:
            return cached[1]
        table = _build_table(signature, dsts[0].device)
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
        table, starts, programs = self._table(key, dsts, srcs, offsets, factors)
        seed_t, coeff_t = state if state is not None else step_state(seeds, coeffs, None if update else rounding_seed,
                                                                     device)
        useed_t, ucoeff_t, mu = seed_t, coeff_t, 0
        if update is not None:
            useeds, ucoeffs, ustate = update
            useed_t, ucoeff_t = ustate if ustate is not None else step_state(useeds, ucoeffs, rounding_seed, device)
            mu = len(useeds)
        _noise_sum_kernel[(programs,)](
            dsts[0], srcs[0] if accumulate else dsts[0], table, starts, seed_t, coeff_t, len(seeds),
            self._gauss_table(device), len(dsts), useed_t, ucoeff_t, mu,
            GAUSSIAN=distribution == "gaussian",
            HAS_NOISE=bool(seeds), ACCUMULATE=accumulate, DECAY=any(f != 1.0 for f in factors),
            STOCHASTIC=stochastic, UPDATE=update is not None, ELEMS=ELEMS, **COMPILE_OPTIONS)
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
        options: dict | None = None, slots: int = 3, tensors: int = 2, update: int = 0, stage: str = "ptx") -> str:
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
                 "UPDATE": update > 0, "ELEMS": ELEMS}
    for name, value in (("m", slots), ("n_tensors", tensors), ("mu", update)):
        signature[name], constant = _launch_spec(name, value)
        if constant is not None:
            constants[name] = constant
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=_noise_sum_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options or COMPILE_OPTIONS)
    return compiled.asm[stage]

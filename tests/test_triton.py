"""The fused Triton kernel is bit-identical to the CPU reference: compiled on CUDA when there is a GPU, else through
Triton's CPU interpreter, which runs the same kernel source (so the integer and rounding logic is checked on every
machine; what the interpreter cannot check is the compiler, e.g. FMA contraction, hence the CUDA cases), and
compiled ahead of time for sm_90 everywhere (PTX checks)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import triton_cases

triton = pytest.importorskip("triton", reason="triton is a dev dependency (pip install -e '.[dev]')")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs these cases compiled "
                    "(test_cuda_matches_cpu_reference); the interpreter's run of the same source (minutes) is CI's")
def test_interpreter_matches_cpu_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(Path(triton_cases.__file__))], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for name in triton_cases.CASES for w in ("ok", name)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", triton_cases.CASES)
def test_cuda_matches_cpu_reference(case):
    getattr(triton_cases, case)("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_rounds_every_product_and_sum(dtype):
    """Compiled for an H100 ahead of time (no GPU needed): the PTX has no fused multiply-add, which would round
    c*z + acc once instead of twice. The same source compiled with fusion allowed does fuse, so the check bites."""
    from lightning_zo.core import triton_kernel

    assert "fma.rn.f32" not in triton_kernel.ptx("gaussian", dtype, stochastic=dtype == torch.bfloat16)
    fused = triton_kernel.ptx("gaussian", dtype, options={**triton_kernel.COMPILE_OPTIONS, "enable_fp_fusion": True})
    assert "fma.rn.f32" in fused


def test_one_slot_gaussian_compiles_ahead_of_time():
    """Triton makes an int argument equal to 1 a compile-time constant; with one slot the slot loop then folded and
    Triton 3.6.0's TritonGPUCoalesce pass crashed on the Gaussian kernel. The kernel keeps m (and n_tensors) a
    runtime int, so one slot compiles like any other count (compiled as the launcher would, for sm_90)."""
    from lightning_zo.core import triton_kernel

    assert {"m", "n_tensors"} <= set(triton_kernel._noise_sum_kernel.do_not_specialize)
    assert triton_kernel._launch_spec("m", 1) == ("i32", None)
    assert "fma.rn.f32" not in triton_kernel.ptx("gaussian", slots=1, tensors=1)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_the_update_fused_into_a_perturbation_compiles_ahead_of_time(distribution):
    """The launch that updates theta (one slot or several, bf16 stochastic rounding) and writes its perturbed copy
    compiles for sm_90 as the launcher would call it, without FMA; one update slot stays a runtime int (mu)."""
    from lightning_zo.core import triton_kernel

    assert "mu" in triton_kernel._noise_sum_kernel.do_not_specialize
    for update in (1, 5):
        code = triton_kernel.ptx(distribution, torch.bfloat16, stochastic=True, slots=1, tensors=1, update=update)
        assert "fma.rn.f32" not in code and code.count("st.global") >= 2  # theta and its perturbed copy


def _ops(code: str, op: str) -> int:
    """How many instructions of the PTX start with `op` (predicated ones included)."""
    return len(re.findall(rf"^\s*(?:@!?%p\d+\s+)?{re.escape(op)}", code, re.M))


@pytest.mark.parametrize("kind", ["fp32", "bf16 stochastic", "fused update"])
def test_runs_layout_makes_one_philox_call_per_run_and_thread(kind):
    """The Rademacher "runs" layout compiled for sm_90 (no GPU needed), against the "words" layout: in the words
    layout every thread repeats the Philox call of each element's block (one call, ~16 mul.hi, per element and slot);
    in the runs layout a thread makes its run's calls (8 per 128 elements and slot, two more per 16 elements for
    stochastic rounding) and gets the other runs' words through shared memory. Counted in the PTX per element a
    thread holds (8 in the words layout, 128 in the runs layout), with no FMA in either. A Triton that recomputed
    the call in the tile's layout instead (Triton 3.6 without _per_thread: 14 mul.hi per element) fails this."""
    from lightning_zo.core import triton_kernel

    args = {"fp32": dict(dtype=torch.float32, slots=3),
            "bf16 stochastic": dict(dtype=torch.bfloat16, stochastic=True, slots=3),
            "fused update": dict(dtype=torch.bfloat16, stochastic=True, slots=1, tensors=1, update=5)}[kind]
    runs, words = (triton_kernel.ptx("rademacher", rademacher_layout=layout, **args) for layout in ("runs", "words"))
    per_element = {"runs": _ops(runs, "mul.hi.u32") / 128, "words": _ops(words, "mul.hi.u32") / 8}
    assert per_element["runs"] * 3 < per_element["words"], per_element
    assert per_element["runs"] < 8, per_element  # static: both sums' loops (by table, one slot) have a call a tile
    assert _ops(runs, "st.shared") > 0
    assert "fma.rn.f32" not in runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_launch_of_one_slot_sums_makes_one_philox_call_per_run(dtype):
    """Compiled for sm_90 (no GPU needed): in the runs layout a launch whose sums have one slot each (every
    perturbation without a fused update; with a one-slot update, both) makes each sum's call once per run for the
    run's 8 tiles, one call (10 rounds, at most 20 mul.hi) per 128 elements and slot, instead of one per tile. A
    launch that sums several update slots or rounds stochastically keeps a call per tile: words held across its
    tiles would cost registers (docs/PERFORMANCE.md; the default "rounds" layout takes such sums to its own tile)."""
    from lightning_zo.core import triton_kernel

    def calls(**args):
        code = triton_kernel.ptx("rademacher", dtype, tensors=1, rademacher_layout="runs", **args)
        return _ops(code, "mul.hi.u32") / 20

    assert calls(slots=1) <= 1
    assert 1 < calls(slots=1, update=1) <= 2
    assert calls(slots=1, update=5) >= 8 * 2  # one call per tile, for each of the two sums
    assert calls(slots=1, update=1, stochastic=True) >= 8 * 2


@pytest.mark.parametrize("args", [dict(dtype=torch.float32, slots=8), dict(dtype=torch.float32, slots=64),
                                  dict(dtype=torch.bfloat16, stochastic=True, slots=8),
                                  dict(dtype=torch.bfloat16, stochastic=True, slots=1, tensors=1, update=5)],
                         ids=["fp32 8 slots", "fp32 64 slots", "bf16 stochastic", "fused update"])
def test_rounds_layout_makes_one_philox_call_per_128_elements_and_slot(args):
    """The default layout's tile for sums of several slots, compiled for sm_90 (no GPU needed): a round of 8 slots
    has one inlined Philox call (at most 20 mul.hi) that each thread makes for its run and slot, and a thread holds
    16 elements, so one call covers 16 elements x 8 slots; stochastic rounding adds one call per 8-element block
    (2 a thread), a fused update's one-slot perturbation one round. The "runs" tile of the same launch makes a call
    per tile (8 per run and slot)."""
    from lightning_zo.core import triton_kernel

    assert triton_kernel.elems("rademacher", slots=max(args["slots"], args.get("update", 0))) == 16 * 128
    rounds, runs = (triton_kernel.ptx("rademacher", rademacher_layout=layout, **args) for layout in ("rounds", "runs"))
    sums = 2 if args.get("update") else 1
    rounding = 2 if args.get("stochastic") else 0
    assert _ops(rounds, "mul.hi.u32") <= 20 * (sums + rounding)
    assert _ops(runs, "mul.hi.u32") >= 8 * 15 * sums
    assert "fma.rn.f32" not in rounds and _ops(rounds, "st.global") >= sums


def test_layout_is_checked():
    from lightning_zo.core import triton_kernel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_ZO_TRITON_LAYOUT", "tiles")
        with pytest.raises(ValueError, match="LIGHTNING_ZO_TRITON_LAYOUT='tiles'"):
            triton_kernel.layout()


@pytest.mark.parametrize("width", [4, 8], ids=["group tables", "pair tables"])
def test_sign_tables_hold_the_slot_sum_of_every_sign_pattern(width):
    """The runs tile looks a group's sum (4 slots) up by its 4 sign bits, the rounds tile a pair's (8 slots: two
    groups, added) by its 8. Each entry is noise.slot_sum of the signed terms, bit for bit, ±0.0 included: 13 slots
    end in a group of one -0.0 slot (assigned, not added to +0.0), 11 slots in a pair of one group of -0.0s (its sum
    itself: + 0.0 would turn it into +0.0), whose table ignores the bits past it."""
    from lightning_zo.core import triton_kernel
    from lightning_zo.core.noise import slot_sum

    random = (np.random.default_rng(width).standard_normal(10 if width == 4 else 6) * 1e-3).astype(np.float32).tolist()
    coeffs = [0.0, -0.0, *random, -0.0] if width == 4 else [-0.0, 0.0, *random, -0.0, -0.0, -0.0]
    make = triton_kernel.group_tables if width == 4 else triton_kernel.pair_tables
    tables = make(coeffs).reshape(-1, 2 ** width)
    assert tables.dtype == np.float32 and tables.shape == (-(-len(coeffs) // width), 2 ** width)
    for q, table in enumerate(tables):
        terms = coeffs[width * q:width * q + width]
        for n in range(2 ** width):
            want = slot_sum(torch.tensor(-c if (n >> j) & 1 else c, dtype=torch.float32) for j, c in enumerate(terms))
            assert np.float32(table[n]).tobytes() == want.numpy().tobytes(), (q, n)


def test_each_layout_keeps_its_own_descriptor_table():
    """The bench alternates the two Rademacher layouts over the same blocks: each keeps its table (programs of 16384
    and of 1024 elements) instead of rebuilding and uploading it at every switch."""
    from lightning_zo.core import triton_kernel

    launcher = triton_kernel.Launcher()
    dsts, srcs = [torch.empty(40000)], [torch.empty(40000)]
    runs = launcher._table("block", dsts, srcs, [100], [1.0], triton_kernel.elems("rademacher", "runs"))
    words = launcher._table("block", dsts, srcs, [100], [1.0], triton_kernel.elems("rademacher", "words"))
    assert (runs[2], words[2]) == (3, 40)  # programs: elements 100..40099 in 16384s and in 1024s
    assert launcher._table("block", dsts, srcs, [100], [1.0], triton_kernel.elems("rademacher", "runs")) is runs

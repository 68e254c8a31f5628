"""The fused Triton kernel is bit-identical to the CPU reference: compiled on CUDA when there is a GPU, else through
Triton's CPU interpreter, which runs the same kernel source (so the integer and rounding logic is checked on every
machine; what the interpreter cannot check is the compiler, e.g. FMA contraction, hence the CUDA cases), and
compiled ahead of time for sm_90 everywhere (PTX checks)."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_a_block_keeps_its_descriptor_table():
    """A recurring launch (a block, the update of one dtype) keeps its descriptor table, keyed by the launch and the
    device, and reuses it while its tensors keep their places: programs of 1024 elements, aligned in the flat
    parameter space."""
    from lightning_zo.core import triton_kernel

    launcher = triton_kernel.Launcher()
    dsts, srcs = [torch.empty(40000)], [torch.empty(40000)]
    table = launcher._table("block", dsts, srcs, [100], [1.0])
    assert table[2] == 40  # programs: elements 100..40099 in 1024s
    assert launcher._table("block", dsts, srcs, [100], [1.0]) is table
    assert launcher._table("block", dsts, srcs, [2000], [1.0]) is not table  # moved: rebuilt

"""The fused CPU kernel (cpu_kernel.c), compiled on first use with the system C compiler and loaded by ctypes.

Measured need: the numpy path writes several full temporaries per pass; this kernel does one read and one write
(see docs/PERFORMANCE.md). Without a compiler, or with LIGHTNING_ZO_CPU_KERNEL=0, `load()` returns None and
noise.py uses numpy. Work is split across threads (ctypes releases the GIL), not OpenMP, so no second OpenMP
runtime is loaded next to torch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
MIN_PARALLEL = 1 << 16


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return b""


@functools.cache
def load():
    if os.environ.get("LIGHTNING_ZO_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return None
    # -march=native: key the build by the CPU's feature flags too (a shared home may span several CPU models).
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    cache = Path(os.environ.get("LIGHTNING_ZO_CACHE", Path.home() / ".cache" / "lightning_zo")) / "kernels"
    lib_path = cache / f"cpu_kernel-{digest}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"could not compile the CPU noise kernel, using numpy: {result.stderr[-500:]}",
                          stacklevel=2)
            return None
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    f32p, i64, u64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_uint64
    # noise_sum(dst, src, n, offset, seeds, coeffs, m, gaussian, table, accumulate)
    lib.noise_sum.argtypes = [f32p, f32p, i64, u64, ctypes.POINTER(ctypes.c_uint64), f32p, ctypes.c_int,
                              ctypes.c_int, f32p, ctypes.c_int]
    return lib


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


def _ptr(t: torch.Tensor, index: int):
    return ctypes.cast(t.data_ptr() + 4 * index, ctypes.POINTER(ctypes.c_float))


def _split(n: int) -> list[tuple[int, int]]:
    """(start, length) per worker thread, in whole 128-element Philox blocks."""
    workers = _pool()._max_workers if n >= MIN_PARALLEL else 1
    step = -(-n // workers)
    step += (-step) % 128
    return [(lo, min(step, n - lo)) for lo in range(0, n, step)]


def _run(jobs, fn) -> None:
    if len(jobs) == 1:
        fn(*jobs[0])
    else:
        list(_pool().map(lambda job: fn(*job), jobs))


def fill_sum(dst: torch.Tensor, src: torch.Tensor | None, seeds: list[int], coeffs: list[np.float32],
             offset: int, distribution: str, table: np.ndarray) -> None:
    """dst = (src if given) + sum_s coeffs[s] * z(seeds[s]), summed in slot order, in one pass."""
    lib = load()
    m = len(seeds)
    seed_arr = (ctypes.c_uint64 * m)(*seeds)
    coeff_arr = np.asarray(coeffs, dtype=np.float32)
    coeff_ptr = coeff_arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    table_ptr = table.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    accumulate = 1 if src is not None else 0
    src = dst if src is None else src
    gaussian = 1 if distribution == "gaussian" else 0
    _run(_split(dst.numel()), lambda lo, count: lib.noise_sum(
        _ptr(dst, lo), _ptr(src, lo), count, offset + lo, seed_arr, coeff_ptr, m, gaussian, table_ptr, accumulate))


def fill(dst: torch.Tensor, src: torch.Tensor | None, seed: int, offset: int, coeff: np.float32, distribution: str,
         table: np.ndarray) -> None:
    """dst = (src if given) + coeff * z over flat elements offset.. (float32, contiguous, CPU)."""
    fill_sum(dst, src, [seed], [coeff], offset, distribution, table)

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


def _cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_ZO_CACHE", Path.home() / ".cache" / "lightning_zo")) / "kernels"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(lib_path: Path) -> bool:
    """The cached library is whole: its bytes hash to what was recorded beside it when it was built."""
    recorded = lib_path.with_suffix(".sha256")
    try:
        return recorded.read_text().strip() == _sha256(lib_path)
    except OSError:
        return False


def _build(cc: str, lib_path: Path) -> str | None:
    """Compile into a temporary file beside the target, record its hash, then rename both into place (a reader
    never sees a partial library). Returns the reason on failure."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=lib_path.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            return f"{cc} failed: {result.stderr.strip()[-500:]}"
        digest = _sha256(Path(tmp))
        fd, tmp_hash = tempfile.mkstemp(suffix=".sha256.tmp", dir=lib_path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide a shared cache from other users
        os.chmod(tmp_hash, 0o644)
        os.replace(tmp, lib_path)
        os.replace(tmp_hash, lib_path.with_suffix(".sha256"))
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fallback(reason: str) -> None:
    warnings.warn(f"CPU noise kernel unavailable, using the numpy path (same bits, slower): {reason}",
                  stacklevel=3)


@functools.cache
def load():
    """The compiled kernel (ctypes library), or None: LIGHTNING_ZO_CPU_KERNEL=0 (silently), or no compiler / a
    failed build (with a warning that says why). The cache lives in $LIGHTNING_ZO_CACHE/kernels (default
    ~/.cache/lightning_zo/kernels); a library whose bytes no longer match its recorded hash (truncated, damaged) is
    rebuilt with a warning instead of being mapped (a truncated .so would crash the process with SIGBUS)."""
    if os.environ.get("LIGHTNING_ZO_CPU_KERNEL", "1") == "0":
        return None
    if not SOURCE.is_file():
        _fallback(f"its source {SOURCE} is missing from the installation")
        return None
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        _fallback(f"no C compiler found (tried {cc!r}; set CC, or install gcc/clang)")
        return None
    # -march=native: key the build by the CPU's feature flags too (a shared home may span several CPU models).
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    lib_path = _cache_dir() / f"cpu_kernel-{digest}.so"
    if not _verified(lib_path):
        if lib_path.exists() and lib_path.with_suffix(".sha256").exists():
            warnings.warn(f"{lib_path}: the cached CPU kernel is damaged (its bytes do not match the recorded "
                          "sha256); rebuilding it", stacklevel=2)
        try:
            reason = _build(cc, lib_path)
        except OSError as e:
            reason = f"cannot write the kernel cache {lib_path.parent}: {e} (set LIGHTNING_ZO_CACHE)"
        if reason is not None:
            _fallback(reason)
            return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        _fallback(f"cannot load {lib_path}: {e}")
        return None
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

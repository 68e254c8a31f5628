"""The fused CPU kernel (cpu_kernel.c), compiled on first use with the system C compiler and loaded by ctypes.

Measured need: torch ops write several full temporaries per pass; this kernel does one read and one write
(see docs/PERFORMANCE.md). Without a compiler, or with LIGHTNING_ZO_CPU_KERNEL=0, `load()` returns None and
the torch ops of noise.py run instead.

Threads: one pass is cut into shares, run in an OpenMP parallel region when the library is built with OpenMP and
shares torch's runtime (gcc links libgomp.so.1; where torch's own copy has that soname, as in the CPU wheels
here, the loader reuses it and the process keeps one runtime; a renamed copy means two, and Python threads).
Torch's OpenMP threads spin for a while after each of its parallel regions; our pass inside a forward
comes right after one, and a thread of our own then competes with a spinning one for the cores (measured: a
perturbed block 25-30 % slower). Otherwise (another compiler or runtime, no /proc) the shares run on Python
threads (ctypes releases the GIL).
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

from .gaussian import gaussian_table

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
MIN_PARALLEL = 1 << 16
# LIGHTNING_ZO_CPU_KERNEL: 1 (default: every vector path this CPU has), 0 (torch ops), or a cap on the instruction set,
# for comparing the paths' bits and speed on one machine (they give the same bits).
ISA_CAPS = {"1": [], "avx2": ["-mno-avx512f"], "portable": ["-mno-avx512f", "-mno-avx2"]}


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


def _build(cc: str, lib_path: Path, flags: list[str]) -> str | None:
    """Compile into a temporary file beside the target, record its hash, then rename both into place (a reader
    never sees a partial library). Returns the reason on failure."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=lib_path.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, "-fopenmp", "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:  # no OpenMP here (e.g. Apple's clang): Python threads run the shares
            result = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
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
    warnings.warn(f"CPU noise kernel unavailable, using torch ops (same bits, slower): {reason}",
                  stacklevel=3)


@functools.cache
def load():
    """The compiled kernel (ctypes library), or None: LIGHTNING_ZO_CPU_KERNEL=0 (silently), or no compiler / a
    failed build (with a warning that says why). The cache lives in $LIGHTNING_ZO_CACHE/kernels (default
    ~/.cache/lightning_zo/kernels); a library whose bytes no longer match its recorded hash (truncated, damaged) is
    rebuilt with a warning instead of being mapped (a truncated .so would crash the process with SIGBUS)."""
    choice = os.environ.get("LIGHTNING_ZO_CPU_KERNEL", "1")
    if choice == "0":
        return None
    if choice not in ISA_CAPS:
        raise ValueError(f"LIGHTNING_ZO_CPU_KERNEL={choice!r}: choose 1, 0 or one of "
                         f"{', '.join(k for k in ISA_CAPS if k != '1')}")
    flags = FLAGS + ISA_CAPS[choice]
    if not SOURCE.is_file():
        _fallback(f"its source {SOURCE} is missing from the installation")
        return None
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        _fallback(f"no C compiler found (tried {cc!r}; set CC, or install gcc/clang)")
        return None
    # -march=native: key the build by the CPU's feature flags too (a shared home may span several CPU models).
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_flags()).hexdigest()[:16]
    lib_path = _cache_dir() / f"cpu_kernel-{digest}.so"
    if not _verified(lib_path):
        if lib_path.exists() and lib_path.with_suffix(".sha256").exists():
            warnings.warn(f"{lib_path}: the cached CPU kernel is damaged (its bytes do not match the recorded "
                          "sha256); rebuilding it", stacklevel=2)
        try:
            reason = _build(cc, lib_path, flags)
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
    f32p, c_int = ctypes.POINTER(ctypes.c_float), ctypes.c_int
    ptrs = ctypes.c_void_p
    # noise_pieces(dsts, srcs, counts, offsets, npieces, seeds, coeffs, m, useeds, ucoeffs, mu, gaussian, table,
    #              shares, share)
    lib.noise_pieces.argtypes = [ptrs, ptrs, ptrs, ptrs, c_int, ptrs, ptrs, c_int, ptrs, ptrs, c_int, c_int, f32p,
                                 c_int, c_int]
    lib.noise_pieces.restype = None
    lib.openmp = bool(lib.kernel_openmp()) and _one_openmp_runtime()
    return lib


def uses_openmp() -> bool:
    """Whether the kernel runs its threads on torch's OpenMP runtime (a pass then needs no executor)."""
    lib = load()
    return lib is not None and lib.openmp


def _one_openmp_runtime() -> bool:
    """Whether this process maps exactly one OpenMP runtime (so the kernel's parallel regions run on torch's
    threads). False where it cannot be told (no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return False
    names = ("libgomp", "libiomp", "libomp")
    runtimes = {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(names)}
    return len(runtimes) == 1


def _pass(dsts: np.ndarray, srcs: np.ndarray, counts: np.ndarray, offsets: np.ndarray, seeds: list[int],
          coeffs: list[float], distribution: str, workers: int, executor: ThreadPoolExecutor | None,
          update: tuple[list[int], list[float]] | None = None) -> int:
    """One pass over pieces given as arrays (data pointers of float32 dst and src (0: dst = the sum alone), their
    element counts and flat offsets): dst = src + term_sum(c_s z_s), cut into `workers` shares, on torch's OpenMP
    threads if the library shares them, else on `executor`'s (`workers` - 1 of them; the caller's thread takes
    one share). `update` = (seeds, coeffs): first src += term_sum of those, in place, in the same pass (every piece
    needs a src; the bits of an update pass followed by this one). Returns the number of calls into the library."""
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown distribution {distribution!r}")
    if not seeds:
        raise ValueError("a pass needs at least one seed")
    lib = load()
    m = len(seeds)
    useeds, ucoeffs = update or ([], [])
    arrays = [np.ascontiguousarray(a, dtype=t) for a, t in
              ((dsts, np.uint64), (srcs, np.uint64), (counts, np.int64), (offsets, np.uint64),
               ([seed & 0xFFFFFFFFFFFFFFFF for seed in seeds], np.uint64),
               ([np.float32(c) for c in coeffs], np.float32),
               ([seed & 0xFFFFFFFFFFFFFFFF for seed in useeds] or [0], np.uint64),
               ([np.float32(c) for c in ucoeffs] or [0.0], np.float32))]
    if useeds and not arrays[1].all():
        raise ValueError("an update fused into a pass needs every piece's src")
    total = int(arrays[2].sum())
    # Never more threads than torch uses now: a forked child (a data-loader worker) sets 1, and an OpenMP region
    # there would wait forever for the parent's threads (GNU OpenMP is not fork-safe; torch's own ops hang too).
    workers = min(workers, torch.get_num_threads())
    workers = max(1, workers if total >= MIN_PARALLEL and (lib.openmp or executor is not None) else 1)
    table_ptr = gaussian_table().ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    gaussian = 1 if distribution == "gaussian" else 0

    def share(t: int) -> None:
        lib.noise_pieces(*(a.ctypes.data for a in arrays[:4]), len(arrays[2]), arrays[4].ctypes.data,
                         arrays[5].ctypes.data, m, arrays[6].ctypes.data, arrays[7].ctypes.data, len(useeds),
                         gaussian, table_ptr, workers, t)

    if workers == 1:
        share(0)  # the single share, outside any OpenMP region
        return 1
    if lib.openmp:
        share(-1)  # every share, in one OpenMP region on torch's threads
        return 1
    futures = [executor.submit(share, t) for t in range(1, workers)]
    share(0)
    for f in futures:
        f.result()
    return workers


def fill_many(pieces: list[tuple[torch.Tensor, torch.Tensor | None, int]], seeds: list[int], coeffs: list[float],
              distribution: str, executor: ThreadPoolExecutor | None = None, workers: int = 1,
              update: tuple[list[int], list[float]] | None = None) -> int:
    """For each (dst, src or None, offset): dst = src + term_sum(c_s z_s) (noise.add_noise_sum's bits), flat
    contiguous float32 CPU tensors, as one pass over the whole list: the elements of all pieces are cut into
    `workers` contiguous shares (whole 128-element runs), so many small tensors cost no more than one large one.
    `update` = (seeds, coeffs): first src += term_sum of those, in place, in the same pass (the bits of an update
    pass, then this one; every piece needs a src). Returns the number of calls into the library."""
    if update is not None and any(src is None for _, src, _ in pieces):
        raise ValueError("an update fused into a pass needs every piece's src")
    if not pieces:
        return 0
    columns = zip(*((dst.data_ptr(), 0 if src is None else src.data_ptr(), dst.numel(), offset)
                    for dst, src, offset in pieces))
    dsts, srcs, counts, offsets = (np.array(c, dtype=np.uint64) for c in columns)
    return _pass(dsts, srcs, counts, offsets, seeds, coeffs, distribution, workers, executor, update)


def fill_rows(dst: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor, seeds: list[int], coeffs: list[float],
              distribution: str, executor: ThreadPoolExecutor | None = None, workers: int = 1) -> int:
    """Row i of dst = row i of src + term_sum(c_s z_s) over the flat elements offsets[i].. (2-d contiguous float32
    CPU tensors, one row per offset): an embedding's looked-up rows, in one pass (`fill_many`'s bits)."""
    contiguous = dst.is_contiguous() and src.is_contiguous()
    if dst.shape != src.shape or not contiguous or {dst.dtype, src.dtype} != {torch.float32}:
        raise ValueError("fill_rows needs contiguous float32 dst and src of one shape")
    rows, dim = dst.shape
    step = np.arange(rows, dtype=np.uint64) * np.uint64(4 * dim)
    return _pass(np.uint64(dst.data_ptr()) + step, np.uint64(src.data_ptr()) + step,
                 np.full(rows, dim, dtype=np.int64), offsets.numpy().astype(np.uint64), seeds, coeffs, distribution,
                 workers, executor)


def fill_sum(dst: torch.Tensor, src: torch.Tensor | None, seeds: list[int], coeffs: list[float], offset: int,
             distribution: str) -> None:
    """dst = (src if given) + sum_s coeffs[s] * z(seeds[s]), summed in term_sum's order, in one pass (one-off calls:
    on torch's OpenMP threads where the library shares them, else on this thread; no threads of our own)."""
    fill_many([(dst, src, offset)], seeds, coeffs, distribution, None,
              torch.get_num_threads() if uses_openmp() else 1)

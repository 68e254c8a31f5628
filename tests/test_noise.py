import functools
import os
import time

import numpy as np
import pytest
import torch

from lightning_zo.core import cpu_kernel
from lightning_zo.core.gaussian import gaussian_table_sha256
from lightning_zo.core.noise import add_noise, add_noise_sum, reference_noise, scaled_noise, term_sum
from lightning_zo.core.philox import MASK32, derive_seed, philox_numpy, philox_torch

# Random123 kat_vectors: counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    seed = key[0] | (key[1] << 32)
    got_np = philox_numpy(*[np.array([c], dtype=np.uint64) for c in ctr], seed)
    got_t = philox_torch(*[torch.tensor([c], dtype=torch.int64) for c in ctr], seed)
    assert tuple(int(w[0]) for w in got_np) == want
    assert tuple(int(w[0]) for w in got_t) == want


def test_seeds_are_distinct_and_stable():
    seeds = {derive_seed(7, step, slot) for step in range(200) for slot in range(64)}
    assert len(seeds) == 200 * 64
    assert derive_seed(7, 3, 5) == derive_seed(7, 3, 5) != derive_seed(8, 3, 5)


@pytest.mark.parametrize("backend", ["kernel"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("offset,n", [(0, 1000), (77, 5000), (2**33 + 5, 300), (2**40 + 3, 1000), (130, 1),
                                      (1000, 129), (5, 300_001)])
def test_cpu_backends_match_torch_reference(backend, distribution, offset, n):
    a = scaled_noise(123456789, offset, n, 0.37, distribution, backend=backend)
    b = reference_noise(123456789, offset, n, 0.37, distribution)
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_fused_add_is_one_product_and_one_sum(backend, distribution):
    src = torch.randn(200_003)
    got = add_noise(torch.empty_like(src), src, 9, 33, 1e-3, distribution, backend=backend)
    assert torch.equal(got, src + reference_noise(9, 33, src.numel(), 1e-3, distribution))
    acc = src.clone()
    add_noise(acc, acc, 9, 33, 1e-3, distribution, backend=backend)  # in place
    assert torch.equal(acc, got)


def test_kernel_compiles_here():
    # Our machines and CI have a C compiler: the fast path must really be in use there.
    assert cpu_kernel.load() is not None


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_noise_is_indexed_by_element_not_by_call(distribution):
    whole = scaled_noise(99, 1000, 4000, 1.0, distribution)
    parts = torch.cat([scaled_noise(99, 1000, 1234, 1.0, distribution),
                       scaled_noise(99, 2234, 2766, 1.0, distribution)])
    assert torch.equal(whole, parts)


def test_rademacher_moments():
    z = scaled_noise(5, 0, 400_000, 1.0, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.01
    # independence of neighbours (bits of one Philox word)
    assert abs((z[1:] * z[:-1]).mean().item()) < 0.01


def test_gaussian_moments():
    z = scaled_noise(5, 0, 400_000, 1.0, "gaussian").double()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.01
    assert abs((z ** 3).mean().item()) < 0.03
    assert abs((z ** 4).mean().item() - 3) < 0.1
    assert z.abs().max().item() > 3.5


def test_coefficient_is_one_multiply():
    z = scaled_noise(11, 0, 1000, 1.0, "gaussian")
    c = np.float32(1e-3)
    assert torch.equal(scaled_noise(11, 0, 1000, float(c), "gaussian"), z * torch.tensor(c))
    assert torch.equal(scaled_noise(11, 0, 1000, -0.25, "rademacher"), -0.25 * scaled_noise(11, 0, 1000, 1.0, "rademacher"))


def test_gaussian_table_is_pinned():
    # The table is built with float64 math on the host; pinning its hash catches a platform whose libm differs.
    assert gaussian_table_sha256() == "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_cuda_matches_cpu(distribution):
    for offset, n in [(0, 100_000), (2**31 + 3, 5_000_000)]:
        cpu = scaled_noise(42, offset, n, 3e-3, distribution)
        gpu = scaled_noise(42, offset, n, 3e-3, distribution, device="cuda").cpu()
        assert torch.equal(cpu, gpu)


def test_term_sum_groups_four_slots_and_adds_pairs_of_groups():
    f = np.float32
    big = [f(1e8), f(1), f(1), f(1)]  # in float32, 1e8 + 1 == 1e8
    assert term_sum([f(1), f(2), f(3)]) == f(6)
    assert term_sum(big) == f(1e8)  # <= 4 slots: left to right, as generator version 1
    # 8 slots: (1e8 + 1 + 1 + 1) + (-1e8 + 1 + 1 + 1) = 1e8 - 1e8 = 0 (left to right would give 3)
    assert term_sum(big + [f(-1e8), f(1), f(1), f(1)]) == f(0)
    # 12 slots: the third group has no partner and joins the total alone: 0 + (1e8 + ...) = 1e8
    assert term_sum(big + [f(-1e8), f(1), f(1), f(1)] + big) == f(1e8)
    # 9 slots: a group of one after a pair
    assert term_sum([f(1)] * 8 + [f(-0.0)]) == f(8)
    assert str(term_sum([f(-0.0)])) == "-0.0"  # the first term is not 0 + term
    with pytest.raises(ValueError):
        term_sum([])


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_all_slots_in_one_pass_equal_the_slot_by_term_sum(backend, distribution, m):
    seeds, coeffs = [101 + 7 * i for i in range(m)], [(-1) ** i * 1e-3 / (i + 1) for i in range(m)]
    src = torch.randn(300_037)
    acc = term_sum(reference_noise(s, 77, src.numel(), c, distribution) for s, c in zip(seeds, coeffs))
    got = add_noise_sum(torch.empty_like(src), src, seeds, coeffs, 77, distribution, backend=backend)
    assert torch.equal(got, src + acc)
    assert torch.equal(add_noise_sum(torch.empty_like(src), None, seeds, coeffs, 77, distribution, backend), acc)
    inplace = src.clone()
    add_noise_sum(inplace, inplace, seeds, coeffs, 77, distribution, backend)
    assert torch.equal(inplace, got)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("m", [2, 5, 8, 16, 35, 64, 77])
def test_kernel_many_slots_and_zero_coefficients(distribution, m):
    """The C kernel's vectorized paths (up to 4 slots: Philox of 16 runs at once, blocks of 128 in registers;
    beyond 4 slots the group tables, Philox of 4 octets of slots interleaved, whole groups of 32 slots, partial
    groups and chunks) against torch ops, bit for bit, with +0.0 and -0.0 coefficients (the signs of zero sums)."""
    seeds = [derive_seed(1, 2, s) for s in range(m)]
    coeffs = [0.0 if s % 5 == 0 else -0.0 if s % 5 == 1 else (-1) ** s * 1e-3 / (s + 1) for s in range(m)]
    src = torch.randn(40_000)
    for offset in (0, 3, 2**35 + 100):
        want = add_noise_sum(torch.empty_like(src), src, seeds, coeffs, offset, distribution, backend="torch")
        got = add_noise_sum(torch.empty_like(src), src, seeds, coeffs, offset, distribution, backend="kernel")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (m, offset)
        zeros = [-0.0, 0.0, -0.0][:m]  # dst = the sum alone: the signs of zero sums are the reference's
        want = add_noise_sum(torch.empty_like(src), None, seeds[:3], zeros, offset, distribution, backend="torch")
        got = add_noise_sum(torch.empty_like(src), None, seeds[:3], zeros, offset, distribution, backend="kernel")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (m, offset)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_kernel_takes_any_number_of_whole_runs(distribution):
    """The kernel's vector paths take whole 128-element runs several at a time (Philox of 4 or 16 runs at once, or
    of 4 slots): 1 to 17 whole runs, with a partial run after them, also where the 64-bit block counters carry into
    their high word (Gaussian at 2**35, Rademacher at 2**39), equal torch ops bit for bit, for one slot and several."""
    for m in (1, 2, 5):
        seeds = [derive_seed(9, 3, s) for s in range(m)]
        coeffs = [(-1) ** s * 1e-3 / (s + 1) for s in range(m)]
        for runs in (1, 2, 3, 4, 5, 16, 17):
            src = torch.randn(128 * runs + 17)
            for offset in (128 * 5, 2**35 - 128 * 2, 2**39 - 128 * 2):
                want = add_noise_sum(torch.empty_like(src), src, seeds, coeffs, offset, distribution, "torch")
                got = add_noise_sum(torch.empty_like(src), src, seeds, coeffs, offset, distribution, "kernel")
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (m, runs, offset)


@pytest.mark.parametrize("cap", ["1", "avx2", "portable"])
def test_every_instruction_set_path_gives_the_reference_bits(monkeypatch, request, cap):
    """The kernel built for this CPU, capped at AVX2, and without either vector extension (LIGHTNING_ZO_CPU_KERNEL):
    each of its paths (AVX-512, AVX2, the portable loops, whichever the cap leaves) equals torch ops bit for bit, for
    few and many slots, partial groups, whole and partial runs, with and without src."""
    request.addfinalizer(cpu_kernel.load.cache_clear)
    monkeypatch.setenv("LIGHTNING_ZO_CPU_KERNEL", cap)
    cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None
    src = torch.randn(9_000)
    for distribution, ms in (("rademacher", (1, 2, 4, 5, 8, 12, 13, 36, 64, 70)), ("gaussian", (1, 5))):
        for m in ms:
            seeds = [derive_seed(4, 7, s) for s in range(m)]
            coeffs = [0.0 if s == 3 else (-1) ** s * 1e-3 / (s + 1) for s in range(m)]
            for offset, base in ((0, src), (5, src), (2**36 + 128 * 3, None)):
                want = add_noise_sum(torch.empty_like(src), base, seeds, coeffs, offset, distribution, "torch")
                got = add_noise_sum(torch.empty_like(src), base, seeds, coeffs, offset, distribution, "kernel")
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (cap, distribution, m, offset)


def test_an_unknown_kernel_choice_is_refused(monkeypatch, request):
    request.addfinalizer(cpu_kernel.load.cache_clear)
    monkeypatch.setenv("LIGHTNING_ZO_CPU_KERNEL", "avx9")
    cpu_kernel.load.cache_clear()
    with pytest.raises(ValueError, match="LIGHTNING_ZO_CPU_KERNEL='avx9'"):
        cpu_kernel.load()


@pytest.mark.parametrize("openmp", [True, False])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("m", [1, 4, 9])
def test_one_pass_over_many_pieces_in_shares(monkeypatch, request, openmp, distribution, m):
    """fill_many and fill_rows cut one pass into shares (on torch's OpenMP threads, or Python threads where the
    runtime is not shared) at any element: every piece, row and share boundary gives the reference's bits, with
    and without src, and for runs of 16 whole Philox blocks and their remainders."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_zo.core.cpu_kernel import fill_many, fill_rows

    if openmp and not cpu_kernel.uses_openmp():
        pytest.skip("this build does not share torch's OpenMP runtime")
    monkeypatch.setattr(cpu_kernel.load(), "openmp", openmp)
    seeds, coeffs = [derive_seed(3, 1, s) for s in range(m)], [(-1) ** s * 1e-3 / (s + 1) for s in range(m)]
    sizes, offsets = [70_001, 5, 4096, 129, 66_000], [2**39 - 1000, 0, 77, 2**33 + 5, 128 * 3]
    srcs = [torch.randn(n) for n in sizes]
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(3)  # a pass never uses more threads than torch does
    with ThreadPoolExecutor(2) as executor:
        dsts = [torch.empty(n) for n in sizes]
        calls = fill_many([(d, s if i % 2 == 0 else None, o) for i, (d, s, o) in enumerate(zip(dsts, srcs, offsets))],
                          seeds, coeffs, distribution, executor, workers=3)
        assert calls == (1 if openmp else 3)
        for i, (d, s, o) in enumerate(zip(dsts, srcs, offsets)):
            want = add_noise_sum(torch.empty_like(s), s if i % 2 == 0 else None, seeds, coeffs, o, distribution,
                                 backend="torch")
            assert torch.equal(d.view(torch.int32), want.view(torch.int32)), (i, o)
        table, rows = torch.randn(300, 576), torch.tensor([0, 3, 4, 150, 299])
        got = torch.empty(len(rows), 576)
        fill_rows(got, table[rows], 1000 + rows * 576, seeds, coeffs, distribution, executor, workers=2)
        for i, r in enumerate(rows.tolist()):
            want = add_noise_sum(torch.empty(576), table[r], seeds, coeffs, 1000 + r * 576, distribution, "torch")
            assert torch.equal(got[i], want), r


@pytest.mark.parametrize("backend", ["openmp", "threads", "torch"])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_an_update_fused_into_a_pass_gives_the_two_passes_bits(monkeypatch, request, backend, distribution):
    """Backend.apply(..., update=...) updates each theta in place and writes dst from the updated values in one pass
    (chunk by chunk in the C kernel, on OpenMP or Python threads): the bits of the update pass followed by the
    perturbation pass, at offsets and lengths that cross the kernel's chunks, shares and pieces; torch ops (no
    kernel) run the two passes."""
    from lightning_zo.core.backend import Backend, Piece, Terms

    chosen = Backend(threads=3)
    if backend == "torch":
        chosen.generators[torch.device("cpu")] = "torch"
    elif backend == "openmp" and not cpu_kernel.uses_openmp():
        pytest.skip("this build does not share torch's OpenMP runtime")
    else:
        monkeypatch.setattr(cpu_kernel.load(), "openmp", backend == "openmp")
    useeds, ucoeffs = [derive_seed(5, 2, s) for s in range(6)], [(-1) ** s * 1e-4 / (s + 1) for s in range(6)]
    seeds, coeffs = [derive_seed(5, 3, 0)], [1e-3]
    sizes, offsets = [70_001, 5, 40_000, 129], [16_384 * 3 - 100, 0, 2**33 + 5, 128 * 3]
    thetas = [torch.randn(n) for n in sizes]
    want_theta = [add_noise_sum(t.clone(), t, useeds, ucoeffs, o, distribution, "torch")
                  for t, o in zip(thetas, offsets)]
    want = [add_noise_sum(torch.empty_like(t), t, seeds, coeffs, o, distribution, "torch")
            for t, o in zip(want_theta, offsets)]
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(3)
    dsts = [torch.empty(n) for n in sizes]
    chosen.apply([Piece(t, o, d) for t, o, d in zip(thetas, offsets, dsts)], Terms(seeds, coeffs, distribution),
                 update=Terms(useeds, ucoeffs, distribution))
    chosen.close()
    for i in range(len(sizes)):
        assert torch.equal(thetas[i].view(torch.int32), want_theta[i].view(torch.int32)), i
        assert torch.equal(dsts[i].view(torch.int32), want[i].view(torch.int32)), i
    assert (chosen.other_calls, chosen.cpu_calls > 0) == ((4, False) if backend == "torch" else (0, True))
    with pytest.raises(ValueError, match="needs every piece's src"):
        cpu_kernel.fill_many([(dsts[0], None, 0)], seeds, coeffs, distribution, update=(useeds, ucoeffs))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_with_one_thread_runs_the_kernel():
    """A data-loader-like forked child sets torch to one thread: the backend's passes then open no OpenMP region,
    which would wait forever for the parent's threads."""
    from lightning_zo.core.backend import Backend, Piece, Terms

    backend = Backend(threads=2)
    dst, src = torch.empty(1 << 20), torch.randn(1 << 20)
    backend.apply([Piece(src, 0, dst)], Terms([1], [1e-3], "rademacher"))  # the parent's threads exist now
    want = dst.clone()
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the pass finishes with the same bits
        torch.set_num_threads(1)
        out = torch.empty_like(src)
        backend.apply([Piece(src, 0, out)], Terms([1], [1e-3], "rademacher"))
        os._exit(0 if torch.equal(out, want) else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's kernel pass hung")

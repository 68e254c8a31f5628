"""The Triton kernel against the CPU reference, bit for bit: on CUDA (in-process, tests/test_triton.py) and through
Triton's CPU interpreter (`TRITON_INTERPRET=1 python tests/triton_cases.py`, a subprocess of the same test file).

Each case takes the device the Triton path runs on; the reference runs with the Triton backend disabled (the C
kernel or torch ops on the CPU, torch ops on CUDA), on the CPU where only noise and weights are compared, and on the same
device as the Triton path where a forward's output (or a loss, which steers the update) is: a forward's bits are
those of its device's kernels.
"""

from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

import torch

from lightning_zo.core import triton_kernel
from lightning_zo.core.perturbation import PerturbedForward
from lightning_zo.core.update import apply_update
from lightning_zo.core.layout import ParamLayout
from lightning_zo.core.noise import add_noise_sum, round_to_bfloat16

SEEDS = [2**64 - 5, 12345, 2**40 + 7]  # one above 2**63: the kernel takes seeds as int64 bit patterns
COEFFS = [1e-3, -2.5e-3, 7e-4]


def environment(name: str, value: str):
    return mock.patch.dict(os.environ, {name: value})


def reference_backend():
    return environment("LIGHTNING_ZO_TRITON", "0")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def case_multi_tensor_sum(device: str) -> None:
    """Several tensors at unaligned offsets, with and without src, 1 and 3 slots: one launch each."""
    torch.manual_seed(0)
    sizes, offsets = [1000, 1, 77, 3000], [5, 1005, 1006, 1200]
    for distribution in ("rademacher", "gaussian"):
        for m in (1, 3):
            srcs = [torch.randn(n) for n in sizes]
            for with_src in (True, False):
                got = [torch.empty(n, device=device) for n in sizes]
                triton_kernel.noise_sum(got, [s.to(device) if with_src else None for s in srcs], offsets,
                                        SEEDS[:m], COEFFS[:m], distribution)
                for g, s, o in zip(got, srcs, offsets):
                    want = add_noise_sum(torch.empty_like(s), s if with_src else None, SEEDS[:m], COEFFS[:m], o,
                                         distribution, backend="torch")
                    assert same_bits(g, want), (distribution, m, with_src, o)


def case_grouped_sums(device: str) -> None:
    """Several slots: noise.term_sum's groups of 4 and their pairs (4 to 17 slots: a partial group, a group without
    a partner, whole or partial, several pairs), with +-0.0 coefficients."""
    torch.manual_seed(3)
    seeds = [SEEDS[s % 3] + 7919 * s for s in range(17)]
    coeffs = [0.0 if s % 5 == 0 else -0.0 if s % 5 == 1 else (-1) ** s * 1e-3 / (s + 1) for s in range(17)]
    src = torch.randn(700)
    for distribution in ("rademacher", "gaussian"):
        for m in (4, 5, 8, 12, 13, 17):
            got = torch.empty(700, device=device)
            triton_kernel.noise_sum([got], [src.to(device)], [61], seeds[:m], coeffs[:m], distribution)
            want = add_noise_sum(torch.empty(700), src, seeds[:m], coeffs[:m], 61, distribution, backend="torch")
            assert same_bits(got, want), (distribution, m)


def case_program_boundaries(device: str) -> None:
    """Rademacher and Gaussian (programs of 1024 elements), on tensors that cross programs at logical offsets past
    2**32 and 2**35 (Philox counters with a high word): fp32 sums of 1 and 9 slots, and bf16 with stochastic
    rounding (its Philox block index is rebuilt from the program's first element)."""
    torch.manual_seed(4)
    # The first and last tensors each cross a program boundary (2**35 and 3 * 2**32 + 16384 are multiples of 1024)
    # and are short: the interpreter's time goes per program.
    sizes, offsets = [600, 5, 200], [2**35 - 300, 2**35 + 30000, 3 * 2**32 + 16380]
    seeds = [SEEDS[s % 3] + 104729 * s for s in range(9)]
    coeffs = [(-1) ** s * 1e-3 / (s + 1) for s in range(9)]
    srcs = [torch.randn(n) for n in sizes]
    for distribution in ("rademacher", "gaussian"):
        for m in (1, 9):
            want = [add_noise_sum(torch.empty_like(s), s, seeds[:m], coeffs[:m], o, distribution, backend="torch")
                    for s, o in zip(srcs, offsets)]
            got = [torch.empty(n, device=device) for n in sizes]
            triton_kernel.noise_sum(got, [s.to(device) for s in srcs], offsets, seeds[:m], coeffs[:m], distribution)
            assert all(same_bits(g, w) for g, w in zip(got, want)), (distribution, m)
            got = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in sizes]
            triton_kernel.noise_sum(got, [s.to(device) for s in srcs], offsets, seeds[:m], coeffs[:m], distribution,
                                    rounding_seed=77)
            assert all(same_bits(g, round_to_bfloat16(w, 77, o)) for g, w, o in zip(got, want, offsets)), (
                distribution, m, "bf16")


def case_low_precision_perturbation(device: str) -> None:
    """bf16/fp16 theta + c z: fp32 sum, then one round-to-nearest into the storage dtype."""
    torch.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        theta = torch.randn(5000).to(dtype)
        got = torch.empty(5000, dtype=dtype, device=device)
        triton_kernel.noise_sum([got], [theta.to(device)], [300], [SEEDS[0]], [3e-2], "rademacher")
        want = add_noise_sum(torch.empty(5000), theta.float(), [SEEDS[0]], [3e-2], 300, "rademacher",
                             backend="torch").to(dtype)
        assert same_bits(got, want), dtype


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 37), torch.nn.LayerNorm(37),
                                torch.nn.Linear(37, 29))
    return model.to(dtype)


def case_update(device: str) -> None:
    """apply_update over a model (one launch per dtype): decay, stochastic bf16 rounding, both distributions."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for distribution in ("rademacher", "gaussian"):
            ref, dev = _model(dtype), _model(dtype).to(device)
            decay_ref = {id(ref[1].weight): 0.999, id(ref[3].weight): 0.999}
            decay_dev = {id(dev[1].weight): 0.999, id(dev[3].weight): 0.999}
            for step, seeds in enumerate((SEEDS, [], SEEDS[1:])):  # [] = decay only
                coeffs = COEFFS[:len(seeds)]
                with reference_backend():
                    apply_update(ParamLayout(ref), seeds, coeffs, distribution, decay_ref, rounding_seed=step)
                apply_update(ParamLayout(dev), seeds, coeffs, distribution, decay_dev, rounding_seed=step)
            for (name, a), b in zip(ref.named_parameters(), dev.parameters()):
                assert same_bits(a, b), (dtype, distribution, name)


def case_perturbed_forward(device: str) -> None:
    """The weights a module sees inside perturb() (one launch per block) equal the reference ones, and so does the
    output (the reference, on the C kernel's path, perturbs the embedding at its looked-up rows only: its module
    sees the master table, so only the output speaks for it)."""
    for dtype in (torch.float32, torch.bfloat16):
        seen, out = {}, {}
        for name, model in (("ref", _model(dtype).to(device)), ("dev", _model(dtype).to(device))):
            layout = ParamLayout(model)
            with contextlib.ExitStack() as stack:
                if name == "ref":
                    stack.enter_context(reference_backend())
                hooks = PerturbedForward(model, layout, "rademacher")
                record = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).extend(
                    p.detach().clone() for p in m.parameters(recurse=False))) for m in list(model)[1:]]
                with torch.no_grad(), hooks.perturb(SEEDS[0], -1e-2):
                    out[name] = model(torch.arange(10, device=next(model.parameters()).device))
                for h in record:
                    h.remove()
                if name == "dev":  # one launch per block (for its one dtype), not one per module
                    assert hooks.backend.launches == hooks.materialized == len(hooks.blocks) < 4
        assert len(seen["ref"]) == len(seen["dev"]) == 6
        assert not any(same_bits(a, b) for a, b in zip(seen["ref"], list(_model(dtype).parameters())[1:]))
        assert all(same_bits(a, b) for a, b in zip(seen["ref"], seen["dev"])), dtype
        assert same_bits(out["ref"], out["dev"]), dtype


class _Shared(torch.nn.Module):
    """A parameter owned by nested modules (as RoBERTa's lm_head.bias) and a module called twice."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 24)
        self.body = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.GELU(), torch.nn.Linear(24, 24))
        self.head = torch.nn.Linear(24, 40)
        self.head.weight = self.emb.weight  # tied
        self.bias = self.head.bias  # nested owner

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.body(self.body(h))) + self.bias


def case_blocks_with_shared_parameters(device: str) -> None:
    """Leaf-sized blocks and default blocks: forward under the hooks == the reference hooks, bit for bit, with
    one launch per materialised block (two distributions, fp32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        for distribution in ("rademacher", "gaussian"):
            for budget in (0, None):
                out = {}
                for name in ("ref", "dev"):
                    torch.manual_seed(4)
                    model = _Shared().to(dtype)
                    model = model.to(device)  # a forward's bits are its device's
                    with contextlib.ExitStack() as stack:
                        if name == "ref":
                            stack.enter_context(reference_backend())
                        hooks = PerturbedForward(model, ParamLayout(model), distribution, block_bytes=budget)
                        with torch.no_grad(), hooks.perturb(SEEDS[1], 2e-2):
                            out[name] = model(torch.arange(12, device=next(model.parameters()).device))
                    if name == "dev":
                        assert hooks.backend.launches == hooks.materialized > 0, (hooks.backend.launches, budget)
                    hooks.remove()
                assert same_bits(out["ref"], out["dev"]), (dtype, distribution, budget)


def case_fused_update(device: str) -> None:
    """ZOOptimizer(fuse_update=True): each update rides on the next step's perturbation launches (decay and bf16
    stochastic rounding included; fp32 with one direction a step, whose launches make each run's Philox calls once,
    the others with two). Losses and weights equal immediate updates on the reference backend, and a steady-state
    step launches only its perturbations (one per materialised block, no update launch)."""
    from lightning_zo import ZOOptimizer

    ids = torch.arange(10) % 7
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for distribution in ("rademacher", "gaussian"):
            losses, models = {}, {}
            for name in ("ref", "dev"):
                model = _model(dtype)
                model = model.to(device)  # a forward's bits are its device's
                x = ids.to(next(model.parameters()).device)
                with contextlib.ExitStack() as stack:
                    if name == "ref":
                        stack.enter_context(reference_backend())
                    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, k=1 if dtype == torch.float32 else 2,
                                      distribution=distribution, weight_decay=0.1, fuse_update=name == "dev")
                    closure = lambda: model(x).float().square().mean()  # noqa: E731
                    losses[name] = [float(opt.step(closure)) for _ in range(2)]
                    if name == "dev":
                        backend, hooks = opt.backend, opt.perturbed_forward
                        assert opt.updater.pending is not None
                        launches, materialized = backend.launches, hooks.materialized
                        losses[name].append(float(opt.step(closure)))
                        assert backend.launches - launches == hooks.materialized - materialized > 0
                        opt.flush()
                    else:
                        losses[name].append(float(opt.step(closure)))
                models[name] = model
            assert losses["ref"] == losses["dev"], (dtype, distribution, losses)
            for (pname, a), b in zip(models["ref"].named_parameters(), models["dev"].parameters()):
                assert same_bits(a, b), (dtype, distribution, pname)


def case_fused_update_then_the_c_kernel(device: str) -> None:
    """A decayed update left pending on the Triton path, then a step on the C kernel's path (as after a move of the
    model to the CPU): the C kernel's pass has no decay, so the update is applied first, decay included."""
    from lightning_zo import ZOOptimizer

    if device != "cpu":
        return  # the move is simulated by turning the Triton backend off on the CPU
    models = {}
    for name in ("ref", "dev"):
        model = _model(torch.float32)
        closure = lambda: model(torch.arange(10) % 7).square().mean()  # noqa: E731
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, weight_decay=0.5, fuse_update=name == "dev")
        with contextlib.ExitStack() as stack:
            if name == "ref":
                stack.enter_context(reference_backend())
            opt.step(closure)
        with reference_backend():
            opt.backend.generators.clear()  # as after a move to another device: the backend chooses again
            opt.step(closure)
            opt.flush()
        models[name] = model
    for (pname, a), b in zip(models["ref"].named_parameters(), models["dev"].parameters()):
        assert same_bits(a, b), pname


CASES = [name for name in dir(sys.modules[__name__]) if name.startswith("case_")]

if __name__ == "__main__":  # the interpreter run: every case on the CPU
    assert triton_kernel.available(torch.device("cpu")), "run with TRITON_INTERPRET=1 and triton installed"
    for name in CASES:
        globals()[name]("cpu")
        print("ok", name, flush=True)

"""ZOOptimizer(fuse_update=True): each update waits for the next step's first perturbation, whose pass over a block
updates theta in place and writes the perturbed copy from the updated values. Same bits as applying it at once;
applied before anything reads or replaces the weights (a forward outside a step, state_dict, load_state_dict)."""

import copy

import pytest
import torch

from lightning_zo import ZOOptimizer
from lightning_zo.core import update
from lightning_zo.core.perturbation import PerturbedForward
from lightning_zo.core.layout import ParamLayout
from test_perturbed_forward import _ids, _roberta, _tiny_llama


def _steps(model, ids, fuse, steps=4, budget=None, **kwargs):
    opt = ZOOptimizer(model, lr=1e-1, eps=1e-2, k=2, fuse_update=fuse, **kwargs)
    if budget is not None:  # other blocks than the default
        opt.perturbed_forward.remove()
        opt.perturbed_forward = PerturbedForward(model, opt.layout, opt.distribution, block_bytes=budget,
                                                 backend=opt.backend, updater=opt.updater)
    losses = [float(opt.step(lambda: model(input_ids=ids, labels=ids).loss)) for _ in range(steps)]
    return opt, losses


def _same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32)), name


@pytest.mark.parametrize("budget", [0, None])
@pytest.mark.parametrize("build", [_roberta, _tiny_llama])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_fused_steps_give_the_bits_of_steps_applied_at_once(build, budget, distribution):
    """Every loss (the perturbed forwards see the updated weights) and every weight equal, with tied and nested
    parameters, embeddings perturbed by rows, blocks of every leaf or the default, and weight decay (decayed
    tensors are updated by torch ops in the perturbation's pass, the rest by the C kernel)."""
    base = build()
    ids = _ids(base)
    for decay in (0.0, 0.1):
        plain, fused = copy.deepcopy(base), copy.deepcopy(base)
        _, want = _steps(plain, ids, False, budget=budget, distribution=distribution, weight_decay=decay)
        opt, got = _steps(fused, ids, True, budget=budget, distribution=distribution, weight_decay=decay)
        assert opt.updater.pending is not None
        opt.close()  # applies the last update
        assert got == want, decay
        assert opt.step_count == 4
        _same_weights(fused, plain)


def test_the_whole_update_rides_on_the_perturbation_pass(monkeypatch):
    """Tiny Llama (tied embeddings: the input rows come from the pending update, the lm_head block updates the table):
    after the first step no update pass of its own runs; the pending one is consumed by the next perturbation."""
    model = _tiny_llama()
    ids = _ids(model)
    applied = []
    real = update.update_pass
    monkeypatch.setattr(update, "update_pass", lambda backend, spans, *a: (applied.append(len(spans)),
                                                                           real(backend, spans, *a)))
    opt, _ = _steps(model, ids, True, steps=3)
    assert opt.updater.pending is not None
    assert applied == []  # no update pass of its own
    opt.flush()
    assert opt.updater.pending is None and applied[-1] == len(list(opt.layout))


@pytest.mark.parametrize("read", ["forward", "state_dict", "optimizer_state_dict", "load_state_dict", "close"])
def test_a_pending_update_is_applied_before_the_weights_are_read(read):
    base = _tiny_llama()
    ids = _ids(base)
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    _steps(plain, ids, False, steps=2)
    opt, _ = _steps(fused, ids, True, steps=2)
    assert opt.updater.pending is not None
    if read == "forward":
        with torch.no_grad():
            assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    elif read == "state_dict":
        got, want = fused.state_dict(), plain.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    elif read == "optimizer_state_dict":
        opt.state_dict()
    elif read == "load_state_dict":
        loaded = copy.deepcopy(base).state_dict()
        fused.load_state_dict(loaded)  # the update is applied first, then overwritten: nothing waits to be re-applied
        assert opt.updater.pending is None
        _same_weights(fused, base)
        return
    else:
        opt.close()
    assert opt.updater.pending is None
    _same_weights(fused, plain)


def test_a_perturbation_of_another_distribution_applies_the_update_first():
    """The pending update is fused only into a pass of its own distribution; a perturbation of another one (the
    bench switches distributions on one optimizer) applies it first, rows of the embedding included."""
    base = _tiny_llama()
    ids = _ids(base)
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    _steps(plain, ids, False, steps=2)
    opt, _ = _steps(fused, ids, True, steps=2)
    reference = PerturbedForward(plain, ParamLayout(plain), "gaussian")
    hooks = opt.perturbed_forward
    hooks.distribution = "gaussian"
    assert opt.updater.pending is not None
    with torch.no_grad():
        with hooks.perturb(7, 1e-2):
            got = fused(input_ids=ids).logits
        with reference.perturb(7, 1e-2):
            want = plain(input_ids=ids).logits
    assert torch.equal(got, want)
    assert opt.updater.pending is None
    _same_weights(fused, plain)


def test_digests_copies_and_hook_counts_around_a_pending_update():
    """weights_digest applies the pending update (through the model's state_dict pre-hook); copying or pickling a
    model whose update is pending is refused in one line (the copy would miss it for good); after remove() the
    hook count is 0."""
    import io

    from lightning_zo.core.layout import weights_digest

    base = _tiny_llama()
    ids = _ids(base)
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    _steps(plain, ids, False, steps=2)
    opt, _ = _steps(fused, ids, True, steps=2)
    for copy_it in (copy.deepcopy, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(RuntimeError, match="still pending .* flush"):
            copy_it(fused)
    assert weights_digest(fused) == weights_digest(plain)
    assert opt.updater.pending is None
    copy.deepcopy(fused)  # nothing pending: copies as before
    opt.close()
    assert opt.perturbed_forward.hooks == 0


def test_a_submodule_called_directly_sees_the_update():
    """A module with no hook of its own (one MLP inside a block) called between steps: a global pre-hook, present
    only while the update is pending, applies it first; an unrelated module does not."""
    from torch.nn.modules import module as torch_module

    base = _tiny_llama()
    ids = _ids(base)
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    _steps(plain, ids, False, steps=2)
    opt, _ = _steps(fused, ids, True, steps=2)
    hooks_before = len(torch_module._global_forward_pre_hooks)
    assert hooks_before >= 1 and opt.updater.pending is not None
    torch.nn.Linear(2, 2)(torch.ones(2))  # not the model's: the update keeps waiting
    assert opt.updater.pending is not None
    x = torch.randn(3, plain.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(fused.model.layers[0].mlp(x), plain.model.layers[0].mlp(x))
    assert opt.updater.pending is None
    assert len(torch_module._global_forward_pre_hooks) == hooks_before - 1
    _same_weights(fused, plain)

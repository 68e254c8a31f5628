"""Coverage (core/coverage.py, issue 41): every trainable parameter is read perturbed, however a user's module reaches
it; a parameter read outside its own module's forward is held perturbed for the whole forward, and one the perturbed
forward cannot reach is refused in one line that names it."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_zo import ZOOptimizer
from lightning_zo.core.coverage import check_coverage
from lightning_zo.core.perturbation import PerturbedForward
from lightning_zo.core.errors import UserError
from lightning_zo.core.layout import ParamLayout, weights_digest
from lightning_zo.core.noise import scaled_noise


class ParentReadsChildren(nn.Module):
    """The parent's forward uses one child's weight and another's bias; neither child is called."""

    def __init__(self):
        super().__init__()
        self.first, self.inner = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(x, self.inner.weight, self.first.bias)


class HandTiedOutput(nn.Module):
    """A hand-written tied output layer beside the embedding's lookup (which the perturbed forward perturbs by rows)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mid = nn.Embedding(50, 16), nn.Linear(16, 16)

    def forward(self, ids):
        return self.mid(self.embed(ids)) @ self.embed.weight.T


class SharedWithChild(nn.Module):
    """One Parameter registered on a module and on its child."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.child = nn.Linear(8, 8)
        self.child.weight = self.w

    def forward(self, x):
        return self.child(x) @ self.w


class ChildUsedFunctionally(nn.Module):
    """A child's weight used functionally by its parent, the child also called."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(self.b(self.a(x)), self.a.weight)


def _input(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 5), generator=g) if isinstance(model, HandTiedOutput) else torch.randn(4, 8,
                                                                                                          generator=g)


def _materialized(model, seed, coeff, distribution):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for s in ParamLayout(reference):
            z = scaled_noise(seed, s.offset, s.param.numel(), coeff, distribution)
            s.param.copy_(s.param + z.view_as(s.param))
    return reference


HELD = {ParentReadsChildren: ["inner.weight", "first.bias"], HandTiedOutput: ["embed.weight"],
        SharedWithChild: [], ChildUsedFunctionally: ["a.weight"]}


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("build", list(HELD))
def test_forward_under_the_perturbation_equals_written_weights(build, distribution):
    torch.manual_seed(0)
    model = build()
    x = _input(model)
    before = weights_digest(model)
    hooks = PerturbedForward(model, ParamLayout(model), distribution)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = model(x)
        for coeff in (1e-2, -1e-2, 1e-2):  # the first call checks; later ones use what it found
            expected = _materialized(model, 77, coeff, distribution)(x)
            got = hooks.evaluate(77, coeff, lambda: model(x))
            assert torch.equal(got, expected), (coeff, (got - expected).abs().max().item())
            assert not torch.equal(got, plain)
    assert list(hooks.coverage.held) == HELD[build]
    # One warning, at the check, naming what is held and what it costs; none where nothing is.
    assert [str(w.message) for w in caught if "held perturbed" in str(w.message)] == ([f"lightning_zo: {hooks.coverage}"] if
                                                                                      HELD[build] else [])
    hooks.remove()
    assert weights_digest(model) == before  # restored exactly


def test_without_the_check_these_reads_would_miss_the_perturbation():
    """What the check guards against: the plain per-block hooks leave a child's weights unperturbed when only the
    parent's forward reads them (both losses equal: a zero estimate at every step)."""
    model = ParentReadsChildren()
    x = _input(model)
    hooks = PerturbedForward(model, ParamLayout(model), "rademacher")
    with torch.no_grad(), hooks.perturb(3, 1e-2):
        assert torch.equal(model(x), _materialized(model, 0, 0.0, "rademacher")(x))
    hooks.remove()


class KeepsAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.rows = self.lin.weight.data[:4]  # made before training: the perturbed copies never reach it

    def forward(self, x):
        return self.lin(x)[:, :4] + x[:, :8] @ self.rows.T


def test_a_weight_read_through_a_kept_view_is_refused_by_name():
    model = KeepsAView()
    with pytest.raises(UserError, match=r"cannot perturb lin\.weight: the forward reads its storage through"):
        check_coverage(model, lambda: model(torch.randn(2, 8)))
    opt = ZOOptimizer(model, lr=1e-3)
    with pytest.raises(UserError, match=r"lin\.weight"):
        opt.step(loss_fn=lambda j: model(torch.randn(2, 8)).sum())


def test_check_coverage_finds_nothing_to_hold_in_transformers_models():
    """No false alarm on Hugging Face models (tied input/output embeddings, RoBERTa's shared lm_head bias)."""
    from test_perturbed_forward import _ids, _roberta, _tiny_llama

    for build in (_roberta, _tiny_llama):
        model = build()
        ids = _ids(model)
        before = weights_digest(model)
        coverage = check_coverage(model, lambda: model(input_ids=ids).logits)
        assert coverage.held == {}, (build.__name__, coverage)
        assert weights_digest(model) == before
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # its hooks removed


@pytest.mark.parametrize("build", [ParentReadsChildren, HandTiedOutput])
def test_models_with_reads_outside_their_blocks_train(build):
    """Before the check these two never trained (equal losses) or trained on a biased estimate; now the loss falls,
    and the deferred update (fuse_update) gives the same bits."""
    digests = []
    for fuse in (False, True):
        torch.manual_seed(0)
        model = build()
        g = torch.Generator().manual_seed(5)
        if build is ParentReadsChildren:
            x, target = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
            loss = lambda: F.mse_loss(model(x), target)  # noqa: E731
        else:
            ids = torch.randint(0, 50, (16, 6), generator=g)
            loss = lambda: F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())  # noqa: E731
        lr = 3e-2 if build is ParentReadsChildren else 3e-3
        opt = ZOOptimizer(model, lr=lr, eps=1e-3, seed=1, fuse_update=fuse)
        with torch.no_grad():
            first = loss().item()
        with pytest.warns(UserWarning, match="held perturbed"):
            opt.step(loss_fn=lambda j: loss())
        for _ in range(299):
            opt.step(loss_fn=lambda j: loss())
        opt.flush()
        with torch.no_grad():
            last = loss().item()
        assert last < 0.8 * first, (build.__name__, fuse, first, last)
        digests.append(weights_digest(model))
    assert digests[0] == digests[1]

"""Sparse perturbation masks (core/masks.py, issue 44): only each tensor's smallest |theta| are perturbed and updated,
the rest stay exactly as they are; the same bits fused or not, in replay, after a resume; on two ranks in
test_population.py's two-rank run (masks with one-sided z-scores, the setting of docs/RESULTS.md)."""

import copy

import pytest
import torch

from lightning_zo import ZOOptimizer
from lightning_zo.core.layout import ParamLayout, weights_digest
from lightning_zo.core.noise import scaled_noise
from lightning_zo.replay import optimizer_for, replay
from test_perturbed_forward import _ids, _tiny_llama


def _steps(model, ids, steps=5, **kwargs):
    opt = ZOOptimizer(model, lr=1e-1, eps=1e-2, k=2, mask_keep=0.25, mask_every=2, **kwargs)
    for _ in range(steps):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    opt.flush()
    return opt


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_the_forward_sees_theta_plus_eps_z_on_the_mask_only(distribution):
    model = _tiny_llama()
    ids = _ids(model)
    opt = ZOOptimizer(model, eps=1e-2, distribution=distribution, mask_keep=0.3)
    opt.masks.refresh(0)
    written = copy.deepcopy(model)
    with torch.no_grad():
        for span, target in zip(opt.layout, ParamLayout(written)):
            mask = opt.masks.of(span.param)
            share = mask.float().mean()
            distinct = span.param.abs().unique().numel() == span.param.numel()  # (norm weights all 1.0: all kept)
            assert share >= 0.3 - 1e-6 and (share < 0.3 + 1.0 / span.param.numel() or not distinct), span.name
            z = scaled_noise(7, span.offset, span.param.numel(), 1e-2, distribution).view_as(span.param)
            target.param.copy_(torch.where(mask, span.param.float() + z, span.param.float()))
        with opt.perturbed_forward.perturb(7, 1e-2):
            got = model(input_ids=ids).logits
        assert torch.equal(got, written(input_ids=ids).logits)


@pytest.mark.parametrize("fuse", [False, True])
def test_weights_outside_the_mask_never_move_and_replay_is_exact(fuse):
    base = _tiny_llama()
    ids = _ids(base)
    model = copy.deepcopy(base)
    records, opt = [], ZOOptimizer(model, lr=1e-1, eps=1e-2, k=2, mask_keep=0.25, mask_every=2, fuse_update=fuse,
                                   weight_decay=0.1)
    first = None
    for t in range(5):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        records.append(opt.last_record)
        if t == 0:
            opt.flush()
            first = {id(s.param): opt.masks.of(s.param).clone() for s in opt.layout}
            for s, b in zip(opt.layout, base.parameters()):  # step 0 moved only what step 0's masks let in
                assert torch.equal(s.param[~first[id(s.param)]], b.detach()[~first[id(s.param)]]), s.name
                assert not torch.equal(s.param, b), s.name
    opt.flush()
    assert opt.masks.step == 4 and any(not torch.equal(first[id(s.param)], opt.masks.of(s.param)) for s in opt.layout)
    replayed = copy.deepcopy(base)
    again = optimizer_for(replayed, {**opt.describe(), "format_version": 5})
    for record in records:
        again.apply(record)
    again.flush()
    assert weights_digest(replayed) == weights_digest(model)
    dense = copy.deepcopy(base)
    plain = ZOOptimizer(dense, lr=1e-1, eps=1e-2, k=2, fuse_update=fuse, weight_decay=0.1)
    for record in records:
        plain.apply(record)
    assert weights_digest(dense) != weights_digest(model)  # the masks changed the update


def test_a_checkpointed_optimizer_keeps_its_masks():
    base = _tiny_llama()
    ids = _ids(base)
    opt = _steps(copy.deepcopy(base), ids, steps=3)
    state = opt.state_dict()
    other = ZOOptimizer(copy.deepcopy(base), lr=1e-1, eps=1e-2, k=2, mask_keep=0.25, mask_every=2)
    other.load_state_dict(state)
    assert other.masks.step == 2 and not other.masks.due(3)
    assert all(torch.equal(opt.masks.of(a.param), other.masks.of(b.param)) for a, b in zip(opt.layout, other.layout))


@pytest.mark.parametrize("kwargs,message", [({"mask_keep": 0.0}, "mask_keep"), ({"mask_keep": 1.5}, "mask_keep"),
                                            ({"mask_every": 0}, "mask_every")])
def test_bad_mask_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOOptimizer(torch.nn.Linear(2, 2), **kwargs)

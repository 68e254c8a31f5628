"""The SPSA step on the tiny model: exact restore, equality with a direct re-computation, NaN handling."""

import copy
import warnings

import pytest
import torch

from lightning_zo.core.codecs import LinearCodec, NoneCodec
from lightning_zo.recipe.data import LeftPadCollator, encode, label_word_ids
from lightning_zo.recipe.classifier import ZOClassifier
from lightning_zo.core.layout import ParamLayout
from lightning_zo.core.noise import scaled_noise
from lightning_zo.core.optimizer import ZOOptimizer
from lightning_zo.core.layout import weights_digest
from lightning_zo.recipe.tasks import PromptTask


def _setup(tiny_lm, codec=None, **opt):
    task = PromptTask("sentiment")
    train, _, _ = task.load()
    items = encode(train[:8], task, tiny_lm.tokenizer, "causal", 64)
    batch = LeftPadCollator(tiny_lm.tokenizer.pad_token_id)(items)
    module = ZOClassifier(tiny_lm.model, label_word_ids(tiny_lm.tokenizer, task.spec.label_words, "causal"))
    optimizer = ZOOptimizer(tiny_lm.model, codec=codec or NoneCodec(), seed=3, **opt)
    return module, optimizer, batch


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zero_lr_leaves_weights_bit_identical(tiny_lm):
    module, opt, batch = _setup(tiny_lm, lr=0.0, eps=1e-2)
    before = _snapshot(module.model)
    for _ in range(3):
        opt.step(loss_fn=lambda j: module.loss(batch))
    assert opt.last_record.local_grads[0] != 0  # the perturbations really changed the loss
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_perturbed_forward_equals_materialized_weights(tiny_lm):
    """The per-module hooks must perturb every parameter, tied embeddings included."""
    module, opt, batch = _setup(tiny_lm, eps=1e-2)
    reference = copy.deepcopy(module.model)
    layout = ParamLayout(reference)
    with torch.no_grad():
        for s in layout:
            s.param.add_(scaled_noise(77, s.offset, s.param.numel(), 1e-2, "rademacher").view_as(s.param))
        expected = ZOClassifier(reference, module.label_ids.tolist()).class_logits(batch)
        with opt.perturbed_forward.perturb(77, 1e-2):
            got = module.class_logits(batch)
        plain = module.class_logits(batch)
    assert torch.equal(got, expected)
    assert not torch.equal(plain, expected)


def test_one_step_equals_direct_recomputation(tiny_lm):
    lr, eps = 1e-2, 1e-3
    module, opt, batch = _setup(tiny_lm, lr=lr, eps=eps)
    theta = _snapshot(module.model)
    layout = ParamLayout(module.model)
    seed = opt.slot_seed(0, 0)

    def loss_at(sign):
        model = copy.deepcopy(module.model)
        with torch.no_grad():
            for s in ParamLayout(model):
                s.param.add_(scaled_noise(seed, s.offset, s.param.numel(), sign * eps, "rademacher").view_as(s.param))
            return float(ZOClassifier(model, module.label_ids.tolist()).loss(batch))

    g = (loss_at(+1) - loss_at(-1)) / (2 * eps)
    opt.step(loss_fn=lambda j: module.loss(batch))
    assert opt.last_record.local_grads[0] == pytest.approx(g, rel=1e-6)
    for s in layout:
        z = scaled_noise(seed, s.offset, s.param.numel(), 1.0, "rademacher").view_as(s.param)
        expected = theta[s.name] - torch.tensor(lr * g, dtype=torch.float32) * z
        assert torch.allclose(s.param, expected, rtol=0, atol=1e-7), s.name
    assert not torch.equal(module.model.model.embed_tokens.weight, theta["model.embed_tokens.weight"])


def test_non_finite_loss_gives_no_update_and_a_warning(tiny_lm):
    module, opt, batch = _setup(tiny_lm, codec=LinearCodec(), lr=1e-2)
    before = weights_digest(module.model)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(loss_fn=lambda j: torch.tensor(float("nan")))
    assert opt.last_record.codes == [-128]
    assert weights_digest(module.model) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss_fn=lambda j: module.loss(batch))
    assert weights_digest(module.model) != before


def test_weight_decay_skips_biases_and_norms(tiny_lm):
    module, opt, batch = _setup(tiny_lm, lr=0.5, weight_decay=0.1)
    before = _snapshot(module.model)
    opt.step(loss_fn=lambda j: torch.tensor(1.0))  # g = 0: only decay acts
    for n, p in module.model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n] * torch.tensor(1 - 0.5 * 0.1, dtype=torch.float32)), n


def test_k_slots_use_distinct_micro_batches_and_seeds(tiny_lm):
    module, opt, batch = _setup(tiny_lm, k=2)
    seen = []
    chunks = ZOClassifier.micro_batches(batch, 2)
    opt.step(loss_fn=lambda j: seen.append(j) or module.loss(chunks[j]))
    assert seen == [0, 0, 1, 1]
    assert len(opt.last_record.codes) == 2 and torch.equal(chunks[1]["labels"], batch["labels"][1::2])


@pytest.mark.parametrize("kwargs,message", [({"eps": 0}, "eps"), ({"eps": -1e-3}, "eps"), ({"k": 0}, "k"),
                                            ({"distribution": "uniform"}, "distribution"), ({"norm": "l2"}, "norm")])
def test_bad_hyperparameters(tiny_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOOptimizer(tiny_lm.model, **kwargs)

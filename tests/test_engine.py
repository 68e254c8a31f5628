"""The perturbed forward (engine.PerturbedForward): every trainable parameter perturbed exactly once per forward,
however modules share or nest it (DESIGN I5), and bit-identical to theta + eps*z written into the weights."""

import copy

import pytest
import torch

from lightning_zo.core.engine import PerturbedForward
from lightning_zo.core.layout import ParamLayout
from lightning_zo.core.noise import scaled_noise


def _roberta():
    """A tiny masked LM with RoBERTa's sharing: tied input/output embeddings, and lm_head.bias that is also
    lm_head.decoder.bias (one Parameter owned by two nested modules)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RobertaForMaskedLM(config).eval()
        with torch.no_grad():  # the default init zeroes the biases: make every parameter matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    assert model.lm_head.bias is model.lm_head.decoder.bias
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    return model


def _materialized(model, seed, coeff, distribution):
    """A copy of `model` with theta + coeff * z(seed) written into its weights (each parameter once)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for s in ParamLayout(reference):
            z = scaled_noise(seed, s.offset, s.param.numel(), coeff, distribution)
            s.param.copy_(s.param + z.view_as(s.param))  # one IEEE add, as the hooks do
    return reference


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_nested_and_tied_parameters_are_perturbed_once(distribution):
    model = _roberta()
    ids = torch.randint(5, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    layout = ParamLayout(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = PerturbedForward(model, layout, distribution)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        for coeff in (1e-2, -1e-2):
            expected = _materialized(model, 1234, coeff, distribution)(input_ids=ids).logits
            with hooks.perturb(1234, coeff):
                got = model(input_ids=ids).logits
            assert torch.equal(got, expected), (distribution, coeff, (got - expected).abs().max().item())
            assert not torch.equal(got, plain)
    hooks.remove()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # exact restore

"""The perturbed forward (core/perturbation.py): every trainable parameter perturbed exactly once per forward,
however modules share or nest it (DESIGN I5), and bit-identical to theta + eps*z written into the weights."""

import copy
import io

import pytest
import torch

from lightning_zo.core import cpu_kernel
from lightning_zo.core.perturbation import PerturbedForward
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


def _tiny_llama():
    from lightning_zo.recipe.models import tiny

    return tiny(num_layers=3).model.eval()


def _ids(model):
    return torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("budget", [0, None, 1 << 40])  # every leaf alone, the default blocks, one block
@pytest.mark.parametrize("build", [_roberta, _tiny_llama])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_blocks_of_any_size_equal_materialized_weights(build, budget, distribution):
    model = build()
    ids = _ids(model)
    hooks = PerturbedForward(model, ParamLayout(model), distribution, block_bytes=budget)
    with torch.no_grad():
        expected = _materialized(model, 99, -3e-2, distribution)(input_ids=ids).logits
        with hooks.perturb(99, -3e-2):
            got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    # DESIGN I3: at most one block's perturbed copies (plus wrapped modules' own parameters) alive at a time.
    wrapped = sum(p.numel() * p.element_size() for w in hooks.wrappers for s in w.spans for p in [s.param])
    assert hooks.peak_scratch_bytes <= max(b.nbytes for b in hooks.blocks) + wrapped
    assert hooks.scratch_bytes == 0
    hooks.remove()


def test_hooks_and_launches_per_perturbed_forward():
    """Tiny Llama, 3 layers, tied embeddings. Per-module hooks (the old engine) put 2 hooks on each of the 30
    modules that own parameters and materialised 30 times per forward. Now the input embedding is perturbed at
    its looked-up rows only (CPU), and blocks under the default budget (the embedding's size, the largest set one
    module owns) are [layers 0-1], [layer 2 + final norm], [lm_head] (which materialises the tied table)."""
    model = _tiny_llama()
    layout = ParamLayout(model)
    owners = [m for m in model.modules() if any(layout.span_of(p) for p in m.parameters(recurse=False))]
    assert len(owners) == 30

    leaf = PerturbedForward(model, layout, "rademacher", block_bytes=0)
    assert (len(leaf.blocks), len(leaf.rows), leaf.hooks) == (29, 1, 59)
    leaf.remove()

    hooks = PerturbedForward(model, layout, "rademacher")
    assert [[type(m).__name__ for m in b.members] for b in hooks.blocks] == [
        ["LlamaDecoderLayer"] * 2, ["LlamaDecoderLayer", "LlamaRMSNorm"], ["Linear"]]
    assert hooks.rows == [model.model.embed_tokens]
    assert hooks.block_bytes == model.model.embed_tokens.weight.numel() * 4
    assert hooks.hooks == 2 * 5 + 1 and not hooks.wrappers
    ids = _ids(model)
    with torch.no_grad():
        model(input_ids=ids)
        assert hooks.materialized == 0  # inactive outside perturb(): no work
        for coeff in (1e-2, -1e-2):
            with hooks.perturb(5, coeff):
                model(input_ids=ids)
    assert hooks.materialized == 2 * 4  # 3 blocks + the embedding's rows
    # CPU: one threaded C-kernel pass per block and one for the embedding's looked-up rows, each one call (on
    # torch's OpenMP threads) or one per thread's share (Python threads); never one per tensor or row.
    assert hooks.backend.launches == 0 and hooks.backend.other_calls == 0
    per_pass = 1 if cpu_kernel.uses_openmp() else hooks.backend.threads
    assert 2 * 4 <= hooks.backend.cpu_calls <= 2 * 4 * per_pass
    torch.save(model, io.BytesIO())  # a model with its hooks (and the backend's threads) still pickles
    hooks.remove()


def test_budget_bounds_every_block():
    model = _tiny_llama()
    layout = ParamLayout(model)
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    hooks = PerturbedForward(model, layout, "rademacher", block_bytes=layer)
    assert all(b.nbytes <= layer for b in hooks.blocks[1:-1])  # the embedding is one module: it cannot be split
    assert [len(b.members) for b in hooks.blocks] == [1] * 5  # 3 layers, norm, lm_head (+ the embedding's rows)
    covered = {id(s.param) for b in hooks.blocks for s in b.spans} | {
        id(s.param) for w in hooks.wrappers for s in w.spans} | {id(e.weight) for e in hooks.rows}
    assert covered == {id(s.param) for s in layout}
    hooks.remove()


def test_embedding_rows_fall_back_to_the_whole_table_off_the_kernel_path():
    """Hooks planned on fp32 weights, then the model cast to bf16: the row path no longer applies and the
    embedding's output comes from the whole perturbed table (bf16 rounded once), still equal to the reference."""
    model = _tiny_llama()
    hooks = PerturbedForward(model, ParamLayout(model), "rademacher")
    assert hooks.rows
    model.to(torch.bfloat16)
    ids = _ids(model)
    with torch.no_grad():
        expected = _materialized(model, 8, 1e-2, "rademacher")(input_ids=ids).logits
        with hooks.perturb(8, 1e-2):
            got = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    hooks.remove()


def test_pool_keeps_about_one_largest_buffer():
    from lightning_zo.core.backend import BufferPool

    pool = BufferPool()
    for n in (100, 50, 300, 200, 300):  # blocks of several sizes, one at a time
        pool.give(pool.take(n, torch.device("cpu")))
    assert [b.numel() for b in pool._free] == [300]


class _WrappedTie(torch.nn.Module):
    """A module too large to be a block (a wrapper: it holds its own weight for its whole forward) whose child is tied
    to that weight: when the child's block runs, the wrapper already holds the tied weight's copy."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16) * 0.2)
        self.child = torch.nn.Linear(16, 16)
        self.child.weight = self.weight
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.child(x) @ self.weight)


class _Reorderable(torch.nn.Module):
    """Layers run forwards, then backwards once `reverse` is set: the blocks' order of the last forward is wrong."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.tied = _WrappedTie()
        self.reverse = False

    def forward(self, x):
        x = self.first(x)
        for layer in (reversed(self.layers) if self.reverse else self.layers):
            x = torch.tanh(layer(x))
        return self.tied(x)


def _perturbed_outputs(model, hooks, x, seeds, coeff=2e-2, flip=None):
    outputs = []
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            if flip is not None:
                model.reverse = i in flip
            with hooks.perturb(seed, coeff):
                outputs.append(model(x))
    return outputs


def test_blocks_in_another_order_and_a_weight_its_wrapper_holds_change_nothing():
    """The blocks' order changes between forwards, and a child's block covers a weight tied to the one its wrapper
    holds for its whole forward: outputs equal the materialised weights all along, and no scratch is left."""
    torch.manual_seed(7)
    model = _Reorderable()
    x = torch.randn(4, 16)
    hooks = PerturbedForward(model, ParamLayout(model), "rademacher", block_bytes=0)
    assert hooks.wrappers and hooks.wrappers[0].module is model.tied
    seeds = [11, 12, 13, 14]
    got = _perturbed_outputs(model, hooks, x, seeds, flip={2})
    for i, seed in enumerate(seeds):
        model.reverse = i == 2
        with torch.no_grad():
            assert torch.equal(got[i], _materialized(model, seed, 2e-2, "rademacher")(x)), i
        assert hooks.scratch_bytes == 0
    hooks.remove()


def test_perturbed_copies_start_aligned_like_fresh_tensors():
    """A block's copies share one scratch buffer, each starting a multiple of 256 bytes in: the forward's kernels see
    pointers aligned as the weights' (64 bytes on the CPU, 256 and more on CUDA), whatever the sizes before them
    (a 5 x 3 weight would leave its bias 60 bytes in)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 7), torch.nn.Linear(7, 2))
    with torch.no_grad():
        expected = _materialized(model, 5, 1e-2, "rademacher")(torch.ones(4, 5))
    hooks = PerturbedForward(model, ParamLayout(model), "rademacher", block_bytes=1 << 20)  # one block
    seen = []
    record = [m.register_forward_pre_hook(lambda m, a: seen.extend(p.data_ptr() for p in m.parameters(False)))
              for m in model]
    with torch.no_grad(), hooks.perturb(5, 1e-2):
        got = model(torch.ones(4, 5))
    for h in record:
        h.remove()
    hooks.remove()
    assert len(hooks.blocks) == 1 and torch.equal(got, expected)
    assert len(seen) == 6 and all(ptr % 64 == 0 for ptr in seen), [ptr % 64 for ptr in seen]

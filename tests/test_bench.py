"""The benchmark runs end to end on the tiny model (its figures are per-call overheads there; only the keys, counts
and the profile's ranges are checked, never times)."""

import json

import pytest

from lightning_zo import bench


def test_bench_prints_every_figure_and_a_profile_of_one_step(capsys):
    bench.main(["--model", "tiny", "--device", "cpu", "--repeat", "1", "--machines", "1,5", "--gaussian-machines", "1",
                "--profile"])  # the counts below are the CPU's (on CUDA the embedding is a block, launched by Triton)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("{"))
    figures = json.loads(line)
    for distribution, ns in (("rademacher", (1, 5)), ("gaussian", (1,))):
        for n in ns:
            assert figures[f"update_ms_{distribution}_n{n}"] > 0
            assert figures[f"update_over_floor_{distribution}_n{n}"] > 0
    assert figures["step_over_2fwd"] > 0 and figures["gaussian_step_over_2fwd"] > 0
    assert figures["mezo_update_ms_n5"] > 0
    # The tiny Llama: 2 blocks and the embedding's rows, each one pass of the C kernel per perturbed forward.
    assert (figures["blocks"], figures["materialized_per_forward"]) == (2, 3)
    assert figures["launches_per_forward"] == figures["other_calls_per_forward"] == 0
    assert figures["fused_step_over_2fwd"] > 0 and "extra_mem_over_largest_block" in figures
    assert figures["payload_bytes_per_step"] == 1
    assert "# torch.profiler, one step of tiny" in out
    assert "lightning_zo.update" in out and "lightning_zo.perturb_block" in out  # our passes, as named ranges


@pytest.mark.parametrize("name", ["roberta-large", "opt-1.3b"])
def test_hub_architectures_keep_their_buffers_and_tied_embeddings(name, monkeypatch):
    """The GPU models are allocated without Hugging Face's init (to_empty): their buffers must hold what a normal
    build holds (RoBERTa's token type ids index a table of one row) and the embeddings stay tied (else the bench
    perturbs and updates a second vocabulary matrix); a forward runs. Built as the bench builds them, shrunk."""
    import torch

    kind, config = bench.ARCHITECTURES[name]
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=301)
    small.update({"intermediate_size": 128} if kind == "roberta" else {"ffn_dim": 128, "word_embed_proj_dim": 64})
    monkeypatch.setitem(bench.ARCHITECTURES, name, (kind, {**config, **small}))
    model, vocab = bench.build(name, torch.bfloat16)
    assert vocab == 301 and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if kind == "roberta":
        embeddings = model.roberta.embeddings
        assert not embeddings.token_type_ids.any()
        assert torch.equal(embeddings.position_ids[0], torch.arange(embeddings.position_ids.shape[1]))
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, vocab, (1, 8))).logits
    assert logits.shape == (1, 8, vocab) and torch.isfinite(logits).all()

"""Multiple choice (COPA): candidate scoring, micro-batches, 2 ranks and replay; the accuracy objective."""

import pytest
import torch
import torch.nn.functional as F

from helpers import summaries, train
from lightning_zo.core import trajectory
from lightning_zo.core.errors import UserError
from lightning_zo.recipe.classifier import ZOClassifier
from lightning_zo.recipe.data import LeftPadCollator, ShardStream, encode
from lightning_zo.recipe.tasks import TASKS, PromptTask, read_tsv
from lightning_zo.replay import replay


def _copa(task_data, **kw):
    return PromptTask("copa", data_dir=str(task_data / "copa"), train_per_class=None, val_per_class=50, **kw)


def _batch(tiny_lm, task, examples, max_length=64):
    items = encode(examples, task, tiny_lm.tokenizer, "causal", max_length)
    return items, LeftPadCollator(tiny_lm.tokenizer.pad_token_id)(items)


def test_copa_prompt_and_candidates(task_data):
    spec = TASKS["copa"]
    rows = read_tsv(task_data / "copa" / "train.tsv", spec)
    assert len(rows) == 400 and [sum(e.label == c for e in rows) for c in (0, 1)] == [195, 205]
    first = rows[0]  # tests/task_files.py's first COPA row
    assert spec.prompt(first.fields) == "My shadow fell over the grass because"
    assert spec.candidates(first.fields) == [" the sun was rising.", " the grass was cut."]
    effect = next(e for e in rows if e.fields["question"] == "effect")
    assert spec.prompt(effect.fields).endswith(" so") and not spec.prompt(effect.fields).endswith(". so")
    mine = next(e for e in rows if e.fields["choice1"].startswith("I "))
    assert spec.candidates(mine.fields)[0].startswith(" I ")  # "I" keeps its capital


def test_copa_validation_is_carved_from_train_deterministically(task_data):
    train_a, val_a, _ = _copa(task_data).load()
    train_b, val_b, _ = _copa(task_data).load()
    assert [e.fields for e in train_a] == [e.fields for e in train_b] and len(val_a) == 100 and len(train_a) == 300
    assert [sum(e.label == c for e in val_a) for c in (0, 1)] == [50, 50]
    assert not {e.fields["premise"] + e.fields["choice1"] for e in train_a} & {
        e.fields["premise"] + e.fields["choice1"] for e in val_a}
    assert [e.fields for e in val_a] == [e.fields for e in val_b]


def _direct_score(model, ids: list[int], n_scored: int) -> float:
    """Mean log-probability of the last n_scored tokens of one unpadded sequence, from a full forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(logp[-n_scored:].mean())


def test_length_normalised_score_equals_direct_per_candidate_computation(tiny_lm, task_data):
    task = _copa(task_data)
    examples = task.load()[0][:6]
    items, batch = _batch(tiny_lm, task, examples)
    module = ZOClassifier.for_task(tiny_lm, task)
    calls = []
    handle = tiny_lm.model.register_forward_hook(lambda m, a, out: calls.append(1))
    with torch.no_grad():
        scores = module.class_logits(batch)
    handle.remove()
    assert calls == [1]  # every candidate of every example of the batch: one forward
    assert scores.shape == (6, 2) and batch["input_ids"].shape[0] == 12
    lengths = {len(ids) for it in items for ids in it["choices"]}
    assert len(lengths) > 1  # rows of different lengths: left padding is exercised
    for e, item in enumerate(items):
        prompt = tiny_lm.tokenizer(task.spec.prompt(examples[e].fields))["input_ids"]
        for i, (ids, n) in enumerate(zip(item["choices"], item["scored"])):
            assert ids[:len(prompt)] == prompt and n == len(ids) - len(prompt)  # the prompt is not scored
            assert float(scores[e, i]) == pytest.approx(_direct_score(tiny_lm.model, ids, n), abs=2e-5)
    assert not torch.equal(scores[:, 0], scores[:, 1])
    expected_loss = F.cross_entropy(scores, batch["labels"])
    with torch.no_grad():
        assert float(module.loss(batch)) == pytest.approx(float(expected_loss), abs=1e-6)


@pytest.mark.parametrize("k", [2, 4])
def test_candidates_of_an_example_never_split_across_micro_batches(tiny_lm, task_data, k):
    task = _copa(task_data)
    examples = task.load()[0][:8]
    items, batch = _batch(tiny_lm, task, examples)
    chunks = ZOClassifier.micro_batches(batch, k)
    module = ZOClassifier.for_task(tiny_lm, task)
    with torch.no_grad():
        whole = module.class_logits(batch)
    collate = LeftPadCollator(tiny_lm.tokenizer.pad_token_id)
    for j, chunk in enumerate(chunks):
        # exactly the batch rank j of k would collate from its examples j, j+k, ...: every candidate row included
        expected = collate(items[j::k])
        assert chunk.keys() == expected.keys()
        for key in expected:
            assert torch.equal(chunk[key], expected[key]), key
        assert len(chunk["input_ids"]) == 2 * len(chunk["labels"])
        with torch.no_grad():
            assert torch.allclose(module.class_logits(chunk), whole[j::k], atol=2e-5)
    with pytest.raises(ValueError, match="divisible"):
        ZOClassifier.micro_batches(batch, 3)


def test_rank_shards_hold_whole_examples(tiny_lm, task_data):
    """A rank's stream yields example indices: the collator turns each into all its candidate rows."""
    task = _copa(task_data)
    items = encode(task.load()[0], task, tiny_lm.tokenizer, "causal", 64)
    streams = [iter(ShardStream(len(items), r, 2, 4, seed=0)) for r in range(2)]
    for r, stream in enumerate(streams):
        batch = LeftPadCollator(0)([items[next(stream)] for _ in range(4)])
        assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (4,)


def test_multiple_choice_needs_a_causal_lm(tiny_lm, task_data):
    task = _copa(task_data)
    with pytest.raises(UserError, match="causal"):
        encode(task.load()[0][:2], task, tiny_lm.tokenizer, "masked", 64)


def test_too_short_max_length_is_refused(tiny_lm, task_data):
    task = _copa(task_data)
    with pytest.raises(UserError, match="max_length"):
        encode(task.load()[0][:20], task, tiny_lm.tokenizer, "causal", 3)


@pytest.mark.parametrize("name", ["sentiment", "copa"])
def test_accuracy_objective_is_minus_the_batch_accuracy(tiny_lm, task_data, name):
    task = _copa(task_data, objective="accuracy") if name == "copa" else PromptTask(name, objective="accuracy")
    examples = task.load()[0][:16]
    _, batch = _batch(tiny_lm, task, examples)
    module = ZOClassifier.for_task(tiny_lm, task)
    assert module.objective == "accuracy" and module.hparams["objective"] == "accuracy"
    with torch.no_grad():
        right = (module.class_logits(batch).argmax(-1) == batch["labels"]).float()
        loss = module.loss(batch)
    assert float(loss) == -float(right.mean()) and float(loss) <= 0
    assert 0 < float(right.sum()) < 16  # a mixed batch: the value is not a constant
    default = ZOClassifier.for_task(tiny_lm, PromptTask(name) if name != "copa" else _copa(task_data))
    assert default.objective == "cross_entropy" and "objective" not in default.hparams  # old headers unchanged
    with torch.no_grad():
        assert float(default.loss(batch)) > 0


def test_unknown_objective_is_refused():
    with pytest.raises(UserError, match="objective"):
        PromptTask("sentiment", objective="f1")


def _assert_exact(run_dir, world_size, steps):
    live = summaries(run_dir)
    assert len(live) == world_size and len({s["weights_sha256"] for s in live}) == 1
    log = trajectory.read(run_dir / "trajectory.zot")
    assert len(log.records) == steps
    assert any(c != 0 for r in log.records for c in r.codes)  # the runs did move the weights
    assert replay(run_dir, progress=False)[1]["weights_sha256"] == live[0]["weights_sha256"]
    return live, log


def test_copa_two_ranks_replay_equals_live(tmp_path, task_data):
    run = tmp_path / "copa2"
    train(run, "task=copa", f"task.data_dir={task_data}/copa", "trainer.strategy=zo_spawn", "trainer.devices=2",
          "trainer.max_steps=8", "data.batch_size=4", "optimizer.k=2", "optimizer.lr=1e-3")
    live, log = _assert_exact(run, 2, 8)
    assert all(r.world_size == 2 and r.k == 2 for r in log.records) and log.header["run"]["data.task"] == "'copa'"
    assert 0 <= live[0]["val_acc_final"] <= 1 and live[0]["val_acc_final"] == live[1]["val_acc_final"]


def test_copa_two_ranks_equal_one_process_simulating_two_machines(tmp_path, task_data):
    common = ["task=copa", f"task.data_dir={task_data}/copa", "trainer.max_steps=6", "optimizer.lr=1e-3"]
    train(tmp_path / "ddp", *common, "trainer.strategy=zo_spawn", "trainer.devices=2", "data.batch_size=4")
    train(tmp_path / "single", *common, "optimizer.k=2", "data.batch_size=8")
    (a, b), (one,) = summaries(tmp_path / "ddp"), summaries(tmp_path / "single")
    assert a["weights_sha256"] == b["weights_sha256"] == one["weights_sha256"]


def test_accuracy_objective_two_ranks_replay_equals_live(tmp_path):
    run = tmp_path / "acc2"
    train(run, "task.objective=accuracy", "trainer.strategy=zo_spawn", "trainer.devices=2", "trainer.max_steps=10",
          "data.batch_size=8", "optimizer.lr=1e-3", "optimizer.eps=1e-1")
    _, log = _assert_exact(run, 2, 10)
    assert log.header["run"]["module.objective"] == "'accuracy'"

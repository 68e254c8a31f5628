"""MeZO tasks from local TSV files, k-shot sampling, non-IID partitions, sweeps and the report."""

import json

import pytest

from helpers import REPO, python, train
from lightning_zo.recipe.data import dirichlet_partition, encode, label_word_ids
from lightning_zo.recipe.models import tiny_tokenizer
from lightning_zo.recipe.tasks import TASKS, PromptTask, k_shot_split, read_tsv
from task_files import CB_COUNTS

EXPECTED_PROMPT = {  # the first rows of tests/task_files.py
    "sst2": ("a film that hides its best moments It was", "terrible"),
    "sst5": ("a bright , funny and finally moving tale of a town and its river It was", "great"),
    "trec": ("How did the old river town get its name ? Answer type:", "Description"),
    "rte": ('No rain fell in the valley last week.\nDoes this mean that "Rain fell in the valley." is true? Yes or No?\n',
            "No"),
    "cb": ('Suppose It was a long road. Not paved but worn down by carts. Can we infer that "the road was worn down"? '
           "Yes, No, or Maybe?\n", "Yes"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPT))
def test_task_loads_and_formats_its_prompt(name, task_data):
    spec = TASKS[name]
    examples = read_tsv(task_data / name / "train.tsv", spec)
    first = examples[0]
    prompt, word = EXPECTED_PROMPT[name]
    assert spec.template.format(**first.fields) == prompt
    assert spec.label_words[first.label] == word
    assert {e.label for e in examples} == set(range(len(spec.labels)))


@pytest.mark.parametrize("seed", [13, 21, 42, 87, 100])
def test_k_shot_is_deterministic_and_class_balanced(seed, task_data):
    task = PromptTask("trec", data_dir=str(task_data / "trec"), train_per_class=16, val_per_class=8, seed=seed)
    train_a, val_a, _ = task.load()
    train_b, val_b, _ = task.load()
    assert [e.fields for e in train_a] == [e.fields for e in train_b] and [e.fields for e in val_a] == [
        e.fields for e in val_b]
    counts = [sum(e.label == c for e in train_a) for c in range(6)]
    assert counts == [16] * 6 and [sum(e.label == c for e in val_a) for c in range(6)] == [8] * 6
    assert not {e.fields["sentence"] for e in train_a} & {e.fields["sentence"] for e in val_a}
    other = PromptTask("trec", data_dir=str(task_data / "trec"), train_per_class=16, val_per_class=8,
                       seed=seed + 1).load()[0]
    assert [e.fields for e in other] != [e.fields for e in train_a]


def test_small_class_gives_what_it_has(task_data):
    examples = read_tsv(task_data / "cb" / "train.tsv", TASKS["cb"])
    train, val = k_shot_split(examples, 3, train_per_class=32, val_per_class=8, seed=13)
    assert [sum(e.label == c for e in train) for c in range(3)] == [32, 32, 8]  # neutral has 16 in all
    assert CB_COUNTS == {"entailment": 50, "contradiction": 50, "neutral": 16}


def test_label_words_are_single_tokens_for_the_tiny_tokenizer():
    tok = tiny_tokenizer()
    for spec in TASKS.values():
        ids = label_word_ids(tok, spec.label_words, "causal")
        assert len(set(ids)) == len(ids)


def test_masked_lm_prompt_puts_the_mask_in_place():
    tok = tiny_tokenizer()
    task = PromptTask("sentiment")
    item = encode(task.load()[0][:1], task, tok, "masked", 64)[0]
    assert item["input_ids"][item["mask_pos"]] == tok.mask_token_id


def test_dirichlet_partition_is_deterministic_disjoint_and_skewed():
    labels = [i % 2 for i in range(400)]
    a = dirichlet_partition(labels, 4, 0.3, seed=7)
    assert a == dirichlet_partition(labels, 4, 0.3, seed=7)
    assert sorted(i for shard in a for i in shard) == list(range(400))


    six = [i % 6 for i in range(600)]

    def dominance(alpha):  # mean share of a rank's most common label: 1/6 when IID, near 1 when skewed
        shards = [s for s in dirichlet_partition(six, 4, alpha, 7) if s]
        return sum(max(sum(six[i] == c for i in s) for c in range(6)) / len(s) for s in shards) / len(shards)

    assert dominance(0.1) > 2 * dominance(1000.0) and dominance(1000.0) < 0.25


def test_two_job_multirun_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = python(str(REPO / "train.py"), "-m", "model=tiny", "trainer.max_steps=4",
                  "trainer.enable_progress_bar=false", "trainer.strategy=zo_spawn", "optimizer.lr=1e-5,1e-3",
                  f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p.parent for p in sweep.rglob("summary.rank0.json"))
    assert [r.name for r in runs] == ["0", "1"]
    lrs = [json.loads((r / "summary.rank0.json").read_text())["steps"] for r in runs]
    assert lrs == [4, 4]
    report = python("-m", "lightning_zo.report", str(sweep), "--out", str(tmp_path / "rep"))
    assert report.returncode == 0, report.stderr[-3000:]
    out = report.stdout
    # legends: task, rule, seed, then what differs (not override strings, not the runs' directories)
    assert "| sentiment, rule=sgd, seed=0, lr=1e-05 |" in out and "| sentiment, rule=sgd, seed=0, lr=0.001 |" in out
    for png in ("accuracy_vs_steps.png", "accuracy_vs_forwards.png", "loss_vs_steps.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "rep" / "accuracy_vs_bytes.png").exists()  # one rank each: nothing sent
    assert (tmp_path / "rep" / "report.md").read_text().count("\n| ") == 2  # one row per run


def test_non_iid_run(tmp_path):
    train(tmp_path, "trainer.strategy=zo_spawn", "trainer.devices=2", "trainer.max_steps=6", "data.batch_size=4",
          "data.partition=dirichlet", "data.dirichlet_alpha=1.0")

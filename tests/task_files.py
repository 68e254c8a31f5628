"""Small train.tsv files in each task's format (the columns and raw labels of the GLUE, SuperGLUE and TREC files that
`task.data_dir` reads), written by the tests themselves: a clone runs every test without the real data sets, which
only scripts/results.py and the benchmarks read. The sentences are made up; what a test asserts about a file (its
first row, its class counts) is stated here."""

from __future__ import annotations

from itertools import cycle, islice
from pathlib import Path

SUBJECTS = ("the film", "this story", "the actor", "our trip", "the meal", "that song", "the show", "his plan",
            "her book", "the game")
VERBS = ("was", "felt", "seemed", "looked", "sounded", "turned out")
ENDINGS = ("good", "slow", "bright", "long", "warm", "strange", "calm", "loud", "sweet", "cold")


def phrases() -> list[str]:
    """600 distinct short sentences (every example of a file is distinct: validation is carved from training)."""
    return [f"{s} {v} {e}" for s in SUBJECTS for v in VERBS for e in ENDINGS]


# The first row of each file, its prompt and label word (tests/test_tasks.py checks the templates against them).
FIRST = {
    "sst2": ({"sentence": "a film that hides its best moments"}, "0"),
    "sst5": ({"sentence": "a bright , funny and finally moving tale of a town and its river"}, "4"),
    "trec": ({"sentence": "How did the old river town get its name ?"}, "DESC"),
    "rte": ({"sentence1": "No rain fell in the valley last week.", "sentence2": "Rain fell in the valley."},
            "not_entailment"),
    "cb": ({"premise": "It was a long road. Not paved but worn down by carts.", "hypothesis": "the road was worn down"},
           "entailment"),
}
LABELS = {"sst2": ("0", "1"), "sst5": ("0", "1", "2", "3", "4"), "trec": ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
          "rte": ("entailment", "not_entailment")}
ROWS = {"sst2": 600,  # more than 250 per class: experiment=mezo_opt13b validates on 250
        "sst5": 200, "trec": 180, "rte": 60}
CB_COUNTS = {"entailment": 50, "contradiction": 50, "neutral": 16}  # a class smaller than 32 + 8 (k-shot + val)
COPA_COUNTS = (195, 205)  # label 0, label 1: 400 rows, as the real COPA train split


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.tsv").write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def _single(name: str, root: Path) -> None:
    """sst2, sst5, trec (one sentence) and rte (two): the first row, then made-up rows cycling through the labels."""
    fields, label = FIRST[name]
    labels = islice(cycle(LABELS[name]), ROWS[name] - 1)
    if name == "rte":
        header = ["index", "sentence1", "sentence2", "label"]
        rows = [["0", fields["sentence1"], fields["sentence2"], label]]
        rows += [[str(i + 1), f"{p.capitalize()} today.", f"{p.capitalize()}.", lab]
                 for i, (p, lab) in enumerate(zip(phrases(), labels))]
    elif name == "trec":
        header = ["sentence", "label", "label_fine"]
        rows = [[fields["sentence"], label, f"{label}:manner"]]
        rows += [[f"Why {p} ?", lab, f"{lab}:other"] for p, lab in zip(phrases(), labels)]
    else:
        header = ["sentence", "label"]
        rows = [[fields["sentence"], label]] + [[p, lab] for p, lab in zip(phrases(), labels)]
    _write(root / name, header, rows)


def _cb(root: Path) -> None:
    fields, label = FIRST["cb"]
    rows = [["0", fields["premise"], fields["hypothesis"], label]]
    wanted = [lab for lab, n in CB_COUNTS.items() for _ in range(n - (lab == label))]
    rows += [[str(i + 1), f"{p.capitalize()} to me.", p, lab] for i, (p, lab) in enumerate(zip(phrases(), wanted))]
    _write(root / "cb", ["idx", "premise", "hypothesis", "label"], rows)


def _copa(root: Path) -> None:
    """The first row is a `cause` question; the third a choice that starts with "I" (kept capitalised)."""
    rows = [["0", "My shadow fell over the grass.", "The sun was rising.", "The grass was cut.", "cause", "0"],
            ["1", "The show was long.", "We left early.", "We sang along with the band.", "effect", "1"],
            ["2", "The room was warm.", "I opened the window.", "The dog slept.", "effect", "0"]]
    labels = ["0"] * (COPA_COUNTS[0] - 2) + ["1"] * (COPA_COUNTS[1] - 1)
    texts = phrases()
    for i, label in enumerate(labels):
        premise = texts[i].capitalize() + "."
        short, long = f"{SUBJECTS[i % 10].capitalize()} ended.", f"{texts[-1 - i].capitalize()} all night."
        choices = (short, long) if i % 3 else (long, short)  # candidates of different lengths, either way round
        rows.append([str(i + 3), premise, *choices, ("cause", "effect")[i % 2], labels[(i * 7) % len(labels)]])
    _write(root / "copa", ["idx", "premise", "choice1", "choice2", "question", "label"], rows)


def write_task_data(root: Path) -> Path:
    """root/<task>/train.tsv for sst2, sst5, trec, rte, cb and copa; returns root (what `task.data_dir=root/<task>`
    reads)."""
    for name in ("sst2", "sst5", "trec", "rte"):
        _single(name, root)
    _cb(root)
    _copa(root)
    return root

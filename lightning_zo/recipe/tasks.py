"""Prompt classification tasks (MeZO / LM-BFF templates and label words) and their data sources."""

from __future__ import annotations

import csv
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    columns: tuple[str, ...]  # text columns the templates use
    label_column: str
    labels: tuple[str, ...]  # raw label values, in class order
    label_words: tuple[str, ...]  # one word per class, scored after the prompt (causal) or at the mask (masked)
    template: str  # causal LM: the label word follows this text
    mlm_template: str  # masked LM: {mask} marks the label word
    hub: tuple[str, str | None] = ("", None)  # (datasets path, config) for loading from the Hugging Face hub


@dataclass(frozen=True)
class MultipleChoiceSpec(TaskSpec):
    """A multiple-choice task (MeZO's COPA): every example has one candidate continuation per `choice_columns`
    entry; the label is the index of the right one. A candidate's score is its mean token log-probability after
    the prompt (causal LM). Prompt: the `stem_column` text without its final period, then the connector word that
    `connectors` maps the `connector_column` value to; candidate: " " + the choice, first letter lowercased.
    `template` is only the readable form (label_words stay empty: nothing is scored at one position)."""

    choice_columns: tuple[str, ...] = ()
    stem_column: str = ""
    connector_column: str = ""
    connectors: tuple[tuple[str, str], ...] = ()  # (column value, connector word) pairs
    lowercase_choice: bool = True

    def prompt(self, fields: dict[str, str]) -> str:
        stem = fields[self.stem_column].rstrip()
        stem = stem[:-1] if stem.endswith(".") else stem
        if not self.connector_column:
            return stem
        words = dict(self.connectors)
        value = fields[self.connector_column]
        if value not in words:
            raise UserError(f"{self.connector_column}={value!r}: expected one of {', '.join(words)}")
        return f"{stem} {words[value]}"

    def candidates(self, fields: dict[str, str]) -> list[str]:
        out = []
        for column in self.choice_columns:
            choice = fields[column].strip()
            first = choice.split(" ", 1)[0]
            if self.lowercase_choice and choice and first != "I" and not first.startswith("I'"):  # keep "I", "I'm"
                choice = choice[0].lower() + choice[1:]
            out.append(" " + choice)
        return out


_SENTIMENT = dict(columns=("sentence",), label_column="label", labels=("0", "1"), label_words=("terrible", "great"),
                  template="{sentence} It was", mlm_template="{sentence} It was {mask}.")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(**_SENTIMENT, hub=("glue", "sst2")),
    "sentiment": TaskSpec(**_SENTIMENT),  # the small set bundled with the package (offline default)
    "sst5": TaskSpec(columns=("sentence",), label_column="label", labels=("0", "1", "2", "3", "4"),
                     label_words=("terrible", "bad", "okay", "good", "great"), template="{sentence} It was",
                     mlm_template="{sentence} It was {mask}.", hub=("SetFit/sst5", None)),
    "trec": TaskSpec(columns=("sentence",), label_column="label", labels=("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
                     label_words=("Description", "Entity", "Expression", "Human", "Location", "Number"),
                     template="{sentence} Answer type:", mlm_template="{mask}: {sentence}", hub=("trec", None)),
    "rte": TaskSpec(columns=("sentence1", "sentence2"), label_column="label",
                    labels=("entailment", "not_entailment"), label_words=("Yes", "No"),
                    template='{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?\n',
                    mlm_template="{sentence1} ? {mask} , {sentence2}", hub=("glue", "rte")),
    "cb": TaskSpec(columns=("premise", "hypothesis"), label_column="label",
                   labels=("entailment", "contradiction", "neutral"), label_words=("Yes", "No", "Maybe"),
                   template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                   mlm_template="{premise} ? {mask} , {hypothesis}", hub=("super_glue", "cb")),
}

# COPA (MeZO's template): "<premise without its final period> because|so <choice, first letter lowercased>".
# template/label_words hold no new words: the tiny test model's vocabulary (built from them) stays as it was.
TASKS["copa"] = MultipleChoiceSpec(
    columns=("premise", "choice1", "choice2", "question"), label_column="label", labels=("0", "1"),
    label_words=(), template="{premise}", mlm_template="{premise}", hub=("super_glue", "copa"),
    choice_columns=("choice1", "choice2"), stem_column="premise", connector_column="question",
    connectors=(("cause", "because"), ("effect", "so")))

OBJECTIVES = ("cross_entropy", "accuracy")  # task.objective: what the ZO step's two forwards compare


def bundled_data_dir() -> str:
    return str(importlib.resources.files("lightning_zo.recipe") / "data" / "sentiment")


@dataclass
class Example:
    fields: dict[str, str]
    label: int  # class index


def _first_bad_utf8(path: Path) -> str:
    """file:line: what is wrong, for the first line that is not UTF-8."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def read_tsv(path: str | Path, spec: TaskSpec) -> list[Example]:
    """A GLUE-style TSV (header line, tab-separated, no quoting, UTF-8 with or without a BOM); every error names
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        return _read_tsv(path, spec)
    except UnicodeDecodeError:
        raise UserError(_first_bad_utf8(path)) from None


def _read_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    index = {raw: i for i, raw in enumerate(spec.labels)}
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(rows, None)
            if header is None:
                raise UserError(f"{path}: empty file (expected a header line)")
            missing = [c for c in (*spec.columns, spec.label_column) if c not in header]
            if missing:
                raise UserError(f"{path}:1: missing column(s) {', '.join(missing)} "
                                f"(header has: {', '.join(header)})")
            pos = {c: header.index(c) for c in (*spec.columns, spec.label_column)}
            for line, row in enumerate(rows, start=2):
                if len(row) != len(header):
                    raise UserError(f"{path}:{line}: expected {len(header)} tab-separated fields, got {len(row)}")
                raw = row[pos[spec.label_column]].strip()
                if raw not in index:
                    raise UserError(f"{path}:{line}: unknown label {raw!r} "
                                    f"(expected one of {', '.join(spec.labels)})")
                examples.append(Example({c: row[pos[c]].strip() for c in spec.columns}, index[raw]))
        except csv.Error as e:  # e.g. a field over csv.field_size_limit() (131072 characters)
            limit = csv.field_size_limit()
            what = f"a field longer than {limit} characters" if "field limit" in str(e) else str(e)
            raise UserError(f"{path}:{rows.line_num}: {what} (is this a tab-separated text file?)") from None
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def read_hub(spec: TaskSpec, split: str) -> list[Example]:  # pragma: no cover - needs internet
    path, config = spec.hub
    if not path:
        raise UserError("this task has no Hugging Face hub source; set task.data_dir")
    try:
        import datasets
    except ImportError as e:
        raise UserError("loading from the hub needs the `datasets` package (pip install datasets), "
                        "or set task.data_dir to a local directory") from e
    ds = datasets.load_dataset(path, config, split=split)
    feature = ds.features[spec.label_column]
    names = getattr(feature, "names", None)
    index = {raw: i for i, raw in enumerate(spec.labels)}
    out = []
    for row in ds:
        raw = names[row[spec.label_column]] if names else str(row[spec.label_column])
        label = index.get(raw, index.get(str(row[spec.label_column])))
        if label is None:
            raise UserError(f"hub dataset {path}/{config}: unknown label {raw!r}")
        out.append(Example({c: str(row[c]).strip() for c in spec.columns}, label))
    return out


def k_shot_split(examples: list[Example], num_classes: int, train_per_class: int | None, val_per_class: int,
                 seed: int) -> tuple[list[Example], list[Example]]:
    """Class-balanced, seed-deterministic: validation is carved first, then k training examples per class
    (None: all the rest). Classes with too few examples give what they have."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(num_classes):
        members = [i for i, e in enumerate(examples) if e.label == c]
        order = [members[i] for i in rng.permutation(len(members))]
        val += order[:val_per_class]
        rest = order[val_per_class:]
        train += rest if train_per_class is None else rest[:train_per_class]
    # Interleave classes deterministically so that batches are not sorted by label.
    train = [train[i] for i in rng.permutation(len(train))]
    val = sorted(val)
    return [examples[i] for i in train], [examples[i] for i in val]


class PromptTask:
    """A configured task: which spec, where its data lives, how it is sampled (the Hydra `task` group)."""

    def __init__(self, name: str, data_dir: str | None = None, eval_file: str | None = None,
                 train_per_class: int | None = 16, val_per_class: int = 32, seed: int = 42,
                 hub_eval_split: str = "validation", data_dir_required: bool = False,
                 objective: str = "cross_entropy"):
        if name not in TASKS:
            raise UserError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
        if data_dir_required and data_dir is None:  # an experiment that is about the user's own copy of the data
            raise UserError(f"task.data_dir is required here: task.data_dir=DIR, a directory with your {name} "
                            "train.tsv (GLUE-style, tab-separated, with a header line)")
        if train_per_class is not None and train_per_class < 1 or val_per_class < 0:
            raise UserError("task.train_per_class must be >= 1 (or null for all) and task.val_per_class >= 0")
        self.name, self.spec = name, TASKS[name]
        self.data_dir = bundled_data_dir() if name == "sentiment" and data_dir is None else data_dir
        self.eval_file, self.hub_eval_split = eval_file, hub_eval_split
        self.train_per_class, self.val_per_class, self.seed = train_per_class, val_per_class, seed
        if objective not in OBJECTIVES:
            raise UserError(f"task.objective={objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective = objective  # cross_entropy, or accuracy: minus the batch accuracy (non-differentiable)
        self._loaded: dict[int, tuple] = {}  # load()'s result per rank: the CLI loads before the model, setup after

    def data_dir_for(self, rank: int) -> str | None:
        """`{rank}` in data_dir gives each rank its own directory (federated layouts)."""
        return None if self.data_dir is None else str(self.data_dir).replace("{rank}", str(rank))

    @property
    def per_rank_data(self) -> bool:
        return self.data_dir is not None and "{rank}" in str(self.data_dir)

    def load(self, rank: int = 0) -> tuple[list[Example], list[Example], list[Example] | None]:
        """(train, validation, evaluation-or-None); read once per rank (the files and the sampling are fixed)."""
        if rank not in self._loaded:
            self._loaded[rank] = self._load(rank)
        return self._loaded[rank]

    def _load(self, rank: int) -> tuple[list[Example], list[Example], list[Example] | None]:
        data_dir = self.data_dir_for(rank)
        if data_dir is None:
            pool = read_hub(self.spec, "train")
        else:
            if not Path(data_dir).is_dir():
                raise UserError(f"task.data_dir not found: {data_dir}")
            pool = read_tsv(Path(data_dir) / "train.tsv", self.spec)
        train, val = k_shot_split(pool, len(self.spec.labels), self.train_per_class, self.val_per_class, self.seed)
        if not train:
            raise UserError(f"task {self.name}: the training split is empty after sampling")
        evaluation = None
        if self.eval_file:
            evaluation = read_tsv(self.eval_file, self.spec)
        return train, val, evaluation

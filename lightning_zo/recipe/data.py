"""Tokenised prompt datasets and the DataModule: each rank reads only its own shard (data never leaves a rank)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..core.errors import UserError
from .tasks import Example, MultipleChoiceSpec, PromptTask


def label_word_ids(tokenizer, words, kind: str) -> list[int]:
    """The token id of each label word as it follows the prompt (" great"); the first token if it splits."""
    ids = []
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not pieces or pieces[0] == tokenizer.unk_token_id:
            raise UserError(f"label word {word!r} is not in the tokenizer's vocabulary")
        if len(pieces) > 1:
            warnings.warn(f"label word {word!r} is {len(pieces)} tokens; scoring its first token", stacklevel=2)
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"label words {list(words)} do not map to distinct tokens")
    return ids


def template_length(task: PromptTask, tokenizer, kind: str) -> int:
    """Tokens of the task's prompt with empty text fields (special tokens included): what every prompt needs."""
    empty = {c: "" for c in task.spec.columns}
    if kind == "causal":
        return len(tokenizer(task.spec.template.format(**empty))["input_ids"])
    return len(tokenizer(task.spec.mlm_template.format(**empty, mask=tokenizer.mask_token))["input_ids"])


def encode(examples: list[Example], task: PromptTask, tokenizer, kind: str, max_length: int) -> list[dict]:
    """Token ids per example; a causal prompt longer than max_length keeps its end (where the label word is
    scored), a masked one its start (up to the mask). A max_length that cannot hold the template is refused."""
    if isinstance(task.spec, MultipleChoiceSpec):
        return encode_choices(examples, task, tokenizer, kind, max_length)
    need = template_length(task, tokenizer, kind) + 1  # the template and at least one token of text
    if max_length < need:
        raise UserError(f"data.max_length={max_length} is too short for task {task.name}'s prompt: its template "
                        f"alone is {need - 1} tokens; use at least {need} (default 128)")
    out, cut = [], 0
    for ex in examples:
        if kind == "causal":
            ids = tokenizer(task.spec.template.format(**ex.fields))["input_ids"]
            cut += len(ids) > max_length
            out.append({"input_ids": ids[-max_length:], "label": ex.label})  # keep the prompt end
        else:
            text = task.spec.mlm_template.format(**ex.fields, mask=tokenizer.mask_token)
            full = tokenizer(text)["input_ids"]
            cut += len(full) > max_length
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            if tokenizer.mask_token_id not in ids:
                raise UserError(f"example truncated past its mask token (raise data.max_length): {text[:80]!r}")
            out.append({"input_ids": ids, "label": ex.label, "mask_pos": ids.index(tokenizer.mask_token_id)})
    if cut:
        warnings.warn(f"data.max_length={max_length} truncates {cut} of {len(examples)} prompts "
                      f"({'their start is dropped' if kind == 'causal' else 'their end is dropped'})",
                      stacklevel=2)
    return out


def encode_choices(examples: list[Example], task: PromptTask, tokenizer, kind: str, max_length: int) -> list[dict]:
    """Multiple choice: per example, one token sequence per candidate (prompt ids + candidate ids, tokenised
    apart so that every candidate follows the same prompt tokens) and how many of its last tokens are the
    candidate (the scored ones). A sequence over max_length loses its start; a candidate must fit whole."""
    spec = task.spec
    if kind != "causal":
        raise UserError(f"task {task.name} (multiple choice) scores candidates by their likelihood after the prompt "
                        "and needs a causal LM (model.kind=causal); masked LMs are not supported for it")
    out, cut = [], 0
    for ex in examples:
        prompt = tokenizer(spec.prompt(ex.fields))["input_ids"]
        choices, scored = [], []
        for text in spec.candidates(ex.fields):
            cand = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not cand:
                raise UserError(f"task {task.name}: an empty candidate in {ex.fields}")
            if len(cand) >= max_length:
                raise UserError(f"data.max_length={max_length} is too short for task {task.name}: a candidate is "
                                f"{len(cand)} tokens (and needs one prompt token before it); raise data.max_length")
            ids = prompt + cand
            cut += len(ids) > max_length
            choices.append(ids[-max_length:])
            scored.append(len(cand))
        out.append({"choices": choices, "scored": scored, "label": ex.label})
    if cut:
        warnings.warn(f"data.max_length={max_length} truncates {cut} of {sum(len(o['choices']) for o in out)} "
                      "prompt+candidate sequences (their start is dropped)", stacklevel=2)
    return out


class LeftPadCollator:
    """Left padding, so that the last position is every causal example's answer position."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        if "choices" in items[0]:
            return self.collate_choices(items)
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, width - n:] = torch.tensor(it["input_ids"])
            mask[row, width - n:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items])}
        if "mask_pos" in items[0]:
            batch["mask_pos"] = torch.tensor([width - len(it["input_ids"]) + it["mask_pos"] for it in items])
        return batch


    def collate_choices(self, items: list[dict]) -> dict:
        """Multiple choice: row e*n + i is example e's candidate i (an example's rows are adjacent, so one forward
        scores them all); `choice_mask` marks the candidate tokens (the last `scored` of each row); `labels` has one
        entry per example."""
        n = len(items[0]["choices"])
        if any(len(it["choices"]) != n for it in items):
            raise ValueError("every example of a multiple-choice batch needs the same number of candidates")
        rows = [(ids, k) for it in items for ids, k in zip(it["choices"], it["scored"])]
        width = max(len(ids) for ids, _ in rows)
        ids_t = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, k) in enumerate(rows):
            ids_t[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
            scored[row, width - k:] = 1
        return {"input_ids": ids_t, "attention_mask": mask, "choice_mask": scored,
                "labels": torch.tensor([it["label"] for it in items])}


class ShardSampler(Sampler):
    """indices[rank::world_size], no padding: evaluation counts every example exactly once."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ShardStream(Sampler):
    """An endless stream of this rank's training indices.

    Data epoch e is one permutation for all ranks (seeded by seed + e, as DistributedSampler), truncated to a
    multiple of world_size; rank r takes perm[r::N], in whole batches, so N ranks see what one process simulating N
    machines (k = N micro-batches) sees. A resumed run continues it where an uninterrupted one would be
    (integration/data_position.py skips the indices of the steps replayed).
    """

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, seed: int):
        self.n, self.rank, self.world_size, self.batch_size = n, rank, world_size, batch_size
        self.seed = seed
        self.batches_per_epoch = (n // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{n} training examples over {world_size} rank(s) do not fill one batch of {batch_size}")

    def __iter__(self):
        epoch = 0
        while True:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)[: self.n - self.n % self.world_size]
            shard = perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
            yield from shard.tolist()
            epoch += 1


def dirichlet_partition(labels: list[int], world_size: int, alpha: float, seed: int) -> list[list[int]]:
    """Non-IID shards: each class is split across ranks in Dirichlet(alpha) proportions (small alpha = more skew).

    Seeded, so every rank computes the same partition and keeps its own part.
    """
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        members = [members[i] for i in rng.permutation(len(members))]
        cuts = (np.cumsum(rng.dirichlet([alpha] * world_size))[:-1] * len(members)).astype(int)
        for rank, part in enumerate(np.split(np.array(members, dtype=int), cuts)):
            shards[rank] += part.tolist()
    return [sorted(s) for s in shards]


PARTITIONS = ("iid", "dirichlet")


def check_data_settings(batch_size: int = 16, eval_batch_size: int = 32, max_length: int = 128,
                        partition: str = "iid", dirichlet_alpha: float = 0.5, **_) -> None:
    """The `data` group's settings that need no tokenizer (the CLI checks them before the model loads)."""
    if batch_size < 1 or eval_batch_size < 1:
        raise UserError("data.batch_size and data.eval_batch_size must be >= 1")
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"data.max_length must be an integer >= 2 (tokens per prompt), got {max_length}")
    if partition not in PARTITIONS or dirichlet_alpha <= 0:
        raise UserError(f"data.partition must be one of {', '.join(PARTITIONS)} and data.dirichlet_alpha > 0")


class PromptDataModule(pl.LightningDataModule):
    """`partition`: "iid" (one shared permutation, rank r takes every N-th example) or "dirichlet" (label-skewed
    shards, `dirichlet_alpha`); with "dirichlet" a rank's k simulated machines share its shard."""

    def __init__(self, task: PromptTask, tokenizer, kind: str = "causal", batch_size: int = 16,
                 eval_batch_size: int = 32, max_length: int = 128, seed: int = 0, partition: str = "iid",
                 dirichlet_alpha: float = 0.5):
        super().__init__()
        check_data_settings(batch_size, eval_batch_size, max_length, partition=partition,
                            dirichlet_alpha=dirichlet_alpha)
        self.partition, self.dirichlet_alpha = partition, dirichlet_alpha
        self.task, self.tokenizer, self.kind = task, tokenizer, kind
        self.batch_size, self.eval_batch_size, self.max_length, self.seed = batch_size, eval_batch_size, max_length, seed
        self.collate = LeftPadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                       else tokenizer.eos_token_id)
        self.train = self.val = self.evaluation = None
        # What every rank must agree on (ZOStrategy checks at setup) and a resume must not change silently.
        self.save_hyperparameters({"task": task.name, "train_per_class": task.train_per_class,
                                   "val_per_class": task.val_per_class, "task_seed": task.seed,
                                   "batch_size": batch_size, "max_length": max_length, "seed": seed,
                                   "partition": partition, "dirichlet_alpha": dirichlet_alpha})

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        rank, _ = self._rank()
        train, val, evaluation = self.task.load(rank)
        self.train = encode(train, self.task, self.tokenizer, self.kind, self.max_length)
        self.val = encode(val, self.task, self.tokenizer, self.kind, self.max_length)
        self.evaluation = encode(evaluation, self.task, self.tokenizer, self.kind, self.max_length) \
            if evaluation else None
        if len(self.train) < self.batch_size:  # k-shot sets can be smaller than a batch (MeZO's k=16, batch 64)
            warnings.warn(f"data.batch_size={self.batch_size} but only {len(self.train)} training examples: each "
                          f"step uses all {len(self.train)} (as MeZO's trainer does)", stacklevel=2)
            self.batch_size = len(self.train)
        ShardStream(len(self.train), 0, 1, self.batch_size, self.seed)  # validates the sizes early

    def _shard(self) -> tuple[int, int]:
        """Which shard this rank reads: everything when it has its own data directory."""
        rank, world = self._rank()
        return (0, 1) if self.task.per_rank_data else (rank, world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._shard()
        items = self.train
        if self.partition == "dirichlet" and world > 1:
            shard = dirichlet_partition([it["label"] for it in items], world, self.dirichlet_alpha, self.seed)[rank]
            if len(shard) < self.batch_size:
                raise UserError(f"rank {rank}'s Dirichlet shard has {len(shard)} examples, fewer than "
                                f"data.batch_size={self.batch_size}; raise data.dirichlet_alpha or add data")
            items, rank, world = [items[i] for i in shard], 0, 1
        sampler = ShardStream(len(items), rank, world, self.batch_size, self.seed)
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)

    def _eval_loader(self, items: list[dict]) -> DataLoader:
        rank, world = self._shard()
        return DataLoader(items, batch_size=self.eval_batch_size, sampler=ShardSampler(len(items), rank, world),
                          collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val)

    def test_dataloader(self) -> DataLoader:
        if self.evaluation is None:
            raise UserError("no evaluation file: set task.eval_file")
        return self._eval_loader(self.evaluation)

"""Where a resumed run's training data continues: at the batch an uninterrupted run would see (issue 41).

A run resumed from its trajectory log restarts its process, and Lightning's fit loop starts the epoch's batches again
from the first (it fast-forwards only loaders it restores from a checkpoint's state). One ZO step reads one training
batch, so after `steps` replayed steps an uninterrupted run is `steps` batches into its data: epoch e = steps // n,
batch b = steps % n for n batches per epoch (an endless sampler: b = steps). `continue_at` positions the user's own
DataLoader there, without reading the skipped data: its batch sampler's index sampler is wrapped so that it starts
at epoch e (`set_epoch(e)` where the sampler has it, as DistributedSampler does; otherwise the e earlier epochs'
indices are drawn and dropped, which advances a seeded generator as they did) and drops the first b batches'
indices. The fit loop's epoch counter is set to e. An order that this cannot reproduce is said in one warning: a
shuffle drawn from the unseeded global generator or from the DataLoader's own generator (which its iterators also
draw worker seeds from), a sampler that draws its shuffle when an iterator is made (torchdata's RandomSampler), an
iterable dataset.
"""

from __future__ import annotations

import collections
import itertools
import logging

import lightning.pytorch as pl
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler

log = logging.getLogger(__name__)


class StartAt(Sampler):
    """`sampler`, resumed `skip` indices into epoch `epoch`: the rest of that epoch is drawn once and served to every
    iteration until Lightning sets another epoch (its fit loop makes a fresh iterator at a resumed epoch's start and
    drops the one it prefetched from); from then on the sampler's own iterations. An endless sampler (no length, one
    Lightning epoch) is continued lazily instead."""

    def __init__(self, sampler, epoch: int, skip: int, per_epoch: int | None):
        self.sampler, self.epoch, self.skip = sampler, epoch, skip
        self.per_epoch = per_epoch  # indices an epoch draws (None: endless)
        self._rest: list | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:  # Lightning sets each epoch's number on the samplers it finds
        if epoch != self.epoch:
            self.epoch, self._rest = None, None
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _start(self):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        else:
            # The earlier epochs' draws, as far as the fit loop drew them (it stops at the epoch's length, before a
            # RandomSampler's iterator ends, which would draw one more permutation): a seeded generator moves on.
            for _ in range(self.epoch):
                collections.deque(itertools.islice(iter(self.sampler), self.per_epoch), maxlen=0)
        return itertools.islice(iter(self.sampler), self.skip, self.per_epoch)

    def __iter__(self):
        if self.epoch is None:
            return iter(self.sampler)
        if self.per_epoch is None:
            started = self._start()
            self.epoch = None
            return started
        if self._rest is None:
            self._rest = list(self._start())
        return iter(self._rest)


def _batches_per_epoch(trainer: "pl.Trainer", loader: DataLoader) -> int | None:
    try:
        n = len(loader)
    except TypeError:  # an endless sampler
        return None
    limit = trainer.limit_train_batches
    return min(n, limit) if isinstance(limit, int) else int(n * limit) if limit < 1.0 else n


def _random_draws(loader: DataLoader, sampler) -> str | None:
    """Why the order depends on random draws this module cannot repeat, if it does."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # inside Lightning's DistributedSamplerWrapper
    if inner is not None and hasattr(inner, "generator"):
        return f"Lightning's DistributedSamplerWrapper shuffles the output of a random {type(inner).__name__}"
    if hasattr(sampler, "generator") and sampler.generator is None:
        return f"the training sampler ({type(sampler).__name__}) shuffles with the unseeded global generator"
    if getattr(loader, "generator", None) is not None and getattr(sampler, "generator", None) is loader.generator:
        return "the sampler shuffles with the DataLoader's generator, which each of its iterators draws from too"
    if hasattr(sampler, "generator") and not isinstance(sampler, RandomSampler):
        return f"the training sampler ({type(sampler).__name__}) draws its shuffle when an iterator is made"
    return None


def continue_at(trainer: "pl.Trainer", loader, steps: int):
    """Position the training `loader` (after Lightning's sampler injection) `steps` batches into the data; returns
    it (the same object). Loaders it cannot position are left as they are, with one warning."""
    unsure = None
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        unsure = "the training data is not a map-style DataLoader (an iterable dataset has no position to return to)"
    elif not isinstance(loader.batch_sampler, BatchSampler):  # torch's, or a subclass (torchdata's stateful one)
        unsure = f"the DataLoader's batch sampler ({type(loader.batch_sampler).__name__}) is not a BatchSampler"
    say = log.warning if trainer.is_global_zero else log.debug  # once per run, not once per rank
    if unsure is not None:
        say("resuming at step %d: %s, so the run continues with the data from its start, not with the batch an "
            "uninterrupted run would see", steps, unsure)
        return loader
    sampler = loader.batch_sampler.sampler
    drawn = _random_draws(loader, sampler)
    if drawn:
        say("resuming at step %d: %s, so the resumed run's order differs from an uninterrupted run's (shuffle with "
            "RandomSampler(generator=<seeded>) alone, or let Lightning inject its DistributedSampler)", steps, drawn)
    n = _batches_per_epoch(trainer, loader)
    epoch, batch = divmod(steps, n) if n else (0, steps)
    size = loader.batch_sampler.batch_size
    per_epoch = None if n is None else min(len(sampler), n * size)
    loader.batch_sampler.sampler = StartAt(sampler, epoch, batch * size, per_epoch)
    progress = trainer.fit_loop.epoch_progress
    for counter in (progress.current, progress.total):
        counter.ready = counter.started = counter.processed = counter.completed = epoch
    if trainer.is_global_zero:
        log.info("resuming at step %d: the training data continues at epoch %d, batch %d", steps, epoch, batch)
    return loader


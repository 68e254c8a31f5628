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

A stateful DataLoader (one with `state_dict`/`load_state_dict`, as torchdata's StatefulDataLoader) is positioned
exactly whatever its shuffle: `TrajectoryLog` keeps its state at each step's start beside the log
(`DataStates`), and a resumed run loads the state of the step before the first one it redoes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
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


def unrepeatable_order(loader: DataLoader, steps: int, injector: str) -> str | None:
    """The warning for a loop resumed at `steps` whose sampler draws an order it cannot repeat, if it does; `injector`
    names what would inject a DistributedSampler (Lightning's Trainer, Fabric's setup_dataloaders)."""
    drawn = _random_draws(loader, loader.batch_sampler.sampler)
    if drawn is None:
        return None
    return (f"resuming at step {steps}: {drawn}, so the resumed run's order differs from an uninterrupted run's "
            f"(shuffle with RandomSampler(generator=<seeded>) alone, or let {injector} inject its DistributedSampler)")


def starts_over(steps: int, why: str) -> str:
    """The warning for a loop resumed at `steps` whose data this module cannot position."""
    return (f"resuming at step {steps}: {why}, so the run continues with the data from its start, not with the batch "
            "an uninterrupted run would see")


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
        say(starts_over(steps, unsure))
        return loader
    sampler = loader.batch_sampler.sampler
    drawn = unrepeatable_order(loader, steps, "Lightning")
    if drawn:
        say(drawn)
    n = _batches_per_epoch(trainer, loader)
    epoch, batch = divmod(steps, n) if n else (0, steps)
    size = loader.batch_sampler.batch_size
    per_epoch = None if n is None else min(len(sampler), n * size)
    loader.batch_sampler.sampler = StartAt(sampler, epoch, batch * size, per_epoch)
    _continue_epoch(trainer, steps, epoch, batch)
    return loader


def stateful(loader) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def continue_from_state(trainer: "pl.Trainer", loader, steps: int, states: "DataStates",
                        kept: dict) -> Callable[[], None]:
    """Position a stateful `loader` `steps` batches into the data from `kept` (`DataStates.before(steps)`). Returns
    what loads the state: call it before the iterator the fit loop trains with is made (the loader applies a loaded
    state to its next iterator; past epoch 0 the fit loop makes a second one at the epoch's start, after the one its
    setup made)."""
    n = _batches_per_epoch(trainer, loader)
    epoch, batch = divmod(steps, n) if n else (0, steps)
    _continue_epoch(trainer, steps, epoch, batch, " (the DataLoader's own state)")
    return states.resume(loader, kept, at_epoch_start=bool(n) and batch == 0)


def _continue_epoch(trainer: "pl.Trainer", steps: int, epoch: int, batch: int, how: str = "") -> None:
    progress = trainer.fit_loop.epoch_progress  # Lightning's epoch counter, as an uninterrupted run's
    for counter in (progress.current, progress.total):
        counter.ready = counter.started = counter.processed = counter.completed = epoch
    if trainer.is_global_zero:
        log.info("resuming at step %d: the training data continues at epoch %d, batch %d%s", steps, epoch, batch, how)


def _generators(loader) -> list:
    """The random generators a loader's order draws from (its own, its samplers'), each once."""
    found = {}
    for owner in (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _set_generators(loader, states: list) -> None:
    for g, state in zip(_generators(loader), states):
        g.set_state(state)


class DataStates:
    """A stateful training loader's state at the start of the last two steps, in `RUN_DIR/data_state.rank{r}.pt`
    (rewritten atomically each step; a few KB): its `state_dict()` and the states of the generators it draws from
    (its iterators draw from them when they are made, which the state_dict does not repeat). At step t's start the
    loader has yielded exactly t + 1 batches of its epoch (the fit loop fetches a step's batch, no further ahead,
    before the step starts) and its generators hold what the epoch's iterator left, so step t - 1's entry is where a
    run resumed at step t continues."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / f"data_state.rank{rank}.pt"
        self._kept: dict[int, dict] = self._load()  # a resumed run's first step keeps the state before it
        self._settle: Callable[[], None] | None = None

    def keep(self, step: int, loader) -> None:
        if self._settle is not None:  # a resumed run's first step: its generators as the uninterrupted run's now
            self._settle()
            self._settle = None
        self._kept = {s: v for s, v in self._kept.items() if s == step - 1}
        self._kept[step] = {"loader": loader.state_dict(), "generators": [g.get_state() for g in _generators(loader)]}
        tmp = self.path.with_suffix(".tmp")
        torch.save(self._kept, tmp)
        os.replace(tmp, self.path)

    def resume(self, loader, kept: dict, at_epoch_start: bool) -> Callable[[], None]:
        """What loads `kept` into `loader` (see `continue_from_state`). Mid-epoch, the loaded state continues the
        epoch's iterator, and the generators are set as they were once that iterator exists (at the next `keep`); at
        an epoch's start, the finished epoch's empty rest is drawn first and the generators set before the next
        epoch's iterator draws from them."""
        def load() -> None:
            loader.load_state_dict(kept["loader"])
            if at_epoch_start:
                for _ in loader:  # the last epoch's rest: nothing
                    break
                _set_generators(loader, kept["generators"])

        if not at_epoch_start:
            self._settle = lambda: _set_generators(loader, kept["generators"])
        return load

    def before(self, step: int) -> dict | None:
        """The state saved at the start of step `step` - 1, if this run directory held it when the run started."""
        return self._kept.get(step - 1)

    def _load(self) -> dict:
        try:
            kept = torch.load(self.path, weights_only=False)
        except (OSError, EOFError, RuntimeError, ValueError):  # none yet, or torn: positioned as without it
            return {}
        return kept if isinstance(kept, dict) else {}


"""The perturbed forward: while `perturb(seed, coeff)` is active, every forward of the model sees theta + coeff*z.

Exact restore (DESIGN I1/I3): the master weights are never perturbed in place. A forward pre-hook on each block
(core/blocks.py) swaps the block's parameters for their perturbed copy, written into scratch by the backend just
for that block's forward, and the untouched originals are swapped back afterwards; one block's copy is alive at a
time. On the CPU an embedding is perturbed only at the rows it looks up.

Exactly once (DESIGN I5): whichever block or module swaps a parameter in first owns it until it swaps it out;
every other hook skips a parameter that already holds its perturbed copy (RoBERTa's lm_head.bias, which is also
lm_head.decoder.bias). A tied parameter used by two blocks (input and output embeddings) is materialised by
each, from the master weights, so it is always exactly theta + eps*z.

Coverage (core/coverage.py): the first `evaluate` checks that the forward reads every trainable parameter
perturbed; a parameter read outside its block is held perturbed for every whole perturbation from then on.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Iterator

import torch

from .backend import Backend, Piece, Terms
from .blocks import Block, Wrapper, nbytes, packed, plan_blocks
from .coverage import Coverage, ParameterReads, refuse_aliases
from .errors import UserError
from .layout import ParamLayout, ParamSpan
from .update import Updater


class PerturbedForward:
    """Hooks on blocks of the model; inactive (free) outside `perturb(...)`.

    `block_bytes`: the memory budget of one block (default: the largest set of parameters one module owns).
    `backend`, `updater`: the optimizer's (a pending update rides on each block's pass); private ones by default.
    """

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, distribution: str,
                 block_bytes: int | None = None, backend: Backend | None = None, updater: Updater | None = None,
                 mask_of: Callable[[torch.nn.Parameter], torch.Tensor | None] | None = None):
        self.layout = layout
        self.distribution = distribution
        self.backend = backend or Backend()
        self.updater = updater or Updater(model, self.backend)
        self.mask_of = mask_of  # core/masks.py: masked tables are perturbed whole, not by looked-up rows
        self.blocks, self.wrappers, self.rows, self.block_bytes = plan_blocks(model, layout, self.backend,
                                                                             block_bytes, rows=mask_of is None)
        self._terms: Terms | None = None  # this perturbation's, while one is active
        self._swapped: set[int] = set()  # ids of the parameters that now hold their perturbed copy
        self._live: list[Block] = []  # blocks whose copies are swapped in
        self.materialized = 0  # block and wrapper materialisations (counted by tests)
        self.scratch_bytes = self.peak_scratch_bytes = 0  # perturbed copies alive now / at most (DESIGN I3)
        self.coverage: Coverage | None = None  # None until the first `evaluate` has checked
        self.held: list[ParamSpan] = []  # read outside their blocks: perturbed for every whole perturbation
        self._reads: ParameterReads | None = None  # the check, while it runs
        self._handles = []
        for block in self.blocks:
            for i, member in enumerate(block.members):
                last = i == len(block.members) - 1
                self._handles.append(member.register_forward_pre_hook(functools.partial(self._enter, block)))
                self._handles.append(member.register_forward_hook(functools.partial(self._leave, block, last)))
        for embedding in self.rows:
            self._handles.append(embedding.register_forward_hook(self._rows_out))
        for wrapper in self.wrappers:
            self._handles.append(wrapper.module.register_forward_pre_hook(functools.partial(self._wrap_in, wrapper)))
            self._handles.append(wrapper.module.register_forward_hook(functools.partial(self._wrap_out, wrapper)))

    @property
    def hooks(self) -> int:
        """Forward hooks on the model's modules."""
        return len(self._handles)

    # -- perturbed copies

    def _materialize(self, owner, spans: list[ParamSpan]) -> tuple[list, list]:
        """Swap theta + eps*z in for each of `spans` not already swapped (a pending update applied to theta on the
        way, in the same pass); returns (saved originals, scratch buffers)."""
        spans = [s for s in spans if id(s.param) not in self._swapped]
        if not spans:
            return [], []
        self.materialized += 1
        buffers: list = []
        views = packed(self.backend.pool, spans, buffers)
        waiting = [s for s in spans if self.updater.waiting(s.param)]
        pending = self.updater.pending
        with torch.profiler.record_function("lightning_zo.perturb_block"):
            if waiting:  # theta += the pending update in place, and its perturbed copy from that: one pass
                self.backend.apply([Piece(s.param.data, s.offset, views[id(s.param)], pending.decay.get(id(s.param), 1.0),
                                          self._mask(s)) for s in waiting], self._terms, pending.terms,
                                   key=(id(owner), True))
                self.updater.take(waiting)  # applied (a pass that raised leaves it pending)
            self.backend.apply([Piece(s.param.data, s.offset, views[id(s.param)], mask=self._mask(s))
                                for s in spans if s not in waiting], self._terms, key=(id(owner), False))
        saved = []
        for s in spans:
            saved.append((s.param, s.param.data))
            s.param.data = views[id(s.param)].view_as(s.param.data)
            self._swapped.add(id(s.param))
        self.scratch_bytes += nbytes(s.param for s in spans)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes, self.scratch_bytes)
        return saved, buffers

    def _mask(self, span: ParamSpan) -> torch.Tensor | None:
        return None if self.mask_of is None else self.mask_of(span.param)

    def _restore(self, saved: list, buffers: list) -> None:
        for p, original in saved:
            self.scratch_bytes -= p.numel() * p.element_size()
            p.data = original
            self._swapped.discard(id(p))
        for b in buffers:
            self.backend.pool.give(b)

    # -- hooks

    def _unchecked(self):
        """Our own reads of the master weights (making perturbed copies) are not the forward's."""
        return contextlib.nullcontext() if self._reads is None else self._reads.paused()

    def _enter(self, block: Block, module, args) -> None:
        if self._terms is None:
            return
        if block not in self._live:
            with self._unchecked():
                for other in [b for b in self._live if b.depth == 0]:  # one block at a time (DESIGN I3)
                    self._release(other)
                block.copy = self._materialize(block, block.spans)
            self._live.append(block)
        block.depth += 1

    def _leave(self, block: Block, last: bool, module, args, output) -> None:
        if self._terms is None or block not in self._live:
            return
        block.depth = max(0, block.depth - 1)
        if last and block.depth == 0:
            with self._unchecked():
                self._release(block)

    def _release(self, block: Block) -> None:
        self._restore(*block.copy)
        block.copy = ((), ())
        self._live.remove(block)

    def _rows_out(self, module: torch.nn.Embedding, args, output):
        """The embedding's output recomputed from theta + eps*z at the looked-up rows only: the same bits as a lookup
        into the whole perturbed table, at the cost of the rows (the table itself may be tied to an output layer,
        whose block materialises it in full)."""
        p = module.weight
        if self._terms is None or id(p) in self._swapped:  # inactive, or held perturbed by an enclosing holder
            return None
        ids = args[0] if args else None
        span = self.layout.span_of(p)
        if not isinstance(ids, torch.Tensor) or span is None:
            return None
        with torch.profiler.record_function("lightning_zo.perturb_rows"), self._unchecked():
            self.materialized += 1
            if self.backend.kind_of(p.data) != "kernel" or ids.device.type != "cpu":  # moved off the C kernel's path
                saved, buffers = self._materialize(module, [span])
                try:
                    return torch.nn.functional.embedding(ids, p, module.padding_idx)
                finally:
                    self._restore(saved, buffers)
            pending = self.updater.pending
            if self.updater.waiting(p) and (pending.terms.distribution != self.distribution
                                            or pending.decay.get(id(p), 1.0) != 1.0):
                self.updater.flush([span])
                pending = None
            flat_ids = ids.reshape(-1)
            rows = torch.unique(flat_ids)  # sorted
            offsets = span.offset + rows.long() * p.shape[1]
            theta = p.data.index_select(0, rows)
            if self.updater.waiting(p):  # the rows of the updated table (its block, or this perturbation's end,
                self.backend.rows(theta, theta, offsets, pending.terms)  # updates the table itself)
            perturbed = torch.empty_like(theta)
            self.backend.rows(perturbed, theta, offsets, self._terms)
            return perturbed[torch.searchsorted(rows, flat_ids)].view(*ids.shape, p.shape[1])

    def _wrap_in(self, wrapper: Wrapper, module, args) -> None:
        if self._terms is not None:
            with self._unchecked():
                wrapper.stack.append(self._materialize(wrapper, wrapper.spans))

    def _wrap_out(self, wrapper: Wrapper, module, args, output) -> None:
        if self._terms is not None and wrapper.stack:
            with self._unchecked():
                self._restore(*wrapper.stack.pop())

    # -- public

    @contextlib.contextmanager
    def perturb(self, seed: int, coeff: float) -> Iterator[None]:
        """Forwards inside see theta + coeff * z(seed); the weights are bit-identical afterwards."""
        self._terms = Terms([seed], [coeff], self.distribution)
        for device in {s.param.device for s in self.layout if self.backend.kind_of(s.param.data) == "triton"}:
            self._terms.on(device, False)  # uploaded here, once, not inside the forward
        self.updater.perturbing = True
        held = None
        try:
            if self.held:  # read outside their blocks (the coverage check): perturbed for the whole perturbation
                held = self._materialize(self, self.held)
            yield
        finally:
            for block in list(self._live):  # the last block, or every live one after a forward that raised
                block.depth = 0
                self._release(block)
            for wrapper in self.wrappers:
                while wrapper.stack:
                    self._restore(*wrapper.stack.pop())
            if held is not None:
                self._restore(*held)
            self._terms = None
            self.updater.perturbing = False
            self._swapped.clear()
            self.updater.flush()  # what this forward did not reach (or all of it, after an error)

    def evaluate(self, seed: int, coeff: float, fn):
        """`fn()` (a loss) under theta + coeff * z(seed). The first call checks that the forward reads every trainable
        parameter perturbed (core/coverage.py): a parameter read outside its block is then held perturbed for every
        whole perturbation, and `fn` runs again, checked again; one it cannot cover raises UserError."""
        if self.coverage is not None:
            with self.perturb(seed, coeff):
                return fn()
        found: dict[str, str] = {}
        for attempt in (1, 2):
            value, reads = self._checked(seed, coeff, fn)
            if not reads.unperturbed:  # (a view of a parameter read unperturbed is an alias too: held, it is not)
                refuse_aliases(reads.aliased)
                self.coverage = Coverage(found, nbytes(s.param for s in self.held))
                if found:
                    warnings.warn(f"lightning_zo: {self.coverage}", stacklevel=3)
                return value
            if attempt == 2:
                name, func = next(iter(reads.unperturbed.items()))
                raise UserError(f"cannot perturb {name}: {func} reads it unperturbed even with the parameter held "
                                "perturbed for the whole forward")
            found.update(reads.unperturbed)
            named = {s.name: s for s in self.layout}
            self.held += [named[name] for name in reads.unperturbed]

    def _checked(self, seed: int, coeff: float, fn) -> tuple[object, ParameterReads]:
        looking_up: set[int] = set()  # tables whose embedding is doing its own lookup (recomputed from the rows)
        reads = ParameterReads(self.layout, lambda p: id(p) in self._swapped, lambda p: id(p) in looking_up)
        handles = [h for m in self.rows for h in (
            m.register_forward_pre_hook(lambda m, args: looking_up.add(id(m.weight))),
            m.register_forward_hook(lambda m, args, out: looking_up.discard(id(m.weight))))]
        self._reads = reads
        try:
            with self.perturb(seed, coeff):
                with reads:
                    value = fn()
        finally:
            self._reads = None
            for h in handles:
                h.remove()
        return value, reads

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

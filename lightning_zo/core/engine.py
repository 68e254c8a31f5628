"""Applying the noise to weights: the perturbed forward and the update. Used by training and by replay.

Exact restore (DESIGN I1/I3): the master weights are never perturbed in place. While a perturbation is active, a
forward pre-hook swaps a block's parameters for theta + eps*z, materialised just for that block's forward, and the
untouched originals are swapped back afterwards. A block is a run of consecutive module subtrees (e.g. a few
transformer layers) whose parameters fit a memory budget, by default the largest set of parameters one module owns
directly, so peak memory grows by at most the largest block (DESIGN I3) and a forward costs a few hooks and one
launch per block, not one per leaf module. On the CPU an embedding is perturbed only at the rows it looks up.

Exactly once (DESIGN I5): whichever block or module swaps a parameter in first owns it until it swaps it out;
every other hook skips a parameter that already holds its perturbed copy (RoBERTa's lm_head.bias, which is also
lm_head.decoder.bias). A tied parameter used by two blocks (input and output embeddings) is materialised by
each, from the master weights, so it is always exactly theta + eps*z.

Prefetch (`PerturbedForward(prefetch=True)`): when a block's forward starts, the next block's copy (the block that
followed it in the last perturbed forward) is computed ahead, on a side stream of its CUDA device, so that it
overlaps this block's forward; a prefetched copy that no longer covers exactly the parameters to swap in is dropped.
Peak memory then grows by two blocks.

State: an `Engine` per optimizer holds the scratch buffers, the kernels' descriptor tables and the worker threads;
nothing mutable lives at module level.

Deferred updates (`Engine.defer`, the optimizer's `fuse_update`): on the kernels' paths (Triton; the C kernel for
fp32 without decay) an update can wait for the next perturbation, whose pass over each block then updates theta in
place and writes its perturbed copy from the updated values: one read of theta instead of two, the same bits.
Until then the update is pending; any forward of the model's modules outside a perturbation, its state_dict and
load_state_dict, and `Engine.flush` apply it first.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from . import cpu_kernel, triton_kernel
from .coverage import Coverage, ParameterReads, refuse_aliases
from .errors import UserError
from .layout import ParamLayout, ParamSlot
from .noise import add_noise, add_noise_sum, fill_many, fill_rows, round_to_bfloat16

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BufferPool:
    """Reusable flat scratch tensors. Fresh large tensors are fresh mmap'd pages on the CPU, and faulting them in
    costs as much as generating the noise; reuse keeps the extra memory at the largest block's size."""

    def __init__(self):
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.numel() >= numel and buf.device == device and buf.dtype == dtype:
                return self._free.pop(i)[:numel]
        # None fits: drop the smaller free ones of this kind first, so the pool holds about one largest block
        # (blocks come one at a time), not one buffer per block size (measured: 2x the largest block of RSS).
        self._free = [b for b in self._free if b.device != device or b.dtype != dtype]
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        base = tensor if tensor._base is None else tensor._base
        if base.dim() == 1:
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel)


def _fused(t: torch.Tensor) -> bool:
    """Whether the Triton kernel takes this tensor as it is (one launch for many tensors)."""
    return t.is_contiguous() and t.dtype in FUSED_DTYPES and triton_kernel.available(t.device)


def _cpu_fast(t: torch.Tensor) -> bool:
    """Whether the C kernel takes this tensor as it is (fp32, contiguous, CPU)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and not _fused(t)


@dataclass(eq=False)
class PendingUpdate:
    """An update not yet applied: its slots' seeds and float32 coefficients, its decay factors and rounding seed,
    and the parameters still waiting."""

    seeds: list[int]
    coeffs: list[float]
    distribution: str
    slots: dict[int, ParamSlot]  # id(param) -> slot
    decay: dict[int, float] = field(default_factory=dict)
    rounding_seed: int | None = None
    states: dict = field(default_factory=dict)  # (device, rounding seed) -> its seeds and coefficients there
    on_applied: list = field(default_factory=list)  # called once every waiting parameter has it

    def state(self, device: torch.device, rounding_seed: int | None):
        """The update's seeds and coefficients on `device` for the Triton kernel (uploaded once per device)."""
        if (device, rounding_seed) not in self.states:
            self.states[device, rounding_seed] = triton_kernel.step_state(self.seeds, self.coeffs, rounding_seed,
                                                                          device)
        return self.states[device, rounding_seed]


class Engine:
    """What one optimizer owns to apply noise: scratch buffers, the Triton launcher (descriptor tables per block),
    the CPU worker threads, a pending (deferred) update, and counts of kernel calls (tests and the run summary's
    generator_calls report them; nothing reads them to decide)."""

    def __init__(self, threads: int | None = None):
        self.pending: PendingUpdate | None = None
        self.pool = BufferPool()
        self.launcher = triton_kernel.Launcher()
        self.threads = threads or max(1, torch.get_num_threads())
        self.cpu_calls = 0  # C-kernel calls (one per pass on OpenMP, else one per thread's share)
        self.other_calls = 0  # per-tensor fallbacks (torch ops, numpy, non-fp32 CPU tensors)
        self._executor: ThreadPoolExecutor | None = None

    def __deepcopy__(self, memo) -> "Engine":
        # Copying a model copies its hooks and so this engine: give the copy fresh state (threads cannot be copied).
        self._refuse_copy("copying")
        return Engine(self.threads)

    def __getstate__(self) -> dict:  # pickling a model pickles its hooks: leave the threads behind
        self._refuse_copy("pickling")
        return {**self.__dict__, "_executor": None}

    def _refuse_copy(self, what: str) -> None:
        """A copy of the model would hold its weights without the pending update (copied before this engine)."""
        if self.pending is not None:
            raise RuntimeError(f"{what} a model whose last update is still pending (fuse_update): call the "
                               "optimizer's flush() first")

    @property
    def launches(self) -> int:
        return self.launcher.launches

    def _pool_executor(self) -> ThreadPoolExecutor | None:
        if self.threads > 1 and self._executor is None and not cpu_kernel.uses_openmp():
            self._executor = ThreadPoolExecutor(max_workers=self.threads - 1)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def fill_cpu(self, pieces, seeds, coeffs, distribution, update=None) -> None:
        """fp32 CPU pieces (dst, src or None, offset) in one threaded pass of the C kernel; `update` = (seeds,
        coeffs): first src += their sum in place, in the same pass."""
        if pieces:
            self.cpu_calls += fill_many(pieces, list(seeds), coeffs, distribution, self._pool_executor(),
                                        self.threads, update)

    def fill_cpu_rows(self, dst, src, offsets, seeds, coeffs, distribution) -> None:
        """fp32 CPU rows (2-d dst and src, a flat offset per row) in one threaded pass of the C kernel."""
        self.cpu_calls += fill_rows(dst, src, offsets, list(seeds), coeffs, distribution, self._pool_executor(),
                                    self.threads)

    @torch.no_grad()
    def update(self, layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
               decay: dict[int, float] | None = None, rounding_seed: int | None = None) -> None:
        """See `apply_update`."""
        self.flush()  # a pending update comes first
        with torch.profiler.record_function("lightning_zo.update"):  # a range in profiles (the C kernel is opaque)
            self._update(list(layout), seeds, coeffs, distribution, decay, rounding_seed)

    @torch.no_grad()
    def defer(self, layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
              decay: dict[int, float] | None = None, rounding_seed: int | None = None) -> None:
        """`update`, with the part that a perturbation can fuse into its pass left pending for the next one: the
        Triton kernel's tensors, and the C kernel's (fp32 CPU, no decay); the rest is applied now. Same bits. Call it
        through `PerturbedForward.defer`, which also makes every forward outside a perturbation apply it first."""
        self.flush()
        decay = decay or {}
        waiting = {id(s.param): s for s in layout if seeds and (_fused(s.param.data) or (
            _cpu_fast(s.param.data) and decay.get(id(s.param), 1.0) == 1.0))}
        with torch.profiler.record_function("lightning_zo.update"):
            self._update([s for s in layout if id(s.param) not in waiting], seeds, coeffs, distribution, decay,
                         rounding_seed)
        if waiting:
            self.pending = PendingUpdate(list(seeds), [float(np.float32(c)) for c in coeffs], distribution, waiting,
                                         {i: f for i, f in decay.items() if i in waiting}, rounding_seed)

    def waiting(self, param: torch.nn.Parameter) -> bool:
        """Whether `param` still waits for the pending update."""
        return self.pending is not None and id(param) in self.pending.slots

    def fusable(self, param: torch.nn.Parameter, distribution: str) -> bool:
        """Whether `param`'s pending update can ride on a pass of `distribution`'s noise over it: the Triton kernel
        takes any decay; the C kernel has none (a decayed tensor deferred on the Triton path may have moved)."""
        return (self.waiting(param) and self.pending.distribution == distribution
                and (_fused(param.data) or self.pending.decay.get(id(param), 1.0) == 1.0))

    def take_pending(self, slots: Sequence[ParamSlot]) -> PendingUpdate | None:
        """The pending update, with `slots` marked applied (the caller applies it to them now)."""
        pending = self.pending
        if pending is None:
            return None
        for s in slots:
            pending.slots.pop(id(s.param), None)
        if not pending.slots:
            self.pending = None
            for applied in pending.on_applied:
                applied()
        return pending

    @torch.no_grad()
    def flush(self, slots: Sequence[ParamSlot] | None = None) -> None:
        """Apply the pending update now, to `slots` (those of them still waiting) or to every parameter waiting."""
        if self.pending is None:
            return
        chosen = list(self.pending.slots.values()) if slots is None else [s for s in slots if self.waiting(s.param)]
        if not chosen:
            return
        pending = self.take_pending(chosen)
        with torch.profiler.record_function("lightning_zo.update"):
            self._update(chosen, pending.seeds, pending.coeffs, pending.distribution, pending.decay,
                         pending.rounding_seed)

    def _update(self, slots, seeds, coeffs, distribution, decay, rounding_seed) -> None:
        decay = decay or {}
        coeffs = [float(np.float32(c)) for c in coeffs]
        fused: dict[tuple, list] = {}  # (device, dtype) -> [(flat theta, offset, factor)]: one launch each
        cpu: list[tuple] = []
        for slot in slots:
            p = slot.param
            factor = decay.get(id(p), 1.0)
            if not seeds and factor == 1.0:
                continue
            if _fused(p.data):
                fused.setdefault((p.device, p.dtype), []).append((p.data.view(-1), slot.offset, factor))
            elif seeds and factor == 1.0 and _cpu_fast(p.data):
                flat = p.data.view(-1)
                cpu.append((flat, flat, slot.offset))  # in place: one read + write of theta
            else:
                self._update_one(p, slot.offset, seeds, coeffs, distribution, factor, rounding_seed)
        self.fill_cpu(cpu, seeds, coeffs, distribution)
        states = {}
        for (device, dtype), group in fused.items():
            flats, offsets, factors = (list(column) for column in zip(*group))
            rounding = rounding_seed if dtype == torch.bfloat16 else None
            if (device, rounding) not in states:
                states[device, rounding] = triton_kernel.step_state(list(seeds), coeffs, rounding, device)
            self.launcher.noise_sum(flats, flats, offsets, list(seeds), coeffs, distribution, factors, rounding,
                                    key=("update", device, dtype), state=states[device, rounding])

    def _update_one(self, p: torch.nn.Parameter, offset: int, seeds: Sequence[int], coeffs: Sequence[float],
                    distribution: str, factor: float, rounding_seed: int | None) -> None:
        self.other_calls += 1
        contiguous = p.data.is_contiguous()
        flat = p.data.view(-1) if contiguous else p.data.reshape(-1)
        acc = None
        if seeds:
            acc = add_noise_sum(self.pool.take(p.numel(), p.device), None, list(seeds), list(coeffs), offset,
                                distribution)
        theta = flat.float()
        if factor != 1.0:
            theta = theta * torch.tensor(factor, dtype=torch.float32, device=theta.device)
        if acc is not None:
            theta = theta + acc
        if p.dtype == torch.bfloat16 and rounding_seed is not None:
            theta = round_to_bfloat16(theta, rounding_seed, offset)
        p.data.copy_(theta.view_as(p.data))
        if acc is not None:
            self.pool.give(acc)


@torch.no_grad()
def apply_update(layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
                 decay: dict[int, float] | None = None, rounding_seed: int | None = None,
                 engine: Engine | None = None) -> None:
    """theta <- theta * decay_p + sum_i coeffs[i] * z(seeds[i]), with a device-independent rounding order.

    The sum is accumulated in float32 in the given order (slot order), each product rounded once; the decayed
    weight (if any) is rounded once; the final add rounds once into the storage dtype: to nearest, or for
    bfloat16 weights with `rounding_seed`, stochastically from the shared generator (so updates far below one
    bf16 ulp still move the weights in expectation, DESIGN I5). `engine`: the optimizer's (buffers and tables
    kept between steps); without one a throwaway engine is used.
    """
    own = engine is None
    engine = engine or Engine()
    try:
        engine.update(layout, seeds, coeffs, distribution, decay, rounding_seed)
    finally:
        if own:
            engine.close()


# ---------------------------------------------------------------------------------------------------- blocks


ALIGN = 256  # bytes


def _packed(pool: BufferPool, slots: list[ParamSlot], device: torch.device, dtype: torch.dtype,
            buffers: list) -> dict[int, torch.Tensor]:
    """One flat scratch buffer (appended to `buffers`) cut into a view per slot, by id of its parameter. Each view
    starts a multiple of ALIGN bytes into the buffer, as a fresh allocation would: the forward's kernels then take
    the perturbed copy as they take the weights (PyTorch hands cuBLASLt the pointers' alignment, up to 256 bytes,
    to choose its algorithm, so a misaligned copy may get another algorithm, other bits, and narrower loads)."""
    step = ALIGN // dtype.itemsize
    sizes = [-(-s.param.numel() // step) * step for s in slots]  # each rounded up to whole ALIGNs
    flat = pool.take(sum(sizes), device, dtype)
    buffers.append(flat)
    views, at = {}, 0
    for s, size in zip(slots, sizes):
        views[id(s.param)] = flat[at:at + s.param.numel()]
        at += size
    return views


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(eq=False)
class Block:
    """Consecutive module subtrees whose parameters are materialised together (`members` get the hooks)."""

    members: list[torch.nn.Module]
    params: list[ParamSlot]  # every trainable parameter of the members' subtrees, once
    nbytes: int
    depth: int = 0  # members' forwards in progress
    saved: list = field(default_factory=list)  # (param, original) that this block swapped in
    buffers: list = field(default_factory=list)


@dataclass(eq=False)
class Prefetched:
    """A block's perturbed copy computed ahead of its forward (`PerturbedForward(prefetch=True)`), for `slots`; on
    CUDA, `event` marks its end on the side stream, and `inputs` holds what the side stream reads that the main
    stream allocated and may free sooner (a pending update's seeds and coefficients, dropped once its last block is
    applied): alive until the main stream has waited for `event`, so the allocator cannot hand it out before."""

    slots: list[ParamSlot]
    buffers: list
    perturbed: dict
    device: torch.device
    event: object = None
    inputs: tuple = ()


@dataclass(eq=False)
class Wrapper:
    """A module too large to be one block: its own (directly registered) parameters, held for its whole forward."""

    module: torch.nn.Module
    params: list[ParamSlot]
    stack: list = field(default_factory=list)  # per (re-entrant) call: (saved, buffers)


def _row_lookup(module: torch.nn.Module, layout: ParamLayout) -> bool:
    """A plain nn.Embedding whose table is on the C kernel's path: its perturbed forward needs only the looked-up
    rows of theta + eps*z (an embedding is a gather, no arithmetic), not the whole table."""
    return (type(module) is torch.nn.Embedding and module.max_norm is None
            and layout.slot_of(module.weight) is not None and _cpu_fast(module.weight.data))


def plan_blocks(model: torch.nn.Module, layout: ParamLayout, budget: int | None = None,
                rows: list | None = None) -> tuple[list[Block], list[Wrapper], int]:
    """Cut the module tree into blocks of at most `budget` bytes of trainable parameters (default: the most that one
    module owns directly, which can never be split, so the bound of DESIGN I3 does not grow).

    Walking the tree in module order, a subtree that fits is a unit (if it has a forward of its own: a ModuleList's
    hooks never run); one that does not is split into its children,
    and its own parameters (if any) become a `Wrapper`. Consecutive units are packed into blocks greedily, never
    across a wrapper's boundary (a block then never outlives the wrapper that may hold some of its parameters).
    Returns (blocks, wrappers, budget).
    """
    def trainable(params):
        return [s for p in params if (s := layout.slot_of(p)) is not None]

    own = {m: trainable(m.parameters(recurse=False)) for m in model.modules()}
    largest_own = max((_bytes(s.param for s in slots) for slots in own.values()), default=0)
    budget = largest_own if budget is None else int(budget)
    units: list[tuple[torch.nn.Module, list[ParamSlot]] | None] = []  # None: a wrapper's boundary
    wrappers: list[Wrapper] = []

    def visit(module: torch.nn.Module) -> None:
        slots = trainable(module.parameters())
        if not slots:
            return
        if rows is not None and _row_lookup(module, layout):
            rows.append(module)  # perturbed row by row in its forward hook: no block
            return
        children = [c for c in module.children() if trainable(c.parameters())]
        callable_ = type(module).forward is not torch.nn.Module.forward  # ModuleList, ModuleDict: never called
        if (_bytes(s.param for s in slots) <= budget and callable_) or not children:
            units.append((module, slots))
            return
        if own[module]:
            wrappers.append(Wrapper(module, own[module]))
            units.append(None)
        for child in children:
            visit(child)
        if own[module]:
            units.append(None)

    visit(model)
    blocks: list[Block] = []
    members: list[torch.nn.Module] = []
    params: dict[int, ParamSlot] = {}

    def flush():
        if members:
            blocks.append(Block(list(members), list(params.values()), _bytes(s.param for s in params.values())))
        members.clear()
        params.clear()

    for unit in units:
        if unit is None:
            flush()
            continue
        module, slots = unit
        if members and _bytes(s.param for s in {**params, **{id(s.param): s for s in slots}}.values()) > budget:
            flush()
        members.append(module)
        params.update({id(s.param): s for s in slots})
    flush()
    return blocks, wrappers, budget


class PerturbedForward:
    """Hooks on blocks of the model; inactive (free) outside `perturb(...)`.

    `block_bytes`: the memory budget of one block (default: the largest set of parameters one module owns).
    `engine`: the optimizer's; a private one by default.
    `prefetch`: when a block's forward starts, compute the perturbed copy of the block that followed it in the last
    perturbed forward, on a side stream of its CUDA device, so that the memory-bound perturbation overlaps the
    compute-bound forward (elsewhere it runs in order: the same bits, and nothing gained). It costs a second
    block of scratch: peak memory grows by the two largest consecutive blocks instead of the largest one.
    """

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, distribution: str,
                 block_bytes: int | None = None, engine: Engine | None = None, prefetch: bool = False):
        self.layout = layout
        self.distribution = distribution
        self.engine = engine or Engine()
        self.rows: list[torch.nn.Embedding] = []  # embeddings perturbed by looked-up rows (CPU fp32)
        self.blocks, self.wrappers, self.block_bytes = plan_blocks(model, layout, block_bytes, self.rows)
        self._active: tuple[int, float] | None = None
        self._states: dict = {}  # device -> the seed and coefficient on it, uploaded once per perturbation
        self._swapped: set[int] = set()  # ids of the parameters that now hold their perturbed copy
        self._live: list[Block] = []  # blocks whose copies are swapped in
        self.materialized = 0  # block and wrapper materialisations (counted by tests)
        self.scratch_bytes = self.peak_scratch_bytes = 0  # perturbed copies alive now / at most (DESIGN I3)
        self._members = {id(m) for m in model.modules()}
        self._guard = None  # a global forward pre-hook while an update is pending (`defer`)
        self.prefetch = bool(prefetch)
        self.prefetched = 0  # prefetched copies that a block's forward then used (counted by tests and the bench)
        self._ready: dict[Block, Prefetched] = {}  # computed ahead, not yet swapped in
        self._order: list[Block] = []  # blocks in the order this perturbed forward materialised them
        self._next: dict[Block, Block] = {}  # each block's successor in the last perturbed forward
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # Coverage (core/coverage.py): what the first perturbed forward found read outside its block, held
        # perturbed for every whole perturbation from then on.
        self.coverage: Coverage | None = None  # None until the first `evaluate` has checked
        self.held: list[ParamSlot] = []
        self._held_saved: tuple[list, list] | None = None
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
        # What reads or replaces the weights outside a forward applies a pending update first.
        self._state_hooks = [model.register_state_dict_pre_hook(self._flush),
                             model.register_load_state_dict_pre_hook(self._flush)]

    def __getstate__(self) -> dict:  # pickling a model pickles its hooks: CUDA streams stay behind (made on use)
        return {**self.__dict__, "_streams": {}}

    @property
    def hooks(self) -> int:
        """Forward hooks on the model's modules (the state_dict hooks are not counted)."""
        return len(self._handles)

    def _flush(self, *args, **kwargs) -> None:
        self.engine.flush()

    def defer(self, layout: ParamLayout, seeds: Sequence[int], coeffs: Sequence[float], distribution: str,
              decay: dict[int, float] | None = None, rounding_seed: int | None = None) -> None:
        """`Engine.defer`; while the update is pending, a forward of any of the model's modules outside a
        perturbation applies it first (validation, inference, a submodule called directly): a global forward
        pre-hook, removed as soon as the update is applied."""
        self.engine.defer(layout, seeds, coeffs, distribution, decay, rounding_seed)
        if self.engine.pending is not None and self._guard is None:
            self._guard = torch.nn.modules.module.register_module_forward_pre_hook(self._guarded)
            self.engine.pending.on_applied.append(self._unguard)

    def _guarded(self, module, args) -> None:
        if self._active is None and id(module) in self._members:
            self.engine.flush()

    def _unguard(self) -> None:
        if self._guard is not None:
            self._guard.remove()
            self._guard = None

    # -- materialising

    def _materialize(self, owner, slots: list[ParamSlot]) -> tuple[list, list]:
        """Swap theta + eps*z in for each of `slots` not already swapped; returns (saved originals, buffers)."""
        slots = [s for s in slots if id(s.param) not in self._swapped]
        if not slots:
            return [], []
        with torch.profiler.record_function("lightning_zo.perturb_block"):
            return self._swap_in(owner, slots)

    def _swap_in(self, owner, slots: list[ParamSlot]) -> tuple[list, list]:
        buffers, perturbed = self._compute(owner, slots)
        return self._swap(slots, perturbed), buffers

    def _swap(self, slots: list[ParamSlot], perturbed: dict) -> list:
        """Point each slot's parameter at its perturbed copy; returns the saved originals."""
        saved = []
        for s in slots:
            p = s.param
            original = p.data
            p.data = perturbed[id(p)].view_as(original)
            self._swapped.add(id(p))
            saved.append((p, original))
        return saved

    def _compute(self, owner, slots: list[ParamSlot]) -> tuple[list, dict]:
        """theta + eps*z of `slots` into scratch buffers (a pending update applied on the way); returns (buffers,
        the perturbed copy of each parameter by id)."""
        self.materialized += 1
        seed, coeff = self._active
        engine = self.engine
        buffers, perturbed = [], {}
        fused: dict[tuple, list[ParamSlot]] = {}
        cpu, other = [], []
        for s in slots:
            data = s.param.data
            if _fused(data):
                fused.setdefault((data.device, data.dtype), []).append(s)
            elif _cpu_fast(data):
                cpu.append(s)
            else:
                other.append(s)
        # A pending update rides on the kernels' passes below where it can; elsewhere it comes first.
        engine.flush([s for s in slots if not engine.fusable(s.param, self.distribution)])
        # theta + eps*z in fp32 (product and sum rounded separately: no FMA), one rounding to the storage dtype.
        for (device, dtype), group in fused.items():  # one flat buffer and one launch per dtype
            views = _packed(engine.pool, group, device, dtype, buffers)
            if device not in self._states:
                self._states[device] = triton_kernel.step_state([seed], [coeff], None, device)
            waiting = [s for s in group if engine.waiting(s.param)]
            rest = [s for s in group if not engine.waiting(s.param)]
            for part, fuse in ((waiting, True), (rest, False)):
                if not part:
                    continue
                update, factors, rounding = None, None, None
                if fuse:  # theta += its pending update (decay, bf16 rounding) in the same launch
                    pending = engine.pending
                    rounding = pending.rounding_seed if dtype == torch.bfloat16 else None
                    factors = [pending.decay.get(id(s.param), 1.0) for s in part]
                    update = (pending.seeds, pending.coeffs, pending.state(device, rounding))
                engine.launcher.noise_sum([views[id(s.param)] for s in part], [s.param.data.view(-1) for s in part],
                                          [s.offset for s in part], [seed], [coeff], self.distribution, factors,
                                          rounding, key=(id(owner), dtype, fuse), state=self._states[device],
                                          update=update)
                if fuse:
                    engine.take_pending(part)  # applied (a launch that raised leaves it pending)
            perturbed.update(views)
        if cpu:
            views = _packed(engine.pool, cpu, torch.device("cpu"), torch.float32, buffers)
            pieces = {id(s.param): (views[id(s.param)], s.param.data.view(-1), s.offset) for s in cpu}
            perturbed.update(views)
            waiting = [s for s in cpu if engine.waiting(s.param)]
            rest = [s for s in cpu if not engine.waiting(s.param)]
            if waiting:  # theta += the pending update, in place, and its perturbed copy: one pass
                pending = engine.pending
                engine.fill_cpu([pieces[id(s.param)] for s in waiting], [seed], [coeff], self.distribution,
                                (pending.seeds, pending.coeffs))
                engine.take_pending(waiting)
            engine.fill_cpu([pieces[id(s.param)] for s in rest], [seed], [coeff], self.distribution)
        for s in other:
            engine.other_calls += 1
            data = s.param.data
            theta = data.reshape(-1)
            buffer = add_noise(engine.pool.take(theta.numel(), theta.device), theta.float(), seed, s.offset, coeff,
                               self.distribution)
            if data.dtype != torch.float32:
                buffer, narrow = engine.pool.take(theta.numel(), theta.device, data.dtype).copy_(buffer), buffer
                engine.pool.give(narrow)
            buffers.append(buffer)
            perturbed[id(s.param)] = buffer
        self.scratch_bytes += _bytes(s.param for s in slots)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes, self.scratch_bytes)
        return buffers, perturbed

    def _restore(self, saved: list, buffers: list) -> None:
        for p, original in saved:
            self.scratch_bytes -= p.numel() * p.element_size()
            p.data = original
            self._swapped.discard(id(p))
        for b in buffers:
            self.engine.pool.give(b)

    # -- prefetching (`prefetch`)

    def _take(self, block: Block) -> tuple[list, list]:
        """Swap the block in: its prefetched copy if that covers exactly the parameters to swap now, else a fresh one
        (a copy made for other parameters, e.g. before a tied one was swapped in by another block, is dropped)."""
        ready = self._ready.pop(block, None)
        if ready is not None:
            slots = [s for s in block.params if id(s.param) not in self._swapped]
            self._wait(ready)
            if [id(s.param) for s in ready.slots] == [id(s.param) for s in slots]:
                self.prefetched += 1
                return self._swap(slots, ready.perturbed), ready.buffers
            self._drop(ready)
        return self._materialize(block, block.params)

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _prefetch(self, block: Block) -> None:
        slots = [s for s in block.params if id(s.param) not in self._swapped]
        devices = {s.param.device for s in slots}
        if not slots or len(devices) > 1:
            return
        device = devices.pop()
        side = self._side_stream(device)
        if side is not None and not all(_fused(s.param.data) for s in slots):
            return  # the torch-ops fallback gives its scratch back as it goes, unknown to the streams: run it in order
        pending = self.engine.pending
        inputs = ()
        if pending is not None:  # its seeds and coefficients uploaded on the main stream, which uses them too
            inputs = tuple(pending.state(device, rounding) for rounding in {pending.rounding_seed, None})
        with torch.profiler.record_function("lightning_zo.prefetch_block"):
            if side is None:
                self._ready[block] = Prefetched(slots, *self._compute(block, slots), device)
                return
            main = torch.cuda.current_stream(device)
            side.wait_stream(main)  # theta, the pool's buffers and the step's state are ready, as main left them
            with torch.cuda.stream(side):
                buffers, perturbed = self._compute(block, slots)
                event = torch.cuda.Event()
                event.record(side)
            for b in buffers:  # used on main too: the allocator must not reuse them before main is done
                b.record_stream(main)
            self._ready[block] = Prefetched(slots, buffers, perturbed, device, event, inputs)

    def _wait(self, ready: Prefetched) -> None:
        """The main stream waits for a prefetched copy before anything on it reads or reuses the copy."""
        if ready.event is not None:
            torch.cuda.current_stream(ready.device).wait_event(ready.event)

    def _drop(self, ready: Prefetched) -> None:
        self.scratch_bytes -= _bytes(s.param for s in ready.slots)
        for b in ready.buffers:
            self.engine.pool.give(b)

    def _release(self, block: Block) -> None:
        self._restore(block.saved, block.buffers)
        block.saved, block.buffers = [], []
        self._live.remove(block)

    # -- hooks

    def _unchecked(self):
        """The engine's own reads of the master weights (making perturbed copies) are not the forward's."""
        return contextlib.nullcontext() if self._reads is None else self._reads.paused()

    def _enter(self, block: Block, module, args) -> None:
        if self._active is None:
            return
        with self._unchecked():
            self._enter_active(block)

    def _enter_active(self, block: Block) -> None:
        if block not in self._live:
            for other in [b for b in self._live if b.depth == 0]:  # one block at a time (DESIGN I3)
                self._release(other)
            block.saved, block.buffers = self._take(block)
            self._live.append(block)
            self._order.append(block)
            if self.prefetch:
                successor = self._next.get(block)
                if successor is not None and successor not in self._live and successor not in self._ready:
                    self._prefetch(successor)
        block.depth += 1

    def _leave(self, block: Block, last: bool, module, args, output) -> None:
        if self._active is None or block not in self._live:
            return
        block.depth = max(0, block.depth - 1)
        if last and block.depth == 0:
            with self._unchecked():
                self._release(block)

    def _rows_out(self, module: torch.nn.Embedding, args, output):
        """The embedding's output recomputed from theta + eps*z at the looked-up rows only: the same bits as a lookup
        into the whole perturbed table, at the cost of the rows (the table itself may be tied to an output layer,
        whose block materialises it in full)."""
        p = module.weight
        if self._active is None or id(p) in self._swapped:  # inactive, or held perturbed by an enclosing holder
            return None
        ids = args[0] if args else None
        slot = self.layout.slot_of(p)
        if not isinstance(ids, torch.Tensor) or slot is None:
            return None
        with torch.profiler.record_function("lightning_zo.perturb_rows"), self._unchecked():
            self.materialized += 1
            dim = p.shape[1]
            flat_ids = ids.reshape(-1)
            rows = torch.unique(flat_ids)  # sorted
            if _cpu_fast(p.data) and ids.device.type == "cpu":
                pending = self.engine.pending
                from_pending = self.engine.fusable(p, self.distribution)
                if not from_pending:
                    self.engine.flush([slot])
                theta = p.data.index_select(0, rows)
                if from_pending:  # the rows of the updated table (its block, or this perturbation's end, updates it)
                    self.engine.fill_cpu_rows(theta, theta, slot.offset + rows.long() * dim, pending.seeds,
                                              pending.coeffs, pending.distribution)
                perturbed = torch.empty_like(theta)
                seed, coeff = self._active
                self.engine.fill_cpu_rows(perturbed, theta, slot.offset + rows.long() * dim, [seed], [coeff],
                                          self.distribution)
                return perturbed[torch.searchsorted(rows, flat_ids)].view(*ids.shape, dim)
            saved, buffers = self._materialize(module, [slot])  # moved off the C kernel's path: the whole table
            try:
                return torch.nn.functional.embedding(ids, p, module.padding_idx)
            finally:
                self._restore(saved, buffers)

    def _wrap_in(self, wrapper: Wrapper, module, args) -> None:
        if self._active is not None:
            with self._unchecked():
                wrapper.stack.append(self._materialize(wrapper, wrapper.params))

    def _wrap_out(self, wrapper: Wrapper, module, args, output) -> None:
        if self._active is not None and wrapper.stack:
            with self._unchecked():
                self._restore(*wrapper.stack.pop())

    # -- public

    @contextlib.contextmanager
    def perturb(self, seed: int, coeff: float) -> Iterator[None]:
        """Forwards inside see theta + coeff * z(seed); the weights are bit-identical afterwards."""
        self._active = (seed, float(np.float32(coeff)))
        # The seed and coefficient on every device the kernel runs on, uploaded here, once, not inside the forward.
        devices = {s.param.device for s in self.layout if _fused(s.param.data)}
        self._states = {d: triton_kernel.step_state([seed], [self._active[1]], None, d) for d in devices}
        try:
            if self.held:  # read outside their blocks (the coverage check): perturbed for the whole perturbation
                self._held_saved = self._materialize(self, self.held)
            yield
        finally:
            for block in list(self._live):  # the last block, or every live one after a forward that raised
                block.depth = 0
                self._release(block)
            for ready in self._ready.values():  # prefetched for a forward that did not reach them
                self._wait(ready)
                self._drop(ready)
            self._ready.clear()
            if self._order:
                self._next = dict(zip(self._order, self._order[1:]))
                self._order = []
            for wrapper in self.wrappers:
                while wrapper.stack:
                    self._restore(*wrapper.stack.pop())
            if self._held_saved is not None:
                self._restore(*self._held_saved)
                self._held_saved = None
            self._active = None
            self._states = {}
            self._swapped.clear()
            self.engine.flush()  # what this forward did not reach (or all of it, after an error)

    def evaluate(self, seed: int, coeff: float, fn):
        """`fn()` (a loss) under theta + coeff * z(seed). The first call checks that the forward reads every trainable
        parameter perturbed (core/coverage.py): a parameter read outside its block is then held perturbed for every
        whole perturbation, and `fn` runs again, checked again; one the engine cannot cover raises UserError."""
        if self.coverage is not None:
            with self.perturb(seed, coeff):
                return fn()
        found: dict[str, str] = {}
        for attempt in (1, 2):
            value, reads = self._checked(seed, coeff, fn)
            if not reads.unperturbed:  # (a view of a parameter read unperturbed is an alias too: held, it is not)
                refuse_aliases(reads.aliased)
                self.coverage = Coverage(found, _bytes(s.param for s in self.held))
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
        self.engine.flush()
        for h in self._handles + self._state_hooks:
            h.remove()
        self._handles.clear()
        self._state_hooks.clear()
        self.engine.close()

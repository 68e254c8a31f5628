"""Where the perturbed copies live: the model cut into blocks, and the scratch each block's copy is written into.

A block is a run of consecutive module subtrees (e.g. a few transformer layers) whose trainable parameters fit a
memory budget, by default the most that one module owns directly (a module's own parameters can never be split),
so a perturbed forward holds at most one block's copy at a time (DESIGN I3) and costs a few hooks and one pass per
block, not one per leaf module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend import Backend, BufferPool
from .layout import ParamLayout, ParamSpan

ALIGN = 256  # bytes


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(eq=False)
class Block:
    """Consecutive module subtrees whose parameters are materialised together (`members` get the hooks)."""

    members: list[torch.nn.Module]
    spans: list[ParamSpan]  # every trainable parameter of the members' subtrees, once
    nbytes: int
    depth: int = 0  # members' forwards in progress
    copy: tuple = ((), ())  # (saved originals, scratch buffers) while its perturbed copy is swapped in


@dataclass(eq=False)
class Wrapper:
    """A module too large to be one block: its own (directly registered) parameters, held for its whole forward."""

    module: torch.nn.Module
    spans: list[ParamSpan]
    stack: list = field(default_factory=list)  # per (re-entrant) call: (saved originals, scratch buffers)


def row_lookup(module: torch.nn.Module, layout: ParamLayout, backend: Backend) -> bool:
    """A plain nn.Embedding whose table is on the C kernel's path: its perturbed forward needs only the looked-up
    rows of theta + eps*z (an embedding is a gather, no arithmetic), not the whole table."""
    return (type(module) is torch.nn.Embedding and module.max_norm is None
            and layout.span_of(module.weight) is not None and backend.kind_of(module.weight.data) == "kernel")


def plan_blocks(model: torch.nn.Module, layout: ParamLayout, backend: Backend, budget: int | None = None,
                rows: bool = True) -> tuple[list[Block], list[Wrapper], list[torch.nn.Embedding], int]:
    """Cut the module tree into blocks of at most `budget` bytes of trainable parameters (default: the most that one
    module owns directly, which can never be split, so the bound of DESIGN I3 does not grow).

    Walking the tree in module order, a subtree that fits is a unit (if it has a forward of its own: a ModuleList's
    hooks never run); one that does not is split into its children, and its own parameters (if any) become a
    `Wrapper`. Consecutive units are packed into blocks greedily, never across a wrapper's boundary (a block then
    never outlives the wrapper that may hold some of its parameters). Embeddings perturbed by rows (where `rows`)
    are no block.
    Returns (blocks, wrappers, row embeddings, budget).
    """
    def trainable(params):
        return [s for p in params if (s := layout.span_of(p)) is not None]

    own = {m: trainable(m.parameters(recurse=False)) for m in model.modules()}
    largest_own = max((nbytes(s.param for s in spans) for spans in own.values()), default=0)
    budget = largest_own if budget is None else int(budget)
    units: list[tuple[torch.nn.Module, list[ParamSpan]] | None] = []  # None: a wrapper's boundary
    wrappers: list[Wrapper] = []
    row_modules: list[torch.nn.Embedding] = []

    def visit(module: torch.nn.Module) -> None:
        spans = trainable(module.parameters())
        if not spans:
            return
        if rows and row_lookup(module, layout, backend):
            row_modules.append(module)  # perturbed row by row in its forward hook: no block
            return
        children = [c for c in module.children() if trainable(c.parameters())]
        callable_ = type(module).forward is not torch.nn.Module.forward  # ModuleList, ModuleDict: never called
        if (nbytes(s.param for s in spans) <= budget and callable_) or not children:
            units.append((module, spans))
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
    params: dict[int, ParamSpan] = {}

    def close_block():
        if members:
            blocks.append(Block(list(members), list(params.values()), nbytes(s.param for s in params.values())))
        members.clear()
        params.clear()

    for unit in units:
        if unit is None:
            close_block()
            continue
        module, spans = unit
        if members and nbytes(s.param for s in {**params, **{id(s.param): s for s in spans}}.values()) > budget:
            close_block()
        members.append(module)
        params.update({id(s.param): s for s in spans})
    close_block()
    return blocks, wrappers, row_modules, budget


def packed(pool: BufferPool, spans: list[ParamSpan], buffers: list) -> dict[int, torch.Tensor]:
    """Flat scratch for `spans`' perturbed copies: one buffer per device and dtype (appended to `buffers`), cut into
    a view per parameter (by id). Each view starts a multiple of ALIGN bytes into its buffer, as a fresh allocation
    would: the forward's kernels then take the perturbed copy as they take the weights (PyTorch hands cuBLASLt the
    pointers' alignment, up to 256 bytes, to choose its algorithm, so a misaligned copy may get another algorithm,
    other bits, and narrower loads)."""
    kinds: dict[tuple, list[ParamSpan]] = {}
    for s in spans:
        kinds.setdefault((s.param.device, s.param.dtype), []).append(s)
    views = {}
    for (device, dtype), group in kinds.items():
        step = ALIGN // dtype.itemsize
        sizes = [-(-s.param.numel() // step) * step for s in group]  # each rounded up to whole ALIGNs
        flat = pool.take(sum(sizes), device, dtype)
        buffers.append(flat)
        at = 0
        for s, size in zip(group, sizes):
            views[id(s.param)] = flat[at:at + s.param.numel()]
            at += size
    return views

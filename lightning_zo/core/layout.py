"""The flat parameter space the generator indexes, and the weights' digest every check compares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpan:
    """A trainable parameter's span of the flat space: elements offset .. offset + numel - 1."""

    name: str
    param: torch.nn.Parameter
    offset: int  # start of this parameter in the flat trainable-parameter space


class ParamLayout:
    """The flat order of trainable parameters: `named_parameters()` order, tied weights counted once."""

    def __init__(self, module: torch.nn.Module):
        spans, offset = [], 0
        for name, p in module.named_parameters():  # named_parameters() already skips tied duplicates
            if p.requires_grad:
                spans.append(ParamSpan(name, p, offset))
                offset += p.numel()
        self.spans: list[ParamSpan] = spans
        self.numel = offset
        self._by_id = {id(s.param): s for s in spans}

    def span_of(self, param: torch.nn.Parameter) -> ParamSpan | None:
        return self._by_id.get(id(param))

    def __iter__(self):
        return iter(self.spans)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every trainable parameter's bytes, in named_parameters() order (tied weights once)."""
    model.state_dict(keep_vars=True)  # its pre-hooks apply an update still pending (ZOOptimizer's fuse_update)
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        if p.requires_grad:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""ZOOptimizer: the seeded two-forward SPSA step (DESIGN §1), as a torch Optimizer for Lightning.

`step(loss_fn=...)` perturbs, evaluates, encodes, exchanges, decodes and updates. The exchange is an attribute the
strategy sets (one int8 all_reduce); alone it is the identity, so the optimizer also runs without ZOStrategy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .codecs import Codec, LinearCodec, is_stop
from .engine import PerturbedForward, apply_update
from .layout import ParamLayout
from .noise import DISTRIBUTIONS
from .philox import derive_seed

NORMS = ("mean", "sqrt")
ROUNDING_STREAM = 1  # derive_seed stream for stochastic rounding of low-precision weights


@dataclass
class StepRecord:
    """What one step did: enough, with the run seed, to replay it (DESIGN I4)."""

    step: int
    world_size: int
    k: int
    lr: float
    codes: list  # the whole exchanged payload, slot order
    local_losses: list = field(default_factory=list)  # (loss+, loss-) per own slot
    local_grads: list = field(default_factory=list)
    stop: bool = False


def no_decay(name: str) -> bool:
    """MeZO's rule: no weight decay on biases and normalisation weights."""
    lowered = name.lower()
    return lowered.endswith("bias") or "norm" in lowered or "ln_" in lowered


def validate_hparams(lr=1e-5, eps=1e-3, k=1, distribution="rademacher", norm="mean", weight_decay=0.0, **_):
    """Raise ValueError for hyperparameters the step cannot use (called early by the CLI, and by __init__)."""
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if lr < 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if int(k) != k or k < 1:
        raise ValueError(f"k (perturbations per rank per step) must be a positive integer, got {k!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class ZOOptimizer(torch.optim.Optimizer):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 k: int = 1, distribution: str = "rademacher", norm: str = "mean", seed: int = 0,
                 codec: Optional[Codec] = None):
        validate_hparams(lr, eps, k, distribution, norm, weight_decay)
        layout = ParamLayout(model)
        if layout.numel == 0:
            raise ValueError("the model has no trainable parameters")
        decayed = [s.param for s in layout if not no_decay(s.name)]
        plain = [s.param for s in layout if no_decay(s.name)]
        groups = [g for g in ({"params": decayed, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}) if g["params"]]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self.layout = layout
        if any(s.param.dtype == torch.float16 for s in layout):
            warnings.warn("float16 weights are updated with round-to-nearest: updates below half an ulp vanish. "
                          "Use bf16-true (stochastic rounding from the shared generator) or 32-true.", stacklevel=2)
        self.eps, self.k, self.distribution, self.norm = float(eps), int(k), distribution, norm
        self.seed = int(seed)
        self.codec = codec if codec is not None else LinearCodec()
        self.forward_hooks = PerturbedForward(model, layout, distribution)
        self.rank, self.world_size = 0, 1
        self.exchange: Callable[[torch.Tensor], torch.Tensor] = lambda payload: payload
        self.step_count = 0
        self.last_record: Optional[StepRecord] = None
        self.weight_decay = float(weight_decay)

    def describe(self) -> dict:
        """Everything besides the base weights and the per-step records that replay needs."""
        return {"generator": "philox4x32-10", "distribution": self.distribution, "norm": self.norm, "eps": self.eps,
                "seed": self.seed, "weight_decay": self.weight_decay, "codec": self.codec.config(),
                "payload_dtype": str(self.codec.dtype).replace("torch.", ""), "numel": self.layout.numel,
                "param_dtype": str(self.layout.slots[0].param.dtype).replace("torch.", "")}

    def attach(self, rank: int, world_size: int, exchange: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called by the strategy: who we are and how codes travel."""
        self.rank, self.world_size, self.exchange = rank, world_size, exchange

    def slot_seed(self, step: int, slot: int) -> int:
        return derive_seed(self.seed, step, slot)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, loss_fn: Optional[Callable[[int], torch.Tensor]] = None):
        """One ZO step. `loss_fn(j)` returns the loss of micro-batch j under the current (perturbed) weights.

        `closure` (Lightning's hook closure) runs once, after the exchange and before the update.
        """
        if loss_fn is None:
            raise TypeError("ZOOptimizer.step needs loss_fn=callable(j) -> loss of micro-batch j")
        t, lr = self.step_count, float(self.param_groups[0]["lr"])
        codec = self.codec
        payload = torch.zeros(self.world_size * self.k, dtype=codec.dtype)
        losses, grads = [], []
        for j in range(self.k):
            slot = self.rank * self.k + j
            seed = self.slot_seed(t, slot)
            with self.forward_hooks.perturb(seed, self.eps):
                loss_plus = float(loss_fn(j))
            with self.forward_hooks.perturb(seed, -self.eps):
                loss_minus = float(loss_fn(j))
            g = (loss_plus - loss_minus) / (2 * self.eps)
            losses.append((loss_plus, loss_minus))
            grads.append(g)
            if math.isfinite(g):
                payload[slot] = codec.encode(g, t, slot)
            else:
                payload[slot] = codec.skip
                warnings.warn(f"step {t}: non-finite loss on rank {self.rank} slot {slot} "
                              f"(loss+={loss_plus}, loss-={loss_minus}); this slot contributes no update",
                              RuntimeWarning, stacklevel=2)
        payload = self.exchange(payload)
        if closure is not None:
            closure()
        codes = payload.tolist()
        record = StepRecord(step=t, world_size=self.world_size, k=self.k, lr=lr, codes=codes,
                            local_losses=losses, local_grads=grads, stop=any(is_stop(codec, c) for c in codes))
        self.apply(record)
        self.last_record = record
        return torch.tensor(sum(a + b for a, b in losses) / (2 * len(losses)))

    def apply(self, record: StepRecord) -> None:
        """Decode a step's codes and update the weights; advances the codec and the step counter. Used by replay."""
        codec, n_slots = self.codec, len(record.codes)
        scale = n_slots if self.norm == "mean" else math.sqrt(n_slots)
        seeds, coeffs = [], []
        for slot, code in enumerate(record.codes):
            if codec.is_estimate(code):
                seeds.append(self.slot_seed(record.step, slot))
                coeffs.append(-record.lr * codec.decode(code) / scale)
        codec.advance(record.codes)
        decay = {}
        for group in self.param_groups:
            if group["weight_decay"] > 0 and record.lr > 0:
                factor = 1.0 - record.lr * group["weight_decay"]
                decay.update({id(p): factor for p in group["params"]})
        apply_update(self.layout, seeds, coeffs, self.distribution, decay,
                     rounding_seed=derive_seed(self.seed, record.step, 0, ROUNDING_STREAM),
                     engine=self.forward_hooks.engine)
        self.step_count = record.step + 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zo"] = {"step_count": self.step_count, "codec": self.codec.state_dict(), "seed": self.seed}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.step_count = zo["step_count"]
            self.codec.load_state_dict(zo["codec"])

"""Update rules: how a step's aggregated estimates move the weights, given the steps before it (issue 15).

Every rank holds every step's decoded codes, so any rule that is a deterministic function of the seeds and the
decoded codes keeps the replicas bit-identical and replay exact, on the same one byte per rank per step. A rule
sees, per applied step, the aggregation's estimates [(seed, value)] and their divisor (norm(N*k) or norm(k)) and
returns the (seed, coefficient) terms of this step's update. Its state is rebuilt by applying the
log's records in order (replay, resume), and travels in the optimizer's state_dict (Lightning checkpoints).
All arithmetic is Python floats (IEEE float64) in a fixed order; the backend rounds each coefficient once.

    sgd         theta -= lr * sum c z: the paper's rule. No state, no extra cost.
    momentum    heavy ball over a window: theta -= lr * sum_{h<H} beta^h * (step t-h's sum c z), regenerating the
                last H steps' directions from their seeds instead of keeping a momentum buffer (no extra weight
                memory; H x the update's noise generation, fused in one pass over the weights). With beta = 0.9 a
                long-run step is up to 1/(1-beta) times the sgd step. Past estimates are scaled by the current
                step's lr (under a scheduler, not the lr they were made with).
    normalized  theta -= lr * sum (c / s_t) z, s_t the root of a bias-corrected running mean (beta2) of the
                squared estimates of every step so far (FZOO/Adam-like, one scalar of state): with one estimate
                per step lr is the length of a typical step along its direction, whatever the loss's scale
                (with n = N*k they share it as in sgd, lr / norm(n) each); one outlying estimate moves at most
                sqrt(n / (1 - beta2)) / norm(n) * lr, 10 typical steps for n = 1. No extra cost.
    adam        normalized estimates, then momentum over the window: both of the above.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

RULES = ("sgd", "momentum", "normalized", "adam")


def validate(rule: str = "sgd", beta: float = 0.9, history: int = 8, beta2: float = 0.99) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta (momentum) must be in [0, 1), got {beta!r}")
    if int(history) != history or history < 1:
        raise ValueError(f"history (steps of momentum) must be a positive integer, got {history!r}")
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")


@dataclass
class UpdateRule:
    name: str = "sgd"
    beta: float = 0.9  # momentum, adam: weight of the step before
    history: int = 8  # momentum, adam: steps whose directions each update regenerates (window H)
    beta2: float = 0.99  # normalized, adam: running mean of the squared estimates
    window: deque = field(default_factory=deque, repr=False)  # newest first: [(seed, c)] per applied step
    second_moment: float = 0.0
    steps: int = 0  # estimates seen by the running mean (bias correction)

    def __post_init__(self):
        validate(self.name, self.beta, self.history, self.beta2)
        self.beta, self.beta2, self.history = float(self.beta), float(self.beta2), int(self.history)

    @property
    def momentum(self) -> bool:
        return self.name in ("momentum", "adam")

    @property
    def normalizes(self) -> bool:
        return self.name in ("normalized", "adam")

    def config(self) -> dict:
        """For the trajectory header; only the keys the rule uses."""
        out: dict = {"name": self.name}
        if self.momentum:
            out |= {"beta": self.beta, "history": self.history}
        if self.normalizes:
            out["beta2"] = self.beta2
        return out

    @classmethod
    def from_config(cls, config: dict | None) -> "UpdateRule":
        """From a header; logs written before rules existed used sgd."""
        return cls(**(config or {"name": "sgd"}))

    def terms(self, estimates: list[tuple[int, float]], scale: float, lr: float) -> list[tuple[int, float]]:
        """This step's (seed, coefficient) terms from its (seed, estimate) pairs (the aggregation's, each to be
        divided by `scale`); advances the rule's state."""
        if self.name == "sgd":  # the expression of logs written before rules existed, bit for bit
            return [(seed, -lr * value / scale) for seed, value in estimates]
        unit = [(seed, value / scale) for seed, value in estimates]
        if self.normalizes:
            if estimates:
                self.steps += 1
                mean_square = sum(value * value for _, value in estimates) / len(estimates)
                self.second_moment = self.beta2 * self.second_moment + (1.0 - self.beta2) * mean_square
            spread = math.sqrt(self.second_moment / (1.0 - self.beta2 ** self.steps)) if self.steps else 0.0
            unit = [(seed, c / spread) for seed, c in unit] if spread > 0 else []
        if not self.momentum:
            return [(seed, -lr * c) for seed, c in unit]
        self.window.appendleft(unit)
        while len(self.window) > self.history:
            self.window.pop()
        out, weight = [], 1.0
        for past in self.window:
            out += [(seed, -lr * weight * c) for seed, c in past]
            weight *= self.beta
        return out

    def state_dict(self) -> dict:
        return {"window": [list(map(list, step)) for step in self.window], "second_moment": self.second_moment,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque([[(int(seed), float(c)) for seed, c in step] for step in state["window"]])
        self.second_moment, self.steps = float(state["second_moment"]), int(state["steps"])

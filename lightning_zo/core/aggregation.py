"""Aggregation: how a step's N*k decoded estimates become the update's terms (DESIGN §1 step 6, I7).

Every rank (and replay) calls `Aggregation.terms` on the same code vector, so the update is identical everywhere.
Each term is (direction, coefficient): theta <- theta + sum coefficient * z(direction), in the order returned.
All arithmetic is plain Python on floats (IEEE float64), sorting is by (value, slot), so ties never depend on the
platform; the backend then rounds each coefficient once to float32, as before.

    mean          sum_i g_i z_i / norm(N*k) over the N*k slots' own directions: the paper's rule (norm: N*k, or
                  sqrt(N*k)); skipped slots count. Not robust: one rank's +126 moves the weights 126 codes' worth.
The robust rules need every rank to estimate the same quantity, so they share directions (FeedSign-style): slot
r*k+j perturbs along direction j (seed stream VOTE_STREAM), every rank on its own batch, and direction j moves by
-lr * a_j / norm(k), where a_j combines the N ranks' estimates of direction j:
    trimmed_mean  sort them by value, drop t = ceil(trim * n) from each end (at most (n-1)//2, so one remains),
                  a_j = the mean of the rest
    median        a_j = the median (the trimmed mean with the most trimmed: the mean of the middle two for an
                  even count)
    sign_vote     a_j = the majority of the signs (+1, -1, or 0 on a tie): magnitudes are ignored, lr is the step
                  length per direction, as in FeedSign
With honest ranks in the majority, a_j stays within the honest estimates (trimmed_mean with trim >= the dishonest
fraction, median, sign_vote), whatever the others send. Only `mean` is the update of logs written before
aggregation existed (the same expression, bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .codecs import Codec
from .philox import DIRECTION_STREAM, VOTE_STREAM

AGGREGATIONS = ("mean", "trimmed_mean", "median", "sign_vote")


def validate(aggregation: str = "mean", trim: float = 0.25) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")


def _norm(n: int, norm: str) -> float:
    return n if norm == "mean" else math.sqrt(n)


@dataclass(frozen=True)
class Aggregation:
    name: str = "mean"
    trim: float = 0.25  # trimmed_mean only: the fraction dropped from each end

    def __post_init__(self):
        validate(self.name, self.trim)

    @property
    def shared_directions(self) -> bool:
        """Whether all ranks perturb along the same k directions (the seed of slot r*k+j is direction j's)."""
        return self.name != "mean"

    def direction(self, slot: int, k: int) -> int:
        """The direction (seed index) slot r*k+j perturbs along: the slot itself, or j when directions are shared."""
        return slot % k if self.shared_directions else slot

    @property
    def seed_stream(self) -> int:
        return VOTE_STREAM if self.shared_directions else DIRECTION_STREAM

    def config(self) -> dict:
        """For the trajectory header (what replay needs); `trim` only where it matters."""
        return {"name": self.name, **({"trim": self.trim} if self.name == "trimmed_mean" else {})}

    @classmethod
    def from_config(cls, config: dict | None) -> "Aggregation":
        """From a header; logs written before aggregation existed used the mean."""
        return cls(**{"trim": 0.25, **(config or {"name": "mean"})})

    def estimates(self, codec: Codec, codes: list, k: int) -> list[tuple[int, float]]:
        """(direction, value) per moving direction: each valid slot's estimate (mean), or each direction's
        combined estimate a_j (the robust rules; a direction with a_j = 0 does not move)."""
        valid = [(codec.decode(c), slot) for slot, c in enumerate(codes) if codec.is_estimate(c)]
        if self.name == "mean":
            return [(slot, g) for g, slot in valid]
        combined = [(j, self.combine(sorted(pair for pair in valid if pair[1] % k == j))) for j in range(k)]
        return [(j, a) for j, a in combined if a]

    def scale(self, n_slots: int, k: int, norm: str) -> float:
        """What each estimate is divided by: norm(N*k) over all slots (mean), norm(k) over the shared directions."""
        return _norm(n_slots if self.name == "mean" else k, norm)

    def terms(self, codec: Codec, codes: list, k: int, lr: float, norm: str) -> list[tuple[int, float]]:
        """(direction, coefficient) pairs for one step's code vector (slot order), lr already applied."""
        scale = self.scale(len(codes), k, norm)
        return [(d, -lr * value / scale) for d, value in self.estimates(codec, codes, k)]

    def combine(self, ranked: list[tuple[float, int]]) -> float:
        """One direction's estimates, sorted by (value, slot), combined into one value (0.0: no move)."""
        n = len(ranked)
        if n == 0:
            return 0.0
        if self.name == "sign_vote":
            vote = sum((g > 0) - (g < 0) for g, _ in ranked)
            return float((vote > 0) - (vote < 0))
        cut = (n - 1) // 2 if self.name == "median" else min(math.ceil(round(self.trim * n, 9)), (n - 1) // 2)
        kept = [g for g, _ in ranked[cut:n - cut]]
        return sum(kept) / len(kept)

"""Population normalisation: a step's decoded estimates, normalised as a population before the update rule (issue 44).

Evolution strategies (Salimans et al. 2017, Qiu et al. 2025) and FZOO do not step along the raw estimates but along
their z-scores or centred ranks within the step: the step's length no longer depends on the loss's scale, one
outlying batch moves the weights no more than any other estimate, and subtracting the step's mean removes what all
directions share (with one-sided estimates, the curvature term eps/2 z'Hz and the baseline's own noise). Every rank
holds every step's codes, so it is computed on every rank (and in replay) from the decoded values, in slot order,
in Python floats (IEEE float64), like rules.py: the result is identical everywhere.

    none    the estimates as decoded (the paper's update, and that of every log without the key)
    zscore  (v - mean) / std over the step's valid estimates (std with 1/n); all equal: no move
    rank    centred ranks: rank / (n - 1) - 1/2 in [-1/2, 1/2], equal values sharing their mean rank (int8 codes tie
            often); magnitudes are ignored, so the step is bounded whatever any rank sends

A population needs at least two estimates (a step with fewer valid ones does not move). It normalises the N*k
estimates of distinct directions, so it composes with `aggregation=mean` only: the robust aggregations combine the
ranks' estimates of shared directions, and normalising with a mean and spread that one rank's outlier shifts would
undo what they guarantee (DESIGN I7).
"""

from __future__ import annotations

import math

POPULATIONS = ("none", "zscore", "rank")


def validate(population: str = "none", aggregation: str = "mean", slots: int | None = None) -> None:
    """`slots`: a step's estimates (world size * k), where known."""
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}; choose one of {', '.join(POPULATIONS)}")
    if population != "none" and aggregation != "mean":
        raise ValueError(f"population={population} normalises the step's estimates of distinct directions and needs "
                         f"aggregation=mean, not {aggregation} (which combines the ranks' estimates of shared "
                         "directions)")
    if population != "none" and slots is not None and slots < 2:
        raise ValueError(f"population={population} normalises a step's {slots} estimate(s): it needs at least two "
                         "(optimizer.k >= 2, or more ranks)")


def normalise(population: str, estimates: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (direction, value) pairs with their values normalised over the step (slot order kept)."""
    if population == "none":
        return estimates
    values = [value for _, value in estimates]
    n = len(values)
    if n < 2:
        return []
    if population == "zscore":
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) * (v - mean) for v in values) / n)
        return [(d, (v - mean) / std) for d, v in estimates] if std > 0 else []
    return [(d, r) for (d, _), r in zip(estimates, centred_ranks(values))]


def centred_ranks(values: list[float]) -> list[float]:
    """rank / (n - 1) - 1/2 per value (n >= 2), ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return [r / (len(values) - 1) - 0.5 for r in ranks]

"""Aggregation of a step's decoded estimates: the mean as before, bit for bit; robust rules bound one slot."""

import math
import random

import pytest

from lightning_zo.core.aggregation import AGGREGATIONS, Aggregation
from lightning_zo.core.codecs import QMAX, SKIP, STOP, LinearCodec, SignCodec


def _old_mean(codec, codes, lr, norm):
    """The update ZOOptimizer.apply computed before aggregation existed (what old logs replay with)."""
    scale = len(codes) if norm == "mean" else math.sqrt(len(codes))
    return [(slot, -lr * codec.decode(c) / scale) for slot, c in enumerate(codes) if codec.is_estimate(c)]


@pytest.mark.parametrize("norm", ["mean", "sqrt"])
def test_mean_is_the_old_update_bit_for_bit(norm):
    rng = random.Random(0)
    codec = LinearCodec(init_scale=0.0371)
    for _ in range(200):
        codes = [rng.choice([SKIP, STOP, rng.randint(-QMAX, QMAX)]) for _ in range(rng.randint(1, 9))]
        assert Aggregation("mean").terms(codec, codes, 1, 3.3e-4, norm) == _old_mean(codec, codes, 3.3e-4, norm)


def _identity_codec():
    codec = SignCodec(1.0)
    codec.max_code = QMAX  # decode(c) == c: easy to read
    return codec


def test_trimmed_mean_and_median_combine_the_ranks_estimates_of_one_shared_direction():
    codec = _identity_codec()
    codes = [3, -2, QMAX, 5, SKIP]  # k = 1: five ranks' estimates of direction 0, one skipped
    trimmed = Aggregation("trimmed_mean", trim=0.25).terms(codec, codes, 1, 1.0, "mean")
    assert trimmed == [(0, -(3 + 5) / 2)]  # 4 valid, ceil(0.25 * 4) = 1 cut from each end: -2 and 126
    assert Aggregation("median").terms(codec, codes, 1, 1.0, "mean") == [(0, -4.0)]  # median of -2, 3, 5, 126
    three = [4, QMAX, -1]
    assert Aggregation("trimmed_mean", trim=0.1).terms(codec, three, 1, 1.0, "mean") == [(0, -4.0)]
    assert Aggregation("trimmed_mean", trim=0.0).terms(codec, three, 1, 1.0, "mean") == [(0, -(4 + QMAX - 1) / 3)]
    assert Aggregation("median").terms(codec, [SKIP, STOP], 1, 1.0, "mean") == []
    # k = 2, 3 ranks: slot r*2 + j; direction 0 gets 1, 7, QMAX; direction 1 gets -4, -6, QMAX
    assert Aggregation("median").terms(codec, [1, -4, 7, -6, QMAX, QMAX], 2, 0.5, "sqrt") == \
        [(0, -0.5 * 7 / 2 ** 0.5), (1, -0.5 * -4 / 2 ** 0.5)]


def test_sign_vote_takes_the_majority_per_shared_direction():
    agg = Aggregation("sign_vote")
    codec = LinearCodec()
    # 3 ranks, k = 2: slot r*2 + j. Direction 0: +, +, - (one rank sends -126: still one vote); direction 1: -, -, +
    codes = [5, -3, 7, -1, -QMAX, 2]
    assert agg.terms(codec, codes, 2, 0.01, "mean") == [(0, -0.01 / 2), (1, 0.01 / 2)]
    assert agg.terms(codec, [1, -1], 1, 0.01, "mean") == []  # a tie moves nothing


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_directions_are_shared_exactly_by_the_robust_rules(name):
    agg = Aggregation(name)
    directions = [agg.direction(slot, 2) for slot in range(6)]
    assert directions == ([0, 1, 2, 3, 4, 5] if name == "mean" else [0, 1, 0, 1, 0, 1])
    assert agg.seed_stream == (0 if name == "mean" else 3)  # mean: the seeds logs were always written with


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_terms_are_identical_for_every_rank_and_one_rank_stays_bounded(name):
    """Same code vector -> the same terms (every rank, replay); with honest ranks in the majority a rank at +126
    cannot move a shared direction beyond the honest estimates."""
    rng = random.Random(3)
    agg = Aggregation.from_config(Aggregation(name).config())
    assert agg == Aggregation(name)
    for _ in range(50):
        honest = [rng.randint(-20, 20) for _ in range(6)]
        for codes in (honest + [QMAX], [QMAX] + honest):
            terms = agg.terms(LinearCodec(), codes, 1, 1e-3, "mean")
            assert terms == agg.terms(LinearCodec(), list(codes), 1, 1e-3, "mean")
            bound = {"mean": 1e-3 * QMAX * 0.05 / 7, "sign_vote": 1e-3}.get(name, 1e-3 * 20 * 0.05)
            assert all(abs(c) <= bound + 1e-15 for _, c in terms)
            if name in ("trimmed_mean", "median") and terms:
                assert min(honest) * 0.05 * -1e-3 >= terms[0][1] >= max(honest) * 0.05 * -1e-3


def test_old_headers_and_bad_settings():
    assert Aggregation.from_config(None) == Aggregation("mean")
    with pytest.raises(ValueError, match="unknown aggregation"):
        Aggregation("mode")
    with pytest.raises(ValueError, match="trim"):
        Aggregation("trimmed_mean", trim=0.5)

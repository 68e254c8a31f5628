"""Codecs: round trips, reserved codes, and a shared state every rank derives identically."""

import math
import random

import pytest
import torch

from lightning_zo.core.codecs import (QMAX, SKIP, STOP, ExchangeError, LinearCodec, LogCodec, NoneCodec, SignCodec,
                                      check_received, codec_from_config, is_stop)
from lightning_zo.core.update import apply_update
from lightning_zo.core.layout import ParamLayout

VALUES = [0.0, 1e-9, -3e-4, 0.02, -0.7, 1.0, 5.5, -42.0, 1e3, -1e6]


def test_linear_round_trip_within_half_a_step():
    codec = LinearCodec(init_scale=0.5, stochastic_rounding=False)
    for g in [x for x in VALUES if abs(x) <= QMAX * 0.5]:
        assert abs(codec.decode(codec.encode(g, 0, 0)) - g) <= 0.25 + 1e-12
    assert codec.encode(1e6, 0, 0) == QMAX and codec.encode(-1e6, 0, 0) == -QMAX  # clipped, never reserved


def test_linear_stochastic_rounding_is_unbiased():
    codec = LinearCodec(init_scale=1.0)
    g = 0.3
    decoded = [codec.decode(codec.encode(g, step, slot)) for step in range(200) for slot in range(20)]
    assert set(decoded) == {0.0, 1.0}
    assert abs(sum(decoded) / len(decoded) - g) < 0.03
    assert codec.encode(g, 5, 3) == codec.encode(g, 5, 3)  # drawn from the shared generator: reproducible


def test_log_code_relative_error_and_sign():
    codec = LogCodec(min_exp=-20)
    for g in VALUES[1:]:
        q = codec.encode(g, 0, 0)
        assert -QMAX <= q <= QMAX and q not in (SKIP, STOP)
        if abs(g) >= 2.0 ** -20 and abs(g) <= 2.0 ** (-20 + 125 / 4):
            assert math.copysign(1, codec.decode(q)) == math.copysign(1, g)
            assert abs(codec.decode(q) / g - 1) <= 2 ** (1 / 8) - 1 + 1e-12
    assert codec.encode(1e-9, 0, 0) == 0 and codec.decode(0) == 0.0


def test_sign_and_none():
    assert [SignCodec(0.5).decode(SignCodec().encode(g, 0, 0)) for g in (-2.0, 0.0, 3.0)] == [-0.5, 0.0, 0.5]
    none = NoneCodec()
    assert none.decode(none.encode(-0.123, 0, 0)) == -0.123 and none.bytes_per_slot == 4
    assert not none.is_estimate(float("nan")) and is_stop(none, -math.inf)


def test_shared_scale_is_identical_on_every_rank_and_on_replay():
    rng = random.Random(0)
    ranks = [LinearCodec() for _ in range(3)]
    for step in range(300):
        grads = [rng.gauss(0, 10) * (100 if step == 50 else 1) for _ in range(4)]
        codes = [ranks[0].encode(g, step, slot) for slot, g in enumerate(grads)] + [SKIP, STOP]
        decoded = [[c.decode(q) for q in codes if c.is_estimate(q)] for c in ranks]
        assert decoded[0] == decoded[1] == decoded[2]
        for c in ranks:
            c.advance(codes)
    assert ranks[0].state_dict() == ranks[1].state_dict() == ranks[2].state_dict()
    assert 0.1 < ranks[0].scale < 10  # adapted to |g| ~ 10 (target: typical |q| = 16)
    rebuilt = codec_from_config(ranks[0].config())
    assert rebuilt.state_dict() != ranks[0].state_dict()  # starts from the initial state...
    rebuilt.load_state_dict(ranks[0].state_dict())
    assert rebuilt.state_dict() == ranks[0].state_dict()  # ...and a checkpoint restores it


def test_a_saturated_majority_grows_the_scale_by_at_most_max_growth_per_step():
    codec = LinearCodec(init_scale=0.01)
    codec.advance([QMAX, QMAX, 3])
    assert codec.scale == 0.02  # 126 * 0.01 / 16 would be 0.079: bounded to max_growth = 2
    for _ in range(5):
        codec.advance([QMAX, QMAX, 3])
    assert codec.scale == 0.01 * 2 ** 6 and codec.encode(0.5, 0, 0) < QMAX  # doubling until it fits
    lone, none = LinearCodec(init_scale=0.01), LinearCodec(init_scale=0.01)
    for _ in range(20):
        lone.advance([QMAX, 3, 2])  # one saturated slot of three: the lower median (3) decides
        none.advance([5, 3, 2])
    assert lone.state_dict() == none.state_dict()


def _honest_and_attacker(codec, steps, n_honest, attack, seed=0):
    rng = random.Random(seed)
    for step in range(steps):
        codes = [codec.encode(rng.gauss(0, 2.0), step, slot) for slot in range(n_honest)]
        codec.advance(codes + ([attack] if attack is not None else []))
    return codec.scale


@pytest.mark.parametrize("n_honest", [1, 2])
def test_one_rank_sending_126_every_step_cannot_drive_the_scale(n_honest):
    honest = _honest_and_attacker(LinearCodec(), 200, n_honest, None)
    attacked = _honest_and_attacker(LinearCodec(), 200, n_honest, QMAX)
    assert honest / 4 < attacked < honest * 4, (honest, attacked)  # still set by the honest slots
    legacy = _honest_and_attacker(LinearCodec(rule="ema"), 39, n_honest, QMAX)
    assert legacy > 1e9  # the old rule: the scale doubled every step (the 6.3e10 by step 39)


def test_the_scale_stays_in_its_range_whatever_the_codes():
    rng = random.Random(1)
    codec = LinearCodec(init_scale=0.05, max_growth=2.0, scale_range=2.0 ** 10)
    previous = codec.scale
    for _ in range(3000):
        codec.advance([rng.choice([QMAX, -QMAX, 0, 1, SKIP, STOP]) for _ in range(rng.randint(1, 5))])
        assert previous / 2 <= codec.scale <= previous * 2
        assert 0.05 / 2 ** 10 <= codec.scale <= 0.05 * 2 ** 10
        previous = codec.scale


def test_headers_written_before_the_robust_rule_rebuild_the_old_rule():
    old = {"_target_": "lightning_zo.codecs.LinearCodec", "init_scale": 0.05, "target": 16.0, "beta": 0.9,
           "stochastic_rounding": True}
    assert codec_from_config(old).rule == "ema"
    assert codec_from_config(LinearCodec().config()).rule == "robust"
    assert codec_from_config(LinearCodec().config()).config() == LinearCodec().config()


@pytest.mark.parametrize("codec,bad", [(LinearCodec(), 127), (LogCodec(), 127), (SignCodec(), 2), (SignCodec(), -126),
                                       (NoneCodec(), math.inf)])
def test_a_sum_outside_the_codec_range_is_an_error_naming_step_and_slot(codec, bad):
    check_received(codec, [codec.encode(0.5, 0, 0), codec.skip, codec.stop], step=7)
    with pytest.raises(ExchangeError, match="step 7: slot 1 holds code"):
        check_received(codec, [codec.encode(0.5, 0, 0), bad], step=7)


def test_a_forged_own_slot_is_an_error_not_a_stop():
    sent = torch.tensor([0, 21, 0], dtype=torch.int8)
    check_received(LinearCodec(), sent.clone(), step=4, sent=sent, own=slice(1, 2))
    forged = torch.tensor([0, STOP, 0], dtype=torch.int8)  # e.g. 21 + 108 wraps to -127: must not read as STOP
    with pytest.raises(ExchangeError, match="step 4: slot 1 .this rank's own. came back as -127, but this rank sent 21"):
        check_received(LinearCodec(), forged, step=4, sent=sent, own=slice(1, 2))
    wrapped = (sent.to(torch.int32) + torch.tensor([0, -128, 0])).to(torch.int8)  # int8 sum wraps: 21 - 128
    assert wrapped.tolist() == [0, -107, 0]
    with pytest.raises(ExchangeError, match="slot 1"):
        check_received(LinearCodec(), wrapped, step=4, sent=sent, own=slice(1, 2))
    nan = torch.tensor([math.nan, 1.0])
    check_received(NoneCodec(), nan.clone(), step=0, sent=nan, own=slice(0, 1))  # a SKIP comes back as a SKIP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_cuda_update_is_bit_identical_to_cpu(distribution):
    torch.manual_seed(0)
    cpu = torch.nn.Linear(1000, 999)
    gpu = torch.nn.Linear(1000, 999).cuda()
    gpu.load_state_dict(cpu.state_dict())
    seeds, coeffs = [11, 12, 13], [1e-3, -2e-3, 5e-4]
    apply_update(ParamLayout(cpu), seeds, coeffs, distribution)
    apply_update(ParamLayout(gpu), seeds, coeffs, distribution)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(a, b.cpu())

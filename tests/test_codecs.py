"""Codecs: round trips, reserved codes, and a shared state every rank derives identically."""

import math
import random

import pytest
import torch

from lightning_zo.core.codecs import (QMAX, SKIP, STOP, LinearCodec, LogCodec, NoneCodec, SignCodec, codec_from_config,
                                 is_stop)
from lightning_zo.core.engine import apply_update
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


def test_saturation_doubles_the_scale():
    codec = LinearCodec(init_scale=0.01)
    codec.advance([QMAX, 3])
    assert codec.scale >= 0.02


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

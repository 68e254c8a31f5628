"""Low precision (DESIGN I5): bf16 updates far below one ulp must not vanish, and stay replica-identical."""

import torch

from lightning_zo.core.update import apply_update
from lightning_zo.core.layout import ParamLayout
from lightning_zo.core.noise import round_to_bfloat16, scaled_noise


def test_stochastic_rounding_is_unbiased_and_shared():
    x = torch.full((200_000,), 1.0 + 1e-3, dtype=torch.float32)  # bf16 ulp at 1.0 is 2**-7 = 0.0078
    a, b = round_to_bfloat16(x, seed=5, offset=0), round_to_bfloat16(x, seed=5, offset=0)
    assert torch.equal(a, b)  # same seed, same bits: every rank rounds alike
    assert set(a.float().unique().tolist()) == {1.0, 1.0078125}
    assert abs(a.float().mean().item() - (1.0 + 1e-3)) < 1e-4
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses it entirely
    exact = torch.tensor([1.5, -2.25, 0.0])
    assert torch.equal(round_to_bfloat16(exact, 1, 0).float(), exact)  # representable values never move


def _linear(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).to(dtype)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(-1.0)
    return layer


def test_many_tiny_updates_match_fp32_in_expectation():
    """300 updates of 1/40 of a bf16 ulp each, all along the same z: fp32 drifts by 0.06 z (7.7 ulps)."""
    steps, coeff = 300, 2e-4
    moves = {}
    for dtype, rounding in ((torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)):
        layer = _linear(dtype)
        layout = ParamLayout(layer)
        start = torch.cat([p.detach().float().reshape(-1) for p in layer.parameters()])
        for t in range(steps):
            apply_update(layout, [1234], [coeff], "rademacher", rounding_seed=t if rounding else None)
        moves[(dtype, rounding)] = torch.cat([p.detach().float().reshape(-1) for p in layer.parameters()]) - start
    z = scaled_noise(1234, 0, moves[(torch.float32, False)].numel(), 1.0, "rademacher")
    fp32 = (moves[(torch.float32, False)] * z).mean().item()
    assert abs(fp32 - steps * coeff) < 1e-5
    assert torch.count_nonzero(moves[(torch.bfloat16, False)]) == 0  # round-to-nearest: every update vanished
    # Stochastic rounding: per step an element's rounding error has variance <= ulp**2 / 4 (ulp <= 2**-7 here),
    # so the mean over n elements has std <= sqrt(steps) * 2**-8 / sqrt(n); allow 4 of those.
    sr = moves[(torch.bfloat16, True)] * z
    tolerance = 4 * steps ** 0.5 * 2 ** -8 / sr.numel() ** 0.5
    assert abs(sr.mean().item() - fp32) < tolerance
    assert (sr > 0).float().mean() > 0.95  # nearly every weight moved along z


def test_bf16_noise_layout_is_the_fp32_one():
    z = scaled_noise(3, 10, 1000, 1.0, "rademacher")
    assert set(z.tolist()) == {-1.0, 1.0}

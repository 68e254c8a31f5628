"""Issue 44: one-sided estimates around a shared baseline (k + 1 forwards), population normalisation of a step's
estimates (z-scores, centred ranks), both exact in replay, resume and on two ranks; forwards counted everywhere."""

import csv
import math
import random

import pytest
import torch

from helpers import summaries, train
from lightning_zo.core import trajectory
from lightning_zo.core.codecs import NoneCodec
from lightning_zo.core.errors import UserError
from lightning_zo.core.layout import weights_digest
from lightning_zo.core.optimizer import StepRecord, ZOOptimizer
from lightning_zo.core.population import centred_ranks, normalise
from lightning_zo.integration.trajectory_log import check_compatible
from lightning_zo.replay import optimizer_for, replay


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def test_zscores_and_centred_ranks():
    rng = random.Random(0)
    values = [rng.gauss(3, 40) for _ in range(9)]
    z = [v for _, v in normalise("zscore", list(enumerate(values)))]
    assert abs(sum(z)) < 1e-12 and math.isclose(sum(v * v for v in z) / len(z), 1.0, rel_tol=1e-12)
    # scale- and shift-free: the step does not depend on the loss's scale
    shifted = [v for _, v in normalise("zscore", list(enumerate(1e4 * v - 7 for v in values)))]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(z, shifted))
    assert centred_ranks([5.0, -1.0, 5.0, 1e9]) == [0.0, -0.5, 0.0, 0.5]  # ties share; an outlier is just last
    assert normalise("rank", [(4, 2.0), (9, -3.0)]) == [(4, 0.5), (9, -0.5)]  # directions kept, in slot order
    assert normalise("zscore", [(0, 2.0), (1, 2.0)]) == []  # no spread: no move
    assert normalise("rank", [(0, 2.0)]) == normalise("zscore", [(0, 2.0)]) == []  # one estimate is no population
    assert normalise("none", [(0, 2.0)]) == [(0, 2.0)]


def test_one_sided_runs_k_plus_one_forwards_against_one_unperturbed_loss():
    model = _net()
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt = ZOOptimizer(model, lr=1e-2, k=3, estimator="one_sided", codec=NoneCodec(), seed=5)
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    with torch.no_grad():
        expected_base = float(loss())
        expected = []
        for j in range(3):
            with opt.perturbed_forward.perturb(opt.direction_seed(0, j), opt.eps):
                expected.append((float(loss()) - expected_base) / opt.eps)
    calls = []
    returned = opt.step(loss_fn=lambda j: calls.append(j) or loss())
    assert calls == [0, 1, 2, 0] and opt.forwards == 4  # k perturbed forwards, then the baseline
    assert opt.last_record.local_grads == expected and float(returned) == expected_base
    assert opt.last_record.codes == [float(torch.tensor(g, dtype=torch.float32)) for g in expected]
    two_sided = ZOOptimizer(_net(), k=3)
    two_sided.step(loss_fn=lambda j: loss())
    assert two_sided.forwards == 6


@pytest.mark.parametrize("estimator,population,fuse", [("one_sided", "zscore", False), ("one_sided", "rank", True),
                                                       ("two_sided", "zscore", True), ("one_sided", "none", False)])
def test_replaying_the_records_rebuilds_the_weights_bit_for_bit(estimator, population, fuse):
    live = _net()
    base = {k: v.clone() for k, v in live.state_dict().items()}
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt = ZOOptimizer(live, lr=1e-2, k=4, estimator=estimator, population=population, fuse_update=fuse,
                      rule="normalized" if population == "rank" else "sgd")
    header = opt.describe()
    assert header["estimator"] == estimator and header["population"] == population
    records = []
    for _ in range(12):
        opt.step(lambda: torch.nn.functional.cross_entropy(live(x), y))
        records.append(opt.last_record)
    opt.flush()
    replayed = _net()
    replayed.load_state_dict(base)
    assert weights_digest(replayed) != weights_digest(live)
    other = optimizer_for(replayed, header)
    for record in records:
        other.apply(StepRecord(record.step, record.world_size, record.k, record.lr, record.codes))
    assert weights_digest(replayed) == weights_digest(live) and other.forwards == opt.forwards
    if population != "none":  # the same codes without the normalisation are another trajectory
        plain = _net()
        plain.load_state_dict(base)
        unnormalised = optimizer_for(plain, {**header, "population": "none"})
        for record in records:
            unnormalised.apply(StepRecord(record.step, record.world_size, record.k, record.lr, record.codes))
        assert weights_digest(plain) != weights_digest(live)


def test_a_header_without_the_keys_replays_as_two_sided_without_population():
    opt = ZOOptimizer(_net())
    header = {key: value for key, value in opt.describe().items() if key not in ("estimator", "population")}
    assert optimizer_for(_net(), header).describe() == opt.describe()
    assert trajectory.format_version(header) == trajectory.FORMAT_VERSION
    assert trajectory.format_version({**header, "population": "rank"}) == trajectory.POPULATION_VERSION
    assert check_compatible({**header, "base_weights_sha256": "a"}, {**opt.describe(), "base_weights_sha256": "a"},
                            "log") == []
    with pytest.raises(UserError, match="estimator: log 'two_sided' != run 'one_sided'"):
        check_compatible({**header, "base_weights_sha256": "a"},
                         {**opt.describe(), "estimator": "one_sided", "base_weights_sha256": "a"}, "log")


@pytest.mark.parametrize("kwargs,message", [
    ({"estimator": "central"}, "unknown estimator 'central'; choose one of two_sided, one_sided"),
    ({"population": "softmax"}, "unknown population 'softmax'; choose one of none, zscore, rank"),
    ({"population": "zscore", "aggregation": "median"}, "population=zscore .* needs aggregation=mean, not median")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOOptimizer(_net(), **kwargs)


def test_a_population_of_one_estimate_is_refused_at_the_step():
    opt = ZOOptimizer(_net(), population="rank")  # world size unknown here: a second rank would make two estimates
    with pytest.raises(ValueError, match="population=rank normalises a step's 1 estimate"):
        opt.step(lambda: torch.tensor(1.0))


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.population=zscore", "optimizer.aggregation=median"], "population=zscore normalises the step's "
     "estimates of distinct directions and needs aggregation=mean, not median"),
    (["optimizer.population=rank"], "population=rank normalises a step's 1 estimate(s): it needs at least two"),
    (["optimizer.estimator=forward"], "unknown estimator 'forward'")])
def test_the_cli_refuses_bad_settings_in_one_line_before_loading_the_model(overrides, message, capsys):
    from lightning_zo.cli import build, user_errors
    from lightning_zo.precheck import compose_config

    cfg = compose_config(["model=tiny", "model._target_=no_such_module.build", *overrides])  # a model that cannot load
    with pytest.raises(SystemExit) as e, user_errors():
        build(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: optimizer: {message}") and "\n" not in err


def _csv_forwards(run_dir):
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["forwards"]), float(r["train/tokens"])) for r in csv.DictReader(f)
                if r.get("forwards")]


def test_two_ranks_one_sided_zscore_with_masks_stay_identical_replay_and_resume_exactly(tmp_path):
    """With sparse masks too (test_masks.py): refreshed every 3 steps, the resumed run stops between two refreshes."""
    args = ["trainer.strategy=zo_spawn", "trainer.devices=2", "data.batch_size=4", "optimizer.lr=1e-3",
            "optimizer.k=2", "optimizer.estimator=one_sided", "optimizer.population=zscore",
            "optimizer.mask_keep=0.5", "optimizer.mask_every=3"]
    train(tmp_path / "whole", *args, "trainer.max_steps=8")
    whole = summaries(tmp_path / "whole")
    assert len({s["weights_sha256"] for s in whole}) == 1
    assert [s["forwards"] for s in whole] == [8 * 3, 8 * 3]  # k + 1 per step per rank
    header = trajectory.read(tmp_path / "whole" / "trajectory.zot").header
    assert (header["estimator"], header["population"]) == ("one_sided", "zscore") and header["mask"] is not None
    assert header["format_version"] == trajectory.MASK_VERSION  # releases before masks refuse the log
    replayed = replay(tmp_path / "whole", progress=False)[1]
    assert replayed["weights_sha256"] == whole[0]["weights_sha256"] and replayed["forwards"] == 24
    rows = _csv_forwards(tmp_path / "whole")
    assert [(step, forwards) for step, forwards, _ in rows] == [(t, 3.0 * (t + 1)) for t in range(8)]
    assert all(tokens > 0 for _, _, tokens in rows)
    train(tmp_path / "resumed", *args, "trainer.max_steps=4")
    proc = train(tmp_path / "resumed", *args, "trainer.max_steps=8")
    assert "replayed 4 steps" in proc.stdout
    resumed = summaries(tmp_path / "resumed")
    assert {s["weights_sha256"] for s in resumed} == {whole[0]["weights_sha256"]}
    assert [s["forwards"] for s in resumed] == [24, 24]


def test_two_sided_counts_2k_forwards_per_step(tmp_path):
    train(tmp_path, "optimizer.k=2", "data.batch_size=4", "trainer.max_steps=3")
    (summary,) = summaries(tmp_path)
    assert summary["forwards"] == 12 and summary["estimator"] == "two_sided"
    rows = _csv_forwards(tmp_path)
    assert [forwards for _, forwards, _ in rows] == [4.0, 8.0, 12.0]

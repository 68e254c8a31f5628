"""Update rules (core/rules.py): sgd is the old update bit for bit; momentum regenerates its window; normalized is
scale-free and bounded; the state rebuilds from the records (replay, resume) and travels in the state_dict."""

import math
import random

import pytest
import torch

from helpers import summaries, train
from lightning_zo.core import trajectory
from lightning_zo.core.aggregation import Aggregation
from lightning_zo.core.codecs import QMAX, LinearCodec
from lightning_zo.core.errors import UserError
from lightning_zo.core.optimizer import StepRecord, ZOOptimizer
from lightning_zo.core.rules import RULES, UpdateRule
from lightning_zo.core.layout import weights_digest
from lightning_zo.replay import optimizer_for, replay


def _steps(n, slots=3, seed=0):
    rng = random.Random(seed)
    return [[(1000 * t + s, rng.gauss(0, 40)) for s in range(slots)] for t in range(n)]


def test_sgd_is_the_aggregations_update_bit_for_bit():
    rng = random.Random(1)
    codec = LinearCodec(init_scale=0.0371)
    for _ in range(100):
        codes = [rng.randint(-QMAX, QMAX) for _ in range(rng.randint(1, 9))]
        agg = Aggregation("mean")
        estimates = agg.estimates(codec, codes, 1)
        assert UpdateRule("sgd").terms(estimates, agg.scale(len(codes), 1, "mean"), 3.3e-4) == \
            agg.terms(codec, codes, 1, 3.3e-4, "mean")


def test_momentum_regenerates_the_last_h_steps_with_geometric_weights():
    rule = UpdateRule("momentum", beta=0.5, history=3)
    steps = _steps(5)
    for t, estimates in enumerate(steps):
        terms = rule.terms(estimates, 2.0, 0.1)
    # step 4 moves along steps 4, 3, 2 (window 3), weights 1, 0.5, 0.25; nothing of steps 0 and 1
    expected = [(seed, -0.1 * w * (v / 2.0)) for w, past in zip((1.0, 0.5, 0.25), steps[::-1][:3])
                for seed, v in past]
    assert terms == expected
    assert {seed // 1000 for seed, _ in terms} == {2, 3, 4}


def test_normalized_is_scale_free_and_bounds_an_outlier():
    small, large = UpdateRule("normalized"), UpdateRule("normalized")
    for estimates in _steps(30):
        a = small.terms(estimates, 1.0, 1e-3)
        b = large.terms([(s, 1e4 * v) for s, v in estimates], 1.0, 1e-3)
        assert all(sa == sb and math.isclose(ca, cb, rel_tol=1e-12) for (sa, ca), (sb, cb) in zip(a, b))
    outlier = small.terms([(7, 1e9)], 1.0, 1e-3)  # a billion times the typical estimate
    assert abs(outlier[0][1]) <= 1e-3 / math.sqrt(1 - small.beta2) * (1 + 1e-9)
    assert abs(outlier[0][1]) > 1e-3  # still a large step: its sign and direction count


def test_state_dict_continues_exactly():
    for name in RULES:
        whole, first = UpdateRule(name, history=4), UpdateRule(name, history=4)
        steps = _steps(12)
        for estimates in steps[:7]:
            whole.terms(estimates, 3.0, 1e-2)
            first.terms(estimates, 3.0, 1e-2)
        second = UpdateRule(name, history=4)
        second.load_state_dict(first.state_dict())
        assert [whole.terms(e, 3.0, 1e-2) for e in steps[7:]] == [second.terms(e, 3.0, 1e-2) for e in steps[7:]]


def test_a_checkpoint_of_another_rule_is_refused():
    model = torch.nn.Linear(2, 2)
    state = ZOOptimizer(model, rule="sgd").state_dict()
    with pytest.raises(ValueError, match="update rule"):
        ZOOptimizer(model, rule="momentum").load_state_dict(state)
    ZOOptimizer(model, rule="sgd").load_state_dict(state)


def test_headers_and_bad_settings():
    assert UpdateRule.from_config(None).name == "sgd"  # logs written before rules existed
    assert UpdateRule("adam", beta=0.8, history=2).config() == {"name": "adam", "beta": 0.8, "history": 2,
                                                                  "beta2": 0.99}
    assert UpdateRule("sgd").config() == {"name": "sgd"}
    for bad in ({"rule": "lion"}, {"rule": "momentum", "beta": 1.0}, {"rule": "momentum", "history": 0},
                {"rule": "normalized", "beta2": -0.1}):
        with pytest.raises(ValueError):
            ZOOptimizer(torch.nn.Linear(2, 2), **bad)


@pytest.mark.parametrize("rule", ["momentum", "normalized", "adam"])
def test_replaying_the_records_rebuilds_the_weights_bit_for_bit(rule):
    """In one process: live steps (with the rule's state) against a fresh optimizer applying the same records."""
    torch.manual_seed(0)
    live_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    base = {k: v.clone() for k, v in live_model.state_dict().items()}
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt = ZOOptimizer(live_model, lr=1e-2, rule=rule, history=3)
    header = opt.describe()  # before the codec's scale moves: what the log's header holds
    records = []
    for _ in range(15):
        opt.step(lambda: torch.nn.functional.cross_entropy(live_model(x), y))
        records.append(opt.last_record)
    replayed = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    replayed.load_state_dict(base)
    other = optimizer_for(replayed, header)
    for record in records:
        other.apply(StepRecord(record.step, record.world_size, record.k, record.lr, record.codes))
    assert weights_digest(replayed) == weights_digest(live_model) != weights_digest(torch.nn.Sequential())
    assert other.rule.state_dict() == opt.rule.state_dict()


def test_two_ranks_stay_identical_and_replay_then_resume_equals_the_uninterrupted_run(tmp_path):
    """momentum's window of steps, rebuilt on every rank and on resume (adam adds normalized's state to the same
    window: the one-process replay above and test_trajectory.py's three-rank `normalized` run cover it)."""
    rule = "momentum"
    args = ["trainer.strategy=zo_spawn", "trainer.devices=2", "data.batch_size=4", "optimizer.lr=1e-3",
            f"optimizer.rule={rule}", "optimizer.history=4"]
    train(tmp_path / "whole", *args, "trainer.max_steps=12")
    whole = summaries(tmp_path / "whole")
    assert len({s["weights_sha256"] for s in whole}) == 1
    header = trajectory.read(tmp_path / "whole" / "trajectory.zot").header
    assert header["rule"]["name"] == rule and header["rule"]["history"] == 4
    assert header["format_version"] == trajectory.HISTORY_VERSION  # releases before rules refuse it
    assert replay(tmp_path / "whole", progress=False)[1]["weights_sha256"] == whole[0]["weights_sha256"]
    train(tmp_path / "resumed", *args, "trainer.max_steps=5")  # then continued from the log: the window rebuilt
    proc = train(tmp_path / "resumed", *args, "trainer.max_steps=12")
    assert "replayed 5 steps" in proc.stdout
    assert {s["weights_sha256"] for s in summaries(tmp_path / "resumed")} == {whole[0]["weights_sha256"]}


def test_a_resume_with_another_rule_is_refused(tmp_path):
    train(tmp_path, "trainer.max_steps=3")
    proc = train(tmp_path, "trainer.max_steps=6", "optimizer.rule=normalized", check=False)
    assert proc.returncode == 2 and "rule: log {'name': 'sgd'} != run {'name': 'normalized'" in proc.stderr


def test_an_unknown_rule_is_one_line(tmp_path):
    proc = train(tmp_path, "trainer.max_steps=3", "optimizer.rule=lion", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: optimizer: unknown rule")


def test_the_first_order_reference_trains_the_same_module_by_backprop(tmp_path):
    """optimizer=adam: the same module, data and evaluation, trained by AdamW; no trajectory log, nothing on the
    wire on one rank, and what data parallelism would all-reduce per step reported."""
    train(tmp_path, "optimizer=adam", "optimizer.lr=1e-3", "trainer.max_steps=40", "data.batch_size=16")
    (summary,) = summaries(tmp_path)
    assert summary["optimizer"] == "AdamW" and summary["steps"] == 40 and summary["payload_bytes_per_step"] == 0
    assert summary["gradient_bytes_per_rank_per_step"] == 4 * 44_608  # every parameter of the tiny model
    assert not (tmp_path / "trajectory.zot").exists()
    import csv
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    # measured: the mean loss of steps 1-10 0.70, of 31-40 0.23 (backprop fits the bundled set's sentences)
    assert len(losses) == 40 and sum(losses[-10:]) < 0.6 * sum(losses[:10])
    # the cost columns of the ZO path: one forward per step, the batch's tokens (16 prompts of at least 2 tokens)
    assert [float(r["forwards"]) for r in rows] == list(range(1, 41))
    assert all(float(r["train/tokens"]) >= 32 for r in rows)


def test_the_first_order_reference_refuses_a_non_differentiable_objective(tmp_path):
    proc = train(tmp_path, "optimizer=adam", "task.objective=accuracy", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2 and "not differentiable" in proc.stderr.strip().splitlines()[-1]


def test_the_first_order_reference_runs_on_one_rank_only(tmp_path):
    proc = train(tmp_path, "optimizer=adam", "trainer.devices=2", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2 and "one-rank first-order reference" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("rule,k,refused_at", [("sgd", 4, None), ("momentum", 2, None), ("sgd", 5, 0),
                                               ("momentum", 3, 1)])
def test_a_log_of_generator_version_1_replays_up_to_4_slots_and_refuses_more(rule, k, refused_at):
    """Version 1 summed every slot left to right; version 2 (noise.term_sum) sums groups of 4, the same bits for up
    to 4 slots. A header without "generator_version" is version 1: its steps of <= 4 slots replay exactly, a step
    of more is refused in one line, not replayed into other weights. Momentum over 2 steps adds 2k slots."""
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    base = {name: v.clone() for name, v in live.state_dict().items()}
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt = ZOOptimizer(live, lr=1e-2, k=k, rule=rule, history=2)
    header = opt.describe()
    assert header["generator_version"] == 2
    records = []
    for _ in range(4):
        opt.step(lambda: torch.nn.functional.cross_entropy(live(x), y))
        records.append(opt.last_record)
    old_header = {key: value for key, value in header.items() if key != "generator_version"}
    for h in (header, old_header):
        replayed = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        replayed.load_state_dict(base)
        other = optimizer_for(replayed, h)
        if h is old_header and refused_at is not None:
            for record in records[:refused_at]:
                other.apply(record)
            with pytest.raises(UserError, match=rf"step {refused_at} adds \d+ slots, but its log was written by "
                                                r"generator version 1"):
                other.apply(records[refused_at])
            continue
        for record in records:
            other.apply(record)
        assert weights_digest(replayed) == weights_digest(live)


def test_an_unknown_generator_version_is_refused():
    opt = ZOOptimizer(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="generator version 3"):
        opt.use_generator_version(3)

"""ZO training in a Lightning Fabric loop of one's own (lightning_zo.integration.fabric.ZOFabric, tests/fabric_loop.py):
1 and 2 processes on gloo keep identical replicas and replay exactly; kill -9 and rerun equal the uninterrupted run;
a rerun with another learning rate is refused in one line and leaves the directory as it was."""

import json
import sys

import pytest

from helpers import REPO, kill_9_when_logged, python, summaries

SCRIPT = REPO / "tests" / "fabric_loop.py"


def fit(run_dir, *args, check=True):
    proc = python(str(SCRIPT), str(run_dir), *args, cwd=REPO / "tests")
    if check and proc.returncode != 0:
        raise AssertionError(f"fabric_loop.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def replay(run_dir) -> dict:
    proc = python("-m", "lightning_zo.replay", str(run_dir), "--model", "plain_module:build_model", cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("devices", [1, 2])
def test_fabric_loop_keeps_replicas_identical_and_replays(tmp_path, devices):
    fit(tmp_path, "--devices", str(devices), "--max-steps", "8")
    s = summaries(tmp_path)
    assert [x["rank"] for x in s] == list(range(devices))
    assert {x["weights_sha256"] for x in s} == {replay(tmp_path)["weights_sha256"]}
    assert s[0]["steps"] == 8 and s[0]["payload_bytes_per_step"] == devices


def test_fabric_kill_9_and_rerun_equal_the_uninterrupted_run(tmp_path):
    args = ["--devices", "2", "--max-steps", "20"]  # 6 batches per rank and epoch: the kill is past an epoch
    fit(tmp_path / "whole", *args)
    run = tmp_path / "killed"
    killed_at = kill_9_when_logged([sys.executable, str(SCRIPT), str(run), *args], run, 8, cwd=REPO / "tests")
    assert 8 <= killed_at < 20
    resumed = fit(run, *args)
    assert f"replayed {killed_at} steps" in resumed.stdout + resumed.stderr
    expected = summaries(tmp_path / "whole")[0]["weights_sha256"]
    assert [s["weights_sha256"] for s in summaries(run)] == [expected, expected]
    assert [s["steps"] for s in summaries(run)] == [20, 20]

    def files():
        return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    before = files()
    refused = fit(run, *args[:2], "--max-steps", "30", "--lr", "2e-3", check=False)
    assert refused.returncode == 2 and "resuming" in refused.stderr and "lr: '0.001' -> '0.002'" in refused.stderr
    assert files() == before


def test_a_resumed_loop_warns_where_its_sampler_draws_an_order_it_cannot_repeat(caplog):
    """ZOFabric.batches positions the sampler as the Trainer's path does, and says so where it cannot (no processes:
    a ZOFabric of just the fields batches reads)."""
    from types import SimpleNamespace

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from lightning_zo.integration.fabric import ZOFabric

    run = ZOFabric.__new__(ZOFabric)
    run.start_step, run.rank, run.fabric = 3, 0, SimpleNamespace(to_device=lambda batch: batch)
    data = torch.arange(32)
    with caplog.at_level("WARNING", logger="lightning_zo.integration.fabric"):
        assert len(list(run.batches(DataLoader(data, batch_size=4, sampler=RandomSampler(data)), 5))) == 2
    assert "resuming at step 3: the training sampler (RandomSampler) shuffles with the unseeded global generator" \
        in caplog.text
    caplog.clear()
    seeded = RandomSampler(data, generator=torch.Generator().manual_seed(0))
    whole = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=seeded)]
    seeded.generator.manual_seed(0)
    with caplog.at_level("WARNING", logger="lightning_zo.integration.fabric"):
        resumed = [b.tolist() for b in run.batches(DataLoader(data, batch_size=4, sampler=seeded), 5)]
    assert resumed == whole[3:5] and not caplog.text  # a seeded sampler is continued, silently
    with caplog.at_level("WARNING", logger="lightning_zo.integration.fabric"):
        unbatched = list(run.batches(DataLoader(data, batch_size=None), 5))  # no BatchSampler: no position to set
    assert [b.item() for b in unbatched] == [0, 1] and "resuming at step 3: the loader has no torch BatchSampler, " \
        "so the run continues with the data from its start" in caplog.text

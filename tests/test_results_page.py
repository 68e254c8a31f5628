"""scripts/results.py page: the tables, the target check and the plots from run directories (no training)."""

import csv
import importlib.util
import json

from helpers import REPO

spec = importlib.util.spec_from_file_location("results_script", REPO / "scripts" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _fake_run(out, task, method, seed, accs, steps, seconds, every=results.EVERY, tokens=None, **summary):
    where = results.run_dir(out, task, method, seed)
    (where / "csv").mkdir(parents=True)
    with (where / "csv" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/projected_grad", "train/tokens", "val/acc"])
        writer.writeheader()
        for i in range(steps):
            writer.writerow({"epoch": 0, "step": i, "train/projected_grad": 0.0 if i % 2 else 1.5,
                             "train/tokens": tokens})
            if (i + 1) % every == 0:
                writer.writerow({"epoch": 0, "step": i, "val/acc": accs[(i + 1) // every - 1]})
    (where / "summary.rank0.json").write_text(json.dumps(
        {"val_acc_zero_shot": 0.5, "val_acc_final": accs[-1], "steps": steps, "train_seconds": seconds,
         "payload_bytes_per_step": 1, **summary}))
    (where / "wall.json").write_text(json.dumps({"wall_s": seconds + 30, "rc": 0}))


def test_the_page_reports_means_spread_and_where_a_rule_reaches_plain_spsa(tmp_path):
    out = tmp_path / "runs"
    for seed, shift in enumerate((0.0, 0.02, 0.04)):
        _fake_run(out, "sst2", "spsa", seed, [0.55 + shift, 0.6, 0.62, 0.64, 0.66, 0.68 + shift], 300, 300.0)
        _fake_run(out, "sst2", "momentum", seed, [0.6, 0.7 + shift, 0.71], 150, 180.0)
    _fake_run(out, "sst2", "adam", 0, [0.8, 0.85], 100, 150.0, payload_bytes_per_step=0,
              gradient_bytes_per_rank_per_step=538_000_000)
    # 5 forwards per step (k = 4 one-sided), validated every 20 steps = 100 forwards, as `run` makes it
    _fake_run(out, "sst2", "one_sided_zscore", 0, [0.58, 0.73, 0.74, 0.75, 0.76, 0.77], 120, 240.0,
              every=results.validate_every("one_sided_zscore"), tokens=50, forwards=600, payload_bytes_per_step=4)
    page = tmp_path / "RESULTS.md"
    page.write_text("# hand-written intro\n\n<!-- results.py: begin -->\nold\n<!-- results.py: end -->\n\nnotes\n")
    results.main(["page", "--out", str(out), "--page", str(page), "--tasks", "sst2"])
    text = page.read_text()
    assert text.startswith("# hand-written intro") and text.rstrip().endswith("notes") and "old" not in text
    assert "| 70.0 ± 2.0 |" in text  # plain SPSA at 300: 68, 70, 72 %
    assert "| 72.0 ± 2.0 |" in text  # momentum at 100: 70, 72, 74 %
    # the targets in forwards: momentum 2 per step, 72 % at step 100; the one-sided run 73 % at step 40
    assert "momentum: plain SPSA's best mean (70.0 % at 600 forwards) reached at 200 forwards, 3.0x fewer (target " \
           "met); its best mean, 72.0 % at 200 forwards, is 13.0 points below Adam's 100-step 85.0 % (target of 3 " \
           "points not met)" in text
    assert "one_sided_zscore (one seed): plain SPSA's best mean (70.0 % at 600 forwards) reached at 200 forwards, " \
        "3.0x fewer" in text
    # forwards per step, tokens per forward (50 per step over 5 forwards), accuracy at 100, 200, ..., 600 forwards
    # then train seconds per forward (240 s / 600) and the wall per 1000 forwards ((240 + 30) s / 600 forwards)
    assert "| one-sided, 4 directions, z-scores, lr 1e-3 | 5 | 10 | 4 B | 1 | 50.0 | 58.0 | 73.0 | 74.0 | 75.0 | " \
           "76.0 | 77.0 | 0.40 | 7.5 min |" in text
    assert "| 1 + backward |  | 0 (one rank" in text  # the first-order reference: 100 forwards at step 100
    assert "data-parallel: 538 MB" in text and "| 0.50 |" in text  # plain SPSA: 300 s / 600 forwards


def test_one_seed_run_past_the_budget_is_shown_but_not_taken_for_the_seeds_mean(tmp_path):
    out = tmp_path / "runs"
    for seed in (0, 1, 2):
        _fake_run(out, "sst2", "spsa", seed, [0.6, 0.7], 100, 100.0)  # 200 forwards
        accs = [0.6, 0.72] + ([0.95] if seed == 0 else [])  # seed 0 runs on to 300 forwards
        _fake_run(out, "sst2", "one_sided_zscore", seed, accs, 20 * len(accs), 100.0,
                  every=results.validate_every("one_sided_zscore"), forwards=100 * len(accs))
    page = tmp_path / "RESULTS.md"
    results.main(["page", "--out", str(out), "--page", str(page), "--tasks", "sst2"])
    text = page.read_text()
    assert "| 3 | 50.0 ± 0.0 | 60.0 ± 0.0 | 72.0 ± 0.0 | 95.0 |" in text  # the column at 300: seed 0 alone
    assert "one_sided_zscore: plain SPSA's best mean (70.0 % at 200 forwards) reached at 200 forwards, 1.0x fewer " \
           "(target of 2x not met)" in text  # its mean stops where its seeds stop


def test_every_zo_method_runs_plain_spsas_forwards_and_validates_every_100():
    for method, steps, every in (("spsa", 600, 50), ("normalized", 600, 50), ("one_sided_zscore", 240, 20),
                                 ("adam", 100, 50)):
        cmd = results.command(REPO, REPO, "sst2", method, 0, results.STEPS_OF[method])
        assert f"trainer.max_steps={steps}" in cmd and f"trainer.val_check_interval={every}" in cmd
    assert results.forwards_per_step("one_sided_rank") == 5 and results.forwards_per_step("spsa") == 2


def test_seconds_per_step_of_a_run_continued_over_several_starts(tmp_path):
    """train_seconds times the start that wrote the summary: its steps come from the summary or, for an older one,
    from train.log's last resume that replayed fewer steps than the summary holds (a start under way replays all)."""
    log = tmp_path / "train.log"
    log.write_text("... replayed 165 steps\n... replayed 700 steps\n... replayed 1200 steps\n")
    assert results.steps_trained(tmp_path, {"steps": 1200}) == 500
    assert results.steps_trained(tmp_path, {"steps": 1200, "steps_trained": 480}) == 480
    log.unlink()
    assert results.steps_trained(tmp_path, {"steps": 1200}) == 1200  # never resumed

"""scripts/results.py page: the tables, the target check and the plots from run directories (no training)."""

import csv
import importlib.util
import json

from helpers import REPO

spec = importlib.util.spec_from_file_location("results_script", REPO / "scripts" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _fake_run(out, task, method, seed, accs, steps, seconds, **summary):
    where = results.run_dir(out, task, method, seed)
    (where / "csv").mkdir(parents=True)
    with (where / "csv" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/projected_grad", "val/acc"])
        writer.writeheader()
        for i in range(steps):
            writer.writerow({"epoch": 0, "step": i, "train/projected_grad": 0.0 if i % 2 else 1.5})
            if (i + 1) % results.EVERY == 0:
                writer.writerow({"epoch": 0, "step": i, "val/acc": accs[(i + 1) // results.EVERY - 1]})
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
    page = tmp_path / "RESULTS.md"
    page.write_text("# hand-written intro\n\n<!-- results.py: begin -->\nold\n<!-- results.py: end -->\n\nnotes\n")
    results.main(["page", "--out", str(out), "--page", str(page), "--tasks", "sst2"])
    text = page.read_text()
    assert text.startswith("# hand-written intro") and text.rstrip().endswith("notes") and "old" not in text
    assert "| 70.0 ± 2.0 |" in text  # plain SPSA at 300: 68, 70, 72 %
    assert "| 72.0 ± 2.0 |" in text  # momentum at 100: 70, 72, 74 %
    assert "momentum: plain SPSA's 300-step mean (70.0 %) reached at step 100" in text
    assert "data-parallel: 538 MB" in text and "| 1.00 |" in text  # 300 s / 300 steps

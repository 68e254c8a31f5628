"""Issue 42's chaos run, in small: 4 ranks under torchrun --max-restarts meet a SIGTERM to a rank, a NaN loss on a
rank and a kill -9 of a rank (scripts/chaos.py, seed 5: steps 29, 59 and 83 of 100); the run finishes by itself with
the uninterrupted run's weights, trajectory log and metrics. The full run (200 steps, 9 faults) is in
docs/resume.md."""

import json
import subprocess
import sys

from helpers import REPO


def test_four_ranks_under_torchrun_survive_a_fault_of_each_kind(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--out", str(tmp_path), "--ranks", "4",
                           "--steps", "100", "--seed", "5", "--timeout", "600"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:],
                                  (tmp_path / "chaos.out").read_text()[-4000:] if (tmp_path / "chaos.out").exists() else "")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [kind for _, kind, _ in result["injected"]] == ["sigterm", "nan", "kill9"]
    assert result["finished_by_itself"] and result["outputs_equal"] and result["restarts"] == 2, result

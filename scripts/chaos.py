"""The chaos run of issue 42: a run under torchrun --max-restarts that meets a fault every 10-30 steps must finish by
itself with the uninterrupted run's weights, trajectory log and metrics.

    python scripts/chaos.py --out /tmp/chaos [--ranks 4] [--steps 200] [--seed 0]

Faults, drawn from `--seed` (the step of the next one 10-30 steps after the last, the kind and the rank at random):
kill -9 of a rank (torchrun restarts every rank, the rerun resumes from the log), SIGTERM to a rank (every rank stops
cleanly and exits 75, which torchrun restarts), a NaN loss on a rank for one step (its slots are skipped; the
uninterrupted run meets the same NaNs, tests/helpers.NaNLossAt). The tiny model, gloo on CPU. Prints one JSON line:
the faults injected and survived, and whether the outputs equal (data lost: none when they do).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import TINY, TORCHRUN, children, env, logged_steps, summaries  # noqa: E402


def schedule(steps: int, ranks: int, seed: int) -> list[tuple[int, str, int]]:
    """(step, kind, rank) of each fault, in step order."""
    rng, faults, step = random.Random(seed), [], 0
    while True:
        step += rng.randint(10, 30)
        if step >= steps - 5:  # the last one leaves the run a few steps to finish
            return faults
        faults.append((step, rng.choice(["kill9", "sigterm", "nan"]), rng.randrange(ranks)))


def digests(run: Path) -> dict:
    files = ["trajectory.zot", "csv/metrics.csv"]
    return {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files if (run / f).exists()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-restarts", type=int, default=30)
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args(argv)
    faults = schedule(args.steps, args.ranks, args.seed)
    nans = [[rank, step] for step, kind, rank in faults if kind == "nan"]
    overrides = [*TINY, f"trainer.devices={args.ranks}", f"trainer.max_steps={args.steps}", "optimizer.lr=1e-3",
                 "+callbacks.nan._target_=helpers.NaNLossAt", f"+callbacks.nan.at={json.dumps(nans)}"]
    launcher = [*TORCHRUN, "--standalone", f"--nproc-per-node={args.ranks}"]
    whole, chaos = args.out / "whole", args.out / "chaos"
    start = time.time()
    if not (whole / "summary.rank0.json").exists():
        subprocess.run([*launcher, str(ROOT / "train.py"), f"hydra.run.dir={whole}", *overrides], cwd=ROOT, env=env(),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.timeout)
    uninterrupted_s = round(time.time() - start)
    cmd = [*launcher, f"--max-restarts={args.max_restarts}", str(ROOT / "train.py"), f"hydra.run.dir={chaos}",
           *overrides]
    start = time.time()
    with open(args.out / "chaos.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
        injected = []
        for step, kind, rank in faults:
            if kind == "nan":
                injected.append((step, kind, rank))
                continue
            while logged_steps(chaos / "trajectory.zot") < step and proc.poll() is None:
                if time.time() - start > args.timeout:
                    break
                time.sleep(0.05)
            workers = sorted(children(proc.pid))  # torchrun starts the ranks in order
            if proc.poll() is not None or len(workers) <= rank:
                break
            os.kill(workers[rank], signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
            injected.append((logged_steps(chaos / "trajectory.zot"), kind, rank))
        try:
            proc.wait(timeout=max(1, args.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            for pid in [*children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    finished = proc.returncode == 0 and (chaos / "summary.rank0.json").exists()
    same = finished and digests(chaos) == digests(whole) and {s["weights_sha256"] for s in summaries(chaos)} == {
        summaries(whole)[0]["weights_sha256"]}
    result = {"ranks": args.ranks, "steps": args.steps, "seed": args.seed, "faults": len(faults),
              "injected": injected, "finished_by_itself": finished, "outputs_equal": same,
              "survived": len(injected) if same else None, "lost": 0 if same else "see chaos.out",
              "restarts": open(args.out / "chaos.out").read().count("failed (exitcode"),  # torchrun, per restart
              "uninterrupted_s": uninterrupted_s, "chaos_s": round(time.time() - start)}
    print(json.dumps(result))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

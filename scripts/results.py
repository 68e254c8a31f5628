"""The runs behind docs/RESULTS.md, and the page itself, from one script.

    python scripts/results.py run  [--out DIR] [--tasks sst2,trec] [--methods spsa,...] [--seeds 0,1,2] [--steps N]
    python scripts/results.py page [--out DIR] [--page docs/RESULTS.md]

`run` trains SmolLM2-135M (the offline copy) on each task's shared training split (validation carved from train,
seed 42) with every method and run seed, one run at a time, into DIR/<task>/<method>/seed<S>. A finished run is
skipped; one stopped by a signal, or asked for more steps (`--steps`), continues exactly from its trajectory log, so
an interrupted `run` continues where it stopped, in a later session too. Every ZO method gets plain SPSA's budget of
forward passes (FORWARDS per rank; `--steps` extends one seed further) and is validated every EVERY_FORWARDS
forwards, so that methods compare at equal forwards: a forward costs the same whatever the update rule, and it is
ZO's price. `page` reads the runs' summaries and metrics and writes the tables between the page's markers:
accuracy against forward passes (tokens per forward and bytes on the wire beside them), mean ± spread over seeds,
issue 44's targets, wall time, and the plots.
Data: `--data` (default ../shared/data, the project's shared folder) with <task>/train.tsv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = 600
EVERY = 50
FORWARDS = 2 * STEPS  # plain SPSA's forwards per rank and run: the budget of every ZO method (all seeds)
EVERY_FORWARDS = 2 * EVERY  # forwards between two validations of a ZO run
# The tables' columns (forwards per rank), where some run reached them; the plots show every validation.
COLUMNS = (100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2000, 3000, 4000, 5000, 6000)
# Per task: examples per class for training and for the carved validation set, and the prompt length that fits.
TASKS = {
    "sst2": {"task.train_per_class": 500, "task.val_per_class": 50, "data.max_length": 64},
    "trec": {"task.train_per_class": 64, "task.val_per_class": 16, "data.max_length": 64},
    "rte": {"task.train_per_class": 500, "task.val_per_class": 50, "data.max_length": 128},
    "copa": {"task.val_per_class": 50, "data.max_length": 64},  # 300 train, 100 validation (issue 17)
}
# method -> (overrides, bytes on the wire per rank per step, what it is)
METHODS = {
    "spsa": ([], 1, "plain SPSA (the paper's rule), lr 1e-5"),
    "momentum": (["optimizer.rule=momentum"], 1, "momentum (beta 0.9, window 8 steps), lr 1e-5"),
    "normalized": (["optimizer.rule=normalized", "optimizer.lr=5e-4"], 1, "normalized (beta2 0.99), lr 5e-4"),
    "normalized_lr1e-3": (["optimizer.rule=normalized", "optimizer.lr=1e-3"], 1, "normalized (beta2 0.99), lr 1e-3"),
    "adam": (["optimizer=adam"], 0, "first order: backprop + AdamW, lr 1e-5 (one rank)"),
    "spsa_accuracy": (["task.objective=accuracy"], 1, "plain SPSA on minus the batch accuracy, lr 1e-5"),
    "spsa_accuracy_eps": (["task.objective=accuracy", "optimizer.eps=1e-2"], 1,
                          "plain SPSA on minus the batch accuracy, lr 1e-5, eps 1e-2"),
    # Issue 44: k = 4 one-sided directions around one unperturbed forward (5 forwards per step), one byte each, the
    # step's 4 estimates normalised; lr 1e-3 over 4 directions of unit z-scores is about normalized's step at 5e-4
    "one_sided_zscore": (["optimizer.estimator=one_sided", "optimizer.population=zscore", "optimizer.k=4",
                          "optimizer.lr=1e-3"], 4, "one-sided, 4 directions, z-scores, lr 1e-3"),
    "one_sided_rank": (["optimizer.estimator=one_sided", "optimizer.population=rank", "optimizer.k=4",
                        "optimizer.lr=3e-3"], 4, "one-sided, 4 directions, centred ranks, lr 3e-3"),
    # Sparse-MeZO's masks on top: only the smallest 20 % of each tensor perturbed and updated, refreshed every 20 steps
    "one_sided_zscore_mask": (["optimizer.estimator=one_sided", "optimizer.population=zscore", "optimizer.k=4",
                               "optimizer.lr=1e-3", "optimizer.mask_keep=0.2", "optimizer.mask_every=20"], 4,
                              "one-sided, 4 directions, z-scores, lr 1e-3, 20 % masks"),
    # A z-scored step has the same length whatever the gradient: annealed, lr 1e-3 falls linearly to 0 at 1200 forwards
    "one_sided_zscore_decay": (["optimizer.estimator=one_sided", "optimizer.population=zscore", "optimizer.k=4",
                                "optimizer.lr=1e-3", "scheduler={_target_:torch.optim.lr_scheduler.LinearLR,"
                                "_partial_:true,start_factor:1.0,end_factor:0.0,total_iters:240}"], 4,
                               "one-sided, 4 directions, z-scores, lr 1e-3 falling linearly to 0 at 1200 forwards"),
}
COMPARED = ("spsa", "momentum", "normalized", "adam")  # the update rules' comparison (issue 15)
# A larger step for `normalized` (on TREC lr 5e-4 over its RMS is plain SPSA's own step): SST-2 and TREC.
LARGER_STEP = "normalized_lr1e-3"
POPULATIONS = ("one_sided_zscore", "one_sided_rank", "one_sided_zscore_mask",  # issue 44
               "one_sided_zscore_decay")
RULES = ("momentum", "normalized", LARGER_STEP, *POPULATIONS)  # the methods held to the targets
SHOWN = ("spsa", *POPULATIONS, "momentum", "normalized", LARGER_STEP, "adam")  # the tables' rows, where runs exist
# The order the runs are made in: issue 44's comparison first (plain SPSA, the best new setting, the first-order
# reference; SST-2, then TREC), so that a machine that runs out of time leaves whole comparisons behind.
FIRST = ("spsa", "one_sided_zscore", "adam")
PLAN = ([(t, m, s) for t in ("sst2", "trec") for m in FIRST for s in (0, 1, 2)]
        + [(t, m, s) for t in ("sst2", "trec") for m in (*POPULATIONS, *COMPARED, LARGER_STEP) if m not in FIRST
           for s in (0, 1, 2)]
        + [(t, m, s) for t in ("rte",) for s in (0, 1, 2) for m in COMPARED]
        + [("copa", "spsa", 0), ("sst2", "spsa_accuracy", 0), ("sst2", "spsa_accuracy_eps", 0)])


def forwards_per_step(method: str) -> int:
    """Forward passes per rank and step, from the method's overrides (the first-order reference: one, and a
    backward); a run's own summary says it too (`forwards`)."""
    overrides = dict(o.split("=", 1) for o in METHODS[method][0])
    if overrides.get("optimizer") == "adam":
        return 1
    k = int(overrides.get("optimizer.k", 1))
    return k + 1 if overrides.get("optimizer.estimator") == "one_sided" else 2 * k


def validate_every(method: str) -> int:
    """Steps between validations: every EVERY_FORWARDS forwards (the first-order reference: every EVERY steps)."""
    return EVERY if method == "adam" else max(1, EVERY_FORWARDS // forwards_per_step(method))


# Every ZO method gets plain SPSA's forwards; the first-order reference its 100 steps (issue 44's reference point)
STEPS_OF = {m: 100 if m == "adam" else FORWARDS // forwards_per_step(m) for m in METHODS}
COMMON = ["model=smollm2", "data.batch_size=8", "trainer.enable_progress_bar=false",
          "+callbacks.run_summary.save_weights=false"]


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / method / f"seed{seed}"


def command(data: Path, out: Path, task: str, method: str, seed: int, steps: int = STEPS) -> list[str]:
    overrides = [f"task={task}", f"task.data_dir={data / task}", *COMMON, f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={validate_every(method)}",
                 *(f"{k}={v}" for k, v in TASKS[task].items()), *METHODS[method][0], f"seed={seed}",
                 f"hydra.run.dir={run_dir(out, task, method, seed)}"]
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def finished(where: Path, steps: int) -> bool:
    """A run that reached its steps; one stopped by a signal, or asked for more steps now, continues from its log."""
    summary = where / "summary.rank0.json"
    if not summary.exists():
        return False
    done = json.loads(summary.read_text())
    return not done.get("stopped_by_signal") and done.get("steps", 0) >= steps


def run(args) -> None:
    jobs = [(t, m, s) for t, m, s in PLAN if t in args.tasks and m in args.methods and s in args.seeds]
    for i, (task, method, seed) in enumerate(jobs, 1):
        where = run_dir(args.out, task, method, seed)
        if finished(where, args.steps[method]):
            print(f"[{i}/{len(jobs)}] {task} {method} seed {seed}: done before, skipped", flush=True)
            continue
        where.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with (where / "stdout.log").open("a") as log:  # a continued run appends
            rc = subprocess.call(command(args.data, args.out, task, method, seed, args.steps[method]), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.monotonic() - started
        before = json.loads((where / "wall.json").read_text())["wall_s"] if (where / "wall.json").exists() else 0
        (where / "wall.json").write_text(json.dumps({"wall_s": round(before + wall, 1), "rc": rc}))  # every start's
        print(f"[{i}/{len(jobs)}] {task} {method} seed {seed}: rc {rc}, {wall:.0f} s", flush=True)
        if rc:
            sys.exit(f"{where}: the run failed (rc {rc}); see {where / 'stdout.log'}")


# ------------------------------------------------------------------------------------------------------ page


def steps_trained(where: Path, summary: dict) -> int:
    """The steps that the start which wrote the summary trained, which its `train_seconds` timed: the summary says so;
    an older one's run says in train.log how many steps that start replayed (the last resume that replayed fewer than
    the summary's steps: a start still under way, continuing the summary's run, replayed all of them)."""
    if "steps_trained" in summary:
        return summary["steps_trained"]
    log = where / "train.log"
    replayed = [int(n) for n in re.findall(r"replayed (\d+) steps", log.read_text())] if log.exists() else []
    replayed = [n for n in replayed if n < summary["steps"]]
    return summary["steps"] - replayed[-1] if replayed else summary["steps"]


def load(out: Path, task: str, method: str, seeds: list[int]) -> list[dict]:
    """The finished runs of one (task, method): summary, accuracy curve, wall time."""
    from lightning_zo.report import _metrics, accuracy_curve

    runs = []
    for seed in seeds:
        where = run_dir(out, task, method, seed)
        if not (where / "summary.rank0.json").exists():
            continue
        summary = json.loads((where / "summary.rank0.json").read_text())
        wall = json.loads((where / "wall.json").read_text())["wall_s"] if (where / "wall.json").exists() else None
        rows = _metrics(where)
        curve = dict(accuracy_curve(rows, summary))
        # runs made before forwards were counted: the method's own count
        per_step = summary["forwards"] / summary["steps"] if summary.get("steps") and "forwards" in summary \
            else forwards_per_step(method)
        tokens = sum(float(r["train/tokens"]) for r in rows if r.get("train/tokens")) if "forwards" in summary else 0
        seconds_per_step = summary["train_seconds"] / max(1, steps_trained(where, summary))
        runs.append({"seed": seed, "method": method, "summary": summary, "curve": curve, "wall_s": wall,
                     "seconds_per_forward": seconds_per_step / per_step,
                     "wall_per_forward": wall / (summary["steps"] * per_step) if wall else None,
                     "forwards": {round(step * per_step): acc for step, acc in curve.items()},
                     "tokens_per_forward": tokens / summary["forwards"] if tokens else None})
    return runs


def mean_spread(values: list[float]) -> str:
    """`mean ± sample standard deviation` in percent (one run: its value)."""
    if not values:
        return ""
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def percent(run: dict, step: int) -> str:
    return f"{100 * run['curve'][step]:.0f}" if step in run["curve"] else ""


def at(runs: list[dict], forwards: int) -> list[float]:
    return [r["forwards"][forwards] for r in runs if forwards in r["forwards"]]


def table(out: Path, task: str, methods: list[str], seeds: list[int]) -> tuple[list[str], dict, dict]:
    """Markdown rows for one task (accuracy at the COLUMNS some run reached), and the mean accuracy per (method,
    forwards) over the forwards every seed of the method reached (where the seeds compare), and its seeds."""
    loaded = {m: runs for m in methods if (runs := load(out, task, m, seeds))}
    reached = {f for runs in loaded.values() for r in runs for f in r["forwards"]}
    columns = [f for f in COLUMNS if f in reached]
    head = ["| method | forwards / step | tokens / forward | bytes / rank / step | seeds | zero-shot | "
            + " | ".join(f"{f}" for f in columns) + " | train s / forward | wall / 1000 forwards |",
            "|---|---|---|---|---|---|" + "---|" * len(columns) + "---|---|"]
    means, seeds_of, rows = {}, {}, []
    for method, runs in loaded.items():
        cells = [mean_spread(at(runs, f)) for f in columns]
        seeds_of[method] = len(runs)
        means[method] = {f: statistics.mean(at(runs, f)) for f in sorted({f for r in runs for f in r["forwards"]})
                         if len(at(runs, f)) == len(runs)}
        walls = [r["wall_per_forward"] for r in runs if r["wall_per_forward"]]
        summary = runs[0]["summary"]
        per_step = summary.get("payload_bytes_per_step", 0) // max(1, summary.get("world_size", 1))
        wire = f"{per_step} B" if method != "adam" else \
            f"0 (one rank; data-parallel: {summary['gradient_bytes_per_rank_per_step'] / 1e6:.0f} MB)"
        tokens = [r["tokens_per_forward"] for r in runs if r["tokens_per_forward"]]
        per_forward = statistics.mean(r["seconds_per_forward"] for r in runs)
        rows.append(f"| {METHODS[method][2]} | {forwards_per_step(method)}{' + backward' if method == 'adam' else ''}"
                    f" | {f'{statistics.mean(tokens):.0f}' if tokens else ''} | {wire} | {len(runs)} | "
                    f"{mean_spread(at(runs, 0))} | " + " | ".join(cells) + f" | {per_forward:.2f} | "
                    + (f"{1000 * statistics.mean(walls) / 60:.1f} min |" if walls else " |"))
    return head + rows, means, seeds_of


def plots(out: Path, page_dir: Path, tasks: list[str], methods: list[str], seeds: list[int]) -> list[str]:
    """accuracy vs forwards and vs bytes per rank, one panel per task: seed mean, min-max band."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not tasks:
        return []
    for name, xlabel in (("forwards", "forward passes per rank"), ("bytes", "bytes each rank sends (log scale)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for method in methods:
                runs = load(out, task, method, seeds)
                if not runs:
                    continue
                key = "forwards" if name == "forwards" else "curve"  # accuracy by forwards, or by step
                # the mean of the seeds that reached a point (one seed past the seeds' common budget); band: min-max
                points = sorted(set.union(*(set(r[key]) for r in runs)))
                per_step = (runs[0]["summary"]["gradient_bytes_per_rank_per_step"] if method == "adam"
                            else runs[0]["summary"]["payload_bytes_per_step"])
                if name == "bytes":
                    points = [p for p in points if p > 0]
                xs = [p * per_step if name == "bytes" else p for p in points]
                values = [[r[key][p] for r in runs if p in r[key]] for p in points]
                color = f"C{methods.index(method)}"  # one colour per method in every panel
                ax.plot(xs, [statistics.mean(v) for v in values], marker="o", markersize=3, color=color,
                        label=method + (" (data-parallel gradients)" if name == "bytes" and method == "adam" else ""))
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15)
            ax.set(title=task.upper(), xlabel=xlabel, ylabel="validation accuracy")
            if name == "bytes":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        page_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(page_dir / f"accuracy_vs_{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"accuracy_vs_{name}.png")
    return written


def copa_and_objective(out: Path) -> list[str]:
    """Issue 17: COPA zero-shot and trained; SST-2 trained on minus the batch accuracy against cross-entropy."""
    from lightning_zo.report import _metrics

    lines = []
    copa = load(out, "copa", "spsa", [0])
    if copa:
        run = copa[0]
        points = " / ".join(percent(run, s) for s in range(EVERY, run["summary"]["steps"] + 1, EVERY))
        wall = f"{run['wall_s'] / 60:.1f} min" if run["wall_s"] else ""
        lines += ["### COPA (multiple choice), plain SPSA, seed 0", "",
                  "| zero-shot | accuracy at 50 / 100 / ... / 300 steps | wall |", "|---|---|---|",
                  f"| {percent(run, 0)} | {points} | {wall} |", ""]
    pair = [(name, load(out, "sst2", method, [0])) for name, method in
            (("cross-entropy, ε 1e-3", "spsa"), ("minus the batch accuracy, ε 1e-3", "spsa_accuracy"),
             ("minus the batch accuracy, ε 1e-2", "spsa_accuracy_eps"))]
    pair = [(name, runs) for name, runs in pair if runs]
    if len(pair) > 1:
        lines += ["### SST-2: the objective, plain SPSA, seed 0", "",
                  "| objective | zero-shot | 50 | 100 | 150 | 200 | 250 | 300 | steps with ĝ exactly 0 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, (run,) in pair:
            grads = [float(r["train/projected_grad"]) for r in _metrics(run_dir(out, "sst2", run["method"], 0))
                     if r.get("train/projected_grad")]
            cells = " | ".join(percent(run, s) for s in range(0, 301, EVERY))  # issue 17: 300 steps
            lines.append(f"| {name} | {cells} | {sum(g == 0 for g in grads)} of {len(grads)} |")
        lines.append("")
    return lines


def targets(means: dict, seeds_of: dict) -> list[str]:
    """Issue 44's targets per method, on the means over every seed: plain SPSA's best accuracy in at least 2x fewer
    forwards, and within 3 points of the first-order reference's 100-step accuracy."""
    spsa = {f: v for f, v in means.get("spsa", {}).items() if f > 0}
    if not spsa:
        return []
    best = max(spsa.values())
    spent = min(f for f, v in spsa.items() if v >= best)
    adam = means.get("adam", {}).get(100)
    lines = []
    for method in [m for m in RULES if m in means]:
        reached = [f for f, v in sorted(means[method].items()) if f > 0 and v >= best]
        top = max(means[method].values())
        at_top = min(f for f, v in means[method].items() if v == top)
        if reached:
            first = reached[0]
            ratio = f"{spent / first:.1f}x fewer" if first <= spent else f"{first / spent:.1f}x more"
            speed = (f"reached at {first} forwards, {ratio} "
                     f"({'target met' if spent >= 2 * first else 'target of 2x not met'})")
        else:
            speed = f"not reached within {max(means[method])} forwards"
        gap = "" if adam is None else (
            f"; its best mean, {100 * top:.1f} % at {at_top} forwards, is {100 * (adam - top):.1f} points below Adam's "
            f"100-step {100 * adam:.1f} % ({'target met' if adam - top <= 0.03 else 'target of 3 points not met'})")
        one = " (one seed)" if seeds_of[method] == 1 else ""
        lines.append(f"- {method}{one}: plain SPSA's best mean ({100 * best:.1f} % at {spent} forwards) {speed}{gap}")
    return lines + [""]


def page(args) -> None:
    """The tables, the target check and the plots, into args.page (and its results/ folder)."""
    lines = []
    for task in [t for t in args.tasks if t != "copa"]:
        rows, means, seeds_of = table(args.out, task, [m for m in SHOWN if m in args.methods], args.seeds)
        if not rows[2:]:
            continue
        lines += [f"### {task.upper()}", "", *rows, ""]
        lines += targets(means, seeds_of)
    images = plots(args.out, args.page.parent / "results", [t for t in args.tasks if t != "copa"],
                   [m for m in SHOWN if m in args.methods], args.seeds)
    lines += [f"![accuracy vs {name[12:-4]}](results/{name})" for name in images] + [""]
    lines += copa_and_objective(args.out)
    text = args.page.read_text() if args.page.exists() else ""
    begin, end = "<!-- results.py: begin -->", "<!-- results.py: end -->"
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    args.page.write_text(text)
    print(f"wrote {args.page}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "page"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("RESULTS_DIR", "results")))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default: FORWARDS forwards per ZO method, 100 for adam; see STEPS_OF)")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.steps = {m: args.steps or STEPS_OF[m] for m in METHODS}
    if args.what == "run":
        run(args)
    else:
        page(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

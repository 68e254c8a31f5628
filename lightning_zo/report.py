"""Compare runs: a markdown table and plots of accuracy against steps and against bytes exchanged.

    python -m lightning_zo.report RUN_DIR [RUN_DIR ...] [--out DIR]

A directory holding several runs (a Hydra multirun) is expanded. Each run is labelled by its command-line
overrides (.hydra/overrides.yaml). Writes DIR/report.md, DIR/accuracy_vs_steps.png, DIR/accuracy_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .cli import user_errors
from .core.errors import UserError


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if (path / "summary.rank0.json").exists():
            runs.append(path)
        else:
            found = sorted(p.parent for p in path.rglob("summary.rank0.json"))
            if not found:
                raise UserError(f"{path}: no run found (no summary.rank0.json below it)")
            runs += found
    return runs


def label(run: Path) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.exists():
        items = [line.strip()[2:] for line in overrides.read_text().splitlines() if line.strip().startswith("- ")]
        items = [i for i in items if not i.startswith("hydra.")]
        if items:
            return " ".join(items)
    return run.name


def curve(run: Path, summary: dict) -> list[tuple[int, float]]:
    """(step, validation accuracy): zero-shot at 0, Lightning's val/acc checks, the final accuracy."""
    points = [(0, summary["val_acc_zero_shot"])] if "val_acc_zero_shot" in summary else []
    metrics = run / "csv" / "metrics.csv"
    if metrics.exists():
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("val/acc"):
                    points.append((int(row["step"]) + 1, float(row["val/acc"])))
    points.append((summary["steps"], summary["val_acc_final"]))
    return sorted(dict(points).items())


def build_report(runs: list[Path], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = ["| run | world size × k | codec | steps | bytes/step | zero-shot acc | final acc | weights_sha256 |",
            "|---|---|---|---|---|---|---|---|"]
    fig_s, ax_s = plt.subplots(figsize=(7, 4.5))
    fig_b, ax_b = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        s = json.loads((run / "summary.rank0.json").read_text())
        name = label(run)
        zero = s.get("val_acc_zero_shot")
        rows.append(f"| {name} | {s['world_size']} × {s['k']} | {s['codec']} | {s['steps']} | "
                    f"{s['payload_bytes_per_step']} | {'' if zero is None else f'{zero:.3f}'} | "
                    f"{s['val_acc_final']:.3f} | `{s['weights_sha256'][:12]}` |")
        points = curve(run, s)
        steps = [p[0] for p in points]
        accs = [p[1] for p in points]
        ax_s.plot(steps, accs, marker="o", label=name)
        ax_b.plot([x * s["payload_bytes_per_step"] for x in steps], accs, marker="o", label=name)
    for ax, xlabel in ((ax_s, "training steps"), (ax_b, "bytes exchanged (all-reduce payload, all ranks)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_b.set_xscale("symlog")
    fig_s.tight_layout()
    fig_b.tight_layout()
    fig_s.savefig(out / "accuracy_vs_steps.png", dpi=120)
    fig_b.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close("all")
    table = "\n".join(rows) + "\n"
    (out / "report.md").write_text(table + "\n![accuracy vs steps](accuracy_vs_steps.png)\n"
                                   "![accuracy vs bytes](accuracy_vs_bytes.png)\n")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or directories of runs)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the PNGs go")
    args = parser.parse_args(argv)
    with user_errors():
        print(build_report(find_runs(args.runs), args.out), end="")
    print(f"wrote {args.out}/report.md, accuracy_vs_steps.png, accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

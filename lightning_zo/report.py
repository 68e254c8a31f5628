"""Compare runs: a markdown table and plots of accuracy against steps, forward passes and bytes on the wire, and
loss against steps.

    python -m lightning_zo.report RUN_DIR [RUN_DIR ...] [--out DIR] [--bytes-axis auto|linear|log]

A directory holding several runs (a Hydra multirun) is expanded. Runs are labelled by what differs between their
configs (RUN_DIR/.hydra/config.yaml), e.g. `lr=1e-05, k=4`. Writes DIR/report.md, DIR/accuracy_vs_steps.png,
DIR/accuracy_vs_bytes.png, DIR/accuracy_vs_forwards.png (the runs whose summary counts `forwards`: a forward costs
the same whatever the update rule) and, where RUN_DIR/csv/metrics.csv has train/loss, DIR/loss_vs_steps.png. Without
matplotlib the table is still written and one line says why there are no plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .cli import user_errors
from .core.errors import UserError

# Config keys that never tell runs apart (paths derived from the run directory, Hydra's own settings).
IGNORED = ("hydra.", "trainer.default_root_dir", "logger.save_dir")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", "-.", ":")


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


def _flatten(node, prefix: str = "") -> dict[str, object]:
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out |= _flatten(v, f"{prefix}{k}.")
    else:
        out[prefix[:-1]] = node
    return out


def run_config(run: Path) -> dict[str, object]:
    """The run's composed config, flattened to dotted keys (unresolved, as Hydra saved it); {} if absent."""
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def _value(key: str, value) -> str:
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def labels(configs: list[dict[str, object]], names: list[str]) -> list[str]:
    """Short legends from the config keys whose values differ between runs: `lr=1e-05, k=4`. A group's choice
    (its `_target_`) shows as the group's name; a key's last part stands for it unless two keys share that part.
    Runs whose configs are identical keep their directory names."""
    keys = sorted({k for c in configs for k in c if not k.startswith(IGNORED)})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    # A group chosen differently changes all its keys: its _target_ (or name) says it, the rest is noise.
    groups = {k.rsplit(".", 1)[0] for k in differing if k.endswith("._target_")}
    differing = [k for k in differing if k.endswith("._target_") or k.rsplit(".", 1)[0] not in groups]

    def short(key: str) -> str:
        if key.endswith("._target_"):
            return key.rsplit(".", 2)[-2]
        last = key.rsplit(".", 1)[-1]
        return last if sum(k.rsplit(".", 1)[-1] == last for k in differing) == 1 else key

    out = []
    for config, name in zip(configs, names):
        parts = [f"{short(k)}={_value(k, config.get(k))}" for k in differing]
        out.append(", ".join(parts) if parts else name)
    if len(set(out)) < len(out):  # still ambiguous (e.g. reruns of one config): add the directory
        out = [f"{label} ({name})" if out.count(label) > 1 else label for label, name in zip(out, names)]
    return out


def _metrics(run: Path) -> list[dict[str, str]]:
    path = run / "csv" / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def accuracy_curve(rows: list[dict[str, str]], summary: dict) -> list[tuple[int, float]]:
    """(step, validation accuracy): zero-shot at 0, Lightning's val/acc checks, the final accuracy."""
    points = [(0, summary["val_acc_zero_shot"])] if "val_acc_zero_shot" in summary else []
    for row in rows:
        if row.get("val/acc"):
            points.append((int(row["step"]) + 1, float(row["val/acc"])))
    if "val_acc_final" in summary:
        points.append((summary["steps"], summary["val_acc_final"]))
    return sorted(dict(points).items())


def curve(run: Path, summary: dict) -> list[tuple[int, float]]:
    return accuracy_curve(_metrics(run), summary)


def loss_curve(rows: list[dict[str, str]]) -> list[tuple[int, float]]:
    return sorted({int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}.items())


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def _bytes_scale(payloads: list[float], choice: str) -> str:
    """log10 when the runs' bytes per step differ 8x or more (a linear axis would squash the cheap runs)."""
    positive = [p for p in payloads if p > 0]
    if choice != "auto":
        return choice
    return "log" if positive and max(positive) / min(positive) >= 8 else "linear"


def _plots(out: Path, series: list[dict], bytes_axis: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    def style(i: int, n: int) -> dict:
        # Curves that coincide stay visible: each run its own marker and line style, hollow markers shrinking
        # with the run's index so that one drawn later does not cover an earlier one.
        return dict(marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                    markersize=max(3.0, 8.0 - 4.0 * i / max(1, n - 1)), markerfacecolor="none", linewidth=1.4,
                    alpha=0.9)

    written = []

    def save(fig, ax, name: str, grid: str = "major", **labels) -> None:
        ax.set(**labels)
        ax.grid(alpha=0.3, which=grid)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        written.append(name)
        plt.close(fig)

    n = len(series)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(series):
        steps, accs = zip(*s["acc"]) if s["acc"] else ((), ())
        ax.plot(steps, accs, label=s["label"], **style(i, n))
    save(fig, ax, "accuracy_vs_steps.png", title="Validation accuracy vs training steps", xlabel="training step",
         ylabel="validation accuracy")

    scale = _bytes_scale([s["bytes_per_step"] for s in series], bytes_axis)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(series):
        pts = [(step * s["bytes_per_step"], acc) for step, acc in s["acc"]]
        if scale == "log":
            pts = [p for p in pts if p[0] > 0]  # the zero-shot point sent nothing: no place on a log axis
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=f"{s['label']} ({s['bytes_per_step']} B/step)", **style(i, n))
    if scale == "log":
        ax.set_xscale("log", base=10)
        ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
    save(fig, ax, "accuracy_vs_bytes.png", grid="both" if scale == "log" else "major",
         title="Validation accuracy vs bytes on the wire (all-reduce payload, all ranks)",
         xlabel=f"bytes sent in training steps ({'log10' if scale == 'log' else 'linear'} scale)",
         ylabel="validation accuracy")

    counted = [s for s in series if s["forwards_per_step"]]  # runs made before forwards were counted: not here
    if counted:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, s in enumerate(counted):
            xs, ys = zip(*[(step * s["forwards_per_step"], acc) for step, acc in s["acc"]]) if s["acc"] else ((), ())
            ax.plot(xs, ys, label=f"{s['label']} ({s['forwards_per_step']:g} forwards/step)", **style(i, n))
        save(fig, ax, "accuracy_vs_forwards.png", title="Validation accuracy vs forward passes",
             xlabel="forward passes per rank", ylabel="validation accuracy")

    with_loss = [s for s in series if s["loss"]]
    if with_loss:
        window = max(1, max(len(s["loss"]) for s in with_loss) // 25)
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, s in enumerate(with_loss):
            steps, losses = zip(*s["loss"])
            line, = ax.plot(steps, _moving_average(list(losses), window), label=s["label"],
                            **(style(i, len(with_loss)) | {"markevery": max(1, len(steps) // 12)}))
            if window > 1:
                ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
        save(fig, ax, "loss_vs_steps.png", xlabel="training step", ylabel="train/loss (on each step's batch)",
             title="Training loss vs steps" + (f" (moving average of {window} steps; raw, faint)" if window > 1
                                               else ""))
    return written


def build_report(runs: list[Path], out: Path, bytes_axis: str = "auto") -> tuple[str, list[str], str | None]:
    """(markdown table, PNG files written, why there are no plots or None)."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = [json.loads((run / "summary.rank0.json").read_text()) for run in runs]
    names = [run.name for run in runs]
    legends = labels([run_config(run) for run in runs], names)
    rows = ["| run | dir | world size × k | codec | steps | forwards | bytes/step | zero-shot acc | final acc | "
            "weights_sha256 |", "|---|---|---|---|---|---|---|---|---|---|"]
    series = []
    for run, s, legend in zip(runs, summaries, legends):
        zero = s.get("val_acc_zero_shot")
        final = s.get("val_acc_final")
        rows.append(f"| {legend} | `{run}` | {s.get('world_size', '')} × {s.get('k', '')} | {s.get('codec', '')} | "
                    f"{s['steps']} | {s.get('forwards', '')} | {s.get('payload_bytes_per_step', '')} | "
                    f"{'' if zero is None else f'{zero:.3f}'} | {'' if final is None else f'{final:.3f}'} | "
                    f"`{s.get('weights_sha256', '')[:12]}` |")
        metrics = _metrics(run)
        series.append({"label": legend, "acc": accuracy_curve(metrics, s), "loss": loss_curve(metrics),
                       "bytes_per_step": s.get("payload_bytes_per_step", 0),
                       "forwards_per_step": s["forwards"] / s["steps"] if s.get("forwards") and s["steps"] else None})
    table = "\n".join(rows) + "\n"
    try:
        written, why = _plots(out, series, bytes_axis), None
    except ImportError as e:
        if e.name is None or not e.name.startswith("matplotlib"):
            raise
        written, why = [], 'matplotlib is not installed (pip install "lightning-zo[report]")'

    images = "".join(f"\n![{name[:-4].replace('_', ' ')}]({name})\n" for name in written)
    (out / "report.md").write_text(table + images + (f"\nNo plots: {why}.\n" if why else ""))
    return table, written, why


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or directories of runs)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.md and the PNGs go")
    parser.add_argument("--bytes-axis", choices=("auto", "linear", "log"), default="auto",
                        help="x axis of accuracy vs bytes (auto: log10 when bytes per step differ 8x or more)")
    args = parser.parse_args(argv)
    with user_errors():
        table, written, why = build_report(find_runs(args.runs), args.out, args.bytes_axis)
    print(table, end="")
    print(f"wrote {args.out}/report.md" + "".join(f", {name}" for name in written))
    if why:
        print(f"no plots: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


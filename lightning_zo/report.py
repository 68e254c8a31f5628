"""Compare runs: a markdown table and plots of accuracy against steps and forward passes (and bytes on the wire for
runs that sent any), and loss against steps.

    python -m lightning_zo.report RUN_DIR [RUN_DIR ...] [--out DIR] [--bytes-axis auto|linear|log]

A directory holding several runs (a Hydra multirun) is expanded. Runs are labelled by their task, update rule and
seed, then by what else differs between their configs (RUN_DIR/.hydra/config.yaml), e.g. `sentiment, rule=sgd,
seed=0, lr=1e-05`. Writes into DIR (default: RUN_DIR/report; with several RUN_DIRs --out is required) report.md,
accuracy_vs_steps.png, accuracy_vs_forwards.png (the runs whose summary counts `forwards`: a forward costs the same
whatever the update rule), accuracy_vs_bytes.png (only runs of several ranks, which sent bytes) and, where
RUN_DIR/csv/metrics.csv has train/loss, loss_vs_steps.png. An accuracy is drawn with a band of one binomial standard
error where the summary says how many validation examples it was measured on. Without matplotlib the table is still
written and one line says why there are no plots.
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


# What every legend starts with: the task, the update rule (the first-order reference: its optimizer), the seed.
IDENTITY = ("task.name", "optimizer.rule", "optimizer._target_", "seed")


def _identity(config: dict[str, object]) -> list[str]:
    task, rule, seed = config.get("task.name"), config.get("optimizer.rule"), config.get("seed")
    if rule is None and config.get("optimizer._target_"):
        rule = _value("optimizer._target_", config["optimizer._target_"])
    return [part for part, value in ((f"{task}", task), (f"rule={rule}", rule), (f"seed={seed}", seed))
            if value is not None]


def labels(configs: list[dict[str, object]], names: list[str]) -> list[str]:
    """Legends: task, rule and seed (_identity), then the config keys whose values differ between runs: `sentiment,
    rule=sgd, seed=0, lr=1e-05, k=4`. A group's choice (its `_target_`) shows as the group's name; a key's last part
    stands for it unless two keys share that part. Runs that still read alike (reruns of one config) add their
    directory names; a run without a config is its directory name."""
    keys = sorted({k for c in configs for k in c if not k.startswith(IGNORED)})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    # A group chosen differently changes all its keys: its _target_ (or name) says it, the rest is noise.
    groups = {k.rsplit(".", 1)[0] for k in differing if k.endswith("._target_")}
    differing = [k for k in differing if k.endswith("._target_") or k.rsplit(".", 1)[0] not in groups]

    def short(key: str) -> str:
        if key.endswith("._target_"):
            return key.rsplit(".", 2)[-2]
        last = key.rsplit(".", 1)[-1]  # the legend's own seed=... counts: model.seed stays model.seed
        return last if sum(k.rsplit(".", 1)[-1] == last for k in {*differing, *IDENTITY}) == 1 else key

    out = []
    for config, name in zip(configs, names):
        parts = _identity(config) + [f"{short(k)}={_value(k, config.get(k))}" for k in differing if k not in IDENTITY]
        out.append(", ".join(parts) if parts else name)
    if len(set(out)) < len(out):  # still ambiguous (e.g. reruns of one config): add the directory
        out = [f"{label} ({name})" if out.count(label) > 1 and label != name else label
               for label, name in zip(out, names)]
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
    """Trailing means over full windows only (len(values) - window + 1 of them): a mean of the first few batches
    would draw one batch's loss as the curve's start."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def standard_error(accuracy: float, examples: int) -> float:
    """One binomial standard error of an accuracy measured on `examples` examples."""
    return (accuracy * (1 - accuracy) / examples) ** 0.5


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
        # with the run's index so that one drawn later does not cover an earlier one. A marker is a measurement.
        return dict(marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                    markersize=max(3.0, 8.0 - 4.0 * i / max(1, n - 1)), markerfacecolor="none", linewidth=1.4,
                    alpha=0.9)

    written = []
    banded = any(s["val_examples"] for s in series)
    band_note = " (band: ±1 binomial standard error)" if banded else ""

    def save(fig, ax, name: str, grid: str = "major", **labels) -> None:
        ax.set(**labels)
        ax.grid(alpha=0.3, which=grid)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        written.append(name)
        plt.close(fig)

    def accuracy(ax, s: dict, xs, i: int, n: int, label: str) -> None:
        accs = [acc for _, acc in s["acc"]]
        if s["val_examples"]:
            label += f", {s['val_examples']} validation examples"
        line, = ax.plot(xs, accs, label=label, **style(i, n))
        if s["val_examples"]:
            se = [standard_error(a, s["val_examples"]) for a in accs]
            ax.fill_between(xs, [a - e for a, e in zip(accs, se)], [a + e for a, e in zip(accs, se)],
                            color=line.get_color(), alpha=0.12, linewidth=0)

    def forwards_axis(ax, runs: list[dict]) -> None:
        """Forward passes on a second x axis where every run costs the same per step."""
        per_step = {s["forwards_per_step"] for s in runs}
        if len(per_step) == 1 and None not in per_step:
            f = per_step.pop()
            top = ax.secondary_xaxis("top", functions=(lambda x: x * f, lambda x: x / f))
            top.set_xlabel(f"forward passes per rank ({f:g} per step)")

    n = len(series)
    acc_label = "validation accuracy" + band_note
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(series):
        accuracy(ax, s, [step for step, _ in s["acc"]], i, n, s["label"])
    forwards_axis(ax, series)
    save(fig, ax, "accuracy_vs_steps.png", title="Validation accuracy vs training steps", xlabel="training step",
         ylabel=acc_label)

    counted = [s for s in series if s["forwards_per_step"]]  # runs made before forwards were counted: not here
    if counted:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, s in enumerate(counted):
            accuracy(ax, s, [step * s["forwards_per_step"] for step, _ in s["acc"]], i, len(counted),
                     f"{s['label']} ({s['forwards_per_step']:g} forwards/step)")
        save(fig, ax, "accuracy_vs_forwards.png", title="Validation accuracy vs forward passes",
             xlabel="forward passes per rank", ylabel=acc_label)

    # One rank sends nothing: its accuracy against bytes would be a line at x = 0 bytes, or a made-up payload.
    sent = [s for s in series if s["world_size"] > 1 and s["bytes_per_step"]]
    if sent:
        scale = _bytes_scale([s["bytes_per_step"] for s in sent], bytes_axis)
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, s in enumerate(sent):
            pts = [(step * s["bytes_per_step"], acc) for step, acc in s["acc"]]
            if scale == "log":
                pts = [p for p in pts if p[0] > 0]  # the zero-shot point sent nothing: no place on a log axis
            if pts:
                accuracy(ax, s | {"acc": pts}, [x for x, _ in pts], i, len(sent),
                         f"{s['label']} ({s['bytes_per_step']} B/step)")
        if scale == "log":
            ax.set_xscale("log", base=10)
            ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x)))
        save(fig, ax, "accuracy_vs_bytes.png", grid="both" if scale == "log" else "major",
             title="Validation accuracy vs bytes on the wire (all-reduce payload, all ranks)",
             xlabel=f"bytes sent in training steps ({'log10' if scale == 'log' else 'linear'} scale)",
             ylabel=acc_label)

    with_loss = [s for s in series if s["loss"]]
    if with_loss:
        window = max(1, max(len(s["loss"]) for s in with_loss) // 25)
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, s in enumerate(with_loss):
            steps, losses = zip(*s["loss"])
            lines = style(i, len(with_loss)) | {"marker": None}  # a point every step: markers would be noise
            if window > 1 and len(losses) >= window:
                line, = ax.plot(steps[window - 1:], _moving_average(list(losses), window), label=s["label"], **lines)
                ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
            else:
                ax.plot(steps, losses, label=s["label"], **lines)
        forwards_axis(ax, with_loss)
        save(fig, ax, "loss_vs_steps.png", xlabel="training step", ylabel="train/loss (on each step's batch)",
             title="Training loss vs steps" + (f" (mean of the last {window} steps; raw, faint)" if window > 1
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
                       "bytes_per_step": s.get("payload_bytes_per_step", 0), "world_size": s.get("world_size", 1),
                       "val_examples": s.get("val_examples"),
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
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and the PNGs go (default: RUN_DIR/report, for one RUN_DIR)")
    parser.add_argument("--bytes-axis", choices=("auto", "linear", "log"), default="auto",
                        help="x axis of accuracy vs bytes (auto: log10 when bytes per step differ 8x or more)")
    args = parser.parse_args(argv)
    with user_errors():
        if args.out is None:  # under the run (or the sweep) it reports on, never the current directory
            if len(args.runs) > 1:
                raise UserError("several run directories: name the report's directory with --out DIR")
            args.out = args.runs[0] / "report"
        table, written, why = build_report(find_runs(args.runs), args.out, args.bytes_axis)
    print(table, end="")
    print(f"wrote {args.out}/report.md" + "".join(f", {name}" for name in written))
    if why:
        print(f"no plots: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


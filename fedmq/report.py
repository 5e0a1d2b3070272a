"""``fedmq report``: PNG plots of a training run, drawn from the aggregator's model registry.

Reads only: the registry rows (one per published model version, with the round's metrics in
``info``). Writes ``accuracy.png``, ``loss.png``, ``updates.png`` and ``summary.json`` to the output
directory. matplotlib is imported when a report is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from fedmq.aggregator.registry import ModelRegistry, VersionRecord
from fedmq.broker.errors import FedmqError
from fedmq.broker.files import write_atomic

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
#: plot file -> (y label, info keys drawn as one line each); eval_/test_ appear when someone recorded them
PLOTS = {
    "accuracy.png": ("accuracy", ("train_accuracy", "eval_accuracy", "test_accuracy")),
    "loss.png": ("loss", ("train_loss", "eval_loss", "test_loss")),
}
SUMMARY_KEYS = ("updates", "examples", "bytes_in", "round_seconds", "train_loss", "train_accuracy",
                "eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "mean_staleness", "max_staleness")


class ReportError(FedmqError, ValueError):
    """There is nothing to report: no registry in the directory, or no trained version yet."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def load_trained_versions(state_dir: Path) -> list[VersionRecord]:
    """The versions that came out of a round (not the initial one), oldest first."""
    state_dir = Path(state_dir)
    # check before opening: ModelRegistry would create an empty registry in a mistyped directory
    if not (state_dir / REGISTRY_FILE).is_file():
        raise ReportError(f"{state_dir} holds no model registry ({REGISTRY_FILE} is missing): pass the aggregator's "
                          "state_dir (state_dir in its TOML, /var/lib/fedmq/aggregator under systemd)")
    registry = ModelRegistry(state_dir)
    try:
        records = registry.versions()
    finally:
        registry.close()
    trained = [r for r in records if not r.info.get("initial") and "updates" in r.info]
    if not trained:
        have = f"only v{records[-1].version}, the initial model" if records else "no versions"
        raise ReportError(f"{state_dir} has {have}: nothing to plot until the aggregator has closed a round "
                          "(it needs [rounds] min_updates updates from the devices)")
    return trained


def write_report(state_dir: Path, out_dir: Path) -> list[Path]:
    """Plot the registry under ``state_dir`` into ``out_dir``; returns the files written."""
    records = load_trained_versions(state_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    versions = [r.version for r in records]
    written: list[Path] = []
    skipped: list[str] = []

    def new_axes(title: str, ylabel: str) -> tuple[Any, Any]:
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.set_title(title)
        ax.set_xlabel("model version")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
        return fig, ax

    for filename, (quantity, keys) in PLOTS.items():
        series = {key: [_number(r.info.get(key)) for r in records] for key in keys}
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        # eval_* in a version's info is the devices' evaluation of its parent, before training on it
        xs = {key: [r.parent for r in records] if key.startswith("eval_") else versions for key in series}
        if not series:
            skipped.append(filename)
            log.warning("no %s in the registry's versions: %s not written", quantity, filename)
            continue
        fig, ax = new_axes(f"{quantity} per model version", quantity)
        labels = {"eval_accuracy": "devices' evaluation before training (federated)",
                  "eval_loss": "devices' evaluation before training (federated)",
                  "train_accuracy": "after local training", "train_loss": "after local training"}
        for key, values in series.items():
            ax.plot(xs[key], [math.nan if v is None else v for v in values], marker="o", markersize=3,
                    label=labels.get(key, key.replace("_", " ")))
        if quantity == "accuracy":
            ax.set_ylim(0.0, 1.0)
        ax.legend()
        path = out_dir / filename
        fig.savefig(path, format="png")
        written.append(path)

    fig, ax = new_axes("updates aggregated per model version", "updates")
    ax.bar(versions, [r.info.get("updates", 0) for r in records], color="tab:blue")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    path = out_dir / "updates.png"
    fig.savefig(path, format="png")
    written.append(path)

    summary_path = out_dir / "summary.json"
    summary = _summary(Path(state_dir), records, [p.name for p in written], skipped)
    write_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    written.append(summary_path)
    return written


def _summary(state_dir: Path, records: list[VersionRecord], plots: list[str], skipped: list[str]) -> dict[str, Any]:
    rows = []
    for r in records:
        row: dict[str, Any] = {"version": r.version, "parent": r.parent, "created": r.created, "size": r.size}
        row.update({k: r.info[k] for k in SUMMARY_KEYS if k in r.info})
        rows.append(row)
    latest = records[-1]
    best: dict[str, dict[str, float]] = {}
    for key, better in (("train_accuracy", max), ("train_loss", min), ("eval_accuracy", max), ("eval_loss", min),
                        ("test_accuracy", max), ("test_loss", min)):
        scored = [(v, r.version) for r in records if (v := _number(r.info.get(key))) is not None]
        if scored:
            value, version = better(scored, key=lambda s: s[0])
            best[key] = {"version": version, "value": value}
    return {
        "state_dir": str(state_dir),
        "first_version": records[0].version,
        "latest_version": latest.version,
        "trained_versions": len(records),
        "total_updates": sum(int(r.info.get("updates", 0)) for r in records),
        "total_examples": sum(int(r.info.get("examples", 0)) for r in records),
        "total_bytes_in": sum(int(r.info.get("bytes_in", 0)) for r in records),
        "latest": {k: latest.info[k] for k in SUMMARY_KEYS if k in latest.info},
        "best": best,
        "plots": plots,
        "not_plotted": skipped,
        "versions": rows,
    }


def cmd_report(args: argparse.Namespace) -> int:
    """The ``fedmq report`` subcommand: write the report and print one written path per line."""
    for path in write_report(Path(args.state_dir), Path(args.out)):
        print(path)
    return 0


def add_report_command(sub: Any) -> None:
    """Register ``report`` on the CLI's subparsers object."""
    report = sub.add_parser(
        "report", help="plot accuracy, loss and updates per model version (PNG) from the aggregator's registry",
        description="Read the aggregator's model registry and write accuracy.png and loss.png (train, and eval/test "
        "when recorded, per model version), updates.png (updates aggregated per version) and summary.json to --out. "
        "Reads only; safe while the aggregator runs.")
    report.add_argument("--state-dir", required=True, metavar="DIR",
                        help="the aggregator's state_dir (e.g. /var/lib/fedmq/aggregator)")
    report.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files and summary.json")
    report.set_defaults(func=cmd_report)

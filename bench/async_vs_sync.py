"""Sync rounds against async buffered aggregation with stragglers, and the delta codecs compared.

    .venv/bin/python bench/async_vs_sync.py [--out bench-out] [--repeat 1]

Every run is a whole ``fedmq demo`` fleet (real broker, aggregator, agents; Mosquitto when it is
installed) on the same digits split, seed and initial model:

1. **Stragglers.** ``--stragglers`` of the agents are ``--slowdown`` times slower (they sleep in
   proportion to their work). Sync rounds wait for every agent; async mode publishes a version
   every ``--buffer-size`` updates and weights stale updates by 1/sqrt(1+staleness). Figure: the
   wall-clock time from the first model to the first version whose test accuracy reaches
   ``--target`` (0.93), and its ratio async/sync.
2. **Codecs.** Sync, no stragglers, ``--rounds`` rounds with each codec: bytes uploaded per update,
   total bytes to the target, final accuracy, and the ratios to fp32.

Prints tables, writes ``results.json`` and PNG plots (accuracy against wall time for each
``--mode-epochs``, accuracy against bytes uploaded) into ``--out``. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedmq.demo import DemoOptions, run_demo

CODECS = ["fp32", "fp16", "int8", "int8-block", "topk-fp32", "topk-fp16"]


def run(opts: DemoOptions, label: str) -> dict[str, Any]:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    rows = asyncio.run(run_demo(opts, say=lambda _line: None))
    elapsed = time.monotonic() - started
    clock = 0.0
    curve = []
    uploaded = 0
    for row in rows:
        clock += row.seconds
        uploaded += row.bytes_up
        curve.append({"version": row.version, "seconds": round(clock, 3), "accuracy": round(row.accuracy, 4),
                      "loss": round(row.loss, 4), "bytes_up": uploaded, "updates": row.updates})
    reached = next((p for p in curve if p["accuracy"] >= opts.target_accuracy), None) if opts.target_accuracy else None
    updates = sum(r.updates for r in rows)
    result = {
        "label": label, "mode": opts.mode, "codec": opts.codec, "final_accuracy": curve[-1]["accuracy"],
        "versions": curve[-1]["version"], "seconds_to_target": reached["seconds"] if reached else None,
        "version_at_target": reached["version"] if reached else None,
        "bytes_to_target": reached["bytes_up"] if reached else None,
        "bytes_per_update": uploaded / updates if updates else 0, "total_bytes_up": uploaded, "wall_seconds": elapsed,
        "curve": curve,
    }
    shown = f"target {reached['seconds']:.2f}s (v{reached['version']}), " if reached else (
        "target not reached, " if opts.target_accuracy else "")
    print(f" {shown}final accuracy {result['final_accuracy']:.4f}", flush=True)
    return result


def sizes_100k() -> dict[str, float]:
    """Message sizes of one update of a 101,770-parameter MLP (784-128-10), where the fixed
    per-message header (device, ids, metrics, tensor descriptors: about 0.3 to 0.8 KB) no longer
    weighs on the ratio as it does on the 6,570-parameter digits model."""
    import numpy as np

    from fedmq.broker.architecture import MLPArchitecture
    from fedmq.broker.codecs import get_codec
    from fedmq.broker.messages import UpdateMessage

    arch = MLPArchitecture(784, (128,), 10)
    rng = np.random.default_rng(0)
    delta = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in arch.param_shapes().items()}
    sizes = {codec: len(UpdateMessage("device-0001", "v12-0123456789ab", 12, 150, codec, get_codec(codec).encode(delta),
                                      {"loss": 0.1, "accuracy": 0.9}, created=1.0).encode()) for codec in CODECS}
    print(f"\none update of a {arch.num_params():,}-parameter model (784-128-10):")
    for codec, size in sizes.items():
        print(f"  {codec:<11} {size:>9} bytes  {sizes['fp32'] / size:>6.2f}x fewer than fp32")
    return {codec: float(size) for codec, size in sizes.items()}


def plot(results: list[dict[str, Any]], key: str, xlabel: str, path: Path, title: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for result in results:
        xs = [p[key] for p in result["curve"]]
        ax.plot(xs, [p["accuracy"] for p in result["curve"]], marker=".", label=result["label"])
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    if key == "bytes_up":
        ax.set_xscale("symlog")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/async_vs_sync"), help="output directory")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--stragglers", type=float, default=0.3)
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--buffer-size", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the codec runs (default 20)")
    parser.add_argument("--max-versions", type=int, default=60, help="give up on the target after this many versions")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each straggler mode; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode-epochs", type=lambda v: [int(e) for e in v.split(",")], default=[5, 20],
                        metavar="E[,E...]", help="local epochs of the straggler comparison, one pair of runs each "
                        "(default 5,20: the demo's setting, where per-version messaging is a large share of a "
                        "version's time, and one where training dominates as on real devices)")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "onnx", "wasm"])
    parser.add_argument("--skip-codecs", action="store_true")
    parser.add_argument("--skip-modes", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = DemoOptions(agents=args.agents, seed=args.seed, backend=args.backend, target_accuracy=args.target)
    report: dict[str, Any] = {"machine": {"python": sys.version.split()[0], "platform": platform.platform()},
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    if not args.skip_modes:
        print(f"stragglers: {args.stragglers:.0%} of {args.agents} agents {args.slowdown:g}x slower; target accuracy "
              f"{args.target}; local epochs {', '.join(map(str, args.mode_epochs))}", flush=True)
        summary = []
        for epochs in args.mode_epochs:
            modes: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
            for i in range(args.repeat):
                for mode in ("sync", "async"):
                    opts = DemoOptions(**{**asdict(base), "mode": mode, "stragglers": args.stragglers, "epochs": epochs,
                                          "slowdown": args.slowdown, "buffer_size": args.buffer_size,
                                          "rounds": args.max_versions})
                    label = f"{mode}, {epochs} epochs" + (f" #{i + 1}" if args.repeat > 1 else "")
                    modes[mode].append(run(opts, label))
            times = {m: [r["seconds_to_target"] for r in rs if r["seconds_to_target"] is not None]
                     for m, rs in modes.items()}
            medians = {m: statistics.median(t) if len(t) == len(modes[m]) else None for m, t in times.items()}
            ratio = medians["async"] / medians["sync"] if medians["async"] and medians["sync"] else None
            summary.append({"epochs": epochs, "runs": modes, "median_seconds_to_target": medians, "async_over_sync": ratio})
            plot([rs[0] for rs in modes.values()], "seconds", "wall-clock seconds since the first model",
                 args.out / f"accuracy_vs_time_{epochs}ep.png",
                 f"{args.stragglers:.0%} stragglers, {args.slowdown:g}x slower, {epochs} local epochs", args.target)
        print(f"\n{'epochs':>6} {'mode':<6} {'seconds to target':>17} {'versions':>8} {'updates':>8} {'final acc':>9}")
        for row in summary:
            for mode, rs in row["runs"].items():
                r = rs[0]
                updates = sum(p["updates"] for p in r["curve"]
                              if r["version_at_target"] and p["version"] <= r["version_at_target"])
                median = row["median_seconds_to_target"][mode]
                shown = f"{median:.2f}" if median is not None else "not reached"
                print(f"{row['epochs']:>6} {mode:<6} {shown:>17} {r['version_at_target'] or '-':>8} {updates:>8} "
                      f"{r['final_accuracy']:>9.4f}")
            ratio = row["async_over_sync"]
            print(f"{'':>6} async / sync time to {args.target}: " + (f"{ratio:.2f}" if ratio else "n/a") + " (goal: <= 0.5)")
        report["stragglers"] = summary
        print()

    if not args.skip_codecs:
        print(f"codecs: sync, no stragglers, {args.rounds} rounds", flush=True)
        codec_runs = []
        for codec in CODECS:
            opts = DemoOptions(**{**asdict(base), "codec": codec, "rounds": args.rounds, "target_accuracy": None})
            result = run(opts, codec)
            # the target from the curve (the run itself goes all the rounds, for the final accuracy)
            reached = next((p for p in result["curve"] if p["accuracy"] >= args.target), None)
            result["bytes_to_target"] = reached["bytes_up"] if reached else None
            result["version_at_target"] = reached["version"] if reached else None
            codec_runs.append(result)
        fp32 = codec_runs[0]
        print(f"\n{'codec':<11} {'bytes/update':>12} {'x fewer':>8} {'bytes to target':>15} {'final acc':>9} {'vs fp32':>8}")
        for r in codec_runs:
            r["bytes_ratio"] = fp32["bytes_per_update"] / r["bytes_per_update"]
            r["accuracy_delta"] = r["final_accuracy"] - fp32["final_accuracy"]
            to_target = str(r["bytes_to_target"]) if r["bytes_to_target"] is not None else "not reached"
            print(f"{r['codec']:<11} {r['bytes_per_update']:>12.0f} {r['bytes_ratio']:>7.2f}x {to_target:>15} "
                  f"{r['final_accuracy']:>9.4f} {r['accuracy_delta'] * 100:>+7.2f}pt")
        report["codecs"] = codec_runs
        report["codec_sizes_100k"] = sizes_100k()
        plot(codec_runs, "bytes_up", "bytes uploaded (all devices)", args.out / "accuracy_vs_bytes.png",
             f"codecs, {args.rounds} sync rounds", args.target)

    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'results.json'} and PNG plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

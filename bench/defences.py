"""What the per-update defences of issue 16 cost on the ingest path, against the same work without them.

    .venv/bin/python bench/defences.py [--model 1m] [--updates 64] [--repeat 7]

In one process, interleaved pass by pass (best of ``--repeat``), per update of the model:

- ``fold, no bound``: the streaming mean's check and add (``WeightedMean`` without ``max_norm``),
  what a round cost before the norm bound was on by default: the baseline.
- ``fold, bound, inside``: the same with the default norm bound, for deltas inside it (honest ones).
- ``fold, bound, clipped``: deltas over the bound (a second, negative fold takes the excess back).
- ``rate limit``: one ``DeviceRateLimit.take`` (a token bucket per device, before decoding).
- ``salvage id``: ``salvage_update_id`` (reading the header of a refused update again for its receipt;
  refusals only).

Ratios are against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import delta_tensors, describe_machine, machine, model, update_payload

from fedmq.aggregator.intake import DeviceRateLimit, salvage_update_id
from fedmq.aggregator.strategy import WeightedMean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1m", help="1m (4 MB updates), 100k or 10k")
    parser.add_argument("--updates", type=int, default=64, help="updates folded per pass")
    parser.add_argument("--repeat", type=int, default=7, help="passes per variant; the best is shown")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    arch = model(args.model)
    shapes = arch.param_shapes()
    deltas = [delta_tensors(arch, seed) for seed in range(8)]
    norm = float(np.sqrt(sum(float(np.dot(a.reshape(-1), a.reshape(-1))) for a in deltas[0].values())))
    variants = {"fold, no bound": None, "fold, bound, inside": 10 * norm, "fold, bound, clipped": norm / 10}
    best = {name: float("inf") for name in variants}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):
        for name, bound in variants.items():
            mean = WeightedMean(shapes, max_norm=bound)
            started = time.perf_counter()
            for i in range(args.updates):
                mean.add(deltas[i % len(deltas)], 100.0)
            results[name] = mean.result()["dense0.weight"]
            best[name] = min(best[name], (time.perf_counter() - started) / args.updates)
            mean.release()
    limit = DeviceRateLimit(per_second=10.0, burst=20)
    devices = [f"pi-{i:04d}" for i in range(1000)]
    started = time.perf_counter()
    for i in range(100_000):
        limit.take(devices[i % 1000], i * 1e-3)
    take = (time.perf_counter() - started) / 100_000
    payload = update_payload("pi-0001", "u-0000001", deltas[0])
    started = time.perf_counter()
    for _ in range(10_000):
        salvage_update_id(payload)
    salvage = (time.perf_counter() - started) / 10_000
    base = best["fold, no bound"]
    print(describe_machine(machine()))
    print(f"model {args.model}: {sum(int(np.prod(s)) for s in shapes.values()):,} parameters; "
          f"{args.updates} updates a pass, best of {args.repeat}")
    print(f"{'variant':24} {'us per update':>14} {'vs baseline':>12}")
    for name, seconds in best.items():
        print(f"{name:24} {seconds * 1e6:14.1f} {seconds / base:12.2f}")
    print(f"{'rate limit':24} {take * 1e6:14.2f} {take / base:12.4f}")
    print(f"{'salvage id':24} {salvage * 1e6:14.2f} {salvage / base:12.4f}")
    if args.json:
        # invariants for the smoke test: the bound changes nothing inside it, and clips to it
        clipped_bound = variants["fold, bound, clipped"]
        assert clipped_bound is not None
        args.json.write_text(json.dumps({
            "machine": machine(), "model": args.model, "updates": args.updates,
            "us_per_update": {name: seconds * 1e6 for name, seconds in best.items()},
            "rate_limit_us": take * 1e6, "salvage_us": salvage * 1e6,
            "inside_same_as_baseline": bool(np.array_equal(results["fold, bound, inside"], results["fold, no bound"])),
            "clipped_norm_over_bound": float(np.linalg.norm(results["fold, bound, clipped"]) / clipped_bound),
        }, indent=2, default=str))


if __name__ == "__main__":
    main()

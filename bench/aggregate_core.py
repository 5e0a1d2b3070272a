"""The aggregation core: folding N updates from their wire bytes into the running aggregate.

    .venv/bin/python bench/aggregate_core.py [--model 1m] [--updates 10,100,1000] [--json out.json]
    .venv/bin/python bench/aggregate_core.py --kernels   # the fold kernel against plain adds

For each N, four ways of reducing N fp32 updates of the same model, each in its own process (so
that each has its own peak memory), on the same pool of distinct payloads cycled to N:

- ``limit f32``: numpy ``acc += x`` over already-decoded float32 arrays with a float32
  accumulator, no checks, no weights: the limit the goal is set against (numpy's one sequential
  pass; ``--kernels`` shows that four streams read this machine's memory faster).
- ``limit f64``: the same with a float64 accumulator (fedmq summed in float64 before its sums
  became float32).
- ``fedmq``: what the aggregator does per update, minus the journal: ``decode_update`` (frame
  and field checks, tensors as views into the payload), ``check_update`` (names, dtypes,
  shapes) and the FedAvg accumulator's ``check`` and ``add`` (finite values and norm checked in
  the same pass that folds, weighted, float32 sums); then its ``result()`` and ``release()``
  (the next pass's mean reuses the buffers, as the daemon's next round does).
- ``stack``: the common approach: decode every update into its own arrays, stack them and take
  ``np.average(..., weights=...)``. Skipped when its estimated memory is over ``--stack-max-gb``.

Times are the best of ``--repeat`` passes; memory is the peak RSS of the pass over the RSS with the
payload pool loaded (the pool itself, ``--pool`` payloads, is not counted).

``--kernels`` times the loops alone instead, in one process, interleaved pass by pass over the same
decoded pool (needs numba, ``pip install 'fedmq[fast]'``): numpy's ``acc += x`` (the limit
above), ``acc += x`` compiled as one stream and as four (the tensor's quarters at once: what this
machine's memory allows), fedmq's fold kernel (``acc += w * x`` and the sum of squares for the
checks, four streams) and the same fold as one stream (the kernel before it walked quarters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from fedmq.aggregator import fold  # noqa: E402
from fedmq.aggregator.intake import check_update, decode_update  # noqa: E402
from fedmq.aggregator.robust import make_accumulator  # noqa: E402
from fedmq.broker.wire import decode_frame  # noqa: E402

VARIANTS = ("limit f32", "limit f64", "fedmq", "stack")
MAX_BYTES = 256 * 1024 * 1024


def build_pool(arch_name: str, size: int) -> list[bytes]:
    arch = bench.model(arch_name)
    return [bench.update_payload(bench.device_name(i), f"u{i}", bench.delta_tensors(arch, seed=i),
                                 num_examples=50 + i) for i in range(size)]


def fold_limit(arrays: list[dict[str, np.ndarray]], n: int, dtype: type) -> None:
    acc = {name: np.zeros(a.shape, dtype) for name, a in arrays[0].items()}
    for i in range(n):
        for name, x in arrays[i % len(arrays)].items():
            np.add(acc[name], x, out=acc[name])


def fold_fedmq(pool: list[bytes], n: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    mean = make_accumulator("fedavg", shapes)
    for i in range(n):
        payload = pool[i % len(pool)]
        update = decode_update(payload, max_bytes=MAX_BYTES)
        # as Aggregator.ingest: the values are checked in the fold's pass when the strategy can
        delta = check_update(update, topic_device=update.device, shapes=shapes, codec="fp32",
                             check_values=not mean.checks_values)
        mean.check(delta, update.num_examples)  # values and norm, before the update may count
        mean.add(delta, update.num_examples)
    result = mean.result()
    mean.release()  # as the daemon does when a round closes: the next round's mean takes its buffers
    return result


def fold_stack(pool: list[bytes], n: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    decoded, weights = [], []
    for i in range(n):
        update = decode_update(pool[i % len(pool)], max_bytes=MAX_BYTES)
        decoded.append({name: np.array(t) for name, t in update.tensors.items()})  # owned copies
        weights.append(update.num_examples)
    return {name: np.average(np.stack([d[name] for d in decoded]), axis=0, weights=weights).astype(np.float32)
            for name in shapes}


def stack_bytes(n: int, params: int) -> int:
    """Memory the stack approach needs: the decoded copies, the stack, np.average's float64 product."""
    return n * params * (4 + 4 + 8)


def worker(variant: str, arch_name: str, n: int, pool_size: int, repeat: int) -> dict:
    arch = bench.model(arch_name)
    shapes = arch.param_shapes()
    pool = build_pool(arch_name, min(pool_size, n))
    arrays = [decode_frame(p, max_bytes=MAX_BYTES).tensors for p in pool]
    runs = {
        "limit f32": lambda: fold_limit(arrays, n, np.float32),
        "limit f64": lambda: fold_limit(arrays, n, np.float64),
        "fedmq": lambda: fold_fedmq(pool, n, shapes),
        "stack": lambda: fold_stack(pool, n, shapes),
    }
    run = runs[variant]
    if variant == "fedmq":
        fold.warm_up(max(int(np.prod(s)) for s in shapes.values()))  # as the daemon does at start-up
    base_rss = bench.rss_mb()
    bench.reset_peak_rss()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return {"variant": variant, "n": n, "seconds": best, "updates_per_s": n / best,
            "peak_over_pool_mb": max(0.0, bench.peak_rss_mb() - base_rss), "pool_rss_mb": base_rss}


def _kernel_variants() -> dict[str, Callable[[np.ndarray, np.ndarray, np.float32], object]]:
    import numba

    flags = {"reassoc", "nsz", "arcp"}  # as aggregator/fold.py

    @numba.njit(nogil=True, fastmath=flags, boundscheck=False)
    def add_one_stream(acc, x, w):  # pragma: no cover - compiled
        for i in range(x.size):
            acc[i] += x[i]

    @numba.njit(nogil=True, fastmath=flags, boundscheck=False)
    def add_four_streams(acc, x, w):  # pragma: no cover - compiled
        q = x.size // 4
        for i in range(q):
            acc[i] += x[i]
            acc[q + i] += x[q + i]
            acc[2 * q + i] += x[2 * q + i]
            acc[3 * q + i] += x[3 * q + i]
        for i in range(4 * q, x.size):
            acc[i] += x[i]

    @numba.njit(nogil=True, fastmath=flags, boundscheck=False)
    def fold_one_stream(acc, x, w):  # pragma: no cover - compiled
        squares = np.float32(0.0)
        for i in range(x.size):
            v = x[i]
            squares += v * v
            acc[i] += w * v
        return squares

    kernel, name = fold.kernel()
    if name != "numba":
        raise SystemExit("--kernels needs numba: pip install 'fedmq[fast]' (or unset FEDMQ_FOLD=numpy)")
    return {
        "numpy acc += x": lambda acc, x, w: np.add(acc, x, out=acc),
        "acc += x, 1 stream": add_one_stream,
        "acc += x, 4 streams": add_four_streams,
        "fold, 1 stream": fold_one_stream,
        "fold kernel (4 streams)": kernel,
    }


def compare_kernels(arch_name: str, pool_size: int, passes: int, per_pass: int) -> list[dict]:
    """Microseconds per update of each loop over the decoded pool, interleaved pass by pass."""
    arch = bench.model(arch_name)
    pool = [decode_frame(p, max_bytes=MAX_BYTES).tensors for p in build_pool(arch_name, pool_size)]
    tensors = [[x.reshape(-1) for x in update.values()] for update in pool]
    sums = [np.zeros(int(np.prod(s)), np.float32) for s in arch.param_shapes().values()]
    variants = _kernel_variants()
    weight = np.float32(0.5)
    for fn in variants.values():  # compile and touch everything once
        for acc, x in zip(sums, tensors[0], strict=True):
            fn(acc, x, weight)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(passes):
        bench.progress(f"  kernels: pass {index + 1} of {passes} ...")
        for name, fn in variants.items():
            start = time.perf_counter()
            for i in range(per_pass):
                for acc, x in zip(sums, tensors[i % len(tensors)], strict=True):
                    fn(acc, x, weight)
            times[name].append((time.perf_counter() - start) / per_pass * 1e6)
    limit = min(times["numpy acc += x"])
    return [{"variant": name, "best_us": min(t), "median_us": float(np.median(t)), "vs_numpy_time": min(t) / limit}
            for name, t in times.items()]


def check_same_result(arch_name: str, pool_size: int) -> float:
    """Largest difference between fedmq's mean and the stacked average on a few updates."""
    arch = bench.model(arch_name)
    pool = build_pool(arch_name, pool_size)
    ours = fold_fedmq(pool, pool_size, arch.param_shapes())
    theirs = fold_stack(pool, pool_size, arch.param_shapes())
    return max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1m", choices=sorted(bench.MODELS), help="model preset (default 1m)")
    parser.add_argument("--updates", default="10,100,1000", help="comma-separated N (default 10,100,1000)")
    parser.add_argument("--pool", type=int, default=16,
                        help="distinct payloads, cycled to N (default 16: 64 MB for 1m, beyond the L3 cache)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per measurement; the best counts (default 3)")
    parser.add_argument("--stack-max-gb", type=float, default=6.0,
                        help="skip the stack approach when it would need more memory (default 6)")
    parser.add_argument("--kernels", action="store_true",
                        help="time the fold kernel against plain adds instead (one process, interleaved; needs numba)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.updates.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, counts[0], args.pool, args.repeat)))
        return

    info = bench.machine()
    arch = bench.model(args.model)
    params = arch.num_params()
    print(bench.describe_machine(info))
    if args.kernels:
        passes, per_pass = max(args.repeat, 2) * 3, 200
        print(f"model {args.model}: {params:,} parameters, pool of {args.pool} updates; us per update, "
              f"{passes} interleaved passes of {per_pass} updates")
        rows = compare_kernels(args.model, args.pool, passes, per_pass)
        for row in rows:
            print(f"{row['variant']:24} best {row['best_us']:8.1f} us  median {row['median_us']:8.1f} us  "
                  f"{row['vs_numpy_time']:5.2f}x numpy's time", flush=True)
        bench.write_json(args.json, {"benchmark": "aggregate_core --kernels", "machine": info, "model": args.model,
                                     "parameters": params, "pool": args.pool, "results": rows})
        return
    print(f"model {args.model}: {params:,} parameters ({params * 4 / 1e6:.1f} MB as fp32), pool of {args.pool} "
          f"payloads, best of {args.repeat}")
    max_diff = check_same_result(args.model, min(args.pool, 8))
    print(f"fedmq mean vs stacked np.average on {min(args.pool, 8)} updates: max abs difference {max_diff:.2e}")
    rows = []
    for n in counts:
        by_variant = {}
        for variant in VARIANTS:
            if variant == "stack" and stack_bytes(n, params) > args.stack_max_gb * 2**30:
                row = {"variant": variant, "n": n, "skipped": f"needs ~{stack_bytes(n, params) / 2**30:.1f} GB "
                       f"(over --stack-max-gb {args.stack_max_gb:g})"}
            else:
                bench.progress(f"  N={n}: {variant} ...")
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", variant, "--model", args.model, "--updates", str(n),
                     "--pool", str(args.pool), "--repeat", str(args.repeat)],
                    capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            by_variant[variant] = row
            rows.append(row)
        limit32 = by_variant["limit f32"]["updates_per_s"]
        limit64 = by_variant["limit f64"]["updates_per_s"]
        for row in by_variant.values():
            if "skipped" in row:
                print(f"N={n:5d}  {row['variant']:10}  skipped: {row['skipped']}")
                continue
            row["vs_limit_f32"] = row["updates_per_s"] / limit32
            row["vs_limit_f64"] = row["updates_per_s"] / limit64
            print(f"N={n:5d}  {row['variant']:10} {row['seconds'] * 1e3:9.1f} ms  {row['updates_per_s']:8.0f} updates/s"
                  f"  {row['vs_limit_f32']:5.2f}x limit f32  {row['vs_limit_f64']:5.2f}x limit f64"
                  f"  peak +{row['peak_over_pool_mb']:7.1f} MB", flush=True)
    bench.write_json(args.json, {"benchmark": "aggregate_core", "machine": info, "model": args.model,
                                 "parameters": params, "pool": args.pool, "repeat": args.repeat,
                                 "max_abs_difference_vs_stack": max_diff, "results": rows})


if __name__ == "__main__":
    main()

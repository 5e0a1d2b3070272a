"""Edge backends compared: time per training epoch and per inference batch, as ratios to numpy
measured in the same run, and the peak RSS of a process with each backend loaded.

    .venv/bin/python bench/edge_backends.py [--repeat 7] [--json out.json]

Models: the digits MLP (64-64-32-10 on scikit-learn's digits, 1437 examples) and a larger MLP
(784-256-128-10 on 2000 generated examples). Batch 16, one epoch per measurement, median of
--repeat runs. The first call of each backend (graph build, compilation) is measured separately
as "warm-up".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np

from fedmq.broker.architecture import MLPArchitecture
from fedmq.edge_agent.backends import BackendError, load_backend

CASES = {
    "digits 64-64-32-10": (MLPArchitecture(64, (64, 32), 10), 1437),
    "mlp 784-256-128-10": (MLPArchitecture(784, (256, 128), 10), 2000),
}

# VmHWM (this process's own peak), not ru_maxrss: Linux carries the parent's peak into ru_maxrss
# across fork + exec, so every child would report at least the benchmark's own size.
RSS_SCRIPT = """
import sys, numpy as np
from fedmq.broker.architecture import MLPArchitecture
from fedmq.edge_agent.backends import load_backend
arch = MLPArchitecture(784, (256, 128), 10)
rng = np.random.default_rng(0)
x = rng.random((2000, 784), dtype=np.float32); y = rng.integers(0, 10, 2000)
backend = load_backend(sys.argv[1])
backend.train(arch.init_params(0), arch, x, y, epochs=1, batch_size=16, lr=0.05, seed=0)
backend.logits(arch.init_params(0), arch, x)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def data_for(arch: MLPArchitecture, n: int) -> tuple[np.ndarray, np.ndarray]:
    if arch.inputs == 64:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data[:n] / 16.0).astype(np.float32), digits.target[:n].astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.random((n, arch.inputs), dtype=np.float32), rng.integers(0, arch.classes, n)


def timed(fn, repeat: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--backends", default="numpy,onnx,wasm")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    names = args.backends.split(",")
    backends = {}
    for name in names:
        try:
            backends[name] = load_backend(name)
        except BackendError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    results = []
    for case, (arch, n) in CASES.items():
        x, y = data_for(arch, n)
        params = arch.init_params(0)
        batch = x[:256]
        base_epoch = base_infer = None
        for name, backend in backends.items():
            warm, epoch = timed(partial(backend.train, params, arch, x, y, epochs=1, batch_size=16, lr=0.05, seed=1),
                                args.repeat)
            _, infer = timed(partial(backend.logits, params, arch, batch), args.repeat * 5)
            if name == "numpy":
                base_epoch, base_infer = epoch, infer
            row = {"case": case, "backend": name, "epoch_ms": epoch * 1e3, "warmup_ms": warm * 1e3,
                   "infer256_ms": infer * 1e3,
                   "epoch_vs_numpy": epoch / base_epoch if base_epoch else None,
                   "infer_vs_numpy": infer / base_infer if base_infer else None}
            results.append(row)
            print(f"{case:20} {name:6} epoch {row['epoch_ms']:8.2f} ms ({row['epoch_vs_numpy'] or 0:5.2f}x numpy)  "
                  f"infer 256 {row['infer256_ms']:7.3f} ms ({row['infer_vs_numpy'] or 0:5.2f}x)  "
                  f"first call {row['warmup_ms']:7.1f} ms", flush=True)
    for name in backends:
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name], capture_output=True, text=True, check=True)
        rss_mb = int(out.stdout.split()[-1]) / 1024
        results.append({"backend": name, "peak_rss_mb": rss_mb})
        print(f"peak RSS, process training the 784 MLP with {name}: {rss_mb:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

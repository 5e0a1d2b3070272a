"""Each benchmark under bench/ runs in a tiny configuration and prints sane figures.

Counts and invariants only (updates lost is 0, every update accepted, ratios positive): never
timings, which depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str, tmp_path: Path, timeout: float = 120) -> tuple[str, dict]:
    out_file = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out_file)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.startswith("machine: "), proc.stdout
    return proc.stdout, json.loads(out_file.read_text())


@pytest.mark.parametrize("script", ["aggregate_core.py", "aggregator_ingest.py", "fleet_scale.py", "defences.py"])
def test_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--json" in proc.stdout


def test_aggregate_core(tmp_path: Path) -> None:
    stdout, data = run_bench("aggregate_core.py", "--model", "10k", "--updates", "3,12", "--pool", "4",
                             "--repeat", "1", tmp_path=tmp_path)
    rows = {(r["n"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(n, v) for n in (3, 12) for v in ("limit f32", "limit f64", "fedmq", "stack")}
    for row in rows.values():
        assert row["updates_per_s"] > 0 and row["vs_limit_f32"] > 0 and row["peak_over_pool_mb"] >= 0
    assert rows[(3, "limit f32")]["vs_limit_f32"] == 1.0
    assert data["max_abs_difference_vs_stack"] < 1e-6, "fedmq's mean must equal the stacked average"
    assert "N=   12  fedmq" in stdout


def test_aggregate_core_kernels(tmp_path: Path) -> None:
    stdout, data = run_bench("aggregate_core.py", "--kernels", "--model", "10k", "--pool", "2", "--repeat", "1",
                             tmp_path=tmp_path)
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"numpy acc += x", "acc += x, 1 stream", "acc += x, 4 streams", "fold, 1 stream",
                         "fold kernel (4 streams)"}
    assert rows["numpy acc += x"]["vs_numpy_time"] == 1.0
    for row in rows.values():
        assert 0 < row["best_us"] <= row["median_us"]
    assert "fold kernel (4 streams)" in stdout


@pytest.mark.broker
def test_aggregator_ingest(tmp_path: Path) -> None:
    _, data = run_bench("aggregator_ingest.py", "--cases", "10k:20", "--state-dir", str(tmp_path), tmp_path=tmp_path)
    rows = {(r["mode"], r["consumer"]): r for r in data["results"]}
    assert set(rows) == {("alone", "journal"), *((mode, consumer) for mode in ("live", "backlog")
                                                 for consumer in ("bare", "receipts", "daemon"))}
    journal = rows["alone", "journal"]
    assert journal["updates"] == 20 and journal["updates_per_s"] > 0 and journal["o_direct"] in (True, False)
    for mode in ("live", "backlog"):
        assert rows[mode, "bare"]["received"] == 20 and rows[mode, "bare"]["vs_bare"] == 1.0
        assert rows[mode, "receipts"]["received"] == 20 and rows[mode, "receipts"]["lost"] == 0
        row = rows[mode, "daemon"]
        assert (row["accepted"], row["rejected"], row["lost"], row["rounds_closed"]) == (20, 0, 0, 1), (mode, row)
        assert row["updates_per_s"] > 0 and row["vs_bare"] > 0
        # the CPU of every process per update (consumer, Mosquitto and, while live, the publisher),
        # the best bare run's over this row's
        bare = max((r for r in data["results"] if r["mode"] == mode and r["consumer"] == "bare"),
                   key=lambda r: r["updates_per_s"])
        publishing = mode == "live"
        all_cpu = [r["consumer_cpu_s"] + r["broker_cpu_s"] + (r["publisher_cpu_s"] if publishing else 0.0)
                   for r in (bare, row)]
        if all_cpu[1] > 0:
            assert row["cpu_bound_vs_bare"] == pytest.approx(all_cpu[0] / all_cpu[1])
        else:  # less CPU than the clock's tick: no prediction, and no division by zero
            assert math.isnan(row["cpu_bound_vs_bare"])
    assert not list(tmp_path.glob("fedmq-ingest-*")), "the journals are removed"


@pytest.mark.broker
def test_fleet_scale(tmp_path: Path) -> None:
    _, data = run_bench("fleet_scale.py", "--agents", "6", "--rounds", "2", "--model", "10k", "--processes", "2",
                        "--state-dir", str(tmp_path), tmp_path=tmp_path)
    (row,) = data["results"]
    assert row["rounds_closed"] == 2 and row["processes"] == 2
    assert row["updates_expected"] == row["updates_accepted"] == row["agent_receipts_accepted"] == 12
    assert row["updates_lost"] == 0 and row["failed_agents"] == 0 and row["rejected"] == {}
    assert row["aggregator_cpu_s"] > 0 and row["aggregator_peak_rss_mb"] > 0


def test_defences(tmp_path: Path) -> None:
    stdout, data = run_bench("defences.py", "--model", "10k", "--updates", "4", "--repeat", "1", tmp_path=tmp_path)
    assert set(data["us_per_update"]) == {"fold, no bound", "fold, bound, inside", "fold, bound, clipped"}
    assert all(value > 0 for value in data["us_per_update"].values()) and data["rate_limit_us"] > 0
    assert data["inside_same_as_baseline"], "a norm bound that no delta reaches changed the sums"
    # the mean of deltas clipped to the bound is no longer than it (one tensor of it, so at most)
    assert 0 < data["clipped_norm_over_bound"] <= 1.0 + 1e-5
    assert "vs baseline" in stdout

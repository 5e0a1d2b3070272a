"""fedmq report: PNG plots and summary.json from a model registry built with real model payloads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.registry import ModelRegistry
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import FedmqError
from fedmq.broker.messages import ModelMessage, Task
from fedmq.report import ReportError, add_report_command, write_report

ARCH = MLPArchitecture(6, (5,), 3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# what the aggregator's close_round stores in info: round counts plus example-weighted device metrics
ROUNDS = [
    {"updates": 3, "examples": 120, "bytes_in": 1500, "round_seconds": 2.5, "train_loss": 1.9, "train_accuracy": 0.35},
    {"updates": 4, "examples": 160, "bytes_in": 2000, "round_seconds": 3.0, "train_loss": 1.2, "train_accuracy": 0.61,
     "eval_accuracy": 0.55, "eval_loss": 1.4},
    {"updates": 2, "examples": 80, "bytes_in": 1000, "round_seconds": 1.5, "train_loss": 0.8, "train_accuracy": 0.78},
]


def model_payload(version: int, seed: int) -> bytes:
    return ModelMessage("f1", version, version - 1, ARCH, Task(), ARCH.init_params(seed), 1.0).encode()


def build_registry(state_dir: Path, rounds: list[dict[str, float]]) -> None:
    registry = ModelRegistry(state_dir)
    registry.add(1, 0, model_payload(1, 0), {"initial": True, "seed": 0})
    for i, info in enumerate(rounds, start=2):
        registry.add(i, i - 1, model_payload(i, i), info)
    registry.close()


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def test_report_writes_plots_and_summary(tmp_path: Path) -> None:
    state = tmp_path / "state"
    build_registry(state, ROUNDS)
    out = tmp_path / "report"
    written = write_report(state, out)
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "updates.png", "summary.json"]
    for path in written[:3]:
        assert path.parent == out and path.read_bytes()[:8] == PNG_MAGIC
        assert png_size(path) == (800, 450), path.name

    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_version"] == 2 and summary["latest_version"] == 4, "the initial model is not a trained version"
    assert summary["trained_versions"] == 3
    assert summary["total_updates"] == 9 and summary["total_examples"] == 360 and summary["total_bytes_in"] == 4500
    assert summary["best"]["train_accuracy"] == {"version": 4, "value": 0.78}
    assert summary["best"]["train_loss"] == {"version": 4, "value": 0.8}
    assert summary["best"]["eval_accuracy"] == {"version": 3, "value": 0.55}
    assert "test_accuracy" not in summary["best"]
    assert summary["latest"]["train_loss"] == 0.8
    assert [v["version"] for v in summary["versions"]] == [2, 3, 4]
    assert [v["updates"] for v in summary["versions"]] == [3, 4, 2]
    assert [v["parent"] for v in summary["versions"]] == [1, 2, 3]
    registry = ModelRegistry(state)
    assert [v["size"] for v in summary["versions"]] == [r.size for r in registry.versions()[1:]]
    registry.close()


def test_plots_differ_with_the_data(tmp_path: Path) -> None:
    build_registry(tmp_path / "a", ROUNDS)
    build_registry(tmp_path / "b", [{**r, "train_accuracy": 1.0 - r["train_accuracy"], "updates": 7} for r in ROUNDS])
    write_report(tmp_path / "a", tmp_path / "out-a")
    write_report(tmp_path / "b", tmp_path / "out-b")
    import matplotlib.image

    for name in ("accuracy.png", "updates.png"):
        a = matplotlib.image.imread(tmp_path / "out-a" / name)
        b = matplotlib.image.imread(tmp_path / "out-b" / name)
        assert not np.array_equal(a, b), f"{name} does not depend on the data"
    loss_a = matplotlib.image.imread(tmp_path / "out-a" / "loss.png")
    loss_b = matplotlib.image.imread(tmp_path / "out-b" / "loss.png")
    assert np.array_equal(loss_a, loss_b), "same losses, same picture"


def test_without_accuracy_only_loss_and_updates_are_plotted(tmp_path: Path) -> None:
    build_registry(tmp_path / "state", [{k: v for k, v in r.items() if not k.endswith("_accuracy")} for r in ROUNDS])
    written = write_report(tmp_path / "state", tmp_path / "out")
    assert [p.name for p in written] == ["loss.png", "updates.png", "summary.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["not_plotted"] == ["accuracy.png"]


def test_a_directory_without_a_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no model registry.*state_dir") as info:
        write_report(tmp_path / "typo", tmp_path / "out")
    assert str(tmp_path / "typo") in str(info.value)
    assert isinstance(info.value, FedmqError)
    assert not (tmp_path / "typo").exists(), "a mistyped directory is not created"
    assert not (tmp_path / "out").exists()


def test_only_the_initial_version_is_a_clear_error(tmp_path: Path) -> None:
    build_registry(tmp_path / "state", [])
    with pytest.raises(ReportError, match="only v1, the initial model.*closed a round"):
        write_report(tmp_path / "state", tmp_path / "out")


def test_report_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_registry(tmp_path / "state", ROUNDS)
    parser = argparse.ArgumentParser(prog="fedmq")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(tmp_path / "out" / n) for n in ("accuracy.png", "loss.png", "updates.png", "summary.json")]
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--out", str(tmp_path / "out")])  # --state-dir is required

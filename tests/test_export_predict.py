"""The device's current model as a standard .onnx file, and ``fedmq agent predict`` on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import ModelMessage, Task
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig
from fedmq.edge_agent.predict import PredictError, predict
from fedmq.edge_agent.training import logits

ARCH = MLPArchitecture(6, (5,), 3)


def install(tmp_path: Path, version: int = 1, seed: int = 0) -> tuple[Agent, ModelMessage]:
    agent = Agent(AgentConfig(device_id="dev1", fleet="f1", state_dir=tmp_path / "state", backend="numpy"))
    payload = ModelMessage("f1", version, version - 1, ARCH, Task(), ARCH.init_params(seed), 1.0).encode()
    return agent, agent.install(payload)


def test_install_exports_a_checked_onnx_model_and_sidecar(tmp_path: Path) -> None:
    agent, model = install(tmp_path)
    path = tmp_path / "state" / "current.onnx"
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert max(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sidecar = json.loads((tmp_path / "state" / "current.json").read_text())
    assert sidecar["version"] == 1 and sidecar["inputs"][0]["shape"][-1] == 6
    assert {o["name"] for o in sidecar["outputs"]} >= {"probabilities", "logits"}
    # any program with onnxruntime gets the same answer as the reference maths
    x = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (z,) = session.run(["logits"], {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(z, logits(model.params, ARCH, x), rtol=1e-5, atol=1e-6)
    # a newer version replaces it atomically
    agent.install(ModelMessage("f1", 2, 1, ARCH, Task(), ARCH.init_params(5), 1.0).encode())
    assert json.loads((tmp_path / "state" / "current.json").read_text())["version"] == 2
    assert not list((tmp_path / "state").glob(".*.tmp"))


def test_predict_matches_the_reference_and_the_cli(tmp_path: Path) -> None:
    _, model = install(tmp_path)
    x = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    result = predict(tmp_path / "state", x)
    assert result.version == 1
    np.testing.assert_array_equal(result.labels, logits(model.params, ARCH, x).argmax(axis=1))
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "agent", "predict", "--state", str(tmp_path / "state"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")[:-1]
    assert [int(line.split()[1]) for line in lines] == result.labels.tolist()
    assert "model v1" in done.stderr


def test_predict_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="not installed a model yet"):
        predict(tmp_path, np.zeros((1, 6), np.float32))
    install(tmp_path)
    with pytest.raises(PredictError, match=r"takes \(N, 6\)"):
        predict(tmp_path / "state", np.zeros((2, 4), np.float32))
    with pytest.raises(PredictError, match="NaN"):
        predict(tmp_path / "state", np.full((2, 6), np.nan, np.float32))
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "agent", "predict", "--state", str(tmp_path / "state"),
                           str(tmp_path / "missing.npy")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "input file not found" in done.stderr

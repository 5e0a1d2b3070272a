"""Predictions from the device's exported model (``current.onnx``), as any local program would
make them: onnxruntime on the file, nothing else of fedmq needed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.broker.errors import FedmqError

from .export import ONNX_FILE, SIDECAR_FILE


class PredictError(FedmqError):
    """Predictions cannot be made; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Predictions:
    version: int
    labels: np.ndarray          # (N,) int64
    probabilities: np.ndarray   # (N, classes) float32


def predict(state_dir: str | Path, x: np.ndarray) -> Predictions:
    """Run ``current.onnx`` from the agent's state directory on ``x`` (N x features)."""
    state_dir = Path(state_dir)
    model_path, sidecar_path = state_dir / ONNX_FILE, state_dir / SIDECAR_FILE
    if not model_path.exists() or not sidecar_path.exists():
        raise PredictError(f"no {ONNX_FILE} in {state_dir}: the agent has not installed a model yet "
                           "(or runs without the onnx extra: pip install 'fedmq[onnx]')")
    try:
        import onnxruntime
    except ImportError:
        raise PredictError("predict needs onnxruntime: pip install 'fedmq[onnx]'") from None
    info = json.loads(sidecar_path.read_text())
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    expected = info["inputs"][0]["shape"][-1]
    if x.ndim != 2 or (isinstance(expected, int) and x.shape[1] != expected):
        raise PredictError(f"input has shape {x.shape}; model v{info['version']} takes (N, {expected})")
    if not np.isfinite(x).all():
        raise PredictError("input contains NaN or infinity")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (probabilities,) = session.run(["probabilities"], {input_name: x.astype(np.float32)})
    return Predictions(int(info["version"]), probabilities.argmax(axis=1), probabilities)


def load_input(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PredictError(f"{path}: input file not found") from None
    except ValueError as exc:
        raise PredictError(f"{path}: not a .npy array ({exc})") from None

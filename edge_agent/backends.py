"""Training and inference backends: numpy (the reference), ONNX Runtime and WebAssembly.

Every backend follows the same contract so that each can be checked against numpy:

- the minibatch schedule is :func:`training.epoch_batches` (same seed -> same batches);
- one SGD step per batch: forward (dense + ReLU, last layer linear), mean softmax cross-entropy
  over the batch (a short last batch averages over its own size), backward, then
  ``W -= lr * dW`` and ``b -= lr * db``, all in float32;
- :class:`training.TrainResult` carries the loss summed over the last epoch divided by the number
  of examples, and the accuracy of the predictions made during the last epoch (before each step).

The heavy backends live in their own modules (one per optional dependency) and are imported only
when asked for.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import FedmqError

from . import training
from .training import TrainResult

log = logging.getLogger(__name__)


class BackendError(FedmqError):
    """A backend failed to train or predict (missing dependency, sandbox limit, runtime error)."""


class Backend(Protocol):
    name: str

    def train(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray, *,
              epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult: ...

    def logits(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray: ...


class NumpyBackend:
    """The reference implementation (:mod:`.training`)."""

    name = "numpy"

    def train(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray, *,
              epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
        return training.train(params, arch, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)

    def logits(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray:
        return training.logits(params, arch, x)


#: name -> (module, class); modules are imported on demand.
_REGISTRY: dict[str, tuple[str, str]] = {
    "numpy": (__name__, "NumpyBackend"),
    "onnx": ("fedmq.edge_agent.onnx_backend", "OnnxBackend"),
    "wasm": ("fedmq.edge_agent.wasm_backend", "WasmBackend"),
}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


#: "auto" picks the first of these whose dependencies import (fastest first, see bench/edge_backends.py).
AUTO_ORDER: tuple[str, ...] = ("onnx", "wasm", "numpy")


def load_backend(name: str, *, wasm_module: Path | None = None) -> Backend:
    """Instantiate backend ``name`` (or the fastest available for ``"auto"``).

    :class:`BackendError` names the missing piece and the fix.
    """
    if name == "auto":
        for candidate in AUTO_ORDER:
            try:
                return load_backend(candidate, wasm_module=wasm_module)
            except BackendError as exc:
                log.info("backend %s unavailable: %s", candidate, exc)
        raise BackendError("no training backend is available")
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; known: {list(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} needs {exc.name}: pip install 'fedmq[{name}]'") from None
    backend_class = getattr(module, class_name)
    if name == "wasm" and wasm_module is not None:
        return backend_class(module_path=wasm_module)
    return backend_class()

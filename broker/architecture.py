"""Model architectures as data: what the parameters are called and what shape they have.

Both ends need this: the aggregator to build the initial model and to check every update, the
agent to train. The maths of training lives in the edge agent; this module only names tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import Reason, RejectedMessage

MAX_WIDTH = 1 << 16
MAX_LAYERS = 32


@dataclass(frozen=True, slots=True)
class MLPArchitecture:
    """A sequential MLP: dense layers with ReLU between them and a softmax output.

    Parameters are ``dense{i}.weight`` with shape ``(fan_in, fan_out)`` (so ``y = x @ W + b``) and
    ``dense{i}.bias`` with shape ``(fan_out,)``, for ``i`` from 0 to ``len(hidden)``.
    """

    inputs: int
    hidden: tuple[int, ...]
    classes: int

    def __post_init__(self) -> None:
        widths = (self.inputs, *self.hidden, self.classes)
        if not all(type(w) is int and 0 < w <= MAX_WIDTH for w in widths):
            raise ValueError(f"layer widths must be integers from 1 to {MAX_WIDTH}, got {widths}")
        if len(self.hidden) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} hidden layers")
        if self.classes < 2:
            raise ValueError("classes must be at least 2")

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.inputs, *self.hidden, self.classes)

    @property
    def num_layers(self) -> int:
        return len(self.hidden) + 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in layer order."""
        shapes: dict[str, tuple[int, ...]] = {}
        widths = self.widths
        for i in range(self.num_layers):
            shapes[f"dense{i}.weight"] = (widths[i], widths[i + 1])
            shapes[f"dense{i}.bias"] = (widths[i + 1],)
        return shapes

    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        """He-initialised weights and zero biases, reproducible from ``seed``."""
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape in self.param_shapes().items():
            if name.endswith(".weight"):
                std = np.sqrt(2.0 / shape[0])
                params[name] = (rng.standard_normal(shape) * std).astype(np.float32)
            else:
                params[name] = np.zeros(shape, dtype=np.float32)
        return params

    def to_wire(self) -> dict[str, Any]:
        return {"type": "mlp", "inputs": self.inputs, "hidden": list(self.hidden), "classes": self.classes}

    @classmethod
    def from_wire(cls, value: Any) -> MLPArchitecture:
        """Build from a message's ``arch`` map; raise :class:`RejectedMessage` if it is not valid."""
        if not isinstance(value, Mapping) or value.get("type") != "mlp":
            raise RejectedMessage(Reason.FIELD, "arch must be a map with type 'mlp'")
        if set(value) != {"type", "inputs", "hidden", "classes"}:
            raise RejectedMessage(Reason.FIELD, f"arch has keys {sorted(value)}; expected type, inputs, hidden, classes")
        hidden = value["hidden"]
        if not isinstance(hidden, list):
            raise RejectedMessage(Reason.FIELD, "arch.hidden must be a list of layer widths")
        try:
            return cls(value["inputs"], tuple(hidden), value["classes"])
        except ValueError as exc:
            raise RejectedMessage(Reason.FIELD, f"arch: {exc}") from None

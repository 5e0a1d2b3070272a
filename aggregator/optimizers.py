"""Server optimizers: how the round's averaged delta moves the global model.

The averaged delta is the pseudo-gradient of Reddi et al. 2021, "Adaptive Federated Optimization"
(Algorithm 2; no bias correction): with ``d`` the mean delta,

- ``sgd`` (FedAvg): ``x += lr * d``
- ``fedavgm``: ``m = beta1 * m + d``; ``x += lr * m``
- ``fedadagrad``: ``m = beta1 * m + (1 - beta1) * d``; ``v += d**2``; ``x += lr * m / (sqrt(v) + tau)``
- ``fedadam``: ``m`` as above; ``v = beta2 * v + (1 - beta2) * d**2``; ``x += lr * m / (sqrt(v) + tau)``
- ``fedyogi``: ``m`` as above; ``v -= (1 - beta2) * d**2 * sign(v - d**2)``; same step

Pure numpy. The state (``m``, ``v``) is a dict of named arrays that the aggregator persists with
every model version, so a restart continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


@dataclass
class ServerOptimizer:
    """One of :data:`OPTIMIZERS` with its hyper-parameters and state."""

    name: str = "sgd"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; known: {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"server learning rate must be positive, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ValueError("need 0 <= beta1, beta2 < 1 and tau > 0")
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next parameters (float32); updates the optimizer's state."""
        out: dict[str, np.ndarray] = {}
        for name, x in params.items():
            d = np.asarray(delta[name], dtype=np.float64)
            if self.name == "sgd":
                change = self.lr * d
            elif self.name == "fedavgm":
                m = self.beta1 * self.m.get(name, 0.0) + d
                self.m[name] = m
                change = self.lr * m
            else:
                m = self.beta1 * self.m.get(name, 0.0) + (1 - self.beta1) * d
                squared = d * d
                v_old = self.v.get(name, np.zeros_like(d))
                if self.name == "fedadagrad":
                    v = v_old + squared
                elif self.name == "fedadam":
                    v = self.beta2 * v_old + (1 - self.beta2) * squared
                else:  # fedyogi
                    v = v_old - (1 - self.beta2) * squared * np.sign(v_old - squared)
                self.m[name], self.v[name] = m, v
                change = self.lr * m / (np.sqrt(v) + self.tau)
            out[name] = (np.asarray(x, dtype=np.float64) + change).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The state as named arrays (``m/<param>``, ``v/<param>``) for persistence."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("v/")}

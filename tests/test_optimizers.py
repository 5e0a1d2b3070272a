"""Server optimizers against values computed by hand from Reddi et al. 2021, Algorithm 2."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.aggregator.optimizers import ServerOptimizer

X = {"w": np.array([1.0, -2.0], np.float32)}
D1 = {"w": np.array([0.5, -1.0], np.float32)}
D2 = {"w": np.array([-0.25, 2.0], np.float32)}


def two_steps(opt: ServerOptimizer) -> tuple[np.ndarray, np.ndarray]:
    x1 = opt.step(X, D1)
    x2 = opt.step(x1, D2)
    return x1["w"], x2["w"]


def test_sgd() -> None:
    x1, x2 = two_steps(ServerOptimizer("sgd", lr=0.5))
    np.testing.assert_allclose(x1, [1.25, -2.5])
    np.testing.assert_allclose(x2, [1.125, -1.5])


def test_fedavgm() -> None:
    x1, x2 = two_steps(ServerOptimizer("fedavgm", lr=0.5, beta1=0.9))
    # m1 = d1 = [0.5, -1]; x1 = x + 0.5 m1 = [1.25, -2.5]
    np.testing.assert_allclose(x1, [1.25, -2.5])
    # m2 = 0.9 m1 + d2 = [0.2, 1.1]; x2 = x1 + 0.5 m2 = [1.35, -1.95]
    np.testing.assert_allclose(x2, [1.35, -1.95], rtol=1e-6)


def adaptive(v1: list[float], v2: list[float], lr: float = 0.1, tau: float = 1e-3) -> tuple[list[float], list[float]]:
    m1 = [0.1 * 0.5, 0.1 * -1.0]                                   # (1 - beta1) d1
    m2 = [0.9 * m1[0] + 0.1 * -0.25, 0.9 * m1[1] + 0.1 * 2.0]
    x1 = [1.0 + lr * m1[0] / (math.sqrt(v1[0]) + tau), -2.0 + lr * m1[1] / (math.sqrt(v1[1]) + tau)]
    x2 = [x1[0] + lr * m2[0] / (math.sqrt(v2[0]) + tau), x1[1] + lr * m2[1] / (math.sqrt(v2[1]) + tau)]
    return x1, x2


def test_fedadagrad() -> None:
    v1 = [0.25, 1.0]
    v2 = [0.25 + 0.0625, 1.0 + 4.0]
    x1, x2 = two_steps(ServerOptimizer("fedadagrad", lr=0.1))
    e1, e2 = adaptive(v1, v2)
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)


def test_fedadam() -> None:
    v1 = [0.01 * 0.25, 0.01 * 1.0]
    v2 = [0.99 * v1[0] + 0.01 * 0.0625, 0.99 * v1[1] + 0.01 * 4.0]
    x1, x2 = two_steps(ServerOptimizer("fedadam", lr=0.1))
    e1, e2 = adaptive(v1, v2)
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)


def test_fedyogi() -> None:
    # v0 = 0: v1 = 0 - 0.01 d1^2 sign(0 - d1^2) = 0.01 d1^2
    v1 = [0.01 * 0.25, 0.01 * 1.0]
    # v2 = v1 - 0.01 d2^2 sign(v1 - d2^2); v1 < d2^2 in both coordinates, so the sign is -1
    v2 = [v1[0] + 0.01 * 0.0625, v1[1] + 0.01 * 4.0]
    x1, x2 = two_steps(ServerOptimizer("fedyogi", lr=0.1))
    e1, e2 = adaptive(v1, v2)
    np.testing.assert_allclose(x1, e1, rtol=1e-6)
    np.testing.assert_allclose(x2, e2, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_state_round_trip_continues_the_same_trajectory(name: str) -> None:
    straight = ServerOptimizer(name, lr=0.1)
    x1 = straight.step(X, D1)
    expected = straight.step(x1, D2)
    first = ServerOptimizer(name, lr=0.1)
    x1 = first.step(X, D1)
    resumed = ServerOptimizer(name, lr=0.1)
    resumed.load_state({k: v.copy() for k, v in first.state().items()})
    np.testing.assert_array_equal(resumed.step(x1, D2)["w"], expected["w"])


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("adamw")
    with pytest.raises(ValueError, match="positive"):
        ServerOptimizer("sgd", lr=0)
    with pytest.raises(ValueError, match="beta1"):
        ServerOptimizer("fedadam", beta1=1.0)


def test_aggregator_persists_optimizer_state_with_each_version(tmp_path) -> None:
    """A restarted aggregator continues FedAdam where it stopped: same params as without the restart."""
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.aggregator.daemon import Aggregator
    from fedmq.aggregator.rounds import RoundPolicy
    from fedmq.broker.architecture import MLPArchitecture
    from fedmq.broker.messages import UpdateMessage

    arch = MLPArchitecture(4, (3,), 2)

    def config(path):
        return AggregatorConfig(fleet="f", state_dir=path, arch=arch, policy=RoundPolicy(1, 1),
                                server_optimizer="fedadam", server_lr=0.05)

    def round_with(agg: Aggregator, value: float, n: int) -> None:
        delta = {k: np.full(s, value, np.float32) for k, s in arch.param_shapes().items()}
        agg.ingest("d", UpdateMessage("d", f"u{n}", agg.model.version, 5, "fp32", delta).encode())
        agg.close_round()

    straight = Aggregator(config(tmp_path / "a"))
    for n, value in enumerate([0.3, -0.1, 0.2]):
        round_with(straight, value, n)

    first = Aggregator(config(tmp_path / "b"))
    round_with(first, 0.3, 0)
    round_with(first, -0.1, 1)
    first.registry.close()
    resumed = Aggregator(config(tmp_path / "b"))
    assert set(resumed.optimizer.m) == set(arch.param_shapes())
    round_with(resumed, 0.2, 2)
    for name in straight.model.params:
        np.testing.assert_array_equal(resumed.model.params[name], straight.model.params[name])


def test_unknown_server_optimizer_is_a_config_error(tmp_path) -> None:
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.broker.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        AggregatorConfig.from_mapping({"state_dir": str(tmp_path), "rounds": {"server_optimizer": "adamw"}})
    assert info.value.key == "rounds.server_optimizer"

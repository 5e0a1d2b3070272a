"""The synchronous round state machine (no broker, no clock)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.aggregator.rounds import RoundPolicy, SyncRound
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import UpdateMessage

SHAPES = {"w": (2,)}


def update(device: str, base: int = 3, n: int = 10, value: float = 1.0, loss: float = 0.5) -> tuple[UpdateMessage, dict]:
    delta = {"w": np.full(2, value, np.float32)}
    return UpdateMessage(device, f"{device}-u", base, n, "fp32", delta, {"loss": loss}), delta


def test_round_closes_at_target_updates() -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(min_updates=2, target_updates=3, deadline_s=10), opened_at=100.0)
    for i, device in enumerate(["a", "b"]):
        rnd.add(*update(device, value=float(i)), payload_bytes=100)
        assert not rnd.ready(now=100.0)
    rnd.add(*update("c", value=5.0), payload_bytes=100)
    assert rnd.ready(now=100.0)


def test_round_closes_at_deadline_only_with_min_updates() -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(min_updates=2, target_updates=5, deadline_s=10), opened_at=100.0)
    rnd.add(*update("a"), payload_bytes=1)
    assert not rnd.ready(now=200.0), "below min_updates the deadline does not close the round"
    rnd.add(*update("b"), payload_bytes=1)
    assert not rnd.ready(now=109.9)
    assert rnd.ready(now=110.0)


def test_round_result_weights_by_examples_and_averages_metrics() -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(min_updates=1, target_updates=2), opened_at=0.0)
    rnd.add(*update("a", n=10, value=1.0, loss=1.0), payload_bytes=70)
    rnd.add(*update("b", n=30, value=5.0, loss=3.0), payload_bytes=30)
    result = rnd.result()
    np.testing.assert_allclose(result.mean_delta["w"], [4.0, 4.0])  # (10*1 + 30*5) / 40
    assert result.num_updates == 2 and result.num_examples == 40 and result.bytes_in == 100
    assert result.metrics["train_loss"] == pytest.approx(2.5)  # (10*1 + 30*3) / 40


@pytest.mark.parametrize(("base", "reason"), [(2, Reason.STALE), (4, Reason.FUTURE)])
def test_round_rejects_other_versions(base: int, reason: Reason) -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(), opened_at=0.0)
    with pytest.raises(RejectedMessage) as info:
        rnd.add(*update("a", base=base), payload_bytes=1)
    assert info.value.reason is reason
    assert rnd.count == 0


def test_round_takes_one_update_per_device() -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(), opened_at=0.0)
    rnd.add(*update("a"), payload_bytes=1)
    msg, delta = update("a")
    with pytest.raises(RejectedMessage) as info:
        rnd.add(msg, delta, payload_bytes=1)
    assert info.value.reason is Reason.REPEAT
    assert rnd.count == 1


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="min_updates"):
        RoundPolicy(min_updates=3, target_updates=2)
    with pytest.raises(ValueError, match="min_updates"):
        RoundPolicy(min_updates=0)
    with pytest.raises(ValueError, match="deadline"):
        RoundPolicy(deadline_s=0)


def test_device_evaluations_are_kept_as_eval_and_training_metrics_as_train() -> None:
    rnd = SyncRound(3, SHAPES, RoundPolicy(1, 2), opened_at=0.0)
    for device, n, acc in (("a", 10, 0.5), ("b", 30, 0.9)):
        u = UpdateMessage(device, f"{device}-u", 3, n, "fp32", {"w": np.ones(2, np.float32)},
                          {"loss": 0.2, "eval_accuracy": acc})
        rnd.add(u, {"w": np.ones(2, np.float32)}, 1)
    metrics = rnd.result().metrics
    assert metrics["eval_accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)   # the devices' view of v3
    assert metrics["train_loss"] == pytest.approx(0.2) and "train_eval_accuracy" not in metrics

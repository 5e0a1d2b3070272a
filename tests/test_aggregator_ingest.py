"""Every kind of bad update gets a rejected receipt with its reason and leaves the model alone;
good ones are folded; rounds produce versions that survive a restart. No broker needed: these drive
the aggregator's sans-IO steps directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import unbounded

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import ConfigError
from fedmq.broker.messages import ModelMessage, UpdateMessage, decode_message

ARCH = MLPArchitecture(4, (3,), 2)


def make_config(tmp_path: Path, **overrides: object) -> AggregatorConfig:
    fields: dict = dict(fleet="f1", state_dir=tmp_path / "agg", arch=ARCH, seed=7,
                        policy=RoundPolicy(min_updates=1, target_updates=2), max_update_bytes=4096, **unbounded())
    fields.update(overrides)
    return AggregatorConfig(**fields)


def delta(value: float = 0.1) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in ARCH.param_shapes().items()}


def update(device: str = "d1", update_id: str = "u1", base: int = 1, tensors: dict | None = None,
           **fields: object) -> bytes:
    args: dict = dict(device=device, update_id=update_id, base_version=base, num_examples=10, codec="fp32",
                      tensors=delta() if tensors is None else tensors, metrics={"loss": 0.5})
    args.update(fields)
    return UpdateMessage(**args).encode()


@pytest.fixture
def aggregator(tmp_path: Path) -> Aggregator:
    return Aggregator(make_config(tmp_path))


def snapshot(agg: Aggregator) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in agg.model.params.items()}


def tamper_header(payload: bytes, **changes: object) -> bytes:
    """Re-pack a frame's header with fields changed, keeping the tensor bytes."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    header = unpacker.unpack()
    end = unpacker.tell()
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    head = msgpack.packb(header)
    body_start = end + (-end % 8)
    return head + b"\0" * (-len(head) % 8) + payload[body_start:]


BAD_UPDATES: dict[str, tuple[Callable[[], bytes], str]] = {
    "not msgpack": (lambda: b"\xc1\xc1 definitely not msgpack", "malformed"),
    "empty": (lambda: b"", "malformed"),
    "oversize": (lambda: b"\0" * 5000, "oversize"),
    "truncated": (lambda: update()[:-3], "malformed"),
    "wrong schema": (lambda: tamper_header(update(), schema=2), "schema"),
    "wrong kind": (lambda: tamper_header(update(), kind="model"), "kind"),
    "unknown kind": (lambda: tamper_header(update(), kind="weights"), "kind"),
    "missing field": (lambda: tamper_header(update(), num_examples=None), "field"),
    "unknown field": (lambda: tamper_header(update(), extra=1), "field"),
    "zero examples": (lambda: tamper_header(update(), num_examples=0), "field"),
    "other device": (lambda: update(device="d2"), "device_mismatch"),
    "unknown codec": (lambda: update(codec="zip"), "codec"),
    "unknown dtype": (lambda: tamper_header(update(), tensors=[{"name": "x", "dtype": "float128", "shape": [1]}]), "dtype"),
    "wrong dtype": (lambda: update(tensors={k: v.astype(np.float16) for k, v in delta().items()}), "dtype"),
    "missing tensor": (lambda: update(tensors={k: v for k, v in delta().items() if k != "dense1.bias"}), "tensors"),
    "extra tensor": (lambda: update(tensors={**delta(), "dense9.bias": np.zeros(2, np.float32)}), "tensors"),
    "wrong shape": (lambda: update(tensors={**delta(), "dense0.weight": np.zeros((3, 4), np.float32)}), "shape"),
    "NaN": (lambda: update(tensors={**delta(), "dense0.bias": np.array([0, np.nan, 0], np.float32)}), "non_finite"),
    "infinity": (lambda: update(tensors={**delta(), "dense1.weight": np.full((3, 2), np.inf, np.float32)}), "non_finite"),
    "NaN metric": (lambda: update(metrics={"loss": float("nan")}), "non_finite"),
    "stale version": (lambda: update(base=0), "field"),
    "future version": (lambda: update(base=2), "future"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_with_reason_and_changes_nothing(aggregator: Aggregator, case: str) -> None:
    make, reason = BAD_UPDATES[case]
    before = snapshot(aggregator)
    receipt = aggregator.ingest("d1", make())
    assert receipt.status == "rejected"
    assert receipt.reason == reason, receipt.detail
    assert receipt.detail, "a rejection explains itself"
    assert receipt.device == "d1"
    assert aggregator.round.count == 0
    assert aggregator.counters["rejected"] == 1 and aggregator.counters[f"rejected_{reason}"] == 1
    assert aggregator.counters["accepted"] == 0
    for name, value in before.items():
        np.testing.assert_array_equal(aggregator.model.params[name], value)
    # the aggregator still works after it
    assert aggregator.ingest("d1", update()).status == "accepted"


def test_stale_update_after_a_round_is_rejected(aggregator: Aggregator) -> None:
    assert aggregator.ingest("d1", update("d1", "a")).status == "accepted"
    assert aggregator.ingest("d2", update("d2", "b")).status == "accepted"
    aggregator.close_round()
    receipt = aggregator.ingest("d3", update("d3", "c", base=1))
    assert (receipt.status, receipt.reason, receipt.model_version) == ("rejected", "stale", 2)


def test_duplicate_update_id_is_rejected_as_duplicate(aggregator: Aggregator) -> None:
    assert aggregator.ingest("d1", update("d1", "same")).status == "accepted"
    again = aggregator.ingest("d1", update("d1", "same"))
    assert (again.status, again.reason) == ("rejected", "duplicate")
    assert aggregator.round.count == 1
    # a re-send after the round closed is still recognised as a duplicate, not as stale
    assert aggregator.ingest("d2", update("d2", "other")).status == "accepted"
    aggregator.close_round()
    late = aggregator.ingest("d1", update("d1", "same"))
    assert late.reason == "duplicate"


def test_the_next_round_reuses_the_closed_rounds_buffers_from_zero(tmp_path: Path) -> None:
    agg = Aggregator(make_config(tmp_path, arch=MLPArchitecture(4, (7,), 3)))  # shapes of its own
    initial = {k: np.array(v) for k, v in agg.model.params.items()}
    tensors = lambda value: {n: np.full(s, value, np.float32) for n, s in agg.config.arch.param_shapes().items()}  # noqa: E731
    agg.ingest("d1", update("d1", "a", tensors=tensors(1.0), num_examples=1))
    agg.ingest("d2", update("d2", "b", tensors=tensors(4.0), num_examples=2))
    closed = agg.round
    buffers = list(closed._mean._sums.values())
    agg.close_round()
    assert all(any(np.shares_memory(mine, old) for old in buffers) for mine in agg.round._mean._sums.values())
    with pytest.raises(RuntimeError, match="released"):  # nothing can fold into the closed round any more
        closed._mean.add(tensors(1.0), 1.0)
    agg.ingest("d1", update("d1", "c", base=2, tensors=tensors(2.0), num_examples=1))
    agg.ingest("d2", update("d2", "d", base=2, tensors=tensors(2.0), num_examples=5))
    agg.close_round()
    for name, value in initial.items():  # (1*1 + 2*4) / 3, then 2: the reused sums started from zero
        np.testing.assert_allclose(agg.model.params[name], value + 3.0 + 2.0, rtol=1e-6)
    agg.registry.close()


def test_round_applies_weighted_mean_and_survives_restart(tmp_path: Path) -> None:
    agg = Aggregator(make_config(tmp_path))
    initial = snapshot(agg)
    agg.ingest("d1", update("d1", "a", tensors=delta(1.0), num_examples=1))
    agg.ingest("d2", update("d2", "b", tensors=delta(4.0), num_examples=2))
    record = agg.close_round()
    assert record.version == 2 and record.parent == 1
    assert record.info["updates"] == 2 and record.info["examples"] == 3
    for name, value in initial.items():
        np.testing.assert_allclose(agg.model.params[name], value + 3.0, rtol=1e-6)  # (1*1 + 2*4) / 3
    agg.registry.close()

    resumed = Aggregator(make_config(tmp_path))
    assert resumed.model.version == 2
    for name in initial:
        np.testing.assert_array_equal(resumed.model.params[name], agg.model.params[name])
    published: ModelMessage = decode_message(resumed.model_payload, max_bytes=1 << 20, expect=ModelMessage)
    assert published.version == 2 and published.parent == 1


def test_restart_with_another_architecture_is_refused(tmp_path: Path) -> None:
    Aggregator(make_config(tmp_path)).registry.close()
    with pytest.raises(ConfigError, match="state_dir"):
        Aggregator(make_config(tmp_path, arch=MLPArchitecture(4, (5,), 2)))


def test_initial_model_is_seeded(tmp_path: Path) -> None:
    a = Aggregator(make_config(tmp_path / "a"))
    b = Aggregator(make_config(tmp_path / "b"))
    c = Aggregator(make_config(tmp_path / "c", seed=8))
    for name in a.model.params:
        np.testing.assert_array_equal(a.model.params[name], b.model.params[name])
    assert any(not np.array_equal(a.model.params[k], c.model.params[k]) for k in a.model.params)


def test_status_reports_counters(aggregator: Aggregator) -> None:
    aggregator.ingest("d1", b"junk")
    aggregator.ingest("d1", update())
    status = aggregator.status()
    assert status.counters["accepted"] == 1
    assert status.counters["rejected_malformed"] == 1
    assert status.counters["round_updates"] == 1
    assert status.model_version == 1


def test_norm_bound_in_reject_mode_refuses_before_the_journal(tmp_path: Path) -> None:
    agg = Aggregator(make_config(tmp_path, max_norm=1.0, norm_mode="reject"))
    big = update("d1", "big", tensors=delta(10.0))
    receipt = agg.ingest("d1", big)
    assert (receipt.status, receipt.reason) == ("rejected", "norm")
    assert agg.round.count == 0
    assert agg.journal.open_round(1) == [], "a refused update is never made durable"


def test_norm_bound_in_clip_mode_scales_the_update(tmp_path: Path) -> None:
    agg = Aggregator(make_config(tmp_path, max_norm=1.0, policy=RoundPolicy(1, 1)))
    initial = snapshot(agg)
    assert agg.ingest("d1", update("d1", "big", tensors=delta(10.0))).status == "accepted"
    agg.close_round()
    change = np.sqrt(sum(float(((agg.model.params[k] - initial[k]) ** 2).sum()) for k in initial))
    assert change == pytest.approx(1.0, rel=1e-5), "one update clipped to norm 1 moves the model by exactly 1"


def test_median_strategy_ignores_an_outlier(tmp_path: Path) -> None:
    agg = Aggregator(make_config(tmp_path, strategy="median", policy=RoundPolicy(3, 3)))
    initial = snapshot(agg)
    agg.ingest("d1", update("d1", "a", tensors=delta(1.0)))
    agg.ingest("d2", update("d2", "b", tensors=delta(2.0)))
    agg.ingest("d3", update("d3", "c", tensors=delta(-1000.0)))
    agg.close_round()
    for name, value in initial.items():
        np.testing.assert_allclose(agg.model.params[name], value + 1.0, rtol=1e-6)  # median of (1, 2, -1000)


def test_unknown_strategy_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy"):
        make_config(tmp_path, strategy="krum")

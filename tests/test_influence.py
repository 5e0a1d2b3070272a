"""Per-round weight caps and norm bounds (aggregator/influence.py), the clipping streaming mean,
the per-device rate limit and the receipts of refused updates: pure logic, hand-computed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig, norm_bound
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.influence import BOOTSTRAP_NORM_RATIO, MIN_HISTORY, InfluenceHistory, InfluenceSettings, RoundBounds
from fedmq.aggregator.intake import DeviceRateLimit, retry_after, salvage_update_id
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.strategy import WeightedMean
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import ConfigError, Reason, RejectedMessage
from fedmq.broker.messages import Receipt, UpdateMessage, decode_message

SHAPES = {"w": (2,)}


def test_without_history_every_update_weighs_the_same_and_the_bound_is_the_models_norm() -> None:
    bounds = InfluenceHistory().bounds(InfluenceSettings(), {"w": np.array([3.0, 4.0], np.float32)})
    assert bounds.equal_weights and bounds.weight(2**31 - 1) == 1.0 == bounds.weight(7)
    assert bounds.max_norm == pytest.approx(5.0 * BOOTSTRAP_NORM_RATIO)


def test_with_history_the_weight_is_capped_at_a_multiple_of_the_median() -> None:
    history = InfluenceHistory()
    history.record([(10.0, 1.0), (20.0, 2.0), (30.0, 3.0), (40.0, 4.0), (50.0, 5.0)])  # medians 30 and 3
    bounds = history.bounds(InfluenceSettings(weight_factor=2.0, norm_factor=2.0), {"w": np.zeros(2, np.float32)})
    assert not bounds.equal_weights and bounds.weight_cap == 60.0 and bounds.max_norm == 6.0
    assert bounds.weight(2**31 - 1) == 60.0 and bounds.weight(25) == 25.0
    # a configured max_examples caps below the history's cap; a fixed max_norm replaces the auto bound
    fixed = history.bounds(InfluenceSettings(max_norm=0.5, auto_norm=False, max_examples=45), {"w": np.zeros(2)})
    assert fixed.weight_cap == 45.0 and fixed.max_norm == 0.5
    off = history.bounds(InfluenceSettings(auto_norm=False, weight_factor=0), {"w": np.zeros(2)})
    assert off.weight_cap is None and off.max_norm is None and off.weight(2**31 - 1) == 2**31 - 1


def test_history_below_the_minimum_is_not_trusted_and_it_round_trips() -> None:
    history = InfluenceHistory()
    history.record([(100.0, 9.0)] * (MIN_HISTORY - 1) + [(math.nan, 1.0)])  # a NaN is never recorded
    assert len(history) == MIN_HISTORY - 1
    assert history.bounds(InfluenceSettings(), {"w": np.array([1.0, 0.0])}).equal_weights
    history.record([(100.0, 9.0)])
    again = InfluenceHistory.from_json(history.to_json())
    assert list(again.weights) == [100.0] * MIN_HISTORY and again.bounds(InfluenceSettings(), {}).max_norm == 18.0


def test_the_window_forgets_the_oldest_updates() -> None:
    history = InfluenceHistory(window=3)
    history.record([(1.0, 1.0), (1000.0, 1000.0), (2.0, 2.0), (3.0, 3.0)])
    assert list(history.weights) == [1000.0, 2.0, 3.0]


def test_settings_refuse_nonsense_and_the_config_reads_auto_off_and_numbers() -> None:
    for bad in (dict(max_norm=-1.0), dict(norm_factor=0.5), dict(weight_factor=0.5), dict(max_examples=-1)):
        with pytest.raises(ValueError):
            InfluenceSettings(**bad)  # type: ignore[arg-type]
    assert norm_bound("auto") == "auto" and norm_bound("OFF") == "off" and norm_bound(0) == "off"
    assert norm_bound(2) == 2.0 and norm_bound("1.5") == 1.5
    for bad_value in ("big", -1.0, float("inf"), True):
        with pytest.raises(ValueError):
            norm_bound(bad_value)
    base = {"state_dir": "/tmp/x"}
    assert AggregatorConfig.from_mapping(base).influence == InfluenceSettings()  # on by default
    off = AggregatorConfig.from_mapping({**base, "rounds": {"max_norm": "off", "weight_factor": 0}}).influence
    assert not off.auto_norm and off.max_norm is None and off.weight_factor == 0
    with pytest.raises(ConfigError) as error:
        AggregatorConfig.from_mapping({**base, "rounds": {"max_norm": "sometimes"}}, source="agg.toml")
    assert "agg.toml" in str(error.value) and "rounds.max_norm" in str(error.value)


def test_the_streaming_mean_clips_a_long_delta_to_the_bound_and_keeps_its_weight() -> None:
    mean = WeightedMean(SHAPES, max_norm=1.0)
    mean.add({"w": np.array([3.0, 4.0], np.float32)}, 1.0)     # norm 5: scaled to [0.6, 0.8]
    assert mean.last_norm == 1.0 and mean.clipped == 1
    mean.add({"w": np.array([0.0, 0.5], np.float32)}, 1.0)     # norm 0.5: as it is
    assert mean.last_norm == pytest.approx(0.5) and mean.clipped == 1
    np.testing.assert_allclose(mean.result()["w"], [0.3, 0.65], rtol=1e-6)  # (0.6 + 0, 0.8 + 0.5) / 2


def test_a_rewind_refolds_a_clipped_delta_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    deltas = [{"w": rng.standard_normal(2).astype(np.float32) * 3} for _ in range(5)]
    straight = WeightedMean(SHAPES, max_norm=1.0)
    for delta in deltas:
        straight.add(delta, 2.0)
    rewound = WeightedMean(SHAPES, max_norm=1.0)
    for delta in deltas:
        rewound.check(delta, 2.0)
        rewound.check(delta, 2.0)  # a second check rewinds the first
        rewound.add(delta, 2.0)
    assert straight.result()["w"].tobytes() == rewound.result()["w"].tobytes()


def test_reject_mode_refuses_a_long_delta_and_changes_nothing() -> None:
    mean = WeightedMean(SHAPES, max_norm=1.0, norm_mode="reject")
    mean.add({"w": np.array([0.5, 0.0], np.float32)}, 1.0)
    with pytest.raises(RejectedMessage) as refused:
        mean.add({"w": np.array([3.0, 4.0], np.float32)}, 1.0)
    assert refused.value.reason is Reason.NORM
    np.testing.assert_array_equal(mean.result()["w"], [0.5, 0.0])


def test_the_rate_limit_is_a_token_bucket_per_device() -> None:
    limit = DeviceRateLimit(per_second=2.0, burst=3)
    assert [limit.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("a", 0.0) == pytest.approx(0.5)   # empty: one token in 1/2 s
    assert limit.take("b", 0.0) == 0.0                  # another device has its own bucket
    assert limit.take("a", 0.5) == 0.0                  # refilled one
    assert limit.take("a", 0.5) == pytest.approx(0.5)
    assert DeviceRateLimit(per_second=0, burst=1).take("a", 0.0) == 0.0  # 0 = no limit
    assert retry_after(0.001) == 0.01 and retry_after(0.123) == 0.13


def test_a_refused_updates_id_is_salvaged_from_its_header() -> None:
    from fedmq.broker.wire import encode_frame

    ok = encode_frame({"kind": "update", "schema": 1, "update_id": "u-1", "num_examples": 0})
    assert salvage_update_id(ok) == "u-1"
    assert salvage_update_id(encode_frame({"update_id": "bad id with spaces"})) == ""
    assert salvage_update_id(b"\xc1garbage") == "" and salvage_update_id(b"") == ""


def test_receipts_say_whether_they_are_final() -> None:
    final = Receipt("d", "u", "rejected", 3, "field", "x")
    later = Receipt("d", "u", "rejected", 3, "rate_limited", "slow down", retry_after_s=0.25)
    assert final.final and not later.final
    assert decode_message(later.encode(), max_bytes=4096, expect=Receipt) == later
    assert "retry_after_s" not in final.encode().decode("latin-1")


def update_payload(device: str, update_id: str, examples: int, value: float, base: int = 1) -> bytes:
    return UpdateMessage(device=device, update_id=update_id, base_version=base, num_examples=examples, codec="fp32",
                         tensors={"dense0.weight": np.full((2, 2), value, np.float32),
                                  "dense0.bias": np.zeros(2, np.float32)}).encode()


def test_the_daemon_caps_a_claimed_weight_and_remembers_the_history_across_a_restart(tmp_path) -> None:
    arch = MLPArchitecture(2, (), 2)
    config = AggregatorConfig(fleet="f", state_dir=tmp_path, arch=arch, seed=1, policy=RoundPolicy(2, 2),
                              influence=InfluenceSettings(auto_norm=False))
    agg = Aggregator(config)
    w0 = np.array(agg.model.params["dense0.weight"])
    # round 1: no history, equal weights: (1 + 3) / 2 whatever the claims
    assert agg.ingest("a", update_payload("a", "a1", 10, 1.0)).status == "accepted"
    assert agg.ingest("b", update_payload("b", "b1", 2**31 - 1, 3.0)).status == "accepted"
    agg.close_round()
    w1 = np.array(agg.model.params["dense0.weight"])
    np.testing.assert_allclose(w1 - w0, 2.0, rtol=1e-6)
    first = agg.registry.get(2)
    assert first is not None and first.info["weights"] == "equal"
    for version, claim in enumerate([10, 10, 10], start=2):
        agg.ingest("a", update_payload("a", f"a{version}", claim, 0.0, base=version))
        agg.ingest("b", update_payload("b", f"b{version}", claim, 0.0, base=version))
        agg.close_round()
    agg.journal.close()
    agg.registry.close()
    again = Aggregator(config)  # the history (claims 10, 2^31-1, then six 10s: median 10) survives
    assert len(again.history) == 8 and again.round.bounds.weight_cap == 20.0
    before = np.array(again.model.params["dense0.weight"])
    again.ingest("a", update_payload("a", "a9", 10, 1.0, base=again.model.version))
    again.ingest("b", update_payload("b", "b9", 2**31 - 1, 4.0, base=again.model.version))
    again.close_round()
    # (10 * 1 + 20 * 4) / 30 = 3: the huge claim weighs 20, not 2^31 - 1
    np.testing.assert_allclose(np.array(again.model.params["dense0.weight"]) - before, 3.0, rtol=1e-6)
    again.journal.close()
    again.registry.close()


def test_a_delta_far_over_the_bound_does_not_wipe_out_the_updates_folded_before_it() -> None:
    """Folding w*x and then -w*(1-s)*x cancels in float32 when s is tiny: such a delta is
    refolded scaled instead, so the honest sums keep their bits."""
    shapes = {"w": (1000,)}
    rng = np.random.default_rng(3)
    honest = [{"w": (rng.standard_normal(1000) * 1e-4).astype(np.float32)} for _ in range(5)]
    attack = {"w": np.zeros(1000, np.float32)}
    attack["w"][:10] = 3e5  # norm about 9.5e5, just under the hard limit; bound 0.01
    mean = WeightedMean(shapes, max_norm=0.01)
    for delta in honest:
        mean.add(delta, 100.0)
    mean.add(attack, 100.0)
    got = mean.result()["w"].astype(np.float64)
    clipped = attack["w"].astype(np.float64) * (0.01 / np.linalg.norm(attack["w"].astype(np.float64)))
    exact = (sum(d["w"].astype(np.float64) for d in honest) + clipped) / 6
    assert mean.clipped == 1
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-9)  # the correction-fold path was off by ~3e-3


def test_a_device_holding_half_of_the_history_cannot_raise_the_weight_cap() -> None:
    history = InfluenceHistory()
    history.record([(2**31 - 1, 1.0), (100.0, 1.0)] * 3)  # every other update is the attacker's
    assert history.bounds(InfluenceSettings(), {}).weight_cap == 200.0  # 2 x the lower middle value


def test_a_history_of_zero_updates_still_bounds_the_next_ones() -> None:
    history = InfluenceHistory()
    history.record([(10.0, 0.0)] * MIN_HISTORY)
    bound = history.bounds(InfluenceSettings(), {"w": np.ones(2)}).max_norm
    assert bound is not None and 0 < bound <= 1e-9


def test_a_stop_between_the_history_and_the_registry_row_resumes_with_the_rounds_own_bounds(tmp_path) -> None:
    arch = MLPArchitecture(2, (), 2)
    config = AggregatorConfig(fleet="f", state_dir=tmp_path, arch=arch, seed=1, policy=RoundPolicy(2, 2))
    agg = Aggregator(config)
    for version in (1, 2, 3):  # six accepted updates: a history
        agg.ingest("a", update_payload("a", f"a{version}", 10, 0.01, base=version))
        agg.ingest("b", update_payload("b", f"b{version}", 30, 0.01, base=version))
        agg.close_round()
    bounds = agg.round.bounds
    # claims of 20 and 20 (the cap) would move the lower median of the weights from 10 to 20
    agg.ingest("a", update_payload("a", "a4", 20, 0.01, base=4))
    agg.ingest("b", update_payload("b", "b4", 1000, 0.01, base=4))
    assert bounds.weight_cap == 20.0 and agg.history.with_round(agg.round.result().applied).bounds(
        config.influence_settings, agg.model.params).weight_cap == 40.0
    # the history of v5 is written, then the process stops before v5's registry row
    agg._save_history(5, agg.history.with_round(agg.round.result().applied))
    agg.journal.close()
    agg.registry.close()
    again = Aggregator(config)
    assert again.model.version == 4 and again.round.count == 2 and again.round.bounds == bounds
    again.journal.close()
    again.registry.close()


def test_the_norm_bound_recovers_as_soon_as_zero_updates_stop() -> None:
    """Half of the history zero (say one stolen device of two sending zero deltas) lowers the
    bound to almost nothing; the honest norms are recorded as they came, so it recovers within
    the window once that stops."""
    history = InfluenceHistory(window=20)
    history.record([(10.0, 0.0), (10.0, 1.0)] * 10)
    assert history.bounds(InfluenceSettings(), {}).max_norm <= 1e-9
    history.record([(10.0, 1.0)] * 11)  # just over half of the window honest again
    assert history.bounds(InfluenceSettings(), {}).max_norm == 2.0


def test_a_restart_during_a_canary_keeps_the_candidates_round_in_the_history(tmp_path) -> None:
    from fedmq.aggregator.rollout import RolloutPolicy

    arch = MLPArchitecture(2, (), 2)
    config = AggregatorConfig(fleet="f", state_dir=tmp_path, arch=arch, seed=1, policy=RoundPolicy(1, 1),
                              rollout=RolloutPolicy(cohort=("d1",)))
    agg = Aggregator(config)
    agg.ingest("a", update_payload("a", "a1", 10, 0.01))
    agg.close_round()  # staged: the candidate v2 is stored, the fleet stays on v1
    assert agg.canary is not None and len(agg.history) == 1
    agg.journal.close()
    agg.registry.close()
    again = Aggregator(config)
    assert again.canary is not None and again.model.version == 1 and len(again.history) == 1
    again.journal.close()
    again.registry.close()


def test_a_round_records_what_updates_came_with_not_what_was_applied() -> None:
    from fedmq.aggregator.rounds import SyncRound

    bounds = RoundBounds(weight_cap=20.0, max_norm=1.0)
    shapes = {"dense0.weight": (2, 2), "dense0.bias": (2,)}
    rnd = SyncRound(1, shapes, RoundPolicy(1, 1), opened_at=0.0,
                    accumulator=WeightedMean(shapes, max_norm=1.0), bounds=bounds)
    update = decode_message(update_payload("a", "a1", 1000, 2.5), max_bytes=1 << 16, expect=UpdateMessage)
    rnd.add(update, dict(update.tensors), 100)  # norm 5 (four 2.5s), clipped to 1; 1000 examples, capped to 20
    assert rnd.result().applied == [(1000.0, pytest.approx(5.0))]

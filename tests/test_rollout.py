"""Staged rollout: the decision rule by hand, the aggregator's candidate / promotion / rollback
steps (sans-IO, restart included), and a real fleet on Mosquitto where a model made worse on
purpose is rolled back automatically while a good one is promoted."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rollout import Canary, RolloutPolicy
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import ModelMessage, Task, UpdateMessage, decode_message
from fedmq.broker.settings import BrokerSettings

ARCH = MLPArchitecture(4, (3,), 2)


def report(version: int, accuracy: float, baseline: int, baseline_accuracy: float, examples: float = 10) -> dict:
    return {"version": version, "accuracy": accuracy, "loss": 0.5, "examples": examples, "baseline_version": baseline,
            "baseline_accuracy": baseline_accuracy, "baseline_loss": 0.4}


# -- the rule ---------------------------------------------------------------------------------------

def test_cohort_is_the_list_or_a_reproducible_share_of_the_online_devices() -> None:
    assert RolloutPolicy(cohort=("a", "b")).choose_cohort(["x", "y"], 5) == ("a", "b")
    online = [f"d{i}" for i in range(10)]
    policy = RolloutPolicy(cohort_percent=25)
    cohort = policy.choose_cohort(online, 5)
    assert len(cohort) == 3 and set(cohort) <= set(online)          # ceil(2.5)
    assert policy.choose_cohort(reversed(online), 5) == cohort        # order of arrival does not matter
    assert RolloutPolicy(cohort_percent=1).choose_cohort(online, 5) != () and not RolloutPolicy().enabled
    assert policy.choose_cohort([], 5) == ()


def test_only_cohort_reports_on_this_candidate_and_baseline_count() -> None:
    canary = Canary(candidate=7, baseline=5, cohort=("a", "b"), started=0.0)
    assert not canary.add_report("z", report(7, 0.9, 5, 0.9))       # not in the cohort
    assert not canary.add_report("a", report(6, 0.9, 5, 0.9))       # another candidate
    assert not canary.add_report("a", report(7, 0.9, 4, 0.9))       # evaluated against another baseline
    assert not canary.add_report("a", report(7, math.nan, 5, 0.9))
    assert not canary.add_report("a", report(7, 0.9, 5, 0.9, examples=0))
    assert canary.add_report("a", report(7, 0.9, 5, 0.9)) and list(canary.reports) == ["a"]


def test_decision_uses_the_median_of_the_cohorts_accuracy_drops() -> None:
    policy = RolloutPolicy(cohort=("a", "b", "c"), max_accuracy_drop=0.02)
    canary = Canary(7, 5, ("a", "b", "c"), started=100.0)
    canary.add_report("a", report(7, 0.80, 5, 0.85, examples=30))   # drop 0.05
    canary.add_report("b", report(7, 0.95, 5, 0.90, examples=10))   # drop -0.05
    assert canary.decide(101.0, policy) is None                     # waits for the whole cohort
    canary.add_report("c", report(7, 0.87, 5, 0.90, examples=20))   # drop 0.03
    decision = canary.decide(101.0, policy)
    # median drop 0.03 > 0.02: rolled back. Shown accuracies: examples capped at 2 x 20 = 40 (none
    # is), candidate (0.80*30 + 0.95*10 + 0.87*20)/60 = 0.8483, baseline (0.85*30 + 0.90*10 + 0.90*20)/60 = 0.875
    assert decision is not None and not decision.promote and "accuracy drop 0.0300" in decision.reason
    assert decision.candidate_accuracy == pytest.approx(0.848333, abs=1e-6)
    assert decision.baseline_accuracy == pytest.approx(0.875)
    relaxed = RolloutPolicy(cohort=("a", "b", "c"), max_accuracy_drop=0.03)
    assert Canary(7, 5, ("a", "b", "c"), 100.0, dict(canary.reports)).decide(101.0, relaxed).promote


def test_one_lying_cohort_device_cannot_promote_a_bad_candidate() -> None:
    """Was: one device reporting accuracy 1.0, baseline 0.0 and 10^15 examples decided alone."""
    policy = RolloutPolicy(cohort=("a", "b", "liar"), max_accuracy_drop=0.02)
    canary = Canary(7, 5, ("a", "b", "liar"), started=0.0)
    canary.add_report("a", report(7, 0.10, 5, 0.95, examples=100))
    canary.add_report("b", report(7, 0.10, 5, 0.95, examples=100))
    assert not canary.add_report("liar", report(7, 1.5, 5, 0.0, examples=1e15))  # an accuracy over 1: refused
    canary.add_report("liar", report(7, 1.0, 5, 0.0, examples=1e15))
    decision = canary.decide(1.0, policy)
    assert decision is not None and not decision.promote and "accuracy drop 0.8500" in decision.reason


def test_min_reports_and_timeout() -> None:
    policy = RolloutPolicy(cohort=("a", "b", "c"), min_reports=1)
    canary = Canary(7, 5, ("a", "b", "c"), started=0.0)
    canary.add_report("a", report(7, 0.9, 5, 0.9))
    assert canary.decide(10.0, policy) is None          # one good report of three: no majority yet
    canary.add_report("b", report(7, 0.9, 5, 0.9))
    assert canary.decide(10.0, policy).promote           # two of three: a majority, c may stay silent
    bad = Canary(7, 5, ("a", "b", "c"), started=0.0)
    bad.add_report("a", report(7, 0.5, 5, 0.9))
    assert bad.decide(10.0, policy) is None
    bad.add_report("b", report(7, 0.5, 5, 0.9))
    assert not bad.decide(10.0, policy).promote          # two bad of three: rolled back without c
    late = Canary(7, 5, ("a", "b", "c"), started=0.0)
    late.add_report("a", report(7, 0.9, 5, 0.9))
    decision = late.decide(301.0, RolloutPolicy(cohort=("a", "b", "c"), timeout_s=300))
    assert decision is not None and not decision.promote and "only 1 of 3" in decision.reason


def test_lying_devices_fewer_than_half_the_cohort_cannot_promote_even_first_or_in_an_even_cohort() -> None:
    liar = report(7, 1.0, 5, 0.0)                        # drop -1: the best a report can say
    honest = report(7, 0.45, 5, 0.95)                    # drop 0.5
    pair = Canary(7, 5, ("liar", "a"), started=0.0)
    pair.add_report("liar", liar)
    pair.add_report("a", honest)
    assert not pair.decide(1.0, RolloutPolicy(cohort=("liar", "a"))).promote  # half is no majority
    early = Canary(7, 5, tuple("abcdefghij"), started=0.0)
    early.add_report("a", liar)                           # reports first; min_reports = 1 is reached
    early.add_report("b", liar)
    policy = RolloutPolicy(cohort=tuple("abcdefghij"), min_reports=1)
    assert early.decide(1.0, policy) is None              # two of ten cannot decide
    for device in "cdefgh":
        early.add_report(device, honest)
    assert not early.decide(1.0, policy).promote          # six bad of ten: rolled back


# -- the aggregator's steps (no broker) ---------------------------------------------------------------

def config(tmp_path: Path, **overrides) -> AggregatorConfig:
    fields: dict = dict(fleet="f1", state_dir=tmp_path / "agg", arch=ARCH, seed=7, policy=RoundPolicy(1, 1),
                        rollout=RolloutPolicy(cohort=("d1",), max_accuracy_drop=0.05))
    fields.update(overrides)
    return AggregatorConfig(**fields)


def one_update(agg: Aggregator, value: float = 1.0) -> None:
    delta = {k: np.full(s, value, np.float32) for k, s in ARCH.param_shapes().items()}
    receipt = agg.ingest("d9", UpdateMessage("d9", f"u{agg.model.version}-{value}", agg.model.version, 5, "fp32",
                                              delta).encode())
    assert receipt.status == "accepted"


def test_a_round_becomes_a_candidate_and_a_worse_one_is_rolled_back(tmp_path: Path) -> None:
    agg = Aggregator(config(tmp_path))
    v1 = {k: np.array(v) for k, v in agg.model.params.items()}
    one_update(agg)
    record = agg.close_round()
    assert record.version == 2 and record.info["stage"] == "canary" and record.info["cohort"] == ["d1"]
    assert agg.model.version == 1 and agg.canary is not None        # the fleet stays on v1
    candidate = decode_message(agg.canary_payload, max_bytes=1 << 20, expect=ModelMessage)
    assert candidate.version == 2 and candidate.cohort == ("d1",)
    assert agg.decide_canary(0.0) is None
    agg._on_evaluation("d1", report(2, 0.50, 1, 0.70))
    decision = agg.decide_canary(agg.canary.started + 1)
    assert decision is not None and not decision.promote
    assert agg.model.version == 3 and agg.canary is None
    for name in v1:                                                 # v3 carries v1's weights
        np.testing.assert_array_equal(agg.model.params[name], v1[name])
    info = agg.registry.get(3).info
    assert (info["source"], info["rollback_of"], info["rejected_candidate"]) == ("rollback", 1, 2)
    assert agg.counters["rollouts_rolled_back"] == 1


def test_a_good_candidate_is_promoted_under_the_next_number(tmp_path: Path) -> None:
    agg = Aggregator(config(tmp_path))
    one_update(agg, 0.5)
    agg.close_round()
    candidate = {k: np.array(v) for k, v in agg._canary_params.items()}
    agg._on_evaluation("d1", report(2, 0.68, 1, 0.70))             # 0.02 worse: within 0.05
    assert agg.decide_canary(agg.canary.started + 1).promote
    assert agg.model.version == 3 and agg.registry.get(3).info["candidate"] == 2
    for name in candidate:
        np.testing.assert_array_equal(agg.model.params[name], candidate[name])
    one_update(agg)                                                 # the fleet trains on v3 now
    assert agg.close_round().version == 4


def test_a_restart_during_a_canary_resumes_it(tmp_path: Path) -> None:
    agg = Aggregator(config(tmp_path))
    one_update(agg)
    agg.close_round()
    agg.registry.close()
    agg.journal.close()
    resumed = Aggregator(config(tmp_path))
    assert resumed.model.version == 1 and resumed.canary is not None and resumed.canary.candidate == 2
    resumed._on_evaluation("d1", report(2, 0.9, 1, 0.7))
    assert resumed.decide_canary(resumed.canary.started).promote and resumed.model.version == 3
    resumed.registry.close()


def test_an_operator_push_is_staged_but_an_operator_rollback_is_immediate(tmp_path: Path) -> None:
    agg = Aggregator(config(tmp_path))
    pushed = {k: np.full(s, 0.25, np.float32) for k, s in ARCH.param_shapes().items()}
    record = agg.install_params(pushed, {"source": "push"})
    assert record.info["stage"] == "canary" and agg.model.version == 1
    with pytest.raises(ValueError, match="being evaluated by its cohort"):
        agg.install_params(pushed, {"source": "push"})
    agg._on_evaluation("d1", report(2, 0.1, 1, 0.7))
    agg.decide_canary(agg.canary.started)
    assert agg.model.version == 3
    back = agg.install_params({k: np.array(v) for k, v in agg.model.params.items()}, {"source": "rollback"})
    assert back.version == 4 and agg.model.version == 4 and agg.canary is None


# -- a real fleet ---------------------------------------------------------------------------------------

@pytest.mark.broker
@pytest.mark.asyncio
async def test_fleet_rolls_back_a_model_made_worse_on_purpose(mqtt_broker: BrokerSettings, fleet: str,
                                                              tmp_path: Path) -> None:
    from conftest import shard_agents

    from fedmq.demo import dirichlet_partition, load_digits_split
    from fedmq.ops import OpsClient, OpsError

    x, y, _, _ = load_digits_split(0, 0.2)
    shards = dirichlet_partition(y, 4, 5.0, 0)
    arch = MLPArchitecture(64, (16,), 10)
    agg_config = AggregatorConfig(
        fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker, client_id=f"{fleet}-agg", arch=arch,
        task=Task(epochs=2, batch_size=16), policy=RoundPolicy(4, 4),
        rollout=RolloutPolicy(cohort_percent=50, max_accuracy_drop=0.02, timeout_s=60),
    )
    aggregator = Aggregator(agg_config)
    agents = shard_agents(fleet, shards, x, y, tmp_path, mqtt_broker, backend="numpy")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(aggregator.run(stop))] + [asyncio.create_task(a.run(stop)) for a in agents]
    registry = ModelRegistry(tmp_path / "agg")
    try:
        async with asyncio.timeout(120):
            # healthy rounds: each candidate beats its baseline on the cohort's data and is promoted
            while aggregator.counters["rollouts_promoted"] < 2:
                await asyncio.sleep(0.1)
            async with aggregator._lock:
                good = {k: np.array(v) for k, v in aggregator.model.params.items()}
                baseline = aggregator.model.version
            installed_before = [a.model_version for a in agents]
            bad = {k: -5.0 * v for k, v in good.items()}            # made worse on purpose
            async with OpsClient(mqtt_broker, fleet, timeout=30) as ops:
                while True:  # the rounds go on: wait for a moment with no candidate under evaluation
                    try:
                        answer = await ops.request("model.push", {"file": "bad.npz"}, tensors=bad)
                        break
                    except OpsError as exc:
                        assert "being evaluated by its cohort" in str(exc)
                        await asyncio.sleep(0.05)
            candidate = int(answer.result["version"])
            while aggregator.counters["rollouts_rolled_back"] < 1:
                await asyncio.sleep(0.1)
            rollback = aggregator.model.version
            while any(a.model_version < rollback for a in agents):
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        assert t.exception() is None
    row = registry.get(candidate)
    assert row.info["stage"] == "canary" and len(row.info["cohort"]) == 2
    info = registry.get(rollback).info
    assert info["source"] == "rollback" and info["rejected_candidate"] == candidate
    assert info["cohort_accuracy"] < info["baseline_accuracy"] - 0.02
    rolled = decode_message(registry.load_payload(registry.get(rollback)), max_bytes=1 << 22, expect=ModelMessage)
    restored = decode_message(registry.load_payload(registry.get(info["rollback_of"])), max_bytes=1 << 22,
                              expect=ModelMessage)
    assert rolled.version > candidate > info["rollback_of"] >= baseline >= min(installed_before)
    for name in good:  # the weights the fleet ran before the bad push, under a new, higher number
        np.testing.assert_array_equal(rolled.params[name], restored.params[name])
    # only the cohort evaluated the bad candidate; no device ever installed it
    assert sum(a.counters["candidates_evaluated"] > 0 for a in agents) >= 2
    assert all(a.counters["models_rejected_version"] == 0 for a in agents)
    registry.close()


def test_agent_evaluates_a_candidate_only_in_its_cohort_and_against_its_installed_model(tmp_path: Path) -> None:
    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 4)).astype(np.float32), y=rng.integers(0, 2, 40))
    agent = Agent(AgentConfig(device_id="d1", fleet="f1", state_dir=tmp_path / "d1", data=tmp_path / "d.npz",
                              backend="numpy"))
    agent.install(ModelMessage("f1", 3, 2, ARCH, Task(), ARCH.init_params(0), 1.0).encode())

    def candidate(version: int, cohort: tuple[str, ...], fleet: str = "f1") -> bytes:
        return ModelMessage(fleet, version, version - 1, ARCH, Task(), ARCH.init_params(1), 2.0, cohort=cohort).encode()

    assert agent.evaluate_candidate(candidate(4, ("d2",))) is None            # not in the cohort
    assert agent.evaluate_candidate(candidate(3, ("d1",))) is None            # not newer than the installed v3
    assert agent.evaluate_candidate(candidate(4, ("d1",), fleet="f2")) is None
    assert agent.counters["candidates_rejected"] == 1
    out = agent.evaluate_candidate(candidate(4, ("d1", "d2")))
    accuracy, _, _ = agent.evaluate(decode_message(candidate(4, ("d1",)), max_bytes=1 << 20, expect=ModelMessage))
    base_accuracy, _, examples = agent.evaluate(agent.model)
    assert out == {"version": 4.0, "accuracy": accuracy, "loss": out["loss"], "examples": float(examples),
                   "baseline_version": 3.0, "baseline_accuracy": base_accuracy, "baseline_loss": out["baseline_loss"]}
    assert agent.model_version == 3                                          # evaluated, not installed


def test_cohort_share_of_a_huge_fleet_is_capped_so_the_candidate_stays_decodable() -> None:
    from fedmq.broker.messages import MAX_COHORT

    online = [f"device-with-a-rather-long-name-{i:06d}" for i in range(20_000)]
    cohort = RolloutPolicy(cohort_percent=50).choose_cohort(online, 3)
    assert len(cohort) == MAX_COHORT
    payload = ModelMessage("f1", 3, 2, ARCH, Task(), ARCH.init_params(0), 1.0, cohort=cohort).encode()
    assert decode_message(payload, max_bytes=1 << 22, expect=ModelMessage).cohort == cohort
    with pytest.raises(ValueError, match="at most 1000 devices"):
        RolloutPolicy(cohort=tuple(online[:1001]))

"""Invariant 1 under real faults: an accepted update counts exactly once across kill -9.

Every part is a real process: Mosquitto, the ``fedmq aggregator`` CLI and four ``fedmq agent``
CLIs with numpy training and explicit seeds. Each round needs exactly the four agents' updates
(min_updates = target_updates = 4), so however often something crashes, every version must
equal a broker-free replay of the same FedAvg run (:func:`fleet_processes.reference_models`);
an update lost would stall the run, one counted twice (or a stale one) would change the model.

The default tests are bounded for CI. Longer soak variants exist only with ``FEDMQ_SOAK=1``
(scaled by ``FEDMQ_SOAK_ROUNDS`` and ``FEDMQ_SOAK_KILLS``); ``FEDMQ_FAULT_SEED`` changes the
random fault schedule (printed with the logs when a test fails).
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from fleet_processes import FleetProcesses, FleetSpec, TopicProbe, fedavg_step, reference_models

from fedmq.demo import dirichlet_partition, load_digits_split

pytestmark = pytest.mark.broker

AGENTS = 4
SEED = int(os.environ.get("FEDMQ_FAULT_SEED", "20240611"))
RTOL, ATOL = 1e-5, 1e-6
WAIT_MODEL = 30.0          # seconds for a process to start and publish, or a round to close after a fault
WAIT_RUN = 60.0            # seconds for the rest of a run after the last fault


@functools.cache
def digit_shards() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Four non-IID shards of scikit-learn's digits (Dirichlet label skew), one per agent."""
    x, y, _, _ = load_digits_split(seed=0, test_fraction=0.2)
    return tuple((x[shard], y[shard]) for shard in dirichlet_partition(y, AGENTS, alpha=0.5, seed=3))


@pytest.fixture
def make_fleet(tmp_path: Path, fleet: str, require_mosquitto: str) -> Iterator[Callable[..., FleetProcesses]]:
    """Build a fleet of real processes under ``tmp_path``; every process is killed at teardown."""
    made: list[FleetProcesses] = []

    def make(*, rounds: int, persistence: bool = False) -> FleetProcesses:
        spec = FleetSpec(fleet=fleet, rounds=rounds, shards=digit_shards(), persistence=persistence)
        made.append(FleetProcesses(tmp_path / f"run{len(made)}", spec))
        return made[-1]

    yield make
    for built in made:
        built.close()


# -- checks --------------------------------------------------------------------------------------

def assert_params_close(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: tensors {sorted(actual)} != {sorted(expected)}"
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what}: tensor {name} differs from the fault-free FedAvg replay")


def assert_counted_exactly_once(fleet: FleetProcesses, *, rejections: set[str]) -> None:
    """The registry holds v1..v(R+1), each round made of exactly the four agents' updates, and the
    models equal the broker-free replay; on the wire, no update was accepted twice."""
    rounds = fleet.spec.rounds
    total_examples = sum(agent.examples for agent in fleet.agents)
    stored = fleet.read_registry()
    assert [r.version for r, _ in stored] == list(range(1, rounds + 2)), "registry versions"
    assert [r.parent for r, _ in stored] == list(range(rounds + 1)), "registry parents"
    for record, model in stored:
        assert (model.version, model.parent) == (record.version, record.parent)
    for record, _ in stored[1:]:
        assert record.info["updates"] == AGENTS, f"v{record.version} was made of {record.info['updates']} updates: {record.info}"
        assert record.info["examples"] == total_examples, f"v{record.version}: {record.info}"

    initial = stored[0][1]
    agents = [(x, y, agent.seed) for (x, y), agent in zip(fleet.spec.shards, fleet.agents, strict=True)]
    # each version from its stored parent: pins every round on its own, without drift
    for (_, parent), (record, model) in itertools.pairwise(stored):
        expected = fedavg_step(parent.params, parent.version, parent.arch, parent.task, agents)
        assert_params_close(model.params, expected, f"v{record.version} from its parent")
    # and the whole run from v1, as if nothing had crashed
    reference = reference_models(initial.params, initial.arch, initial.task, agents, rounds)
    assert_params_close(stored[-1][1].params, reference[-1], f"final v{rounds + 1}")

    assert fleet.probe is not None
    receipts = fleet.probe.receipts()
    accepted = Counter((r.device, r.model_version) for r in receipts if r.status == "accepted")
    assert all(n == 1 for n in accepted.values()), f"an update accepted twice: {accepted}"
    reasons = Counter(r.reason for r in receipts if r.status == "rejected")
    assert set(reasons) <= rejections, f"unexpected rejections {reasons} (allowed: {sorted(rejections)})"
    assert not fleet.probe.undecodable(), fleet.probe.undecodable()
    # a bug must cost one update, not the count: nothing may have gone through the internal-error path
    log = fleet.aggregator_log.read_text(errors="replace")
    assert "internal error" not in log and "rejected_internal" not in log, "the aggregator hit an internal error"


# -- fault schedules ---------------------------------------------------------------------------

FAULT_MOMENTS = ("timer", "update", "model")


def wait_for_fault_moment(fleet: FleetProcesses, rng: random.Random, moment: str) -> str:
    """Wait for a random moment of kind ``moment`` and describe it.

    ``timer``: a random delay (start-up, journal replay, reconnect); ``update``: just after the
    next update crosses the broker (the aggregator is ingesting it); ``model``: just after the next
    model version is published (agents train, publish and the aggregator ingests).
    """
    assert fleet.probe is not None
    since = time.monotonic()
    version = max(fleet.probe.model_versions(), default=0)
    last = fleet.spec.rounds + 1

    def finished(probe: TopicProbe) -> bool:
        return fleet.registry_version() >= last

    if moment == "timer":
        # a restarted aggregator publishes within ~0.4 s and then closes a round every ~0.1 s
        delay = rng.uniform(0.1, 0.6)
        time.sleep(delay)
        return f"{delay:.2f}s later"
    if moment == "update":
        fleet.wait_seen(lambda p: finished(p) or any(s.at > since for s in p.seen("update")), WAIT_MODEL,
                        "the next update on the broker")
        jitter = rng.uniform(0.0, 0.05)
    else:
        fleet.wait_seen(lambda p: finished(p) or max(p.model_versions(), default=0) > version, WAIT_MODEL,
                        f"a model newer than v{version}")
        jitter = rng.uniform(0.0, 0.15)
    time.sleep(jitter)
    return f"{jitter * 1000:.0f} ms after the next {moment}"


def fault_moments(rng: random.Random, count: int) -> list[str]:
    """Every kind of moment once (in random order), then random kinds."""
    first = rng.sample(FAULT_MOMENTS, len(FAULT_MOMENTS))
    return (first + [rng.choice(FAULT_MOMENTS) for _ in range(count)])[:count]


def start_fleet(fleet: FleetProcesses) -> None:
    fleet.start_broker()
    fleet.start_aggregator()
    fleet.wait_seen(lambda p: 1 in p.model_versions(), WAIT_MODEL, "model v1 from the aggregator")
    fleet.start_agents()


def finish_run(fleet: FleetProcesses) -> None:
    """Wait for the last version and the aggregator's own exit (max_rounds), then stop the agents."""
    last = fleet.spec.rounds + 1
    fleet.wait_until(lambda: fleet.registry_version() >= last, WAIT_RUN, f"v{last} in the registry")
    assert fleet.wait_aggregator_exit(WAIT_MODEL) == 0, "the aggregator failed at max_rounds"
    fleet.note(f"aggregator exited at v{fleet.registry_version()}")
    assert fleet.probe is not None
    # every update of v1..vR got a receipt or was superseded by the next model; only an update for
    # the last model (which no aggregator takes) may stay behind. The last version is always
    # published, even when the aggregator died between storing and publishing it: the restarted
    # one publishes it before it stops.
    fleet.wait_until(lambda: last in fleet.probe.model_versions(), WAIT_MODEL, f"v{last} published")
    keep = {last}
    fleet.wait_until(lambda: all(set(fleet.outbox_versions(a.index)) <= keep for a in fleet.agents),
                     WAIT_MODEL, f"the outboxes to drain (keeping at most updates for {sorted(keep)})")
    fleet.stop_agents()


def run_with_aggregator_crashes(fleet: FleetProcesses, *, kills: int, seed: int) -> int:
    """SIGKILL the aggregator ``kills`` times at random moments, restarting it after each."""
    rng = random.Random(seed)
    fleet.note(f"seed {seed}")
    done = 0
    with fleet:
        start_fleet(fleet)
        for moment in fault_moments(rng, kills):
            when = wait_for_fault_moment(fleet, rng, moment)
            assert fleet.aggregator is not None
            if fleet.aggregator.poll() is not None or fleet.registry_version() > fleet.spec.rounds:
                fleet.note(f"no kill {when}: max_rounds reached")
                break
            version = fleet.registry_version()
            fleet.kill_aggregator()
            done += 1
            fleet.note(f"aggregator killed {when} (registry at v{version}, journal {journal_sizes(fleet)})")
            time.sleep(rng.uniform(0.0, 0.3))
            fleet.start_aggregator()
        finish_run(fleet)
        assert_counted_exactly_once(fleet, rejections={"duplicate"})
    return done


def journal_sizes(fleet: FleetProcesses) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted((fleet.aggregator_dir / "journal").glob("v*.log"))}


def kill_broker(fleet: FleetProcesses, rng: random.Random, when: str) -> None:
    version = fleet.registry_version()
    fleet.broker.kill()
    downtime = rng.uniform(0.05, 0.5)
    time.sleep(downtime)
    fleet.broker.restart()
    fleet.note(f"broker killed {when} (registry at v{version}), restarted after {downtime:.2f}s")


# -- the tests ---------------------------------------------------------------------------------

def test_aggregator_killed_at_random_points(make_fleet: Callable[..., FleetProcesses]) -> None:
    """SIGKILL the aggregator three times (start-up, mid-ingest, mid-round) and restart it: the
    journal and the agents' outboxes make every round hold each agent's update exactly once."""
    fleet = make_fleet(rounds=6)
    assert run_with_aggregator_crashes(fleet, kills=3, seed=SEED) == 3


@pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
def test_broker_killed_mid_round(make_fleet: Callable[..., FleetProcesses], persistence: bool) -> None:
    """kill -9 Mosquitto once while all four updates of round 1 wait in it for the aggregator, and
    once at a random later moment; restart it on the same port. With persistence the broker hands
    the queued copies over again, without it they are gone: either way each counts once."""
    fleet = make_fleet(rounds=5, persistence=persistence)
    rng = random.Random(SEED + persistence)
    fleet.note(f"seed {SEED + persistence}, persistence {persistence}")
    devices = {agent.device for agent in fleet.agents}
    with fleet:
        fleet.start_broker()
        fleet.start_aggregator()
        fleet.wait_seen(lambda p: 1 in p.model_versions(), WAIT_MODEL, "model v1 from the aggregator")
        # a paused aggregator holds round 1 open: the agents' updates can only wait in the broker
        fleet.pause_aggregator()
        fleet.start_agents()
        fleet.wait_seen(lambda p: {u.device for u in p.updates() if u.base_version == 1} == devices, WAIT_MODEL,
                        "every agent's update for v1 on the broker")
        assert fleet.registry_version() == 1
        if persistence:
            fleet.broker.save_database()  # the queued updates are certainly in the database
        fleet.broker.kill()
        fleet.resume_aggregator()
        time.sleep(rng.uniform(0.05, 0.5))
        fleet.broker.restart()
        fleet.note("broker killed with round 1's four updates queued for the paused aggregator; restarted")

        moment = rng.choice(FAULT_MOMENTS)
        when = wait_for_fault_moment(fleet, rng, moment)
        # not in the last round: a connection lost while the last version is being published
        # keeps the aggregator running past max_rounds (daemon.py, _close_round sets the stop flag
        # only after a successful publish); the soak variant does not spare it
        if fleet.registry_version() < fleet.spec.rounds:
            kill_broker(fleet, rng, when)
        else:
            fleet.note(f"second broker kill {when} skipped: already at v{fleet.registry_version()}")
        finish_run(fleet)
        assert_counted_exactly_once(fleet, rejections={"duplicate"})


def test_agent_killed_before_its_receipt(make_fleet: Callable[..., FleetProcesses]) -> None:
    """An agent publishes its update and dies before the receipt: the aggregator (paused until then)
    accepts it, and the restarted agent's re-send of the same update is answered ``duplicate``."""
    fleet = make_fleet(rounds=2)
    first = fleet.agents[0]
    with fleet:
        fleet.start_broker()
        fleet.start_aggregator()
        fleet.wait_seen(lambda p: 1 in p.model_versions(), WAIT_MODEL, "model v1 from the aggregator")
        fleet.pause_aggregator()
        fleet.start_agent(0)
        fleet.wait_seen(lambda p: bool(p.updates(first.device)), WAIT_MODEL, f"{first.device}'s update on the broker")
        update = fleet.probe.updates(first.device)[0]  # type: ignore[union-attr]
        assert update.base_version == 1
        fleet.wait_until(lambda: bool(fleet.outbox(0)), WAIT_MODEL, f"{first.device}'s update in its outbox")
        assert [p.name for p in fleet.outbox(0)] == [f"{update.update_id}.fmq"]
        fleet.kill_agent(0)
        fleet.note(f"{first.device} killed with {update.update_id} published and in its outbox")
        assert not fleet.probe.receipts(first.device)  # type: ignore[union-attr]
        assert [p.name for p in fleet.outbox(0)] == [f"{update.update_id}.fmq"], "the outbox lost the update"

        def answered(status: str, reason: str | None) -> Callable[[TopicProbe], bool]:
            return lambda p: any(r.update_id == update.update_id and r.status == status and r.reason == reason
                                 for r in p.receipts(first.device))

        fleet.resume_aggregator()
        fleet.wait_seen(answered("accepted", None), WAIT_MODEL, f"the aggregator to accept {update.update_id}")
        fleet.note("accepted while the agent was dead; restarting it")
        fleet.start_agent(0)
        fleet.wait_seen(answered("rejected", "duplicate"), WAIT_MODEL, f"the re-sent {update.update_id} answered duplicate")
        fleet.wait_until(lambda: not (first.state_dir / "outbox" / f"{update.update_id}.fmq").exists(), WAIT_MODEL,
                         f"{update.update_id} to leave the outbox")
        for agent in fleet.agents[1:]:
            fleet.start_agent(agent.index)
        finish_run(fleet)
        # the restarted agent trained v1 again (a new update id): refused as a repeat, not counted
        assert_counted_exactly_once(fleet, rejections={"duplicate", "repeat"})
        assert fleet.outbox_versions(0) in ([], [fleet.spec.rounds + 1])
        accepted = [r for r in fleet.probe.receipts(first.device) if r.status == "accepted"]  # type: ignore[union-attr]
        assert [r.model_version for r in accepted] == [1, 2]
        assert accepted[0].update_id == update.update_id
        status = fleet.probe.last_aggregator_status()  # type: ignore[union-attr]
        assert status is not None and status.state == "offline", status
        assert status.counters.get("duplicates", 0) >= 1, status.counters
        agent_status = fleet.probe.last_device_status(first.device)  # type: ignore[union-attr]
        assert agent_status is not None and agent_status.state == "offline"
        assert agent_status.counters.get("duplicate_receipts", 0) >= 1, agent_status.counters


# -- soak: only collected with FEDMQ_SOAK=1 ----------------------------------------------------

if os.environ.get("FEDMQ_SOAK"):
    SOAK_ROUNDS = int(os.environ.get("FEDMQ_SOAK_ROUNDS", "20"))
    SOAK_KILLS = int(os.environ.get("FEDMQ_SOAK_KILLS", str(SOAK_ROUNDS)))
    SOAK_SEED = int(os.environ.get("FEDMQ_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))

    @pytest.mark.soak
    def test_soak_aggregator_killed_at_random_points(make_fleet: Callable[..., FleetProcesses]) -> None:
        fleet = make_fleet(rounds=SOAK_ROUNDS)
        assert run_with_aggregator_crashes(fleet, kills=SOAK_KILLS, seed=SOAK_SEED) >= 1

    @pytest.mark.soak
    @pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
    def test_soak_broker_killed_at_random_points(make_fleet: Callable[..., FleetProcesses], persistence: bool) -> None:
        fleet = make_fleet(rounds=SOAK_ROUNDS, persistence=persistence)
        rng = random.Random(SOAK_SEED)
        fleet.note(f"seed {SOAK_SEED}, persistence {persistence}")
        with fleet:
            start_fleet(fleet)
            for moment in fault_moments(rng, SOAK_KILLS):
                when = wait_for_fault_moment(fleet, rng, moment)
                if fleet.registry_version() >= fleet.spec.rounds + 1:
                    break
                kill_broker(fleet, rng, when)
            finish_run(fleet)
            assert_counted_exactly_once(fleet, rejections={"duplicate"})

    @pytest.mark.soak
    def test_soak_anything_killed_at_random_points(make_fleet: Callable[..., FleetProcesses]) -> None:
        """The aggregator, the broker (with persistence) or an agent, chosen at random each time."""
        fleet = make_fleet(rounds=SOAK_ROUNDS, persistence=True)
        rng = random.Random(SOAK_SEED)
        fleet.note(f"seed {SOAK_SEED}")
        with fleet:
            start_fleet(fleet)
            for moment in fault_moments(rng, SOAK_KILLS):
                when = wait_for_fault_moment(fleet, rng, moment)
                if fleet.registry_version() >= fleet.spec.rounds + 1:
                    break
                victim = rng.choice(["aggregator", "broker", *range(AGENTS)])
                if victim == "broker":
                    kill_broker(fleet, rng, when)
                elif victim == "aggregator":
                    fleet.kill_aggregator()
                    fleet.note(f"aggregator killed {when}")
                    time.sleep(rng.uniform(0.0, 0.3))
                    fleet.start_aggregator()
                else:
                    assert isinstance(victim, int)
                    fleet.kill_agent(victim)
                    fleet.note(f"{fleet.agents[victim].device} killed {when}")
                    time.sleep(rng.uniform(0.0, 0.3))
                    fleet.start_agent(victim)
            finish_run(fleet)
            # a restarted agent trains its current model again: the second update is a repeat
            assert_counted_exactly_once(fleet, rejections={"duplicate", "repeat", "stale"})

"""Operator signatures, the devices' trust store with key rotation, signed commands, freeze,
candidates and version jumps on the device: pure logic against real keys and certificates."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.ops import OpsService
from fedmq.broker import pki
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import ConfigError, Reason, RejectedMessage
from fedmq.broker.messages import Command, ModelMessage, OpsRequest, Task, decode_message
from fedmq.broker.operators import REQUEST_WINDOW_S, OperatorSigner, OperatorVerifier
from fedmq.broker.signing import SigningKey, TrustStore, key_id
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig

ARCH = MLPArchitecture(4, (3,), 2)


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ops-pki")
    pki.init_ca(directory, fleet="f1")
    pki.issue_device(directory, "dev-1")
    pki.issue_client(directory, "alice", role="operator")
    pki.issue_client(directory, "bob", role="operator")
    pki.issue_client(directory, "agg", role="aggregator")
    other = tmp_path_factory.mktemp("other-pki")
    pki.init_ca(other, fleet="f1")
    pki.issue_client(other, "mallory", role="operator")
    return directory


def signer(directory: Path, name: str) -> OperatorSigner:
    return OperatorSigner.from_files(*pki.client_paths(directory, name))


def signed_command(sig: OperatorSigner | None, **fields: object) -> bytes:
    defaults: dict[str, object] = dict(command="pause", issued_at=time.time(), target="dev-1", fleet="f1")
    defaults.update(fields)
    return Command(**defaults).encode(sig)  # type: ignore[arg-type]


def test_an_operator_signature_verifies_and_names_the_operator(fleet_pki: Path) -> None:
    verifier = OperatorVerifier.from_files(fleet_pki / "ca.pem", fleet_pki / "crl.pem")
    command = decode_message(signed_command(signer(fleet_pki, "alice")), max_bytes=1 << 16, expect=Command)
    assert verifier.verify(command.signed_by, now=time.time()) == "alice"


def test_what_does_not_count_as_an_operator_signature(fleet_pki: Path) -> None:
    verifier = OperatorVerifier.from_files(fleet_pki / "ca.pem", fleet_pki / "crl.pem")
    alice = signer(fleet_pki, "alice")

    def refusal(payload: bytes, now: float | None = None) -> str:
        command = decode_message(payload, max_bytes=1 << 16, expect=Command)
        with pytest.raises(RejectedMessage) as refused:
            verifier.verify(command.signed_by, now=time.time() if now is None else now)
        assert refused.value.reason is Reason.UNAUTHENTICATED
        return refused.value.detail

    assert "not signed" in refusal(signed_command(None))
    tampered = bytearray(signed_command(alice, reason="a"))
    tampered[tampered.index(b"\xa1a") + 1] ^= 0x02  # "a" -> "c": one byte of the signed header
    assert "does not verify" in refusal(bytes(tampered))
    assert "not valid now" in refusal(signed_command(alice), now=time.time() + 900 * 86400)
    # a certificate of another CA, and the fleet's aggregator and device certificates: no operator
    mallory_dir = next(fleet_pki.parent.glob("other-pki*"))
    assert "not issued by the fleet CA" in refusal(signed_command(signer(mallory_dir, "mallory")))
    for path in (pki.client_paths(fleet_pki, "agg"), pki.device_paths(fleet_pki, "dev-1")):
        cert = x509.load_pem_x509_certificate(path[0].read_bytes())
        key = serialization.load_pem_private_key(path[1].read_bytes(), None)
        assert "not an operator's" in refusal(signed_command(OperatorSigner(cert, key)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not an operator certificate"):
        OperatorSigner.from_files(*pki.client_paths(fleet_pki, "agg"))


def test_a_revoked_operator_signs_nothing(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, fleet="f1")
    pki.issue_client(tmp_path, "carol", role="operator")
    carol = signer(tmp_path, "carol")
    verifier = OperatorVerifier.from_files(tmp_path / "ca.pem", tmp_path / "crl.pem")
    command = decode_message(signed_command(carol), max_bytes=1 << 16, expect=Command)
    assert verifier.verify(command.signed_by, now=time.time()) == "carol"
    # fedmq pki revoke takes devices; an operator's serial goes into the CRL the same way
    ca_cert, ca_key = pki.load_ca(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
           .next_update(now + datetime.timedelta(days=30))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(carol.certificate.serial_number)
                                    .revocation_date(now).build())
           .sign(ca_key, hashes.SHA256()))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RejectedMessage, match="revoked"):
        verifier.verify(command.signed_by, now=time.time())
    # a CRL signed by another key is refused rather than ignored
    other_key = ec.generate_private_key(ec.SECP256R1())
    bad = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
           .next_update(now + datetime.timedelta(days=30)).sign(other_key, hashes.SHA256()))
    (tmp_path / "crl.pem").write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RejectedMessage, match="not signed by the fleet CA"):
        verifier.verify(command.signed_by, now=time.time())


def request(sig: OperatorSigner, *, issued_at: float, fleet: str = "f1", op: str = "model.list") -> OpsRequest:
    payload = OpsRequest("r1", op, "alice", {}, issued_at=issued_at, fleet=fleet).encode(sig)
    return decode_message(payload, max_bytes=1 << 16, expect=OpsRequest)


def test_the_aggregator_takes_requests_in_their_freshness_window_for_its_fleet(fleet_pki: Path, tmp_path: Path) -> None:
    from fedmq.aggregator.config import OpsAuth
    from fedmq.aggregator.daemon import Aggregator

    agg = Aggregator(AggregatorConfig(fleet="f1", state_dir=tmp_path, arch=ARCH, ops_auth=OpsAuth(fleet_pki / "ca.pem")))
    ops = OpsService(agg)
    alice, now = signer(fleet_pki, "alice"), time.time()
    assert ops._authenticate(request(alice, issued_at=now - 10), now) == "alice"
    for stale, expected in ((now - REQUEST_WINDOW_S - 1, "s ago"), (now + 600, "in the future")):
        with pytest.raises(RejectedMessage, match=expected) as refused:
            ops._authenticate(request(alice, issued_at=stale), now)
        assert refused.value.reason is Reason.REPLAYED
    with pytest.raises(RejectedMessage, match="signed for fleet"):
        ops._authenticate(request(alice, issued_at=now, fleet="f2"), now)
    agg.journal.close()
    agg.registry.close()


# -- the device's trust store ---------------------------------------------------------------------

def test_a_rotation_retires_the_old_key_once_a_model_of_the_new_one_is_installed(tmp_path: Path) -> None:
    k1, k2, k3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    store = TrustStore(tmp_path / "trust.json", k1.public_raw)
    assert set(store.keys) == {k1.key_id}
    assert store.installed(k1.key_id, k2.public_raw) == [f"key {k2.key_id} announced as the next fleet key"]
    assert set(store.keys) == {k1.key_id, k2.key_id}  # both verify during the rotation
    assert store.installed(k1.key_id, k2.public_raw) == []  # announced again: nothing new
    changes = store.installed(k2.key_id, None)
    assert changes == [f"key {k2.key_id} is now the fleet key; key {k1.key_id} is retired"]
    reloaded = TrustStore(tmp_path / "trust.json", k1.public_raw)  # the provisioned key is the retired one
    assert set(reloaded.keys) == {k2.key_id} and k1.key_id in reloaded.retired
    payload = ModelMessage("f1", 9, 8, ARCH, Task(), ARCH.init_params(0), 1.0).encode(k1)
    model = decode_message(payload, max_bytes=1 << 20, expect=ModelMessage)
    with pytest.raises(RejectedMessage, match="retired"):
        reloaded.verify(*model.signed_by)  # type: ignore[misc]
    # a key that was never announced stays unknown
    other = decode_message(ModelMessage("f1", 9, 8, ARCH, Task(), ARCH.init_params(0), 1.0).encode(k3),
                           max_bytes=1 << 20, expect=ModelMessage)
    with pytest.raises(RejectedMessage, match="unknown key"):
        reloaded.verify(*other.signed_by)  # type: ignore[misc]


def test_a_trust_store_of_the_older_format_trusts_its_keys_until_the_first_install(tmp_path: Path) -> None:
    """The old format listed every key ever seen, sorted: it does not say which is current. All of
    them verify (as before the upgrade) until a model is installed; its key is then the fleet key
    and the others are retired."""
    k1, k2, k3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()  # rotated k1 -> k2 -> k3
    (tmp_path / "trust.json").write_text(json.dumps({"keys": sorted(k.public_raw.hex() for k in (k1, k2, k3))}))
    store = TrustStore(tmp_path / "trust.json", k1.public_raw)
    assert set(store.keys) == {k1.key_id, k2.key_id, k3.key_id}
    store.installed(k3.key_id, None)
    again = TrustStore(tmp_path / "trust.json", k1.public_raw)
    assert set(again.keys) == {k3.key_id} and {k1.key_id, k2.key_id} <= set(again.retired)


def test_a_newly_provisioned_key_replaces_the_stored_ones(tmp_path: Path) -> None:
    k1, k2 = SigningKey.generate(), SigningKey.generate()
    TrustStore(tmp_path / "trust.json", k1.public_raw).installed(k1.key_id, None)
    (tmp_path / "trust.json").write_text(json.dumps({"current": k1.public_raw.hex(), "next": None, "retired": {}}))
    assert set(TrustStore(tmp_path / "trust.json", k2.public_raw).keys) == {key_id(k2.public_raw)}


# -- the agent: commands, freeze, candidates, version jumps ---------------------------------------

@pytest.fixture
def device(fleet_pki: Path, tmp_path: Path) -> Agent:
    key = SigningKey.generate()
    key.write(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    agent = Agent(AgentConfig(device_id="dev-1", fleet="f1", state_dir=tmp_path / "agent", backend="numpy",
                              fleet_public_key=tmp_path / "fleet.pub", operator_ca_file=fleet_pki / "ca.pem",
                              max_version_jump=100))
    agent.signing_key = key  # type: ignore[attr-defined]
    return agent


def test_the_device_obeys_signed_commands_for_itself_per_setting(device: Agent, fleet_pki: Path) -> None:
    alice, now = signer(fleet_pki, "alice"), time.time()
    assert device.apply_command(signed_command(None), "dev-1") is None  # unsigned
    assert device.apply_command(signed_command(alice, issued_at=now + 3600), "dev-1") is None  # from the future
    assert device.apply_command(signed_command(alice, target="dev-2"), "dev-2") is None  # someone else's
    assert device.apply_command(signed_command(alice, target="dev-1"), "all") is None  # replayed on cmd/all
    assert device.apply_command(signed_command(alice, fleet="f2"), "dev-1") is None
    # a freeze replayed onto the pause topic (or the other way round) does not count
    assert device.apply_command(signed_command(alice, command="freeze", version=1), "dev-1", setting="pause") is None
    assert device.apply_command(signed_command(alice), "dev-1", setting="freeze") is None
    assert not device.paused and not device.frozen and device.counters["commands_rejected"] == 7
    assert device.apply_command(signed_command(alice, issued_at=now - 5), "dev-1") is not None and device.paused
    # freeze is a setting of its own: an older freeze still counts after a newer pause
    assert device.apply_command(signed_command(alice, command="freeze", version=3, issued_at=now - 60, target="all"),
                                "all") is not None
    assert device.paused and device.frozen == 3
    assert device.apply_command(signed_command(bob := signer(fleet_pki, "bob"), command="resume", issued_at=now - 1,
                                               target="all"), "all") is not None
    assert not device.paused and device.frozen == 3 and bob.name == "bob"
    # both settings hold across a restart
    again = Agent(device.config)
    assert not again.paused and again.frozen == 3


def model_payload(key: SigningKey, version: int, **fields: object) -> bytes:
    return ModelMessage("f1", version, version - 1, ARCH, Task(), ARCH.init_params(version), 1.0,
                        **fields).encode(key)  # type: ignore[arg-type]


def test_the_device_installs_no_candidate_nothing_past_a_freeze_and_no_far_jump(device: Agent, fleet_pki: Path) -> None:
    key = device.signing_key  # type: ignore[attr-defined]
    device.install(model_payload(key, 1))
    for payload, reason in ((model_payload(key, 2, cohort=("dev-9",), stage="candidate"), Reason.ROLE),
                            (model_payload(key, 2, stage="candidate"), Reason.ROLE),
                            (model_payload(key, 102), Reason.VERSION)):
        with pytest.raises(RejectedMessage) as refused:
            device.install(payload)
        assert refused.value.reason is reason and device.model_version == 1
    device.apply_command(signed_command(signer(fleet_pki, "alice"), command="freeze", version=2), "dev-1")
    device.install(model_payload(key, 2))
    with pytest.raises(RejectedMessage) as refused:
        device.install(model_payload(key, 3))
    assert refused.value.reason is Reason.FROZEN and device.model_version == 2
    assert device.status().frozen == 2
    device._on_model(model_payload(key, 4))  # as from the model topic: kept out by the freeze
    assert device.model_version == 2 and device.counters["models_rejected_frozen"] == 1
    device.apply_command(signed_command(signer(fleet_pki, "alice"), command="unfreeze"), "dev-1")
    assert device.model_version == 4, "the model the freeze kept out is installed once it lifts"


def test_a_release_on_the_canary_topic_is_not_evaluated_as_a_candidate(device: Agent) -> None:
    key = device.signing_key  # type: ignore[attr-defined]
    device.install(model_payload(key, 1))
    assert device.evaluate_candidate(model_payload(key, 2)) is None
    assert device.counters["candidates_rejected"] == 1


def test_commands_and_requests_round_trip_with_their_new_fields(fleet_pki: Path) -> None:
    alice = signer(fleet_pki, "alice")
    command = Command("freeze", issued_at=5.0, issued_by="alice", target="all", fleet="f1", version=7)
    decoded = decode_message(command.encode(alice), max_bytes=1 << 16, expect=Command)
    assert decoded == command and decoded.signed_by is not None
    with pytest.raises(RejectedMessage, match="needs the version"):
        decode_message(Command("freeze", issued_at=5.0).encode(), max_bytes=1 << 16, expect=Command)
    with pytest.raises(RejectedMessage):
        decode_message(Command("pause", issued_at=5.0, target="../x").encode(alice), max_bytes=1 << 16, expect=Command)
    # unsigned, the binding fields stay out, so that devices of the version before read them
    plain = decode_message(Command("pause", issued_at=5.0, target="all", fleet="f1").encode(), max_bytes=1 << 16,
                           expect=Command)
    assert plain.target == "" and plain.fleet == "" and plain.command == "pause"
    unsigned_request = decode_message(OpsRequest("r", "status", "alice", issued_at=9.0, fleet="f1").encode(),
                                      max_bytes=1 << 16, expect=OpsRequest)
    assert unsigned_request.issued_at == 0.0 and unsigned_request.fleet == ""
    # a candidate with a cohort is marked by it (no new key for older devices); without one, by stage
    key = SigningKey.generate()
    with_cohort = ModelMessage("f1", 2, 1, ARCH, Task(), ARCH.init_params(0), 1.0, cohort=("d1",), stage="candidate")
    assert b"stage" not in with_cohort.encode(key)
    assert decode_message(with_cohort.encode(key), max_bytes=1 << 20, expect=ModelMessage).is_candidate
    empty = ModelMessage("f1", 2, 1, ARCH, Task(), ARCH.init_params(0), 1.0, stage="candidate")
    assert decode_message(empty.encode(key), max_bytes=1 << 20, expect=ModelMessage).is_candidate
    req = request(alice, issued_at=9.0)
    assert req.issued_at == 9.0 and req.fleet == "f1" and req.signed_by is not None


def test_a_rate_limited_update_stays_in_the_outbox_until_it_is_due_again(tmp_path: Path) -> None:
    import numpy as np

    from fedmq.broker.messages import Receipt, UpdateMessage

    agent = Agent(AgentConfig(device_id="dev-1", fleet="f1", state_dir=tmp_path / "agent", backend="numpy"))
    update = UpdateMessage(device="dev-1", update_id="u1", base_version=1, num_examples=3, codec="fp32",
                           tensors={"w": np.zeros(2, np.float32)})
    entry = agent.outbox.register(update, update.encode())
    agent._on_receipt(Receipt("dev-1", "u1", "rejected", 1, "rate_limited", "slow", retry_after_s=5.0).encode())
    assert "u1" in agent.outbox and entry.next_attempt >= time.monotonic() + 4.0
    assert agent.counters["deferred_rate_limited"] == 1 and agent.counters["rejected"] == 0
    agent.outbox.retry_after("u1", 0.0)
    assert agent.outbox.due() == [entry]


def test_a_signed_push_is_remembered_across_an_aggregator_restart(fleet_pki: Path, tmp_path: Path) -> None:
    from fedmq.aggregator.config import OpsAuth
    from fedmq.aggregator.daemon import Aggregator

    config = AggregatorConfig(fleet="f1", state_dir=tmp_path, arch=ARCH, ops_auth=OpsAuth(fleet_pki / "ca.pem"))
    first = Aggregator(config)
    pushed = request(signer(fleet_pki, "alice"), issued_at=time.time(), op="model.push")
    OpsService(first)._remember("alice", pushed)
    first.journal.close()
    first.registry.close()
    again = OpsService(Aggregator(config))  # a restart within the freshness window
    assert ("alice", pushed.request_id) in again._seen
    (tmp_path / "ops_seen.json").write_text("{broken")
    assert not OpsService(Aggregator(config))._seen  # unreadable: a warning, not a lock-out


def test_an_upgraded_device_settles_its_old_trust_store_from_the_installed_model(tmp_path: Path) -> None:
    """Mid-rotation: the old store lists k1 (current) and k2 (announced). The installed model,
    signed by k1 and announcing k2, says so: k2 stays the next key, nothing else is trusted."""
    k1, k2, k0 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()  # k0: retired long ago
    k1.write(tmp_path / "k1.key", tmp_path / "k1.pub")
    state = tmp_path / "agent"
    state.mkdir()
    (state / "trust.json").write_text(json.dumps({"keys": sorted(k.public_raw.hex() for k in (k0, k1, k2))}))
    (state / "model.fmq").write_bytes(ModelMessage("f1", 7, 6, ARCH, Task(), ARCH.init_params(7), 1.0,
                                                   next_key=k2.public_raw).encode(k1))
    agent = Agent(AgentConfig(device_id="dev-1", fleet="f1", state_dir=state, backend="numpy",
                              fleet_public_key=tmp_path / "k1.pub"))
    assert set(agent.trust.keys) == {k1.key_id, k2.key_id} and k0.key_id in agent.trust.retired  # type: ignore[union-attr]
    assert agent.install(model_payload(k2, 8)).version == 8  # the rotation goes on
    with pytest.raises(RejectedMessage, match="retired"):
        agent.install(model_payload(k1, 9))


def test_a_request_that_cannot_be_recorded_is_not_remembered(fleet_pki: Path, tmp_path: Path) -> None:
    from fedmq.aggregator.config import OpsAuth
    from fedmq.aggregator.daemon import Aggregator

    ops = OpsService(Aggregator(AggregatorConfig(fleet="f1", state_dir=tmp_path, arch=ARCH,
                                                 ops_auth=OpsAuth(fleet_pki / "ca.pem"))))
    (tmp_path / "ops_seen.json").mkdir()  # the file cannot be written
    pushed = request(signer(fleet_pki, "alice"), issued_at=time.time(), op="model.push")
    with pytest.raises(OSError):
        ops._remember("alice", pushed)
    assert ("alice", pushed.request_id) not in ops._seen  # a re-send can still be done

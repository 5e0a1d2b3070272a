"""Configuration: broker/config.py (reader), broker/settings.py (broker URL), the aggregator's and
the agent's config objects. No broker, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmq.aggregator.config import DEFAULT_MAX_UPDATE_BYTES, AggregatorConfig
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.config import ConfigReader, load_toml
from fedmq.broker.errors import ConfigError, FedmqError
from fedmq.broker.messages import Task
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topics import check_device
from fedmq.edge_agent import config as agent_config
from fedmq.edge_agent.config import DEFAULT_MAX_MODEL_BYTES, AgentConfig, default_device_id

SOURCE = "/etc/fedmq/test.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FEDMQ_* variable of the developer's shell may leak into the readers."""
    for name in list(os.environ):
        if name.startswith("FEDMQ_"):
            monkeypatch.delenv(name)


def reader(data: dict, environ: dict | None = None) -> ConfigReader:
    return ConfigReader(data, SOURCE, environ={} if environ is None else environ)


def config_error(call) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()
    return info.value


# -- ConfigError -------------------------------------------------------------------------------------


def test_config_error_message_names_source_and_key() -> None:
    error = ConfigError("bad", key="rounds.min_updates", source="a.toml")
    assert (error.key, error.source, str(error)) == ("rounds.min_updates", "a.toml", "a.toml: rounds.min_updates: bad")
    assert str(ConfigError("bad", key="k")) == "k: bad"
    assert str(ConfigError("bad", source="a.toml")) == "a.toml: bad"
    assert isinstance(error, FedmqError) and isinstance(error, ValueError)


# -- ConfigReader ------------------------------------------------------------------------------------


def test_typed_get() -> None:
    r = reader({"n": 3, "x": 1.5, "s": "hi", "flag": True, "items": [1, "a"]})
    assert r.get("n", int) == 3
    assert r.get("x", float) == 1.5
    assert r.get("s", str) == "hi"
    assert r.get("flag", bool) is True
    assert r.get("items", list) == [1, "a"]


def test_int_is_accepted_where_a_float_is_asked_and_becomes_float() -> None:
    value = reader({"lr": 2}).get("lr", float)
    assert value == 2.0 and type(value) is float


def test_callable_kind_converts_and_its_failure_names_the_key() -> None:
    r = reader({"p": "/tmp/x", "n": "abc"})
    assert r.get("p", lambda v: Path(v)) == Path("/tmp/x")
    error = config_error(lambda: r.get("n", lambda v: int(v)))
    assert (error.key, error.source) == ("n", SOURCE)


def test_a_class_kind_needs_exactly_that_type() -> None:
    # Classes are type checks, not conversions: a TOML string is not a Path.
    assert config_error(lambda: reader({"p": "/tmp/x"}).get("p", Path)).key == "p"


def test_defaults_when_absent() -> None:
    r = reader({})
    assert r.get("n", int, 7) == 7
    assert r.get("s", str, None) is None


def test_missing_required_key() -> None:
    error = config_error(lambda: reader({}).section("broker").get("url", str, expect="an mqtt:// URL"))
    assert (error.key, error.source) == ("broker.url", SOURCE)
    assert "missing" in str(error) and "an mqtt:// URL" in str(error)


@pytest.mark.parametrize(
    ("value", "kind", "type_name"),
    [
        ("1883", int, "int"),
        (True, int, "int"),
        (1.5, int, "int"),
        (1, bool, "bool"),
        ("yes", bool, "bool"),
        (3, str, "str"),
        ("1.5", float, "float"),
        (True, float, "float"),
    ],
)
def test_wrong_type_names_the_key(value, kind, type_name: str) -> None:
    error = config_error(lambda: reader({"broker": {"port": value}}).section("broker").get("port", kind))
    assert (error.key, error.source) == ("broker.port", SOURCE)
    assert f"must be {type_name}" in str(error)


def test_list_kind_wants_a_list() -> None:
    error = config_error(lambda: reader({"hidden": 32}).get("hidden", list))
    assert error.key == "hidden" and "list" in str(error)


def test_check_failure_names_the_key() -> None:
    r = reader({"rounds": {"server_lr": -1.0}}).section("rounds")
    error = config_error(lambda: r.get("server_lr", float, 1.0, check=lambda v: v > 0, expect="a positive number"))
    assert (error.key, error.source) == ("rounds.server_lr", SOURCE)
    assert "-1.0" in str(error) and "a positive number" in str(error)


def test_section_must_be_a_table() -> None:
    error = config_error(lambda: reader({"broker": "mqtt://h"}).section("broker"))
    assert (error.key, error.source) == ("broker", SOURCE)


def test_absent_section_is_empty() -> None:
    assert reader({}).section("rounds").get("min_updates", int, 1) == 1


def test_unknown_key_suggests_the_close_one() -> None:
    top = reader({"rounds": {"min_update": 2}})
    rounds = top.section("rounds")
    rounds.get("min_updates", int, 1)
    rounds.get("target_updates", int, 10)
    error = config_error(top.finish)
    assert (error.key, error.source) == ("rounds.min_update", SOURCE)
    assert "did you mean 'min_updates'?" in str(error)


def test_unknown_key_without_a_close_one_lists_known_keys() -> None:
    top = reader({"zzz": 1, "fleet": "f"})
    top.get("fleet", str)
    error = config_error(top.finish)
    assert error.key == "zzz" and "known keys here: ['fleet']" in str(error)


def test_unknown_section_is_an_unknown_key() -> None:
    top = reader({"round": {"min_updates": 2}})
    top.section("rounds")
    error = config_error(top.finish)
    assert error.key == "round" and "'rounds'" in str(error)


def test_finish_passes_when_everything_was_read() -> None:
    top = reader({"fleet": "f", "rounds": {"min_updates": 2}})
    top.get("fleet", str)
    rounds = top.section("rounds")
    assert rounds.get("min_updates", int) == 2
    top.finish()  # must not raise; the values were asserted above
    assert top.get("fleet", str) == "f"


# -- environment overrides ---------------------------------------------------------------------------


def test_env_override_name_and_priority() -> None:
    r = reader({"rounds": {"min_updates": 2}}, {"FEDMQ_ROUNDS_MIN_UPDATES": "7"}).section("rounds")
    assert r.get("min_updates", int, 1) == 7


def test_env_override_top_level_and_dashed_keys() -> None:
    r = reader({}, {"FEDMQ_FLEET": "lab", "FEDMQ_MAX_BYTES": "1024"})
    assert r.get("fleet", str, "default") == "lab"
    assert r.get("max-bytes", int, 0) == 1024


def test_env_override_of_a_key_absent_from_the_file() -> None:
    assert reader({}, {"FEDMQ_TASK_LR": "0.5"}).section("task").get("lr", float, 0.2) == 0.5


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        (" On ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_env_bool(raw: str, value: bool) -> None:
    assert reader({"tls": not value}, {"FEDMQ_TLS": raw}).get("tls", bool) is value


@pytest.mark.parametrize("raw", ["maybe", "", "2", "t"])
def test_env_bad_bool(raw: str) -> None:
    error = config_error(lambda: reader({}, {"FEDMQ_BROKER_TLS": raw}).section("broker").get("tls", bool, False))
    assert error.key == "broker.tls"
    assert error.source == "environment variable FEDMQ_BROKER_TLS"


@pytest.mark.parametrize(("raw", "value"), [("12", 12), ("-3", -3), (" 8 ", 8)])
def test_env_int(raw: str, value: int) -> None:
    assert reader({}, {"FEDMQ_N": raw}).get("n", int, 0) == value


@pytest.mark.parametrize("raw", ["seven", "1.5", "", "0x10"])
def test_env_bad_int(raw: str) -> None:
    error = config_error(lambda: reader({}, {"FEDMQ_ROUNDS_MIN_UPDATES": raw}).section("rounds").get("min_updates", int, 1))
    assert (error.key, error.source) == ("rounds.min_updates", "environment variable FEDMQ_ROUNDS_MIN_UPDATES")


@pytest.mark.parametrize(("raw", "value"), [("0.5", 0.5), ("1e-3", 0.001), ("3", 3.0)])
def test_env_float(raw: str, value: float) -> None:
    result = reader({}, {"FEDMQ_LR": raw}).get("lr", float, 0.2)
    assert result == value and type(result) is float


def test_env_bad_float() -> None:
    error = config_error(lambda: reader({}, {"FEDMQ_LR": "fast"}).get("lr", float, 0.2))
    assert error.key == "lr" and error.source == "environment variable FEDMQ_LR"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("32,16", [32, 16]),
        (" 32 , 16 ", [32, 16]),
        ("-3,4", [-3, 4]),
        ("a, b", ["a", "b"]),
        ("8,x", [8, "x"]),
        ("", []),
        ("5,", [5]),
    ],
)
def test_env_list(raw: str, value: list) -> None:
    assert reader({}, {"FEDMQ_MODEL_HIDDEN": raw}).section("model").get("hidden", list, [64]) == value


def test_env_str_is_taken_verbatim() -> None:
    assert reader({}, {"FEDMQ_SEED": " 42 "}).get("seed", str, None) == " 42 "


def test_env_value_goes_through_check() -> None:
    r = reader({}, {"FEDMQ_ROUNDS_SERVER_LR": "-2"}).section("rounds")
    error = config_error(lambda: r.get("server_lr", float, 1.0, check=lambda v: v > 0))
    assert error.source == "environment variable FEDMQ_ROUNDS_SERVER_LR" and error.key == "rounds.server_lr"


def test_reader_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_ROUNDS_TARGET_UPDATES", "4")
    assert ConfigReader({}, SOURCE).section("rounds").get("target_updates", int, 10) == 4


# -- load_toml ---------------------------------------------------------------------------------------


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('fleet = "lab"\n[rounds]\nmin_updates = 2\n')
    assert load_toml(path) == {"fleet": "lab", "rounds": {"min_updates": 2}}


def test_load_toml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    error = config_error(lambda: load_toml(path))
    assert error.source == str(path) and "not found" in str(error)


def test_load_toml_invalid(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("fleet = \n")
    error = config_error(lambda: load_toml(path))
    assert error.source == str(path) and "TOML" in str(error)


# -- BrokerSettings ----------------------------------------------------------------------------------


def test_from_url_plain() -> None:
    s = BrokerSettings.from_url("mqtt://broker.example")
    assert (s.host, s.port, s.tls, s.protocol, s.username, s.password) == ("broker.example", 1883, False, "auto", None, None)


def test_from_url_tls_default_port_is_8883() -> None:
    s = BrokerSettings.from_url("mqtts://broker.example")
    assert (s.host, s.port, s.tls) == ("broker.example", 8883, True)


def test_from_url_explicit_port() -> None:
    assert BrokerSettings.from_url("mqtts://h:9999").port == 9999
    assert BrokerSettings.from_url("mqtt://10.0.0.5:1884").port == 1884
    assert BrokerSettings.from_url("mqtt://h:65535").port == 65535


def test_from_url_credentials_are_percent_decoded() -> None:
    s = BrokerSettings.from_url("mqtt://al%40ice:p%3Ass%2Fw%20rd@h:1884")
    assert (s.username, s.password, s.host, s.port) == ("al@ice", "p:ss/w rd", "h", 1884)


def test_from_url_user_without_password() -> None:
    s = BrokerSettings.from_url("mqtt://bob@h")
    assert (s.username, s.password) == ("bob", None)


@pytest.mark.parametrize("protocol", ["3.1.1", "5", "auto"])
def test_from_url_protocol(protocol: str) -> None:
    assert BrokerSettings.from_url(f"mqtt://h?protocol={protocol}").protocol == protocol


def test_from_url_bad_protocol() -> None:
    error = config_error(lambda: BrokerSettings.from_url("mqtt://h?protocol=4"))
    assert error.key == "broker.protocol"


@pytest.mark.parametrize("url", ["http://h", "tcp://h:1883", "h:1883", "ws://h", ""])
def test_from_url_bad_scheme(url: str) -> None:
    error = config_error(lambda: BrokerSettings.from_url(url))
    assert error.key == "broker.url" and "mqtt://" in str(error)


def test_from_url_unknown_query_parameter() -> None:
    error = config_error(lambda: BrokerSettings.from_url("mqtt://h?qos=1&protocol=5"))
    assert error.key == "broker.url" and "qos" in str(error)


@pytest.mark.parametrize("url", ["mqtt://h:abc", "mqtt://h:70000", "mqtt://h:-1", "mqtt://h:65536"])
def test_from_url_bad_port(url: str) -> None:
    assert config_error(lambda: BrokerSettings.from_url(url)).key == "broker.url"


def test_from_url_overrides() -> None:
    s = BrokerSettings.from_url("mqtt://h", keepalive=60, protocol="5")
    assert (s.keepalive, s.protocol) == (60, "5")


@pytest.mark.parametrize(("field", "value"), [("keepalive", 4), ("keepalive", 65536), ("port", 0), ("protocol", "4")])
def test_settings_are_checked(field: str, value) -> None:
    assert config_error(lambda: BrokerSettings(**{field: value})).key == f"broker.{field}"


def test_url_hides_the_password() -> None:
    s = BrokerSettings(host="h", port=1884, username="alice", password="s3cret")
    assert s.url == "mqtt://alice@h:1884?protocol=auto"
    assert "s3cret" not in s.url and "s3cret" not in BrokerSettings.from_url("mqtts://u:s3cret@h").url
    assert BrokerSettings(tls=True, port=8883, protocol="3.1.1").url == "mqtts://127.0.0.1:8883?protocol=3.1.1"


def test_from_config_url_and_fields() -> None:
    r = reader({"url": "mqtts://u:p@broker:8884", "protocol": "5", "keepalive": 45, "ca_file": "/ca.pem"})
    s = BrokerSettings.from_config(r)
    assert (s.host, s.port, s.tls, s.username, s.password, s.protocol, s.keepalive, s.ca_file) == (
        "broker",
        8884,
        True,
        "u",
        "p",
        "5",
        45,
        "/ca.pem",
    )


def test_from_config_host_and_port() -> None:
    s = BrokerSettings.from_config(reader({"host": "10.1.2.3", "port": 2883, "tls": True}))
    assert (s.host, s.port, s.tls) == ("10.1.2.3", 2883, True)


def test_from_config_bad_protocol_names_the_key() -> None:
    r = reader({"broker": {"protocol": "4"}}).section("broker")
    error = config_error(lambda: BrokerSettings.from_config(r))
    assert (error.key, error.source) == ("broker.protocol", SOURCE)


# -- AggregatorConfig --------------------------------------------------------------------------------


def test_aggregator_defaults() -> None:
    c = AggregatorConfig.from_mapping({"state_dir": "/var/lib/agg"}, source=SOURCE)
    assert c.fleet == "default" and c.client_id == "fedmq-aggregator"
    assert c.state_dir == Path("/var/lib/agg")
    assert c.broker == BrokerSettings()
    assert c.arch == MLPArchitecture(64, (64, 32), 10)
    assert c.seed == 0
    assert c.task == Task(mode="sync", epochs=5, batch_size=16, lr=0.2, codec="fp32", deadline_s=60.0)
    assert c.policy == RoundPolicy(min_updates=1, target_updates=10, deadline_s=60.0)
    assert (c.server_lr, c.max_rounds, c.max_update_bytes) == (1.0, 0, 16 * 1024 * 1024)
    assert DEFAULT_MAX_UPDATE_BYTES == 16 * 1024 * 1024


def test_aggregator_full_mapping() -> None:
    data = {
        "fleet": "lab",
        "state_dir": "/s",
        "client_id": "agg-1",
        "broker": {"url": "mqtt://broker:1884?protocol=3.1.1"},
        "model": {"inputs": 16, "hidden": [8], "classes": 4, "seed": 9},
        "task": {"epochs": 2, "batch_size": 32, "lr": 1, "codec": "fp32", "deadline_s": 15},
        "rounds": {"min_updates": 2, "target_updates": 3, "server_lr": 0.5, "max_rounds": 7},
        "limits": {"max_update_bytes": 2048},
    }
    c = AggregatorConfig.from_mapping(data, source=SOURCE)
    assert (c.fleet, c.client_id, c.broker.host, c.broker.port, c.broker.protocol) == ("lab", "agg-1", "broker", 1884, "3.1.1")
    assert c.arch == MLPArchitecture(16, (8,), 4) and c.seed == 9
    assert c.task == Task(epochs=2, batch_size=32, lr=1.0, deadline_s=15.0)
    assert c.policy == RoundPolicy(min_updates=2, target_updates=3, deadline_s=15.0), "the round deadline is the task's"
    assert (c.server_lr, c.max_rounds, c.max_update_bytes) == (0.5, 7, 2048)


def test_aggregator_typo_names_key_file_and_suggestion() -> None:
    data = {"state_dir": "/s", "rounds": {"min_update": 2}}
    error = config_error(lambda: AggregatorConfig.from_mapping(data, source=SOURCE))
    assert error.key == "rounds.min_update"
    assert error.source == SOURCE
    assert "min_updates" in str(error) and SOURCE in str(error)


def test_aggregator_typo_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('state_dir = "/s"\n[rounds]\nmin_update = 2\n')
    error = config_error(lambda: AggregatorConfig.from_file(path))
    assert (error.key, error.source) == ("rounds.min_update", str(path))
    assert "did you mean 'min_updates'?" in str(error)


def test_aggregator_missing_state_dir() -> None:
    error = config_error(lambda: AggregatorConfig.from_mapping({}, source=SOURCE))
    assert (error.key, error.source) == ("state_dir", SOURCE)


def test_aggregator_min_updates_above_target() -> None:
    data = {"state_dir": "/s", "rounds": {"min_updates": 5, "target_updates": 3}}
    error = config_error(lambda: AggregatorConfig.from_mapping(data, source=SOURCE))
    assert error.source == SOURCE and "min_updates" in str(error)


def test_aggregator_unknown_codec() -> None:
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s", "task": {"codec": "zstd"}}, source=SOURCE))
    assert (error.key, error.source) == ("task.codec", SOURCE)
    assert "zstd" in str(error)


@pytest.mark.parametrize("fleet", ["bad fleet", "a/b", "+", "", "x" * 65])
def test_aggregator_bad_fleet_is_a_config_error(fleet: str) -> None:
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s", "fleet": fleet}, source=SOURCE))
    assert "fleet" in str(error)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"limits": {"max_update_bytes": 1023}}, "limits.max_update_bytes"),
        ({"limits": {"max_update_bytes": 256 * 1024 * 1024 + 1}}, "limits.max_update_bytes"),
        ({"rounds": {"server_lr": 0}}, "rounds.server_lr"),
        ({"rounds": {"max_rounds": -1}}, "rounds.max_rounds"),
        ({"task": {"epochs": "5"}}, "task.epochs"),
        ({"model": {"hidden": 32}}, "model.hidden"),
        ({"broker": {"url": "http://h"}}, "broker.url"),
        ({"broker": {"keepalive": 1}}, "broker.keepalive"),
    ],
)
def test_aggregator_invalid_values_name_key_and_file(data: dict, key: str) -> None:
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s", **data}, source=SOURCE))
    assert (error.key, error.source) == (key, SOURCE)


@pytest.mark.parametrize(
    "data",
    [
        {"task": {"epochs": 0}},
        {"task": {"lr": 0.0}},
        {"task": {"mode": "turbo"}},
        {"task": {"mode": "async"}, "async": {"buffer_size": 0}},
        {"task": {"mode": "async"}, "async": {"max_staleness": -1}},
        {"task": {"mode": "async"}, "async": {"staleness": "linear"}},
        {"task": {"mode": "async"}, "async": {"buffer_sise": 4}},
        {"task": {"mode": "async"}, "async": {"buffer_size": 2}, "rounds": {"min_updates": 3}},
        {"task": {"mode": "async"}, "rounds": {"strategy": "median"}},
        {"model": {"classes": 1}},
        {"model": {"hidden": [0]}},
        {"task": {"deadline_s": -1.0}},
    ],
)
def test_aggregator_invalid_task_or_model_is_a_config_error_naming_the_file(data: dict) -> None:
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s", **data}, source=SOURCE))
    assert error.source == SOURCE


def test_aggregator_async_settings_reach_the_task_and_the_buffer() -> None:
    config = AggregatorConfig.from_mapping({
        "state_dir": "/s", "task": {"mode": "async"},
        "async": {"buffer_size": 4, "max_staleness": 6, "staleness": "hinge", "staleness_hinge_a": 2.0, "staleness_hinge_b": 1.0},
    }, source=SOURCE)
    assert (config.task.mode, config.task.max_staleness, config.buffer_size) == ("async", 6, 4)
    assert config.staleness(1) == 1.0 and config.staleness(3) == pytest.approx(1 / 5)
    sync = AggregatorConfig.from_mapping({"state_dir": "/s", "async": {"max_staleness": 6}}, source=SOURCE)
    assert sync.task.max_staleness == 0  # the [async] section only matters in async mode


def test_aggregator_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_FLEET", "envfleet")
    monkeypatch.setenv("FEDMQ_ROUNDS_MIN_UPDATES", "3")
    monkeypatch.setenv("FEDMQ_ROUNDS_TARGET_UPDATES", "4")
    monkeypatch.setenv("FEDMQ_MODEL_HIDDEN", "16,8")
    monkeypatch.setenv("FEDMQ_TASK_LR", "0.05")
    monkeypatch.setenv("FEDMQ_BROKER_URL", "mqtts://u:p@envbroker")
    c = AggregatorConfig.from_mapping({"state_dir": "/s", "fleet": "filefleet", "rounds": {"min_updates": 1}}, source=SOURCE)
    assert c.fleet == "envfleet"
    assert (c.policy.min_updates, c.policy.target_updates) == (3, 4)
    assert c.arch.hidden == (16, 8)
    assert c.task.lr == 0.05
    assert (c.broker.host, c.broker.port, c.broker.tls, c.broker.password) == ("envbroker", 8883, True, "p")


def test_aggregator_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TASK_EPOCHS", "many")
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s"}, source=SOURCE))
    assert (error.key, error.source) == ("task.epochs", "environment variable FEDMQ_TASK_EPOCHS")


def test_aggregator_overrides() -> None:
    c = AggregatorConfig.from_mapping({"state_dir": "/s"}, source=SOURCE, max_rounds=3, seed=5)
    assert (c.max_rounds, c.seed) == (3, 5)


# -- AgentConfig -------------------------------------------------------------------------------------


def test_agent_defaults() -> None:
    c = AgentConfig.from_mapping({"device_id": "dev-1", "state_dir": "/s"}, source=SOURCE)
    assert (c.device_id, c.state_dir, c.data, c.fleet) == ("dev-1", Path("/s"), None, "default")
    assert (c.backend, c.max_model_bytes, c.resend_after_s, c.seed) == ("auto", 64 * 1024 * 1024, 30.0, None)
    assert c.broker == BrokerSettings()
    assert DEFAULT_MAX_MODEL_BYTES == 64 * 1024 * 1024


def test_agent_full_mapping() -> None:
    data = {
        "device_id": "pi-7",
        "state_dir": "/s",
        "data": "/d/shard.npz",
        "fleet": "lab",
        "backend": "numpy",
        "max_model_bytes": 4096,
        "resend_after_s": 5,
        "seed": "abc",
        "broker": {"host": "b", "port": 1999},
    }
    c = AgentConfig.from_mapping(data, source=SOURCE)
    assert (c.device_id, c.data, c.fleet, c.max_model_bytes, c.resend_after_s, c.seed) == (
        "pi-7",
        Path("/d/shard.npz"),
        "lab",
        4096,
        5.0,
        "abc",
    )
    assert (c.broker.host, c.broker.port) == ("b", 1999)


def test_agent_device_id_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_config.socket, "gethostname", lambda: "edge box#3")
    c = AgentConfig.from_mapping({"state_dir": "/s"}, source=SOURCE)
    assert c.device_id == "edge-box-3"


@pytest.mark.parametrize(
    ("hostname", "device"),
    [
        ("pi4", "pi4"),
        ("my host.local", "my-host.local"),
        ("_x", "device-_x"),
        ("-x", "device--x"),
        ("h" * 100, "h" * 64),
        ("", "device-"),
    ],
)
def test_default_device_id(monkeypatch: pytest.MonkeyPatch, hostname: str, device: str) -> None:
    monkeypatch.setattr(agent_config.socket, "gethostname", lambda: hostname)
    assert default_device_id() == device
    assert check_device(device) == device


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"broker": {"hots": "b"}}, "broker.hots", "'host'"),
        ({"resend_after": 5}, "resend_after", "'resend_after_s'"),
        ({"backnd": "numpy"}, "backnd", "'backend'"),
    ],
)
def test_agent_typo_names_key_file_and_suggestion(data: dict, key: str, hint: str) -> None:
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s", **data}, source=SOURCE))
    assert (error.key, error.source) == (key, SOURCE)
    assert f"did you mean {hint}?" in str(error)


def test_agent_missing_state_dir() -> None:
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d"}, source=SOURCE))
    assert (error.key, error.source) == ("state_dir", SOURCE)


def test_agent_bad_backend() -> None:
    error = config_error(
        lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s", "backend": "torch"}, source=SOURCE)
    )
    assert (error.key, error.source) == ("backend", SOURCE)
    assert "torch" in str(error) and "numpy" in str(error)


@pytest.mark.parametrize(
    ("data", "word"),
    [
        ({"device_id": "all"}, "reserved"),
        ({"device_id": "a/b"}, "device"),
        ({"device_id": ".x"}, "device"),
        ({"fleet": "a b"}, "fleet"),
        ({"fleet": "#"}, "fleet"),
    ],
)
def test_agent_bad_names_are_config_errors(data: dict, word: str) -> None:
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s", **data}, source=SOURCE))
    assert word in str(error) and error.source == SOURCE


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"max_model_bytes": 1023}, "max_model_bytes"),
        ({"max_model_bytes": (1 << 30) + 1}, "max_model_bytes"),
        ({"resend_after_s": 0}, "resend_after_s"),
        ({"seed": 42}, "seed"),
        ({"broker": {"port": "1883"}}, "broker.port"),
        ({"broker": {"url": "mqtt://h?x=1"}}, "broker.url"),
    ],
)
def test_agent_invalid_values_name_key_and_file(data: dict, key: str) -> None:
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s", **data}, source=SOURCE))
    assert (error.key, error.source) == (key, SOURCE)


def test_agent_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_DEVICE_ID", "env-dev")
    monkeypatch.setenv("FEDMQ_MAX_MODEL_BYTES", "2048")
    monkeypatch.setenv("FEDMQ_BROKER_PROTOCOL", "3.1.1")
    monkeypatch.setenv("FEDMQ_BROKER_TLS", "yes")
    c = AgentConfig.from_mapping({"device_id": "file-dev", "state_dir": "/s"}, source=SOURCE)
    assert (c.device_id, c.max_model_bytes, c.broker.protocol, c.broker.tls) == ("env-dev", 2048, "3.1.1", True)


def test_agent_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_RESEND_AFTER_S", "soon")
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s"}, source=SOURCE))
    assert (error.key, error.source) == ("resend_after_s", "environment variable FEDMQ_RESEND_AFTER_S")


def test_agent_from_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nstate_dir = "/s"\n[broker]\nurl = "mqtt://b:1900"\n')
    c = AgentConfig.from_file(path)
    assert (c.device_id, c.broker.host, c.broker.port) == ("pi-1", "b", 1900)


# -- regressions: bugs these tests found, now fixed ------------------------------------------------


def test_regression_broker_url_port_0_silently_becomes_the_default() -> None:
    """``from_url`` uses ``port or (8883 if tls else 1883)``: an explicit ``:0`` is taken for "no port"
    and replaced by the default instead of being refused like any other invalid port."""
    assert config_error(lambda: BrokerSettings.from_url("mqtt://h:0")).key == "broker.url"


@pytest.mark.parametrize("fleet", ["bad fleet", "a/b"])
def test_regression_aggregator_bad_fleet_error_names_neither_key_nor_file(fleet: str) -> None:
    """``AggregatorConfig.__post_init__`` turns the TopicError into ``ConfigError(str(exc))`` with no key;
    ``from_mapping`` only adds the source when a key is set, so the error names neither."""
    error = config_error(lambda: AggregatorConfig.from_mapping({"state_dir": "/s", "fleet": fleet}, source=SOURCE))
    assert (error.key, error.source) == ("fleet", SOURCE)


@pytest.mark.parametrize(("data", "key"), [({"fleet": "a b"}, "fleet"), ({"device_id": "a/b"}, "device_id")])
def test_regression_agent_bad_name_error_has_no_key(data: dict, key: str) -> None:
    """``AgentConfig.__post_init__`` raises ``ConfigError(str(exc))`` without ``key`` for a bad fleet or
    device id, so ``error.key`` is None although the offending key is known."""
    error = config_error(lambda: AgentConfig.from_mapping({"device_id": "d", "state_dir": "/s", **data}, source=SOURCE))
    assert (error.key, error.source) == (key, SOURCE)


@pytest.mark.parametrize("hostname", ["müller-pi", "пи", "edge\u00b2"])
def test_regression_default_device_id_keeps_non_ascii_letters(monkeypatch: pytest.MonkeyPatch, hostname: str) -> None:
    """``default_device_id`` keeps characters with ``str.isalnum()``, which is true for non-ASCII letters
    and digits (``ü``, Cyrillic, ``²``), so the default id fails ``check_device`` and the agent cannot start
    without an explicit ``device_id``."""
    monkeypatch.setattr(agent_config.socket, "gethostname", lambda: hostname)
    device = default_device_id()
    assert check_device(device) == device


def test_with_client_certificates_the_fleet_ca_authenticates_operators_by_default(tmp_path: Path) -> None:
    from fedmq.aggregator.config import AggregatorConfig as Aggregator_
    from fedmq.edge_agent.config import AgentConfig as Agent_

    (tmp_path / "crl.pem").write_text("x")
    tls = {"url": "mqtts://broker:8883", "ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "me.pem"),
           "key_file": str(tmp_path / "me.key")}
    aggregator = Aggregator_.from_mapping({"state_dir": str(tmp_path), "broker": tls})
    assert aggregator.ops_auth.ca_file == tmp_path / "ca.pem" and aggregator.ops_auth.crl_file == tmp_path / "crl.pem"
    agent = Agent_.from_mapping({"state_dir": str(tmp_path), "device_id": "pi-1", "broker": tls})
    assert agent.operator_ca_file == tmp_path / "ca.pem" and agent.operator_crl_file == tmp_path / "crl.pem"
    # without a client certificate (password login, plain TCP) nothing says who the operators are
    plain = {"url": "mqtt://broker:1883"}
    assert Aggregator_.from_mapping({"state_dir": str(tmp_path), "broker": plain}).ops_auth.ca_file is None
    assert Agent_.from_mapping({"state_dir": str(tmp_path), "device_id": "pi-1", "broker": plain}).operator_ca_file is None
    # an explicit file wins, and a misspelt key is an error naming it
    explicit = Aggregator_.from_mapping({"state_dir": str(tmp_path), "broker": tls, "ops": {"ca_file": "/etc/other.pem"}})
    assert explicit.ops_auth.ca_file == Path("/etc/other.pem")
    with pytest.raises(ConfigError, match="ops.ca_flie"):
        Aggregator_.from_mapping({"state_dir": str(tmp_path), "ops": {"ca_flie": "x"}})
    with pytest.raises(ConfigError, match="limits.updates_per_second"):
        Aggregator_.from_mapping({"state_dir": str(tmp_path), "limits": {"updates_per_second": -1.0}})

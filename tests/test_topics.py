"""The topic tree (broker/topics.py): builders, parsing, and name validation (no broker)."""

from __future__ import annotations

import pytest

from fedmq.broker import topics
from fedmq.broker.errors import FedmqError
from fedmq.broker.topics import ParsedTopic, TopicError, parse_topic

# -- builders: every expected string is written out by hand ----------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (lambda: topics.fleet_prefix("f1"), "fedmq/v1/f1"),
        (lambda: topics.model_topic("f1"), "fedmq/v1/f1/model"),
        (lambda: topics.update_topic("f1", "dev-1"), "fedmq/v1/f1/update/dev-1"),
        (lambda: topics.updates_filter("f1"), "fedmq/v1/f1/update/+"),
        (lambda: topics.receipt_topic("f1", "dev-1"), "fedmq/v1/f1/receipt/dev-1"),
        (lambda: topics.status_topic("f1", "dev-1"), "fedmq/v1/f1/status/dev-1"),
        (lambda: topics.statuses_filter("f1"), "fedmq/v1/f1/status/+"),
        (lambda: topics.command_topic("f1", "dev-1"), "fedmq/v1/f1/cmd/dev-1"),
        (lambda: topics.broadcast_command_topic("f1"), "fedmq/v1/f1/cmd/all"),
        (lambda: topics.freeze_topic("f1", "dev-1"), "fedmq/v1/f1/cmd/dev-1/freeze"),
        (lambda: topics.broadcast_freeze_topic("f1"), "fedmq/v1/f1/cmd/all/freeze"),
        (lambda: topics.command_topic_for("f1", "unfreeze"), "fedmq/v1/f1/cmd/all/freeze"),
        (lambda: topics.command_topic_for("f1", "pause", "dev-1"), "fedmq/v1/f1/cmd/dev-1"),
        (lambda: topics.ops_request_topic("f1", "ops.7"), "fedmq/v1/f1/ops/request/ops.7"),
        (lambda: topics.ops_requests_filter("f1"), "fedmq/v1/f1/ops/request/+"),
        (lambda: topics.ops_response_topic("f1", "ops.7"), "fedmq/v1/f1/ops/response/ops.7"),
        (lambda: topics.aggregator_status_topic("f1"), "fedmq/v1/f1/aggregator/status"),
    ],
    ids=[
        "fleet_prefix",
        "model",
        "update",
        "updates_filter",
        "receipt",
        "status",
        "statuses_filter",
        "cmd",
        "broadcast_cmd",
        "freeze",
        "broadcast_freeze",
        "command_topic_for_unfreeze",
        "command_topic_for_pause",
        "ops_request",
        "ops_requests_filter",
        "ops_response",
        "aggregator_status",
    ],
)
def test_topic_builders(built, expected: str) -> None:
    assert built() == expected


def test_names_use_every_allowed_character_class() -> None:
    assert topics.update_topic("Fleet_0.a-b", "Z9_x.y-z") == "fedmq/v1/Fleet_0.a-b/update/Z9_x.y-z"


def test_name_length_limits_are_1_and_64() -> None:
    assert topics.model_topic("a") == "fedmq/v1/a/model"
    assert topics.model_topic("a" * 64) == "fedmq/v1/" + "a" * 64 + "/model"
    with pytest.raises(TopicError):
        topics.model_topic("a" * 65)


# -- parse_topic round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("fedmq/v1/f1/model", ParsedTopic("f1", "model", None)),
        ("fedmq/v1/f1/update/dev-1", ParsedTopic("f1", "update", "dev-1")),
        ("fedmq/v1/f1/receipt/dev-1", ParsedTopic("f1", "receipt", "dev-1")),
        ("fedmq/v1/f1/status/dev-1", ParsedTopic("f1", "status", "dev-1")),
        ("fedmq/v1/f1/cmd/dev-1", ParsedTopic("f1", "cmd", "dev-1")),
        ("fedmq/v1/f1/cmd/all", ParsedTopic("f1", "cmd", "all")),
        ("fedmq/v1/f1/cmd/dev-1/freeze", ParsedTopic("f1", "freeze", "dev-1")),
        ("fedmq/v1/f1/cmd/all/freeze", ParsedTopic("f1", "freeze", "all")),
        ("fedmq/v1/f1/ops/request/ops.7", ParsedTopic("f1", "ops_request", "ops.7")),
        ("fedmq/v1/f1/ops/response/ops.7", ParsedTopic("f1", "ops_response", "ops.7")),
        ("fedmq/v1/f1/aggregator/status", ParsedTopic("f1", "aggregator_status", None)),
    ],
)
def test_parse_topic_literal(topic: str, parsed: ParsedTopic) -> None:
    assert parse_topic(topic) == parsed


@pytest.mark.parametrize(
    ("build", "kind", "device"),
    [
        (lambda f, d: topics.model_topic(f), "model", None),
        (topics.update_topic, "update", "dev-9"),
        (topics.receipt_topic, "receipt", "dev-9"),
        (topics.status_topic, "status", "dev-9"),
        (topics.command_topic, "cmd", "dev-9"),
        (lambda f, d: topics.broadcast_command_topic(f), "cmd", "all"),
        (topics.ops_request_topic, "ops_request", "dev-9"),
        (topics.ops_response_topic, "ops_response", "dev-9"),
        (lambda f, d: topics.aggregator_status_topic(f), "aggregator_status", None),
    ],
)
def test_builders_and_parse_round_trip(build, kind: str, device: str | None) -> None:
    parsed = parse_topic(build("fleet.A", "dev-9"))
    assert parsed == ParsedTopic("fleet.A", kind, device)


def test_parsed_topic_is_frozen() -> None:
    parsed = parse_topic("fedmq/v1/f1/model")
    with pytest.raises(AttributeError):
        parsed.fleet = "other"  # type: ignore[misc]


# -- invalid names -----------------------------------------------------------------------------------

BAD_NAMES = [
    "",
    "a" * 65,
    "a/b",
    "a+b",
    "+",
    "#",
    "a#",
    "a b",
    " a",
    "a ",
    ".hidden",
    "-dash",
    "_under",
    "tab\tx",
    "ä",
    "a*b",
    "$SYS",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_fleet_names_raise(name: str) -> None:
    with pytest.raises(TopicError):
        topics.model_topic(name)
    with pytest.raises(TopicError):
        topics.update_topic(name, "dev-1")
    with pytest.raises(TopicError):
        topics.aggregator_status_topic(name)


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("builder", [topics.update_topic, topics.receipt_topic, topics.status_topic, topics.command_topic])
def test_invalid_device_names_raise(builder, name: str) -> None:
    with pytest.raises(TopicError):
        builder("f1", name)


@pytest.mark.parametrize("builder", [topics.ops_request_topic, topics.ops_response_topic])
@pytest.mark.parametrize("name", ["", "a/b", "+", "#", ".x", "a" * 65])
def test_invalid_ops_client_ids_raise(builder, name: str) -> None:
    with pytest.raises(TopicError):
        builder("f1", name)


@pytest.mark.parametrize("builder", [topics.update_topic, topics.receipt_topic, topics.status_topic, topics.command_topic])
def test_reserved_device_name_all_is_refused(builder) -> None:
    with pytest.raises(TopicError, match="reserved"):
        builder("f1", "all")


def test_all_is_only_reserved_as_a_device() -> None:
    # "all" has a meaning only on the device level of command topics; a fleet may be called that.
    assert topics.model_topic("all") == "fedmq/v1/all/model"
    assert topics.check_name("all") == "all"


@pytest.mark.parametrize("value", [None, 5, b"dev", ["dev"]])
def test_non_string_names_raise_topic_error(value) -> None:
    with pytest.raises(TopicError):
        topics.check_name(value)  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.check_device(value)  # type: ignore[arg-type]


def test_topic_error_is_a_fedmq_error_and_a_value_error() -> None:
    with pytest.raises(TopicError) as info:
        topics.check_name("a/b", "fleet")
    assert isinstance(info.value, FedmqError)
    assert isinstance(info.value, ValueError)
    assert "fleet" in str(info.value) and "'a/b'" in str(info.value)


def test_check_device_returns_the_name() -> None:
    assert topics.check_device("dev-1") == "dev-1"


# -- topics parse_topic refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fedmq",
        "fedmq/v1",
        "fedmq/v1/f1",
        "fedmq/v2/f1/model",
        "fedmq/V1/f1/model",
        "other/v1/f1/model",
        "/fedmq/v1/f1/model",
        "fedmq/v1/f1/model/",
        "fedmq/v1/f1/model/extra",
        "fedmq/v1//model",
        "fedmq/v1/bad fleet/model",
        "fedmq/v1/+/model",
        "fedmq/v1/#",
        "fedmq/v1/f1/update",
        "fedmq/v1/f1/update/",
        "fedmq/v1/f1/update/+",
        "fedmq/v1/f1/update/#",
        "fedmq/v1/f1/update/a/b",
        "fedmq/v1/f1/update/all",
        "fedmq/v1/f1/receipt/all",
        "fedmq/v1/f1/status/all",
        "fedmq/v1/f1/status/.dev",
        "fedmq/v1/f1/unknown/dev-1",
        "fedmq/v1/f1/aggregator",
        "fedmq/v1/f1/aggregator/other",
        "fedmq/v1/f1/aggregator/status/x",
        "fedmq/v1/f1/ops/request",
        "fedmq/v1/f1/ops/other/x",
        "fedmq/v1/f1/ops/request/+",
        "fedmq/v1/f1/ops/request/a/b",
        "$SYS/broker/uptime",
    ],
)
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


# -- regressions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dev\n", "a" * 64 + "\n"])
def test_trailing_newline_is_refused_in_names(name: str) -> None:
    """Regression: a pattern anchored with ``$`` also matches before a trailing newline, which let
    ``"dev\\n"`` (and a 65-character name ending in a newline) into topics."""
    with pytest.raises(TopicError):
        topics.check_name(name)
    with pytest.raises(TopicError):
        topics.update_topic("f1", name)
    with pytest.raises(TopicError):
        parse_topic(f"fedmq/v1/f1/update/{name}")

"""Log set-up: text with or without a timestamp, JSON lines, idempotence, quiet third-party loggers."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from fedmq.broker.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("transitions", "asyncio", "amqtt")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def test_text_has_a_timestamp_outside_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    logging.getLogger("fedmq.test").info("v%d published", 3)
    logging.getLogger("fedmq.test").debug("not at info")
    line = out.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    fedmq\.test: v3 published\n", line), line


def test_text_under_journald_leaves_the_timestamp_to_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    setup_logging("warning", "auto", stream=out)
    logging.getLogger("fedmq.aggregator").warning("rejected %s", "oversize")
    assert out.getvalue() == "WARNING fedmq.aggregator: rejected oversize\n"


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log = logging.getLogger("fedmq.aggregator.daemon")
    log.info("accepted update from %s", "pi-7", extra={"device": "pi-7", "bytes": 1234, "opaque": object()})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("round failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "fedmq.aggregator.daemon"
    assert first["message"] == "accepted update from pi-7"
    assert first["device"] == "pi-7" and first["bytes"] == 1234
    assert "opaque" not in first, "extras that are not JSON data are dropped, not stringified"
    assert "exc_info" not in first
    ts = datetime.fromisoformat(first["ts"])
    assert ts.utcoffset() == timedelta(0), "timestamps are UTC"
    assert abs((datetime.now(ts.tzinfo) - ts).total_seconds()) < 3600
    assert second["level"] == "ERROR" and second["message"] == "round failed"
    assert "RuntimeError: boom" in second["exc_info"] and "Traceback" in second["exc_info"]


def test_calling_twice_does_not_duplicate_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", stream=first)
    setup_logging("info", "json", stream=second)
    logging.getLogger("fedmq.test").info("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


def test_noisy_loggers_are_quiet_unless_debugging() -> None:
    setup_logging("info", "text", stream=io.StringIO())
    assert logging.getLogger("transitions").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("asyncio").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("amqtt").getEffectiveLevel() == logging.ERROR
    setup_logging("debug", "text", stream=io.StringIO())
    assert logging.getLogger("amqtt").getEffectiveLevel() == logging.DEBUG


def test_bad_level_or_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("chatty")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")

"""Logging set-up for the daemons and the CLI: plain text or one JSON object per line.

Under systemd, stderr goes to journald, which stamps every line itself (and sets ``JOURNAL_STREAM``),
so the text format drops its own timestamp there. JSON lines suit log shippers (Loki, Vector,
``journalctl -o cat | jq``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_TEXT_FORMAT = "%(levelname)-7s %(name)s: %(message)s"
FORMATS = ("text", "json", "auto")

# third-party loggers that are chatty below these levels unless we are debugging
NOISY_LOGGERS = {"transitions": logging.WARNING, "asyncio": logging.WARNING, "amqtt": logging.ERROR}

# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, message, exc_info, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in entry or key.startswith("_"):
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue  # an extra that is not JSON data is left out rather than stringified
            entry[key] = value
        return json.dumps(entry, ensure_ascii=False)


class _FedmqHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it instead of adding one."""


def under_journald() -> bool:
    """Whether stderr is connected to journald (systemd sets ``JOURNAL_STREAM`` for the service)."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(level: str = "warning", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger once: ``level`` by name, ``fmt`` text, json or auto (= text).

    Calling it again replaces the handler it installed earlier (no duplicate lines) and leaves
    handlers installed by others (pytest's caplog, for instance) alone. Returns the handler.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FedmqHandler)]:
        root.removeHandler(old)
    handler = _FedmqHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(JOURNAL_TEXT_FORMAT if under_journald() else TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, quiet in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else quiet)
    return handler

"""Reading TOML configuration with environment overrides, checked once, with errors that name the
key and the file.

Every key can be overridden by an environment variable ``FEDMQ_<SECTION>_<KEY>`` (upper case,
dots as underscores): ``FEDMQ_BROKER_URL``, ``FEDMQ_ROUNDS_MIN_UPDATES``. Unknown keys are an error,
with a suggestion when a known key is close (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or invalid file is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found (create it, or pass --config with the right path)", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None


class ConfigReader:
    """Typed access to one table of a config file, recording which keys were read.

    Call :meth:`finish` after reading everything: it rejects keys nobody asked for.
    """

    def __init__(self, data: Mapping[str, Any], source: str, *, prefix: str = "",
                 environ: Mapping[str, str] | None = None) -> None:
        self._data = data
        self._source = source
        self._prefix = prefix
        self._environ = os.environ if environ is None else environ
        self._known: set[str] = set()
        self._children: list[ConfigReader] = []

    def _dotted(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def _env_name(self, key: str) -> str:
        return "FEDMQ_" + self._dotted(key).replace(".", "_").replace("-", "_").upper()

    def section(self, name: str) -> ConfigReader:
        """The sub-table ``name`` (empty if absent)."""
        self._known.add(name)
        value = self._data.get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError("must be a table ([section])", key=self._dotted(name), source=self._source)
        child = ConfigReader(value, self._source, prefix=f"{self._dotted(name)}.", environ=self._environ)
        self._children.append(child)
        return child

    def get(self, key: str, kind: type[T] | Callable[[Any], T], default: Any = _MISSING,
            *, check: Callable[[T], bool] | None = None, expect: str = "") -> T:
        """Read ``key`` as ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list``), from the
        environment first, then the file, then ``default``; ``check`` validates the value."""
        self._known.add(key)
        env_name = self._env_name(key)
        source = self._source
        if env_name in self._environ:
            raw: Any = self._environ[env_name]
            source = f"environment variable {env_name}"
            value = _from_env(raw, kind, key=self._dotted(key), source=source)
        elif key in self._data:
            value = _coerce(self._data[key], kind, key=self._dotted(key), source=source)
        elif default is _MISSING:
            raise ConfigError(f"required key is missing{'; ' + expect if expect else ''}", key=self._dotted(key),
                              source=source)
        else:
            return default
        if check is not None and not check(value):
            raise ConfigError(f"invalid value {value!r}{': ' + expect if expect else ''}", key=self._dotted(key),
                              source=source)
        return value

    def finish(self) -> None:
        """Raise :class:`ConfigError` for any key in the file that no code read."""
        for child in self._children:
            child.finish()
        for key in self._data:
            if key not in self._known:
                close = difflib.get_close_matches(key, sorted(self._known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys here: {sorted(self._known)}"
                raise ConfigError(f"unknown key{hint}", key=self._dotted(key), source=self._source)


def _coerce(value: Any, kind: Any, *, key: str, source: str) -> Any:
    if kind is float and type(value) is int:
        return float(value)
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"must be a list, got {type(value).__name__}", key=key, source=source)
        return value
    if isinstance(kind, type):
        if type(value) is not kind:
            raise ConfigError(f"must be {kind.__name__}, got {type(value).__name__} {value!r}", key=key, source=source)
        return value
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), key=key, source=source) from None


def _from_env(raw: str, kind: Any, *, key: str, source: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"expected true or false, got {raw!r}")
            return lowered in ("1", "true", "yes", "on")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is list:
            return [int(part) if part.strip().lstrip("-").isdigit() else part.strip()
                    for part in raw.split(",") if part.strip()]
        if kind is str:
            return raw
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key, source=source) from None

"""The model registry: atomic blobs plus SQLite rows, resumable after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.aggregator.registry import ModelRegistry, RegistryError


def test_add_get_latest_and_reopen(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    assert reg.latest() is None
    reg.add(1, 0, b"first", {"initial": True})
    reg.add(2, 1, b"second", {"updates": 3})
    reg.close()
    reg = ModelRegistry(tmp_path)
    latest = reg.latest()
    assert latest is not None and latest.version == 2 and latest.parent == 1
    assert latest.info == {"updates": 3}
    assert reg.load_payload(latest) == b"second"
    assert [r.version for r in reg.versions()] == [1, 2]
    assert reg.get(1) is not None and reg.load_payload(reg.get(1)) == b"first"  # type: ignore[arg-type]
    assert reg.get(3) is None
    assert not list((tmp_path / "models").glob(".*.tmp")), "no temporary files are left behind"


def test_versions_only_go_up(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    reg.add(1, 0, b"a", {})
    with pytest.raises(RegistryError, match="not newer"):
        reg.add(1, 0, b"b", {})
    assert reg.load_payload(reg.latest()) == b"a"  # type: ignore[arg-type]


def test_corrupt_or_missing_blob_is_detected(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    record = reg.add(1, 0, b"payload", {})
    record.blob.write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="corrupt"):
        reg.load_payload(record)
    record.blob.unlink()
    with pytest.raises(RegistryError, match="missing"):
        reg.load_payload(record)

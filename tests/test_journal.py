"""The aggregator's write-ahead journal and what it guarantees across a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.journal import UpdateJournal
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import UpdateMessage

ARCH = MLPArchitecture(4, (3,), 2)


def update(device: str, update_id: str, base: int = 1, value: float = 0.5, n: int = 10) -> bytes:
    tensors = {k: np.full(s, value, np.float32) for k, s in ARCH.param_shapes().items()}
    return UpdateMessage(device, update_id, base, n, "fp32", tensors).encode()


def aggregator(tmp_path: Path, target: int = 3) -> Aggregator:
    return Aggregator(AggregatorConfig(fleet="f", state_dir=tmp_path, arch=ARCH, seed=1,
                                       policy=RoundPolicy(min_updates=target, target_updates=target)))


def test_records_survive_reopen_and_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    assert journal.open_round(1) == []
    journal.append("d1", b"first")
    journal.append("d2", b"second")
    journal.close()
    with journal.path(1).open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00")  # a record header whose body never made it to disk
    again = UpdateJournal(tmp_path)
    assert again.open_round(1) == [("d1", b"first"), ("d2", b"second")]
    again.append("d3", b"third")  # continues on a record boundary
    again.close()
    assert UpdateJournal(tmp_path).open_round(1) == [("d1", b"first"), ("d2", b"second"), ("d3", b"third")]


def test_a_corrupt_record_ends_the_journal(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path)
    journal.open_round(1)
    journal.append("d1", b"aaaa")
    journal.append("d2", b"bbbb")
    journal.close()
    data = bytearray(journal.path(1).read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the last payload: its crc no longer matches
    journal.path(1).write_bytes(bytes(data))
    assert UpdateJournal(tmp_path).open_round(1) == [("d1", b"aaaa")]


def test_prune_keeps_recent_rounds(tmp_path: Path) -> None:
    journal = UpdateJournal(tmp_path, keep_rounds=2)
    for version in range(1, 7):
        journal.open_round(version)
        journal.append("d", f"v{version}".encode())
        journal.prune()
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["v00000004.log", "v00000005.log", "v00000006.log"]
    assert [v for v, _ in journal.closed_rounds()] == [4, 5]


def test_restart_mid_round_keeps_accepted_updates(tmp_path: Path) -> None:
    """Accepted updates are counted exactly once across a crash: replayed, and copies are duplicates."""
    first = aggregator(tmp_path)
    assert first.ingest("a", update("a", "ua", value=1.0)).status == "accepted"
    assert first.ingest("b", update("b", "ub", value=2.0)).status == "accepted"
    del first  # a crash: no close, no flush beyond what ingest already made durable

    second = aggregator(tmp_path)
    assert second.round.count == 2 and second.counters["replayed"] == 2
    again = second.ingest("a", update("a", "ua", value=1.0))  # the device never got its receipt
    assert (again.status, again.reason) == ("rejected", "duplicate")
    assert second.ingest("c", update("c", "uc", value=6.0)).status == "accepted"
    assert second.round.ready(now=0)
    record = second.close_round()
    assert record.version == 2
    expected = (1.0 + 2.0 + 6.0) / 3
    initial = aggregator(tmp_path / "fresh").model.params
    for name, value in second.model.params.items():
        np.testing.assert_allclose(value, initial[name] + expected, rtol=1e-6)


def test_restart_after_close_never_reuses_the_round(tmp_path: Path) -> None:
    first = aggregator(tmp_path, target=1)
    first.ingest("a", update("a", "ua"))
    first.close_round()
    first.registry.close()
    second = aggregator(tmp_path, target=1)
    assert second.model.version == 2 and second.round.count == 0, "v1's updates belong to v2 already"
    late = second.ingest("a", update("a", "ua"))
    assert late.reason == "duplicate", "a re-send from before the restart is still recognised"
    stale = second.ingest("b", update("b", "ub"))
    assert stale.reason == "stale" and second.counters["late"] == 1
    second.ingest("b", update("b", "ub2", base=2))
    second.close_round()
    assert [r.version for r in ModelRegistry(tmp_path).versions()] == [1, 2, 3]


def test_journal_failure_sends_no_receipt_and_counts_nothing(tmp_path: Path) -> None:
    agg = aggregator(tmp_path)
    agg.journal.close()  # the journal cannot be written
    assert agg.ingest("a", update("a", "ua")) is None
    assert agg.round.count == 0 and agg.counters["journal_errors"] == 1 and agg.counters["accepted"] == 0


def test_journal_file_is_private(tmp_path: Path) -> None:
    agg = aggregator(tmp_path)
    agg.ingest("a", update("a", "ua"))
    mode = (tmp_path / "journal" / "v00000001.log").stat().st_mode & 0o777
    assert mode == 0o600


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_truncated_journal_at_any_point_loses_only_the_unfinished_record(tmp_path: Path, cut: int) -> None:
    agg = aggregator(tmp_path)
    agg.ingest("a", update("a", "ua"))
    agg.ingest("b", update("b", "ub"))
    agg.journal.close()
    path = tmp_path / "journal" / "v00000001.log"
    path.write_bytes(path.read_bytes()[:-cut])
    resumed = aggregator(tmp_path)
    assert resumed.round.count == 1
    assert resumed.ingest("b", update("b", "ub")).status == "accepted", "b never got a receipt: it counts now"



def test_group_commit_fsyncs_once_at_the_end_and_keeps_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    journal = UpdateJournal(tmp_path)
    journal.open_round(1)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with journal.group_commit():
        for i in range(5):
            journal.append(f"d{i}", f"payload-{i}".encode())
        assert synced == []                      # nothing durable yet: no receipt may go out
    assert len(synced) == 1                      # one fsync for the batch
    journal.append("d9", b"alone")
    assert len(synced) == 2                      # outside a group: one per append, as before
    with pytest.raises(RuntimeError, match="do not nest"), journal.group_commit(), journal.group_commit():
        pass
    journal.close()
    assert [d for d, _ in UpdateJournal(tmp_path).open_round(1)] == [f"d{i}" for i in range(5)] + ["d9"]


def test_record_format_is_plain_crc32_whichever_implementation_wrote_it(tmp_path: Path) -> None:
    """fedmq[fast] computes the CRC with zlib-ng; a journal must stay readable by (and equal to)
    one written with the standard library's zlib."""
    import struct
    import zlib

    from fedmq.aggregator import journal as journal_module

    assert journal_module.crc32.__module__.startswith("zlib_ng"), "the test environment installs fedmq[fast]"
    payload = np.random.default_rng(3).bytes(300_001)
    journal = UpdateJournal(tmp_path)
    journal.open_round(4)
    journal.append("dev-7", payload)
    journal.close()
    raw = journal.path(4).read_bytes()
    length, crc = struct.unpack_from("<II", raw)
    body = raw[8:8 + length]
    assert body == struct.pack("<H", 5) + b"dev-7" + payload
    assert crc == zlib.crc32(body) == zlib.crc32(payload, zlib.crc32(body[:7]))

"""The aggregator's write-ahead journal and what it guarantees across a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import unbounded

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
                                       policy=RoundPolicy(min_updates=target, target_updates=target), **unbounded()))


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


# -- O_DIRECT appends ---------------------------------------------------------------------------

def _o_direct_works(directory: Path) -> bool:
    import os

    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _records(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    # sizes on both sides of the 4 KiB blocks, and one that spans many
    sizes = [0, 1, 4096 - 15, 4096, 4097, 70_000, 3, 1_300_001, 8191, 12]
    return [(f"dev-{i}", rng.bytes(size)) for i, size in enumerate(sizes)]


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    if not _o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path} is on a file system without O_DIRECT (tmpfs?): nothing to test here")
    return tmp_path


def test_direct_appends_write_the_same_file_as_page_cache_appends(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _records(np.random.default_rng(11))
    files = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("FEDMQ_JOURNAL_DIRECT", mode)
        journal = UpdateJournal(disk_dir / f"direct-{mode}")
        journal.open_round(2)
        assert journal.direct == (mode == "1")
        with journal.group_commit():
            for device, payload in records[:4]:
                journal.append(device, payload)
        for device, payload in records[4:]:
            journal.append(device, payload)
        if journal.direct:  # while open, the file ends in zeros up to a block boundary
            raw = journal.path(2).read_bytes()
            assert len(raw) % 4096 == 0 and raw.rstrip(b"\0") == raw[:len(raw.rstrip(b"\0"))]
        journal.close()
        files[mode] = journal.path(2).read_bytes()
        assert UpdateJournal(disk_dir / f"direct-{mode}").open_round(2) == records
    assert files["1"] == files["0"], "close() trims the padding: the same bytes either way"


def test_a_crash_leaves_only_padding_which_a_restart_trims_quietly(disk_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    records = _records(np.random.default_rng(5))
    journal = UpdateJournal(disk_dir / "live")
    journal.open_round(1)
    for device, payload in records[:5]:
        journal.append(device, payload)
    # the process dies here: copy the file as it is on disk, without close()
    shutil.copytree(disk_dir / "live", disk_dir / "crashed")
    size = (disk_dir / "crashed" / "v00000001.log").stat().st_size
    assert size % 4096 == 0
    with caplog.at_level("DEBUG", logger="fedmq.aggregator.journal"):
        resumed = UpdateJournal(disk_dir / "crashed")
        assert resumed.open_round(1) == records[:5]
    assert "trimming" in caplog.text and "cut short" not in caplog.text
    for device, payload in records[5:]:  # appends go on from the last record, not the padding
        resumed.append(device, payload)
    resumed.close()
    journal.close()
    assert UpdateJournal(disk_dir / "crashed").open_round(1) == records


def test_a_failed_direct_write_loses_nothing_before_it(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from fedmq.aggregator.journal import JournalError

    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    journal.append("a", b"x" * 5000)
    assert journal.direct
    real_pwrite = os.pwrite

    def disk_full(fd: int, data: memoryview, offset: int) -> int:
        real_pwrite(fd, data[:4096], offset)  # part of the blocks reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(JournalError, match="No space left"):
        journal.append("b", b"y" * 9000)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    journal.append("c", b"z" * 3)
    journal.close()
    assert UpdateJournal(disk_dir).open_round(1) == [("a", b"x" * 5000), ("c", b"zzz")]


def test_a_file_system_that_refuses_direct_writes_gets_page_cache_writes(disk_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import os

    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    journal.append("a", b"first")
    monkeypatch.setattr(os, "pwrite", lambda *_: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    with caplog.at_level("INFO", logger="fedmq.aggregator.journal"):
        journal.append("b", b"second")
    assert not journal.direct and "O_DIRECT writes refused" in caplog.text
    journal.append("c", b"third")
    journal.close()
    assert UpdateJournal(disk_dir).open_round(1) == [("a", b"first"), ("b", b"second"), ("c", b"third")]


def test_tmpfs_journal_writes_through_the_page_cache(tmp_path: Path) -> None:
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    with tempfile.TemporaryDirectory(dir=shm) as directory:
        journal = UpdateJournal(Path(directory))
        journal.open_round(1)
        journal.append("a", b"payload")
        assert journal.direct == _o_direct_works(Path(directory))
        journal.close()
        assert UpdateJournal(Path(directory)).open_round(1) == [("a", b"payload")]


def fail_writes_of(monkeypatch: pytest.MonkeyPatch, marker: bytes, *, writer_thread_only: bool = False) -> None:
    """Make every O_DIRECT write whose blocks hold ``marker`` fail with EIO (only the journal's
    writer thread's with ``writer_thread_only``); undo with ``monkeypatch.undo()``."""
    import errno
    import os
    import threading

    real_pwrite = os.pwrite

    def failing(fd: int, data: memoryview, offset: int) -> int:
        in_writer = threading.current_thread().name.startswith("fedmq-journal")
        if marker in bytes(data) and (in_writer or not writer_thread_only):
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)


def test_in_a_group_large_records_are_written_while_the_next_is_appended(disk_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading

    from fedmq.aggregator import journal as journal_module

    monkeypatch.setattr(journal_module, "COALESCE", 8192)  # each 10 kB record is "large"
    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    writers: list[str] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda *a: (writers.append(threading.current_thread().name), real_pwrite(*a))[1])
    with journal.group_commit():
        for i in range(4):
            journal.append(f"d{i}", bytes([i]) * 10_000)
    journal.append("alone", b"x")
    me = threading.current_thread().name
    # the first write of a file is waited for (an O_DIRECT refusal shows there); outside a group too
    assert writers[0] == me and writers[-1] == me
    assert len(writers) == 5 and all(name.startswith("fedmq-journal") for name in writers[1:4])
    journal.close()
    assert UpdateJournal(disk_dir).open_round(1) == [(f"d{i}", bytes([i]) * 10_000) for i in range(4)] + [("alone", b"x")]


def test_in_a_group_small_records_reach_the_disk_in_one_write(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    journal.append("first", b"f")  # the file's first write, waited for
    writes: list[int] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (writes.append(len(data)), real_pwrite(fd, data, offset))[1])
    on_disk = journal.path(1).read_bytes()
    with journal.group_commit():
        for i in range(16):
            journal.append(f"d{i}", bytes([i]) * 300)
        assert writes == [] and journal.path(1).read_bytes() == on_disk, "gathered, not written yet"
    assert len(writes) == 1 and writes[0] % 4096 == 0, writes  # one write of whole blocks at the group's end
    journal.append("alone", b"x")  # outside a group: written at once
    assert len(writes) == 2
    journal.close()
    assert UpdateJournal(disk_dir).open_round(1) == ([("first", b"f")] + [(f"d{i}", bytes([i]) * 300) for i in range(16)]
                                                     + [("alone", b"x")])


def test_gathered_records_that_fail_to_reach_the_disk_refuse_the_group(disk_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmq.aggregator.journal import JournalError

    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    fail_writes_of(monkeypatch, b"two")
    with pytest.raises(JournalError, match="Input/output error.*no more updates"), journal.group_commit():
        journal.append("d0", b"zero")   # the file's first write: on disk
        journal.append("d1", b"one")    # gathered
        journal.append("d2", b"two")    # gathered; their write at the group's end fails
    with pytest.raises(JournalError, match="no more updates"):
        journal.append("d3", b"three")
    size = journal.path(1).stat().st_size
    journal.close()  # writes nothing more
    assert journal.path(1).stat().st_size == size
    monkeypatch.undo()
    assert UpdateJournal(disk_dir).open_round(1) == [("d0", b"zero")], "a restart has what reached the disk"


def test_a_refused_direct_write_outside_a_group_leaves_nothing_for_the_next_record(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from fedmq.aggregator.journal import JournalError

    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    journal.append("d0", b"zero")
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(JournalError, match="No space left"):
        journal.append("d1", b"refused")
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    journal.append("d2", b"two")  # the refused record is not written along with this one
    journal.close()
    assert UpdateJournal(disk_dir).open_round(1) == [("d0", b"zero"), ("d2", b"two")]


def test_a_failed_deferred_write_refuses_the_rest_of_the_group(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmq.aggregator import journal as journal_module
    from fedmq.aggregator.journal import JournalError

    monkeypatch.setattr(journal_module, "COALESCE", 1)  # every record written on its own, in the writer thread
    journal = UpdateJournal(disk_dir)
    journal.open_round(1)
    fail_writes_of(monkeypatch, b"two", writer_thread_only=True)  # the blocks that hold d2's record
    with pytest.raises(JournalError, match="Input/output error.*no more updates"), journal.group_commit():
        journal.append("d0", b"zero")
        journal.append("d1", b"one")    # deferred
        journal.append("d2", b"two")    # deferred: fails in the writer thread
        with pytest.raises(JournalError, match="no more updates"):
            journal.append("d3", b"three")  # waits for d2's write: the failure shows here
        with pytest.raises(JournalError, match="no more updates"):
            journal.append("d4", b"four")   # and the journal stays refused
    # the group's sync raised too (pytest.raises above): no receipt for any of the group goes out;
    # closing (as the daemon does on its way out) does not raise again nor write anything more
    size = journal.path(1).stat().st_size
    journal.close()
    assert journal.path(1).stat().st_size == size
    monkeypatch.undo()
    assert UpdateJournal(disk_dir).open_round(1) == [("d0", b"zero"), ("d1", b"one")], "a restart has what reached the disk"


@pytest.mark.parametrize("coalesce, on_disk", [(1, 2), (None, 1)], ids=["each-record-written-alone", "gathered"])
def test_a_batch_whose_deferred_write_fails_gets_no_receipt_and_a_restart_replays_the_disk(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch, coalesce: int | None, on_disk: int) -> None:
    from fedmq.aggregator import journal as journal_module
    from fedmq.aggregator.journal import JournalError

    if coalesce is not None:
        monkeypatch.setattr(journal_module, "COALESCE", coalesce)
    agg = aggregator(disk_dir, target=10)
    assert agg.journal.direct
    batch = [(f"d{i}", update(f"d{i}", f"u{i}", value=0.1 * (i + 1))) for i in range(5)]
    fail_writes_of(monkeypatch, b"u2")
    with pytest.raises(JournalError, match="no more updates"):
        agg._ingest_batch(batch)  # raises instead of returning receipts: the daemon stops, sends none
    monkeypatch.undo()
    agg.journal.close()
    agg.registry.close()
    restarted = aggregator(disk_dir, target=10)
    # written alone: d0 and d1 reached the disk, d2 never did, d3 and d4 were refused;
    # gathered: d0 (the file's first write) reached it, d1-d4 went in the one write that failed
    assert restarted.round.count == on_disk
    assert restarted.ingest("d2", batch[2][1]).status == "accepted", "d2 got no receipt: its re-send counts"
    again = restarted.ingest("d0", batch[0][1])
    assert (again.status, again.reason) == ("rejected", "duplicate")

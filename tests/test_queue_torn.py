"""Torn and corrupt queue storage: every open succeeds, loss is bounded to what was torn, and counted or loud.

(a) A child process commits K records (one group commit each, a cursor with
    each) and is killed with SIGKILL; its WAL is then cut at every byte of its
    last record commits (and at a sample of bytes before them) and a queue is
    opened on each cut. The WAL uses 512-byte pages so that a commit is 2-5
    frames of 536 bytes: every byte over the last two record commits (seven
    frames) and every 37th byte before is ~4,400 opens, ~3 ms each on a tmpfs
    (the Python walk over the WAL's checksums is a third of it, so the WAL is
    kept to K = 12 records).
(b) The main file, after a checkpoint, cut at every page boundary, mid-page and
    around both.
(c) One byte of a middle record's blob changed, at every byte of the blob.
(d) Garbage where the queue file should be.

Copies are opened on a tmpfs mounted for the test when possible (tests run
as root), else in tmp_path with a coarser step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clocks import ManualClock

from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.diskqueue import CORRUPT_DIR, QUEUE_FILE, DiskQueue
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.queueformat import encode_chunk
from tagwriter.sinks.memory import MemorySink

TS0 = 1_700_000_000_000_000
RECORDS = 12  # records the killed child committed
PER_RECORD = 5
PAGE = 512
FRAME = 24 + PAGE
WAL_HEADER = 32


def values(n: int, start: int = 0) -> list[TagValue]:
    return [TagValue(f"line1.tag{i % 100:03d}", TS0 + i, float(i), 192) for i in range(start, start + n)]


@dataclass(frozen=True)
class Scratch:
    """Where copies are opened; `fast` when it is a tmpfs (fsync and file making cost nothing)."""

    path: Path
    fast: bool


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    where = tmp_path / "scratch"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
                             capture_output=True).returncode == 0
    try:
        yield Scratch(where, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def drain_all(q: DiskQueue) -> list[tuple[int, TagValue]]:
    """Every value the queue gives back now, with its position; each batch released as the writer would."""
    out: list[tuple[int, TagValue]] = []
    while True:
        b = q.drain(10**6)
        if not b.rows:
            return out
        out.extend(zip(range(b.start, b.end), b.rows, strict=True))
        q.release(b.start, b.end)


def a_new_value_goes_through(q: DiskQueue) -> bool:
    """The run continues: a value put now is made durable and read back."""
    q.start()
    result = q.put_many(values(1, 10**6))
    if not q.settlement.wait(result.end, 10):
        return False
    return [row for _, row in drain_all(q)] == values(1, 10**6)


# -- (a) a WAL cut at every byte of its last commits --------------------------------

CHILD = textwrap.dedent(f"""
    import sqlite3, sys, time
    from tagwriter.diskqueue import DiskQueue
    from tagwriter.models import TagValue
    folder = sys.argv[1]
    db = sqlite3.connect(folder + "/queue.db")  # small pages: a commit is a few short frames
    db.execute("PRAGMA page_size={PAGE}")
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    q = DiskQueue(folder, fsync_interval=0.0)
    q.start()
    for k in range({RECORDS}):
        rows = [TagValue(f"line1.tag{{i % 100:03d}}", {TS0} + i, float(i), 192)
                for i in range({PER_RECORD} * k, {PER_RECORD} * k + {PER_RECORD})]
        result = q.put_many(rows, cursor=("src", str(k)))
        assert q.settlement.wait(result.end, 10)
    print("committed", flush=True)
    time.sleep(60)
""")


@pytest.fixture(scope="module")
def killed_queue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The queue folder a SIGKILLed process left after RECORDS acknowledged group commits."""
    folder = tmp_path_factory.mktemp("killed") / "queue"
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "committed"
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert (folder / (QUEUE_FILE + "-wal")).exists()  # no clean close: no checkpoint
    return folder


def commit_ends(wal: bytes) -> list[int]:
    """The byte offsets where each committed transaction of an intact WAL ends (its commit frame's end)."""
    ends, at = [], WAL_HEADER
    page_size = struct.unpack(">I", wal[8:12])[0]
    assert page_size == PAGE
    while at + FRAME <= len(wal):
        _page, db_size = struct.unpack(">II", wal[at:at + 8])
        at += FRAME
        if db_size:
            ends.append(at)
    assert at == len(wal), "the killed WAL holds a partial frame of its own"
    return ends


DENSE_COMMITS = 2  # the last commits cut at every byte


def cut_points(ends: list[int], wal_size: int, fast: bool) -> list[int]:
    """Every byte over the last DENSE_COMMITS commits; every byte of the header; every 37th byte between."""
    dense_from = ends[-DENSE_COMMITS - 1]  # the end of the commit before them
    dense = range(dense_from, wal_size + 1, 1 if fast else 11)
    sample = range(WAL_HEADER + 1, dense_from, 37 if fast else 211)
    return sorted({*range(WAL_HEADER + 1), *sample, *dense, *ends})


def test_a_wal_cut_at_every_byte_of_its_last_commits_opens_with_exactly_the_whole_commits(
    killed_queue: Path, scratch: Scratch, caplog: pytest.LogCaptureFixture,
) -> None:
    db_bytes = (killed_queue / QUEUE_FILE).read_bytes()
    wal = (killed_queue / (QUEUE_FILE + "-wal")).read_bytes()
    shm = killed_queue / (QUEUE_FILE + "-shm")
    ends = commit_ends(wal)
    record_ends = ends[-RECORDS:]  # one group commit per record, after the commits that made the tables
    assert len(ends) > RECORDS
    cuts = cut_points(ends, len(wal), scratch.fast)
    work = scratch.path / "queue"
    caplog.set_level(logging.ERROR, logger="tagwriter.diskqueue")
    opened = torn = lost_most = 0
    for k, cut in enumerate(cuts):
        fresh(work)
        (work / QUEUE_FILE).write_bytes(db_bytes)
        (work / (QUEUE_FILE + "-wal")).write_bytes(wal[:cut])
        if shm.exists():  # as the kill left it: stale, and SQLite rebuilds it
            shutil.copyfile(shm, work / shm.name)
        caplog.clear()
        q = DiskQueue(work)
        opened += 1
        kept = sum(1 for end in record_ends if end <= cut)  # the records whose commit frame is whole
        got = drain_all(q)
        assert [row for _, row in got] == values(PER_RECORD * kept), f"cut at byte {cut}"
        assert [pos for pos, _ in got] == list(range(PER_RECORD * kept))
        assert q.resume_point("src") == (str(kept - 1) if kept else None), f"cut at byte {cut}"
        whole = cut in (0, WAL_HEADER) or cut in ends
        assert q.torn_tails == (0 if whole else 1), f"cut at byte {cut}"
        if not whole:
            torn += 1
            tail_at = max([e for e in (WAL_HEADER, *ends) if e <= cut]) if cut >= WAL_HEADER else 0
            assert f"at byte offset {tail_at} " in caplog.text, (cut, caplog.text)
        lost_most = max(lost_most, RECORDS - kept)
        if k % 97 == 0:
            assert a_new_value_goes_through(q), f"cut at byte {cut}"
        q.shutdown(5.0)
    dense = len(wal) - ends[-DENSE_COMMITS - 1]
    print(f"\nWAL of {len(wal)} bytes, {len(ends)} commits ({RECORDS} of records): {len(cuts)} cuts "
          f"({dense} bytes over the last {DENSE_COMMITS} record commits, step {1 if scratch.fast else 11}), "
          f"{opened} opened, "
          f"{torn} with a torn tail counted; at most {lost_most} records lost (the cut ones), none acknowledged "
          f"and kept was lost")
    assert opened == len(cuts) and torn > 0


# -- (b) the main file cut short ---------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_queue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A queue of 40 records of 50 values, shut down cleanly: everything is in the main file, no WAL."""
    folder = tmp_path_factory.mktemp("checkpointed") / "queue"
    q = DiskQueue(folder, fsync_interval=0.0)
    q.start()
    for k in range(40):
        result = q.put_many(values(50, 50 * k))
        assert q.settlement.wait(result.end, 10)
    q.shutdown(5.0)
    assert not (folder / (QUEUE_FILE + "-wal")).exists()
    return folder


def test_a_main_file_cut_short_anywhere_opens_and_what_it_cannot_give_is_moved_aside_or_counted(
    checkpointed_queue: Path, scratch: Scratch, caplog: pytest.LogCaptureFixture,
) -> None:
    whole = (checkpointed_queue / QUEUE_FILE).read_bytes()
    with contextlib.closing(sqlite3.connect(checkpointed_queue / QUEUE_FILE)) as db:
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
    original = values(2000)
    cuts = sorted({c for p in range(0, len(whole) + 1, page)
                   for c in (p - 1, p, p + 1, p + 100, p + page // 2, p + page - 100) if 0 <= c <= len(whole)})
    work = scratch.path / "queue"
    caplog.set_level(logging.ERROR, logger="tagwriter.diskqueue")
    outcomes = {"moved aside": 0, "records counted corrupt": 0, "all recovered": 0}
    for cut in cuts:
        fresh(work)
        (work / QUEUE_FILE).write_bytes(whole[:cut])
        caplog.clear()
        q = DiskQueue(work)
        got = drain_all(q)
        assert all(row == original[pos] for pos, row in got), f"a value read back changed (cut at {cut})"
        moved = sorted((work / CORRUPT_DIR).glob("queue-*.db")) if (work / CORRUPT_DIR).exists() else []
        if moved:
            outcomes["moved aside"] += 1
            assert moved[0].read_bytes() == whole[:cut]  # kept as it was, for a person to look at
            assert "moving it aside" in caplog.text and q.recovered == 0 and not got
        elif len(got) < len(original):
            outcomes["records counted corrupt"] += 1
            assert len(got) + q.corrupt == len(original), f"lost without a count (cut at {cut})"
            assert "cannot be trusted" in caplog.text
        else:
            outcomes["all recovered"] += 1
        assert a_new_value_goes_through(q), f"cut at {cut}"
        q.shutdown(5.0)
    print(f"\nmain file of {len(whole)} bytes ({page}-byte pages) cut at {len(cuts)} offsets: {outcomes}")
    assert outcomes["moved aside"] > 0


# -- (c) a corrupt record ----------------------------------------------------------


@pytest.fixture(scope="module")
def ten_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ten") / "queue"
    q = DiskQueue(folder, fsync_interval=0.0)
    q.start()
    for k in range(10):
        result = q.put_many(values(20, 20 * k))
        assert q.settlement.wait(result.end, 10)
    q.shutdown(5.0)
    return folder


MIDDLE = values(20, 100)  # record 5 of ten_records, at positions 100 .. 119


def corrupt_copy(source: Path, to: Path, byte: int) -> tuple[Path, bytes]:
    """A copy of the queue with byte `byte` of the middle record's blob changed; the changed blob."""
    fresh(to)
    raw = bytearray((source / QUEUE_FILE).read_bytes())
    blob = encode_chunk(MIDDLE)
    at = raw.find(blob)
    assert at > 0 and raw.find(blob, at + 1) == -1
    raw[at + byte] ^= 0x5A
    (to / QUEUE_FILE).write_bytes(raw)
    return to, bytes(raw[at:at + len(blob)])


def test_a_byte_changed_anywhere_in_a_middle_record_moves_that_record_aside_and_only_it(
    ten_records: Path, scratch: Scratch, caplog: pytest.LogCaptureFixture,
) -> None:
    size = len(encode_chunk(MIDDLE))
    others = [row for k in range(10) if k != 5 for row in values(20, 20 * k)]
    caplog.set_level(logging.ERROR, logger="tagwriter.diskqueue")
    for byte in range(0, size, 1 if scratch.fast else 7):
        work, bad = corrupt_copy(ten_records, scratch.path / "queue", byte)
        caplog.clear()
        q = DiskQueue(work)
        got = drain_all(q)
        assert [row for _, row in got] == others, f"byte {byte}"
        assert [pos for pos, _ in got] == [p for p in range(200) if not 100 <= p < 120]
        assert q.corrupt == 20 and q.stats().corrupt == 20 and q.stats().values == 0
        assert (work / CORRUPT_DIR / "record-100-20.bin").read_bytes() == bad
        assert "20 values at positions 100 .. 119 cannot be trusted (CRC mismatch)" in caplog.text
        q.shutdown(5.0)
    again = DiskQueue(work)  # the last copy: released with the rest, the record is gone from the queue
    assert again.recovered == 0 and again.corrupt == 0
    again.shutdown(5.0)


def test_a_corrupt_record_through_a_pipeline_is_a_counted_drop_and_the_rest_is_written(
    ten_records: Path, tmp_path: Path,
) -> None:
    work, _ = corrupt_copy(ten_records, tmp_path / "queue", 40)
    config = Config(
        buffer=BufferConfig(durability="disk", directory=str(work)),
        writer=WriterConfig(batch_size=50, flush_interval=0.05),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(directory=str(tmp_path / "backup"), quarantine_directory=str(tmp_path / "q"),
                            auto_replay=False),
    )
    validate(config)
    sink = MemorySink()
    with Pipeline(config, sink=sink) as p:
        assert p.flush(20)
    s = p.snapshot()
    assert (s.queue_recovered, s.submitted, s.written, s.queue_corrupt) == (200, 200, 180, 20)
    assert s.dropped_by_reason == {"queue_corrupt": 20}
    assert s.submitted == s.written + s.duplicates + s.spooled + s.quarantined + s.dropped + s.pending
    assert sorted(int(r.value or 0) for r in sink.rows.values()) == [p for p in range(200) if not 100 <= p < 120]


def test_a_record_the_queue_cannot_take_while_the_writer_holds_values_waits_for_the_ring_to_empty(
    ten_records: Path, tmp_path: Path,
) -> None:
    """Positions are passed over only with an empty read-ahead: values before the bad record come first."""
    work, _ = corrupt_copy(ten_records, tmp_path / "queue", 3)
    q = DiskQueue(work, capacity=30)
    got: list[tuple[int, TagValue]] = []
    while True:
        b = q.drain(7)
        if not b.rows:
            break
        got.extend(zip(range(b.start, b.end), b.rows, strict=True))
        q.release(b.start, b.end)
    assert [pos for pos, _ in got] == [p for p in range(200) if not 100 <= p < 120]
    assert [row for _, row in got] == [row for k in range(10) if k != 5 for row in values(20, 20 * k)]
    assert q.corrupt == 20
    q.shutdown(5.0)


# -- (d) garbage -------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    pytest.param(random.Random(1).randbytes(10_000), id="random bytes"),
    pytest.param(b"SQLite format 3\0" + random.Random(2).randbytes(5000), id="a header, then garbage"),
    pytest.param(b"SQLite format 3\0", id="a header alone"),
])
def test_garbage_as_the_queue_file_is_moved_aside_and_a_fresh_queue_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes,
) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    (folder / QUEUE_FILE).write_bytes(garbage)
    caplog.set_level(logging.ERROR, logger="tagwriter.diskqueue")
    q = DiskQueue(folder)
    moved = sorted((folder / CORRUPT_DIR).glob("queue-*.db"))
    assert [m.read_bytes() for m in moved] == [garbage]
    assert "moving it aside" in caplog.text and "a new queue is started" in caplog.text
    assert q.recovered == 0
    assert a_new_value_goes_through(q)
    q.put_many(values(3, 5))
    assert q.settlement.wait(q.tail, 10)
    q.shutdown(5.0)
    again = DiskQueue(folder)
    assert again.recovered == 3 and [row for _, row in drain_all(again)] == values(3, 5)
    again.shutdown(5.0)


def test_garbage_as_the_wal_is_a_torn_tail_and_the_main_file_is_recovered(
    ten_records: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = fresh(tmp_path / "queue")
    shutil.copyfile(ten_records / QUEUE_FILE, folder / QUEUE_FILE)
    (folder / (QUEUE_FILE + "-wal")).write_bytes(os.urandom(3000))
    caplog.set_level(logging.ERROR, logger="tagwriter.diskqueue")
    q = DiskQueue(folder)
    assert q.torn_tails == 1 and "a torn tail of 3000 bytes at byte offset 0 " in caplog.text
    assert [row for _, row in drain_all(q)] == values(200)
    q.shutdown(5.0)


def test_queues_moved_aside_within_one_second_do_not_overwrite_each_other(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    clock = ManualClock()  # its time does not move: both in the same second
    for garbage in (b"first" * 100, b"second" * 100):
        (folder / QUEUE_FILE).write_bytes(garbage)
        DiskQueue(folder, clock=clock).shutdown(5.0)
    kept = sorted(p.read_bytes() for p in (folder / CORRUPT_DIR).glob("queue-*.db"))
    assert kept == [b"first" * 100, b"second" * 100]

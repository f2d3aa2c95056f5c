"""`DiskQueue` (buffer.durability = "disk"): group commit, read-back, release, recovery, capacity, a full disk.

Everything runs on real SQLite files in `tmp_path`; the full disk is a real
tmpfs mounted for the test (tests run as root; skipped without mount rights).
A "kill -9" is the state a killed process leaves: the queue's files copied
while it is open, after its commits (`kill_copy`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from waits import wait_until

from tagwriter import diskqueue
from tagwriter.buffer import Batch
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.diskqueue import QUEUE_FILE, DiskQueue
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.queueformat import ChunkError, decode_chunk, encode_chunk
from tagwriter.settle import Receipt
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink

TS0 = 1_700_000_000_000_000
MakeQueue = Callable[..., DiskQueue]


def values(n: int, start: int = 0) -> list[TagValue]:
    """`n` distinct values; the value of each is its position, so order and identity are easy to check."""
    return [TagValue(f"line1.tag{i % 100:03d}", TS0 + i, float(i), 192) for i in range(start, start + n)]


def numbers(rows: list[TagValue]) -> list[int]:
    return [int(r.value) for r in rows if r.value is not None]


@pytest.fixture
def open_queue(tmp_path: Path) -> Iterator[MakeQueue]:
    """Open (and start) a DiskQueue, by default in tmp_path/queue; every one is shut down after the test."""
    opened: list[DiskQueue] = []

    def make(directory: Path | None = None, *, start: bool = True, **kwargs: Any) -> DiskQueue:
        q = DiskQueue(directory or tmp_path / "queue", **kwargs)
        opened.append(q)
        if start:
            q.start()
        return q

    yield make
    for q in opened:
        q.shutdown(5.0)


def put_durably(q: DiskQueue, rows: list[TagValue], **kwargs: Any) -> Receipt:
    """put_many and wait until the rows are fsynced."""
    result = q.put_many(rows, **kwargs)
    receipt = Receipt(result.accepted == len(rows), q.settlement, result.end)
    assert receipt.wait(10), "the group commit did not come"
    return receipt


def drain_all(q: DiskQueue, batch: int = 10**6, *, release: bool = True) -> list[Batch]:
    """Take every value the writer can take now, in batches of at most `batch`; release each (as the writer does)."""
    batches = []
    while True:
        b = q.drain(batch)
        if not b.rows:
            return batches
        batches.append(b)
        if release:
            q.release(b.start, b.end)


def rows_of(batches: list[Batch]) -> list[TagValue]:
    return [row for b in batches for row in b.rows]


def on_disk(directory: Path) -> tuple[int, int | None, int | None]:
    """(records, first seq, release watermark) as another connection reads the queue file now."""
    with contextlib.closing(sqlite3.connect(directory / QUEUE_FILE)) as db:
        count, first = db.execute("SELECT count(*), min(seq) FROM chunks").fetchone()
        row = db.execute("SELECT value FROM meta WHERE key = 'released'").fetchone()
    return count, first, row[0] if row else None


def kill_copy(directory: Path, to: Path) -> Path:
    """The queue's files as a kill -9 leaves them: copied while the queue is open (nothing closed, no checkpoint)."""
    to.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        src = directory / (QUEUE_FILE + suffix)
        if src.exists():
            shutil.copyfile(src, to / src.name)
    return to


def count_commits(monkeypatch: pytest.MonkeyPatch, q: DiskQueue) -> list[float]:
    """Record each call the commit thread makes to `_commit` (to see that it does not spin)."""
    calls: list[float] = []
    real = q._commit

    def counted() -> bool:
        calls.append(time.monotonic())
        return real()

    monkeypatch.setattr(q, "_commit", counted)
    return calls


# -- put, commit, settle -----------------------------------------------------------


def test_a_value_settles_only_once_its_group_commit_is_on_disk(tmp_path: Path, open_queue: MakeQueue) -> None:
    q = open_queue(start=False)
    result = q.put_many(values(10))
    receipt = Receipt(True, q.settlement, result.end)
    assert (result.accepted, result.end) == (10, 10)
    assert not receipt.settled and receipt.wait(0.05) is False
    assert q.stats().pending == 10 and q.stats().acknowledged == 0
    assert on_disk(tmp_path / "queue")[0] == 0
    seen_at_settle: list[int] = []
    receipt.on_settled(lambda: seen_at_settle.append(on_disk(tmp_path / "queue")[0]))
    q.start()
    assert receipt.wait(10)
    wait_until(lambda: seen_at_settle, "the settle callback (it runs just after the waiters wake)")
    assert seen_at_settle == [1]  # when it settled, another connection already read its record
    s = q.stats()
    assert (s.pending, s.acknowledged, s.commits, s.values) == (0, 10, 1, 10)
    assert s.fsync_p50 is not None and s.fsync_p99 is not None and s.fsync_p99 >= s.fsync_p50 > 0.0


def test_the_submits_of_one_interval_share_one_group_commit(open_queue: MakeQueue) -> None:
    q = open_queue(start=False)
    for k in range(50):
        q.put_many(values(10, 10 * k))
    q.start()
    assert q.settlement.wait(500, 10)
    assert q.stats().commits == 1 and q.stats().acknowledged == 500


def test_while_the_thread_runs_the_submits_during_its_pause_join_the_next_commit(open_queue: MakeQueue) -> None:
    q = open_queue(fsync_interval=2.0)
    put_durably(q, values(10))  # the first wakes the thread at once; then it pauses 2 s
    assert q.stats().commits == 1
    for k in range(1, 50):  # microseconds, well within the pause
        q.put_many(values(10, 10 * k))
    assert q.settlement.wait(500, 10)
    assert q.stats().commits == 2


def test_fsync_interval_0_commits_each_submit_on_its_own(open_queue: MakeQueue) -> None:
    q = open_queue(fsync_interval=0.0)
    for k in range(20):
        put_durably(q, values(5, 5 * k))
        assert q.stats().commits == k + 1
    assert numbers(rows_of(drain_all(q))) == list(range(100))


def test_with_fsync_interval_0_a_pipeline_submit_returns_settled(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, fsync_interval=0.0)
    with Pipeline(config, sink=MemorySink()) as p:
        for k in range(10):
            receipt = p.submit(values(10, 10 * k))
            assert receipt and receipt.settled
        assert p.snapshot().queue_commits == 10


def test_the_writer_drains_in_submit_order_with_contiguous_positions(open_queue: MakeQueue) -> None:
    q = open_queue()
    sizes = [1, 7, 30, 2, 50, 13, 5, 90, 1, 1]
    at = 0
    for n in sizes:
        put_durably(q, values(n, at))
        at += n
    batches = []
    for max_n in (3, 25, 4, 100, 1000):
        batches.append(q.drain(max_n))
    assert [len(b) for b in batches] == [3, 25, 4, 100, 68]
    assert [b.start for b in batches] == [0, 3, 28, 32, 132]
    assert numbers(rows_of(batches)) == list(range(200))
    for b in batches:
        assert sum(count for _, count in b.marks) == len(b)


def test_values_beyond_the_read_ahead_stay_on_disk_and_come_back_in_order(open_queue: MakeQueue) -> None:
    q = open_queue(capacity=100)
    t0 = time.monotonic()
    for k in range(20):
        put_durably(q, values(50, 50 * k))
    assert len(q) == 1000 and q.capacity == 100
    assert q.batch_due(10**6, 1e9)  # not by the ring's own rule: values wait on disk only
    batches = drain_all(q)
    now = time.monotonic()
    assert all(len(b) <= 100 for b in batches)  # the ring never held more than its read-ahead
    assert numbers(rows_of(batches)) == list(range(1000))
    assert [b.start for b in batches] == [sum(len(x) for x in batches[:i]) for i in range(len(batches))]
    for b in batches:  # latency marks: submit times, read back from the records' wall times
        assert sum(count for _, count in b.marks) == len(b)
        assert all(t0 - 1.0 <= t <= now for t, _ in b.marks), b.marks


def test_reading_back_fetches_each_record_once_not_the_ones_the_ring_has_no_room_for(
    open_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: each refill fetched up to 64 records past the ring's room and decoded one, so a ring behind
    a deep queue read the same records again and again (at max rate: 5.5 ms a refill, a third of the
    writer's time). Now a refill fetches only what fits: every record once."""
    q = open_queue(capacity=100)
    for k in range(30):
        put_durably(q, values(50, 50 * k))  # 30 records on disk, one per commit
    fetched: list[int] = []
    fetch = q._fetch

    def counting(wanted: list[Any]) -> dict[int, tuple[object, ...]]:
        got = fetch(wanted)
        fetched.extend(got)
        return got

    monkeypatch.setattr(q, "_fetch", counting)
    batches = drain_all(q, 50)
    assert numbers(rows_of(batches)) == list(range(1500))
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) <= 30, fetched


def test_a_put_before_the_thread_starts_and_values_put_while_the_writer_reads_back_keep_their_order(
    open_queue: MakeQueue,
) -> None:
    q = open_queue(capacity=40)
    for k in range(10):
        put_durably(q, values(20, 20 * k))
    taken: list[TagValue] = []
    for k in range(10, 20):  # the ring is behind the disk: new commits go to disk and are read back after
        b = q.drain(30)
        taken += b.rows
        q.release(b.start, b.end)
        put_durably(q, values(20, 20 * k))
    taken += rows_of(drain_all(q))
    assert numbers(taken) == list(range(400))


def test_none_nan_extremes_and_any_tag_text_come_back_exactly_after_a_reopen(open_queue: MakeQueue) -> None:
    rows = [
        TagValue("line1.none", TS0, None, 0),
        TagValue("line1.nan", TS0 + 1, float("nan"), 192),  # a NaN submitted stays a NaN, not a None
        TagValue("línea2.température°", TS0 + 2, -0.0, -(2**63)),
        TagValue("ラインα.β", 2**62, 1.7976931348623157e308, 2**63 - 1),
    ]
    q = open_queue()
    put_durably(q, rows)
    q.shutdown(5.0)
    got = rows_of(drain_all(open_queue(start=False)))
    assert [(r.tag, r.ts_us, r.quality) for r in got] == [(r.tag, r.ts_us, r.quality) for r in rows]
    assert got[0].value is None and got[1].value is not None and math.isnan(got[1].value)
    assert str(got[2].value) == "-0.0" and got[3].value == rows[3].value


def test_a_record_whose_layout_does_not_add_up_is_refused() -> None:
    data = encode_chunk(values(3))
    for broken, n in ((data[:5], 3), (data[:-1], 3), (data, 4), (data + b"x", 3)):
        with pytest.raises(ChunkError):
            decode_chunk(broken, n)
    assert decode_chunk(data, 3) == values(3)


# -- release, recovery -------------------------------------------------------------


def test_a_persisted_release_survives_a_kill_and_a_partial_record_comes_back_from_its_middle(
    tmp_path: Path, open_queue: MakeQueue,
) -> None:
    directory = tmp_path / "queue"
    q = open_queue()
    for k in range(10):
        put_durably(q, values(10, 10 * k))
    b = q.drain(35)
    assert (b.start, len(b)) == (0, 35)
    q.release(b.start, b.end)  # 35 falls inside the record of 30 .. 39
    wait_until(lambda: on_disk(directory) == (7, 30, 35), "the DELETE and the watermark to be committed")
    killed = kill_copy(directory, tmp_path / "killed")
    again = open_queue(killed, start=False)
    assert again.recovered == 65 and len(again) == 65
    assert numbers(rows_of(drain_all(again))) == list(range(35, 100))
    q.shutdown(5.0)
    reopened = open_queue(directory)
    assert reopened.recovered == 65 and reopened.stats().values == 65
    batches = drain_all(reopened)
    assert batches[0].start == 35 and numbers(rows_of(batches)) == list(range(35, 100))


def test_a_release_not_yet_persisted_comes_back_as_a_duplicate_never_as_a_loss(
    tmp_path: Path, open_queue: MakeQueue,
) -> None:
    q = open_queue(fsync_interval=5.0)
    put_durably(q, values(10))
    b = q.drain(10)
    q.release(b.start, b.end)  # the commit thread pauses 5 s: not persisted yet
    again = open_queue(kill_copy(tmp_path / "queue", tmp_path / "killed"), start=False)
    assert again.recovered == 10
    assert numbers(rows_of(drain_all(again))) == list(range(10))


def test_a_clean_shutdown_then_reopen_resends_nothing(tmp_path: Path, open_queue: MakeQueue) -> None:
    """telegraf#16981: the last value came back after a restart."""
    q = open_queue(fsync_interval=5.0)  # the thread pauses: only shutdown's own commit persists the release
    for k in range(10):
        q.put_many(values(10, 10 * k))
    assert q.settlement.wait(100, 10)
    assert numbers(rows_of(drain_all(q))) == list(range(100))
    assert q.shutdown(5.0) == []
    assert on_disk(tmp_path / "queue") == (0, None, 100)
    again = open_queue()
    assert again.recovered == 0 and len(again) == 0 and again.stats().values == 0
    assert drain_all(again) == []
    put_durably(again, values(1, 100))  # and positions go on where they were
    b = again.drain(10)
    assert (b.start, numbers(b.rows)) == (100, [100])


def test_a_clean_pipeline_stop_then_restart_writes_nothing_twice(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path)
    with Pipeline(config, sink=SqliteSink(tmp_path / "tags.db")) as p:
        for k in range(20):
            p.submit(values(50, 50 * k))
    first = p.snapshot()
    assert (first.submitted, first.written, first.pending, first.queue_values) == (1000, 1000, 0, 0)
    with Pipeline(config, sink=SqliteSink(tmp_path / "tags.db")) as p:
        pass
    second = p.snapshot()
    assert (second.queue_recovered, second.submitted, second.written, second.duplicates) == (0, 0, 0, 0)
    with contextlib.closing(sqlite3.connect(tmp_path / "tags.db")) as db:
        assert db.execute("SELECT count(*) FROM tag_values").fetchone()[0] == 1000


def test_the_first_value_after_the_queue_drained_empty_is_not_lost(tmp_path: Path, open_queue: MakeQueue) -> None:
    """telegraf#17240: the first value after an empty queue was lost."""
    q = open_queue()
    put_durably(q, values(10))
    drain_all(q)
    wait_until(lambda: q.stats().values == 0 and q.stats().bytes == 0, "the release to be committed")
    wait_until(lambda: on_disk(tmp_path / "queue")[0] == 0, "the records to be deleted")
    put_durably(q, values(1, 10))
    b = q.drain(10)
    assert (b.start, numbers(b.rows)) == (10, [10])  # read by the writer
    put_durably(q, values(1, 11))
    q.shutdown(5.0)  # and, not taken, it is recovered by the next run
    again = open_queue()
    assert again.recovered == 2  # 10 was never released, 11 never taken
    assert numbers(rows_of(drain_all(again))) == [10, 11]


def test_once_everything_is_released_the_file_gives_its_space_back(tmp_path: Path, open_queue: MakeQueue) -> None:
    directory = tmp_path / "queue"
    q = open_queue(capacity=10**6)
    for k in range(40):  # ~3.7 MB of records
        put_durably(q, values(2500, 2500 * k))

    def pages() -> int:
        with contextlib.closing(sqlite3.connect(directory / QUEUE_FILE)) as db:
            return int(db.execute("PRAGMA page_count").fetchone()[0])

    full = pages()
    assert full > 800
    drain_all(q)
    wait_until(lambda: pages() < full // 10, "the incremental vacuum to give the pages back")
    put_durably(q, values(1, 100_000))  # and the emptied queue takes the next value
    q.shutdown(5.0)
    assert (directory / QUEUE_FILE).stat().st_size < full * 4096 // 10
    again = open_queue()
    assert again.recovered == 1 and numbers(rows_of(drain_all(again))) == [100_000]


def test_cursors_are_durable_with_their_rows_and_come_back_after_a_reopen(
    tmp_path: Path, open_queue: MakeQueue,
) -> None:
    q = open_queue(start=False)
    q.put_many(values(10), cursor=("file:a", "10"))
    q.put_many([], cursor=("file:b", "header"))  # a cursor alone: advances the position only
    q.put_many(values(10, 10), cursor=("file:a", "20"))
    assert q.resume_point("file:a") is None  # not durable yet
    q.start()
    assert q.settlement.wait(20, 10)
    assert (q.resume_point("file:a"), q.resume_point("file:b"), q.resume_point("other")) == ("20", "header", None)
    killed = open_queue(kill_copy(tmp_path / "queue", tmp_path / "killed"), start=False)
    assert (killed.resume_point("file:a"), killed.resume_point("file:b")) == ("20", "header")
    q.shutdown(5.0)
    again = open_queue()
    assert (again.resume_point("file:a"), again.resume_point("file:b"), again.resume_point("other")) == (
        "20", "header", None)
    assert again.recovered == 20


def test_the_folder_is_fsynced_once_the_queue_file_is_made(
    tmp_path: Path, open_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vector#25779: a file made in a folder not fsynced after is gone after a power cut."""
    directory = tmp_path / "queue"
    synced: list[tuple[Path, bool]] = []
    real = diskqueue.sync_directory

    def recording(folder: Path) -> None:
        synced.append((folder, (directory / QUEUE_FILE).exists()))
        real(folder)

    monkeypatch.setattr(diskqueue, "sync_directory", recording)
    open_queue(start=False).shutdown(5.0)
    assert synced == [(directory, True)]
    synced.clear()
    open_queue(start=False).shutdown(5.0)  # the file is there: nothing to make durable
    assert synced == []
    (directory / QUEUE_FILE).write_bytes(b"not a database at all" * 100)
    q = open_queue(start=False)  # moved aside, and a new file made
    assert synced[-1] == (directory, True), synced
    assert (directory / "corrupt", False) in synced or (directory / "corrupt", True) in synced
    put_durably_after_start(q)


def put_durably_after_start(q: DiskQueue) -> None:
    q.start()
    put_durably(q, values(3))
    assert numbers(rows_of(drain_all(q))) == [0, 1, 2]


def test_after_close_the_commit_thread_persists_releases_without_spinning(
    open_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = open_queue(start=False, fsync_interval=0.01)
    calls = count_commits(monkeypatch, q)
    q.start()
    put_durably(q, values(10))
    q.close()  # intake ends; stop() then waits seconds for the writer before shutdown
    assert q.put_many(values(1, 10)).refused
    b = q.drain(10)
    q.release(b.start, b.end)
    wait_until(lambda: q.stats().values == 0, "the release to be persisted after close")
    before = len(calls)
    time.sleep(0.5)  # a measured window, not a synchronisation: an idle thread wakes every IDLE_PERSIST (0.5 s)
    assert len(calls) - before <= 15, f"{len(calls) - before} commits in 0.5 s: the thread spins"


def test_shutdown_is_idempotent_and_hands_back_nothing_once_all_is_durable(open_queue: MakeQueue) -> None:
    q = open_queue()
    put_durably(q, values(5))
    assert q.shutdown(5.0) == []
    assert q.shutdown(5.0) == []
    assert q.stats().disk_full is False


# -- capacity ----------------------------------------------------------------------

CAP = 4000  # bytes: ~100 values of ~37 bytes on disk


def fill_to_cap(q: DiskQueue, per_put: int = 10) -> int:
    """Put values (each put made durable) until the queue refuses room for one more put; returns how many."""
    at = 0
    while q.wait_for_room(per_put, 0.0):
        put_durably(q, values(per_put, at))
        at += per_put
    return at


def test_spill_at_the_byte_cap_hands_the_new_values_back(open_queue: MakeQueue) -> None:
    q = open_queue(max_bytes=CAP, policy="spill")
    queued = fill_to_cap(q)
    assert 50 <= queued <= 150
    extra = values(10, queued)
    result = q.put_many(extra)
    assert result.accepted == 0 and result.evicted == extra and result.dropped == 0
    assert q.overflowed == 10 and q.stats().bytes <= CAP + 400
    assert numbers(rows_of(drain_all(q))) == list(range(queued))  # the queued values are untouched
    assert q.wait_for_room(10, 10.0)  # released and deleted: room again
    assert put_durably(q, values(10, 1000))


def test_drop_oldest_at_the_byte_cap_drops_the_oldest_not_yet_taken(open_queue: MakeQueue) -> None:
    q = open_queue(max_bytes=CAP, policy="drop-oldest")
    queued = fill_to_cap(q)
    taken = q.drain(20)  # the writer holds these: they are not dropped
    result = q.put_many(values(10, queued))
    assert result.accepted == 10 and result.dropped == 10 and result.popped == (20, 30)
    q.release(*result.popped)  # as the pipeline does once it counted them
    assert q.overflowed == 10
    q.release(taken.start, taken.end)
    assert q.settlement.wait(queued + 10, 10)
    rest = rows_of(drain_all(q))
    assert numbers(taken.rows) + numbers(rest) == [*range(20), *range(30, queued + 10)]


def test_drop_oldest_holds_the_cap_while_the_writer_holds_an_older_batch_and_a_restart_skips_the_gap(
    tmp_path: Path, open_queue: MakeQueue,
) -> None:
    """The dropped records are deleted ahead of the release watermark (it cannot pass the held batch)."""
    q = open_queue(max_bytes=CAP, policy="drop-oldest", fsync_interval=0.005)
    queued = fill_to_cap(q)
    held = q.drain(10)  # a write that hangs: positions 0 .. 9 stay unreleased
    for k in range(50):  # 500 more values through a cap of ~100
        result = q.put_many(values(10, queued + 10 * k))
        q.release(*result.popped)
        assert Receipt(True, q.settlement, result.end).wait(10)
    wait_until(lambda: q.stats().bytes <= CAP + 400, "the dropped records to be deleted")
    s = q.stats()
    kept = s.values
    assert q.overflowed == 500 and kept == queued + 500 - 500
    killed = open_queue(kill_copy(tmp_path / "queue", tmp_path / "killed"), start=False)
    assert killed.recovered == kept and killed.stats().bytes <= CAP + 400
    batches = drain_all(killed)
    assert killed.corrupt == 0  # the gap is what was released, not a loss
    got = numbers(rows_of(batches))
    assert got[:10] == numbers(held.rows) and len(got) == kept
    assert got[10:] == list(range(queued + 500 - (kept - 10), queued + 500))  # the newest, in order


def test_block_at_the_byte_cap_times_out_counted_then_resumes_once_releases_free_room(
    open_queue: MakeQueue,
) -> None:
    q = open_queue(max_bytes=CAP, policy="block", block_timeout=0.2)
    queued = fill_to_cap(q)
    result = q.put_many(values(10, queued))
    assert (result.accepted, result.dropped) == (0, 10)  # timed out: counted as dropped by the caller
    assert q.blocked_puts == 1 and q.overflowed == 10 and q.waiting == 0
    q.block_timeout = 30.0
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(q.put_many(values(10, queued + 10))))
    t.start()
    wait_until(lambda: q.waiting == 10, "the put to wait for room")
    drain_all(q)  # the writer settles its batches: their release makes room
    t.join(10)
    assert outcome and outcome[0].accepted == 10 and outcome[0].dropped == 0
    assert q.waiting == 0 and q.blocked_puts == 2
    assert q.settlement.wait(queued + 10, 10)
    assert numbers(rows_of(drain_all(q))) == list(range(queued + 10, queued + 20))


def test_close_wakes_a_put_blocked_at_the_cap_and_refuses_its_rows(open_queue: MakeQueue) -> None:
    q = open_queue(max_bytes=CAP, policy="block", block_timeout=30.0)
    queued = fill_to_cap(q)
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(q.put_many(values(10, queued))))
    t.start()
    wait_until(lambda: q.waiting == 10, "the put to wait for room")
    q.close()
    t.join(10)
    assert outcome and outcome[0].accepted == 0 and len(outcome[0].refused) == 10


def pipeline_config(tmp_path: Path, **buffer: Any) -> Config:
    buffer.setdefault("directory", str(tmp_path / "queue"))
    config = Config(
        buffer=BufferConfig(durability="disk", **buffer),
        writer=WriterConfig(batch_size=100, flush_interval=0.05, retry_delays=[0.01], probe_interval=0.05,
                            probe_max_interval=0.1, shutdown_timeout=10.0),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(directory=str(tmp_path / "backup"), quarantine_directory=str(tmp_path / "quarantine"),
                            auto_replay=False),
    )
    validate(config)
    return config


def assert_identity(s: MetricsSnapshot) -> None:
    assert s.submitted == s.written + s.duplicates + s.spooled + s.quarantined + s.dropped + s.pending, s


@pytest.mark.parametrize("policy", ["spill", "drop-oldest", "block"])
def test_a_pipeline_at_the_queue_cap_follows_its_policy_and_loses_nothing_uncounted(
    tmp_path: Path, policy: str,
) -> None:
    config = pipeline_config(tmp_path, max_disk_bytes=20_000, overflow_policy=policy, block_timeout=0.1,
                             capacity=10_000)
    sink = MemorySink()
    sink.block()  # the writer holds its first batch: the queue fills behind it
    with Pipeline(config, sink=sink) as p:
        for k in range(30):
            receipt = p.submit(values(100, 100 * k))
            receipt.wait(10)
            if k == 0:
                wait_until(lambda: sink.blocked.is_set(), "the writer to hold its first batch")
        mid = p.snapshot()
        assert_identity(mid)
        if policy == "spill":
            assert mid.spooled >= 1000 and mid.dropped == 0
        else:
            reason = "overflow" if policy == "drop-oldest" else "block_timeout"
            assert mid.dropped_by_reason.get(reason, 0) >= 1000 and mid.spooled == 0
        assert mid.queue_bytes <= 20_000 + 100 * 40  # one put may pass the cap by its own size at most
        sink.release()
        assert p.flush(20)
    s = p.snapshot()
    assert_identity(s)
    assert s.submitted == 3000 and s.pending == 0 and s.queue_values == 0
    assert s.written + s.spooled + s.dropped == 3000
    assert len(sink.rows) == s.written


# -- a full disk -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB file system (tmpfs): writes past it fail with ENOSPC. Reuses test_disk_faults' way of mounting."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(where: Path) -> Path:
    """Take every free byte of the file system at `where` with one file; returns it (delete it to free space)."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: close() has nothing left to fail on
        block = b"\0" * 4096
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("policy", ["spill", "drop-oldest", "block"])
def test_a_full_disk_keeps_pending_values_applies_the_policy_and_goes_on_once_space_frees(
    small_disk: Path, open_queue: MakeQueue, caplog: pytest.LogCaptureFixture, policy: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="tagwriter.diskqueue")
    q = open_queue(small_disk / "queue", policy=policy, block_timeout=0.1)
    put_durably(q, values(100))
    filler = fill_disk(small_disk)
    stuck = q.put_many(values(3000, 100))  # ~110 kB: the WAL must grow, and cannot
    receipt = Receipt(True, q.settlement, stuck.end)
    wait_until(lambda: q.disk_full, "the commit to fail")
    # (the flag is set just before the alert is logged, on the commit thread)
    wait_until(lambda: "QUEUE: the disk is full" in caplog.text, "the alert to be logged")
    assert not receipt.settled and q.stats().pending == 3000 and q.stats().disk_full
    more = q.put_many(values(10, 3100))  # the policy decides while the disk is full
    if policy == "spill":
        assert more.accepted == 0 and numbers(more.evicted) == list(range(3100, 3110))
    elif policy == "drop-oldest":  # the oldest the writer has not taken: the 100 durable ones, 10 of them
        assert more.accepted == 10 and more.dropped == 10 and more.popped == (0, 10)
        q.release(*more.popped)
    else:
        assert (more.accepted, more.dropped) == (0, 10)
    filler.unlink()  # space freed: nothing to do but wait
    assert receipt.wait(20), "commits did not resume by themselves"
    wait_until(lambda: not q.disk_full, "the alert to clear")
    assert "QUEUE: writing again" in caplog.text
    expected = list(range(3100)) + (list(range(3100, 3110)) if policy == "drop-oldest" else [])
    if policy == "drop-oldest":
        expected = expected[10:]
        assert q.settlement.wait(3110, 10)
    assert numbers(rows_of(drain_all(q))) == expected


def test_a_full_disk_with_fsync_always_is_retried_every_interval_not_in_a_loop(
    small_disk: Path, open_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = open_queue(small_disk / "queue", start=False, fsync_interval=0.0)
    calls = count_commits(monkeypatch, q)
    q.start()
    put_durably(q, values(10))
    filler = fill_disk(small_disk)
    stuck = q.put_many(values(3000, 10))
    wait_until(lambda: q.disk_full, "the commit to fail")
    before = len(calls)
    time.sleep(0.5)  # a measured window: one try every IDLE_RETRY (0.05 s), not thousands
    assert len(calls) - before <= 15, f"{len(calls) - before} tries in 0.5 s"
    filler.unlink()
    assert Receipt(True, q.settlement, stuck.end).wait(20)
    assert numbers(rows_of(drain_all(q))) == list(range(3010))


def test_a_full_disk_through_a_pipeline_spills_counted_and_writes_everything_once_space_frees(
    tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tagwriter.diskqueue")
    config = pipeline_config(tmp_path, directory=str(small_disk / "queue"), overflow_policy="spill")
    sink = MemorySink()
    with Pipeline(config, sink=sink) as p:
        p.submit(values(100)).wait(10)
        # Written and its release persisted first: else that small commit may be the one the full disk fails,
        # and the 3,000 below would find the alert already up and be spilled too.
        assert p.flush(10)
        wait_until(lambda: on_disk(small_disk / "queue")[0] == 0, "the first values' release on disk")
        filler = fill_disk(small_disk)
        held = p.submit(values(3000, 100))  # pending in memory: the commit fails
        wait_until(lambda: p.snapshot().queue_disk_full, "the disk-full alert")
        for k in range(10):  # while the disk is full: spilled to the CSV spool (another disk), counted
            p.submit(values(100, 3100 + 100 * k))
        s = p.snapshot()
        assert_identity(s)
        assert s.spooled == 1000 and s.dropped == 0 and s.queue_pending == 3000 and not held.settled
        wait_until(lambda: "QUEUE: the disk is full" in caplog.text, "the alert to be logged")
        filler.unlink()
        assert held.wait(20)
        assert p.flush(20)
    s = p.snapshot()
    assert_identity(s)
    assert (s.submitted, s.written, s.spooled, s.dropped, s.pending) == (4100, 3100, 1000, 0, 0)
    assert sorted(numbers(list(sink.rows.values()))) == list(range(3100))

"""Integration: `Pipeline` as a library user drives it, into a real SQLite file.

Faults come from `MemorySink` wrapped around the real `SqliteSink` (fail N
times, down, block until released); the table is read back with `sqlite3`
and the spool and quarantine files with `tagwriter.spool.read_spool`.
"""

from __future__ import annotations

import csv
import logging
import queue
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from waits import wait_until

from tagwriter.clock import SystemClock
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.errors import FatalError, InputError, PipelineStopped
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import PollingData, TagValue, format_ts, to_epoch_us
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.upstream import QueueConsumer
from tagwriter.spoolformat import SpoolLine, read_spool

BASE = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


# -- helpers -------------------------------------------------------------------


def make_config(tmp_path: Path, *, buffer: dict[str, Any] | None = None,
                writer: dict[str, Any] | None = None, backup: dict[str, Any] | None = None) -> Config:
    """A config for tmp_path: short delays so fault paths take milliseconds."""
    w = {"batch_size": 100, "flush_interval": 0.05, "retry_delays": [0.01, 0.01, 0.01],
         "probe_interval": 0.02, "probe_max_interval": 0.05, "shutdown_timeout": 5.0, **(writer or {})}
    b = {"directory": str(tmp_path / "backup"), "quarantine_directory": str(tmp_path / "backup" / "quarantine"),
         "auto_replay": False, **(backup or {})}
    config = Config(
        buffer=BufferConfig(**(buffer or {})),
        writer=WriterConfig(**w),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(**b),
    )
    validate(config)
    return config


class RecordingSink:
    """Passes writes to a real sink and records the rows in the order they were given."""

    kind = "recording"

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.seen: list[TagValue] = []

    def open(self) -> None:
        self.inner.open()

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        self.seen.extend(rows)
        return self.inner.write_batch(rows)

    def probe(self) -> None:
        self.inner.probe()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return f"recording ({self.inner.describe()})"


def faulty_sqlite(tmp_path: Path) -> tuple[MemorySink, RecordingSink]:
    rec = RecordingSink(SqliteSink(tmp_path / "tags.db"))
    return MemorySink(inner=rec), rec


def group(seq0: int, n: int, i: int = 0, **kw: Any) -> PollingData:
    """A polling group of `n` tags t{seq}, values float(seq); group `i` is 1 ms after group 0."""
    return PollingData(f"g{i}", BASE + timedelta(milliseconds=i),
                       {f"t{s:05d}": float(s) for s in range(seq0, seq0 + n)}, **kw)


def groups(count: int, size: int, start: int = 0) -> list[PollingData]:
    return [group(start + k * size, size, start // size + k) for k in range(count)]


def expand(data: Sequence[PollingData]) -> list[TagValue]:
    return [row for pd in data for row in pd.rows()]


def table_rows(db: Path) -> list[tuple[str, str, float | None, int]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tag_values'").fetchone():
            return []
        return conn.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY tag_name, ts").fetchall()


def as_table(rows: Sequence[TagValue]) -> list[tuple[str, str, float | None, int]]:
    return sorted((r.tag, format_ts(r.ts_us), r.value, r.quality) for r in rows)


def spooled(directory: Path, *, quarantine: bool = False) -> list[TagValue]:
    """Every row of the completed files in `directory`, in file then line order; fails on a bad line."""
    prefix = "quarantine" if quarantine else "tagwriter"
    out: list[TagValue] = []
    for path in sorted(directory.glob(f"{prefix}-*.csv")):
        for item in read_spool(path, quarantine=quarantine):
            assert isinstance(item, SpoolLine), f"bad spool line: {item}"
            out.append(item.row)
    return out


def exact(rows: Sequence[TagValue]) -> list[tuple[str, int, str, int]]:
    """Rows compared exactly: repr of the value tells NaN, -0.0 and every float bit pattern apart."""
    return [(r.tag, r.ts_us, repr(r.value), r.quality) for r in rows]


def assert_identity(snap: MetricsSnapshot, submitted: int | None = None) -> None:
    settled = snap.written + snap.duplicates + snap.spooled + snap.quarantined + snap.dropped
    assert snap.pending == 0, snap
    assert snap.submitted == settled, snap
    if submitted is not None:
        assert snap.submitted == submitted


@pytest.fixture
def released() -> Iterator[list[MemorySink]]:
    """Sinks appended here are released at teardown, so no writer thread stays blocked."""
    sinks: list[MemorySink] = []
    yield sinks
    for s in sinks:
        s.release()


# -- the happy path ------------------------------------------------------------


def test_n_values_submitted_are_n_rows(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data = groups(37, 27)  # 999 values: batches of 100 and a partial one
    with Pipeline(config) as p:
        assert all(p.submit(pd) for pd in data)
    assert p.stop() is True
    snap = p.snapshot()
    assert table_rows(tmp_path / "tags.db") == as_table(expand(data))
    assert snap.written == 999 and snap.duplicates == snap.spooled == snap.dropped == 0
    assert snap.batches_ok >= 10 and snap.batches_failed == 0
    assert snap.state == "stopped"
    assert_identity(snap, 999)
    assert not list((tmp_path / "backup").glob("*.csv"))


def test_flush_returns_true_once_written_and_resubmission_counts_duplicates(tmp_path: Path) -> None:
    config = make_config(tmp_path, writer={"flush_interval": 60.0})  # only a flush writes a partial batch
    data = groups(3, 10)
    with Pipeline(config) as p:
        for pd in data:
            p.submit(pd)
        assert p.flush(5.0) is True
        assert p.snapshot().written == 30  # before stop
        assert len(table_rows(tmp_path / "tags.db")) == 30
        p.submit(data[1])
        assert p.flush(5.0) is True
        snap = p.snapshot()
    assert snap.written == 30 and snap.duplicates == 10
    assert len(table_rows(tmp_path / "tags.db")) == 30
    assert_identity(p.snapshot(), 40)


# -- faults --------------------------------------------------------------------


def test_sink_failing_three_times_then_recovering_loses_nothing(tmp_path: Path) -> None:
    sink, rec = faulty_sqlite(tmp_path)
    sink.fail_times(3)
    config = make_config(tmp_path)
    data = groups(5, 100)
    with Pipeline(config, sink=sink) as p:
        for pd in data:
            p.submit(pd)
        assert p.flush(10.0) is True
        snap = p.snapshot()
    assert snap.retries == 3 and snap.batches_failed == 3 and snap.outages == 0
    assert snap.written == 500 and snap.duplicates == 0 and snap.spooled == 0
    assert table_rows(tmp_path / "tags.db") == as_table(expand(data))
    assert rec.seen == expand(data)  # the failed batch was retried first, then the rest in order
    assert_identity(p.snapshot(), 500)


SPECIAL = [float("nan"), float("inf"), float("-inf"), None, -0.0, 0.1 + 0.2, 5e-324, 1.7976931348623157e308,
           -1e-300, 123456789.12345679]


def test_sink_down_for_the_whole_run_spools_every_value_exactly(tmp_path: Path) -> None:
    sink, _ = faulty_sqlite(tmp_path)
    sink.go_down()
    config = make_config(tmp_path, writer={"batch_size": 7})
    stamps = [BASE, datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 3, 1, 12, 0, 0, 1),
              datetime(2026, 3, 1, 14, 0, 0, 999999, tzinfo=UTC) + timedelta(hours=-2)]
    data = [PollingData(f"g{i}", ts, {f"tag,\"{i}\" {k}": v for k, v in enumerate(SPECIAL)}, quality=i)
            for i, ts in enumerate(stamps)]
    with Pipeline(config, sink=sink) as p:
        for pd in data:
            assert p.submit(pd)
    assert p.stop() is True
    snap = p.snapshot()
    back = spooled(tmp_path / "backup")
    assert exact(back) == exact(expand(data))  # FIFO, every bit, every microsecond
    assert snap.spooled == len(back) == 40 and snap.written == 0
    assert snap.outages == 1
    assert table_rows(tmp_path / "tags.db") == []
    assert_identity(snap, 40)
    assert not list((tmp_path / "backup").glob("*.partial"))


def test_sink_that_blocks_forever_stop_is_bounded_and_spools(tmp_path: Path, released: list[MemorySink]) -> None:
    sink, _ = faulty_sqlite(tmp_path)
    released.append(sink)
    sink.block()
    data = groups(3, 100)
    p = Pipeline(make_config(tmp_path), sink=sink).start()
    for pd in data:
        p.submit(pd)
    assert sink.blocked.wait(5.0)  # the writer holds a batch inside the sink
    t0 = time.monotonic()
    assert p.stop(2.0) is True
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 4.0
    snap = p.snapshot()
    assert snap.spooled == 300 and snap.written == 0
    assert_identity(snap, 300)
    assert exact(spooled(tmp_path / "backup")) == exact(expand(data))
    # The hung write completing late changes no counter (its rows are in the spool already).
    sink.release()
    assert p._writer.join(5.0)
    assert p.snapshot().written == 0
    assert_identity(p.snapshot(), 300)


def test_rejected_row_is_quarantined_while_its_batch_mates_commit(tmp_path: Path) -> None:
    db = tmp_path / "tags.db"
    with sqlite3.connect(db) as conn:  # the table exists already, with a rule the sink does not know
        conn.execute(
            "CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, "
            "value REAL CHECK (value IS NULL OR abs(value) < 1e6), quality INTEGER, "
            "PRIMARY KEY (ts, tag_name)) WITHOUT ROWID"
        )
    pd = PollingData("g", BASE, {f"t{i}": (1e9 if i == 4 else float(i)) for i in range(10)})
    with Pipeline(make_config(tmp_path, writer={"batch_size": 10}), sink=SqliteSink(db)) as p:
        p.submit(pd)
    snap = p.snapshot()
    good = [r for r in pd.rows() if r.tag != "t4"]
    assert table_rows(db) == as_table(good)
    assert snap.written == 9 and snap.quarantined == 1 and snap.batches_ok == 1 and snap.batches_failed == 0
    assert_identity(snap, 10)
    qdir = tmp_path / "backup" / "quarantine"
    assert exact(spooled(qdir, quarantine=True)) == exact([TagValue("t4", to_epoch_us(BASE), 1e9)])
    with open(next(qdir.glob("quarantine-*.csv")), newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert line["error_code"].startswith("SQLITE_CONSTRAINT")
    assert "CHECK constraint failed" in line["error_message"]
    assert "sqlite" in line["source"]


# -- overflow ------------------------------------------------------------------


def stall(p: Pipeline, sink: MemorySink) -> PollingData:
    """Block the sink and put one full batch (seq 0-9) in flight; returns that group."""
    sink.block()
    first = group(0, 10)
    p.submit(first)
    assert sink.blocked.wait(5.0)
    wait_until(lambda: len(p._buffer) == 0, "the writer to take the batch", 5)
    return first


def test_overflow_drop_oldest_evicts_fifo_with_exact_counts(
    tmp_path: Path, released: list[MemorySink], caplog: pytest.LogCaptureFixture
) -> None:
    sink, rec = faulty_sqlite(tmp_path)
    released.append(sink)
    config = make_config(tmp_path, buffer={"capacity": 100, "overflow_policy": "drop-oldest"},
                         writer={"batch_size": 10})
    data = groups(15, 10, start=10)  # seq 10-159; 50 more than fit
    with caplog.at_level(logging.WARNING, logger="tagwriter.buffer"), Pipeline(config, sink=sink) as p:
        first = stall(p, sink)
        results = [bool(p.submit(pd)) for pd in data]
        assert results == [True] * 10 + [False] * 5
        mid = p.snapshot()
        assert mid.dropped == 50 and mid.dropped_by_reason == {"overflow": 50} and mid.buffer_size == 100
        assert mid.overflow_1h == 50
        sink.release()
        assert p.flush(5.0)
    kept = expand([first]) + expand(data)[50:]  # the oldest 50 of the waiting values went
    assert rec.seen == kept
    assert table_rows(tmp_path / "tags.db") == as_table(kept)
    assert_identity(p.snapshot(), 160)
    # One warning for the burst, not one line per value.
    assert len([r for r in caplog.records if "buffer full" in r.getMessage()]) == 1


def test_overflow_spill_sends_the_oldest_to_the_spool_in_order(tmp_path: Path, released: list[MemorySink]) -> None:
    sink, rec = faulty_sqlite(tmp_path)
    released.append(sink)
    config = make_config(tmp_path, buffer={"capacity": 100, "overflow_policy": "spill"}, writer={"batch_size": 10})
    data = groups(15, 10, start=10)
    with Pipeline(config, sink=sink) as p:
        first = stall(p, sink)
        assert all(p.submit(pd) for pd in data)
        mid = p.snapshot()
        assert mid.spooled == 50 and mid.dropped == 0 and mid.buffer_size == 100
        sink.release()
        assert p.flush(5.0)
    snap = p.snapshot()
    assert exact(spooled(tmp_path / "backup")) == exact(expand(data)[:50])
    assert rec.seen == expand([first]) + expand(data)[50:]
    assert snap.written == 110 and snap.spooled == 50 and snap.dropped == 0
    assert_identity(snap, 160)


def test_overflow_block_waits_then_drops_the_newest(tmp_path: Path, released: list[MemorySink]) -> None:
    sink, rec = faulty_sqlite(tmp_path)
    released.append(sink)
    config = make_config(tmp_path, buffer={"capacity": 100, "overflow_policy": "block", "block_timeout": 0.2},
                         writer={"batch_size": 10})
    data = groups(12, 10, start=10)  # seq 10-129: two groups too many
    with Pipeline(config, sink=sink) as p:
        first = stall(p, sink)
        t0 = time.monotonic()
        results = [bool(p.submit(pd)) for pd in data]
        waited = time.monotonic() - t0
        assert results == [True] * 10 + [False] * 2
        assert waited >= 0.39  # each refused group waited block_timeout
        mid = p.snapshot()
        assert mid.dropped_by_reason == {"block_timeout": 20}
        assert p._buffer.blocked_puts == 2
        sink.release()
        assert p.flush(5.0)
    kept = expand([first]) + expand(data)[:100]
    assert rec.seen == kept
    assert table_rows(tmp_path / "tags.db") == as_table(kept)
    assert_identity(p.snapshot(), 130)


def test_overflow_block_resumes_when_the_writer_makes_room(tmp_path: Path, released: list[MemorySink]) -> None:
    sink, rec = faulty_sqlite(tmp_path)
    released.append(sink)
    config = make_config(tmp_path, buffer={"capacity": 100, "overflow_policy": "block", "block_timeout": 30.0},
                         writer={"batch_size": 10})
    data = groups(11, 10, start=10)
    with Pipeline(config, sink=sink) as p:
        first = stall(p, sink)
        for pd in data[:10]:
            assert p.submit(pd)
        outcome: list[bool] = []
        blocked = threading.Thread(target=lambda: outcome.append(bool(p.submit(data[10]))))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive() and not outcome  # waiting for room
        sink.release()
        blocked.join(5.0)
        assert outcome == [True]
        assert p.flush(5.0)
    assert rec.seen == expand([first, *data])
    assert p.snapshot().dropped == 0
    assert_identity(p.snapshot(), 120)


# -- the queue adapter -----------------------------------------------------------


def test_queue_consumer_submits_until_the_sentinel(tmp_path: Path) -> None:
    source: queue.Queue[PollingData | None] = queue.Queue()
    data = groups(20, 25)
    with Pipeline(make_config(tmp_path)) as p:
        consumer = QueueConsumer(source).start(p)
        for pd in data:
            source.put(pd)
        source.put(None)
        assert consumer.stop(5.0)  # ends at the sentinel
        assert consumer.consumed == 20
        assert p.flush(5.0)
    assert table_rows(tmp_path / "tags.db") == as_table(expand(data))
    assert_identity(p.snapshot(), 500)


def test_a_tag_name_with_a_line_break_is_refused_and_nothing_is_taken(tmp_path: Path) -> None:
    with Pipeline(make_config(tmp_path)) as p:
        with pytest.raises(ValueError, match="contains a line break"):
            p.submit(PollingData("g", 1_700_000_000.0, {"ok": 1.0, "bad\ntag": 2.0}))
        with pytest.raises(ValueError, match="is not text"):
            p.submit([TagValue(7, 1, 1.0, 192)])  # type: ignore[arg-type]
        assert p.submit(PollingData("g", 1_700_000_000.0, {"ok": 1.0}))
    assert p.snapshot().submitted == 1
    assert_identity(p.snapshot(), 1)


def test_queue_consumer_keeps_a_refused_item_in_quarantine_and_goes_on(tmp_path: Path) -> None:
    source: queue.Queue[PollingData | None] = queue.Queue()
    good = groups(3, 5)
    with Pipeline(make_config(tmp_path)) as p:
        consumer = QueueConsumer(source).start(p)
        source.put(good[0])
        source.put(PollingData("g", 1_700_000_000.0, {"a\r\nb": 1.0}))
        source.put(good[1])
        source.put(good[2])
        source.put(None)
        assert consumer.stop(5.0)
        assert (consumer.consumed, consumer.rejected) == (3, 1)
    assert table_rows(tmp_path / "tags.db") == as_table(expand(good))
    assert_identity(p.snapshot(), 15)
    lines = [i for f in p.quarantine_files() for i in read_spool(f, quarantine=True)]
    assert len(lines) == 1 and isinstance(lines[0], InputError)
    assert "line break" in lines[0].reason and "queue item 2" in lines[0].raw


def test_stop_submits_what_is_still_queued(tmp_path: Path) -> None:
    source: queue.Queue[PollingData | None] = queue.Queue()
    data = groups(200, 10)
    p = Pipeline(make_config(tmp_path)).start()
    consumer = QueueConsumer(source).start(p)
    for pd in data:
        source.put(pd)
    assert p.stop(10.0) is True  # no sentinel: stop ends the consumer after the queue is empty
    assert source.empty() and consumer.consumed == 200
    assert table_rows(tmp_path / "tags.db") == as_table(expand(data))
    assert_identity(p.snapshot(), 2000)


# -- flush and stop --------------------------------------------------------------


def test_flush_returns_false_while_the_sink_is_stuck(tmp_path: Path, released: list[MemorySink]) -> None:
    sink, _ = faulty_sqlite(tmp_path)
    released.append(sink)
    with Pipeline(make_config(tmp_path), sink=sink) as p:
        sink.block()
        p.submit(group(0, 5))
        t0 = time.monotonic()
        assert p.flush(0.3) is False
        assert time.monotonic() - t0 < 3.0
        sink.release()
        assert p.flush(5.0) is True
        assert p.snapshot().written == 5


def test_flush_true_means_the_counters_show_it(tmp_path: Path) -> None:
    """A batch leaves 'in flight' only once counted: flush() must not return between the two."""
    with Pipeline(make_config(tmp_path, writer={"flush_interval": 60.0})) as p:
        record_batch = p._metrics.record_batch

        def slow_record_batch(**kw: Any) -> None:
            time.sleep(0.6)  # longer than the flush's idle tick: it looks while the batch is being counted
            record_batch(**kw)

        p._metrics.record_batch = slow_record_batch  # type: ignore[method-assign]
        p.submit(group(0, 4))
        assert p.flush(5.0) is True
        snap = p.snapshot()
        assert snap.written == 4 and snap.pending == 0


def test_stop_is_idempotent_and_submit_after_stop_raises(tmp_path: Path) -> None:
    assert Pipeline(make_config(tmp_path)).stop() is True  # never started
    p = Pipeline(make_config(tmp_path)).start()
    p.submit(group(0, 3))
    assert p.stop() is True
    first = p.snapshot()
    assert p.stop(0.0) is True
    with pytest.raises(PipelineStopped):
        p.submit(group(3, 3))
    again = p.snapshot()
    assert (again.submitted, again.written) == (first.submitted, first.written) == (3, 3)
    assert not p.running


def stop_while_producing(p: Pipeline, trigger: Any) -> int:
    """Run a producer thread until submit raises PipelineStopped; `trigger()` stops. Values taken."""
    taken = [0]
    started = threading.Event()

    def produce() -> None:
        i = 0
        while True:
            pd = group(i * 10, 10, i)
            try:
                p.submit(pd)
            except PipelineStopped:
                return
            taken[0] += 10
            i += 1
            if i == 50:
                started.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert started.wait(5.0)
    trigger()
    producer.join(10.0)
    assert not producer.is_alive()
    return taken[0]


def test_stop_from_another_thread_while_submitting(tmp_path: Path) -> None:
    p = Pipeline(make_config(tmp_path)).start()
    results: list[bool] = []

    def stopper() -> None:
        t = threading.Thread(target=lambda: results.append(p.stop(5.0)))
        t.start()
        t.join(10.0)

    taken = stop_while_producing(p, stopper)
    assert results == [True]
    snap = p.snapshot()
    assert_identity(snap, taken)
    assert snap.written == taken == len(table_rows(tmp_path / "tags.db"))


def test_stop_from_a_signal_handler(tmp_path: Path) -> None:
    p = Pipeline(make_config(tmp_path)).start()
    results: list[bool] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: results.append(p.stop(5.0)))
    try:
        # To the main thread itself, as the OS may hand a process-wide signal to any thread.
        taken = stop_while_producing(p, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGUSR1))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert results == [True]
    assert_identity(p.snapshot(), taken)
    assert p.snapshot().written == len(table_rows(tmp_path / "tags.db"))


def test_stop_with_a_fatal_sink_spools_everything(tmp_path: Path) -> None:
    sink, _ = faulty_sqlite(tmp_path)
    sink.go_down(FatalError("no such table (injected)", code="TEST-FATAL"))
    data = groups(4, 10)
    with Pipeline(make_config(tmp_path), sink=sink) as p:
        for pd in data:
            p.submit(pd)
    snap = p.snapshot()
    assert snap.spooled == 40 and snap.written == 0
    assert exact(spooled(tmp_path / "backup")) == exact(expand(data))
    assert_identity(snap, 40)


def full_blocking_pipeline(tmp_path: Path, released: list[MemorySink], n: int) -> tuple[Pipeline, list[PollingData]]:
    """Policy block, capacity 100: batch 1 hangs in the sink and group 2 fills the buffer; `n` groups of 100."""
    sink, _ = faulty_sqlite(tmp_path)
    released.append(sink)
    sink.block()
    config = make_config(tmp_path, buffer={"capacity": 100, "overflow_policy": "block", "block_timeout": 60.0})
    data = groups(n, 100)
    p = Pipeline(config, sink=sink).start()
    p.submit(data[0])
    assert sink.blocked.wait(5.0)  # batch 1 hangs in the sink
    p.submit(data[1])  # the buffer is full
    return p, data


def test_stop_is_bounded_while_a_submit_waits_for_room(tmp_path: Path, released: list[MemorySink]) -> None:
    """A producer blocked in submit (policy block, long timeout) neither delays stop nor loses rows."""
    p, data = full_blocking_pipeline(tmp_path, released, 3)
    outcome: list[bool] = []
    producer = threading.Thread(target=lambda: outcome.append(bool(p.submit(data[2]))))
    producer.start()
    wait_until(lambda: p._buffer.waiting == 100, "the third submit to block", 5)
    # While it waits, its rows are submitted and pending: the identity holds at this snapshot.
    snap = p.snapshot()
    assert (snap.submitted, snap.pending, snap.waiting) == (300, 300, 100), snap
    assert snap.submitted == snap.accounted
    t0 = time.monotonic()
    assert p.stop(1.0) is True
    assert time.monotonic() - t0 < 3.0  # was block_timeout (60 s): stop waited for the submit lock
    producer.join(5.0)
    assert not producer.is_alive() and outcome == [True]  # its rows were spooled, not dropped
    snap = p.snapshot()
    assert snap.spooled == 300 and snap.dropped == 0 and snap.waiting == 0
    assert_identity(snap, 300)
    assert sorted(exact(spooled(tmp_path / "backup"))) == sorted(exact(expand(data)))
    with pytest.raises(PipelineStopped):
        p.submit(data[0])


def test_producers_blocked_for_room_wait_side_by_side_not_on_a_lock(tmp_path: Path, released: list[MemorySink]) -> None:
    """Two producers blocked for room (policy block) both wait in the buffer, each for its own rows.

    When the submit lock was held across the blocking put, the second producer waited on that
    lock instead (no timeout), so only one group counted as waiting.
    """
    p, data = full_blocking_pipeline(tmp_path, released, 4)
    producers = [threading.Thread(target=p.submit, args=(pd,)) for pd in data[2:]]
    for t in producers:
        t.start()
    wait_until(lambda: p._buffer.waiting == 200, "both producers to wait for room", 5)
    assert p.snapshot().submitted == 400
    assert p.stop(1.0) is True
    for t in producers:
        t.join(5.0)
    assert not any(t.is_alive() for t in producers)
    assert_identity(p.snapshot(), 400)


def test_abort_wakes_a_blocked_submit_at_once(tmp_path: Path, released: list[MemorySink]) -> None:
    p, data = full_blocking_pipeline(tmp_path, released, 3)
    producer = threading.Thread(target=lambda: p.submit(data[2]))
    producer.start()
    wait_until(lambda: p._buffer.waiting == 100, "the third submit to block", 5)
    p.abort()
    producer.join(5.0)
    assert not producer.is_alive()
    assert p.stop(0.0) is True
    assert_identity(p.snapshot(), 300)
    assert p.snapshot().spooled == 300


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_a_sqlite_path_that_can_never_open_is_fatal_and_spools(tmp_path: Path, where: str) -> None:
    (tmp_path / "afile").write_text("x")
    path = tmp_path if where == "folder" else tmp_path / "afile" / "x.db"
    config = make_config(tmp_path)
    config.database.url = f"sqlite:///{path}"
    data = groups(2, 10)
    with Pipeline(config) as p:
        for pd in data:
            p.submit(pd)
        wait_until(lambda: p.snapshot().fatal_errors == 1, "the fatal error", 5)
        assert p.snapshot().state == "failed"
        err = p.fatal_error
        assert err is not None and err.code == ("EISDIR" if where == "folder" else "ENOTDIR"), err
        assert err.hint
    snap = p.snapshot()
    assert snap.spooled == 20 and snap.fatal_errors == 1
    assert_identity(snap, 20)


def test_run_exit_code_is_1_after_a_fatal_error_however_long_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table of the wrong shape: the probe must not report recovery (it flipped every second)."""
    from typer.testing import CliRunner

    from tagwriter.cli.app import app

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "wrong.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table tag_values(tag_name text, ts text, val real, quality int)")
    env = {"TAGWRITER_SOURCE__GROUPS": "1", "TAGWRITER_SOURCE__TAGS_PER_GROUP": "5",
           "TAGWRITER_SOURCE__INTERVAL": "0.05", "TAGWRITER_WRITER__FLUSH_INTERVAL": "0.05",
           "TAGWRITER_WRITER__PROBE_INTERVAL": "0.02", "TAGWRITER_WRITER__PROBE_MAX_INTERVAL": "0.05"}
    result = CliRunner().invoke(app, ["run", "--duration", "1", "--no-panel", "--database", f"sqlite:///{db}"],
                                env=env)
    assert result.exit_code == 1, result.output
    assert "refused writes" in result.output
    # the write's error, or (once a probe ran) the table check's finding
    assert "has no column named value" in result.output or "column value is missing" in result.output
    assert "adds up" in result.output  # every value is in the spool
    # refused at open (0 batches) or by the first write (1): no flip back to writing, no second failure
    assert re.search(r"batches: 0 written, [01] failed", result.output), result.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from tag_values").fetchone() == (0,)


# -- a later run -----------------------------------------------------------------


class FixedWallClock(SystemClock):
    """Real monotonic time and waits; the wall clock stands still (a clock stepped back, a board without RTC)."""

    def time(self) -> float:
        return 1_772_366_400.0


@pytest.mark.parametrize("clock", [SystemClock(), FixedWallClock()], ids=["system-clock", "same-wall-clock"])
def test_spool_files_of_an_earlier_run_are_kept(tmp_path: Path, clock: SystemClock) -> None:
    run1 = groups(3, 10)
    sink, _ = faulty_sqlite(tmp_path)
    sink.go_down()
    with Pipeline(make_config(tmp_path), sink=sink, clock=clock) as p:
        for pd in run1:
            p.submit(pd)
    files1 = {f: f.read_bytes() for f in (tmp_path / "backup").glob("tagwriter-*.csv")}
    assert files1 and exact(spooled(tmp_path / "backup")) == exact(expand(run1))

    run2 = groups(2, 10, start=30)
    sink2, _ = faulty_sqlite(tmp_path)
    sink2.go_down()  # still down; auto replay on (the default) must not touch the files
    with Pipeline(make_config(tmp_path, backup={"auto_replay": True}), sink=sink2, clock=clock) as p2:
        for pd in run2:
            p2.submit(pd)
    for f, content in files1.items():
        assert f.read_bytes() == content, f"{f.name} was changed by the second run"
    assert sorted(exact(spooled(tmp_path / "backup"))) == sorted(exact(expand(run1 + run2)))
    assert p2.snapshot().spooled == 20


def test_partial_spool_file_left_by_a_crash_is_recovered_at_start(tmp_path: Path) -> None:
    from tagwriter.spool import Spool

    crashed = Spool(tmp_path / "backup", tmp_path / "backup" / "quarantine")
    lost = expand(groups(2, 10))
    crashed.write_rows(lost)  # never sealed: a .partial, as a killed process leaves it
    assert list((tmp_path / "backup").glob("*.partial"))
    sink, _ = faulty_sqlite(tmp_path)
    sink.go_down()
    with Pipeline(make_config(tmp_path), sink=sink):
        pass
    assert not list((tmp_path / "backup").glob("*.partial"))
    assert exact(spooled(tmp_path / "backup")) == exact(lost)


@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_buffer_fill_is_the_snapshots_buffer_size_without_a_snapshot(tmp_path: Path, durability: str) -> None:
    """The load test's sampler reads `buffer_fill()`: the same figure as the snapshot's, for ~nothing."""
    sink = MemorySink()  # no batch is due (1,000 values, a minute): nothing leaves the buffer while we look
    config = make_config(tmp_path, buffer={"durability": durability, "directory": str(tmp_path / "q"),
                                           "capacity": 1000, "overflow_policy": "block"},
                         writer={"batch_size": 1000, "flush_interval": 60.0})
    with Pipeline(config, sink=sink) as p:
        for g in groups(5, 40):
            assert p.submit(g)
        if durability == "disk":
            wait_until(lambda: p.snapshot().queue_pending == 0, "the values to be durable")
        size, capacity = p.buffer_fill()
        snap = p.snapshot()
        assert (size, capacity) == (snap.buffer_size, snap.buffer_capacity) == (200, 1000)
        p.abort()

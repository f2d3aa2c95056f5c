"""The writer thread on an injected clock with the in-memory sink's fault injection.

Nothing here sleeps and hopes: time moves only when a test advances the
`ManualClock`; the retry and probe waits are the clock's `wait()`, and the
writer's size-or-time trigger is observed through `TracedBuffer`, which says
when the writer is parked in `wait_ready` again after reacting to a change.
"""

from __future__ import annotations

import logging
import random as _random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clocks import ManualClock
from waits import wait_until

from tagwriter.buffer import RingBuffer
from tagwriter.config import BackupConfig, Config, WriterConfig
from tagwriter.errors import FatalError, LoginRefusedError, TransientError
from tagwriter.metrics import Metrics, WriterState
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import FULL_LOOK_INTERVAL, Spool
from tagwriter.spoolformat import SpoolLine, read_spool
from tagwriter.writer import SPOOL_ERROR_LOG_INTERVAL, Writer


class TracedBuffer(RingBuffer):
    """A RingBuffer that shows when the writer sits in `wait_ready` (test instrumentation).

    `looks` counts the waits inside `wait_ready`: each one follows a look at
    the clock, so after `poke()` a larger count means the writer has seen the
    clock as it is now (and written whatever that made due).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.entries = 0
        self.parked = False
        self.looks = 0
        self._not_empty = _CountingCondition(self, self._mutex)

    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> int:
        self.entries += 1
        self.parked = True
        try:
            return super().wait_ready(batch_size, max_age, timeout)
        finally:
            self.parked = False

    def poke(self) -> int:
        """Make a parked `wait_ready` look at the clock again (unlike `wake()`, forces nothing); `looks` before."""
        with self._not_empty:
            self._not_empty.notify_all()
            return self.looks


class _CountingCondition(threading.Condition):
    def __init__(self, buffer: TracedBuffer, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.buffer = buffer

    def wait(self, timeout: float | None = None) -> bool:
        self.buffer.looks += 1
        return super().wait(timeout)


class RecordingSink(MemorySink):
    """MemorySink that records each write's size and clock time."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.batches: list[tuple[int, float]] = []

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        self.batches.append((len(rows), self.clock.monotonic()))
        return super().write_batch(rows)

    @property
    def sizes(self) -> list[int]:
        return [n for n, _ in self.batches]


@dataclass
class Rig:
    clock: ManualClock
    buffer: TracedBuffer
    sink: RecordingSink
    spool: Spool
    metrics: Metrics
    writer: Writer
    submitted: list[TagValue] = field(default_factory=list)
    recovered: list[float] = field(default_factory=list)

    def submit(self, n: int, tag: str = "t") -> list[TagValue]:
        start = len(self.submitted)
        rows = [TagValue(f"{tag}{i}", 1_700_000_000_000_000 + i, i / 4, 192) for i in range(start, start + n)]
        self.submitted.extend(rows)
        self.metrics.record_submitted(n)
        self.buffer.put_many(rows)
        return rows

    def tick(self, seconds: float) -> None:
        """Advance the clock and wait until the writer has reacted and is parked again."""
        self.clock.advance(seconds)
        looks = self.buffer.poke()
        wait_until(lambda: self.buffer.looks > looks and self.buffer.parked, what="writer parked again")

    def parked(self) -> None:
        wait_until(lambda: self.buffer.parked, what="writer parked in wait_ready")

    def identity(self) -> None:
        snap = self.metrics.snapshot(buffer_size=len(self.buffer), inflight=self.writer.inflight)
        assert snap.submitted == snap.accounted, snap

    def spooled_rows(self) -> list[TagValue]:
        self.spool.seal()
        out = []
        for f in self.spool.backup.files():
            for item in read_spool(f):
                assert isinstance(item, SpoolLine), item
                out.append(item.row)
        return out


def no_jitter() -> float:
    """The probe's jitter source for an exact schedule."""
    return 0.0


def make_rig(tmp_path: Path, *, max_bytes: int = 0, random: Callable[[], float] = no_jitter, **writer: object) -> Rig:
    clock = ManualClock()
    cfg = WriterConfig(**{  # type: ignore[arg-type]
        "batch_size": 5, "flush_interval": 1.0, "retry_delays": [1.0, 2.0, 4.0],
        "probe_interval": 1.0, "probe_max_interval": 4.0, **writer,
    })
    buffer = TracedBuffer(10_000, clock=clock)
    sink = RecordingSink(clock)
    spool = Spool(tmp_path / "backup", max_bytes=max_bytes, clock=clock)
    metrics = Metrics(clock)
    writer = Writer(buffer, sink, spool, metrics, cfg, clock=clock, random=random)
    rig = Rig(clock, buffer, sink, spool, metrics, writer)
    rig.writer.on_recovered = lambda: rig.recovered.append(clock.monotonic())
    return rig


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:  # never leave a thread behind: unblock everything, then stop
        rig.sink.release()
        rig.sink.come_up()
        rig.writer.request_stop()
        assert rig.writer.join(10.0), "writer thread did not stop"


@pytest.fixture
def rig(tmp_path: Path, rigs: list[Rig]) -> Rig:
    r = make_rig(tmp_path)
    rigs.append(r)
    return r


def start(rig: Rig) -> Rig:
    rig.writer.start()
    wait_until(lambda: rig.metrics.state is not WriterState.STARTING, what="sink opened")
    return rig


# -- the size-or-time trigger ---------------------------------------------------------


def test_flushes_by_size_one_write_per_batch(rig: Rig) -> None:
    start(rig)
    rig.submit(12)
    wait_until(lambda: rig.sink.sizes == [5, 5], what="two full batches")
    rig.parked()
    rig.tick(0.5)  # the 2 left over are 0.5 s old: not due
    assert rig.sink.sizes == [5, 5]
    rig.tick(0.5)  # 1.0 s old: due
    assert rig.sink.sizes == [5, 5, 2]
    assert rig.sink.write_calls == rig.sink.commits == 3  # one write (transaction) per batch
    assert rig.metrics.snapshot().avg_batch_size_5m == pytest.approx(4.0)
    assert [r for r in rig.submitted if (r.tag, r.ts_us) not in rig.sink.rows] == []
    rig.identity()


def test_flushes_by_time_since_the_oldest_pending_value(rig: Rig) -> None:
    start(rig)
    rig.parked()
    t0 = rig.clock.monotonic()
    rig.submit(1)
    rig.parked()
    # steps are exact binary fractions
    rig.tick(0.25)
    rig.tick(0.25)
    rig.submit(1)  # a newer value does not restart the oldest one's timer
    rig.tick(0.25)
    assert rig.sink.batches == []
    rig.tick(0.25)
    assert rig.sink.batches == [(2, t0 + 1.0)]
    # a long idle wait never writes a batch that is not due
    rig.submit(3)
    rig.tick(0.75)
    assert len(rig.sink.batches) == 1
    rig.tick(1.0)
    assert rig.sink.sizes == [2, 3]
    rig.identity()


def test_flush_writes_a_partial_batch_at_once_and_reports_false_on_timeout(rig: Rig) -> None:
    start(rig)
    rig.submit(3)
    assert rig.writer.flush(5.0)
    assert rig.sink.sizes == [3]
    rig.sink.block()
    rig.submit(2)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(rig.writer.flush(0.5)))
    flusher.start()
    assert rig.sink.blocked.wait(10)
    rig.clock.advance(1.0)  # past the flush deadline while the write hangs
    flusher.join(10)
    assert result == [False]
    rig.sink.release()
    assert rig.writer.flush(5.0)
    assert rig.sink.sizes == [3, 2]
    rig.identity()


# -- retries ---------------------------------------------------------------------------


@pytest.mark.parametrize("delays", [[1.0, 2.0, 4.0], [0.5, 3.0]])
def test_backoff_sequence_then_success(tmp_path: Path, rigs: list[Rig], delays: list[float]) -> None:
    rig = make_rig(tmp_path, retry_delays=delays)
    rigs.append(rig)
    start(rig)
    t0 = rig.clock.monotonic()
    rig.sink.fail_times(len(delays))
    rig.submit(5)
    waited = [rig.clock.advance_waiter("tagwriter-writer") for _ in delays]
    assert waited == delays
    wait_until(lambda: rig.metrics.batches_ok == 1 and rig.metrics.state is WriterState.WRITING,
               what="batch committed after retries")
    assert rig.clock.monotonic() - t0 == pytest.approx(sum(delays))
    assert rig.sink.write_calls == len(delays) + 1
    assert len(rig.sink.rows) == 5
    snap = rig.metrics.snapshot()
    assert (snap.retries, snap.batches_failed, snap.written, snap.spooled) == (len(delays), len(delays), 5, 0)
    assert snap.state == "writing"
    assert not rig.writer.in_outage
    rig.identity()


def test_shutdown_interrupts_the_backoff(rig: Rig) -> None:
    start(rig)
    rig.sink.go_down()
    rig.submit(5)
    waiter = rig.clock.wait_for_waiter("tagwriter-writer")
    assert waiter.timeout == 1.0
    t0 = rig.clock.monotonic()
    rig.writer.request_stop()
    assert rig.writer.join(10.0)
    assert rig.clock.monotonic() == t0  # no retry delay had to pass
    assert rig.sink.write_calls == 1
    assert rig.metrics.spooled == 5
    assert rig.spooled_rows() == rig.submitted
    rig.identity()


def test_fatal_error_is_not_retried(rig: Rig) -> None:
    start(rig)
    rig.sink.fail_times(1, error=lambda: FatalError("table missing", code="TEST-FATAL"))
    rig.submit(5)
    wait_until(lambda: rig.metrics.spooled == 5, what="batch spooled")
    assert rig.sink.write_calls == 1 and rig.metrics.retries == 0
    assert rig.metrics.state is WriterState.FAILED
    assert rig.writer.fatal_error is not None and "table missing" in str(rig.writer.fatal_error)
    assert rig.spooled_rows() == rig.submitted
    rig.identity()


def test_a_refused_login_is_never_tried_again(rig: Rig) -> None:
    """Each failed login counts toward locking the account: no probe after ORA-01017 and kin."""
    start(rig)
    rig.sink.go_down(LoginRefusedError("logon denied", code="ORA-01017"))
    rig.submit(5)
    wait_until(lambda: rig.metrics.spooled == 5, what="batch spooled")
    rig.submit(5)
    wait_until(lambda: rig.metrics.spooled == 10, what="the next batch spooled at once")
    rig.clock.advance(3600.0)  # an hour: a probe would have run many times
    assert rig.sink.write_calls == 1 and rig.sink.probe_calls == 0
    snap = rig.metrics.snapshot()
    assert snap.state == "failed" and snap.fatal_errors == 1 and rig.writer.last_fatal_error is not None
    rig.identity()


# -- outage mode -----------------------------------------------------------------------------


def go_to_outage(rig: Rig) -> None:
    rig.sink.go_down()
    rig.submit(5)
    assert [rig.clock.advance_waiter("tagwriter-writer") for _ in range(3)] == [1.0, 2.0, 4.0]
    wait_until(lambda: rig.writer.in_outage and rig.metrics.spooled == 5, what="outage mode")


def test_retries_exhausted_spools_the_batch_and_enters_outage(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    start(rig)
    with caplog.at_level(logging.ERROR, logger="tagwriter.writer"):
        go_to_outage(rig)
    snap = rig.metrics.snapshot()
    assert snap.state == "outage" and snap.outages == 1
    assert (snap.batches_failed, snap.retries, snap.written) == (4, 3, 0)
    assert "TEST-DOWN" in snap.last_error
    assert rig.sink.write_calls == 4
    assert any("outage mode" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert rig.spooled_rows() == rig.submitted
    rig.identity()


def test_in_outage_later_batches_are_spooled_at_once(rig: Rig) -> None:
    start(rig)
    go_to_outage(rig)
    calls = rig.sink.write_calls
    for _ in range(4):
        rig.submit(5)
    wait_until(lambda: rig.metrics.spooled == 25, what="later batches spooled")
    assert rig.sink.write_calls == calls  # no retry storm: the sink is not even called
    assert rig.clock.waiting("tagwriter-writer") == []  # and no backoff wait
    assert rig.spooled_rows() == rig.submitted
    rig.identity()


def held_batch(tmp_path: Path, rigs: list[Rig]) -> Rig:
    """Outage with a spool whose cap the first batch reaches: the second batch is held."""
    rig = make_rig(tmp_path, max_bytes=1)
    rigs.append(rig)
    start(rig)
    go_to_outage(rig)  # the first batch is spooled: the cap is reached
    rig.submit(5)
    wait_until(lambda: rig.writer.held == 5, what="the batch held for room in the spool")
    assert rig.writer.inflight == 5 and rig.spool.backup.full
    return rig


def test_a_full_spool_holds_the_batch_and_never_bounces_it_to_the_database(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = held_batch(tmp_path, rigs)
    calls = rig.sink.write_calls
    for _ in range(5):  # it looks at the spool again, and only at the spool
        assert rig.clock.advance_waiter("tagwriter-writer") == FULL_LOOK_INTERVAL
    assert rig.sink.write_calls == calls and rig.writer.held == 5 and rig.writer.in_outage
    rig.clock.wait_for_waiter("tagwriter-probe")  # parked: not probing right now
    rig.sink.come_up()  # the probe's recovery ends the hold: the held batch goes to the database
    rig.clock.advance_waiter("tagwriter-probe")
    wait_until(lambda: rig.recovered, what="recovery")
    wait_until(lambda: rig.metrics.written == 5, what="the held batch written")
    assert rig.writer.held == 0 and rig.writer.inflight == 0 and rig.sink.write_calls == calls + 1
    assert rig.metrics.spooled == 5
    rig.identity()


def test_room_in_the_spool_ends_the_hold(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = held_batch(tmp_path, rigs)
    calls = rig.sink.write_calls
    rig.spool.seal()
    for f in rig.spool.backup.files():  # replayed elsewhere in this process: room again
        f.unlink()
        rig.spool.forget(f)
    assert rig.clock.advance_waiter("tagwriter-writer") == FULL_LOOK_INTERVAL
    wait_until(lambda: rig.metrics.spooled == 10, what="the held batch spooled")
    assert rig.writer.held == 0 and rig.writer.in_outage and rig.sink.write_calls == calls
    rig.identity()


def test_stop_spools_a_held_batch_past_the_cap(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = held_batch(tmp_path, rigs)
    rig.writer.request_stop()
    assert rig.writer.join(10.0)
    assert rig.metrics.spooled == 10 and rig.writer.held == 0
    assert rig.spooled_rows() == rig.submitted
    rig.identity()


def probe_waits(rig: Rig, n: int) -> list[float]:
    """Let `n` probes run (each waits, then probes); the waits before them."""
    waits = []
    for _ in range(n):
        calls = rig.sink.probe_calls
        waits.append(rig.clock.advance_waiter("tagwriter-probe"))
        wait_until(lambda c=calls: rig.sink.probe_calls == c + 1, what="probe ran")
    return waits


def test_probe_backs_off_to_its_cap_then_recovery_resumes_live_writes(rig: Rig) -> None:
    start(rig)
    go_to_outage(rig)
    probes = probe_waits(rig, 5)
    assert probes == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, capped at probe_max_interval
    assert rig.writer.in_outage and rig.recovered == []
    rig.sink.come_up()
    assert rig.clock.advance_waiter("tagwriter-probe") == 4.0
    wait_until(lambda: rig.recovered != [], what="recovery (on_recovered runs last)")
    assert not rig.writer.in_outage
    assert rig.metrics.snapshot().state == "writing"
    assert rig.recovered == [rig.clock.monotonic()]
    calls = rig.sink.write_calls
    live = rig.submit(5)
    wait_until(lambda: rig.metrics.written == 5, what="live write after recovery")
    assert rig.sink.write_calls == calls + 1
    assert all((r.tag, r.ts_us) in rig.sink.rows for r in live)
    assert rig.metrics.spooled == 5  # the outage batch stays in the spool for replay
    rig.identity()


def test_probe_waits_are_jittered_below_their_nominal_schedule(tmp_path: Path, rigs: list[Rig]) -> None:
    """A fleet of gateways must not probe a recovering database in lock-step: each wait is drawn from (80 %, 100 %]."""
    rig = make_rig(tmp_path, random=_random.Random(5).random)
    rigs.append(rig)
    start(rig)
    go_to_outage(rig)
    waits = probe_waits(rig, 6)
    for wait, nominal in zip(waits, [1.0, 2.0, 4.0, 4.0, 4.0, 4.0], strict=True):
        assert 0.8 * nominal < wait <= nominal
    assert len(set(waits[2:])) == 4  # at the cap too: no fixed period
    rig.identity()


def test_sink_down_at_start_spools_from_the_first_batch(rig: Rig) -> None:
    rig.sink.go_down()
    start(rig)
    assert rig.writer.in_outage and rig.metrics.state is WriterState.OUTAGE
    rig.submit(5)
    wait_until(lambda: rig.metrics.spooled == 5, what="spooled")
    assert rig.sink.write_calls == 0
    assert rig.spooled_rows() == rig.submitted


# -- fatal errors: the probe must prove writes work ---------------------------------------------


def wrong_shape_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("create table tag_values(tag_name text, ts text, val real, quality int)")


def test_after_a_fatal_error_the_probe_proves_writes_work_before_recovery(tmp_path: Path) -> None:
    """A table of the wrong shape: SELECT works, INSERT never does. No flip to writing, sticky count."""
    clock = ManualClock()
    db = tmp_path / "wrong.db"
    wrong_shape_db(db)
    cfg = WriterConfig(batch_size=5, flush_interval=1.0, retry_delays=[1.0], probe_interval=1.0,
                       probe_max_interval=4.0)
    buffer = TracedBuffer(1000, clock=clock)
    sink = SqliteSink(db, busy_timeout=1.0)
    spool = Spool(tmp_path / "backup", clock=clock)
    metrics = Metrics(clock)
    writer = Writer(buffer, sink, spool, metrics, cfg, clock=clock, random=no_jitter)
    rig = Rig(clock, buffer, sink, spool, metrics, writer)  # type: ignore[arg-type]
    writer.start()
    try:
        rig.submit(5)
        wait_until(lambda: metrics.spooled == 5, what="batch spooled")
        assert metrics.state is WriterState.FAILED and metrics.fatal_errors == 1 and metrics.retries == 0
        # refused at open by the table check (before: by the first write)
        assert "column value is missing" in str(writer.fatal_error)
        waits = []
        for _ in range(3):
            waits.append(clock.advance_waiter("tagwriter-probe"))
            wait_until(lambda: "does not match" in metrics.last_error, what="probe found the table wrong")
        assert waits == [1.0, 4.0, 4.0]  # straight to the cap: only an operator can fix this
        assert writer.in_outage and metrics.state is WriterState.FAILED
        rig.submit(5)
        wait_until(lambda: metrics.spooled == 10, what="second batch spooled at once")
        assert metrics.batches_failed == 0  # refused at open: no write attempted, then none by the probe
        clock.wait_for_waiter("tagwriter-probe")  # the last probe ran (and failed) before the fix
        # The operator fixes the table: the next probe recovers; the fatal count stays.
        with sqlite3.connect(db) as conn:
            conn.execute("drop table tag_values")
        sink.create_table()
        assert clock.advance_waiter("tagwriter-probe") == 4.0
        wait_until(lambda: metrics.state is WriterState.WRITING, what="recovery")  # set last in _recover
        snap = metrics.snapshot()
        assert snap.state == "writing" and snap.fatal_errors == 1
        assert writer.fatal_error is None and writer.last_fatal_error is not None
        rig.submit(5)
        wait_until(lambda: metrics.written == 5, what="live write after recovery")
        rig.identity()
    finally:
        writer.request_stop()
        assert writer.join(10.0)
        sink.close()


def test_a_second_fatal_error_probes_at_the_cap_from_the_start(rig: Rig) -> None:
    start(rig)
    for expected in (1.0, 4.0):
        rig.sink.fail_times(1, error=lambda: FatalError("refused", code="TEST-FATAL"))
        spooled = rig.metrics.spooled
        rig.submit(5)
        wait_until(lambda s=spooled: rig.metrics.spooled == s + 5, what="batch spooled")
        assert rig.clock.advance_waiter("tagwriter-probe") == expected
        wait_until(lambda: not rig.writer.in_outage, what="recovery")
    assert rig.metrics.snapshot().fatal_errors == 2
    rig.identity()


def test_spool_failures_are_logged_rate_limited_with_the_folder(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "afile").write_text("x")
    rig.spool = rig.writer.spool = Spool(tmp_path / "afile" / "backup", clock=rig.clock)
    start(rig)
    rig.sink.go_down(FatalError("refused", code="TEST-FATAL"))
    with caplog.at_level(logging.ERROR, logger="tagwriter.writer"):
        for n in range(5):
            rig.submit(5)
            wait_until(lambda n=n: rig.metrics.snapshot().dropped == 5 * (n + 1), what="batch dropped")
        spool_lines = [r.getMessage() for r in caplog.records if "cannot spool" in r.getMessage()]
        assert len(spool_lines) == 1, spool_lines  # not one line per batch
        assert f"cannot write to folder {tmp_path / 'afile' / 'backup'}" in spool_lines[0]
        assert "None" not in spool_lines[0]
        rig.clock.advance(SPOOL_ERROR_LOG_INTERVAL)
        rig.submit(5)
        wait_until(lambda: rig.metrics.snapshot().dropped == 30, what="batch dropped")
        spool_lines = [r.getMessage() for r in caplog.records if "cannot spool" in r.getMessage()]
    assert len(spool_lines) == 2 and "25 values in 5 batches" in spool_lines[1], spool_lines
    assert rig.metrics.snapshot().dropped_by_reason == {"spool_error": 30}
    rig.identity()


def test_sqlite_probe_is_not_reachable_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    sink = SqliteSink(db, busy_timeout=0.1)
    sink.open()
    sink.probe()
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransientError, match="locked"):
            sink.probe()
        other.execute("ROLLBACK")
        sink.probe()  # reachable again once the lock is gone
    finally:
        other.close()
        sink.close()


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_a_sqlite_path_that_can_never_open_is_fatal(tmp_path: Path, where: str) -> None:
    (tmp_path / "afile").write_text("x")
    path = tmp_path if where == "folder" else tmp_path / "afile" / "x.db"
    sink = SqliteSink(path)
    for call in (sink.open, sink.probe):
        with pytest.raises(FatalError) as info:
            call()
        assert info.value.code == ("EISDIR" if where == "folder" else "ENOTDIR") and info.value.hint


# -- stop while a write hangs ----------------------------------------------------------------


def test_abandon_takes_the_hung_batch_and_a_late_result_is_ignored(rig: Rig) -> None:
    start(rig)
    rig.sink.block()
    rows = rig.submit(5)
    assert rig.sink.blocked.wait(10)
    assert rig.writer.inflight == 5
    rig.writer.request_stop()
    assert not rig.writer.join(0.1)  # the write hangs: the thread cannot finish
    rig.writer.abort()
    batch = rig.writer.abandon()
    assert batch is not None and batch.rows == rows
    assert rig.writer.inflight == 0
    rig.metrics.record_spooled(rig.spool.write_rows(batch.rows, force=True))  # what Pipeline.stop does
    rig.sink.release()  # the hung write completes late...
    assert rig.writer.join(10.0)
    assert rig.metrics.written == 0  # ...and is not counted twice
    assert rig.spooled_rows() == rows
    rig.identity()


def stop_on_the_clock(pipeline: Pipeline, clock: ManualClock, timeout: float) -> tuple[bool, float]:
    """`pipeline.stop(timeout)` on a thread while time passes 0.1 s per step; (its result, clock seconds it took)."""
    t0 = clock.monotonic()
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(pipeline.stop(timeout)))
    stopper.start()
    real_end = time.monotonic() + 20
    while stopper.is_alive():  # time passes only here
        assert time.monotonic() < real_end, "stop() did not return"
        clock.advance(0.1)
        stopper.join(0.01)
    (ok,) = result
    return ok, clock.monotonic() - t0


def test_pipeline_stop_deadline_with_a_sink_that_blocks_forever(tmp_path: Path) -> None:
    clock = ManualClock()
    sink = MemorySink()
    config = Config(
        writer=WriterConfig(batch_size=5, flush_interval=1.0),
        backup=BackupConfig(directory=str(tmp_path / "backup"), quarantine_directory=str(tmp_path / "q")),
    )
    pipeline = Pipeline(config, sink=sink, clock=clock).start()
    try:
        sink.block()
        rows = [TagValue(f"t{i}", 1_700_000_000_000_000, float(i)) for i in range(7)]
        assert pipeline.submit(rows)
        assert sink.blocked.wait(10)
        result, took = stop_on_the_clock(pipeline, clock, 2.0)
        assert result is True
        assert took >= 2.0  # it did use its deadline to try to flush
        snap = pipeline.snapshot()
        assert (snap.written, snap.spooled, snap.pending) == (0, 7, 0)
        assert snap.submitted == snap.accounted
        files = sorted((tmp_path / "backup").glob("tagwriter-*.csv"))
        back = [i.row for f in files for i in read_spool(f) if isinstance(i, SpoolLine)]
        assert sorted(back) == sorted(rows)
    finally:
        sink.release()
        pipeline.stop(0)
    wait_until(lambda: not pipeline.alive, what="the writer thread to end")


# -- rows the database rejects, duplicates ---------------------------------------------------


def test_rejected_rows_are_quarantined_and_batch_mates_commit(rig: Rig) -> None:
    start(rig)
    rig.sink.reject_if(lambda r: r.tag in {"t1", "t3"}, code="ORA-12899", message="value too large for column")
    rig.submit(5)
    wait_until(lambda: rig.metrics.batches_ok == 1, what="batch committed")
    snap = rig.metrics.snapshot()
    assert (snap.written, snap.quarantined, snap.batches_failed) == (3, 2, 0)
    assert sorted(tag for tag, _ in rig.sink.rows) == ["t0", "t2", "t4"]
    rig.spool.seal()
    (qfile,) = rig.spool.quarantine.files()
    items = [i for i in read_spool(qfile, quarantine=True) if isinstance(i, SpoolLine)]
    assert [i.row.tag for i in items] == ["t1", "t3"]
    text = qfile.read_text(encoding="utf-8")
    assert text.count("ORA-12899,value too large for column,memory") == 2
    assert rig.spool.backup.files() == []  # not spooled for replay: they would fail again
    rig.identity()


class BlockedQuarantine:
    """Makes `spool.quarantine_rows` block until released (a slow or hung disk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = Spool.quarantine_rows

        def blocking(spool: Spool, rejected: object, source: str = "") -> int:
            self.entered.set()
            assert self.release.wait(30), "quarantine never released"
            return real(spool, rejected, source)  # type: ignore[arg-type]

        monkeypatch.setattr(Spool, "quarantine_rows", blocking)


def test_abandon_does_not_wait_for_a_quarantine_write(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quarantine I/O runs outside the writer's lock; the batch stays in flight meanwhile."""
    blocked = BlockedQuarantine(monkeypatch)
    start(rig)
    rig.sink.reject_if(lambda r: r.tag == "t1", code="ORA-12899", message="value too large for column")
    rows = rig.submit(5)
    assert blocked.entered.wait(10)
    assert rig.writer.inflight == 5  # flush() sees it: neither gone nor counted twice
    rig.writer.abort()
    taken: list[object] = []
    taker = threading.Thread(target=lambda: taken.append(rig.writer.abandon()))
    taker.start()
    taker.join(5.0)
    assert not taker.is_alive(), "abandon() waited for the quarantine write"
    (batch,) = taken
    assert batch is not None and batch.rows == rows  # type: ignore[attr-defined]
    rig.metrics.record_spooled(rig.spool.write_rows(rows, force=True))  # what Pipeline.stop does
    blocked.release.set()
    assert rig.writer.join(10.0)
    snap = rig.metrics.snapshot()
    assert (snap.spooled, snap.written, snap.quarantined) == (5, 0, 0)  # the late result is not counted
    rig.identity()


def test_pipeline_stop_keeps_its_deadline_while_a_quarantine_write_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    sink = MemorySink()
    sink.reject_if(lambda r: r.tag == "t1", code="ORA-12899", message="value too large for column")
    config = Config(
        writer=WriterConfig(batch_size=5, flush_interval=1.0),
        backup=BackupConfig(directory=str(tmp_path / "backup"), quarantine_directory=str(tmp_path / "q")),
    )
    blocked = BlockedQuarantine(monkeypatch)
    pipeline = Pipeline(config, sink=sink, clock=clock).start()
    try:
        rows = [TagValue(f"t{i}", 1_700_000_000_000_000, float(i)) for i in range(5)]
        assert pipeline.submit(rows)
        assert blocked.entered.wait(10)
        result, took = stop_on_the_clock(pipeline, clock, 2.0)
        assert result is True
        assert 2.0 <= took < 3.0  # it kept its deadline
        snap = pipeline.snapshot()
        assert (snap.written, snap.spooled, snap.pending) == (0, 5, 0)
        assert snap.submitted == snap.accounted
    finally:
        blocked.release.set()
        pipeline.stop(0)
    wait_until(lambda: not pipeline.alive, what="the writer thread to end")
    assert pipeline.snapshot().written == 0  # the late result is ignored


def test_duplicates_are_counted_as_already_written(rig: Rig) -> None:
    start(rig)
    rows = rig.submit(5)
    wait_until(lambda: rig.metrics.batches_ok == 1, what="first batch")
    rig.submitted.extend(rows)
    rig.metrics.record_submitted(5)
    rig.buffer.put_many(rows)  # the same (tag, ts) again: e.g. a replay after an ambiguous commit
    wait_until(lambda: rig.metrics.batches_ok == 2, what="second batch")
    snap = rig.metrics.snapshot()
    assert (snap.written, snap.duplicates, snap.batches_failed, snap.quarantined) == (5, 5, 0, 0)
    assert len(rig.sink.rows) == 5
    rig.identity()


def test_end_to_end_latency_is_measured_on_the_clock(rig: Rig) -> None:
    start(rig)
    rig.parked()
    rig.submit(2)
    rig.parked()
    rig.tick(1.0)
    assert rig.sink.sizes == [2]
    snap = rig.metrics.snapshot()
    assert snap.latency_max_s == pytest.approx(1.0)
    assert 1.0 / 1.22 <= snap.latency_p50_s <= 1.0

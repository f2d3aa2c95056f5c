"""`Pipeline`: source -> buffer -> writer -> sink, with spool and metrics, as one sealed object.

    with Pipeline(config) as p:
        p.submit(PollingData("line1", ts, {"line1.temp": 21.5}))

Every submitted value ends as exactly one of: written (or a duplicate of a
row already there), spooled, quarantined, or a counted drop. The parts
(buffer, writer, spool, metrics, sink) are private: callers use the methods
below, and sources see the pipeline only as an `Intake`
(tagwriter/sources/base.py). Serving HTTP is the service's job
(tagwriter/service.py), not the pipeline's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tagwriter.bounded import close_bounded
from tagwriter.buffer import Buffer, OverflowPolicy, RingBuffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import Config, WriterConfig
from tagwriter.diskqueue import DiskQueue, QueueError
from tagwriter.errors import ConfigError, FatalError, LoginRefusedError, PipelineStopped, SpoolError, SpoolFullError
from tagwriter.intake import BadInput, Stoppable
from tagwriter.metrics import LatencyHistogram, Metrics, MetricsSnapshot, WriterState
from tagwriter.models import Chunk, PollingData, TagValue, checked_rows, known_tag_names
from tagwriter.recovery import SpoolDrain
from tagwriter.settle import SETTLED, Receipt
from tagwriter.sinks import Sink, create_sink
from tagwriter.spool import LOOK_INTERVAL, Spool
from tagwriter.writer import Writer

log = logging.getLogger(__name__)

QUEUE_CLOSE_FLOOR = 2.0  # seconds the queue's last commit may take even after the stop deadline
ALWAYS_WAIT = 30.0  # seconds a submit waits for its own fsync with buffer.fsync_interval = 0 (a full disk)
INTAKE_GRACE = 0.1  # seconds stop() lets a submit in progress finish before closing the buffer on it
ROOM_CHECK = 0.1  # seconds between looks at a source's stop event while it waits for room
SINK_CLOSE_TIMEOUT = 2.0  # a hung driver must not hold up the exit
WRITER_STALL_FLOOR = 30.0  # seconds: liveness never calls the writer loop stuck sooner than this
PROBE_GRACE = 0.5  # seconds outage mode may lack a probe thread (it starts just after the outage does)


def writer_stall_limit(config: Config) -> float:
    """Seconds the writer loop may go without a tick before it counts as stuck.

    The longest gap a working loop leaves: an idle wait (LOOK_INTERVAL), a retry
    delay, then one database call that takes every timeout; twice that, at least
    WRITER_STALL_FLOOR. About a minute with the default timeouts.
    """
    db, delays = config.database, config.writer.retry_delays
    worst = LOOK_INTERVAL + max(delays, default=0.0) + db.connect_timeout + db.pool_wait_timeout + db.call_timeout
    return max(WRITER_STALL_FLOOR, 2.0 * worst)


def _can_write(directory: Path) -> bool:
    """True if files can be made in `directory`, or it can be made (its nearest existing parent is writable)."""
    for path in (directory, *directory.parents):
        if path.exists():
            return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    return False


def _make_buffer(config: Config, clock: Clock) -> Buffer:
    """The buffer `buffer.durability` names: the in-memory ring, or the durable queue on disk."""
    b = config.buffer
    if b.durability == "disk":
        try:
            return DiskQueue(
                b.directory, capacity=b.capacity, policy=b.overflow_policy, max_bytes=b.max_disk_bytes,
                fsync_interval=b.fsync_interval, block_timeout=b.block_timeout, clock=clock,
            )
        except QueueError as exc:
            if not exc.disk_full:
                raise ConfigError(f"buffer.directory = {b.directory!r}: {exc}",
                                  hint="make the folder writable, or point buffer.directory elsewhere") from None
            # Refusing to start would make a service manager restart it in a loop, taking no value at all.
            log.error("QUEUE: %s; running with the in-memory buffer (values are not durable until a restart "
                      "with room on that disk); values queued there are written by a later run", exc)
    return RingBuffer(b.capacity, b.overflow_policy, block_timeout=b.block_timeout, clock=clock)


class Pipeline:
    """The library's entry point. Every public method is thread-safe."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        sink: Sink | None = None,
        clock: Clock = SYSTEM_CLOCK,
        buffer: Buffer | None = None,
    ) -> None:
        self.config = config = config or Config()
        self.clock = clock
        self._metrics = Metrics(clock)
        # `buffer`: a prebuilt (e.g. instrumented) buffer; overflow-test injects one.
        self._buffer: Buffer = buffer if buffer is not None else _make_buffer(config, clock)
        self._queue = self._buffer if isinstance(self._buffer, DiskQueue) else None
        b = config.backup
        self._spool = Spool(
            b.directory, b.quarantine_directory,
            roll_rows=b.roll_rows, roll_seconds=b.roll_seconds, max_bytes=b.max_bytes, clock=clock,
        )
        self._sink = sink if sink is not None else create_sink(config.database)
        self._writer = Writer(
            self._buffer, self._sink, self._spool, self._metrics, config.writer, clock=clock
        )
        # The spool drain runs on the writer thread between live batches (see recovery.py).
        self._drain = SpoolDrain(self._spool, self._sink, config, clock=clock)
        if self._queue is not None:
            self._queue.before_release = self._spool.sync  # spooled rows on disk before the queue forgets them
            self._queue.on_corrupt = lambda n: self._metrics.record_dropped(n, "queue_corrupt")
        if config.backup.auto_replay:
            self._writer.background = self._drain
            self._writer.on_recovered = self._drain.trigger
        # Guards `_accepting` and `_submitting`; never held across I/O or a wait for room.
        self._intake_lock = threading.Lock()  # (taken bare on the submit path: a Condition's `with` costs more)
        self._intake = threading.Condition(self._intake_lock)
        self._submitting = 0  # submits between their accepting check and their last spool write
        self._stop_lock = threading.RLock()
        self._hurry = threading.Event()
        self._stop_wake = threading.Event()  # set by abort() and when the writer thread ends
        self._writer.on_exit = self._writer_ended
        #: Seconds the writer loop may go without a tick before `liveness()` calls it stuck.
        self.writer_stall_limit = writer_stall_limit(config)
        self._probe_missing_since: float | None = None  # see _probe_alive
        self._accepting = False
        self._started = False
        self._stop_result: bool | None = None
        self._attached: list[Stoppable] = []
        self._source_status: Callable[[], Any] | None = None

    # -- life cycle --------------------------------------------------------

    def start(self) -> Pipeline:
        """Recover files a crashed run left, then start the writer. Idempotent."""
        with self._stop_lock:
            if self._started:
                return self
            self._started = True
            try:
                self._spool.recover()
            except OSError as exc:
                log.error("cannot recover partial spool files: %s", exc)
            if self._writer.background is self._drain:
                self._drain.check_target()  # before the first drain step: whose files are these?
            if self._queue is not None:
                # Values the last run queued and did not write: written first, counted as submitted again.
                self._metrics.record_submitted(self._queue.recovered)
                self._queue.start()
            self._writer.start()
            with self._intake:
                self._accepting = True
        return self

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while `submit` takes values."""
        return self._accepting

    def _writer_ended(self) -> None:
        """On the writer thread as it ends: unless stop() asked it to, it failed; say so at once."""
        crash = self._writer.crash
        if self._accepting or crash is not None:
            why = f": {crash!r}" if crash is not None else ""
            log.error("the writer thread has ended unexpectedly%s: nothing is written any more; "
                      "stopping spools what is held", why)
            self._metrics.set_state(WriterState.FAILED, f"the writer thread has ended unexpectedly{why} (see the log)")
        self._stop_wake.set()

    # -- producers (the `Intake` of tagwriter/sources/base.py) -------------

    @property
    def capacity(self) -> int:
        """How many values the buffer holds at most."""
        return self._buffer.capacity

    def submit(self, data: PollingData | Iterable[TagValue], *, cursor: tuple[str, str] | None = None) -> Receipt:
        """Hand over one polling group (or rows); the receipt is true if every value was taken.

        False means some were dropped (counted) under the `drop-oldest` or
        `block` policy; values handed over while `stop()` closes the buffer
        go to the spool. The receipt says when the values are settled
        (`Receipt.wait`, `Receipt.on_settled`): fsynced to the disk queue with
        `buffer.durability = "disk"` (with `fsync_interval = 0` submit waits
        for that itself), else written, spooled, quarantined or counted. `cursor`
        (key, position) is stored with the values in the disk queue: a source
        resumes from `resume_point(key)`. Raises PipelineStopped after `stop()`, and ValueError
        (nothing taken) for a value no database or spool line could keep exactly
        (`models.check_tag_names`, `models.checked_rows`): a tag name that is not
        text, empty, or holds a control character or a lone surrogate; a number too large.
        """
        rows = self._rows_of(data)
        if not rows and cursor is None:
            return SETTLED
        buffer = self._buffer
        self._enter_intake()
        try:
            self._metrics.record_submitted(len(rows))
            result = buffer.put_many(rows, cursor=cursor)
            if result.evicted:
                self._spill(result.evicted)
            if result.dropped:
                reason = "block_timeout" if buffer.policy is OverflowPolicy.BLOCK else "overflow"
                self._metrics.record_dropped(result.dropped, reason)
            if result.popped[1] > result.popped[0]:
                buffer.release(*result.popped)  # spilled or dropped: settled
            # stop() closed the buffer meanwhile: the rows go to the spool.
            spooled = not result.refused or self._spool_rows(result.refused, "stopping: cannot spool")
        finally:
            self._leave_intake()
        receipt = Receipt(spooled and not result.dropped, buffer.settlement, result.end)
        if self._queue is not None and self._queue.fsync_interval <= 0.0:
            receipt.wait(ALWAYS_WAIT)
        return receipt

    def resume_point(self, key: str) -> str | None:
        """The last durable `cursor` position stored under `key` by `submit`; None in memory or without one."""
        return self._queue.resume_point(key) if self._queue is not None else None

    def spool_rows(self, rows: Sequence[TagValue]) -> int:
        """Take rows straight into the spool, past the buffer (counted as submitted and spooled).

        For a source that must stop while it holds rows it has read off its
        input. Returns how many were spooled; the rest are counted as dropped
        (`spool_error`). Raises PipelineStopped after `stop()`.
        """
        rows = self._rows_of(rows)
        if not rows:
            return 0
        self._enter_intake()
        try:
            self._metrics.record_submitted(len(rows))
            return len(rows) if self._spool_rows(rows, "cannot spool") else 0
        finally:
            self._leave_intake()

    def wait_for_room(self, n: int, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Wait until `n` values (at most `capacity`) fit without overflow; False on `stop` or timeout.

        Returns True at once when the pipeline is not accepting (its submit then says so).
        """
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        while self._accepting:
            wait = ROOM_CHECK if deadline is None else min(ROOM_CHECK, deadline - self.clock.monotonic())
            if self._buffer.wait_for_room(n, max(0.0, wait)):
                return True
            if (stop is not None and stop.is_set()) or (deadline is not None and self.clock.monotonic() >= deadline):
                return False
        return True

    def quarantine_input(self, bad: Sequence[BadInput]) -> int:
        """Count and keep inputs that could not be taken (`(where, why, raw)`); returns how many were kept."""
        if not bad:
            return 0
        try:
            kept = self._spool.quarantine_lines(bad)
        except SpoolError as exc:
            log.error("QUARANTINE FAILED: %d malformed input lines are lost, not kept (first %s): %s",
                      len(bad), bad[0][0], exc)
            self._metrics.record_bad_input(0, lost=len(bad))
            return 0
        self._metrics.record_bad_input(kept)
        return kept

    def report_source(self, status: Callable[[], Any] | None) -> None:
        """Show `status()` (a `SourceStatus`) in every snapshot: the panel, `status`, `/metrics`."""
        self._source_status = status

    def attach(self, source: Stoppable) -> None:
        """`stop()` stops `source` first, so that what it holds is handed over before intake ends."""
        with self._stop_lock:
            self._attached.append(source)

    @staticmethod
    def _rows_of(data: PollingData | Iterable[TagValue]) -> Chunk:
        if isinstance(data, PollingData):
            chunk = data.chunk()
            # checked once per distinct list of names, and every poll of a group then shares one tuple of them
            chunk.tags = known_tag_names(chunk.tags)
            return chunk
        # Every field, not just the tag: a value no driver or spool line can take would kill the writer.
        return Chunk.of(checked_rows(data if isinstance(data, (list, Chunk)) else list(data)))

    def _enter_intake(self) -> None:
        with self._intake_lock:
            if not self._accepting:
                raise PipelineStopped("the pipeline is stopped; the values were not taken")
            self._submitting += 1

    def _leave_intake(self) -> None:
        with self._intake_lock:
            self._submitting -= 1
            if not self._submitting and not self._accepting:  # only `_wait_submits` waits, after intake ended
                self._intake.notify_all()

    def _spill(self, rows: Sequence[TagValue]) -> None:
        self._metrics.record_overflow_spilled(len(rows))
        try:
            self._metrics.record_spooled(self._spool.write_rows(rows))
            if self._queue is not None:
                self._spool.sync()  # with a disk queue, settled means on disk: a source may ack upstream now
        except SpoolFullError as exc:
            log.error("cannot spill %d values: %s", len(rows), exc)
            self._metrics.record_dropped(len(rows), "spool_full")
        except SpoolError as exc:
            log.error("cannot spill %d values: %s", len(rows), exc)
            self._metrics.record_dropped(len(rows), "spool_error")

    def _spool_rows(self, rows: Sequence[TagValue], what: str) -> bool:
        """Spool rows past the size cap (shutdown); False (counted as dropped) if the disk fails."""
        try:
            self._metrics.record_spooled(self._spool.write_rows(rows, force=True))
            return True
        except SpoolError as exc:
            log.error("%s %d values: %s", what, len(rows), exc)
            self._metrics.record_dropped(len(rows), "spool_full" if isinstance(exc, SpoolFullError) else "spool_error")
            return False

    def apply_writer_settings(self, writer: WriterConfig) -> None:
        """Take new writer settings (a reload); batch size and flush interval hold from the next batch."""
        self.config = self.config.replace(writer=writer)
        self._writer.config = writer  # read by the writer thread for each batch
        self._buffer.wake()  # a wait for the old batch size or flush interval ends now

    # -- flushing and stopping ---------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Write (or spool) everything submitted so far; False if not done in time."""
        return self._writer.flush(timeout)

    def abort(self) -> None:
        """Make a `stop()` in progress give up flushing and spool the rest now.

        Closes the buffer too, so a producer blocked in `submit` spools its rows and returns.
        """
        self._hurry.set()
        self._stop_wake.set()
        self._buffer.close()

    def stop(self, timeout: float | None = None) -> bool:
        """Flush within `timeout` seconds (default `writer.shutdown_timeout`), spool the rest.

        Idempotent; callable from any thread. Bounded by `timeout` whatever
        producers do: a `submit` blocked for room (policy `block`) is woken and
        spools its rows. Returns True if nothing was left unsettled (written, spooled,
        quarantined or a counted policy drop); False if data could not be spooled.
        """
        with self._stop_lock:
            if self._stop_result is not None:
                return self._stop_result
            if not self._started:
                self._stop_result = True
                return True
            if timeout is None:
                timeout = self.config.writer.shutdown_timeout
            deadline = self.clock.monotonic() + timeout
            for source in self._attached:
                source.stop(max(0.0, deadline - self.clock.monotonic()))
            self._end_intake(deadline)
            if self._queue is not None and not self._queue.disk_full:  # the last group commit: the writer sees all
                self._queue.settlement.wait(self._queue.tail, max(0.0, deadline - self.clock.monotonic()))
            self._metrics.set_state(WriterState.STOPPING)
            self._writer.request_stop()
            finished = self._wait_writer(deadline)
            if not finished:
                log.warning("shutdown deadline reached: spooling what is still pending")
                self._writer.abort()
            leftovers = self._writer.abandon()  # a writer that died holds its batch still
            if self._queue is not None:  # what is durable stays queued for the next run; the rest is spooled
                left = self._queue.shutdown(max(QUEUE_CLOSE_FLOOR, deadline - self.clock.monotonic()))
                spooled_ok = self._spool_rows_if_any(left)
            else:
                spooled_ok = self._spool_leftovers(leftovers.rows if leftovers else [])
                self._buffer.release(self._buffer.settlement.mark, self._buffer.tail)  # all settled now
            try:
                self._spool.seal()
            except SpoolError as exc:
                log.error("%s", exc)
                spooled_ok = False
            if finished:
                self._drain.close()
                close_bounded(self._sink.close, SINK_CLOSE_TIMEOUT, "close the database connection")
            self._metrics.set_state(WriterState.STOPPED)
            snap = self.snapshot()
            self._stop_result = spooled_ok and snap.pending <= snap.queue_values
            log.info(
                "stopped: submitted %d = written %d + duplicates %d + spooled %d + "
                "quarantined %d + dropped %d + pending %d",
                snap.submitted, snap.written, snap.duplicates, snap.spooled,
                snap.quarantined, snap.dropped, snap.pending,
            )
            if snap.queue_values:
                log.info("%d values stay queued on disk in %s: the next run writes them first",
                         snap.queue_values, self.queue_directory)
            return self._stop_result

    def _end_intake(self, deadline: float) -> None:
        """Refuse later submits; let those in progress finish (bounded); close the buffer.

        A submit in progress normally finishes within microseconds and its
        rows enter the buffer; one blocked for room (policy `block`) is woken
        by `close()` after INTAKE_GRACE and spools its rows. Waiting for it
        lets that finish before the spool is sealed.
        """
        with self._intake:
            self._accepting = False
        if not self._wait_submits(self.clock.monotonic() + INTAKE_GRACE):
            self._buffer.close()
            if not self._wait_submits(max(self.clock.monotonic() + INTAKE_GRACE, deadline)):
                log.warning("%d submits still in progress; stopping without them", self._submitting)
        self._buffer.close()

    def _wait_submits(self, end: float) -> bool:
        """Wait until no submit is in progress, at most until `end`; True if none is."""
        with self._intake:
            while self._submitting:
                remaining = end - self.clock.monotonic()
                if remaining <= 0.0:
                    return False
                self._intake.wait(remaining)
            return True

    def _wait_writer(self, deadline: float) -> bool:
        """Wait for the writer thread to end, until the deadline or `abort()`; True if it ended."""
        while not self._hurry.is_set() and self._writer.alive:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0.0:
                break
            self.clock.wait(self._stop_wake, remaining)
        return self._writer.join(0.0)

    def _spool_leftovers(self, inflight: Sequence[TagValue]) -> bool:
        chunks = [Chunk.of(inflight)]
        while len(self._buffer):
            chunks.append(Chunk.of(self._buffer.drain(len(self._buffer) or 1).rows))
        return self._spool_rows_if_any(Chunk.join(chunks))

    def _spool_rows_if_any(self, rows: Sequence[TagValue]) -> bool:
        return not rows or self._spool_rows(rows, "cannot spool at shutdown")

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """Every figure now, as one immutable object."""
        files, size = self._spool.stats()
        queue = self._queue_figures()
        if self._source_status is not None:
            try:
                queue["source"] = dataclasses.asdict(self._source_status())
            except Exception:  # a source's report must not break the snapshot
                log.exception("the source's status failed")
        inflight = self._writer.inflight
        size_now = len(self._buffer)
        if "queue_values" in queue:  # pending = what the disk queue holds (durable or not, in flight or not)
            size_now = max(0, queue["queue_values"] + queue["queue_pending"] - inflight)
        return self._metrics.snapshot(
            **queue,
            buffer_size=size_now,
            buffer_capacity=self._buffer.capacity,
            inflight=inflight,
            waiting=self._buffer.waiting,
            backup_files=files,
            backup_bytes=size,
            spool_full=self._spool.backup.full or self._spool.backup.disk_full,
            held_spool_full=self._writer.held,
            spool_max_bytes=self._spool.backup.max_bytes,
            spool_disk_free_bytes=_free_bytes(self._spool.directory),
            **self._drain.status(),
        )

    def buffer_fill(self) -> tuple[int, int]:
        """(values waiting for the writer, capacity), as `snapshot()` counts its `buffer_size`: for a sampler that
        needs only this (a snapshot costs ~250 µs on a thread that wakes from a sleep: 10 a second are 2.5 ms/s)."""
        inflight = self._writer.inflight
        if self._queue is not None:
            return max(0, self._queue.queued() - inflight), self._buffer.capacity
        return len(self._buffer), self._buffer.capacity

    def _queue_figures(self) -> dict[str, Any]:
        if self._queue is None:
            return {}
        q = self._queue.stats()
        return {
            "durability": "disk", "queue_values": q.values, "queue_bytes": q.bytes, "queue_max_bytes": q.max_bytes,
            "queue_pending": q.pending, "queue_oldest_age_s": q.oldest_age, "queue_acknowledged": q.acknowledged,
            "queue_recovered": q.recovered, "queue_corrupt": q.corrupt, "queue_torn_tails": q.torn_tails,
            "queue_commits": q.commits, "queue_fsync_p50_s": q.fsync_p50, "queue_fsync_p99_s": q.fsync_p99,
            "queue_disk_full": q.disk_full,
        }

    @property
    def queue_directory(self) -> Path | None:
        """The durable queue's folder; None in memory."""
        return self._queue.directory if self._queue is not None else None

    def latency_histogram(self) -> LatencyHistogram:
        """The end-to-end latency histogram since start (a consistent copy)."""
        return self._metrics.cumulative_latency()

    def write_duration_histogram(self) -> LatencyHistogram:
        """Seconds per committed batch write since start (a consistent copy)."""
        return self._metrics.cumulative_write_durations()

    @property
    def fatal_error(self) -> FatalError | None:
        """The last error retrying cannot fix, kept after a recovery (for the exit status); None if none."""
        return self._writer.fatal_error or self._writer.last_fatal_error

    @property
    def in_outage(self) -> bool:
        """True while the writer spools every batch and probes the database."""
        return self._writer.in_outage

    @property
    def alive(self) -> bool:
        """True while the writer thread runs."""
        return self._writer.alive

    @property
    def writer_failed(self) -> bool:
        """True once the writer thread has ended without `stop()` asking it to, or by a bug (sticky after stop)."""
        return self._writer.crash is not None or (self._started and self._accepting and not self._writer.alive)

    def liveness(self) -> tuple[bool, str]:
        """(live, reason): the writer thread runs, its loop ticked within `writer_stall_limit`, and
        in outage mode the probe thread runs. Never asks the database: an outage is live."""
        state = self._metrics.state.value
        if not self._accepting:  # not started yet, or stopping: live until stopped
            return (False, "stopped") if self._stop_result is not None else (True, state)
        if not self._writer.alive:
            return False, "the writer thread has ended unexpectedly (see the log)"
        age = self.clock.monotonic() - self._writer.last_tick
        if age > self.writer_stall_limit:
            return False, f"the writer loop has not ticked for {age:.0f}s (limit {self.writer_stall_limit:g}s)"
        if not self._probe_alive():
            return False, "outage mode without a probe thread: the database is never tried again"
        return True, f"{state}: the writer loop ticked {age:.1f}s ago"

    def _probe_alive(self) -> bool:
        """False once outage mode has lacked a probe thread for PROBE_GRACE.

        A probe ends on its own only on recovery or a refused login (never
        retried: account lockout). The grace covers the moments between entering
        outage mode and starting the probe; a lone race on the timestamp only
        shifts that grace.
        """
        w = self._writer
        missing = w.in_outage and not w.probing and not isinstance(w.fatal_error, LoginRefusedError)
        if not missing:
            self._probe_missing_since = None
            return True
        now = self.clock.monotonic()
        if self._probe_missing_since is None:
            self._probe_missing_since = now
        return now - self._probe_missing_since < PROBE_GRACE

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): values are taken without loss, written or else spooled.

        Outage mode with room in a writable spool is ready; a full or unwritable
        spool then is not. Never asks the database.
        """
        state = self._metrics.state.value
        if not self._accepting:
            return False, "stopped" if self._stop_result is not None else state
        if not self._writer.alive:
            return False, "the writer thread has ended unexpectedly (see the log)"
        if not self._writer.in_outage:
            return True, state
        directory = self._spool.directory
        if self._spool.backup.disk_full:
            return False, f"{state} and the disk of the spool folder {directory} is full: values are held in memory"
        if self._spool.backup.full or self._writer.held:
            return False, f"{state} and the spool is full (backup.max_bytes): values are held in memory"
        if not _can_write(directory):
            return False, f"{state} and the spool folder {directory} is not writable"
        return True, f"{state}: spooling to {directory}"

    @property
    def target(self) -> str:
        """The database written to, for people (no password)."""
        return self._sink.describe()

    @property
    def spool_directory(self) -> Path:
        return self._spool.directory

    @property
    def quarantine_directory(self) -> Path:
        return self._spool.quarantine_directory

    def spool_files(self) -> list[Path]:
        """Completed backup files, oldest first."""
        return self._spool.backup.files()

    def quarantine_files(self) -> list[Path]:
        """Completed quarantine files, oldest first."""
        return self._spool.quarantine.files()


def _free_bytes(folder: Path) -> int | None:
    """Free bytes for this user where the spool goes (one statvfs, no folder scan): the folder's file system,
    its parent's until it is made; None if neither can be read."""
    for place in (folder, folder.parent):
        try:
            return shutil.disk_usage(place).free
        except OSError:
            continue
    return None

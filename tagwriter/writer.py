"""The writer thread: batches out of the buffer into the sink, or into the spool.

Life of a batch: drained when it is due (`RingBuffer.batch_due`: `batch_size`
rows pending or the oldest has waited `flush_interval`) -> `sink.write_batch`
-> on a transient failure retried after each of `retry_delays` (interruptible
by stop) -> retries exhausted: the batch is spooled and the writer enters
*outage mode*, where every later batch is spooled at once while the outage
probe (`tagwriter.probe`) checks the database. When the probe succeeds, live
writes resume and `on_recovered` runs (the automatic spool drain hooks in there).

While the spool is full (its size cap) in outage mode, the batch is *held*:
it stays in flight (so the buffer fills and its overflow policy decides,
counted), `held` says how many values, and the writer waits for room in the
spool, the probe's recovery or stop; it never tries the database from there.

The batch being written is *in flight*. If `stop()`'s deadline passes while a
write hangs, the pipeline takes the in-flight batch with `abandon()` and spools
it; should the hung write complete later, its result is ignored (the rows are
then both in the table and the spool; replay counts them as duplicates).
`abandon()` never waits on disk I/O: quarantine files are written outside the
lock, and only the counting is done under it.
"""

from __future__ import annotations

import logging
import random as _random
import threading
from collections.abc import Callable
from typing import Protocol

from tagwriter.backoff import retry
from tagwriter.buffer import Batch, Buffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import WriterConfig
from tagwriter.errors import FatalError, LoginRefusedError, SpoolError, SpoolFullError, TransientError
from tagwriter.metrics import Metrics, WriterState
from tagwriter.models import TagValue
from tagwriter.probe import OutageProbe
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.spool import FULL_LOOK_INTERVAL, LOOK_INTERVAL, Spool, SpoolDiskFullError

log = logging.getLogger(__name__)

SPOOL_ERROR_LOG_INTERVAL = 10.0  # seconds between "cannot spool" log lines


class BackgroundWork(Protocol):
    """Work the writer thread does between live batches (the spool drain)."""

    def due_in(self) -> float | None:
        """Seconds until the next step is due (0 = now); None when there is nothing to do."""
        ...

    def step(self) -> None:
        """One short unit of work (at most one database write)."""
        ...


class Writer:
    """Owns the writer thread and the outage probe.

    `random` (values in [0, 1)) draws the probe's jitter; tests pass one that
    returns 0.0 for the exact schedule.
    """

    def __init__(
        self,
        buffer: Buffer,
        sink: Sink,
        spool: Spool,
        metrics: Metrics,
        config: WriterConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_recovered: Callable[[], None] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.spool = spool
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.on_recovered = on_recovered
        self.on_exit: Callable[[], None] | None = None  # called on the writer thread as it ends
        self.background: BackgroundWork | None = None  # run only when no live batch is due
        self._background_at: float | None = None  # clock time the next background step is due
        self._housekeeping_at = float("-inf")  # clock time the spool's next roll/recount is due
        # Heartbeat for /livez: set each time around the loop, before each write attempt and each
        # look at a full spool. An idle loop wakes at least every LOOK_INTERVAL (housekeeping).
        self.last_tick = clock.monotonic()
        self._thread = threading.Thread(target=self._run, name="tagwriter-writer", daemon=True)
        self._stopping = threading.Event()  # drain what is pending, then exit
        self._abort = threading.Event()  # exit now; the pipeline spools the rest
        self._interrupt = threading.Event()  # wakes retry and probe waits
        self._unhold = threading.Event()  # wakes a batch held for room in the spool (recovery, stop)
        self._lock = threading.Lock()  # guards the in-flight hand-off and outage flag; never held over I/O
        self._inflight: Batch | None = None
        self._outage = False
        self._held = 0  # values of the in-flight batch waiting for room in a full spool
        self._flushers = 0
        self._running = False  # the thread runs; under _idle
        self._idle = threading.Condition()
        self.fatal_error: FatalError | None = None  # the current one; cleared on recovery
        self.last_fatal_error: FatalError | None = None  # sticky, for the exit status
        self.crash: Exception | None = None  # what ended the thread, if a bug did (set before on_exit)
        self._spool_failures = [0, 0]  # batches, rows that could not be spooled since the last log line
        self._spool_error_logged = float("-inf")
        self._probe = OutageProbe(
            sink, metrics, interval=config.probe_interval, max_interval=config.probe_max_interval,
            stop=self._interrupt, on_recovered=self._recover, on_fatal=self._probe_fatal,
            clock=clock, random=random,
        )

    # -- control (any thread) ----------------------------------------------

    def start(self) -> None:
        with self._idle:
            self._running = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def in_outage(self) -> bool:
        return self._outage

    @property
    def probing(self) -> bool:
        """True while the outage probe's thread runs."""
        return self._probe.running

    @property
    def inflight(self) -> int:
        batch = self._inflight
        return len(batch) if batch is not None else 0

    @property
    def held(self) -> int:
        """Values held in flight because the spool is full (0 when none); approximate."""
        return self._held

    def request_stop(self) -> None:
        """Drain the buffer (flushing at once, no retries) and exit."""
        self._stopping.set()
        self._interrupt.set()
        self._unhold.set()
        self.buffer.wake()

    def abort(self) -> None:
        """Exit as soon as possible; the caller spools what is left."""
        self._abort.set()
        self.request_stop()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` for the writer thread; True if it has exited."""
        if self._thread.ident is not None:
            self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def abandon(self) -> Batch | None:
        """Take the in-flight batch away from a (hung) writer; the caller spools it."""
        with self._lock:
            batch, self._inflight = self._inflight, None
            return batch

    def flush(self, timeout: float) -> bool:
        """Wait until every value submitted so far is written, spooled or quarantined.

        Returns False if that did not happen within `timeout` seconds.
        """
        deadline = self.clock.monotonic() + timeout
        with self._idle:
            self._flushers += 1  # the writer writes a partial batch at once while a flush waits
        try:
            self.buffer.wake()
            with self._idle:  # notified after every batch and when the thread ends
                while len(self.buffer) or self._inflight is not None:
                    remaining = deadline - self.clock.monotonic()
                    if remaining <= 0.0 or not self._running:
                        return False
                    self._idle.wait(remaining)
            return True
        finally:
            with self._idle:
                self._flushers -= 1

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
            while not self._abort.is_set():
                self.last_tick = self.clock.monotonic()
                # Read each turn: a reload may replace `config` (Pipeline.apply_writer_settings).
                batch_size, max_age = self.config.batch_size, self.config.flush_interval
                urgent = self._urgent()
                n = self.buffer.wait_ready(batch_size, max_age, 0.0 if urgent else self._idle_wait())
                if self._abort.is_set():
                    break
                # wait_ready also returns on wake() and when background work or housekeeping is due.
                urgent = urgent or self._urgent()
                if n and (urgent or n >= batch_size or self.buffer.batch_due(batch_size, max_age)):
                    self._write_next()
                    continue
                if n == 0 and self._stopping.is_set():
                    break
                if not urgent:
                    self._background_step()
                self._housekeeping()
        except Exception as exc:  # a bug: kept for the state and the exit status; the pipeline spools the rest
            self.crash = exc
            log.exception("writer thread failed")
        finally:
            self._interrupt.set()
            with self._idle:
                self._running = False
                self._idle.notify_all()
            if self.on_exit is not None:
                self.on_exit()

    def _urgent(self) -> bool:
        """Write what is pending at once, due or not: stopping, or a flush() waits."""
        return self._stopping.is_set() or self._flushers > 0

    def _open(self) -> None:
        try:
            self.sink.open()
        except TransientError as exc:
            log.warning("database not reachable at start (%s): spooling until it is", exc)
            self._enter_outage(str(exc))
            return
        except FatalError as exc:
            self._enter_fatal(exc)
            return
        self.metrics.set_state(WriterState.WRITING)
        log.info("writing to %s", self.sink.describe())

    def _write_next(self) -> None:
        with self._idle:  # flush() must never see a batch in neither the buffer nor in flight
            batch = self.buffer.drain(self.config.batch_size)
            if not batch.rows:  # a disk queue passed over a record it could not trust: nothing to write
                return
            with self._lock:
                self._inflight = batch
        self._deliver(batch)
        with self._idle:
            if self._flushers:  # (counted under `_idle`: only a flush waits here)
                self._idle.notify_all()

    def _idle_wait(self) -> float:
        """Park until the next background step or housekeeping is due, whichever is sooner."""
        at = self._housekeeping_at
        if self._background_at is not None:
            at = min(at, self._background_at)
        return max(0.0, at - self.clock.monotonic())

    def _housekeeping(self) -> None:
        """When due: seal spool files older than `roll_seconds`, recount a folder others changed."""
        if self.clock.monotonic() < self._housekeeping_at:
            return
        try:
            self.spool.maybe_roll()
        except SpoolError as exc:
            log.error("%s", exc)
        self._housekeeping_at = self.clock.monotonic() + self._housekeeping_interval()

    def _housekeeping_interval(self) -> float:
        """The spool's own look interval (shorter while full), or sooner when files roll sooner.

        A file rolls at most this late after its `roll_seconds`.
        """
        spool = self.spool
        look = FULL_LOOK_INTERVAL if spool.backup.full else LOOK_INTERVAL
        return min(look, spool.backup.roll_seconds, spool.quarantine.roll_seconds)

    def _background_step(self) -> None:
        """Run background work while no live batch is due.

        Live first: never in outage mode, and never while a batch is due, so a
        live batch waits for one step at most.
        """
        work = self.background
        if work is None or self._outage:
            self._background_at = None
            return
        if self.buffer.batch_due(self.config.batch_size, self.config.flush_interval):
            return  # `_background_at` stays: the writer wakes for the step after this batch
        try:
            due = work.due_in()
            if due is not None and due <= 0.0:
                work.step()
                due = work.due_in()  # when the next step is due, so the writer wakes then
        except Exception:  # a bug in the background work must not stop live writes
            log.exception("background work failed; it is switched off")
            self.background = None
            self._background_at = None
            return
        self._background_at = None if due is None else self.clock.monotonic() + max(0.0, due)

    def _claim(self, batch: Batch, count: Callable[[], None]) -> bool:
        """Settle the in-flight batch here (`count` counts it); False if stop() took it already.

        The batch stops being in flight only once it is counted, so `flush()`
        never sees it gone from both the buffer and the counters. `count` runs
        under `_lock`: counters only, no I/O (stop() takes that lock).
        """
        with self._lock:
            if self._inflight is not batch:
                return False
            try:
                count()
            finally:
                self._inflight = None
        self.buffer.release(batch.start, batch.end)  # settled: receipts move, a disk queue frees the records
        return True

    def _deliver(self, batch: Batch) -> None:
        """Write or spool `batch`, which the caller has put in flight."""
        while True:
            if not (self._outage or self._abort.is_set()):
                failure = self._write_with_retry(batch)
                if failure is None:
                    return
                if isinstance(failure, FatalError):
                    self._enter_fatal(failure)
                else:
                    self._enter_outage(str(failure))
            if self._spool(batch):
                return
            # The database came back while the batch was held for room in the spool: write it.

    def _write_with_retry(self, batch: Batch) -> TransientError | FatalError | None:
        """Write with retries; the error that gave up, or None once settled."""
        started = self.clock.monotonic()  # of the last attempt
        retries = 0

        def attempt() -> WriteResult:
            nonlocal started
            started = self.last_tick = self.clock.monotonic()
            return self.sink.write_batch(batch.rows)

        def failed(exc: Exception, n: int, delay: float | None) -> None:
            nonlocal retries
            self.metrics.record_failure(str(exc), retry=delay is not None)
            if delay is not None:
                retries = n
                log.warning("batch of %d failed (%s); retry %d in %gs", len(batch), exc, n, delay)
                self.metrics.set_state(WriterState.RETRYING, str(exc))

        try:
            # stop sets _interrupt: no further retries, the batch is spooled instead
            result = retry(attempt, self.config.retry_delays, clock=self.clock, stop=self._interrupt,
                           on_failure=failed)
        except FatalError as exc:
            self.metrics.record_failure(str(exc), retry=False)
            return exc
        except TransientError as exc:
            return exc
        self._account(batch, result, self.clock.monotonic() - started)
        if retries:
            self.metrics.set_state(WriterState.WRITING)
        return None

    def _account(self, batch: Batch, result: WriteResult, seconds: float) -> None:
        """Quarantine the rejected rows (outside `_lock`), then count the batch (under it).

        Should stop() take the batch during the quarantine I/O, the pipeline
        spools and counts all of it: the rejected rows are then kept twice
        (quarantine and spool) and counted once.
        """
        if self._inflight is not batch:
            return  # stop() took it: a late result is ignored
        kept = lost = 0
        if result.rejected:
            rejected = [(batch.rows[e.index], e.code, e.message) for e in result.rejected]
            kept = self._quarantine(rejected)
            lost = len(rejected) - kept

        def count() -> None:
            if lost:
                self.metrics.record_dropped(lost, "quarantine_error")
            self.metrics.record_batch(
                rows=len(batch), written=result.written, duplicates=result.duplicates,
                quarantined=kept, write_seconds=seconds, marks=batch.marks,
            )

        self._claim(batch, count)

    def _quarantine(self, rejected: list[tuple[TagValue, str, str]]) -> int:
        """Keep rejected rows in quarantine; how many were kept (0 if the files cannot be written)."""
        for row, code, message in rejected[:3]:
            log.warning("row rejected (%s %s): tag %s at %s", code, message, row.tag, row.ts)
        try:
            self.spool.quarantine_rows(rejected, source=self.sink.describe())
        except SpoolError as exc:
            log.error("cannot quarantine %d rejected rows: %s", len(rejected), exc)
            return 0
        return len(rejected)

    def _spool(self, batch: Batch) -> bool:
        """Spool `batch`; True once settled, False if the database came back while it was held."""
        try:
            while True:
                if self._inflight is not batch:
                    return True  # stop() took it and spools it
                force = self._abort.is_set() or self._stopping.is_set()
                try:
                    self.spool.write_rows(batch.rows, force=force)
                except SpoolFullError as exc:
                    if self._hold(batch, disk_full=isinstance(exc, SpoolDiskFullError)):
                        continue
                    return False
                except SpoolError as exc:
                    self._log_spool_error(len(batch), exc)
                    self._claim(batch, lambda: self.metrics.record_dropped(len(batch), "spool_error"))
                    return True
                self._claim(batch, lambda: self.metrics.record_spooled(len(batch)))
                return True
        finally:
            if self._held:
                log.info("no longer holding %d values (spooled, or written: the database is back)", self._held)
                self._held = 0

    def _hold(self, batch: Batch, *, disk_full: bool = False) -> bool:
        """Wait while the spool is full; True to try the spool again, False when the database is back.

        The batch stays in flight (and so the buffer fills: its overflow policy
        decides, counted, instead of the disk). Room made by another process
        shows only when the spool looks at its folder, so the spool is tried
        again every FULL_LOOK_INTERVAL; the database is not tried from here:
        the probe's recovery (and stop) wakes this wait. A full disk (`disk_full`)
        is waited out the same way, stopping too, until stop's deadline takes the batch.
        """
        if not self._held:
            self._held = len(batch)
            log.warning("spool full: holding %d values in memory until the spool has room "
                        "or the database is back", len(batch))
        self._unhold.clear()
        self.last_tick = self.clock.monotonic()
        if self._stopping.is_set() and not disk_full:
            return True  # spooled past the cap now
        if not self._outage:
            return False
        self.clock.wait(self._abort if self._stopping.is_set() else self._unhold, FULL_LOOK_INTERVAL)
        return self._stopping.is_set() or self._outage

    def _log_spool_error(self, rows: int, exc: SpoolError) -> None:
        """Log the first failure, then at most one summary per SPOOL_ERROR_LOG_INTERVAL (writer thread)."""
        failures = self._spool_failures
        failures[0] += 1
        failures[1] += rows
        now = self.clock.monotonic()
        if now - self._spool_error_logged < SPOOL_ERROR_LOG_INTERVAL:
            return
        if failures[0] == 1:
            log.error("cannot spool %d values: %s", rows, exc)
        else:
            log.error("cannot spool: %d values in %d batches dropped since the last message; last error: %s",
                      failures[1], failures[0], exc)
        failures[0] = failures[1] = 0
        self._spool_error_logged = now

    # -- outage mode -------------------------------------------------------

    def _enter_outage(self, error: str) -> None:
        with self._lock:
            was = self._outage
            self._outage = True
        if not was:
            log.error("database unavailable (%s): outage mode, spooling to %s",
                      error, self.spool.directory)
        self.metrics.set_state(WriterState.OUTAGE, error)
        self._probe.start()

    def _enter_fatal(self, exc: FatalError) -> None:
        hint = f" ({exc.hint})" if exc.hint else ""
        log.error("database error that retrying cannot fix: %s%s; spooling", exc, hint)
        with self._lock:
            self._outage = True
        self.fatal_error = self.last_fatal_error = exc
        self.metrics.record_fatal(str(exc))
        if isinstance(exc, LoginRefusedError):
            log.error("not logging in again until restarted: each failed login counts toward locking the "
                      "account; fix the credentials, restart tagwriter, then the spool is replayed")
            return
        self._probe.start(verify_writes=True)  # after a fatal error the probe must prove writes work

    def _probe_fatal(self, exc: FatalError) -> None:
        """The probe found why writes cannot work (probe thread)."""
        self.fatal_error = self.last_fatal_error = exc

    def _recover(self) -> None:
        """The probe saw the database back (probe thread): live writes resume."""
        with self._lock:
            self._outage = False
        self.fatal_error = None
        try:
            self.spool.seal()
        except SpoolError as exc:
            log.error("%s", exc)
        log.info("database reachable again: live writes resume")
        if not self._stopping.is_set() and not self._outage:  # a new failure may have come meanwhile
            self.metrics.set_state(WriterState.WRITING, "")
        self._unhold.set()  # a batch held for room in the spool is written now
        if self.on_recovered is not None:
            self.on_recovered()

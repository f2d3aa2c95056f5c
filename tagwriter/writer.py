"""The writer thread: batches out of the buffer into the sink, or into the spool.

Life of a batch: drained when `batch_size` rows are pending or the oldest has
waited `flush_interval` -> `sink.write_batch` -> on a transient failure retried
after each of `retry_delays` (interruptible by stop) -> retries exhausted: the
batch is spooled and the writer enters *outage mode*, where every later batch
is spooled at once while a probe thread checks the database with capped
backoff. When the probe succeeds, live writes resume and `on_recovered` runs
(the automatic spool drain hooks in there). After a *fatal* error a probe
must also prove that writes can work (for an `AdminSink`: the table's shape
and a rolled-back insert), and a failing one backs off to the cap at once,
so a misconfigured table does not flip between failed and writing.

The batch being written is *in flight*. If `stop()`'s deadline passes while a
write hangs, the pipeline takes the in-flight batch with `abandon()` and spools
it; should the hung write complete later, its result is ignored (the rows are
then both in the table and the spool; replay counts them as duplicates).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from tagwriter.buffer import Batch, RingBuffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import WriterConfig
from tagwriter.errors import FatalError, LoginRefusedError, SpoolError, SpoolFullError, TransientError
from tagwriter.metrics import Metrics, WriterState
from tagwriter.models import TagValue
from tagwriter.sinks.base import AdminSink, Sink, WriteResult
from tagwriter.spool import Spool

log = logging.getLogger(__name__)

IDLE_TICK = 0.25  # seconds between housekeeping when no batch is due
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
    """Owns the writer thread and the outage probe thread."""

    def __init__(
        self,
        buffer: RingBuffer,
        sink: Sink,
        spool: Spool,
        metrics: Metrics,
        config: WriterConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.spool = spool
        self.metrics = metrics
        self.config = config
        self.clock = clock
        self.on_recovered = on_recovered
        self.background: BackgroundWork | None = None  # run only when no live batch is due
        self._background_at: float | None = None  # clock time the next background step is due
        self._thread = threading.Thread(target=self._run, name="tagwriter-writer", daemon=True)
        self._probe_thread: threading.Thread | None = None
        self._stopping = threading.Event()  # drain what is pending, then exit
        self._abort = threading.Event()  # exit now; the pipeline spools the rest
        self._interrupt = threading.Event()  # wakes retry and probe waits
        self._lock = threading.Lock()  # guards the in-flight hand-off and outage flag
        self._inflight: Batch | None = None
        self._outage = False
        self._flushers = 0
        self._idle = threading.Condition()
        self.fatal_error: FatalError | None = None  # the current one; cleared on recovery
        self.last_fatal_error: FatalError | None = None  # sticky, for the exit status
        self._verify_writes = False  # after a fatal error the probe must prove writes work
        self._spool_failures = [0, 0]  # batches, rows that could not be spooled since the last log line
        self._spool_error_logged = float("-inf")

    # -- control (any thread) ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def in_outage(self) -> bool:
        return self._outage

    @property
    def inflight(self) -> int:
        batch = self._inflight
        return len(batch) if batch is not None else 0

    def request_stop(self) -> None:
        """Drain the buffer (flushing at once, no retries) and exit."""
        self._stopping.set()
        self._interrupt.set()
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
            self._flushers += 1
        try:
            self.buffer.wake()
            with self._idle:
                while len(self.buffer) or self._inflight is not None:
                    remaining = deadline - self.clock.monotonic()
                    if remaining <= 0.0 or not self._thread.is_alive():
                        return False
                    self._idle.wait(min(remaining, IDLE_TICK))
                    self.buffer.wake()
            return True
        finally:
            with self._idle:
                self._flushers -= 1

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
            while not self._abort.is_set():
                urgent = self._stopping.is_set() or self._flushers > 0
                n = self.buffer.wait_ready(
                    self.config.batch_size, self.config.flush_interval,
                    0.0 if urgent else self._idle_wait(),
                )
                if self._abort.is_set():
                    break
                # wait_ready also returns at the idle tick and on wake(): write only a due batch.
                urgent = urgent or self._stopping.is_set() or self._flushers > 0
                if not urgent and self._background_step(n):
                    continue
                if n == 0 or not (urgent or self._batch_due(n)):
                    if n == 0 and self._stopping.is_set():
                        break
                    self._housekeeping()
                    continue
                with self._idle:  # flush() must never see a batch in neither the buffer nor in flight
                    batch = self.buffer.drain(self.config.batch_size)
                    with self._lock:
                        self._inflight = batch
                self._deliver(batch)
                self._notify_idle()
        except Exception:  # pragma: no cover - a bug; the pipeline spools the rest
            log.exception("writer thread failed")
        finally:
            self._interrupt.set()
            self._notify_idle()

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

    def _housekeeping(self) -> None:
        try:
            self.spool.maybe_roll()
        except SpoolError as exc:
            log.error("%s", exc)
        self._notify_idle()

    def _batch_due(self, pending: int) -> bool:
        """`batch_size` rows pending, or the oldest has waited `flush_interval`."""
        return pending >= self.config.batch_size or (
            self.buffer.oldest_age() >= self.config.flush_interval
        )

    def _idle_wait(self) -> float:
        """Park until the idle tick, or until the next background step is due if sooner."""
        at = self._background_at
        if at is None:
            return IDLE_TICK
        return min(IDLE_TICK, max(0.0, at - self.clock.monotonic()))

    def _background_step(self, pending: int) -> bool:
        """Run background work while no live batch is due; True to wait again instead of writing.

        Live first: never in outage mode, and never while a full batch or one
        older than `flush_interval` waits, so a live batch waits for one step at most.
        """
        work = self.background
        if work is None or self._outage:
            self._background_at = None
            return False
        if pending >= self.config.batch_size or (
            pending and self.buffer.oldest_age() >= self.config.flush_interval
        ):
            return False  # `_background_at` stays: the writer wakes for the step after this batch
        stepped = False
        try:
            due = work.due_in()
            if due is not None and due <= 0.0:
                work.step()
                stepped = True
                due = work.due_in()  # when the next step is due, so the writer wakes then
        except Exception:  # a bug in the background work must not stop live writes
            log.exception("background work failed; it is switched off")
            self.background = None
            self._background_at = None
            return False
        self._background_at = None if due is None else self.clock.monotonic() + max(0.0, due)
        # A partial live batch keeps filling while the backlog drains.
        return stepped or (due is not None and pending > 0)

    def _notify_idle(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _claim(self, batch: Batch, settle: Callable[[], None]) -> bool:
        """Settle the in-flight batch here (`settle` counts it); False if stop() took it already.

        The batch stops being in flight only once it is counted, so `flush()`
        never sees it gone from both the buffer and the counters.
        """
        with self._lock:
            if self._inflight is not batch:
                return False
            try:
                settle()
            finally:
                self._inflight = None
            return True

    def _deliver(self, batch: Batch) -> None:
        """Write or spool `batch`, which the caller has put in flight."""
        if self._outage or self._abort.is_set():
            self._spool_outage(batch)
            return
        failure = self._write_with_retry(batch)
        if failure is None:
            return
        if isinstance(failure, FatalError):
            self._enter_fatal(failure)
        else:
            self._enter_outage(str(failure))
        self._spool_outage(batch)

    def _write_with_retry(self, batch: Batch) -> TransientError | FatalError | None:
        """Write with retries; the error that gave up, or None once settled."""
        delays = self.config.retry_delays
        attempt = 0
        while True:
            started = self.clock.monotonic()
            try:
                result = self.sink.write_batch(batch.rows)
            except FatalError as exc:
                self.metrics.record_failure(str(exc), retry=False)
                return exc
            except TransientError as exc:
                give_up = attempt >= len(delays) or self._stopping.is_set()
                self.metrics.record_failure(str(exc), retry=not give_up)
                if give_up:
                    return exc
                log.warning("batch of %d failed (%s); retry %d in %gs",
                            len(batch), exc, attempt + 1, delays[attempt])
                self.metrics.set_state(WriterState.RETRYING, str(exc))
                if self.clock.wait(self._interrupt, delays[attempt]):
                    return exc  # stopping: do not keep retrying, spool instead
                attempt += 1
                continue
            seconds = self.clock.monotonic() - started
            self._claim(batch, functools.partial(self._account, batch, result, seconds))
            if attempt:
                self.metrics.set_state(WriterState.WRITING)
            return None

    def _account(self, batch: Batch, result: WriteResult, seconds: float) -> None:
        quarantined = 0
        if result.rejected:
            rejected = [(batch.rows[e.index], e.code, e.message) for e in result.rejected]
            quarantined = self._quarantine(rejected)
        self.metrics.record_batch(
            rows=len(batch), written=result.written, duplicates=result.duplicates,
            quarantined=quarantined, write_seconds=seconds, marks=batch.marks,
        )

    def _quarantine(self, rejected: list[tuple[TagValue, str, str]]) -> int:
        for row, code, message in rejected[:3]:
            log.warning("row rejected (%s %s): tag %s at %s", code, message, row.tag, row.ts)
        try:
            return self.spool.quarantine_rows(rejected, source=self.sink.describe())
        except SpoolError as exc:
            log.error("cannot quarantine %d rejected rows: %s", len(rejected), exc)
            self.metrics.record_dropped(len(rejected), "quarantine_error")
            return 0

    def _spool_outage(self, batch: Batch) -> None:
        """Spool a batch; if the spool is full, hold it until room or recovery."""
        while True:
            force = self._abort.is_set() or self._stopping.is_set()
            try:
                self.spool.write_rows(batch.rows, force=force)
            except SpoolFullError:
                # Keep the batch (and so the buffer) in memory; the overflow
                # policy then decides, counted, instead of the disk.
                if self.clock.wait(self._interrupt, 1.0):
                    continue
                if not self._outage:
                    failure = self._write_with_retry(batch)
                    if failure is None:
                        return
                    if isinstance(failure, FatalError):
                        self._enter_fatal(failure)
                    else:
                        self._enter_outage(str(failure))
                continue
            except SpoolError as exc:
                self._log_spool_error(len(batch), exc)
                self._claim(batch, lambda: self.metrics.record_dropped(len(batch), "spool_error"))
                return
            self._claim(batch, lambda: self.metrics.record_spooled(len(batch)))
            return

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
        self._start_probe()

    def _enter_fatal(self, exc: FatalError) -> None:
        hint = f" ({exc.hint})" if exc.hint else ""
        log.error("database error that retrying cannot fix: %s%s; spooling", exc, hint)
        with self._lock:
            self._outage = True
            self._verify_writes = True
        self.fatal_error = self.last_fatal_error = exc
        self.metrics.record_fatal(str(exc))
        if isinstance(exc, LoginRefusedError):
            log.error("not logging in again until restarted: each failed login counts toward locking the "
                      "account; fix the credentials, restart tagwriter, then the spool is replayed")
            return
        self._start_probe()

    def _start_probe(self) -> None:
        with self._lock:
            if self._probe_thread is not None and self._probe_thread.is_alive():
                return
            self._probe_thread = threading.Thread(
                target=self._probe_loop, name="tagwriter-probe", daemon=True
            )
            self._probe_thread.start()

    def _probe_loop(self) -> None:
        # A second fatal error in one run: the database was "fixed" and broke again; probe slowly.
        fatal_again = self._verify_writes and self.metrics.fatal_errors > 1
        delay = self.config.probe_max_interval if fatal_again else self.config.probe_interval
        while not self._interrupt.is_set():
            if self.clock.wait(self._interrupt, delay):
                return
            try:
                self.sink.probe()
                if self._verify_writes:
                    self._check_writable()
            except FatalError as exc:
                if self._verify_writes:  # the probe's finding is the more precise one (table shape)
                    self.fatal_error = self.last_fatal_error = exc
                self.metrics.set_state(WriterState.FAILED, str(exc))
                if isinstance(exc, LoginRefusedError):
                    self.fatal_error = self.last_fatal_error = exc
                    self.metrics.record_fatal(str(exc))
                    log.error("probe: %s; not logging in again until restarted (account lockout)", exc)
                    return
                delay = self.config.probe_max_interval  # needs an operator: no point probing often
                continue
            except TransientError as exc:
                self.metrics.set_state(
                    WriterState.FAILED if self._verify_writes else WriterState.OUTAGE, str(exc)
                )
                delay = min(delay * 2, self.config.probe_max_interval)
                continue
            except Exception as exc:  # a driver error the sink did not classify
                log.exception("probe failed unexpectedly")
                self.metrics.set_state(WriterState.OUTAGE, repr(exc))
                delay = self.config.probe_max_interval
                continue
            self._recover()
            return

    def _check_writable(self) -> None:
        """After a fatal error: raise FatalError unless the table matches and an insert works."""
        sink = self.sink
        if not isinstance(sink, AdminSink):
            return
        info = sink.inspect_table()
        if info is None:
            raise FatalError(f"{sink.describe()}: the table does not exist", hint="run tagwriter init-db")
        diffs = sink.table_differences(info)
        if diffs:
            raise FatalError(f"{sink.describe()}: the table does not match: " + "; ".join(diffs),
                             hint="fix the table (tagwriter init-db --print shows the expected one), "
                                  "then tagwriter replay")
        sink.try_insert()

    def _recover(self) -> None:
        with self._lock:
            self._outage = False
            self._verify_writes = False
            self._probe_thread = None  # a new outage starts a new probe
        self.fatal_error = None
        try:
            self.spool.seal()
        except SpoolError as exc:
            log.error("%s", exc)
        log.info("database reachable again: live writes resume")
        if not self._stopping.is_set() and not self._outage:  # a new failure may have come meanwhile
            self.metrics.set_state(WriterState.WRITING, "")
        if self.on_recovered is not None:
            self.on_recovered()

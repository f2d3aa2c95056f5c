"""`Pipeline`: source -> buffer -> writer -> sink, with spool and metrics, as one object.

    with Pipeline(config) as p:
        p.submit(PollingData("line1", ts, {"line1.temp": 21.5}))

Every submitted value ends as exactly one of: written (or a duplicate of a
row already there), spooled, quarantined, or a counted drop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from tagwriter.buffer import OverflowPolicy, RingBuffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import Config
from tagwriter.errors import PipelineStopped, SpoolError, SpoolFullError
from tagwriter.metrics import Metrics, MetricsSnapshot, WriterState
from tagwriter.models import PollingData, TagValue, check_tag_names
from tagwriter.recovery import SpoolDrain
from tagwriter.sinks import Sink, create_sink
from tagwriter.spool import Spool
from tagwriter.writer import Writer

if TYPE_CHECKING:
    from tagwriter.endpoint import MetricsServer

log = logging.getLogger(__name__)

INTAKE_GRACE = 0.1  # seconds stop() lets a submit in progress finish before closing the buffer on it


class Pipeline:
    """The library's entry point. `submit`, `flush`, `stop` and `snapshot` are thread-safe."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        sink: Sink | None = None,
        clock: Clock = SYSTEM_CLOCK,
        buffer: RingBuffer | None = None,
    ) -> None:
        self.config = config = config or Config()
        self.clock = clock
        self.metrics = Metrics(clock)
        # `buffer`: a prebuilt (e.g. instrumented) RingBuffer; overflow-test injects one.
        self.buffer = buffer if buffer is not None else RingBuffer(
            config.buffer.capacity,
            config.buffer.overflow_policy,
            block_timeout=config.buffer.block_timeout,
            clock=clock,
        )
        b = config.backup
        self.spool = Spool(
            b.directory, b.quarantine_directory,
            roll_rows=b.roll_rows, roll_seconds=b.roll_seconds, max_bytes=b.max_bytes, clock=clock,
        )
        self.sink = sink if sink is not None else create_sink(config.database)
        self.writer = Writer(
            self.buffer, self.sink, self.spool, self.metrics, config.writer, clock=clock
        )
        # The spool drain runs on the writer thread between live batches (see recovery.py).
        self.drain = SpoolDrain(self.spool, self.sink, config, clock=clock)
        if config.backup.auto_replay:
            self.writer.background = self.drain
            self.writer.on_recovered = self.drain.trigger
        self._submit_lock = threading.Lock()
        self._stop_lock = threading.RLock()
        self._hurry = threading.Event()
        self._accepting = False
        self._started = False
        self._stop_result: bool | None = None
        self._consumers: list[QueueConsumer] = []
        self.metrics_server: MetricsServer | None = None  # serves HTTP while running if metrics.port > 0

    # -- life cycle --------------------------------------------------------

    def start(self) -> Pipeline:
        """Recover files a crashed run left, then start the writer. Idempotent."""
        with self._stop_lock:
            if self._started:
                return self
            self._start_metrics_server()
            self._started = True
            try:
                self.spool.recover()
            except OSError as exc:
                log.error("cannot recover partial spool files: %s", exc)
            if self.writer.background is self.drain:
                self.drain.check_target()  # before the first drain step: whose files are these?
            self.writer.start()
            with self._submit_lock:
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
        return self._accepting

    # -- producers ---------------------------------------------------------

    def submit(self, data: PollingData | Iterable[TagValue]) -> bool:
        """Hand over one polling group (or rows); True if every value was taken.

        False means some were dropped (counted) under the `drop-oldest` or
        `block` policy; values handed over while `stop()` closes the buffer
        go to the spool. Raises PipelineStopped after `stop()`, and ValueError
        (nothing taken) for a tag name that is not text or holds a line break.
        """
        rows: Sequence[TagValue]
        if isinstance(data, PollingData):
            check_tag_names(data.values.keys())
            rows = list(data.rows())
        else:
            rows = list(data)
            check_tag_names([row[0] for row in rows])
        if not rows:
            return True
        with self._submit_lock:
            if not self._accepting:
                raise PipelineStopped("the pipeline is stopped; the values were not taken")
            self.metrics.record_submitted(len(rows))
            result = self.buffer.put_many(rows)
            if result.evicted:
                self._spill(result.evicted)
            # stop() closed the buffer meanwhile: the rows go to the spool.
            if result.refused and not self._spool_rows(result.refused, "stopping: cannot spool"):
                return False
        if result.dropped:
            reason = "block_timeout" if self.buffer.policy is OverflowPolicy.BLOCK else "overflow"
            self.metrics.record_dropped(result.dropped, reason)
            return False
        return True

    def _spill(self, rows: list[TagValue]) -> None:
        self.metrics.record_overflow_spilled(len(rows))
        try:
            self.metrics.record_spooled(self.spool.write_rows(rows))
        except SpoolFullError as exc:
            log.error("cannot spill %d values: %s", len(rows), exc)
            self.metrics.record_dropped(len(rows), "spool_full")
        except SpoolError as exc:
            log.error("cannot spill %d values: %s", len(rows), exc)
            self.metrics.record_dropped(len(rows), "spool_error")

    def _spool_rows(self, rows: Sequence[TagValue], what: str) -> bool:
        """Spool rows past the size cap (shutdown); False (counted as dropped) if the disk fails."""
        try:
            self.metrics.record_spooled(self.spool.write_rows(rows, force=True))
            return True
        except SpoolError as exc:
            log.error("%s %d values: %s", what, len(rows), exc)
            self.metrics.record_dropped(len(rows), "spool_error")
            return False

    def consume(self, source: queue.Queue[PollingData | None]) -> QueueConsumer:
        """Start a thread that submits every `PollingData` put on `source`.

        Put `None` on the queue to end the consumer; `stop()` also ends it,
        after submitting what is still queued.
        """
        consumer = QueueConsumer(self, source)
        self._consumers.append(consumer)
        consumer.start()
        return consumer

    # -- flushing and stopping ---------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Write (or spool) everything submitted so far; False if not done in time."""
        return self.writer.flush(timeout)

    def abort(self) -> None:
        """Make a `stop()` in progress give up flushing and spool the rest now.

        Closes the buffer too, so a producer blocked in `submit` spools its rows and returns.
        """
        self._hurry.set()
        self.buffer.close()

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
            for consumer in self._consumers:
                consumer.stop(max(0.0, deadline - self.clock.monotonic()))
            self._end_intake(deadline)
            self.metrics.set_state(WriterState.STOPPING)
            self.writer.request_stop()
            finished = self._wait_writer(deadline)
            if not finished:
                log.warning("shutdown deadline reached: spooling what is still pending")
                self.writer.abort()
            leftovers = self.writer.abandon() if not finished else None
            spooled_ok = self._spool_leftovers(leftovers.rows if leftovers else [])
            try:
                self.spool.seal()
            except SpoolError as exc:
                log.error("%s", exc)
                spooled_ok = False
            if finished:
                self.drain.close()
                self._close_sink()
            self.metrics.set_state(WriterState.STOPPED)
            snap = self.snapshot()
            self._stop_result = spooled_ok and snap.pending == 0
            log.info(
                "stopped: submitted %d = written %d + duplicates %d + spooled %d + "
                "quarantined %d + dropped %d + pending %d",
                snap.submitted, snap.written, snap.duplicates, snap.spooled,
                snap.quarantined, snap.dropped, snap.pending,
            )
            if self.metrics_server is not None:
                self.metrics_server.stop(timeout=1.0)
            return self._stop_result

    def _end_intake(self, deadline: float) -> None:
        """Refuse later submits, then close the buffer; bounded by the deadline (at least a moment).

        A submit in progress normally releases the submit lock within
        microseconds; one blocked for room (policy `block`) is woken by
        `buffer.close()` and spools its rows. Once closed, no row enters the
        buffer, so the lock is only awaited to let that producer finish
        spooling before the spool is sealed.
        """
        self._accepting = False
        got = self._submit_lock.acquire(timeout=INTAKE_GRACE)
        if not got:
            self.buffer.close()
            got = self._submit_lock.acquire(timeout=max(INTAKE_GRACE, deadline - self.clock.monotonic()))
        try:
            self.buffer.close()
        finally:
            if got:
                self._submit_lock.release()
        if not got:
            log.warning("a producer still holds the submit lock; stopping without it")

    def _start_metrics_server(self) -> None:
        """Serve the HTTP endpoint if metrics.port > 0; a taken port raises ConfigError before anything runs."""
        m = self.config.metrics
        if m.port > 0 and self.metrics_server is None:
            from tagwriter.endpoint import MetricsServer  # prometheus_client only when used

            self.metrics_server = MetricsServer(
                self, m.host, m.port, health_max_buffer_pct=m.health_max_buffer_pct
            ).start()

    def _wait_writer(self, deadline: float) -> bool:
        while True:
            remaining = deadline - self.clock.monotonic()
            if self._hurry.is_set() or remaining <= 0.0:
                return self.writer.join(0.0)
            if self.writer.join(min(0.05, remaining)):
                return True

    def _spool_leftovers(self, inflight: list[TagValue]) -> bool:
        rows = list(inflight)
        while len(self.buffer):
            rows.extend(self.buffer.drain(len(self.buffer) or 1).rows)
        if not rows:
            return True
        return self._spool_rows(rows, "cannot spool at shutdown")

    def _close_sink(self) -> None:
        """Close the sink, bounded: a hung driver must not hold up the exit."""
        closer = threading.Thread(target=self.sink.close, name="tagwriter-close", daemon=True)
        closer.start()
        closer.join(2.0)

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """Every figure now, as one immutable object."""
        files, size = self.spool.stats()
        return self.metrics.snapshot(
            buffer_size=len(self.buffer),
            buffer_capacity=self.buffer.capacity,
            inflight=self.writer.inflight,
            waiting=self.buffer.waiting,
            backup_files=files,
            backup_bytes=size,
            spool_full=self.spool.backup.full,
            **self.drain.status(),
        )


class QueueConsumer:
    """Submits `PollingData` from an upstream `queue.Queue` (how a polling system plugs in)."""

    def __init__(self, pipeline: Pipeline, source: queue.Queue[PollingData | None]) -> None:
        self.pipeline = pipeline
        self.source = source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tagwriter-queue", daemon=True)
        self.consumed = 0
        self.rejected = 0  # items refused by submit (bad tag names), kept in quarantine

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.source.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is None:
                return
            try:
                self.pipeline.submit(item)
            except PipelineStopped:
                log.error("queue consumer: pipeline stopped with values still queued")
                return
            except (ValueError, TypeError) as exc:  # a bad item: keep it in quarantine, go on
                self.rejected += 1
                where = f"queue item {self.consumed + self.rejected}"
                log.error("%s: %s (kept in quarantine)", where, exc)
                try:
                    self.pipeline.spool.quarantine_lines([(where, str(exc), repr(item))])
                except SpoolError as err:
                    log.error("%s: cannot quarantine: %s", where, err)
                continue
            self.consumed += 1

    def stop(self, timeout: float) -> bool:
        """Submit what is queued, then end; True if done within `timeout`."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

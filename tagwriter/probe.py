"""The outage probe: a thread that checks the database until it answers, then reports recovery.

It probes on a `Backoff` schedule (`probe_interval`, then doubling up to
`probe_max_interval`) with jitter, so a fleet of gateways does not hit a
recovering database in lock-step. After a *fatal* error it must also prove
that writes can work (`check_writable`: for an `AdminSink` the table's shape
and a rolled-back insert), and a failing check backs off to the cap at once:
only an operator can fix it, so a misconfigured table does not flip between
failed and writing. A refused login ends the probe for good (each attempt
counts toward locking the account).
"""

from __future__ import annotations

import logging
import random as _random
import threading
from collections.abc import Callable

from tagwriter.backoff import Backoff
from tagwriter.checks import verify_table
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.errors import FatalError, LoginRefusedError, TransientError
from tagwriter.metrics import Metrics, WriterState
from tagwriter.sinks.base import AdminSink, Sink

log = logging.getLogger(__name__)

PROBE_JITTER = 0.2  # each probe delay is drawn from (80 %, 100 %] of its nominal value


def check_writable(sink: Sink) -> None:
    """After a fatal error: raise FatalError unless the table matches and an insert works."""
    if not isinstance(sink, AdminSink):
        return
    verify_table(sink, sink.inspect_table(), name=sink.describe())
    sink.try_insert()


class OutageProbe:
    """Runs one probe thread at a time; `start` is idempotent while one runs. Thread-safe.

    `on_recovered()` runs on the probe thread once the database answers (and,
    after a fatal error, writes work); `on_fatal(error)` when a probe after a
    fatal error finds why writes cannot work (the more precise finding, such
    as the table's shape). `stop` (an Event) ends the probe and its waits.
    """

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        interval: float,
        max_interval: float,
        stop: threading.Event,
        on_recovered: Callable[[], None],
        on_fatal: Callable[[FatalError], None],
        clock: Clock = SYSTEM_CLOCK,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self._stop = stop
        self._on_recovered = on_recovered
        self._on_fatal = on_fatal
        self._schedule = Backoff([interval], cap=max_interval, jitter=PROBE_JITTER, random=random)
        self._slow = Backoff([max_interval], cap=max_interval, jitter=PROBE_JITTER, random=random)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._verify_writes = False

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def start(self, *, verify_writes: bool = False) -> None:
        """Probe until the database is back; `verify_writes` (sticky until then) also checks writes."""
        with self._lock:
            self._verify_writes = self._verify_writes or verify_writes
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="tagwriter-probe", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # A second fatal error in one run: the database was "fixed" and broke again; probe slowly.
        fatal_again = self._verify_writes and self.metrics.fatal_errors > 1
        delays = iter(self._slow if fatal_again else self._schedule)
        while True:
            if self.clock.wait(self._stop, next(delays)):
                return
            verify = self._verify_writes
            try:
                self.sink.probe()
                if verify:
                    check_writable(self.sink)
            except FatalError as exc:
                refused = isinstance(exc, LoginRefusedError)
                if verify or refused:  # the probe's finding is the more precise one (table shape)
                    self._on_fatal(exc)
                self.metrics.set_state(WriterState.FAILED, str(exc))
                if refused:
                    self.metrics.record_fatal(str(exc))
                    log.error("probe: %s; not logging in again until restarted (account lockout)", exc)
                    return
                delays = iter(self._slow)  # needs an operator: no point probing often
            except TransientError as exc:
                self.metrics.set_state(WriterState.FAILED if verify else WriterState.OUTAGE, str(exc))
            except Exception as exc:  # a driver error the sink did not classify
                log.exception("probe failed unexpectedly")
                self.metrics.set_state(WriterState.OUTAGE, repr(exc))
                delays = iter(self._slow)
            else:
                with self._lock:
                    self._thread = None  # a new outage starts a new probe
                    self._verify_writes = False
                self._on_recovered()
                return

"""Counters, rolling windows and latency percentiles; `snapshot()` reads them all.

Every stage records here; the live panel, the HTTP endpoint, the log line and
the load-test report all read the same immutable `MetricsSnapshot`.
Thread-safe: one lock guards every update and the snapshot.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.redact import redact

WINDOW_5M = 300.0
WINDOW_1H = 3600.0


class WriterState(StrEnum):
    STARTING = "starting"
    WRITING = "writing"
    RETRYING = "retrying"
    OUTAGE = "outage"
    FAILED = "failed"  # a fatal (configuration) error: not retried
    STOPPING = "stopping"
    STOPPED = "stopped"


def _latency_bounds() -> list[float]:
    """Bucket upper bounds: 100 µs to ~2 h, 12 per power of ten (~21% wide)."""
    return [1e-4 * 10 ** (i / 12) for i in range(0, 12 * 8 + 1)]


LATENCY_BOUNDS = _latency_bounds()


class LatencyHistogram:
    """Weighted log-bucket histogram; percentiles by interpolation in a bucket."""

    __slots__ = ("counts", "max", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def add(self, seconds: float, weight: int = 1) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += weight
        self.total += weight
        self.sum += seconds * weight
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.total += other.total
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in seconds, never above the true max."""
        if self.total == 0:
            return 0.0
        rank = q / 100.0 * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                lo = LATENCY_BOUNDS[i - 1] if i > 0 else 0.0
                hi = LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else self.max
                frac = (rank - seen) / c
                return min(self.max, lo + (hi - lo) * frac)
            seen += c
        return self.max


class Series:
    """Sums per one-second bucket over a horizon: rates and windowed totals."""

    __slots__ = ("buckets", "horizon")

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self.buckets: deque[list[float]] = deque()  # [second, sum, count]

    def add(self, now: float, value: float, count: int = 1) -> None:
        sec = math.floor(now)
        if self.buckets and self.buckets[-1][0] == sec:
            b = self.buckets[-1]
            b[1] += value
            b[2] += count
        else:
            self.buckets.append([sec, value, count])
        self._prune(now)

    def _prune(self, now: float) -> None:
        limit = now - self.horizon
        while self.buckets and self.buckets[0][0] < limit:
            self.buckets.popleft()

    def totals(self, now: float, window: float) -> tuple[float, int]:
        """(sum of values, number of events) in the last `window` seconds."""
        self._prune(now)
        limit = now - window
        s, n = 0.0, 0
        for sec, value, count in reversed(self.buckets):
            if sec < limit:
                break
            s += value
            n += int(count)
        return s, n


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Every figure at one instant. `pending` = buffered + in flight + waiting
    (rows of a `submit` blocked for room under the `block` policy).

    When nothing is in motion, submitted == written + duplicates + spooled +
    quarantined + dropped + pending. `fatal_errors` counts fatal database
    errors since start; it stays set after a recovery (the exit code uses it).
    """

    uptime_s: float
    state: str
    last_error: str
    buffer_size: int
    buffer_capacity: int
    buffer_utilization_pct: float
    inflight: int
    pending: int
    submitted: int
    written: int
    duplicates: int
    spooled: int
    quarantined: int
    dropped: int
    dropped_by_reason: dict[str, int]
    bad_input: int
    batches_ok: int
    batches_failed: int
    retries: int
    avg_batch_size_5m: float
    avg_write_latency_5m_s: float
    p99_write_latency_5m_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_max_s: float
    rate_in_per_s: float
    rate_out_per_s: float
    overflow_1h: int
    overflow_rate_1h_pct: float
    backup_files: int
    backup_bytes: int
    spool_full: bool
    held_spool_full: int  # values held in flight because the spool is full (outage with backup.max_bytes reached)
    outages: int
    backlog_rows: int = 0
    backlog_files: int = 0
    drain_rate_per_s: float = 0.0
    drain_eta_s: float | None = None
    bad_input_lost: int = 0  # malformed input lines that could not be kept (quarantine not writable)
    waiting: int = 0
    fatal_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accounted(self) -> int:
        """Values whose fate is settled or still pending."""
        return (
            self.written + self.duplicates + self.spooled + self.quarantined
            + self.dropped + self.pending
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Metrics:
    """The pipeline's counters and windows. Thread-safe."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock.monotonic()
        self.submitted = 0
        self.written = 0
        self.duplicates = 0
        self.spooled = 0
        self.quarantined = 0
        self.dropped: dict[str, int] = {}
        self.bad_input = 0  # kept in quarantine
        self.bad_input_lost = 0  # not kept: the quarantine write failed
        self.batches_ok = 0
        self.batches_failed = 0
        self.retries = 0
        self.outages = 0
        self.fatal_errors = 0  # sticky: a recovery does not reset it
        self.last_fatal_error = ""
        self.state = WriterState.STARTING
        self.last_error = ""
        self.latency = LatencyHistogram()  # since start
        self._latency_slots: deque[tuple[int, LatencyHistogram]] = deque()  # 10 s slots
        self._batches = Series(WINDOW_5M)  # value = rows, count = batches
        self._write_latency = Series(WINDOW_5M)  # value = seconds, count = batches
        self._write_latency_hist: deque[tuple[int, LatencyHistogram]] = deque()
        self._in = Series(60.0)
        self._out = Series(60.0)
        self._overflow = Series(WINDOW_1H)
        self._submitted_1h = Series(WINDOW_1H)

    # -- recording ---------------------------------------------------------

    def record_submitted(self, n: int) -> None:
        with self._lock:
            self.submitted += n
            now = self._clock.monotonic()
            self._in.add(now, n)
            self._submitted_1h.add(now, n)

    def record_dropped(self, n: int, reason: str) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            self._overflow.add(self._clock.monotonic(), n)

    def record_overflow_spilled(self, n: int) -> None:
        """Values evicted under `spill`: they count in the overflow rate, not as lost."""
        with self._lock:
            self._overflow.add(self._clock.monotonic(), n)

    def record_spooled(self, n: int) -> None:
        with self._lock:
            self.spooled += n

    def record_quarantined(self, n: int) -> None:
        with self._lock:
            self.quarantined += n

    def record_bad_input(self, n: int = 1, *, lost: int = 0) -> None:
        """`n` malformed input lines kept in quarantine, `lost` that could not be kept."""
        with self._lock:
            self.bad_input += n
            self.bad_input_lost += lost

    def record_batch(
        self,
        *,
        rows: int,
        written: int,
        duplicates: int,
        quarantined: int,
        write_seconds: float,
        marks: Iterable[tuple[float, int]],
    ) -> None:
        """One batch committed: counts, write latency, per-value end-to-end latency."""
        with self._lock:
            now = self._clock.monotonic()
            self.written += written
            self.duplicates += duplicates
            self.quarantined += quarantined
            self.batches_ok += 1
            self._batches.add(now, rows)
            self._write_latency.add(now, write_seconds)
            self._slot(self._write_latency_hist, now).add(write_seconds)
            self._out.add(now, written + duplicates + quarantined)
            slot = self._slot(self._latency_slots, now)
            for t_submit, count in marks:
                self.latency.add(now - t_submit, count)
                slot.add(now - t_submit, count)

    def record_failure(self, error: str, *, retry: bool) -> None:
        error = redact(error)  # last_error leaves the process (endpoint, panel, reports)
        with self._lock:
            self.batches_failed += 1
            if retry:
                self.retries += 1
            self.last_error = error

    def record_fatal(self, error: str) -> None:
        """A fatal (configuration) database error: state failed, counted for good."""
        error = redact(error)
        with self._lock:
            self.fatal_errors += 1
            self.last_fatal_error = error
            self.state = WriterState.FAILED
            self.last_error = error

    def set_state(self, state: WriterState, error: str | None = None) -> None:
        error = None if error is None else redact(error)
        with self._lock:
            if state is WriterState.OUTAGE and self.state is not WriterState.OUTAGE:
                self.outages += 1
            self.state = state
            if error is not None:
                self.last_error = error

    @staticmethod
    def _slot(slots: deque[tuple[int, LatencyHistogram]], now: float) -> LatencyHistogram:
        key = int(now // 10)
        if not slots or slots[-1][0] != key:
            slots.append((key, LatencyHistogram()))
            while slots and slots[0][0] <= key - WINDOW_5M / 10:
                slots.popleft()
        return slots[-1][1]

    # -- reading -----------------------------------------------------------

    def window_latency(self, window: float = WINDOW_5M) -> LatencyHistogram:
        """End-to-end latency over the last `window` seconds (10 s resolution)."""
        with self._lock:
            return self._merge(self._latency_slots, self._clock.monotonic(), window)

    def cumulative_latency(self) -> LatencyHistogram:
        """A consistent copy of the end-to-end latency histogram since start."""
        copy = LatencyHistogram()
        with self._lock:
            copy.merge(self.latency)
        return copy

    @staticmethod
    def _merge(
        slots: deque[tuple[int, LatencyHistogram]], now: float, window: float
    ) -> LatencyHistogram:
        merged = LatencyHistogram()
        oldest = int((now - window) // 10)
        for key, hist in slots:
            if key > oldest:
                merged.merge(hist)
        return merged

    def snapshot(
        self,
        *,
        buffer_size: int = 0,
        buffer_capacity: int = 0,
        inflight: int = 0,
        waiting: int = 0,
        backup_files: int = 0,
        backup_bytes: int = 0,
        spool_full: bool = False,
        held_spool_full: int = 0,
        **extra: Any,
    ) -> MetricsSnapshot:
        with self._lock:
            now = self._clock.monotonic()
            rows_5m, batches_5m = self._batches.totals(now, WINDOW_5M)
            wl_sum, wl_n = self._write_latency.totals(now, WINDOW_5M)
            wl_hist = self._merge(self._write_latency_hist, now, WINDOW_5M)
            lat = self._merge(self._latency_slots, now, WINDOW_5M)
            rate_window = min(10.0, max(1.0, now - self.started))
            in_sum, _ = self._in.totals(now, rate_window)
            out_sum, _ = self._out.totals(now, rate_window)
            over_sum, _ = self._overflow.totals(now, WINDOW_1H)
            sub_sum, _ = self._submitted_1h.totals(now, WINDOW_1H)
            dropped = sum(self.dropped.values())
            backlog = {k: extra.pop(k) for k in list(extra) if k.startswith(("backlog_", "drain_"))}
            return MetricsSnapshot(
                uptime_s=now - self.started,
                state=str(self.state),
                last_error=self.last_error,
                buffer_size=buffer_size,
                buffer_capacity=buffer_capacity,
                buffer_utilization_pct=100.0 * buffer_size / buffer_capacity if buffer_capacity else 0.0,
                inflight=inflight,
                pending=buffer_size + inflight + waiting,
                submitted=self.submitted,
                written=self.written,
                duplicates=self.duplicates,
                spooled=self.spooled,
                quarantined=self.quarantined,
                dropped=dropped,
                dropped_by_reason=dict(self.dropped),
                bad_input=self.bad_input,
                bad_input_lost=self.bad_input_lost,
                batches_ok=self.batches_ok,
                batches_failed=self.batches_failed,
                retries=self.retries,
                avg_batch_size_5m=rows_5m / batches_5m if batches_5m else 0.0,
                avg_write_latency_5m_s=wl_sum / wl_n if wl_n else 0.0,
                p99_write_latency_5m_s=wl_hist.percentile(99),
                latency_p50_s=lat.percentile(50),
                latency_p95_s=lat.percentile(95),
                latency_p99_s=lat.percentile(99),
                latency_max_s=lat.max,
                rate_in_per_s=in_sum / rate_window,
                rate_out_per_s=out_sum / rate_window,
                overflow_1h=int(over_sum),
                overflow_rate_1h_pct=100.0 * over_sum / sub_sum if sub_sum else 0.0,
                backup_files=backup_files,
                backup_bytes=backup_bytes,
                spool_full=spool_full,
                held_spool_full=held_spool_full,
                outages=self.outages,
                waiting=waiting,
                fatal_errors=self.fatal_errors,
                extra=extra,
                **backlog,
            )

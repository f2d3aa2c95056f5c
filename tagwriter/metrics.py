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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.redact import redact

WINDOW_5M = 300.0
WINDOW_1H = 3600.0
RATE_WINDOW = 10.0  # seconds the in/out rates look back


class WriterState(StrEnum):
    STARTING = "starting"
    WRITING = "writing"
    RETRYING = "retrying"
    OUTAGE = "outage"
    FAILED = "failed"  # a fatal (configuration) error: not retried
    STOPPING = "stopping"
    STOPPED = "stopped"


LATENCY_BUCKETS_PER_DECADE = 24


def _latency_bounds() -> list[float]:
    """Bucket upper bounds: 100 µs to ~2.8 h, 24 per power of ten (10% wide).

    Prometheus' `histogram_quantile` interpolates linearly inside a bucket, so
    its answer can be off by up to one bucket's width: at 12 a decade (21%) the
    p99 at plant load read 14.6% high; at 24 at most 8.9% whatever the
    latencies' place on the bucket grid (tests/test_prometheus.py). Decades and
    half-decades are the same floats as at 12 a decade (2i / 24 == i / 12).
    """
    per = LATENCY_BUCKETS_PER_DECADE
    return [1e-4 * 10 ** (i / per) for i in range(0, per * 8 + 1)]


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

    def add_many(self, pairs: Iterable[tuple[float, int]]) -> None:
        """`add(seconds, weight)` for each pair, in one call (a batch's groups: one pair each)."""
        counts, bounds, where = self.counts, LATENCY_BOUNDS, bisect.bisect_left
        total, total_s, top = self.total, self.sum, self.max
        for seconds, weight in pairs:
            seconds = max(0.0, seconds)
            counts[where(bounds, seconds)] += weight
            total += weight
            total_s += seconds * weight
            if seconds > top:
                top = seconds
        self.total, self.sum, self.max = total, total_s, top

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

    def copy(self) -> LatencyHistogram:
        twin = LatencyHistogram()
        twin.counts = list(self.counts)
        twin.total, twin.sum, twin.max = self.total, self.sum, self.max
        return twin


class WindowHistogram:
    """A LatencyHistogram of the last `window` seconds, in 10 s slots, with their running total.

    Reading copies the total instead of merging the slots: with 24 buckets a
    decade, merging 30 slots per snapshot took it from 262 to 501 µs (5 minutes
    of plant load; the panel asks several times a second); with the total, 145 µs.
    An expired slot is taken off the total once. The max is the largest of the live slots'.
    """

    SLOT = 10.0

    __slots__ = ("slots", "total", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.slots: deque[tuple[int, LatencyHistogram]] = deque()
        self.total = LatencyHistogram()

    def add(self, now: float, seconds: float, weight: int = 1) -> None:
        key = int(now // self.SLOT)
        if not self.slots or self.slots[-1][0] != key:
            self._expire(now)
            self.slots.append((key, LatencyHistogram()))
        self.slots[-1][1].add(seconds, weight)
        self.total.add(seconds, weight)

    def add_many(self, now: float, pairs: Sequence[tuple[float, int]]) -> None:
        """`add(now, seconds, weight)` for each `(seconds, weight)` pair, in one call."""
        key = int(now // self.SLOT)
        if not self.slots or self.slots[-1][0] != key:
            self._expire(now)
            self.slots.append((key, LatencyHistogram()))
        self.slots[-1][1].add_many(pairs)
        self.total.add_many(pairs)

    def _expire(self, now: float) -> None:
        oldest = int((now - self.window) // self.SLOT)
        while self.slots and self.slots[0][0] <= oldest:
            old = self.slots.popleft()[1]
            total = self.total
            total.counts = [a - b for a, b in zip(total.counts, old.counts, strict=True)]
            total.total -= old.total
            total.sum = max(0.0, total.sum - old.sum) if total.total else 0.0

    def histogram(self, now: float) -> LatencyHistogram:
        """The values of the last `window` seconds (10 s resolution), as a copy."""
        self._expire(now)
        merged = self.total.copy()
        merged.max = max((h.max for _, h in self.slots), default=0.0)
        return merged


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


class Rate:
    """Values per second over the last `window` seconds, exact for a steady stream however lumpy.

    Values come in lumps (a poll group, a committed batch). The values of the
    last W seconds over W are off by up to a lump at either edge (and by the
    unfilled part of the current second: 5-10 % low). Instead: the values that
    came after the window's first lump, over the time from that lump to the
    last one. When the stream slows or stops, the time since the last lump
    beyond the usual gap counts too, so the rate falls, to 0 once no lump is
    left. One bucket per second (values, lumps, first lump's time and size,
    last lump's time): memory stays bounded whatever the call rate.
    """

    __slots__ = ("buckets", "start", "window")

    def __init__(self, start: float, window: float = RATE_WINDOW) -> None:
        self.start = start
        self.window = window
        self.buckets: deque[list[float]] = deque()  # [second, values, lumps, first_t, first_n, last_t]

    def add(self, now: float, n: int) -> None:
        """`n` values at `now`; a time before the last lump's counts as the last lump's (time never goes back)."""
        if n <= 0:
            return
        if self.buckets and now < self.buckets[-1][5]:
            now = self.buckets[-1][5]
        sec = math.floor(now)
        if self.buckets and self.buckets[-1][0] == sec:
            b = self.buckets[-1]
            b[1] += n
            b[2] += 1
            b[5] = now
        else:
            self.buckets.append([sec, n, 1, now, n, now])
            self._prune(now)

    def _prune(self, now: float) -> None:
        oldest = math.floor(now) - self.window  # lumps between `window` and `window` + 1 s old still count
        while self.buckets and self.buckets[0][0] < oldest:
            self.buckets.popleft()

    def per_s(self, now: float) -> float:
        """The rate at `now`; 0.0 when the window holds nothing."""
        self._prune(now)
        if not self.buckets:
            return 0.0
        values = sum(b[1] for b in self.buckets)
        lumps = sum(b[2] for b in self.buckets)
        first_t, first_n, last_t = self.buckets[0][3], self.buckets[0][4], self.buckets[-1][5]
        covered = last_t - first_t
        if lumps < 2 or covered <= 0:  # one lump: no gap to measure the stream by; the window, or the run so far
            return values / min(self.window, max(1.0, now - self.start))
        gap = covered / (lumps - 1)
        return (values - first_n) / max(covered, now - first_t - gap)


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
    # The durable queue (buffer.durability = "disk"); zero in memory.
    durability: str = "memory"
    queue_values: int = 0  # durable on disk, not yet released (written, spooled, ...)
    queue_bytes: int = 0
    queue_max_bytes: int = 0
    queue_pending: int = 0  # submitted, not yet durable (waiting for the next group commit)
    queue_oldest_age_s: float = 0.0
    queue_acknowledged: int = 0  # made durable since start
    queue_recovered: int = 0  # found queued at start (counted in submitted)
    queue_corrupt: int = 0  # in records that failed their CRC (counted in dropped)
    queue_torn_tails: int = 0
    queue_commits: int = 0
    queue_fsync_p50_s: float | None = None
    queue_fsync_p99_s: float | None = None
    queue_disk_full: bool = False
    # The plant source's state (tagwriter.sources.base.SourceStatus as a dict); None for sources without one.
    source: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What a figure stands on: a latency without samples is no figure, a state or a commit has an age.
    state_age_s: float = 0.0  # seconds since the state last changed (monotonic)
    last_commit_age_s: float | None = None  # seconds since a batch last committed; None before the first
    write_latency_samples_5m: int = 0  # batches behind p99_write_latency_5m_s (0: no figure)
    latency_samples_5m: int = 0  # values behind latency_p50_s .. latency_max_s (0: no figure)
    # The spool's folder (from Pipeline.snapshot): its cap and the room left on its file system.
    spool_max_bytes: int = 0  # backup.max_bytes; 0 = no cap
    spool_disk_free_bytes: int | None = None  # free on the folder's file system; None = not known

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
        self._state_since = self.started
        self._last_commit: float | None = None
        self.last_error = ""
        self.latency = LatencyHistogram()  # since start
        self._latency_window = WindowHistogram(WINDOW_5M)
        self._batches = Series(WINDOW_5M)  # value = rows, count = batches
        self._write_latency = Series(WINDOW_5M)  # value = seconds, count = batches
        self._write_latency_window = WindowHistogram(WINDOW_5M)
        self.write_durations = LatencyHistogram()  # seconds per committed batch write, since start
        self._in = Rate(self.started)
        self._out = Rate(self.started)
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
            self._last_commit = now
            self._batches.add(now, rows)
            self._write_latency.add(now, write_seconds)
            self._write_latency_window.add(now, write_seconds)
            self.write_durations.add(write_seconds)
            # Counted from when its write began: batches form on the stream's beat, write times vary.
            self._out.add(now - write_seconds, written + duplicates + quarantined)
            waited = [(now - t_submit, count) for t_submit, count in marks]
            self.latency.add_many(waited)
            self._latency_window.add_many(now, waited)

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
            self._enter(WriterState.FAILED)
            self.last_error = error

    def set_state(self, state: WriterState, error: str | None = None) -> None:
        error = None if error is None else redact(error)
        with self._lock:
            if state is WriterState.OUTAGE and self.state is not WriterState.OUTAGE:
                self.outages += 1
            self._enter(state)
            if error is not None:
                self.last_error = error

    def _enter(self, state: WriterState) -> None:
        """Set the state (under the lock); its age restarts only when it changes."""
        if state is not self.state:
            self.state = state
            self._state_since = self._clock.monotonic()

    # -- reading -----------------------------------------------------------

    def window_latency(self) -> LatencyHistogram:
        """End-to-end latency over the last 5 minutes (10 s resolution)."""
        with self._lock:
            return self._latency_window.histogram(self._clock.monotonic())

    def cumulative_latency(self) -> LatencyHistogram:
        """A consistent copy of the end-to-end latency histogram since start."""
        with self._lock:
            return self.latency.copy()

    def cumulative_write_durations(self) -> LatencyHistogram:
        """A consistent copy of the seconds per committed batch write since start."""
        with self._lock:
            return self.write_durations.copy()

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
            wl_hist = self._write_latency_window.histogram(now)
            lat = self._latency_window.histogram(now)
            over_sum, _ = self._overflow.totals(now, WINDOW_1H)
            sub_sum, _ = self._submitted_1h.totals(now, WINDOW_1H)
            dropped = sum(self.dropped.values())
            routed = ("backlog_", "drain_", "queue_", "spool_")  # prefixes of fields the pipeline fills
            backlog = {k: extra.pop(k) for k in list(extra) if k.startswith(routed)}
            for key in ("durability", "source"):
                if key in extra:
                    backlog[key] = extra.pop(key)
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
                rate_in_per_s=self._in.per_s(now),
                rate_out_per_s=self._out.per_s(now),
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
                state_age_s=now - self._state_since,
                last_commit_age_s=None if self._last_commit is None else now - self._last_commit,
                write_latency_samples_5m=wl_hist.total,
                latency_samples_5m=lat.total,
                **backlog,
            )

"""Metrics: counters, rolling windows on an injected clock, latency percentiles, the snapshot."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from clocks import ManualClock

from tagwriter.metrics import (
    LATENCY_BOUNDS,
    LatencyHistogram,
    Metrics,
    MetricsSnapshot,
    WindowHistogram,
    WriterState,
)

BUCKET = 10 ** (1 / 12)  # ratio between histogram bucket bounds (~1.21)


def batch(m: Metrics, clock: ManualClock, rows: int, *, seconds: float = 0.01, latency: float = 0.5,
          written: int | None = None, duplicates: int = 0, quarantined: int = 0) -> None:
    now = clock.monotonic()
    m.record_batch(
        rows=rows, written=rows - duplicates - quarantined if written is None else written,
        duplicates=duplicates, quarantined=quarantined, write_seconds=seconds,
        marks=[(now - latency, rows)],
    )


# -- counters ---------------------------------------------------------------------


def test_counters_add_up_and_snapshot_reports_them() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    m.record_submitted(100)
    m.record_submitted(20)
    batch(m, clock, 60, duplicates=3, quarantined=2)
    m.record_spooled(20)
    m.record_dropped(4, "overflow")
    m.record_dropped(1, "spool_error")
    m.record_dropped(0, "overflow")  # no-op
    m.record_quarantined(3)
    m.record_bad_input(2)
    m.record_failure("TEST-1: down", retry=True)
    m.record_failure("TEST-1: down", retry=False)
    snap = m.snapshot(buffer_size=7, buffer_capacity=100, inflight=5)
    assert (snap.submitted, snap.written, snap.duplicates) == (120, 55, 3)
    assert (snap.spooled, snap.quarantined, snap.dropped) == (20, 5, 5)
    assert snap.dropped_by_reason == {"overflow": 4, "spool_error": 1}
    assert (snap.bad_input, snap.batches_ok, snap.batches_failed, snap.retries) == (2, 1, 2, 1)
    assert snap.pending == 12
    assert snap.last_error == "TEST-1: down"
    # submitted = written + duplicates + spooled + quarantined + dropped + pending
    assert snap.accounted == 55 + 3 + 20 + 5 + 5 + 12 == 100
    assert snap.accounted != snap.submitted  # 20 values unaccounted here on purpose: the sum is real


def test_counter_identity_holds_for_a_consistent_history() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    m.record_submitted(1000)
    batch(m, clock, 500, duplicates=10, quarantined=4)
    batch(m, clock, 200)
    m.record_spooled(150)
    m.record_dropped(50, "overflow")
    snap = m.snapshot(buffer_size=90, buffer_capacity=1000, inflight=10)
    assert snap.accounted == snap.submitted == 1000


def test_state_changes_and_outage_count() -> None:
    m = Metrics(ManualClock())
    assert m.snapshot().state == "starting"
    m.set_state(WriterState.WRITING)
    m.set_state(WriterState.OUTAGE, "down")
    m.set_state(WriterState.OUTAGE, "still down")  # same outage
    assert m.snapshot().outages == 1
    m.set_state(WriterState.WRITING, "")
    m.set_state(WriterState.RETRYING, "x")
    m.set_state(WriterState.OUTAGE, "down again")
    snap = m.snapshot()
    assert snap.outages == 2 and snap.state == "outage" and snap.last_error == "down again"
    m.set_state(WriterState.STOPPING)
    assert m.snapshot().last_error == "down again"  # None keeps the last error


def test_buffer_utilization_and_backup_figures_pass_through() -> None:
    m = Metrics(ManualClock())
    snap = m.snapshot(buffer_size=250, buffer_capacity=1000, backup_files=3, backup_bytes=12345, spool_full=True)
    assert snap.buffer_utilization_pct == pytest.approx(25.0)
    assert (snap.buffer_size, snap.buffer_capacity) == (250, 1000)
    assert (snap.backup_files, snap.backup_bytes, snap.spool_full) == (3, 12345, True)
    assert m.snapshot(buffer_size=0, buffer_capacity=0).buffer_utilization_pct == 0.0


def test_concurrent_recording_is_exact() -> None:
    clock = ManualClock()
    m = Metrics(clock)

    def work() -> None:
        for _ in range(2000):
            m.record_submitted(3)
            m.record_spooled(1)
            m.record_dropped(1, "overflow")
            batch(m, clock, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    snap = m.snapshot()
    assert (snap.submitted, snap.spooled, snap.dropped, snap.written, snap.batches_ok) == (
        24_000, 8000, 8000, 8000, 8000
    )
    assert snap.accounted == snap.submitted


# -- rolling windows --------------------------------------------------------------------


def test_five_minute_average_batch_size_and_write_latency() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    batch(m, clock, 100, seconds=0.10)
    clock.advance(10)
    batch(m, clock, 300, seconds=0.30)
    snap = m.snapshot()
    assert snap.avg_batch_size_5m == pytest.approx(200.0)
    assert snap.avg_write_latency_5m_s == pytest.approx(0.20)
    clock.advance(289)  # first batch 299 s old: still inside the window
    assert m.snapshot().avg_batch_size_5m == pytest.approx(200.0)
    clock.advance(2)  # first batch 301 s old: out
    snap = m.snapshot()
    assert snap.avg_batch_size_5m == pytest.approx(300.0)
    assert snap.avg_write_latency_5m_s == pytest.approx(0.30)
    clock.advance(300)
    snap = m.snapshot()
    assert snap.avg_batch_size_5m == 0.0 and snap.avg_write_latency_5m_s == 0.0
    assert snap.batches_ok == 2  # counters are not windowed


def test_p99_write_latency_over_five_minutes() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    for i in range(100):
        batch(m, clock, 10, seconds=0.010 if i < 98 else 2.0)
    p99 = m.snapshot().p99_write_latency_5m_s
    assert 0.010 < p99 <= 2.0
    clock.advance(400)
    batch(m, clock, 10, seconds=0.010)
    assert m.snapshot().p99_write_latency_5m_s <= 0.010  # the slow ones aged out


def test_one_hour_overflow_rate() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    m.record_submitted(1000)
    m.record_dropped(10, "overflow")
    m.record_overflow_spilled(5)  # spilled values count in the rate but are not lost
    snap = m.snapshot()
    assert snap.overflow_1h == 15 and snap.dropped == 10
    assert snap.overflow_rate_1h_pct == pytest.approx(1.5)
    clock.advance(1800)
    m.record_submitted(1000)
    assert m.snapshot().overflow_rate_1h_pct == pytest.approx(0.75)
    clock.advance(1801)  # the first submit and the overflow are older than an hour
    snap = m.snapshot()
    assert snap.overflow_1h == 0 and snap.overflow_rate_1h_pct == 0.0
    assert snap.dropped == 10 and snap.submitted == 2000


def test_rates_in_and_out() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    clock.advance(20)  # past the startup ramp: rates are over the last 10 s
    for _ in range(10):
        m.record_submitted(100)
        batch(m, clock, 50)
        clock.advance(1)
    snap = m.snapshot()
    assert snap.rate_in_per_s == pytest.approx(100.0, rel=0.15)
    assert snap.rate_out_per_s == pytest.approx(50.0, rel=0.15)
    assert snap.uptime_s == pytest.approx(30.0)


# -- latency percentiles -----------------------------------------------------------------


def test_end_to_end_latency_percentiles() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    now = clock.monotonic()
    # 1,000 values with latencies 1 ms .. 1000 ms, in one batch of many marks
    marks = [(now - i / 1000, 1) for i in range(1, 1001)]
    m.record_batch(rows=1000, written=1000, duplicates=0, quarantined=0, write_seconds=0.05, marks=marks)
    snap = m.snapshot()
    for q, got in ((50, snap.latency_p50_s), (95, snap.latency_p95_s), (99, snap.latency_p99_s)):
        assert q / 100 / BUCKET <= got <= q / 100 * BUCKET, (q, got)
    assert snap.latency_max_s == pytest.approx(1.0)
    assert snap.latency_p50_s < snap.latency_p95_s <= snap.latency_p99_s <= snap.latency_max_s


def test_latency_weights_count_values_not_batches() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    now = clock.monotonic()
    # 990 values waited 10 ms, 10 values waited 5 s: the p50 is the 10 ms crowd, p99 not the 5 s tail
    m.record_batch(rows=1000, written=1000, duplicates=0, quarantined=0, write_seconds=0.01,
                   marks=[(now - 0.010, 990), (now - 5.0, 10)])
    snap = m.snapshot()
    assert snap.latency_p50_s <= 0.010 * BUCKET
    assert snap.latency_p99_s <= 0.010 * BUCKET
    assert snap.latency_max_s == pytest.approx(5.0)
    assert m.cumulative_latency().total == 1000


def test_latency_window_forgets_old_values_but_cumulative_keeps_them() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    batch(m, clock, 10, latency=8.0)
    clock.advance(400)
    batch(m, clock, 10, latency=0.2)
    snap = m.snapshot()
    assert snap.latency_max_s == pytest.approx(0.2)
    assert m.window_latency().total == 10
    cumulative = m.cumulative_latency()
    assert cumulative.total == 20 and cumulative.max == pytest.approx(8.0)


def test_histogram_percentiles_edge_cases() -> None:
    h = LatencyHistogram()
    assert h.percentile(50) == 0.0 and h.max == 0.0
    h.add(0.3)
    assert 0.3 / BUCKET <= h.percentile(50) <= 0.3
    assert h.percentile(100) == pytest.approx(0.3)  # never above the true max
    h.add(-1.0)  # clock skew: counted as 0
    assert h.total == 2 and h.percentile(1) >= 0.0
    huge = LatencyHistogram()
    huge.add(LATENCY_BOUNDS[-1] * 10, weight=3)  # beyond the last bound: the overflow bucket
    assert LATENCY_BOUNDS[-1] < huge.percentile(99) <= huge.max
    assert huge.percentile(100) == pytest.approx(LATENCY_BOUNDS[-1] * 10)
    merged = LatencyHistogram()
    merged.merge(h)
    merged.merge(huge)
    assert merged.total == 5 and merged.max == huge.max


# -- the snapshot --------------------------------------------------------------------------

ISSUE_FIELDS = {
    "buffer_size", "buffer_capacity", "buffer_utilization_pct", "batches_ok", "batches_failed",
    "written", "duplicates", "spooled", "quarantined", "dropped", "submitted", "avg_batch_size_5m",
    "avg_write_latency_5m_s", "p99_write_latency_5m_s", "latency_p50_s", "latency_p95_s", "latency_p99_s",
    "latency_max_s", "backup_files", "backup_bytes", "state", "last_error", "overflow_rate_1h_pct", "pending",
}


def test_snapshot_is_complete() -> None:
    names = {f.name for f in dataclasses.fields(MetricsSnapshot)}
    assert names >= ISSUE_FIELDS, ISSUE_FIELDS - names
    data = Metrics(ManualClock()).snapshot().as_dict()
    assert set(data) >= ISSUE_FIELDS


def test_snapshot_is_immutable_and_detached() -> None:
    clock = ManualClock()
    m = Metrics(clock)
    m.record_dropped(2, "overflow")
    snap = m.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.written = 5  # type: ignore[misc]
    snap.dropped_by_reason["overflow"] = 999  # a copy: the metrics are untouched
    m.record_dropped(1, "overflow")
    m.record_submitted(10)
    later = m.snapshot()
    assert later.dropped_by_reason == {"overflow": 3}
    assert snap.submitted == 0 and snap.dropped == 2  # the old snapshot did not move


def test_snapshot_extra_fields_go_to_backlog_or_extra() -> None:
    m = Metrics(ManualClock())
    snap = m.snapshot(backlog_rows=40, backlog_files=2, drain_rate_per_s=10.0, drain_eta_s=4.0, replayed=7)
    assert (snap.backlog_rows, snap.backlog_files, snap.drain_rate_per_s, snap.drain_eta_s) == (40, 2, 10.0, 4.0)
    assert snap.extra == {"replayed": 7}


def test_waiting_rows_are_pending_and_fatal_errors_stay_counted() -> None:
    m = Metrics(ManualClock())
    m.record_submitted(30)
    m.record_spooled(10)
    snap = m.snapshot(buffer_size=5, inflight=5, waiting=10)
    assert (snap.pending, snap.waiting) == (20, 10) and snap.accounted == snap.submitted == 30
    m.record_fatal("no such column")
    assert m.snapshot().state == "failed" and m.snapshot().fatal_errors == 1
    m.set_state(WriterState.WRITING, "")  # a recovery does not reset the count
    assert m.snapshot().fatal_errors == 1 and m.last_fatal_error == "no such column"


def test_add_many_is_add_for_each_pair() -> None:
    """A batch's groups go into the histograms in one call: the same counts, sum, max and window as one by one."""
    import random

    rng = random.Random(7)
    pairs = [(rng.choice([-0.5, 0.0, 1e-5, 0.3, 2.0, 700.0]) * rng.random(), rng.randint(1, 500)) for _ in range(300)]
    one, many = LatencyHistogram(), LatencyHistogram()
    w_one, w_many = WindowHistogram(300.0), WindowHistogram(300.0)
    for k in range(0, 300, 30):
        now = 1000.0 + k * 0.7
        for seconds, weight in pairs[k:k + 30]:
            one.add(seconds, weight)
            w_one.add(now, seconds, weight)
        many.add_many(pairs[k:k + 30])
        w_many.add_many(now, pairs[k:k + 30])
    assert (many.counts, many.total, many.max) == (one.counts, one.total, one.max)
    assert many.sum == pytest.approx(one.sum)
    a, b = w_one.histogram(1300.0), w_many.histogram(1300.0)
    assert (a.counts, a.total, a.max) == (b.counts, b.total, b.max) and a.total > 0

"""The live panel: a pure function of a MetricsSnapshot, rendered into a fixed-width capture console."""

from __future__ import annotations

import dataclasses
import threading

from rich.console import Console

from tagwriter.metrics import Metrics, MetricsSnapshot
from tagwriter.ui.panel import render_panel


class StepClock:
    """A clock that only moves when told to (no real sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.now += timeout
        return event.is_set()


def text_of(snapshot: MetricsSnapshot, target: str = "") -> str:
    console = Console(width=100, color_system=None, record=True)
    console.print(render_panel(snapshot, target=target))
    return console.export_text()


def busy_snapshot() -> MetricsSnapshot:
    """A snapshot from real Metrics calls: 1,200 submitted, one batch written, 70% buffer."""
    clock = StepClock()
    m = Metrics(clock)
    m.record_submitted(1200)
    clock.now += 0.25
    m.record_batch(rows=500, written=490, duplicates=5, quarantined=5, write_seconds=0.012,
                   marks=[(clock.now - 0.4, 500)])
    m.record_spooled(30)
    m.record_dropped(7, "overflow")
    clock.now += 1.75
    return m.snapshot(buffer_size=700, buffer_capacity=1000, backup_files=2, backup_bytes=123_456)


def test_panel_shows_every_figure() -> None:
    snap = dataclasses.replace(busy_snapshot(), state="writing", uptime_s=3723.0)
    out = text_of(snap, target="sqlite:///plant.db table tag_values")
    assert "tagwriter → sqlite:///plant.db table tag_values" in out
    assert "700 / 1,000 (70.0%)" in out
    assert "━" in out  # the fill bar
    assert "avg 12.0 ms" in out and "p99 12.0 ms" in out
    assert "end-to-end" in out
    assert "in 600/s" in out and "out 250/s" in out  # over the 2 s since start
    for figure in ("written 490", "duplicate 5", "spooled 30", "quarantined 5", "dropped 7"):
        assert figure in out
    assert "writing" in out
    assert "2 files, 120.6 KiB" in out
    assert "1h 02m 03s" in out
    assert all(len(line) <= 100 for line in out.splitlines())


def test_fill_bar_length_follows_the_buffer() -> None:
    base = busy_snapshot()
    empty = text_of(dataclasses.replace(base, buffer_size=0, buffer_utilization_pct=0.0))
    full = text_of(dataclasses.replace(base, buffer_size=1000, buffer_utilization_pct=100.0))
    half = text_of(dataclasses.replace(base, buffer_size=500, buffer_utilization_pct=50.0))
    assert empty.count("━") == 0
    assert full.count("━") == 30
    assert 14 <= half.count("━") <= 16


def test_rates_and_latencies_come_from_the_snapshot() -> None:
    snap = dataclasses.replace(
        busy_snapshot(), rate_in_per_s=1234.4, rate_out_per_s=987.0,
        avg_write_latency_5m_s=0.0042, p99_write_latency_5m_s=0.250, latency_p99_s=1.5,
    )
    out = text_of(snap)
    assert "in 1,234/s" in out and "out 987/s" in out
    assert "avg 4.2 ms" in out and "p99 250 ms" in out
    assert "p99 1,500 ms" in out


def test_state_and_last_error_shown_and_long_errors_shortened() -> None:
    error = "DPY-6005: cannot connect to database. " + "x" * 500
    out = text_of(dataclasses.replace(busy_snapshot(), state="outage", last_error=error))
    assert "outage" in out
    assert "last error: DPY-6005: cannot connect to database." in out
    assert "x" * 300 not in out.replace("\n", "").replace("│", "").replace(" ", "")
    stopping = text_of(dataclasses.replace(busy_snapshot(), state="stopping", last_error=""))
    assert "stopping" in stopping and "last error" not in stopping


def test_backlog_shown_only_when_non_zero() -> None:
    quiet = text_of(busy_snapshot())
    assert "backlog" not in quiet
    draining = text_of(dataclasses.replace(
        busy_snapshot(), backlog_rows=250_000, backlog_files=3, drain_rate_per_s=5000.0, drain_eta_s=50.0,
    ))
    assert "250,000 rows in 3 files" in draining
    assert "draining 5,000/s" in draining
    assert "eta 50.0s" in draining


def test_bad_input_and_full_spool_shown() -> None:
    out = text_of(dataclasses.replace(busy_snapshot(), bad_input=12, spool_full=True))
    assert "12 lines quarantined" in out
    assert "FULL" in out


def test_pure_function_same_snapshot_same_output() -> None:
    snap = busy_snapshot()
    assert text_of(snap, target="x") == text_of(snap, target="x")


def test_empty_buffer_capacity_zero_does_not_crash() -> None:
    snap = Metrics(StepClock()).snapshot()
    out = text_of(snap)
    assert "0 / 0 (0.0%)" in out
    assert "starting" in out

"""The live panel: a pure function of a MetricsSnapshot, rendered into a fixed-width capture console."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from tagwriter.metrics import Metrics, MetricsSnapshot, WriterState
from tagwriter.ui.panel import BAR_WIDTH, EMPTY, FILL, PANEL_WIDTH, render_panel
from tests.clocks import StepClock


def text_of(snapshot: MetricsSnapshot, target: str = "", width: int = 100) -> str:
    console = Console(width=width, color_system=None, record=True)
    console.print(render_panel(snapshot, target=target))
    return console.export_text()


def flat(text: str) -> str:
    """The panel's text with every run of blanks as one space: figures sit in fixed-width fields."""
    return " ".join(text.split())


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
    text = text_of(snap, target="sqlite:///plant.db table tag_values")
    out = flat(text)
    assert "tagwriter → sqlite:///plant.db table tag_values" in out
    assert "700 / 1,000 ( 70.0%)" in out
    assert FILL in out  # the fill bar
    assert "avg 12.0 ms" in out and "p99 12.0 ms" in out
    assert "end-to-end p50 400 ms p99 400 ms" in out
    assert "in 600/s" in out and "out 250/s" in out  # one lump each: over the 2 s since start
    for figure in ("written 490", "duplicate 5", "spooled 30", "quarantined 5", "dropped 7"):
        assert figure in out
    assert "writing" in out
    assert "2 files, 120.6 KiB" in out
    assert "1h 02m 03s" in out
    assert all(len(line) <= 100 for line in text.splitlines())


def test_fill_bar_length_follows_the_buffer() -> None:
    base = busy_snapshot()
    empty = text_of(dataclasses.replace(base, buffer_size=0, buffer_utilization_pct=0.0))
    full = text_of(dataclasses.replace(base, buffer_size=1000, buffer_utilization_pct=100.0))
    half = text_of(dataclasses.replace(base, buffer_size=500, buffer_utilization_pct=50.0))
    assert (empty.count(FILL), empty.count(EMPTY)) == (0, BAR_WIDTH)
    assert (full.count(FILL), full.count(EMPTY)) == (BAR_WIDTH, 0)
    assert (half.count(FILL), half.count(EMPTY)) == (BAR_WIDTH // 2, BAR_WIDTH // 2)


def test_rates_and_latencies_come_from_the_snapshot() -> None:
    snap = dataclasses.replace(
        busy_snapshot(), rate_in_per_s=1234.4, rate_out_per_s=987.0,
        avg_write_latency_5m_s=0.0042, p99_write_latency_5m_s=0.250, latency_p99_s=1.5,
    )
    out = flat(text_of(snap))
    assert "in 1,234/s" in out and "out 987/s" in out
    assert "avg 4.2 ms" in out and "p99 250 ms" in out
    assert "p99 1,500 ms" in out


def test_state_and_last_error_shown_and_long_errors_shortened() -> None:
    error = "DPY-6005: cannot connect to database. " + "x" * 500
    out = text_of(dataclasses.replace(busy_snapshot(), state="outage", last_error=error))
    assert "outage" in out
    assert "last error DPY-6005: cannot connect to database." in flat(out)
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
    assert "replayed" not in quiet  # no drain has written anything yet


def test_bad_input_and_full_spool_shown() -> None:
    out = text_of(dataclasses.replace(busy_snapshot(), bad_input=12, spool_full=True))
    assert "12 lines quarantined" in out
    assert "FULL" in out


def test_pure_function_same_snapshot_same_output() -> None:
    snap = busy_snapshot()
    assert text_of(snap, target="x") == text_of(snap, target="x")


def test_empty_buffer_capacity_zero_does_not_crash() -> None:
    snap = Metrics(StepClock()).snapshot()
    out = flat(text_of(snap))
    assert "0 / 0 ( 0.0%)" in out
    assert "starting" in out


# -- truthful figures (issue 16) ------------------------------------------------------------


def test_no_latency_samples_show_a_dash_not_zero() -> None:
    out = flat(text_of(Metrics(StepClock()).snapshot(buffer_capacity=1000)))
    assert "avg – p99 – (5 min) no commit yet" in out
    assert "end-to-end p50 – p99 – (submit to commit" in out
    assert "0.0 ms" not in out


def test_an_outage_shows_how_old_the_last_commit_is() -> None:
    clock = StepClock()
    m = Metrics(clock)
    m.set_state(WriterState.WRITING)
    m.record_batch(rows=10, written=10, duplicates=0, quarantined=0, write_seconds=0.25, marks=[(clock.now - 1, 10)])
    clock.now += 60
    m.set_state(WriterState.OUTAGE, "database down")
    clock.now += 62.5
    out = flat(text_of(m.snapshot(buffer_capacity=1000)))
    assert "state outage for 1m 02s" in out
    assert "p99 250 ms (5 min) last commit 2m 02s ago" in out  # the p99 is two minutes old, and says so
    assert "outages 1" in out


def test_the_rows_operators_look_for() -> None:
    clock = StepClock()
    m = Metrics(clock)
    m.record_submitted(10_000)
    m.record_dropped(150, "overflow")
    m.record_failure("timeout", retry=True)
    m.record_failure("timeout", retry=True)
    m.record_failure("timeout", retry=False)
    m.set_state(WriterState.OUTAGE, "down")
    snap = m.snapshot(
        buffer_capacity=1000, backup_files=3, backup_bytes=5 << 20, spool_max_bytes=10 << 30,
        spool_disk_free_bytes=41 << 30, replayed=12_400, replay_duplicates=100, replay_quarantined=2,
        replayed_files=3,
    )
    out = flat(text_of(snap))
    assert "batches ok 0 failed 3 retries 2 outages 1" in out
    assert "overflow 150 values in 1 h, 1.50% of submitted" in out
    assert "backup 3 files, 5.0 MiB of 10.0 GiB disk free 41.0 GiB" in out
    assert "replayed written 12,400 duplicate 100 quarantined 2 files done 3" in out


def test_disk_queue_and_source_rows() -> None:
    snap = dataclasses.replace(
        busy_snapshot(), durability="disk", queue_values=1200, queue_bytes=64_000, queue_oldest_age_s=1.5,
        source={"kind": "mqtt", "endpoint": "tcp://127.0.0.1:1883", "connected": False, "messages": 12,
                "last_message_age": 3.2, "acks_pending": 4, "redeliveries": 1, "reconnects": 2},
    )
    text = text_of(snap)
    out = flat(text)
    assert "queue 1,200 values, 62.5 KiB on disk, oldest 1.5s" in out
    assert "source mqtt tcp://127.0.0.1:1883 DISCONNECTED 12 messages, last 3.2s ago" in out
    assert "reconnects 2" in out
    # A row longer than the box wraps under its own text, not under the labels.
    source = text.splitlines()[next(i for i, line in enumerate(text.splitlines()) if "DISCONNECTED" in line) + 1]
    assert source.startswith("│" + " " * 16) and source.strip("│ ")


def test_the_fill_bar_reads_right_without_colour() -> None:
    """NO_COLOR, and a colour screen copied as text: the empty part is drawn, and drawn differently."""
    base = busy_snapshot()
    for console in (Console(width=100, no_color=True, force_terminal=True, record=True),
                    Console(width=100, color_system="truecolor", force_terminal=True, record=True)):
        for size, filled in ((0, 0), (500, BAR_WIDTH // 2), (1000, BAR_WIDTH)):
            snap = dataclasses.replace(base, buffer_size=size, buffer_utilization_pct=size / 10)
            console.print(render_panel(snap))
            copied = console.export_text(styles=False)
            assert (copied.count(FILL), copied.count(EMPTY)) == (filled, BAR_WIDTH - filled), (size, copied)


def test_the_box_keeps_its_width_from_frame_to_frame() -> None:
    quiet = Metrics(StepClock()).snapshot(buffer_capacity=100_000)
    frames = [
        quiet,
        busy_snapshot(),
        dataclasses.replace(busy_snapshot(), rate_in_per_s=123_456.0, rate_out_per_s=9.5, written=1_234_567_890,
                            p99_write_latency_5m_s=12.5, last_error="ORA-03113: end-of-file " * 20),
        dataclasses.replace(busy_snapshot(), state="outage", backlog_rows=250_000, backlog_files=3,
                            drain_rate_per_s=5000.0, drain_eta_s=50.0, uptime_s=400_000.0),
    ]
    for width, expected in ((200, PANEL_WIDTH), (100, 100), (80, 80)):
        widths = {len(line) for frame in frames for line in text_of(frame, width=width).splitlines() if line}
        assert widths == {expected}, (width, widths)

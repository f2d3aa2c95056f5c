"""Automatic recovery: the spool drains into a real SQLite table after an outage.

End to end through `Pipeline`: the database is a real SQLite file behind
`MemorySink` fault injection (down = outage mode; block = a write held in
flight). `SpoolDrain` alone is driven step by step with a fake clock for its
pacing, back-off and backlog figures. Waits are bounded polls on a
condition, never a sleep-and-hope.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from waits import wait_until

from tagwriter.buffer import RingBuffer
from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.errors import TransientError
from tagwriter.metrics import Metrics, MetricsSnapshot, WriterState
from tagwriter.models import PollingData, TagValue, format_ts
from tagwriter.pipeline import Pipeline
from tagwriter.recovery import ADAPTIVE_DUTY, RATE_WINDOW, TARGET_FILE, SpoolDrain
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import Spool
from tagwriter.ui.panel import render_panel
from tagwriter.writer import Writer
from tests.clocks import ManualClock, StepClock

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_config(tmp_path: Path, **backup: Any) -> Config:
    config = Config(
        writer=WriterConfig(batch_size=100, flush_interval=0.05, retry_delays=[0.01, 0.01],
                            probe_interval=0.02, probe_max_interval=0.05, shutdown_timeout=5.0),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(**{"directory": str(tmp_path / "backup"),
                               "quarantine_directory": str(tmp_path / "backup" / "quarantine"),
                               "roll_rows": 300, "roll_seconds": 0.2, **backup}),
    )
    validate(config)
    return config


class Feed:
    """Polling groups of 10 tags with distinct timestamps; remembers every value submitted."""

    def __init__(self, prefix: str = "live") -> None:
        self.prefix = prefix
        self.polls = 0
        self.values: list[TagValue] = []

    def submit(self, p: Pipeline, polls: int = 1) -> None:
        for _ in range(polls):
            values = {f"{self.prefix}.{i}": self.polls + i / 10 for i in range(10)}
            data = PollingData("g", T0 + self.polls * 0.001, values)
            self.values += data.rows()
            assert p.submit(data)
            self.polls += 1


def table(db: Path) -> list[tuple[str, str, float | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT tag_name, ts, value FROM tag_values ORDER BY tag_name, ts").fetchall()


def as_table(values: Sequence[TagValue]) -> list[tuple[str, str, float | None]]:
    return sorted((v.tag, format_ts(v.ts_us), v.value) for v in values)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("tagwriter-*.csv*"))  # completed and .partial


def adds_up(s: MetricsSnapshot) -> bool:
    return s.submitted == s.written + s.duplicates + s.spooled + s.quarantined + s.dropped + s.pending


def outage(p: Pipeline, sink: MemorySink, feed: Feed, polls: int) -> None:
    """Take the database down, feed `polls` polls, and wait until they are all spooled."""
    assert p.flush(5)  # what came before is written
    sink.go_down()
    target = p.snapshot().spooled + polls * 10
    feed.submit(p, polls)
    wait_until(lambda: p.snapshot().spooled >= target, "the outage values to be spooled")
    assert p.in_outage


# -- end to end ----------------------------------------------------------------------


def test_after_an_outage_every_value_is_in_the_table_exactly_once_and_the_spool_is_empty(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    feed = Feed()
    with Pipeline(cfg, sink=sink) as p:
        feed.submit(p, 20)
        assert p.flush(5)
        outage(p, sink, feed, 150)
        assert p.snapshot().state == WriterState.OUTAGE
        sink.come_up()
        feed.submit(p, 30)  # live values keep coming while the backlog drains
        wait_until(lambda: not p.in_outage, "the probe to see the database back")
        feed.submit(p, 30)
        wait_until(lambda: not spool_files(tmp_path / "backup") and p.snapshot().extra["replayed"] >= 1500,
                   "the drain to empty the spool")
        assert p.flush(5)
        s = p.snapshot()
    assert adds_up(s) and s.pending == 0
    assert s.submitted == len(feed.values) == 2300
    assert s.spooled >= 1500
    assert s.extra["replayed"] + s.extra["replay_duplicates"] == s.spooled  # every spooled value came back
    assert (s.backlog_rows, s.backlog_files) == (0, 0)
    assert table(tmp_path / "tags.db") == as_table(feed.values)
    assert not spool_files(tmp_path / "backup")
    assert sorted((tmp_path / "backup" / "replayed").glob("tagwriter-*.csv"))


def test_a_stop_in_the_middle_of_the_drain_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # replay_rate 1 value/s: after the first backlog batch the next is due in 100 s,
    # so the stop surely lands in the middle of the drain.
    cfg = make_config(tmp_path, replay_rate=1.0)
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    feed = Feed()
    p = Pipeline(cfg, sink=sink).start()
    feed.submit(p, 5)
    outage(p, sink, feed, 100)
    sink.come_up()
    wait_until(lambda: p.snapshot().extra["replayed"] >= 100, "the first backlog batch")
    assert p.stop()
    first = p.snapshot()
    assert first.extra["replayed"] == 100 and first.extra["replayed_files"] == 0
    left = spool_files(tmp_path / "backup")
    assert left and all(f.suffix == ".csv" for f in left)  # the interrupted file stays, completed
    assert len(table(tmp_path / "tags.db")) == 50 + 100

    # The next run resumes: the interrupted file from its start (100 duplicates), then the rest.
    cfg2 = make_config(tmp_path)
    with Pipeline(cfg2, sink=SqliteSink(tmp_path / "tags.db")) as p2:
        wait_until(lambda: not spool_files(tmp_path / "backup"), "the second run to drain the spool")
        second = p2.snapshot()
    assert second.extra["replay_duplicates"] == 100
    assert second.extra["replayed"] == first.spooled - 100
    assert table(tmp_path / "tags.db") == as_table(feed.values)


def test_spool_files_left_by_an_earlier_run_are_drained_at_start(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    earlier = Feed("earlier")
    spool = Spool(backup, backup / "quarantine", roll_rows=200)
    for k in range(0, 65):
        earlier.polls = k
        data = PollingData("g", T0 + k, {f"earlier.{i}": k + i / 10 for i in range(10)})
        earlier.values += data.rows()
        spool.write_rows(list(data.rows()))
    # A crash: the last file is still .partial, its last line cut in half.
    partial = next(backup.glob("tagwriter-*.csv.partial"))
    text = partial.read_text()
    partial.write_text(text + "earlier.99,2026-01-01T00:0")
    live = Feed()
    with Pipeline(make_config(tmp_path), sink=SqliteSink(tmp_path / "tags.db")) as p:
        live.submit(p, 10)
        wait_until(lambda: not spool_files(backup), "the drain of the earlier run's files")
        assert p.flush(5)
        s = p.snapshot()
    assert s.extra["replayed"] == 650 and s.extra["replay_bad_lines"] == 1
    assert s.written == 100 and adds_up(s)
    assert table(tmp_path / "tags.db") == as_table(earlier.values + live.values)
    quarantined = "".join(f.read_text() for f in (backup / "quarantine").glob("quarantine-*.csv"))
    assert "truncated line (no line end)" in quarantined and "earlier.99,2026-01-01T00:0" in quarantined


def test_spool_files_made_for_another_database_are_not_drained_into_this_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scratch run in the same folder must not pour another database's backlog into its own."""
    backup = tmp_path / "backup"
    earlier = Feed("earlier")
    with Pipeline(make_config(tmp_path), sink=SqliteSink(tmp_path / "production.db")) as p:
        pass  # records the spool's target: production.db
    assert "production.db" in (backup / TARGET_FILE).read_text()
    spool = Spool(backup, backup / "quarantine")
    data = PollingData("g", T0, {f"earlier.{i}": float(i) for i in range(10)})
    earlier.values += data.rows()
    spool.write_rows(list(data.rows()))
    spool.seal()
    left = spool_files(backup)
    live = Feed()
    with caplog.at_level("WARNING", logger="tagwriter.recovery"), \
            Pipeline(make_config(tmp_path), sink=SqliteSink(tmp_path / "scratch.db")) as p:
        live.submit(p, 3)
        assert p.flush(5)
        wait_until(lambda: p._drain._next_scan > 0, "the drain's first look at the folder")
        assert p.snapshot().backlog_files == 0  # not this run's backlog
    assert table(tmp_path / "scratch.db") == as_table(live.values)  # only its own values
    assert spool_files(backup) == left
    assert any("spooled for sqlite:///" in r.message and "production.db" in r.message for r in caplog.records)
    with Pipeline(make_config(tmp_path), sink=SqliteSink(tmp_path / "production.db")) as p:
        wait_until(lambda: not spool_files(backup), "the drain into the database the files were made for")
    assert table(tmp_path / "production.db") == as_table(earlier.values)


def test_auto_replay_false_leaves_the_spool_alone(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, auto_replay=False)
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    feed = Feed()
    with Pipeline(cfg, sink=sink) as p:
        assert p._writer.background is None and p._writer.on_recovered is None  # internals: no such API
        outage(p, sink, feed, 50)
        sink.come_up()
        wait_until(lambda: not p.in_outage, "the probe to see the database back")
        feed.submit(p, 10)
        assert p.flush(5)
    s = p.snapshot()
    assert s.extra["replayed"] == 0 and s.spooled == 500
    assert len(table(tmp_path / "tags.db")) == 100  # only the live values after the outage
    left = spool_files(tmp_path / "backup")
    assert left and sum(len(f.read_text().splitlines()) - 1 for f in left) == 500
    assert s.backlog_files == len(left)  # still shown as backlog, for `tagwriter replay`


# -- live data first -----------------------------------------------------------------


class Recorder:
    """Records every write as ('live' | 'backlog', rows); can hold the next backlog write."""

    kind = "recorder"

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.writes: list[tuple[str, int]] = []
        self.hold_next_backlog = False
        self.held = threading.Event()
        self.release = threading.Event()

    def open(self) -> None:
        self.inner.open()

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        kind = "backlog" if rows[0].tag.startswith("earlier") else "live"
        self.writes.append((kind, len(rows)))
        if kind == "backlog" and self.hold_next_backlog:
            self.hold_next_backlog = False
            self.held.set()
            assert self.release.wait(10)
        return self.inner.write_batch(rows)

    def probe(self) -> None:
        self.inner.probe()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return "recorder"


def test_a_live_batch_waits_behind_at_most_one_backlog_batch(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    spool = Spool(backup, backup / "quarantine", roll_rows=1000)
    spool.write_rows([TagValue(f"earlier.{i % 10}", 1_000_000 * (i // 10), float(i)) for i in range(5000)])
    spool.seal()
    rec = Recorder(SqliteSink(tmp_path / "tags.db"))
    rec.hold_next_backlog = True
    feed = Feed()
    cfg = make_config(tmp_path, replay_rate=0.0)
    with Pipeline(cfg, sink=rec) as p:
        assert rec.held.wait(10)  # the drain's first batch is in the database call
        feed.submit(p, 30)  # three full live batches become due meanwhile
        mark = len(rec.writes)
        rec.release.set()
        wait_until(lambda: sum(n for k, n in rec.writes if k == "live") >= 300, "the live batches")
        # ... and while a later backlog batch is held, a partial live batch ages past flush_interval
        rec.release.clear()
        rec.held.clear()
        rec.hold_next_backlog = True
        assert rec.held.wait(10)
        submitted = time.monotonic()
        feed.submit(p, 3)
        wait_until(lambda: time.monotonic() - submitted >= cfg.writer.flush_interval, "the live values to be due")
        mark2 = len(rec.writes)
        rec.release.set()
        wait_until(lambda: not spool_files(backup), "the drain to finish")
        assert p.flush(5)
    assert rec.writes[mark - 1] == ("backlog", 100)  # the held one
    assert rec.writes[mark:mark + 3] == [("live", 100)] * 3  # live first, all three, before any more backlog
    assert rec.writes[mark2:mark2 + 1] == [("live", 30)]
    assert sum(n for k, n in rec.writes if k == "backlog") == 5000
    assert len(table(tmp_path / "tags.db")) == 5000 + 330


# -- SpoolDrain step by step, with a fake clock -----------------------------------------


class TimedSink(MemorySink):
    """Every write takes `seconds` on the fake clock."""

    def __init__(self, inner: Sink, clock: StepClock, seconds: float) -> None:
        super().__init__(inner=inner)
        self.clock = clock
        self.seconds = seconds

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        self.clock.now += self.seconds
        return super().write_batch(rows)


def drain_env(tmp_path: Path, rows: int = 2000, **backup: Any) -> tuple[SpoolDrain, TimedSink, StepClock, Spool]:
    cfg = make_config(tmp_path, **backup)
    spool = Spool(cfg.backup.directory, roll_rows=1000)
    for i in range(0, rows, 100):
        spool.write_rows([TagValue(f"earlier.{k % 10}", 1_000_000 * (k // 10), float(k)) for k in range(i, i + 100)])
    spool.seal()
    clock = StepClock(start=500.0, wall=T0)
    sink = TimedSink(SqliteSink(tmp_path / "tags.db"), clock, 0.01)
    sink.open()
    return SpoolDrain(spool, sink, cfg, clock=clock), sink, clock, spool


def test_adaptive_pacing_gives_the_drain_half_the_writer_time(tmp_path: Path) -> None:
    drain, sink, clock, _ = drain_env(tmp_path)
    assert drain.due_in() == 0.0
    drain.step()  # opens the first file and writes its first batch
    assert sink.commits == 1
    # the batch took 0.01 s: the next is due after as long again (ADAPTIVE_DUTY = 0.5)
    assert ADAPTIVE_DUTY == 0.5
    assert drain.due_in() == pytest.approx(0.01)
    clock.now += 0.005
    assert drain.due_in() == pytest.approx(0.005)


def test_replay_rate_paces_the_drain(tmp_path: Path) -> None:
    drain, _sink, _clock, _ = drain_env(tmp_path, replay_rate=1000.0)
    drain.due_in()
    drain.step()
    assert drain.due_in() == pytest.approx(100 / 1000.0 - 0.01)  # 100 rows at 1000/s, minus the write time


def test_a_failing_backlog_write_backs_off_and_retries_the_same_batch(tmp_path: Path) -> None:
    drain, sink, clock, _ = drain_env(tmp_path)
    sink.fail_times(4, lambda: TransientError("gone", code="X"))
    delays: list[float] = []
    for _ in range(4):
        start = clock.now
        drain.due_in()
        drain.step()
        due = drain.due_in()
        assert due is not None  # the failed batch is kept for a retry
        delays.append(round(due + clock.now - start, 6))
        clock.now += due
    # the writer's retry delays (0.01, 0.01) first, then the probe's capped doubling (0.02, 0.04, ... <= 0.05)
    assert delays == [0.01, 0.01, 0.02, 0.04]
    while (due := drain.due_in()) is not None:
        clock.now += due
        drain.step()
    assert drain.replayed == 2000 and drain.duplicates == 0
    assert len(table(tmp_path / "tags.db")) == 2000


def test_status_reports_backlog_rows_files_rate_and_eta(tmp_path: Path) -> None:
    drain, _sink, clock, spool = drain_env(tmp_path, rows=3000, replay_rate=100.0)
    files = spool.backup.files()
    assert len(files) == 3
    s = drain.status()
    assert s["backlog_files"] == 3
    assert s["backlog_rows"] == pytest.approx(3000, rel=0.02)  # estimated from the bytes
    assert (s["drain_rate_per_s"], s["drain_eta_s"]) == (0.0, None)
    first = clock.now
    for _ in range(5):
        clock.now += drain.due_in() or 0.0
        drain.step()
    s = drain.status()
    assert s["replayed"] == 500
    assert s["backlog_files"] == 3
    assert s["backlog_rows"] == pytest.approx(2500, rel=0.02)
    # 100 rows/s: five batches of 100 in 4.01 s (averaged over the drain's own time, not RATE_WINDOW)
    assert clock.now - first == pytest.approx(4.01)
    assert s["drain_rate_per_s"] == pytest.approx(500 / 4.01)
    clock.now += 2 * RATE_WINDOW  # stalled: the rate falls to 0
    assert drain.status()["drain_rate_per_s"] == 0.0
    assert s["drain_eta_s"] == pytest.approx(s["backlog_rows"] / s["drain_rate_per_s"])
    while (due := drain.due_in()) is not None:
        clock.now += due
        drain.step()
    s = drain.status()
    assert (s["backlog_rows"], s["backlog_files"], s["replayed_files"], s["replayed"]) == (0, 0, 3, 3000)
    assert s["drain_eta_s"] is None


def test_the_panel_shows_the_backlog_of_a_running_drain(tmp_path: Path) -> None:
    drain, _sink, clock, _ = drain_env(tmp_path, rows=3000, replay_rate=1000.0)
    for _ in range(3):
        clock.now += drain.due_in() or 0.0
        drain.step()
    st = drain.status()
    snap = Metrics(clock).snapshot(buffer_capacity=100, **st)  # as Pipeline.snapshot() passes it
    assert snap.backlog_files == 3 and snap.extra["replayed"] == 300
    console = Console(width=120, color_system=None, record=True)
    console.print(render_panel(snap))
    text = console.export_text()
    assert f"{st['backlog_rows']:,} rows in 3 files" in text
    assert f"draining {st['drain_rate_per_s']:,.0f}/s" in text and "eta " in text


def test_a_file_that_is_not_a_spool_file_is_left_alone_and_the_rest_drains(tmp_path: Path) -> None:
    drain, _sink, clock, spool = drain_env(tmp_path, rows=200)
    odd = spool.directory / "tagwriter-00000000T000000000000Z-1-0001.csv"  # sorts first
    odd.write_text("something,else\n1,2\n")
    while (due := drain.due_in()) is not None:
        clock.now += due
        drain.step()
    assert drain.replayed == 200
    assert odd.exists() and odd.read_text() == "something,else\n1,2\n"
    assert drain.status()["backlog_files"] == 0  # refused files are not counted as backlog


def test_rows_the_database_rejects_while_draining_go_to_quarantine_with_the_error(tmp_path: Path) -> None:
    drain, sink, clock, spool = drain_env(tmp_path, rows=500)
    sink.reject_if(lambda r: r.tag == "earlier.7", "SQLITE_CONSTRAINT_CHECK", "CHECK constraint failed: value")
    while (due := drain.due_in()) is not None:
        clock.now += due
        drain.step()
    s = drain.status()
    assert (s["replayed"], s["replay_quarantined"], s["replayed_files"]) == (450, 50, 1)
    lines = [line for f in spool.quarantine_directory.glob("quarantine-*.csv")
             for line in f.read_text().splitlines()[1:]]
    assert len(lines) == 50
    assert all(line.startswith("earlier.7,") and ",SQLITE_CONSTRAINT_CHECK,CHECK constraint failed: value," in line
               and "auto replay" in line for line in lines)
    assert not spool.backup.files()


# -- pacing on the real writer thread, in simulated time -----------------------------


class SimulatedLive(RingBuffer):
    """The live stream in simulated time (test instrumentation).

    `wait_ready` (called by the writer thread only) advances the ManualClock to
    the moment a real wait would end (the timeout, a batch due by size or age)
    and puts the live polls that arrive meanwhile: `rows` values every
    `period` seconds, like the default simulator (1,000 values/s). So the real
    Writer loop and SpoolDrain run deterministically on the fake clock. From
    `until` on, time stands still and the writer parks until `wake()` (stop).
    """

    def __init__(self, clock: ManualClock, *, rows: int, period: float, until: float) -> None:
        super().__init__(100_000, clock=clock)
        self.clock = clock
        self.rows = rows
        self.period = period
        self.until = until
        self.next_poll = clock.monotonic()
        self.polls = 0

    def _poll(self) -> None:
        k = self.polls
        self.polls += 1
        self.put_many([TagValue(f"live.{j}", 1_000_000 * k, float(j)) for j in range(self.rows)],
                      t_submit=self.next_poll)
        self.next_poll += self.period

    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> int:
        clock = self.clock
        now = clock.monotonic()
        deadline = now + timeout
        while True:
            while self.next_poll <= now:
                self._poll()
            if now >= self.until:
                return super().wait_ready(batch_size, max_age, 3600.0)  # parks until wake()
            n = len(self)
            if self.batch_due(batch_size, max_age) or now >= deadline:
                return n
            t = min(deadline, self.next_poll, self.until)
            if n:
                t = min(t, now + max_age - self.oldest_age())
            clock.advance(max(0.0, t - now))
            now = clock.monotonic()


class SimulatedSink(MemorySink):
    """Each write takes `seconds` of simulated time; records (time, kind, rows)."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds = seconds
        self.log: list[tuple[float, str, int]] = []

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        self.clock.advance(self.seconds)
        kind = "live" if rows[0].tag.startswith("live") else "backlog"
        self.log.append((self.clock.monotonic(), kind, len(rows)))
        return super().write_batch(rows)


@pytest.mark.parametrize("rate", [500.0, 2000.0, 4000.0])
def test_the_writer_wakes_for_each_drain_step_so_replay_rate_is_met_with_live_data(
    tmp_path: Path, rate: float
) -> None:
    """backup.replay_rate is the achieved drain rate (±15%), also while live batches are written:
    the writer parks only until the next drain step is due, not for its idle tick."""
    cfg = Config(
        writer=WriterConfig(batch_size=500, flush_interval=1.0),
        backup=BackupConfig(directory=str(tmp_path / "backup"), replay_rate=rate),
    )
    validate(cfg)
    clock = ManualClock()
    spool = Spool(cfg.backup.directory, roll_rows=10**9, clock=clock)
    spool.write_rows([TagValue(f"earlier.{k % 100}", 1_000_000 * (k // 100), float(k)) for k in range(30_000)])
    spool.seal()
    start, end = clock.monotonic() + 1.0, clock.monotonic() + 6.0
    buffer = SimulatedLive(clock, rows=100, period=0.1, until=end)
    sink = SimulatedSink(clock, 0.005)
    metrics = Metrics(clock)
    writer = Writer(buffer, sink, spool, metrics, cfg.writer, clock=clock)
    drain = SpoolDrain(spool, sink, cfg, clock=clock)
    writer.background = drain
    writer.start()
    try:
        wait_until(lambda: clock.monotonic() >= end, "simulated time to pass")
    finally:
        writer.request_stop()
        assert writer.join(10.0)
        drain.close()
    backlog = sum(n for t, kind, n in sink.log if kind == "backlog" and start <= t < end)
    live = sum(n for t, kind, n in sink.log if kind == "live" and start <= t < end)
    achieved = backlog / (end - start)
    assert achieved == pytest.approx(rate, rel=0.15), sink.log[:40]
    assert live == pytest.approx(1000 * (end - start), rel=0.15)  # live data kept flowing

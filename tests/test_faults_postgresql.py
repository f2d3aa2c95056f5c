"""Fault injection against the real PostgreSQL on 127.0.0.1:5432, through tests/faultproxy.py.

Each scenario runs the real Pipeline (writer, spool, automatic spool drain)
with the real PostgresSink pointed at the fault proxy, in a database of its
own. Each asserts the counter identity (submitted = written + duplicates +
spooled + quarantined + dropped) and, after recovery, that the table holds
every submitted value exactly once (same keys, same values, nothing else).

Every scenario adds a line to a table (scenario, submitted, written,
duplicates after recovery, lost, longest stall) that is printed at the end of
the module and appended to `faults.md` in pytest's base temp folder (or to
the file $TAGWRITER_FAULT_TABLE names). "Longest stall" is the longest single call of
the writer into the sink (open / write_batch / probe); "submit max" the
longest `Pipeline.submit` call.

Time: the 30 s black hole and the 60 s flapping run are marked `slow`
(`-m "not slow"` leaves them out: ~30 s); the whole module takes ~2 min.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from faultproxy import FaultProxy, FaultRow, Feeder, TimedSink, Values, record
from pg_util import PgDatabase, fresh_database
from procs import free_port, metric, metrics, run_env, start_run, summary
from waits import wait_until

from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig
from tagwriter.metrics import MetricsSnapshot
from tagwriter.pipeline import Pipeline
from tagwriter.replay import replay_files
from tagwriter.sinks.postgresql import CONFLICT_MODE_BATCHES, PostgresSink
from tagwriter.spool import Spool

CALL_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0  # libpq's minimum
SLACK = 1.5  # scheduling on a shared 2-core machine

FAULT_SINK = "postgresql"
FLAP_SECONDS = 60.0
pytestmark = pytest.mark.usefixtures("fault_results")


# -- harness -------------------------------------------------------------------------


def config(tmp_path: Path, port: int, db: PgDatabase, *, call_timeout: float = CALL_TIMEOUT,
           retry: tuple[float, ...] = (0.05, 0.1, 0.2), auto_replay: bool = True, replay_rate: float = 0.0,
           shutdown: float = 5.0, batch_size: int = 200, roll_seconds: float = 1.0) -> Config:
    return Config().replace(
        database=DatabaseConfig(url=db.url(port=port), connect_timeout=CONNECT_TIMEOUT, call_timeout=call_timeout),
        writer=WriterConfig(batch_size=batch_size, flush_interval=0.05, retry_delays=list(retry),
                            probe_interval=0.1, probe_max_interval=0.5, shutdown_timeout=shutdown),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine"),
                            roll_seconds=roll_seconds, auto_replay=auto_replay, replay_rate=replay_rate),
    )


def start_pipeline(cfg: Config) -> tuple[Pipeline, TimedSink]:
    sink = TimedSink(PostgresSink.from_config(cfg.database))
    return Pipeline(cfg, sink=sink).start(), sink


def identity(s: MetricsSnapshot) -> None:
    assert s.pending == 0, s
    assert s.submitted == s.written + s.duplicates + s.spooled + s.quarantined + s.dropped, s
    assert s.quarantined == 0 and s.dropped == 0, s


def stored(db: PgDatabase) -> Values:
    with db.connect() as conn:
        got = conn.execute(
            "SELECT tag_name, (extract(epoch FROM ts) * 1000000)::bigint, value FROM tag_values"
        ).fetchall()
    table = {(tag, int(us)): value for tag, us, value in got}
    assert len(table) == len(got)
    return table


@dataclass
class Outcome:
    """What a scenario did, summed over the pipelines it ran and the final replay."""

    submitted: int = 0
    written: int = 0  # inserted live + inserted by replay (auto drain and replay_files)
    duplicates: int = 0
    spooled: int = 0
    replayed_after: int = 0  # rows replay_files settled after the pipelines stopped
    longest: float = 0.0
    longest_call: str = ""
    submit_max: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, p: Pipeline, sink: TimedSink) -> MetricsSnapshot:
        s = p.snapshot()
        identity(s)
        self.submitted += s.submitted
        self.written += s.written + int(s.extra.get("replayed", 0))
        self.duplicates += s.duplicates + int(s.extra.get("replay_duplicates", 0))
        self.spooled += s.spooled
        if sink.longest > self.longest:
            self.longest, self.longest_call = sink.longest, sink.longest_call
        return s


def replay_leftovers(db: PgDatabase, spool_dir: Path, out: Outcome) -> None:
    """`tagwriter replay` of what the automatic drain did not get to (straight to the server)."""
    files = sorted(spool_dir.glob("tagwriter-*.csv"))
    if not files:
        return
    sink = PostgresSink(host=db.host, port=db.port, dbname=db.name, user=db.user, call_timeout=5.0)
    spool = Spool(spool_dir, spool_dir / "quarantine")
    report = replay_files([spool_dir], sink=sink, spool=spool, retry_delays=(0.2, 0.5))
    assert report.ok, report.reason()
    out.written += report.total("inserted")
    out.duplicates += report.total("duplicates")
    out.replayed_after += report.total("inserted") + report.total("duplicates")
    out.notes.append(f"replay_files: {len(files)} files")


def check_exactly_once(db: PgDatabase, values: Values, out: Outcome,
                       scenario: str) -> None:
    table = stored(db)
    lost = len(values.keys() - table.keys())
    extra = len(table.keys() - values.keys())
    record(FaultRow(scenario, "postgresql", out.submitted, out.written, out.duplicates, lost,
                    out.longest, out.longest_call, out.submit_max, "; ".join(out.notes)))
    assert out.submitted == len(values)
    assert lost == 0 and extra == 0, (lost, extra)
    assert all(table[k] == v for k, v in values.items())
    # Each value was inserted once: by a write we counted, or by a commit whose answer was
    # lost (the retry or replay then met it as a counted duplicate).
    assert out.written <= len(values) <= out.written + out.duplicates, (out.written, out.duplicates)


@dataclass
class Run:
    """One pipeline of a scenario, its feeder, and the outcome its figures go to."""

    p: Pipeline
    sink: TimedSink
    feeder: Feeder
    out: Outcome
    snapshot: MetricsSnapshot | None = None  # set once stopped


@contextmanager
def scenario_run(cfg: Config, out: Outcome | None = None, **feeder: int) -> Iterator[Run]:
    """Start a pipeline and its feeder (not its thread); on leaving, stop both and add the figures to `out`."""
    p, sink = start_pipeline(cfg)
    run = Run(p, sink, Feeder(p, **feeder), out or Outcome())
    try:
        yield run
    finally:
        run.feeder.stop()
        p.stop()
        run.out.submit_max = max(run.out.submit_max, run.feeder.submit_max)
    run.snapshot = run.out.add(p, sink)


def recover(run: Run, proxy: FaultProxy, db: PgDatabase, timeout: float) -> None:
    """The server is back: values go on for 0.5 s, then the feeder stops and the spool must drain."""
    proxy.pass_through()
    time.sleep(0.5)
    run.feeder.stop()
    assert run.p.flush(10)
    wait_drained(run.p, db, len(run.feeder.values), timeout)


def settle(run: Run, db: PgDatabase, cfg: Config, scenario: str) -> None:
    """Replay what the drain left, then: every submitted value in the table exactly once (and recorded)."""
    replay_leftovers(db, Path(cfg.backup.directory), run.out)
    check_exactly_once(db, run.feeder.values, run.out, scenario)


def replayed_at_least(p: Pipeline, n: int) -> bool:
    return int(p.snapshot().extra["replayed"]) >= n


def wait_drained(p: Pipeline, db: PgDatabase, expected: int, timeout: float) -> None:
    def done() -> bool:
        s = p.snapshot()
        return s.backlog_files == 0 and not p.in_outage and db.count() >= expected
    wait_until(done, "the automatic drain to empty the spool", timeout)


@pytest.fixture
def db() -> Iterator[PgDatabase]:
    with fresh_database("tw_fault") as d:
        PostgresSink(host=d.host, port=d.port, dbname=d.name, user=d.user).create_table()
        yield d


@pytest.fixture
def proxy(db: PgDatabase) -> Iterator[FaultProxy]:
    with FaultProxy((db.host, db.port)) as p:
        yield p


# -- scenarios -----------------------------------------------------------------------------


def test_outage_from_the_start(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """Refused from the first connect: everything spools; when the server is back the drain writes it."""
    proxy.refuse()
    cfg = config(tmp_path, proxy.port, db)
    with scenario_run(cfg) as run:
        p = run.p
        run.feeder.submit_many(60)  # 3,000 values
        assert p.flush(10)
        s = p.snapshot()
        assert s.spooled == s.submitted == 3000 and s.written == 0
        assert p.in_outage
        assert db.count() == 0
        proxy.pass_through()
        wait_drained(p, db, 3000, 30)
        run.feeder.submit_many(20)  # live values after recovery
        assert p.flush(10)
    assert run.snapshot is not None and run.snapshot.extra["replayed"] == 3000
    settle(run, db, cfg, "outage from the start (refused)")
    assert run.out.longest < CALL_TIMEOUT + SLACK


def test_outage_mid_run_longer_than_the_retry_schedule(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """Refused (established sessions reset) for 3 s while values keep coming; retries are 0.35 s in all."""
    cfg = config(tmp_path, proxy.port, db)
    with scenario_run(cfg) as run:
        p = run.p
        run.feeder.start()
        wait_until(lambda: p.snapshot().written >= 1000, "live writes", 15)
        proxy.refuse()
        down_at = time.monotonic()
        wait_until(lambda: p.in_outage, "outage mode", 10)
        spooled_at = p.snapshot().spooled
        wait_until(lambda: p.snapshot().spooled > spooled_at, "values arriving in the outage to spool", 10)
        time.sleep(max(0.0, down_at + 3.0 - time.monotonic()))  # the outage lasts its 3 s
        proxy.pass_through()
        wait_until(lambda: not p.in_outage, "recovery", 10)
        recover(run, proxy, db, 30)
    s = run.snapshot
    assert s is not None and s.spooled > 0 and s.retries >= len(cfg.writer.retry_delays) and s.outages >= 1
    settle(run, db, cfg, "outage mid-run 3 s (refused)")
    assert run.out.longest < CALL_TIMEOUT + SLACK


def test_reset_in_the_middle_of_a_copy(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """RST while COPY data flows, five times: one batch exhausts its retries and spools, the drain redoes it."""
    cfg = config(tmp_path, proxy.port, db, batch_size=500)
    with scenario_run(cfg, tags=100) as run:
        p, feeder = run.p, run.feeder
        feeder.submit_many(5)
        assert p.flush(10) and p.snapshot().written == 500
        proxy.reset_after(6000, only=b"d", times=5)  # a 500-row batch is ~30 kB of CopyData
        feeder.submit_many(40)
        assert p.flush(20)
        wait_until(lambda: proxy.resets_pending == 0, "all five resets", 20)
        assert proxy.stats.reset_mid_message == b"d"
        wait_drained(p, db, len(feeder.values), 30)
    s = run.snapshot
    assert s is not None and s.spooled >= 500 and s.retries >= 3, s
    settle(run, db, cfg, "reset mid-COPY x5")
    assert run.out.longest < CALL_TIMEOUT + SLACK


def test_reset_right_after_commit_is_sent(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """The ambiguous commit: RST just after the Sync that commits the batch went to the server.

    The writer cannot know whether the server committed; it retries the batch
    on a new session. If the server did commit, the retry finds every row there
    and counts it as a duplicate; if not, it inserts them. Never twice.
    """
    cfg = config(tmp_path, proxy.port, db, batch_size=100)
    with scenario_run(cfg, tags=100) as run:
        p, sink, feeder = run.p, run.sink, run.feeder
        # In conflict mode (as after a replay) a batch is one INSERT in autocommit, committed
        # when the server reads the Sync that ends it: put the sink there, let one batch
        # prepare the statement, then cut right after the next Sync (its 5 bytes) went through.
        sink.inner._conflict_mode = CONFLICT_MODE_BATCHES
        feeder.submit_many(1)
        assert p.flush(10) and p.snapshot().written == 100  # a session is open, the INSERT prepared
        proxy.reset_after(5, only=b"S")
        feeder.submit_many(1)
        assert p.flush(10)
        assert proxy.resets_pending == 0 and proxy.stats.reset_mid_message == b"S"
        s = p.snapshot()
        assert s.retries >= 1 and s.spooled == 0, s
    s = run.snapshot
    assert s is not None
    committed_anyway = s.duplicates == 100
    assert s.duplicates in (0, 100) and s.written + s.duplicates == 200
    run.out.notes.append("server had committed" if committed_anyway else "server had not committed")
    check_exactly_once(db, feeder.values, run.out, "reset right after COMMIT was sent")


def black_hole(db: PgDatabase, proxy: FaultProxy, tmp_path: Path, seconds: float, call_timeout: float,
               scenario: str) -> None:
    cfg = config(tmp_path, proxy.port, db, call_timeout=call_timeout, retry=(0.05,))
    bound = max(call_timeout, CONNECT_TIMEOUT) + SLACK
    with scenario_run(cfg) as run:
        p, sink, feeder = run.p, run.sink, run.feeder.start()
        wait_until(lambda: p.snapshot().written >= 500, "live writes", 15)
        proxy.blackhole()
        began = time.monotonic()
        wait_until(lambda: p.in_outage, "outage mode", 2 * bound + 1)
        while time.monotonic() - began < seconds:
            s = p.snapshot()
            # Nothing waits for the black hole: the buffer stays small and values spool.
            assert s.pending <= 2 * (bound / feeder.interval) * feeder.tags + 1000, s
            time.sleep(0.2)  # samples the bound while the black hole lasts
        wait_until(lambda: p.snapshot().spooled > 0, "values to spool in the black hole", bound)
        assert sink.longest < bound, (sink.longest_call, sink.longest)
        recover(run, proxy, db, 60)
    assert run.snapshot is not None and run.snapshot.spooled > 0
    settle(run, db, cfg, scenario)
    assert run.out.longest < bound
    assert run.out.submit_max < 1.0  # a bound (nothing waits for the database), not a speed


def test_black_hole_short(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """Accept and never answer for 5 s (call_timeout 1 s): every call ends within its bound; data spools."""
    black_hole(db, proxy, tmp_path, 5.0, 1.0, "black hole 5 s (call_timeout 1 s)")


@pytest.mark.slow
def test_black_hole_30_seconds(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """The issue's 30 s black hole, with the default-like call_timeout of 2 s."""
    black_hole(db, proxy, tmp_path, 30.0, CALL_TIMEOUT, "black hole 30 s (call_timeout 2 s)")


@pytest.mark.slow
def test_flapping(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """Up one second, down (refused, sessions reset) the next, for a minute: 30 outages and recoveries."""
    cfg = config(tmp_path, proxy.port, db)
    with scenario_run(cfg) as run:
        p = run.p
        run.feeder.start()
        wait_until(lambda: p.snapshot().written >= 200, "live writes", 15)
        began = time.monotonic()
        down = False
        while time.monotonic() - began < FLAP_SECONDS:
            down = not down
            proxy.refuse() if down else proxy.pass_through()
            time.sleep(1.0)
        recover(run, proxy, db, 60)
    s = run.snapshot
    assert s is not None and s.outages >= 2 and s.spooled > 0, s
    settle(run, db, cfg, f"flapping 1 s up / 1 s down, {FLAP_SECONDS:g} s")
    assert run.out.longest < CALL_TIMEOUT + SLACK


def test_restart_during_the_spool_drain(db: PgDatabase, proxy: FaultProxy, tmp_path: Path) -> None:
    """Run 1 spools 6,000 values (refused); run 2 starts draining (paced) and is stopped midway;
    run 3 finishes: the interrupted file is replayed from its start, its first rows as duplicates."""
    out = Outcome()
    proxy.refuse()
    cfg = config(tmp_path, proxy.port, db, replay_rate=3000.0)
    p1, sink1 = start_pipeline(cfg)
    feeder = Feeder(p1, tags=100)
    feeder.submit_many(60)
    assert p1.stop()
    out.add(p1, sink1)
    assert p1.snapshot().spooled == 6000
    proxy.pass_through()
    runs: list[MetricsSnapshot] = []
    for run in (2, 3):
        p, sink = start_pipeline(cfg)
        feeder.pipeline = p
        try:
            feeder.submit_many(5)  # live values meanwhile
            if run == 2:
                wait_until(partial(replayed_at_least, p, 1500), "run 2 to drain a part", 20)
                assert p.snapshot().backlog_files > 0
            else:
                wait_drained(p, db, len(feeder.values), 30)
        finally:
            p.stop()
        runs.append(out.add(p, sink))
    out.submit_max = feeder.submit_max
    replay_leftovers(db, Path(cfg.backup.directory), out)
    check_exactly_once(db, feeder.values, out, "restart during the spool drain")
    # Run 3 met again what run 2 had inserted from the file it was stopped in.
    assert runs[1].extra["replay_duplicates"] > 0
    assert runs[0].extra["replayed"] + runs[1].extra["replayed"] == 6000 and out.replayed_after == 0


# -- SIGTERM to `tagwriter run` during an outage ----------------------------------------

SHUTDOWN = 3.0
QUEUED_BEHIND = 100  # values: half a second of the simulated source; a working writer holds ~20


def hung_write(port: int) -> bool:
    """A batch is in flight, the writer still `writing` (no call_timeout yet), and values pile up behind it."""
    m = metrics(port)
    return (m is not None and m["state"] == "writing" and m["inflight"] > 0
            and m["pending"] - m["inflight"] >= QUEUED_BEHIND)


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
def test_sigterm_during_an_outage_spools_everything_in_time(
    db: PgDatabase, proxy: FaultProxy, tmp_path: Path, fault: str
) -> None:
    """`tagwriter run` (simulated source, 200 values/s) loses the server, then gets SIGTERM.

    refuse: the writer is in outage mode, spooling. blackhole: a write hangs
    (call_timeout 10 s, longer than the 3 s shutdown deadline), so stop() must
    abandon it. Either way the process exits within the deadline (+ slack for
    sealing and the interpreter's exit) and every value not written is in a
    spool file; replaying them leaves each submitted value once in the table.
    """
    (tmp_path / "tagwriter.toml").write_text(
        f'[database]\nurl = "{db.url(port=proxy.port)}"\ncall_timeout = 10.0\nconnect_timeout = 2.0\n'
        f"[writer]\nflush_interval = 0.1\nretry_delays = [0.1, 0.2]\nprobe_interval = 0.2\n"
        f"shutdown_timeout = {SHUTDOWN}\n"
        "[source]\ngroups = 2\ntags_per_group = 10\ninterval = 0.1\n"
        '[buffer]\ndurability = "memory"\n'  # memory: stop spools what it cannot write; a disk queue keeps it
    )
    port = free_port()
    proc = start_run(tmp_path, "--metrics-port", str(port), env=run_env())
    try:
        wait_until(lambda: db.count() >= 100, "rows written through the proxy", 30)
        if fault == "refuse":
            proxy.refuse()
            wait_until(lambda: metric(port, "state") == "outage", "outage mode", 10)
            wait_until(lambda: (metric(port, "spooled") or 0) > 0, "values spooled", 10)
        else:
            proxy.blackhole()
            wait_until(partial(hung_write, port), "a write hanging in the black hole, values queued behind it", 10)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=SHUTDOWN + 30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proxy.stop()  # ends the frozen sessions: the server rolls their transactions back
    assert proc.returncode == 0, out + err
    assert "SIGTERM received" in out
    counts = summary(out)
    assert counts["pending"] == 0 and counts["spooled"] > 0
    assert counts["quarantined"] == counts["dropped"] == 0
    assert counts["submitted"] == counts["written"] + counts["duplicates"] + counts["spooled"]
    if fault == "blackhole":  # the hung write outlived the deadline: stop() took its batch and spooled it
        assert "shutdown deadline reached" in out + err
    spool_dir = tmp_path / "backup"
    spooled_lines = sum(len(p.read_text().splitlines()) - 1 for p in spool_dir.glob("tagwriter-*.csv"))
    assert spooled_lines == counts["spooled"]
    assert not list(spool_dir.glob("*.partial"))
    assert db.count() == counts["written"]
    outcome = Outcome(submitted=counts["submitted"], written=counts["written"], duplicates=counts["duplicates"],
                      longest=took, longest_call="SIGTERM to exit")
    replay_leftovers(db, spool_dir, outcome)
    table_rows = db.count()
    record(FaultRow(f"SIGTERM during outage ({fault})", "postgresql", outcome.submitted, outcome.written,
                    outcome.duplicates, counts["submitted"] - table_rows, took, "SIGTERM to exit", 0.0,
                    f"spooled {counts['spooled']}"))
    assert took < SHUTDOWN + 4.0, took
    # The simulation's keys are unique: each submitted value once in the table.
    assert table_rows == counts["submitted"] == outcome.written

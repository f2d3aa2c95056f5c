"""Fault injection against the Oracle sink, where it makes sense without an Oracle server.

No Oracle server can run on our machines (DESIGN.md). So:

- The real python-oracledb driver (thin mode) through tests/faultproxy.py,
  whose upstream is a loopback port where nothing listens. The proxy then
  refuses connections, resets them (at once, or after trying the missing
  upstream: "pass-through to nothing"), or black-holes them (accepts and
  never answers), and flaps between those. With no server nothing can be
  written, so these scenarios assert that every value is spooled exactly once
  (the spool files hold exactly the submitted values), the counter identity,
  and that no call blocks beyond its bound (connect_timeout + pool
  wait_timeout + slack), including SIGTERM to `tagwriter run`.
- A FAKE server (tests/oracle_fake.py: a fake driver and database at the
  DB-API seam, not Oracle) for what needs a server that comes back: an outage
  mid-run and a restart during the spool drain, asserting that every value
  lands exactly once.

The 30 s black hole runs against PostgreSQL only (test_faults_postgresql.py):
with no server here it would only repeat the 3 s one at ten times the cost.
Every scenario adds a line to the results table (see test_faults_postgresql.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from faultproxy import FaultProxy, FaultRow, Feeder, TimedSink, Values, record
from oracle_fake import FakeDriver, FakeServer, refused
from procs import free_port, metric, run_env, start_run, summary
from waits import wait_until

from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import to_epoch_us
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.oracle import OracleSink
from tagwriter.spoolformat import read_spool

PASSWORD = "tiger-secret-pw"
CONNECT = 0.5  # connect_timeout and pool_wait_timeout
CALL = 1.0
SLACK = 2.0
BOUND = CONNECT + CONNECT + SLACK  # the longest any one sink call may take

FAULT_SINK = "oracle"
pytestmark = pytest.mark.usefixtures("fault_results")


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    """The fault proxy in front of no server at all."""
    with FaultProxy(("127.0.0.1", free_port())) as p:
        yield p


def config(tmp_path: Path, url: str, *, shutdown: float = 2.0) -> Config:
    return Config().replace(
        database=DatabaseConfig(url=url, password=PASSWORD, connect_timeout=CONNECT,
                                pool_wait_timeout=CONNECT, call_timeout=CALL),
        writer=WriterConfig(batch_size=100, flush_interval=0.05, retry_delays=[0.05, 0.1],
                            probe_interval=0.1, probe_max_interval=0.5, shutdown_timeout=shutdown),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine"), roll_seconds=1.0),
    )


def set_fault(proxy: FaultProxy, fault: str) -> None:
    {"refuse": proxy.refuse, "reset": proxy.reset, "blackhole": proxy.blackhole,
     "nothing": proxy.pass_through}[fault]()


def spooled_values(spool_dir: Path) -> Values:
    """Every row in the completed spool files; asserts no row is there twice and no line is bad."""
    values: Values = {}
    lines = 0
    for path in sorted(spool_dir.glob("tagwriter-*.csv")):
        for item in read_spool(path):
            assert not isinstance(item, Exception), item
            row = item.row
            values[(row.tag, row.ts_us)] = row.value
            lines += 1
    assert lines == len(values), "a value is spooled more than once"
    return values


def identity(s: MetricsSnapshot) -> None:
    assert s.pending == 0, s
    assert s.submitted == s.written + s.duplicates + s.spooled + s.quarantined + s.dropped, s
    assert s.quarantined == 0 and s.dropped == 0, s


def run_without_server(tmp_path: Path, proxy: FaultProxy, faults: list[str], seconds: float,
                       scenario: str) -> None:
    """Feed values for `seconds` while the proxy cycles through `faults` (equal shares);
    assert bounded calls and stop, and that the spool holds exactly what was submitted."""
    set_fault(proxy, faults[0])
    cfg = config(tmp_path, f"oracle://scott@127.0.0.1:{proxy.port}/orclpdb")
    sink = TimedSink(OracleSink.from_config(cfg.database))
    p = Pipeline(cfg, sink=sink).start()
    feeder = Feeder(p, tags=20, interval=0.02).start()
    began = time.monotonic()
    try:
        share = seconds / len(faults)
        for i, fault in enumerate(faults):
            set_fault(proxy, fault)
            time.sleep(max(0.0, began + (i + 1) * share - time.monotonic()))
        wait_until(lambda: p.in_outage, "outage mode", BOUND)
        feeder.stop()
        stop_began = time.monotonic()
        assert p.stop(cfg.writer.shutdown_timeout)
        stop_took = time.monotonic() - stop_began
    finally:
        feeder.stop()
        p.stop(0.0)
    s = p.snapshot()
    identity(s)
    in_spool = spooled_values(Path(cfg.backup.directory))
    lost = len(feeder.values.keys() - in_spool.keys())
    longest, call = max((sink.longest, sink.longest_call), (stop_took, "stop"))
    record(FaultRow(scenario, "oracle", s.submitted, s.written, s.duplicates, lost, longest, call,
                    feeder.submit_max, f"spooled {s.spooled}; {s.last_error.split(':')[0]}"))
    assert s.written == 0 and s.spooled == s.submitted == len(feeder.values) > 0
    assert in_spool == feeder.values
    assert sink.longest < BOUND, (sink.longest_call, sink.longest)
    assert stop_took < cfg.writer.shutdown_timeout + SLACK
    assert feeder.submit_max < 1.0  # a bound (nothing waits for the database), not a speed
    assert PASSWORD not in s.last_error


@pytest.mark.parametrize("fault", ["refuse", "reset", "nothing", "blackhole"])
def test_outage_from_the_start(tmp_path: Path, proxy: FaultProxy, fault: str) -> None:
    """Real driver, 3 s of values against a proxy that refuses / resets / forwards to nothing / black-holes."""
    run_without_server(tmp_path, proxy, [fault], 3.0, f"no server, proxy {fault} (3 s)")


def test_flapping_between_failure_modes(tmp_path: Path, proxy: FaultProxy) -> None:
    """Real driver: the way the server fails changes every 0.75 s (6 s): still bounded, all spooled."""
    faults = ["refuse", "blackhole", "reset", "nothing"] * 2
    run_without_server(tmp_path, proxy, faults, 6.0, "no server, flapping refuse/blackhole/reset/nothing (6 s)")


# -- SIGTERM to `tagwriter run` ------------------------------------------------------------

SHUTDOWN = 3.0


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
def test_sigterm_during_an_outage(tmp_path: Path, proxy: FaultProxy, fault: str) -> None:
    """`tagwriter run` (real driver, simulated source) with no server behind the proxy gets SIGTERM:
    it exits within the shutdown deadline and every value it took is in a spool file."""
    set_fault(proxy, fault)
    (tmp_path / "tagwriter.toml").write_text(
        f'[database]\nurl = "oracle://scott@127.0.0.1:{proxy.port}/orclpdb"\n'
        f"connect_timeout = {CONNECT}\npool_wait_timeout = {CONNECT}\ncall_timeout = {CALL}\n"
        f"[writer]\nflush_interval = 0.1\nretry_delays = [0.1]\nprobe_interval = 0.2\n"
        f"shutdown_timeout = {SHUTDOWN}\n"
        "[source]\ngroups = 2\ntags_per_group = 10\ninterval = 0.1\n"
    )
    port = free_port()
    proc = start_run(tmp_path, "--metrics-port", str(port), env=run_env(TAGWRITER_DATABASE_PASSWORD=PASSWORD))
    try:
        wait_until(lambda: metric(port, "state") == "outage", "outage mode", 20)
        wait_until(lambda: (metric(port, "spooled") or 0) > 0 and (metric(port, "pending") or 0) > 0,
                   "values spooled and more pending", 10)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=SHUTDOWN + 30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "SIGTERM received" in out and PASSWORD not in out + err
    counts = summary(out)
    in_spool = spooled_values(tmp_path / "backup")
    record(FaultRow(f"SIGTERM during outage ({fault})", "oracle", counts["submitted"], counts["written"],
                    counts["duplicates"], counts["submitted"] - len(in_spool), took, "SIGTERM to exit", 0.0,
                    f"spooled {counts['spooled']}"))
    assert counts["pending"] == counts["written"] == 0
    assert counts["spooled"] == counts["submitted"] == len(in_spool) > 0
    assert not list((tmp_path / "backup").glob("*.partial"))
    assert took < SHUTDOWN + 4.0, took


# -- a FAKE server that comes back (tests/oracle_fake.py) -----------------------------------


def fake_sink(server: FakeServer) -> TimedSink:
    return TimedSink(OracleSink(driver=FakeDriver(server), user="scott", password=PASSWORD,
                                dsn="127.0.0.1:1521/orclpdb", connect_timeout=CONNECT,
                                pool_wait_timeout=CONNECT, call_timeout=CALL, pool_min=1, pool_max=3))


def fake_config(tmp_path: Path, *, replay_rate: float = 0.0) -> Config:
    cfg = config(tmp_path, "oracle://scott@127.0.0.1:1521/orclpdb")
    cfg.backup.replay_rate = replay_rate
    return cfg


def in_fake_table(server: FakeServer) -> Values:
    return {(tag, to_epoch_us(ts)): value for tag, ts, value, _ in server.stored()}


def replayed_at_least(p: Pipeline, n: int) -> bool:
    return int(p.snapshot().extra["replayed"]) >= n


def drained(p: Pipeline, server: FakeServer, expected: int) -> bool:
    s = p.snapshot()
    return s.backlog_files == 0 and not p.in_outage and len(server.stored()) >= expected


def test_fake_server_outage_mid_run_then_every_value_once(tmp_path: Path) -> None:
    """FAKE server: down (connects refused, sessions lost) for 2 s mid-run, then back; the drain
    writes the spool and the table holds every submitted value exactly once."""
    server = FakeServer()
    cfg = fake_config(tmp_path)
    sink = fake_sink(server)
    p = Pipeline(cfg, sink=sink).start()
    feeder = Feeder(p, tags=20).start()
    try:
        wait_until(lambda: p.snapshot().written >= 300, "live writes", 10)
        server.go_down(refused)
        down_at = time.monotonic()
        wait_until(lambda: p.in_outage, "outage mode", 10)
        spooled_at = p.snapshot().spooled
        wait_until(lambda: p.snapshot().spooled > spooled_at, "values arriving in the outage to spool", 10)
        time.sleep(max(0.0, down_at + 2.0 - time.monotonic()))  # the outage lasts its 2 s
        server.come_up()
        wait_until(lambda: not p.in_outage, "recovery", 10)
        feeder.stop()
        assert p.flush(10)
        wait_until(lambda: drained(p, server, len(feeder.values)), "the drain", 30)
    finally:
        feeder.stop()
        p.stop()
    s = p.snapshot()
    identity(s)
    table = in_fake_table(server)
    written = s.written + s.extra["replayed"]
    duplicates = s.duplicates + s.extra["replay_duplicates"]
    lost = len(feeder.values.keys() - table.keys())
    record(FaultRow("FAKE server: outage mid-run 2 s", "oracle", s.submitted, written, duplicates, lost,
                    sink.longest, sink.longest_call, feeder.submit_max, f"spooled {s.spooled}"))
    assert s.spooled > 0 and s.outages == 1
    assert table == feeder.values and written == len(feeder.values)


def test_fake_server_restart_during_the_spool_drain(tmp_path: Path) -> None:
    """FAKE server: run 1 spools 4,000 values (server down); run 2 drains part (paced) and stops;
    run 3 finishes. Every value once in the table; run 3 meets run 2's rows as duplicates."""
    server = FakeServer()
    server.go_down(refused)
    cfg = fake_config(tmp_path, replay_rate=2000.0)
    sink = fake_sink(server)
    p1 = Pipeline(cfg, sink=sink).start()
    feeder = Feeder(p1, tags=100)
    feeder.submit_many(40)
    assert p1.stop()
    assert p1.snapshot().spooled == 4000
    server.come_up()
    snaps: list[MetricsSnapshot] = []
    longest = (sink.longest, sink.longest_call)
    for run in (2, 3):
        sink = fake_sink(server)
        p = Pipeline(cfg, sink=sink).start()
        feeder.pipeline = p
        try:
            feeder.submit_many(2)
            if run == 2:
                wait_until(partial(replayed_at_least, p, 1000), "run 2 to drain a part", 20)
                assert p.snapshot().backlog_files > 0
            else:
                wait_until(partial(drained, p, server, len(feeder.values)), "run 3 to drain the rest", 30)
        finally:
            p.stop()
        snaps.append(p.snapshot())
        longest = max(longest, (sink.longest, sink.longest_call))
    for s in (p1.snapshot(), *snaps):
        identity(s)
    table = in_fake_table(server)
    submitted = p1.snapshot().submitted + sum(s.submitted for s in snaps)
    written = sum(s.written + s.extra["replayed"] for s in snaps)
    duplicates = sum(s.duplicates + s.extra["replay_duplicates"] for s in snaps)
    lost = len(feeder.values.keys() - table.keys())
    record(FaultRow("FAKE server: restart during the drain", "oracle", submitted, written, duplicates, lost,
                    *longest, feeder.submit_max, ""))
    assert table == feeder.values and written == len(feeder.values) == submitted
    assert snaps[1].extra["replay_duplicates"] > 0

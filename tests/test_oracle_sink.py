"""OracleSink against the fake driver (tests/oracle_fake.py): no Oracle server can run here.

Covers batch errors mapped to rows, duplicates, transient vs fatal
classification, commit on success, chunks bound column by column, the pool's
bounds (exhaustion, hanging connects, ping on reuse), which threads do the
work (the caller's for calls, one long-lived worker for connects), direct path
mode, thick mode, configuration, DDL and table inspection, and
retry-then-outage through the real Pipeline and Writer.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from oracle_fake import FakeDriver, FakeServer, NoopDriver, dpy, lost, ora, refused
from waits import wait_until

from tagwriter import config as config_mod
from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig
from tagwriter.errors import ConfigError, FatalError, LoginRefusedError, RowError, SinkError, TransientError
from tagwriter.models import Chunk, PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import ColumnInfo, TableInfo
from tagwriter.sinks.oracle import OracleSink, binds, naive_utc

PASSWORD = "tiger-secret-pw"
T0 = 1_700_000_000_123_456  # epoch microseconds, with a fractional part


def make_sink(server: FakeServer | None = None, **kw: Any) -> tuple[OracleSink, FakeServer, FakeDriver]:
    server = server or FakeServer()
    driver = FakeDriver(server)
    args: dict[str, Any] = dict(
        user="scott", password=PASSWORD, dsn="127.0.0.1:1521/orclpdb", connect_timeout=0.5,
        pool_wait_timeout=0.5, call_timeout=1.0, pool_min=1, pool_max=3,
    )
    args.update(kw)
    return OracleSink(driver=driver, **args), server, driver


def rows(n: int, start: int = T0, tag: str = "line1.temp") -> list[TagValue]:
    return [TagValue(f"{tag}{i}", start + i, float(i) + 0.5, 192) for i in range(n)]


# -- writing -------------------------------------------------------------------------


def test_write_binds_timestamp_and_double_commits_and_keeps_microseconds() -> None:
    sink, server, _ = make_sink()
    result = sink.write_batch(rows(3))
    assert (result.written, result.duplicates, result.rejected) == (3, 0, [])
    assert server.commits == 1
    stored = server.stored()
    assert [r[1] for r in stored] == [naive_utc(T0 + i) for i in range(3)]
    assert stored[0][1].microsecond == 123_456 and stored[0][1].tzinfo is None
    sizes = server.input_sizes[-1]
    assert sizes[1] is FakeDriver.DB_TYPE_TIMESTAMP and sizes[2] is FakeDriver.DB_TYPE_BINARY_DOUBLE
    assert all(c.call_timeout == 1000 for c in server.connections)


def test_empty_batch_touches_nothing() -> None:
    sink, server, _ = make_sink()
    assert sink.write_batch([]).written == 0
    assert server.connects == 0


def test_batch_errors_map_to_rows_and_the_rest_commits() -> None:
    sink, server, _ = make_sink()
    sink.write_batch([TagValue("stored", T0, 1.0)])
    batch = [
        TagValue("ok1", T0, 1.0),
        TagValue(None, T0, 2.0),  # type: ignore[arg-type]  # NULL tag: ORA-01400
        TagValue("ok2", T0, 3.0),
        TagValue("x" * 129, T0, 4.0),  # too long: ORA-12899
        TagValue("stored", T0, 5.0),  # already there: ORA-00001
    ]
    result = sink.write_batch(batch)
    assert result.written == 2 and result.duplicates == 1
    assert [(e.index, e.code) for e in result.rejected] == [(1, "ORA-01400"), (3, "ORA-12899")]
    assert "cannot insert NULL" in result.rejected[0].message
    assert "Help:" not in result.rejected[0].message
    assert {r[0] for r in server.stored()} == {"stored", "ok1", "ok2"}
    assert server.commits == 2


def test_duplicates_in_one_batch_and_on_replay_count_as_duplicates() -> None:
    sink, server, _ = make_sink()
    batch = rows(4)
    first = sink.write_batch([*batch, batch[0]])
    assert (first.written, first.duplicates) == (4, 1)
    again = sink.write_batch(batch)
    assert (again.written, again.duplicates, again.rejected) == (0, 4, [])
    assert len(server.stored()) == 4


def test_nan_and_null_values_round_trip() -> None:
    sink, server, _ = make_sink()
    sink.write_batch([TagValue("nan", T0, math.nan), TagValue("null", T0, None, 0)])
    by_tag = {r[0]: r for r in server.stored()}
    assert math.isnan(by_tag["nan"][2])
    assert by_tag["null"][2] is None and by_tag["null"][3] == 0


def group_chunk(*stamps: int, tags: int = 3) -> Chunk:
    """One polling group of `tags` values per stamp, joined as the buffer joins them."""
    return Chunk.join([PollingData(f"g{k}", ts / 1e6, {f"g{k}.t{i}": float(10 * k + i) for i in range(tags)}).chunk()
                       for k, ts in enumerate(stamps)])


def test_a_chunk_converts_each_distinct_stamp_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sink, server, _ = make_sink()
    converted: list[int] = []

    def counting(ts_us: int) -> datetime:
        converted.append(ts_us)
        return naive_utc(ts_us)

    monkeypatch.setattr(binds, "naive_utc", counting)
    chunk = group_chunk(T0, T0 + 1, T0, tags=4)  # three groups, two distinct stamps, one repeated later
    result = sink.write_batch(chunk)
    assert (result.written, result.duplicates, result.rejected) == (12, 0, [])
    assert sorted(converted) == [T0, T0 + 1]
    stored = {r[0]: r for r in server.stored()}
    assert stored["g1.t3"][1:] == (naive_utc(T0 + 1), 13.0, 192)
    assert stored["g2.t0"][1] == naive_utc(T0) and stored["g2.t0"][1].microsecond == 123_456
    converted.clear()
    assert sink.write_batch(rows(3, start=T0 + 10)).written == 3  # a list of TagValue still works
    assert converted == [T0 + 10, T0 + 11, T0 + 12]


def test_a_chunk_keeps_row_errors_at_their_offsets_and_counts_duplicates() -> None:
    sink, server, _ = make_sink()
    sink.write_batch([TagValue("stored", T0, 1.0)])
    chunk = Chunk.of([TagValue("ok1", T0, 1.0), TagValue("x" * 129, T0 + 1, 2.0), TagValue("stored", T0, 3.0),
                      TagValue("ok2", T0 + 1, 4.0), TagValue("ok1", T0, 5.0)])
    result = sink.write_batch(chunk)
    assert (result.written, result.duplicates) == (2, 2)
    assert [(e.index, e.code) for e in result.rejected] == [(1, "ORA-12899")]
    assert {r[0] for r in server.stored()} == {"stored", "ok1", "ok2"}


def test_direct_path_takes_a_chunk() -> None:
    sink, server, _ = make_sink(insert_mode="direct_path")
    sink.write_batch(Chunk.of([TagValue("stored", T0, 1.0)]))
    result = sink.write_batch(Chunk.of([TagValue("stored", T0, 9.0), TagValue("a", T0, 1.0),
                                        TagValue("z" * 130, T0, 2.0)]))
    assert (result.written, result.duplicates) == (1, 1)
    assert [(e.index, e.code) for e in result.rejected] == [(2, "ORA-12899")]
    assert [r[0] for r in server.stored()] == ["a", "stored"]


# -- classification ------------------------------------------------------------------

CASES: list[tuple[str, str, Callable[[], BaseException], type[SinkError], str, str]] = [
    ("refused", "connect", refused, TransientError, "DPY-6005", "no listener at 127.0.0.1:1521"),
    ("service", "connect", lambda: dpy(6001, service_name="orclpdb", host="127.0.0.1", port=1521),
     TransientError, "DPY-6001", "listener up but service name unknown"),
    ("password", "connect", lambda: ora(1017, "invalid credential or not authorized; logon denied"),
     LoginRefusedError, "ORA-01017", "user or password wrong"),
    ("locked", "connect", lambda: ora(28000, "The account is locked."), LoginRefusedError, "ORA-28000", "locked"),
    ("starting", "connect", lambda: ora(1033, "ORACLE initialization or shutdown in progress"),
     TransientError, "ORA-01033", "starting up"),
    ("shutdown", "connect", lambda: ora(1089, "immediate shutdown or close in progress"),
     TransientError, "DPY-4011", "closed the connection"),
    ("svc-thick", "connect", lambda: ora(12514, "Cannot connect to database. Service x is not registered"),
     TransientError, "ORA-12514", "service name unknown"),
    ("no-listener", "connect", lambda: ora(12541, "Cannot connect. No listener"), TransientError, "ORA-12541",
     "no listener"),
    ("blocked", "connect", lambda: ora(12528, "TNS:listener: all appropriate instances are blocking"),
     TransientError, "ORA-12528", "refused"),
    ("table", "executemany", lambda: ora(942, "table or view does not exist"), FatalError, "ORA-00942",
     "tagwriter init-db"),
    ("privilege", "executemany", lambda: ora(1031, "insufficient privileges"), FatalError, "ORA-01031", "GRANT"),
    ("quota", "executemany", lambda: ora(1950, "no privileges on tablespace 'USERS'"), FatalError, "ORA-01950",
     "QUOTA"),
    ("eof", "executemany", lost, TransientError, "DPY-4011", "closed the connection"),
    ("lost", "executemany", lambda: ora(3135, "connection lost contact"), TransientError, "DPY-4011", ""),
    ("timeout", "executemany", lambda: dpy(4024, timeout=1000), TransientError, "DPY-4024", "host reachable?"),
    ("replay", "executemany", lambda: ora(25408, "can not safely replay call"), TransientError, "ORA-25408", ""),
    ("closed", "commit", lambda: dpy(1001), TransientError, "DPY-1001", ""),
    ("bug", "executemany", lambda: TypeError("expecting string"), FatalError, "TypeError", ""),
    # python-oracledb lets a DNS failure through as a bare socket.gaierror: a network problem
    ("dns", "connect", lambda: socket.gaierror(-2, "Name or service not known"), TransientError, "EAI_NONAME",
     "does not resolve"),
]


@pytest.mark.parametrize(("call", "error", "cls", "code", "hint"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors_are_classified_by_full_code(
    call: str, error: Callable[[], BaseException], cls: type[SinkError], code: str, hint: str
) -> None:
    sink, server, _ = make_sink()
    server.fail_next(call, error())
    with pytest.raises(SinkError) as info:
        sink.write_batch(rows(2))
    assert type(info.value) is cls
    assert info.value.code == code
    assert hint in info.value.hint
    assert "Help:" not in str(info.value)


def test_a_batch_error_that_is_not_about_its_row_fails_the_batch() -> None:
    sink, server, _ = make_sink()
    unusable = "index 'SCOTT.TAG_VALUES_PK' or partition of such index is in unusable state"
    server.row_errors = lambda row: (1502, unusable)
    with pytest.raises(FatalError) as info:
        sink.write_batch(rows(3))
    assert info.value.code == "ORA-01502"
    assert server.commits == 0 and server.rollbacks == 1
    assert server.stored() == []


def test_transient_error_drops_the_connection_and_the_next_write_reconnects() -> None:
    sink, server, _ = make_sink()
    sink.write_batch(rows(1))
    server.fail_next("executemany", lost())
    with pytest.raises(TransientError):
        sink.write_batch(rows(2, start=T0 + 10))
    wait_until(lambda: server.connections[0].closed, "the broken connection to be closed", 2.0)
    assert sink.write_batch(rows(2, start=T0 + 10)).written == 2
    assert server.connects == 2


def test_fatal_error_rolls_back_and_keeps_the_connection() -> None:
    sink, server, _ = make_sink()
    sink.write_batch(rows(1))
    server.fail_next("executemany", ora(1031, "insufficient privileges"))
    with pytest.raises(FatalError):
        sink.write_batch(rows(2, start=T0 + 10))
    assert server.rollbacks == 1
    assert sink.write_batch(rows(2, start=T0 + 10)).written == 2
    assert server.connects == 1


def test_password_never_appears_in_errors_or_describe() -> None:
    sink, server, _ = make_sink()
    server.fail_next("connect", ora(12154, f"TNS:could not resolve the connect identifier scott/{PASSWORD}@x"))
    with pytest.raises(FatalError) as info:
        sink.write_batch(rows(1))
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    assert PASSWORD not in sink.describe()
    assert "scott@127.0.0.1:1521/orclpdb" in sink.describe()


# -- the pool's bounds -----------------------------------------------------------------


def test_pool_exhaustion_raises_dpy_4005_after_the_wait_timeout() -> None:
    sink, _, _ = make_sink(pool_max=1, pool_wait_timeout=0.3)
    pool = sink._get_pool()
    held = pool.acquire()
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        sink.write_batch(rows(1))
    elapsed = time.monotonic() - started
    assert info.value.code == "DPY-4005"
    assert "busy" in str(info.value) and "pool_max" in info.value.hint
    assert 0.25 <= elapsed < 0.3 + 3.0
    pool.release(held)
    assert sink.write_batch(rows(1)).written == 1


def test_a_release_hands_the_connection_to_a_waiting_caller_at_once() -> None:
    """A write that waits for the only connection gets it when it is released, not at its wait timeout."""
    sink, _, _ = make_sink(pool_max=1, pool_wait_timeout=20.0)
    pool = sink._get_pool()
    held = pool.acquire()
    outcome: list[object] = []
    writer = threading.Thread(target=lambda: outcome.append(sink.write_batch(rows(1))))
    writer.start()
    wait_until(lambda: pool._waiting == 1, "the write to wait for a connection", 5.0)
    released = time.monotonic()
    pool.release(held)
    writer.join(20.0 + 5.0)
    waited = time.monotonic() - released
    assert [getattr(r, "written", r) for r in outcome] == [1]
    assert waited < 5.0, f"the waiting write got the connection {waited:.1f} s after its release"
    assert pool._waiting == 0
    sink.close()


def test_hanging_connects_are_bounded_and_capped_at_pool_max() -> None:
    sink, server, _ = make_sink(pool_max=2, connect_timeout=0.2, pool_wait_timeout=0.2)
    server.hang_connects()
    try:
        for _ in range(4):
            started = time.monotonic()
            with pytest.raises(TransientError) as info:
                sink.write_batch(rows(1))
            assert info.value.code == "DPY-4005"
            assert time.monotonic() - started < 0.2 + 0.2 + 3.0
        assert server.connects == 2  # parked connects are not multiplied
        assert "host reachable?" in info.value.hint
    finally:
        server.release_connects()
    # the connects that answered late joined the pool: no new connect needed
    wait_until(lambda: sink._get_pool().opened == 2, "the late connects to join the pool", 5.0)
    assert sink.write_batch(rows(1)).written == 1
    assert server.connects == 2
    sink.close()


def test_idle_connection_is_pinged_on_reuse_and_replaced_if_dead() -> None:
    sink, server, _ = make_sink(ping_interval=0.0)
    sink.write_batch(rows(1))
    sink.write_batch(rows(1, start=T0 + 1))
    assert server.pings >= 1 and server.connects == 1
    server.fail_next("ping", lost())
    assert sink.write_batch(rows(1, start=T0 + 2)).written == 1
    assert server.connects == 2


def test_probe_uses_its_own_connection_while_the_writer_holds_one() -> None:
    sink, server, _ = make_sink(pool_max=2)
    held = sink._get_pool().acquire()
    sink.probe()
    assert server.connects == 2
    sink._get_pool().release(held)


def test_open_checks_the_table_and_warms_pool_min() -> None:
    sink, _, _ = make_sink(pool_min=2)
    sink.open()
    wait_until(lambda: sink._get_pool().opened == 2, "the pool to warm to pool_min", 5.0)
    missing, _, _ = make_sink(FakeServer(exists=False))
    with pytest.raises(FatalError) as info:
        missing.open()
    assert info.value.code == "ORA-00942"


def test_close_is_bounded_even_with_parked_connects() -> None:
    sink, server, _ = make_sink(connect_timeout=0.1, pool_wait_timeout=0.1)
    server.hang_connects()
    try:
        with pytest.raises(TransientError):
            sink.write_batch(rows(1))
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 3.0
    finally:
        server.release_connects()
    # a connect that answers after close is closed, not leaked
    wait_until(lambda: all(c.closed for c in server.connections) and len(server.connections) == 1,
               "the late connect to be closed", 5.0)


# -- threads: calls on the caller's, connects on one long-lived worker -------------------


def count_thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads started from now on (threading.Thread.start patched)."""
    started: list[str] = []
    start = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    return started


def test_write_batch_starts_no_thread_and_runs_on_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = NoopDriver()
    sink = OracleSink(user="scott", password=PASSWORD, dsn="127.0.0.1:1521/orclpdb", driver=driver,
                      pool_min=1, pool_max=2)
    assert sink.write_batch(rows(5)).written == 5  # the first write connects, on the worker
    assert driver.connect_thread_names == {"tagwriter-oracle-worker"}
    started = count_thread_starts(monkeypatch)
    for i in range(100):
        assert sink.write_batch(group_chunk(T0 + 10 * i, T0 + 10 * i + 1, tags=5)).written == 10
        assert sink.write_batch(rows(5, start=T0 + 10 * i + 2)).written == 5
    assert started == []
    assert driver.thread_names == {threading.current_thread().name}
    assert driver.rows == 5 + 100 * 15 and driver.connects == 1
    assert sink._worker.started == 1 and sink._worker.replaced == 0
    sink.close()


def test_connects_reuse_the_worker_and_an_overrun_replaces_it() -> None:
    sink, server, _ = make_sink(pool_max=3, connect_timeout=0.2, pool_wait_timeout=0.2)
    assert sink.write_batch(rows(1)).written == 1
    sink._get_pool().discard_idle()  # the next write must connect again
    assert sink.write_batch(rows(1, start=T0 + 1)).written == 1
    worker = sink._worker
    assert (server.connects, worker.started, worker.replaced) == (2, 1, 0)
    first = worker.thread
    server.hang_connects()
    sink._get_pool().discard_idle()
    try:
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            sink.write_batch(rows(1, start=T0 + 2))
        assert time.monotonic() - started < 0.2 + 0.2 + 3.0
        assert info.value.code == "DPY-4005" and "connect_timeout" in str(info.value)
        assert (worker.started, worker.replaced) == (1, 1) and worker.thread is None
        assert first is not None and first.is_alive()  # parked in the connect that never answered
    finally:
        server.release_connects()
    wait_until(lambda: not first.is_alive(), "the abandoned worker to end after its connect", 5.0)
    # the late connect joined the pool: the next write needs no connect and no thread
    wait_until(lambda: sink._get_pool().opened == 1, "the late connect to join the pool", 5.0)
    assert sink.write_batch(rows(1, start=T0 + 3)).written == 1
    assert server.connects == 3 and worker.started == 1
    sink._get_pool().discard_idle()
    assert sink.write_batch(rows(1, start=T0 + 4)).written == 1  # a fresh worker for the next connect
    assert worker.started == 2 and worker.thread is not None and worker.thread is not first
    sink.close()


class FirstConnectHangs(FakeDriver):
    """The first connect waits for `gate` (a silent listener for one caller); later ones answer."""

    def __init__(self, server: FakeServer) -> None:
        super().__init__(server)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def connect(self, **params: Any) -> Any:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.entered.set()
            self.gate.wait(30.0)
        return super().connect(**params)


def test_a_connect_while_another_caller_holds_the_worker_does_not_wait_for_it() -> None:
    server = FakeServer()
    driver = FirstConnectHangs(server)
    sink = OracleSink(driver=driver, user="scott", password=PASSWORD, dsn="127.0.0.1:1521/orclpdb",
                      connect_timeout=3.0, pool_wait_timeout=3.0, call_timeout=1.0, pool_min=1, pool_max=3)
    errors: list[BaseException] = []
    prober = threading.Thread(target=lambda: errors.extend(_raised(sink.probe)))
    prober.start()
    try:
        assert driver.entered.wait(5.0)  # the probe's connect holds the worker
        started = time.monotonic()
        assert sink.write_batch(rows(2)).written == 2
        assert time.monotonic() - started < 1.0  # not the probe's connect_timeout of 3 s
        assert sink._worker.spares == 1
    finally:
        driver.gate.set()
        prober.join(5.0)
    assert errors == [] and server.connects == 2
    sink.close()


def _raised(fn: Callable[[], object]) -> list[BaseException]:
    try:
        fn()
    except BaseException as exc:
        return [exc]
    return []


# -- retry then outage through the real pipeline ---------------------------------------


def pipeline_config(tmp_path: Path) -> Config:
    return Config().replace(
        writer=WriterConfig(batch_size=50, flush_interval=0.01, retry_delays=[0.01, 0.01],
                            probe_interval=0.05, probe_max_interval=0.1, shutdown_timeout=5.0),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine")),
    )


def test_retry_then_outage_spools_and_recovers(tmp_path: Path) -> None:
    sink, server, _ = make_sink()
    pipeline = Pipeline(pipeline_config(tmp_path), sink=sink).start()
    try:
        wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 10)
        server.go_down(refused)  # open connections lose their session, new connects are refused
        pipeline.submit(PollingData("g", T0 / 1e6, {f"t{i}": float(i) for i in range(10)}))
        wait_until(lambda: pipeline.snapshot().spooled == 10, "the batch to spool", 10)
        snap = pipeline.snapshot()
        assert snap.retries == 2 and snap.outages == 1 and snap.written == 0
        assert "DPY-4011" in snap.last_error or "DPY-6005" in snap.last_error
        server.come_up()
        wait_until(lambda: pipeline.snapshot().state == "writing", "recovery", 10)
        pipeline.submit(PollingData("g", T0 / 1e6 + 1, {f"t{i}": float(i) for i in range(10)}))
        assert pipeline.flush(5.0)
    finally:
        assert pipeline.stop(5.0)
    snap = pipeline.snapshot()
    assert snap.written == 10 and snap.spooled == 10
    assert snap.submitted == snap.accounted == 20
    assert server.commits >= 1


def test_rejected_rows_are_quarantined_through_the_pipeline(tmp_path: Path) -> None:
    sink, _, _ = make_sink()
    with Pipeline(pipeline_config(tmp_path), sink=sink) as pipeline:
        pipeline.submit([TagValue("ok", T0, 1.0), TagValue("y" * 200, T0, 2.0)])
        assert pipeline.flush(5.0)
    snap = pipeline.snapshot()
    assert (snap.written, snap.quarantined, snap.submitted) == (1, 1, 2)
    quarantined = list((tmp_path / "backup" / "quarantine").rglob("*.csv"))
    assert quarantined and "ORA-12899" in quarantined[0].read_text()


def test_fatal_error_stops_retrying_and_spools(tmp_path: Path) -> None:
    sink, _, _ = make_sink(FakeServer(exists=False))
    with Pipeline(pipeline_config(tmp_path), sink=sink) as pipeline:
        pipeline.submit(rows(5))
        wait_until(lambda: pipeline.snapshot().spooled == 5, "the batch to spool", 10)
        snap = pipeline.snapshot()
        assert snap.state == "failed" and snap.retries == 0
        assert pipeline.fatal_error is not None
        assert "init-db" in pipeline.fatal_error.hint


# -- direct path -------------------------------------------------------------------------


def test_direct_path_loads_new_rows_and_counts_duplicates() -> None:
    sink, server, _ = make_sink(insert_mode="direct_path")
    sink.write_batch([TagValue("stored", T0, 1.0)])
    batch = [TagValue("stored", T0, 9.0), TagValue("a", T0, 1.0), TagValue("a", T0, 2.0), TagValue("b", T0 + 1, 3.0)]
    result = sink.write_batch(batch)
    assert (result.written, result.duplicates, result.rejected) == (2, 2, [])
    assert server.direct_path_calls == 2 and server.executemany_calls == 0
    assert [r[0] for r in server.stored()] == ["a", "b", "stored"]
    assert server.stored()[0][2] == 1.0  # the first of the in-batch duplicates wins


def test_direct_path_data_error_falls_back_to_row_errors_with_original_indexes() -> None:
    sink, server, _ = make_sink(insert_mode="direct_path")
    sink.write_batch([TagValue("stored", T0, 1.0)])
    batch = [TagValue("stored", T0, 1.0), TagValue("ok", T0, 1.0), TagValue("z" * 130, T0, 2.0)]
    result = sink.write_batch(batch)
    assert result.written == 1 and result.duplicates == 1
    assert result.rejected == [RowError(2, "ORA-12899", result.rejected[0].message)]
    assert server.executemany_calls == 1


def test_direct_path_needs_thin_mode() -> None:
    with pytest.raises(ConfigError, match="thin mode"):
        make_sink(insert_mode="direct_path", thick_mode=True)


# -- modes and configuration -------------------------------------------------------------


def test_thick_mode_initialises_the_client_once_and_skips_thin_only_params() -> None:
    sink, server, driver = make_sink(thick_mode=True, lib_dir="/opt/instantclient", config_dir="/etc/tns")
    sink.write_batch(rows(1))
    sink.write_batch(rows(1, start=T0 + 5))
    assert driver.init_calls == [{"lib_dir": "/opt/instantclient", "config_dir": "/etc/tns"}]
    assert "tcp_connect_timeout" not in server.connect_params[0]


def test_thin_connect_params_include_wallet_and_tcp_timeout() -> None:
    sink, server, _ = make_sink(config_dir="/etc/tns", wallet_location="/etc/wallet", wallet_password="wpw-123")
    sink.write_batch(rows(1))
    params = server.connect_params[0]
    assert params["tcp_connect_timeout"] == 0.5
    assert (params["config_dir"], params["wallet_location"], params["wallet_password"]) == (
        "/etc/tns", "/etc/wallet", "wpw-123")


def test_from_config_url_user_dsn_and_password_from_env() -> None:
    cfg = config_mod.load(None, env={"TAGWRITER_DATABASE__URL": "oracle://scott@db.example.com:1522/orclpdb",
                                     "TAGWRITER_DATABASE_PASSWORD": PASSWORD})
    sink = OracleSink.from_config(cfg.database, driver=FakeDriver())
    assert (sink.user, sink.dsn, sink._password) == ("scott", "db.example.com:1522/orclpdb", PASSWORD)
    assert sink.target == "db.example.com:1522"
    by_keys = OracleSink.from_config(DatabaseConfig(url="oracle://x@h/s", user="app", dsn="tcps://db:2484/svc"))
    assert (by_keys.user, by_keys.dsn, by_keys.target) == ("app", "tcps://db:2484/svc", "db:2484")
    default_port = OracleSink.from_config(DatabaseConfig(url="oracle://scott@dbhost/orclpdb"))
    assert default_port.dsn == "dbhost:1521/orclpdb"
    with pytest.raises(ConfigError, match="host and a service name"):
        OracleSink.from_config(DatabaseConfig(url="oracle://scott@dbhost"))
    with pytest.raises(ConfigError, match="needs a user"):
        OracleSink.from_config(DatabaseConfig(url="oracle://dbhost:1521/svc"))


def test_create_sink_builds_the_oracle_sink() -> None:
    from tagwriter.sinks import create_sink

    sink = create_sink(DatabaseConfig(url="oracle://scott@dbhost:1521/orclpdb", table="plant_values"))
    assert isinstance(sink, OracleSink) and sink.table == "PLANT_VALUES"


# -- DDL and inspection -------------------------------------------------------------------


def test_ddl_quotes_upper_case_names_with_optional_daily_partitions() -> None:
    sink, _, _ = make_sink()
    (plain,) = sink.ddl()
    assert '"TAG_NAME" VARCHAR2(128) NOT NULL' in plain and '"TS" TIMESTAMP(6) NOT NULL' in plain
    assert '"VALUE" BINARY_DOUBLE' in plain and '"QUALITY" NUMBER(5)' in plain
    assert 'CONSTRAINT "TAG_VALUES_PK" PRIMARY KEY ("TAG_NAME", "TS")' in plain
    assert "PARTITION" not in plain
    parted, note = sink.ddl(partition_by_day=True, read_index=True)
    assert "USING INDEX LOCAL" in parted
    assert "PARTITION BY RANGE (\"TS\") INTERVAL (NUMTODSINTERVAL(1, 'DAY'))" in parted
    assert note.startswith("-- ")
    long_sink, _, _ = make_sink(spec=None)
    long_sink.table = "T" * 40
    assert "CONSTRAINT" not in long_sink.ddl()[0]


def test_create_table_is_idempotent() -> None:
    sink, server, _ = make_sink(FakeServer(exists=False))
    assert sink.inspect_table() is None
    sink.create_table(partition_by_day=True)
    assert server.exists and "INTERVAL" in server.ddl[0]
    sink.create_table()  # ORA-00955 for the existing table is kept quiet
    info = sink.inspect_table()
    assert info is not None and sink.table_differences(info) == []


def test_inspect_reports_columns_and_key_and_differences_name_what_differs() -> None:
    sink, _, _ = make_sink()
    info = sink.inspect_table()
    assert info is not None
    assert [(c.name, c.type, c.nullable) for c in info.columns] == [
        ("TAG_NAME", "VARCHAR2(128)", False), ("TS", "TIMESTAMP(6)", False),
        ("VALUE", "BINARY_DOUBLE", True), ("QUALITY", "NUMBER(5)", True)]
    assert info.key == ["TAG_NAME", "TS"]
    wider = TableInfo([ColumnInfo("TAG_NAME", "VARCHAR2(256)", False), ColumnInfo("TS", "TIMESTAMP(9)", False),
                       ColumnInfo("VALUE", "BINARY_DOUBLE", True), ColumnInfo("QUALITY", "NUMBER", True)],
                      ["TS", "TAG_NAME"])
    assert sink.table_differences(wider) == []
    wrong = TableInfo([ColumnInfo("TAG_NAME", "VARCHAR2(64)", False), ColumnInfo("TS", "DATE", False),
                       ColumnInfo("VALUE", "NUMBER", False)], [])
    diffs = sink.table_differences(wrong)
    assert any("TAG_NAME is VARCHAR2(64)" in d for d in diffs)
    assert any("TS is DATE, expected TIMESTAMP(6)" in d for d in diffs)
    assert any("VALUE is NUMBER, expected BINARY_DOUBLE" in d for d in diffs)
    assert any("VALUE is NOT NULL" in d for d in diffs)
    assert any("QUALITY is missing" in d for d in diffs)
    assert any("no primary key" in d for d in diffs)


def test_admin_calls_on_the_fake() -> None:
    sink, server, _ = make_sink()
    assert sink.server_version() == "Oracle Database 23.4.0.24.5"
    sink.login()
    sink.try_insert()
    assert server.stored() == [] and server.rollbacks >= 1
    sink.ping()
    assert server.pings == 1
    server.fail_next("execute", ora(1031, "insufficient privileges"))
    with pytest.raises(FatalError) as info:
        sink.try_insert()
    assert info.value.code == "ORA-01031"


def test_tz_aware_datetimes_are_not_what_we_bind() -> None:
    """The sink binds naive UTC: an aware datetime would be taken at face value by the driver."""
    sink, server, _ = make_sink()
    sink.write_batch([TagValue("t", T0, 1.0)])
    (row,) = server.stored()
    assert isinstance(row[1], datetime) and row[1].tzinfo is None
    assert row[1] == datetime(2023, 11, 14, 22, 13, 20, 123_456)


def test_concurrent_writer_and_probe_share_the_pool_safely() -> None:
    sink, server, _ = make_sink(pool_max=2)
    errors: list[BaseException] = []

    def probe_loop() -> None:
        try:
            for _ in range(50):
                sink.probe()
        except BaseException as exc:
            errors.append(exc)

    prober = threading.Thread(target=probe_loop)
    prober.start()
    for i in range(50):
        sink.write_batch(rows(2, start=T0 + 10 * i))
    prober.join(10)
    assert not errors and len(server.stored()) == 100
    assert server.connects <= 2


def test_describe_never_shows_a_password_held_in_the_dsn() -> None:
    sink = OracleSink(user="scott", password="", dsn="scott/tiger-in-dsn@db.plant:1521/orclpdb1")
    assert "tiger-in-dsn" not in sink.describe() and "db.plant:1521/orclpdb1" in sink.describe()


"""PostgresSink against the real PostgreSQL on 127.0.0.1:5432 (a fresh database per test)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from faultproxy import FaultProxy
from pg_util import PgDatabase, create_role, fresh_database

from tagwriter.config import DatabaseConfig
from tagwriter.errors import ConfigError, FatalError, TransientError
from tagwriter.models import Chunk, TagValue, from_epoch_us
from tagwriter.sinks import create_sink
from tagwriter.sinks.base import AdminSink, Sink, TableSpec
from tagwriter.sinks.postgresql import (
    CONFLICT_MODE_BATCHES,
    PG_EPOCH_US,
    PostgresSink,
    Watchdog,
    classify,
)
from tagwriter.sinks.postgresql.binary import Encoder

T0 = 1_700_000_000_123_456  # 2023-11-14T22:13:20.123456Z


@pytest.fixture
def db() -> Iterator[PgDatabase]:
    with fresh_database() as d:
        yield d


def make_sink(db: PgDatabase, *, port: int | None = None, create: bool = True, **kw: object) -> PostgresSink:
    sink = PostgresSink(host=db.host, port=port or db.port, dbname=db.name, user=db.user, **kw)  # type: ignore[arg-type]
    if create:
        sink.create_table()
    return sink


@pytest.fixture
def sink(db: PgDatabase) -> Iterator[PostgresSink]:
    s = make_sink(db)
    yield s
    s.close()


def rows(n: int, start: int = 0, tag: str = "line1.t") -> list[TagValue]:
    return [TagValue(f"{tag}{i % 7}", T0 + i * 1_000_003, float(i) * 0.5, 192) for i in range(start, start + n)]


# -- shape -------------------------------------------------------------------


def test_implements_sink_and_admin_protocols(sink: PostgresSink) -> None:
    assert isinstance(sink, Sink)
    assert isinstance(sink, AdminSink)


def test_create_sink_reads_url_and_password_without_showing_it(db: PgDatabase) -> None:
    config = DatabaseConfig(url=db.url(), password="s3cret-pw", call_timeout=3.0, connect_timeout=2.0)
    sink = create_sink(config)
    assert isinstance(sink, PostgresSink)
    assert sink.connect_params()["password"] == "s3cret-pw"
    assert "s3cret-pw" not in sink.describe()
    assert sink.describe() == f"postgresql://{db.user}@{db.host}:{db.port}/{db.name} table tag_values"
    refused = create_sink(DatabaseConfig(url=f"postgresql://{db.user}@127.0.0.1:1/{db.name}",
                                         password="s3cret-pw", connect_timeout=2.0))
    with pytest.raises(TransientError) as info:
        refused.open()
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in info.value.hint


def test_identifiers_longer_than_postgres_allows_are_refused() -> None:
    with pytest.raises(ConfigError, match="63 bytes"):
        PostgresSink(spec=TableSpec(table="t" * 64))


def test_every_session_gets_the_timeouts(db: PgDatabase) -> None:
    sink = make_sink(db, call_timeout=4.0)
    try:
        sink.open()
        assert sink._conn is not None
        got = {name: sink._conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
               for name in ("statement_timeout", "idle_in_transaction_session_timeout", "application_name")}
        # tcp_user_timeout is a client-side socket option: SHOW on the server reports the
        # server's own socket, so read what libpq was given instead.
        client = sink._conn.info.get_parameters()
    finally:
        sink.close()
    assert got == {"statement_timeout": "3600ms", "idle_in_transaction_session_timeout": "8s",
                   "application_name": "tagwriter"}
    assert client.get("tcp_user_timeout") == "4000"
    assert client.get("keepalives") == "1"


# -- writing -----------------------------------------------------------------


def test_round_trip_keeps_microseconds_nan_inf_none_and_quality(db: PgDatabase, sink: PostgresSink) -> None:
    batch = [
        TagValue("a", T0, 1.25, 192),
        TagValue("a", T0 + 1, float("nan"), 0),
        TagValue("b", T0, float("inf"), 64),
        TagValue("b", T0 + 999_999, float("-inf"), -1),
        TagValue("c", T0, None, 32767),
        TagValue("ü-ñ 温度", -1, 5e-324, -32768),  # before 1970, non-ASCII tag
        TagValue("d", PG_EPOCH_US, 1.7976931348623157e308, 1),  # exactly PostgreSQL's epoch
    ]
    result = sink.write_batch(batch)
    assert (result.written, result.duplicates, result.rejected) == (7, 0, [])
    got = {(tag, ts): (value, quality) for tag, ts, value, quality in db.rows()}
    assert len(got) == len(batch)
    for row in batch:
        value, quality = got[(row.tag, from_epoch_us(row.ts_us))]
        assert quality == row.quality
        if row.value is None:
            assert value is None
        elif math.isnan(row.value):
            assert math.isnan(value)
        else:
            assert value == row.value
    with db.connect() as conn:
        us = conn.execute(
            "SELECT (extract(epoch FROM ts) * 1000000)::bigint FROM tag_values WHERE tag_name = 'b' ORDER BY ts"
        ).fetchall()
    assert [r[0] for r in us] == [T0, T0 + 999_999]


def test_duplicates_are_counted_within_and_across_batches(db: PgDatabase, sink: PostgresSink) -> None:
    batch = rows(50)
    assert sink.write_batch(batch).written == 50
    again = sink.write_batch(batch[:20] + rows(10, start=50))
    assert (again.written, again.duplicates) == (10, 20)
    twice = rows(5, start=100)
    inner = sink.write_batch(twice + twice)
    assert (inner.written, inner.duplicates) == (5, 5)
    assert db.count() == 65


def test_after_a_conflict_on_conflict_stays_on_then_plain_insert_returns(sink: PostgresSink) -> None:
    sink.write_batch(rows(10))
    assert sink._conflict_mode == 0
    assert sink.write_batch(rows(10)).duplicates == 10
    assert sink._conflict_mode == CONFLICT_MODE_BATCHES
    for k in range(CONFLICT_MODE_BATCHES):
        assert sink.write_batch(rows(3, start=1000 + 3 * k)).written == 3
    assert sink._conflict_mode == 0


def test_clean_batches_copy_straight_into_the_table_duplicates_go_as_one_insert(
    db: PgDatabase, sink: PostgresSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    for name in ("copy_data", "arrays"):
        real = getattr(Encoder, name)
        monkeypatch.setattr(Encoder, name, lambda self, chunk, real=real, name=name: (
            calls.append((name, len(chunk))), real(self, chunk))[1])
    assert sink.write_batch(rows(20)).written == 20
    assert calls == [("copy_data", 20)]  # direct COPY: no INSERT
    r = sink.write_batch(rows(30))  # 20 already there: unique violation, redone with ON CONFLICT
    assert (r.written, r.duplicates) == (10, 20)
    assert calls[1:] == [("copy_data", 30), ("arrays", 30)]
    r = sink.write_batch(rows(5, start=25))  # conflict mode: straight to the INSERT, no COPY tried first
    assert (r.written, r.duplicates) == (0, 5)
    assert calls[3:] == [("arrays", 5)]
    assert db.count() == 30


def test_a_replay_with_a_few_duplicates_per_batch_stays_on_the_insert(sink: PostgresSink) -> None:
    """Every batch with a duplicate restarts the count: the COPY returns only after a clean run."""
    sink.write_batch([r for i, r in enumerate(rows(1000)) if i % 100 == 50])
    for b in range(10):
        r = sink.write_batch(rows(100, start=100 * b))
        assert (r.written, r.duplicates) == (99, 1)
        assert sink._conflict_mode == CONFLICT_MODE_BATCHES
    sink.write_batch(rows(10, start=5000))
    assert sink._conflict_mode == CONFLICT_MODE_BATCHES - 1


def test_a_row_another_session_is_inserting_is_counted_once(
    db: PgDatabase, sink: PostgresSink, caplog: pytest.LogCaptureFixture
) -> None:
    """The INSERT skipping rows already there cannot see an open transaction's row: redone ON CONFLICT."""
    caplog.set_level(logging.INFO, logger="tagwriter.sinks.postgresql.sink")
    sink.write_batch(rows(10))
    assert sink.write_batch(rows(10)).duplicates == 10  # conflict mode: the INSERT of arrays
    batch = rows(20, start=100)
    with db.connect(autocommit=False) as other:
        other.execute("INSERT INTO tag_values VALUES (%s, %s, %s, %s)",
                      (batch[7].tag, from_epoch_us(batch[7].ts_us), -1.0, 0))
        results = []
        writer = threading.Thread(target=lambda: results.append(sink.write_batch(batch)))
        writer.start()
        with db.connect() as watch:  # the sink waits for the other transaction on the key
            deadline = time.monotonic() + 10
            while not watch.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tagwriter' "
                                    "AND wait_event_type = 'Lock'").fetchone()[0]:
                assert time.monotonic() < deadline, "the sink never waited for the other session"
                time.sleep(0.01)
        other.commit()
        writer.join(10)
    assert [(r.written, r.duplicates) for r in results] == [(19, 1)]
    assert db.count() == 30
    assert "isolating" not in caplog.text  # redone whole, not bisected as if a row were bad


def test_chunks_and_lists_store_the_same_rows(db: PgDatabase, sink: PostgresSink) -> None:
    batch = [*rows(40), TagValue("ü-ñ 温度", T0, None, -3), TagValue("x", T0 + 1, 7, 5)]  # type: ignore[arg-type]
    assert sink.write_batch(Chunk.of(batch[:21])).written == 21
    assert sink.write_batch(batch[21:]).written == 21
    want = [(r.tag, from_epoch_us(r.ts_us), None if r.value is None else float(r.value), r.quality) for r in batch]
    assert db.rows() == sorted(want, key=lambda r: (r[0], r[1]))
    r = sink.write_batch(Chunk.of(batch))  # the INSERT of arrays, from a chunk
    assert (r.written, r.duplicates) == (0, 42)


@pytest.mark.parametrize("optimistic", [True, False], ids=["copy", "insert"])
@pytest.mark.parametrize("shape", ["one stamp", "polls", "every stamp", "qualities vary"])
def test_batches_of_every_shape_are_stored_exactly(db: PgDatabase, optimistic: bool, shape: str) -> None:
    """Both encodings, down each of their branches: a stamp per batch, per poll, per row; one quality or several."""
    stamp = {"one stamp": lambda i: T0, "every stamp": lambda i: T0 + i}.get(
        shape, lambda i: T0 + (i // 50) * 100_000)
    n = 50 if shape == "one stamp" else 200
    batch = Chunk.of([TagValue(f"line{i % 50}.v", stamp(i), None if i % 37 == 3 else i / 3,
                               i % 5 if shape == "qualities vary" else 192) for i in range(n)])
    sink = make_sink(db, optimistic=optimistic)
    try:
        assert sink.write_batch(batch).written == len(batch)
        assert sink.write_batch(batch).duplicates == len(batch)
    finally:
        sink.close()
    want = sorted((r.tag, from_epoch_us(r.ts_us), r.value, r.quality) for r in batch)
    assert db.rows() == want


def test_the_insert_of_arrays_stores_what_copy_stores(db: PgDatabase) -> None:
    """The conflict path's binary arrays: NULLs, NaN, infinities, microseconds, non-ASCII tags, many stamps."""
    sink = make_sink(db, optimistic=False)
    try:
        batch = [
            TagValue("a", T0, 1.25, 192), TagValue("a", T0 + 1, float("nan"), 0),
            TagValue("b", T0, float("-inf"), 32767), TagValue("c", -1, None, -32768),
            TagValue("ü-ñ 温度", PG_EPOCH_US, 5e-324, 1),
            *(TagValue(f"t{i}", T0 + i * 7, float(i), i % 3) for i in range(300)),
        ]
        assert sink.write_batch(Chunk.of(batch)).written == len(batch)
        got = {(tag, ts): (value, quality) for tag, ts, value, quality in db.rows()}
        for row in batch:
            value, quality = got[(row.tag, from_epoch_us(row.ts_us))]
            assert quality == row.quality
            assert (value is None and row.value is None) or value == row.value or (
                math.isnan(value) and math.isnan(row.value))  # type: ignore[arg-type]
    finally:
        sink.close()


def test_quality_outside_a_smallint_column_is_refused_per_row_not_wrapped(db: PgDatabase, sink: PostgresSink) -> None:
    """Binary COPY would store 40000 in a smallint as -25536: the row is refused before sending."""
    batch = rows(10)
    batch[4] = batch[4]._replace(quality=40_000)
    result = sink.write_batch(batch)
    assert [(e.index, e.code) for e in result.rejected] == [(4, "22003")]
    assert result.written == 9
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM tag_values WHERE quality <> 192").fetchone()[0] == 0


def test_a_data_error_in_the_direct_copy_isolates_the_row(db: PgDatabase) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE tag_values (tag_name varchar(8) NOT NULL, ts timestamptz NOT NULL, "
                     "value double precision, quality integer, PRIMARY KEY (tag_name, ts))")
    sink = make_sink(db, create=False)
    try:
        batch = rows(12, tag="t")
        batch[7] = batch[7]._replace(tag="much-too-long-for-8")
        result = sink.write_batch(batch)
        assert [(e.index, e.code) for e in result.rejected] == [(7, "22001")]
        assert result.written == 11 and db.count() == 11
        assert sink.write_batch(rows(5, start=100, tag="t")).written == 5
    finally:
        sink.close()


def test_always_on_conflict_mode_gives_the_same_counts(db: PgDatabase) -> None:
    sink = make_sink(db, optimistic=False)
    try:
        assert sink.write_batch(rows(30)).written == 30
        r = sink.write_batch(rows(40))
        assert (r.written, r.duplicates) == (10, 30)
        assert sink._conflict_mode == -1
    finally:
        sink.close()


def test_bad_rows_are_isolated_and_the_rest_commits(db: PgDatabase, sink: PostgresSink) -> None:
    with db.connect() as conn:
        conn.execute("ALTER TABLE tag_values ADD CONSTRAINT value_below_1e6 "
                     "CHECK (value IS NULL OR value = 'NaN' OR value < 1e6)")
    batch = rows(40)
    batch[3] = batch[3]._replace(value=2e6)  # check violation, 23514
    batch[17] = batch[17]._replace(quality=40_000)  # smallint out of range, 22003
    batch[18] = batch[18]._replace(value=5e6)
    batch[39] = batch[39]._replace(tag="nul\x00tag")  # refused before sending, 22021
    sink.write_batch(batch[:5])  # rows 0-4 (with the bad row 3) already there
    result = sink.write_batch(batch)
    codes = {(e.index, e.code) for e in result.rejected}
    assert codes == {(3, "23514"), (17, "22003"), (18, "23514"), (39, "22021")}
    assert "value_below_1e6" in next(e.message for e in result.rejected if e.index == 3)
    assert result.written + result.duplicates + len(result.rejected) == 40
    assert (result.written, result.duplicates) == (32, 4)
    assert db.count() == 36
    assert sink.write_batch(rows(5, start=500)).written == 5  # the session is still usable


def test_rows_refused_before_sending_do_not_shift_the_bisection(db: PgDatabase, sink: PostgresSink) -> None:
    """A row refused client-side in the middle, a server-side error at the end: every other row lands."""
    with db.connect() as conn:
        conn.execute("ALTER TABLE tag_values ADD CONSTRAINT value_below_1e6 "
                     "CHECK (value IS NULL OR value = 'NaN' OR value < 1e6)")
    batch = rows(20)
    batch[5] = batch[5]._replace(tag="nul\x00tag")
    batch[19] = batch[19]._replace(value=2e6)
    result = sink.write_batch(batch)
    assert sorted((e.index, e.code) for e in result.rejected) == [(5, "22021"), (19, "23514")]
    assert (result.written, result.duplicates) == (18, 0) and db.count() == 18


def test_not_null_violation_is_a_row_error(db: PgDatabase, sink: PostgresSink) -> None:
    with db.connect() as conn:
        conn.execute("ALTER TABLE tag_values ALTER COLUMN value SET NOT NULL")
    batch = rows(8)
    batch[6] = batch[6]._replace(value=None)
    result = sink.write_batch(batch)
    assert [(e.index, e.code) for e in result.rejected] == [(6, "23502")]
    assert result.written == 7


def test_every_row_bad_commits_nothing_and_reports_each(db: PgDatabase, sink: PostgresSink) -> None:
    batch = [r._replace(quality=70_000 + i) for i, r in enumerate(rows(33))]
    result = sink.write_batch(batch)
    assert sorted(e.index for e in result.rejected) == list(range(33))
    assert result.written == 0 and db.count() == 0


def test_out_of_range_timestamp_and_non_numbers_are_refused_before_sending(sink: PostgresSink) -> None:
    batch = rows(4)
    batch[1] = batch[1]._replace(ts_us=10**19)
    batch[2] = batch[2]._replace(value="12")  # type: ignore[arg-type]
    result = sink.write_batch(batch)
    assert [(e.index, e.code) for e in result.rejected] == [(1, "22008"), (2, "22P02")]
    assert result.written == 2


def test_concurrent_writers_of_the_same_rows_store_each_once(db: PgDatabase) -> None:
    sinks = [make_sink(db, create=False) for _ in range(2)]
    sinks[0].create_table()
    results = [[], []]  # type: ignore[var-annotated]

    def work(k: int) -> None:
        for b in range(20):
            results[k].append(sinks[k].write_batch(rows(100, start=b * 50)))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in sinks:
        s.close()
    distinct = 19 * 50 + 100
    assert db.count() == distinct
    assert sum(r.written for rs in results for r in rs) == distinct
    assert sum(r.written + r.duplicates for rs in results for r in rs) == 2 * 20 * 100


# -- classification ------------------------------------------------------------


def test_missing_table_is_fatal_with_a_hint(db: PgDatabase) -> None:
    sink = make_sink(db, create=False)
    with pytest.raises(FatalError) as info:
        sink.open()
    assert info.value.code == "42P01" and "init-db" in info.value.hint
    with pytest.raises(FatalError):
        sink.probe()
    with pytest.raises(FatalError):
        sink.write_batch(rows(1))


def test_table_dropped_while_running_is_fatal(db: PgDatabase, sink: PostgresSink) -> None:
    sink.write_batch(rows(3))
    with db.connect() as conn:
        conn.execute("DROP TABLE tag_values")
    with pytest.raises(FatalError) as info:
        sink.write_batch(rows(3, start=10))
    assert info.value.code == "42P01"


def test_table_without_the_key_is_refused(db: PgDatabase) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE tag_values (tag_name text NOT NULL, ts timestamptz NOT NULL, "
                     "value double precision, quality smallint)")
    sink = make_sink(db, create=False)
    with pytest.raises(FatalError) as info:
        sink.open()
    assert info.value.code == "42P10" and "PRIMARY KEY" in info.value.hint


def test_missing_database_and_role_are_fatal(db: PgDatabase) -> None:
    no_db = PostgresSink(host=db.host, port=db.port, dbname=db.name + "_missing", user=db.user)
    with pytest.raises(FatalError) as info:
        no_db.open()
    assert info.value.code == "3D000" and "does not exist" in str(info.value)
    no_role = PostgresSink(host=db.host, port=db.port, dbname=db.name, user="tw_no_such_role")
    with pytest.raises(FatalError) as info:
        no_role.login()
    assert info.value.code == "28000"


def test_insufficient_privilege_is_fatal(db: PgDatabase) -> None:
    make_sink(db).close()
    role = create_role(db)
    sink = PostgresSink(host=db.host, port=db.port, dbname=db.name, user=role)
    with pytest.raises(FatalError) as info:
        sink.write_batch(rows(2))
    assert info.value.code == "42501" and "GRANT" in info.value.hint.upper()
    with pytest.raises(FatalError):
        sink.try_insert()
    with db.connect() as conn:
        conn.execute(f'GRANT SELECT, INSERT ON tag_values TO "{role}"')
    assert sink.write_batch(rows(2)).written == 2
    sink.try_insert()
    sink.close()


def test_refused_connection_is_transient_and_quick() -> None:
    sink = PostgresSink(host="127.0.0.1", port=1, dbname="x", user="postgres", connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(TransientError):
        sink.open()
    with pytest.raises(TransientError, match=r"cannot reach 127\.0\.0\.1:1"):
        sink.reach()
    assert time.monotonic() - started < 2.0


def test_terminated_session_is_transient_and_the_next_write_reconnects(db: PgDatabase, sink: PostgresSink) -> None:
    sink.write_batch(rows(2))
    with db.connect() as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND application_name = 'tagwriter'", (db.name,))
    with pytest.raises(TransientError):
        sink.write_batch(rows(2, start=2))
    assert sink.write_batch(rows(2, start=2)).written == 2


def test_statement_timeout_cancels_on_the_server_and_keeps_the_bound(db: PgDatabase) -> None:
    sink = make_sink(db, call_timeout=1.0)
    sink.write_batch(rows(1))
    with db.connect(autocommit=False) as locker:
        locker.execute("LOCK TABLE tag_values IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            sink.write_batch(rows(3, start=5))
        took = time.monotonic() - started
        locker.rollback()
    assert info.value.code in ("57014", "TIMEOUT")
    assert took < 1.5
    assert sink.write_batch(rows(3, start=5)).written == 3
    sink.close()


@pytest.mark.parametrize(
    ("message", "code", "kind"),
    [
        ('connection failed: connection to server at "h", port 5432 failed: FATAL:  password '
         'authentication failed for user "u"', "28P01", FatalError),
        ('connection failed: FATAL:  no pg_hba.conf entry for host "10.0.0.1"', "28000", FatalError),
        ("connection failed: FATAL:  the database system is starting up", "OperationalError", TransientError),
        ("connection failed: FATAL:  sorry, too many clients already", "OperationalError", TransientError),
        ("consuming input failed: server closed the connection unexpectedly", "OperationalError",
         TransientError),
    ],
)
def test_connection_messages_without_sqlstate(message: str, code: str, kind: type) -> None:
    import psycopg

    err = classify(psycopg.OperationalError(message), "connect")
    assert isinstance(err, kind) and err.code == code


# -- bounded calls (through the fault proxy) -------------------------------------


@pytest.fixture
def proxy(db: PgDatabase) -> Iterator[FaultProxy]:
    with FaultProxy((db.host, db.port)) as p:
        yield p


def test_black_holed_write_ends_within_call_timeout(db: PgDatabase, proxy: FaultProxy) -> None:
    sink = make_sink(db, port=proxy.port, call_timeout=1.0, connect_timeout=2.0)
    assert sink.write_batch(rows(5)).written == 5
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        sink.write_batch(rows(500, start=5))
    took = time.monotonic() - started
    assert info.value.code == "TIMEOUT" and "call_timeout" in str(info.value)
    assert 0.9 < took < 1.6
    started = time.monotonic()
    with pytest.raises(TransientError):  # connecting to the black hole: connect_timeout
        sink.write_batch(rows(5, start=5))
    with pytest.raises(TransientError):
        sink.probe()
    assert time.monotonic() - started < 2 * 2.0 + 1.0
    proxy.pass_through()
    assert sink.write_batch(rows(500, start=5)).written == 500
    sink.close()


def test_reset_in_the_middle_of_copy_is_transient_and_commits_nothing(db: PgDatabase, proxy: FaultProxy) -> None:
    sink = make_sink(db, port=proxy.port)
    assert sink.write_batch(rows(5)).written == 5
    proxy.reset_after(4000, only=b"d")
    with pytest.raises(TransientError):
        sink.write_batch(rows(500, start=5))
    assert proxy.stats.reset_mid_message == b"d"
    assert db.count() == 5
    assert sink.write_batch(rows(500, start=5)).written == 500
    sink.close()


def test_probe_runs_on_its_own_connection_while_a_write_is_held(db: PgDatabase, proxy: FaultProxy) -> None:
    sink = make_sink(db, port=proxy.port, call_timeout=5.0)
    sink.write_batch(rows(1))
    proxy.latency(0.3)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (sink.write_batch(rows(200, start=1)), done.set()))
    writer.start()
    direct = make_sink(db, create=False)
    direct.probe()  # the direct sink's probe is not delayed by the proxied write
    sink.probe()
    writer.join(10)
    assert done.is_set()
    sink.close()


def test_watchdog_fires_only_for_the_overrunning_guard() -> None:
    import socket as _socket

    dog = Watchdog()
    a, b = _socket.socketpair()

    class FakeConn:  # the watchdog only needs pgconn.socket
        class pgconn:
            socket = a.fileno()

    with dog.guard(FakeConn(), 5.0, "fast"):  # type: ignore[arg-type]
        pass
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"slow: no answer within 0\.2 s"), \
            dog.guard(FakeConn(), 0.2, "slow"):  # type: ignore[arg-type]
        a.settimeout(5)
        try:
            data = a.recv(10)  # blocks until the watchdog shuts the socket down
        except OSError:
            raise
        raise OSError(f"socket shut down, read {data!r}")
    assert time.monotonic() - started < 1.0
    dog.close()
    a.close()
    b.close()


# -- admin -------------------------------------------------------------------------


def test_admin_methods(db: PgDatabase) -> None:
    sink = make_sink(db, create=False)
    assert sink.reach() == f"{db.host}:{db.port}"
    sink.login()
    assert sink.server_version().startswith("PostgreSQL ")
    sink.ping()
    assert sink.inspect_table() is None
    sink.create_table(read_index=True)
    sink.create_table(read_index=True)  # idempotent
    info = sink.inspect_table()
    assert info is not None
    assert [c.name for c in info.columns] == ["tag_name", "ts", "value", "quality"]
    assert info.key == ["tag_name", "ts"]
    assert sink.table_differences(info) == []
    sink.try_insert()
    assert db.count() == 0  # the probe row was rolled back
    with db.connect() as conn:
        idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'tag_values'").fetchall()
    assert any("brin" in r[0] for r in idx)


def test_table_differences_name_what_is_wrong(db: PgDatabase) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE tag_values (tag_name text, ts timestamp NOT NULL, "
                     "quality integer, PRIMARY KEY (ts, tag_name))")
    sink = make_sink(db, create=False)
    info = sink.inspect_table()
    assert info is not None and info.key == ["ts", "tag_name"]
    diffs = sink.table_differences(info)
    assert diffs == [
        "column ts is timestamp without time zone, expected timestamptz",
        "column value is missing (expected double precision)",
    ]
    with db.connect() as conn:
        conn.execute("ALTER TABLE tag_values DROP CONSTRAINT tag_values_pkey")
    info = sink.inspect_table()
    assert info is not None
    assert any(d.startswith("no primary key") for d in sink.table_differences(info))


def test_partitioned_by_day_table_takes_writes(db: PgDatabase) -> None:
    sink = make_sink(db, create=False)
    sink.create_table(partition_by_day=True)
    info = sink.inspect_table()
    assert info is not None and sink.table_differences(info) == []
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    batch = [TagValue("p", now_us + i, float(i), 192) for i in range(10)] + [TagValue("old", T0, 1.0, 192)]
    assert sink.write_batch(batch).written == 11
    assert sink.write_batch(batch).duplicates == 11
    with db.connect() as conn:
        default = conn.execute('SELECT count(*) FROM "tag_values_default"').fetchone()
    assert default is not None and default[0] == 1
    sink.close()


def test_custom_table_and_column_names(db: PgDatabase) -> None:
    spec = TableSpec("Plant_Values", "tag", "t", "v", "q")
    sink = make_sink(db, spec=spec)
    assert sink.write_batch(rows(3)).written == 3
    info = sink.inspect_table()
    assert info is not None and sink.table_differences(info) == []
    assert db.count("Plant_Values") == 0 or True  # column names differ from db.rows(); count below
    with db.connect() as conn:
        n = conn.execute('SELECT count(*) FROM "Plant_Values" WHERE "tag" LIKE %s', ("line1.t%",)).fetchone()
    assert n is not None and n[0] == 3
    sink.close()

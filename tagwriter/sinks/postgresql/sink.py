"""`PostgresSink`: the tagwriter table in PostgreSQL through psycopg 3 (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tagwriter.checks import verify_table
from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError, RowError, SinkError, TransientError
from tagwriter.models import Chunk, TagValue
from tagwriter.redact import register
from tagwriter.sinks.base import ColumnInfo, ColumnRule, TableInfo, TableSpec, WriteResult, table_differences
from tagwriter.sinks.postgresql.binary import COPY_COLUMNS, Encoder, register_dumpers
from tagwriter.sinks.postgresql.errors import classify, error_text, is_row_error
from tagwriter.sinks.postgresql.rows import INT8_END, stage_rows
from tagwriter.sinks.postgresql.watchdog import Watchdog

log = logging.getLogger(__name__)

MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1)
LIBPQ_MIN_CONNECT_TIMEOUT = 2  # libpq (and psycopg) raise anything lower to 2 s

# The table's quality column type (format_type()) -> its binary type and bound.
_QUALITY_TYPES = {"smallint": ("int2", 1 << 15), "integer": ("int4", 1 << 31), "bigint": ("int8", 1 << 63)}
_DIRECT_TAG = ("text", "character varying")  # tag column types binary COPY can fill from text

STATEMENT_SHARE = 0.9  # statement_timeout as a share of call_timeout

# After a unique violation, skip the direct COPY until this many batches in a
# row came without a duplicate.
CONFLICT_MODE_BATCHES = 50


def quote_ident(name: str) -> str:
    """A double-quoted identifier (names from config are already validated)."""
    return '"' + name.replace('"', '""') + '"'


class PostgresSink:
    """A PostgreSQL table. `write_batch`/`open` from one thread; `probe` and the
    admin methods open their own connections and may run on any thread."""

    kind = "postgresql"

    def __init__(
        self,
        *,
        host: str = "",
        port: int | None = None,
        dbname: str = "",
        user: str = "",
        password: str = "",
        spec: TableSpec | None = None,
        connect_timeout: float = 5.0,
        call_timeout: float = 10.0,
        optimistic: bool = True,
        application_name: str = "tagwriter",
    ) -> None:
        self.spec = spec = spec or TableSpec()
        for name in (spec.table, *spec.columns):
            if len(name.encode()) > MAX_IDENTIFIER:
                raise ConfigError(f"database: name {name!r} is longer than PostgreSQL's {MAX_IDENTIFIER} bytes")
        self.host, self.port, self.dbname, self.user = host, port, dbname, user
        register(password)  # a sink built without a validated config (library use) is redacted too
        self._password = password
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.optimistic = optimistic
        self.application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._dog = Watchdog()
        self._conflict_mode = 0 if optimistic else -1  # -1: never the direct COPY
        copy_cols = ", ".join(quote_ident(getattr(spec, c)) for c in COPY_COLUMNS)
        self._direct_copy = f"COPY {quote_ident(spec.table)} ({copy_cols}) FROM STDIN (FORMAT BINARY)"
        # Read at open(): whether the table's columns take a direct binary COPY, the
        # quality column's binary type and bound (sending more is refused per row first).
        self._direct = False
        self._quality_bound = INT8_END
        self._encoder = Encoder()
        self._insert_new, self._insert = self._insert_sql("int2")

    def _insert_sql(self, quality_type: str) -> tuple[str, str]:
        """The INSERTs of a batch sent as binary arrays: of the rows not in the table yet, and ON CONFLICT DO NOTHING.

        The first is a plain INSERT after an index probe per row (LATERAL ...
        LIMIT 1: always a nested loop on the key; partitions are pruned at run
        time). Measured here at 1 % duplicates, 500-row batches: ~8 % less time
        than ON CONFLICT's speculative insertion of every row. It cannot see rows
        of transactions still open (a concurrent writer) nor a key twice in the
        batch: those raise a unique violation, and the batch is redone with the second.
        """
        s = self.spec
        t = quote_ident(s.table)
        cols = ", ".join(quote_ident(c) for c in s.columns)
        tag, ts = quote_ident(s.tag), quote_ident(s.ts)
        rows = (f"unnest(%b::text[], %b::timestamptz[], %b::float8[], %b::{quality_type}[]) "
                "AS u(tag, ts, value, quality)")
        new = (f"INSERT INTO {t} ({cols}) SELECT u.* FROM {rows} LEFT JOIN LATERAL "
               f"(SELECT 1 AS hit FROM {t} AS x WHERE x.{tag} = u.tag AND x.{ts} = u.ts LIMIT 1) AS h ON true "
               "WHERE h.hit IS NULL")
        return new, f"INSERT INTO {t} ({cols}) SELECT * FROM {rows} ON CONFLICT ({tag}, {ts}) DO NOTHING"

    @classmethod
    def from_config(cls, config: DatabaseConfig) -> PostgresSink:
        url = parse_url(config.url)
        return cls(
            host=url.host, port=url.port, dbname=url.name,
            user=config.user or url.user, password=config.password or url.password,
            spec=TableSpec.from_config(config),
            connect_timeout=config.connect_timeout, call_timeout=config.call_timeout,
        )

    def describe(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"postgresql://{user}{self._where()}/{self.dbname} table {self.spec.table}"

    def _where(self) -> str:
        return f"{self.host or 'localhost'}:{self.port or 5432}"

    # -- connections -------------------------------------------------------

    def connect_params(self) -> dict[str, Any]:
        """psycopg.connect keyword arguments, password included: never log them."""
        call_ms = max(1, round(self.call_timeout * 1000))
        # The server cancels a slow statement a little before the watchdog
        # would close the connection, so a merely slow server keeps its session.
        statement_ms = max(1, round(call_ms * STATEMENT_SHARE))
        params: dict[str, Any] = {
            "dbname": self.dbname or None,
            "user": self.user or None,
            "password": self._password or None,
            "host": self.host or None,
            "port": self.port,
            "connect_timeout": max(LIBPQ_MIN_CONNECT_TIMEOUT, math.ceil(self.connect_timeout)),
            "application_name": self.application_name,
            "options": (
                f"-c statement_timeout={statement_ms} "
                f"-c idle_in_transaction_session_timeout={max(1000, 2 * call_ms)}"
            ),
            "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(self.call_timeout)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": call_ms,
        }
        return {k: v for k, v in params.items() if v is not None}

    def connect(self, where: str = "connect") -> psycopg.Connection[Any]:
        """A new session with the timeouts set; raises TransientError/FatalError."""
        try:
            return psycopg.connect(**self.connect_params())
        except psycopg.Error as exc:
            raise classify(exc, f"{where} to {self._where()}") from None
        except OSError as exc:  # pragma: no cover - libpq reports these as OperationalError
            raise TransientError(f"{where} to {self._where()}: {exc}") from None

    @contextlib.contextmanager
    def _session(self, where: str) -> Iterator[psycopg.Connection[Any]]:
        """A short-lived connection for probe and admin calls, closed afterwards."""
        conn = self.connect(where)
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _call(self, conn: psycopg.Connection[Any], where: str) -> contextlib.AbstractContextManager[None]:
        return self._dog.guard(conn, self.call_timeout, where)

    def open(self) -> None:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        conn = self.connect("open")
        where = f"open {self.spec.table}"
        try:
            with self._call(conn, where):
                # The codes PostgreSQL itself gives: no such table; ON CONFLICT without the key.
                info = verify_table(self, self._table_info(conn), where=where, codes=("42P01", "42P10"))
                direct, quality_type, self._quality_bound = self._column_types(info)
                conn.commit()
                # Every write is one statement, atomic on its own: autocommit saves the BEGIN
                # and COMMIT round trips (at 500-row batches a fifth of the time or more).
                # Only the isolation of bad rows opens a transaction, explicitly.
                conn.autocommit = True
        except psycopg.Error as exc:
            _close_quietly(conn)
            raise classify(exc, where) from None
        except SinkError:
            _close_quietly(conn)
            raise
        register_dumpers(conn.adapters)
        self._direct = direct and self.optimistic
        self._encoder = Encoder(quality_type)
        self._insert_new, self._insert = self._insert_sql(quality_type)
        self._conn = conn

    def _column_types(self, info: TableInfo) -> tuple[bool, str, int]:
        """Whether binary COPY fits the table's columns as they are, the quality column's binary type and bound."""
        types = {c.name: c.type for c in info.columns}
        tag, ts, value, quality = (types.get(c, "") for c in self.spec.columns)
        q_type, bound = _QUALITY_TYPES.get(quality, ("int8", INT8_END))
        direct = (tag.startswith(_DIRECT_TAG) and ts == "timestamp with time zone"
                  and value == "double precision" and quality in _QUALITY_TYPES)
        return direct, q_type, bound

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def close(self) -> None:
        self._reset()
        self._dog.close()

    # -- writing -----------------------------------------------------------

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if not rows:
            return WriteResult(0)
        self.open()  # first: the table's quality column type bounds what may be sent
        chunk, positions, rejected = stage_rows(rows, self._quality_bound)
        if not chunk:
            return WriteResult(0, 0, rejected)
        conn = self._conn
        assert conn is not None
        where = f"write to {self.spec.table}"
        try:
            try:
                with self._call(conn, where):
                    written = self._write(conn, chunk)
                return WriteResult(written, len(chunk) - written, rejected)
            except psycopg.Error as exc:
                if not is_row_error(exc):
                    raise
                first = exc
            log.info("batch of %d hit a row error (%s %s): isolating the bad rows",
                     len(chunk), first.sqlstate, error_text(first))
            result = self._isolate(conn, chunk, positions, where)
            result.rejected = sorted(rejected + result.rejected, key=lambda e: e.index)
            return result
        except psycopg.Error as exc:
            self._reset()
            raise classify(exc, where) from None
        except SinkError:
            self._reset()
            raise

    def _write(self, conn: psycopg.Connection[Any], chunk: Chunk) -> int:
        """The batch in one statement (autocommit); the number of rows inserted.

        While no duplicates are seen: a binary COPY straight into the table (the
        cheapest insert PostgreSQL has). A unique violation puts the sink in
        conflict mode: the batch, and the following ones until
        CONFLICT_MODE_BATCHES in a row come without a duplicate, go as one
        INSERT of binary arrays that skips the rows already there (see
        `_insert_sql`): one round trip, no staging table. A replay after an
        outage brings a few duplicates in nearly every batch: trying the COPY
        first would pay twice for each. A row error (class 22/23) propagates:
        the caller isolates the bad rows.
        """
        with conn.cursor() as cur:
            if self._conflict_mode == 0 and self._direct:
                try:
                    with cur.copy(self._direct_copy) as copy:
                        copy.write(self._encoder.copy_data(chunk))
                    return len(chunk)
                except psycopg.errors.UniqueViolation:
                    self._conflict_mode = CONFLICT_MODE_BATCHES
            arrays = self._encoder.arrays(chunk)
            try:
                cur.execute(self._insert_new, arrays, prepare=True)
            except psycopg.errors.UniqueViolation:
                cur.execute(self._insert, arrays, prepare=True)
            written = cur.rowcount
        if self._conflict_mode > 0:
            self._conflict_mode = CONFLICT_MODE_BATCHES if written < len(chunk) else self._conflict_mode - 1
        return written

    def _isolate(self, conn: psycopg.Connection[Any], chunk: Chunk, positions: list[int] | None,
                 where: str) -> WriteResult:
        """Insert the batch range by range under savepoints in one transaction; bisect failing ranges."""
        rejected: list[RowError] = []
        written = 0
        with conn.cursor() as cur:
            with self._call(conn, where):
                cur.execute("BEGIN")
            pending = [(0, len(chunk))]
            while pending:
                lo, hi = pending.pop()
                with self._call(conn, where):
                    cur.execute("SAVEPOINT tagwriter_rows")
                    try:
                        cur.execute(self._insert, self._encoder.arrays(chunk[lo:hi]))
                    except psycopg.Error as exc:
                        if not is_row_error(exc):
                            raise
                        cur.execute("ROLLBACK TO SAVEPOINT tagwriter_rows")
                        if hi - lo == 1:
                            pos = positions[lo] if positions else lo
                            rejected.append(RowError(pos, exc.sqlstate or "", error_text(exc)))
                        else:
                            mid = (lo + hi) // 2
                            pending += [(mid, hi), (lo, mid)]
                        continue
                    written += cur.rowcount
                    cur.execute("RELEASE SAVEPOINT tagwriter_rows")
            with self._call(conn, where):
                cur.execute("COMMIT")
        good = len(chunk) - len(rejected)
        return WriteResult(written, good - written, rejected)

    # -- checks ------------------------------------------------------------

    def probe(self) -> None:
        where = f"probe {self._where()}"
        with self._session(where) as conn:
            try:
                with self._call(conn, where):
                    conn.execute(f"SELECT 1 FROM {quote_ident(self.spec.table)} LIMIT 0")
            except psycopg.Error as exc:
                raise classify(exc, where) from None

    def reach(self) -> str:
        """TCP connect to the server (no login); returns host:port."""
        port = self.port or 5432
        host = self.host or "localhost"
        if host.startswith("/"):
            path = os.path.join(host, f".s.PGSQL.{port}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(self.connect_timeout)
                    s.connect(path)
            except OSError as exc:
                raise TransientError(f"cannot reach {path}: {exc.strerror or exc}",
                                     hint="is PostgreSQL running?") from None
            return path
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout):
                pass
        except TimeoutError:
            raise TransientError(f"cannot reach {host}:{port}: no answer within {self.connect_timeout:g} s",
                                 hint="check the host, port and firewalls") from None
        except OSError as exc:
            raise TransientError(f"cannot reach {host}:{port}: {exc.strerror or exc}",
                                 hint="is PostgreSQL running and listening on that address?") from None
        return f"{host}:{port}"

    def login(self) -> None:
        with self._session("log in"):
            pass

    def server_version(self) -> str:
        where = "server version"
        with self._session(where) as conn:
            return f"PostgreSQL {conn.info.parameter_status('server_version') or conn.info.server_version}"

    def ping(self) -> None:
        where = f"ping {self._where()}"
        with self._session(where) as conn:
            try:
                with self._call(conn, where):
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                raise classify(exc, where) from None

    def ddl(self, *, read_index: bool = False, partition_by_day: bool = False) -> list[str]:
        """CREATE statements for DESIGN.md's table.

        `read_index` adds a BRIN index on ts for "all tags over a time range"
        (the key already serves one tag over a time range). `partition_by_day`
        makes the table range-partitioned by ts with a DEFAULT partition and
        daily partitions from today (UTC) for 8 days; run init-db daily to add
        the next ones.
        """
        s = self.spec
        t = quote_ident(s.table)
        stmts = [
            f"CREATE TABLE IF NOT EXISTS {t} (\n"
            f"    {quote_ident(s.tag)} text NOT NULL,\n"
            f"    {quote_ident(s.ts)} timestamptz NOT NULL,\n"
            f"    {quote_ident(s.value)} double precision,\n"
            f"    {quote_ident(s.quality)} smallint,\n"
            f"    PRIMARY KEY ({quote_ident(s.tag)}, {quote_ident(s.ts)})\n"
            f")" + (f" PARTITION BY RANGE ({quote_ident(s.ts)})" if partition_by_day else "")
        ]
        if partition_by_day:
            stmts.append(f"CREATE TABLE IF NOT EXISTS {quote_ident(self._name('_default'))} "
                         f"PARTITION OF {t} DEFAULT")
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            for d in range(8):
                lo = today + timedelta(days=d)
                hi = lo + timedelta(days=1)
                stmts.append(
                    f"CREATE TABLE IF NOT EXISTS {quote_ident(self._name(f'_p{lo:%Y%m%d}'))} "
                    f"PARTITION OF {t} FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                )
        if read_index:
            stmts.append(f"CREATE INDEX IF NOT EXISTS {quote_ident(self._name('_ts_brin'))} "
                         f"ON {t} USING brin ({quote_ident(s.ts)})")
        return stmts

    def _name(self, suffix: str) -> str:
        name = self.spec.table + suffix
        if len(name.encode()) > MAX_IDENTIFIER:
            raise ConfigError(f"database.table = {self.spec.table!r}: too long to derive {suffix!r} names",
                              hint=f"PostgreSQL names have at most {MAX_IDENTIFIER} bytes")
        return name

    def create_table(self, *, read_index: bool = False, partition_by_day: bool = False) -> None:
        where = f"create table {self.spec.table}"
        stmts = self.ddl(read_index=read_index, partition_by_day=partition_by_day)
        with self._session(where) as conn:
            try:
                with self._call(conn, where):
                    for stmt in stmts:
                        conn.execute(stmt)
                    conn.commit()
            except psycopg.Error as exc:
                raise classify(exc, where) from None

    def inspect_table(self) -> TableInfo | None:
        where = f"inspect table {self.spec.table}"
        with self._session(where) as conn:
            try:
                with self._call(conn, where):
                    return self._table_info(conn)
            except psycopg.Error as exc:
                raise classify(exc, where) from None

    def _table_info(self, conn: psycopg.Connection[Any]) -> TableInfo | None:
        """The table's columns and its key: the one on (tag, ts) if any, else the primary key; None if no table."""
        row = conn.execute("SELECT to_regclass(%s)::oid", (quote_ident(self.spec.table),)).fetchone()
        if row is None or row[0] is None:
            return None
        oid = row[0]
        cols = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod), NOT attnotnull "
            "FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum", (oid,),
        ).fetchall()
        keys = _keys(conn, oid)
        want = {self.spec.tag, self.spec.ts}
        key = next((k for k in keys if set(k) == want), keys[0] if keys else [])
        return TableInfo([ColumnInfo(n, t, bool(nullable)) for n, t, nullable in cols], key)

    def table_differences(self, info: TableInfo) -> list[str]:
        """How `info` differs from DESIGN.md's PostgreSQL table ([] = writable as tagwriter expects)."""
        s = self.spec

        def starts(*types: str) -> Callable[[str], bool]:
            return lambda t: t.startswith(types)

        rules = [
            ColumnRule(s.tag, "text", starts("text", "character varying"), False),
            ColumnRule(s.ts, "timestamptz", starts("timestamp with time zone"), False),
            ColumnRule(s.value, "double precision", starts("double precision"), None),
            ColumnRule(s.quality, "smallint", starts("smallint", "integer", "bigint"), None),
        ]
        return table_differences(info, rules, (s.tag, s.ts), fold=str)

    def try_insert(self) -> None:
        where = f"insert into {self.spec.table}"
        s = self.spec
        stmt = (
            f"INSERT INTO {quote_ident(s.table)} ({', '.join(quote_ident(c) for c in s.columns)}) "
            f"VALUES ('__tagwriter_probe__', now(), NULL, 0) "
            f"ON CONFLICT ({quote_ident(s.tag)}, {quote_ident(s.ts)}) DO NOTHING"
        )
        with self._session(where) as conn:
            try:
                with self._call(conn, where):
                    try:
                        conn.execute(stmt)
                    except psycopg.Error as exc:
                        # A constraint rejecting the probe row runs after the
                        # privilege check: the insert privilege is proven.
                        if not is_row_error(exc):
                            raise
                    conn.rollback()
            except psycopg.Error as exc:
                raise classify(exc, where) from None


def _keys(conn: psycopg.Connection[Any], oid: int) -> list[list[str]]:
    """Column lists of the primary key (first) and unique indexes of a table."""
    rows = conn.execute(
        "SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) "
        "FROM pg_index i WHERE i.indrelid = %s AND (i.indisprimary OR i.indisunique) "
        "AND i.indpred IS NULL AND i.indexprs IS NULL "
        "ORDER BY i.indisprimary DESC, i.indexrelid", (oid,),
    ).fetchall()
    return [list(r[0]) for r in rows]


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):
        conn.close()

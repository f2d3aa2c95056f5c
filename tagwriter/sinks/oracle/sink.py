"""`OracleSink`: the tagwriter table in Oracle Database through python-oracledb (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import oracledb

from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError, FatalError, RowError, SinkError, TransientError
from tagwriter.models import Chunk, TagValue
from tagwriter.redact import dsn_passwords, redact_dsn, register
from tagwriter.sinks.base import ColumnInfo, ColumnRule, TableInfo, TableSpec, WriteResult, table_differences
from tagwriter.sinks.oracle.binds import bind_rows, naive_utc, to_us
from tagwriter.sinks.oracle.errors import (
    DUPLICATE_CODE,
    classify,
    error_code,
    error_text,
    is_fatal_code,
    is_transient_code,
    socket_error,
)
from tagwriter.sinks.oracle.pool import CLOSE_TIMEOUT, PING_INTERVAL, ConnectionPool, close_in_background
from tagwriter.sinks.oracle.schema import (
    COLUMNS_SQL,
    KEYS_SQL,
    is_integer_5,
    is_text_128,
    is_timestamp_6,
    pick_key,
    type_name,
)
from tagwriter.sinks.oracle.worker import CallWorker

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The driver module the sink talks to; tests swap in a fake (tests/oracle_fake.py).
DRIVER: Any = oracledb

PROBE_TAG = "__tagwriter_probe__"


_thick_lock = threading.Lock()
_thick_ready: set[int] = set()


def _init_thick(driver: Any, lib_dir: str, config_dir: str) -> None:
    """Switch the driver to thick mode once per process (per driver module)."""
    with _thick_lock:
        if id(driver) in _thick_ready:
            return
        driver.init_oracle_client(lib_dir=lib_dir or None, config_dir=config_dir or None)
        _thick_ready.add(id(driver))


def _ora_name(name: str) -> str:
    """An identifier as Oracle stores an unquoted one: upper case (config validated it)."""
    return name.upper()


class OracleSink:
    """An Oracle table. `write_batch` from one thread; `probe` and the admin calls from any."""

    kind = "oracle"

    def __init__(
        self, *, user: str, password: str, dsn: str, spec: TableSpec | None = None,
        config_dir: str = "", wallet_location: str = "", wallet_password: str = "",
        thick_mode: bool = False, lib_dir: str = "", pool_min: int = 2, pool_max: int = 5,
        pool_wait_timeout: float = 5.0, connect_timeout: float = 5.0, call_timeout: float = 10.0,
        insert_mode: str = "conventional", ping_interval: float = PING_INTERVAL, driver: Any = None,
    ) -> None:
        if insert_mode not in ("conventional", "direct_path"):
            raise ConfigError(f"database.insert_mode = {insert_mode!r}: must be conventional or direct_path")
        if insert_mode == "direct_path" and thick_mode:
            raise ConfigError("database.insert_mode = direct_path: python-oracledb supports it in thin mode only",
                              hint="set database.thick_mode = false, or insert_mode = conventional")
        self.driver = driver if driver is not None else DRIVER
        register(password, wallet_password, *dsn_passwords(dsn))  # the driver echoes the dsn in errors
        self.user = user
        self._password = password
        self._wallet_password = wallet_password
        self.dsn = dsn
        self.spec = spec = spec or TableSpec()
        self.config_dir = config_dir
        self.wallet_location = wallet_location
        self.thick_mode = thick_mode
        self.lib_dir = lib_dir
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.pool_wait_timeout = pool_wait_timeout
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.insert_mode = insert_mode
        self.ping_interval = ping_interval
        self.table = _ora_name(spec.table)
        self.columns = tuple(_ora_name(c) for c in spec.columns)
        self.addresses = self._addresses()
        self.target = ", ".join(f"{h}:{p}" for h, p, _ in self.addresses) or redact_dsn(dsn)
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._worker = CallWorker()  # runs the connects the driver cannot bound
        self._schema = ""
        c_tag, c_ts, c_val, c_q = self.columns
        self._insert = (
            f'INSERT INTO "{self.table}" ("{c_tag}", "{c_ts}", "{c_val}", "{c_q}") VALUES (:1, :2, :3, :4)'
        )
        self._check = f'SELECT 1 FROM "{self.table}" WHERE 1 = 0'
        self._write_what = f"write to {self.table}"
        #: the bind types of `_insert`: a bare datetime would bind as DATE (no fractional seconds)
        self._sizes = (None, self.driver.DB_TYPE_TIMESTAMP, self.driver.DB_TYPE_BINARY_DOUBLE, None)

    @classmethod
    def from_config(cls, config: DatabaseConfig, *, driver: Any = None) -> OracleSink:
        """Build from `[database]`: the URL's user/host/port/service, or user + dsn (Easy Connect or alias)."""
        url = parse_url(config.url)
        user = config.user or url.user
        password = config.password or url.password
        dsn = config.dsn
        if not dsn:
            if not url.host or not url.name:
                raise ConfigError(
                    "database.url: oracle needs a host and a service name, e.g. oracle://scott@dbhost:1521/orclpdb",
                    hint="or set database.dsn to an Easy Connect string or a TNS alias",
                )
            dsn = f"{url.host}:{url.port or 1521}/{url.name}"
        if not user:
            raise ConfigError("database.user: oracle needs a user (in the URL, oracle://USER@..., or database.user)")
        return cls(
            user=user, password=password, dsn=dsn, spec=TableSpec.from_config(config),
            config_dir=config.config_dir, wallet_location=config.wallet_location,
            wallet_password=config.wallet_password, thick_mode=config.thick_mode, lib_dir=config.lib_dir,
            pool_min=config.pool_min, pool_max=config.pool_max, pool_wait_timeout=config.pool_wait_timeout,
            connect_timeout=config.connect_timeout, call_timeout=config.call_timeout,
            insert_mode=config.insert_mode, driver=driver,
        )

    def describe(self) -> str:
        return f"oracle {self.user}@{redact_dsn(self.dsn)} table {self.table}"

    def _addresses(self) -> list[tuple[str, int, str]]:
        """(host, port, protocol) of each address the DSN names; [] if it cannot be parsed."""
        try:
            params = oracledb.ConnectParams(config_dir=self.config_dir or None)
            params.parse_connect_string(self.dsn)
        except Exception:
            return []
        hosts, ports, protocols = params.host, params.port, params.protocol
        if not isinstance(hosts, list):
            hosts, ports, protocols = [hosts], [ports], [protocols]
        return [(str(h), int(p), str(pr or "tcp")) for h, p, pr in zip(hosts, ports, protocols, strict=False) if h]

    # -- plumbing ----------------------------------------------------------

    def _classify(self, exc: BaseException, where: str) -> SinkError:
        return classify(exc, where, target=self.target, table=self.table)

    def _connect(self) -> Any:
        """One new driver connection (blocking; callers bound it)."""
        params: dict[str, Any] = {"user": self.user, "password": self._password, "dsn": self.dsn}
        if not self.thick_mode:
            params["tcp_connect_timeout"] = self.connect_timeout
            if self.config_dir:
                params["config_dir"] = self.config_dir
            if self.wallet_location:
                params["wallet_location"] = self.wallet_location
            if self._wallet_password:
                params["wallet_password"] = self._wallet_password
        return self.driver.connect(**params)

    def _get_pool(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                if self.thick_mode:
                    try:
                        _init_thick(self.driver, self.lib_dir, self.config_dir)
                    except Exception as exc:
                        raise self._classify(exc, "thick mode (init_oracle_client)") from None
                self._pool = ConnectionPool(
                    self._connect, max_size=self.pool_max, wait_timeout=self.pool_wait_timeout,
                    connect_timeout=self.connect_timeout, call_timeout=self.call_timeout,
                    ping_interval=self.ping_interval, target=self.target, run=self._worker.run,
                )
            return self._pool

    def _with_connection(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` on a pooled connection, on the caller's thread; errors classified.

        Starts no thread while the pool has an idle connection. Bounded: each
        round trip by the connection's `call_timeout`, the wait for a
        connection by `pool_wait_timeout`, a connect by `connect_timeout` (on
        the sink's worker thread, since the driver cannot bound it).
        """
        pool = self._pool or self._get_pool()  # (the lock only to make the pool)
        try:
            conn = pool.acquire()
        except Exception as exc:  # never let a driver error escape
            raise self._classify(exc, what) from None
        try:
            result = fn(conn)
        except Exception as exc:
            error = self._classify(exc, what)
            self._settle(pool, conn, error)
            raise error from None
        pool.release(conn)
        return result

    def _settle(self, pool: ConnectionPool, conn: Any, error: SinkError) -> None:
        """After a failed call: drop a broken connection (and its idle siblings), else roll back."""
        if isinstance(error, TransientError):
            pool.release(conn, discard=True)
            pool.discard_idle()
            return
        try:
            conn.rollback()
        except Exception:
            pool.release(conn, discard=True)
            return
        pool.release(conn)

    # -- Sink ----------------------------------------------------------------

    def open(self) -> None:
        """Check that a session can be opened and the table is there; warm up pool_min connections."""

        def check(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(self._check)
            if self.insert_mode == "direct_path" and not self._schema:
                self._schema = self._current_schema(conn)

        self._with_connection(f"open {self.table}", check)
        self._get_pool().fill(self.pool_min)

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        """Insert `rows` (a Chunk or any sequence of TagValue) and commit, on the calling thread."""
        if not rows:
            return WriteResult(0)
        if self.insert_mode == "direct_path":
            chunk = Chunk.of(rows)
            return self._with_connection(self._write_what, lambda c: self._direct_path(c, chunk))
        return self._with_connection(self._write_what, lambda c: self._insert_rows(c, rows))

    def _insert_rows(self, conn: Any, rows: Sequence[TagValue]) -> WriteResult:
        """executemany with batch errors, then commit; row errors map back by offset."""
        cur = conn.cursor()
        try:
            cur.setinputsizes(*self._sizes)
            cur.executemany(self._insert, bind_rows(rows), batcherrors=True)
            errors = cur.getbatcherrors()
        finally:
            cur.close()
        if not errors:
            conn.commit()
            return WriteResult(len(rows))
        duplicates = 0
        rejected: list[RowError] = []
        for err in errors:
            code = str(getattr(err, "full_code", "") or "")
            if code == DUPLICATE_CODE:
                duplicates += 1
            elif is_transient_code(code) or is_fatal_code(code):
                # not about this row (an unusable index, a lost session): the batch fails whole
                raise _BatchError(err)
            else:
                rejected.append(RowError(int(err.offset), code or "ORA-?", error_text(err)))
        conn.commit()
        rejected.sort(key=lambda e: e.index)
        return WriteResult(len(rows) - duplicates - len(rejected), duplicates, rejected)

    def _direct_path(self, conn: Any, rows: Chunk) -> WriteResult:
        """Direct path load of the rows not already stored; row errors fall back to executemany."""
        if not self._schema:
            self._schema = self._current_schema(conn)
        fresh, duplicates = self._without_stored(conn, rows)
        if not fresh:
            return WriteResult(0, duplicates)
        rows = Chunk.of([rows[i] for i in fresh])
        data = bind_rows(rows)
        try:
            conn.direct_path_load(schema_name=self._schema, table_name=self.table,
                                  column_names=list(self.columns), data=data)
        except Exception as exc:
            code = error_code(exc)
            if not code or is_transient_code(code) or is_fatal_code(code):
                raise
            # a data error fails the whole load: write this batch the conventional way,
            # which reports the offending rows one by one
            log.warning("direct path load failed (%s %s); writing the batch conventionally",
                        code, error_text(exc))
            with contextlib.suppress(Exception):
                conn.rollback()
            result = self._insert_rows(conn, rows)
            return WriteResult(
                result.written, result.duplicates + duplicates,
                [RowError(fresh[e.index], e.code, e.message) for e in result.rejected],
            )
        return WriteResult(len(fresh), duplicates)

    def _without_stored(self, conn: Any, rows: Chunk) -> tuple[list[int], int]:
        """Indexes of rows whose key is neither earlier in the batch nor in the table."""
        lo = min(rows.stamps)
        hi = max(rows.stamps)
        c_tag, c_ts = self.columns[0], self.columns[1]
        with contextlib.closing(conn.cursor()) as cur:
            cur.setinputsizes(self.driver.DB_TYPE_TIMESTAMP, self.driver.DB_TYPE_TIMESTAMP)
            cur.execute(
                f'SELECT "{c_tag}", "{c_ts}" FROM "{self.table}" WHERE "{c_ts}" BETWEEN :1 AND :2',
                [naive_utc(lo), naive_utc(hi)],
            )
            seen = {(tag, to_us(ts)) for tag, ts in cur.fetchall()}
        fresh: list[int] = []
        for i, key in enumerate(zip(rows.tags, rows.stamps, strict=True)):
            if key not in seen:
                seen.add(key)
                fresh.append(i)
        return fresh, len(rows) - len(fresh)

    def _current_schema(self, conn: Any) -> str:
        with contextlib.closing(conn.cursor()) as cur:
            cur.execute("SELECT SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') FROM dual")
            row = cur.fetchone()
        return str(row[0]) if row else self.user.upper()

    def probe(self) -> None:
        """A pooled connection (not the writer's) answers and the table is there."""

        def check(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(self._check)

        self._with_connection(f"probe {self.table}", check)

    def close(self) -> None:
        """Close the pool within CLOSE_TIMEOUT; never raises."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(CLOSE_TIMEOUT)
        self._worker.close()

    # -- AdminSink -----------------------------------------------------------

    def reach(self) -> str:
        """TCP connect to each address of the DSN (no login); 'host:port' of the first that accepts."""
        if not self.addresses:
            try:
                params = oracledb.ConnectParams(config_dir=self.config_dir or None)
                params.parse_connect_string(self.dsn)
            except Exception as exc:
                raise self._classify(exc, f"resolve {redact_dsn(self.dsn)}") from None
            raise FatalError(f"resolve {redact_dsn(self.dsn)}: no host and port in it", code="DPY-4017",
                             hint="check database.dsn")
        failure: TransientError | None = None
        for host, port, protocol in self.addresses:
            try:
                with socket.create_connection((host, port), timeout=self.connect_timeout):
                    return f"{host}:{port} ({protocol})"
            except OSError as exc:
                failure = socket_error(exc, host, port, self.connect_timeout)
        assert failure is not None
        raise failure

    def login(self) -> None:
        """Open a session (user, password, service) outside the pool and close it."""
        pool = self._get_pool()
        try:
            conn = pool.connect_once()
        except SinkError:
            raise
        except Exception as exc:
            raise self._classify(exc, f"log in as {self.user}") from None
        close_in_background([conn], CLOSE_TIMEOUT)

    def server_version(self) -> str:
        def version(conn: Any) -> str:
            return f"Oracle Database {conn.version}"

        return self._with_connection("server version", version)

    def ddl(self, *, read_index: bool = False, partition_by_day: bool = False) -> list[str]:
        """CREATE TABLE with PRIMARY KEY (tag, ts); optional daily interval partitions on ts.

        The key already serves "one tag over a time range", so `read_index`
        adds no index here (a comment in the DDL says so).
        """
        t = self.table
        c_tag, c_ts, c_val, c_q = self.columns
        pk = f'CONSTRAINT "{t}_PK" ' if len(t) + 3 <= 30 else ""
        using = " USING INDEX LOCAL" if partition_by_day else ""
        stmt = (
            f'CREATE TABLE "{t}" (\n'
            f'    "{c_tag}" VARCHAR2(128) NOT NULL,\n'
            f'    "{c_ts}" TIMESTAMP(6) NOT NULL,\n'
            f'    "{c_val}" BINARY_DOUBLE,\n'
            f'    "{c_q}" NUMBER(5),\n'
            f'    {pk}PRIMARY KEY ("{c_tag}", "{c_ts}"){using}\n'
            f')'
        )
        if partition_by_day:
            stmt += (
                f'\nPARTITION BY RANGE ("{c_ts}") INTERVAL (NUMTODSINTERVAL(1, \'DAY\'))\n'
                f'(PARTITION "P_START" VALUES LESS THAN (TIMESTAMP \'2000-01-01 00:00:00\'))'
            )
        stmts = [stmt]
        if read_index:
            stmts.append(f'-- no read index: PRIMARY KEY ("{c_tag}", "{c_ts}") already serves one-tag time-range reads')
        return stmts

    def create_table(self, *, read_index: bool = False, partition_by_day: bool = False) -> None:
        """Run `ddl()`; objects that exist already (ORA-00955) are kept."""

        def create(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                for stmt in self.ddl(read_index=read_index, partition_by_day=partition_by_day):
                    if stmt.startswith("--"):
                        continue
                    try:
                        cur.execute(stmt)
                    except Exception as exc:
                        if error_code(exc) != "ORA-00955":
                            raise

        self._with_connection(f"create table {self.table}", create)

    def inspect_table(self) -> TableInfo | None:
        """The table in the current schema as ALL_TAB_COLUMNS / ALL_CONSTRAINTS describe it."""

        def inspect(conn: Any) -> TableInfo | None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(COLUMNS_SQL, [self.table])
                cols = [
                    ColumnInfo(str(name), type_name(dtype, length, precision, scale), nullable == "Y")
                    for name, dtype, length, precision, scale, nullable in cur.fetchall()
                ]
                if not cols:
                    return None
                cur.execute(KEYS_SQL, [self.table, self.table])
                keys: dict[tuple[str, str], list[str]] = {}
                for kind, name, column in cur.fetchall():
                    keys.setdefault((str(kind), str(name)), []).append(str(column))
            return TableInfo(cols, pick_key(keys, {self.columns[0], self.columns[1]}))

        return self._with_connection(f"inspect {self.table}", inspect)

    def table_differences(self, info: TableInfo) -> list[str]:
        """How `info` differs from DESIGN.md's Oracle table ([] = writable as tagwriter expects)."""
        c_tag, c_ts, c_val, c_q = self.columns
        rules = [
            ColumnRule(c_tag, "VARCHAR2(128)", lambda t: is_text_128(t.upper()), False),
            ColumnRule(c_ts, "TIMESTAMP(6)", lambda t: is_timestamp_6(t.upper()), False),
            ColumnRule(c_val, "BINARY_DOUBLE", lambda t: t.upper() == "BINARY_DOUBLE", True),
            ColumnRule(c_q, "NUMBER(5)", lambda t: is_integer_5(t.upper()), True),
        ]
        return table_differences(info, rules, (c_tag, c_ts), fold=str.upper)

    def try_insert(self) -> None:
        """Insert a probe row and roll it back (proves the INSERT privilege and the column types)."""

        def insert(conn: Any) -> None:
            row = TagValue(PROBE_TAG, round(time.time() * 1_000_000), 0.0, 0)
            with contextlib.closing(conn.cursor()) as cur:
                cur.setinputsizes(*self._sizes)
                try:
                    cur.execute(self._insert, bind_rows([row])[0])
                finally:
                    conn.rollback()

        self._with_connection(f"insert into {self.table}", insert)

    def ping(self) -> None:
        self._with_connection("ping", lambda conn: conn.ping())


class _BatchError(Exception):
    """A batch error that is not about its row; carries the driver error object."""

    def __init__(self, err: Any) -> None:
        super().__init__(err)

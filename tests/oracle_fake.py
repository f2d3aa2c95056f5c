"""A FAKE python-oracledb, for the Oracle sink's tests. It is a fake because no
Oracle server can run on our machines (DESIGN.md, "python-oracledb facts").

It stands in at the DB-API seam OracleSink uses: `FakeDriver.connect()` ->
`FakeConnection` -> `FakeCursor`, with rows kept in a dict keyed like the
table's primary key (tag, ts) and a transaction per connection (commit makes
rows visible, rollback drops them). What it mirrors from the real driver and
server, because the sink's correctness depends on exactly these:

- errors are the driver's own objects, built with `oracledb.errors._Error`, so
  `full_code`, `code`, `offset`, `message`, `isrecoverable`, the exception
  class and the ORA-03113 -> DPY-4011 style mapping are python-oracledb's;
- `executemany(..., batcherrors=True)` reports one error per failed row with
  `offset` = row index (ORA-00001 duplicate, ORA-01400 NULL tag, ORA-12899 tag
  longer than 128, ORA-01438 quality too large) and leaves the transaction open;
- a datetime bound without `setinputsizes(..., DB_TYPE_TIMESTAMP, ...)` loses
  its fractional seconds (it binds as DATE), and tzinfo is ignored;
- it understands only the statements OracleSink issues (matched by how they
  start); anything else raises, so a new statement cannot slip by untested.

Faults: refuse or hang connects, fail the next calls, take the server down.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import oracledb
from oracledb import errors as _errors

# -- the driver's own error objects --------------------------------------------


def ora_error(code: int, text: str, offset: int = 0) -> Any:
    """The driver's error object for ORA-`code` (what getbatcherrors() returns)."""
    return _errors._Error(f"ORA-{code:05d}: {text}", code=code, offset=offset)


def ora(code: int, text: str = "error") -> oracledb.Error:
    """The exception the driver raises for ORA-`code` (lost-session codes become DPY-4011)."""
    err = ora_error(code, text)
    exc: oracledb.Error = err.exc_type(err)
    return exc


def dpy(num: int, cause: BaseException | None = None, **args: Any) -> oracledb.Error:
    """The exception the driver raises for DPY-`num`, e.g. dpy(6005, ConnectionRefusedError(...))."""
    exc: oracledb.Error = _errors._create_exception(num, cause=cause, **args)
    return exc


def refused() -> oracledb.Error:
    return dpy(6005, ConnectionRefusedError(111, "Connection refused"), connection_id="fake")


def lost() -> oracledb.Error:
    return ora(3113, "end-of-file on communication channel")


# -- server state ------------------------------------------------------------------

DEFAULT_COLUMNS: list[tuple[str, str, int | None, int | None, int | None, str]] = [
    ("TAG_NAME", "VARCHAR2", 128, None, None, "N"),
    ("TS", "TIMESTAMP(6)", None, None, 6, "N"),
    ("VALUE", "BINARY_DOUBLE", None, None, None, "Y"),
    ("QUALITY", "NUMBER", None, 5, 0, "Y"),
]


class FakeServer:
    """The database behind the fake driver: one table, faults, and call counters. Thread-safe."""

    def __init__(self, *, table: str = "TAG_VALUES", exists: bool = True) -> None:
        self.lock = threading.RLock()
        self.table = table
        self.exists = exists
        self.columns = list(DEFAULT_COLUMNS)
        self.key: list[tuple[str, str, str]] = [("P", f"{table}_PK", "TAG_NAME"), ("P", f"{table}_PK", "TS")]
        self.rows: dict[tuple[str, datetime], tuple[str, datetime, float | None, int | None]] = {}
        self.version = "23.4.0.24.5"
        self.ddl: list[str] = []
        self.connects = 0
        self.connect_params: list[dict[str, Any]] = []
        self.commits = 0
        self.rollbacks = 0
        self.pings = 0
        self.executemany_calls = 0
        self.direct_path_calls = 0
        self.input_sizes: list[tuple[Any, ...]] = []
        self.connections: list[FakeConnection] = []
        self.down: Callable[[], BaseException] | None = None
        self.connect_error: Callable[[], BaseException] | None = None
        self.connect_gate = threading.Event()
        self.connect_gate.set()
        self.failures: dict[str, list[BaseException]] = {}
        self.row_errors: Callable[[tuple[Any, ...]], tuple[int, str] | None] | None = None
        self.direct_path_error: Callable[[], BaseException] | None = None

    # -- fault controls --------------------------------------------------

    def fail_next(self, call: str, *errors: BaseException) -> None:
        """The next calls of `call` (executemany, execute, commit, ping, connect) raise these."""
        with self.lock:
            self.failures.setdefault(call, []).extend(errors)

    def go_down(self, error: Callable[[], BaseException] = refused) -> None:
        """Connects raise `error()`; calls on open connections raise DPY-4011 (session lost)."""
        self.down = error

    def come_up(self) -> None:
        self.down = None

    def hang_connects(self) -> None:
        """Connects wait (like a listener that accepts and never answers) until `release_connects`."""
        self.connect_gate.clear()

    def release_connects(self) -> None:
        self.connect_gate.set()

    def _fault(self, call: str) -> None:
        with self.lock:
            queue = self.failures.get(call)
            error = queue.pop(0) if queue else None
        if error is not None:
            raise error
        if self.down is not None and call != "connect":
            raise lost()

    def stored(self) -> list[tuple[str, datetime, float | None, int | None]]:
        with self.lock:
            return sorted(self.rows.values(), key=lambda r: (r[0], r[1]))


class FakeDriver:
    """Module-like: what OracleSink uses from `oracledb`."""

    DB_TYPE_TIMESTAMP = oracledb.DB_TYPE_TIMESTAMP
    DB_TYPE_BINARY_DOUBLE = oracledb.DB_TYPE_BINARY_DOUBLE
    Error = oracledb.Error

    def __init__(self, server: FakeServer | None = None, *, thin: bool = True) -> None:
        self.server = server or FakeServer()
        self.thin = thin
        self.init_calls: list[dict[str, Any]] = []

    def is_thin_mode(self) -> bool:
        return self.thin

    def init_oracle_client(self, **kwargs: Any) -> None:
        self.init_calls.append(kwargs)
        self.thin = False

    def connect(self, **params: Any) -> FakeConnection:
        s = self.server
        with s.lock:
            s.connects += 1
            s.connect_params.append(dict(params))
        # bounded so a test that forgets release_connects() cannot leave a thread forever
        s.connect_gate.wait(30.0)
        s._fault("connect")
        if s.connect_error is not None:
            raise s.connect_error()
        if s.down is not None:
            raise s.down()
        conn = FakeConnection(s)
        with s.lock:
            s.connections.append(conn)
        return conn


class FakeConnection:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.call_timeout = 0
        self.version = server.version
        self.closed = False
        self.pending: dict[tuple[str, datetime], tuple[str, datetime, float | None, int | None]] = {}

    def _check(self, call: str) -> None:
        if self.closed:
            raise dpy(1001)
        self.server._fault(call)

    def cursor(self) -> FakeCursor:
        self._check("cursor")
        return FakeCursor(self)

    def commit(self) -> None:
        self._check("commit")
        s = self.server
        with s.lock:
            for key, row in self.pending.items():
                if key not in s.rows:
                    s.rows[key] = row
            self.pending.clear()
            s.commits += 1

    def rollback(self) -> None:
        self._check("rollback")
        self.pending.clear()
        with self.server.lock:
            self.server.rollbacks += 1

    def ping(self) -> None:
        self._check("ping")
        with self.server.lock:
            self.server.pings += 1

    def is_healthy(self) -> bool:
        return not self.closed and self.server.down is None

    def close(self) -> None:
        self.closed = True
        self.pending.clear()

    def direct_path_load(self, *, schema_name: str, table_name: str, column_names: list[str],
                         data: Sequence[Sequence[Any]], batch_size: int = 2**32 - 1) -> None:
        self._check("direct_path_load")
        s = self.server
        with s.lock:
            s.direct_path_calls += 1
            if not s.exists or table_name != s.table:
                raise ora(942, "table or view does not exist")
            if s.direct_path_error is not None:
                raise s.direct_path_error()
            for row in data:
                problem = self._row_problem(tuple(row))
                if problem is not None:
                    raise ora(*problem)
            for row in data:
                key = (row[0], row[1])
                if key in s.rows:  # the real load would leave the key index unusable
                    raise ora(1, f"unique constraint ({schema_name}.{table_name}_PK) violated")
                s.rows[key] = (row[0], row[1], row[2], row[3])

    def _row_problem(self, row: tuple[Any, ...]) -> tuple[int, str] | None:
        tag, _ts, _value, quality = row
        t = self.server.table
        if tag is None:
            return 1400, f'cannot insert NULL into ("SCOTT"."{t}"."TAG_NAME")'
        if len(tag) > 128:
            return 12899, f'value too large for column "SCOTT"."{t}"."TAG_NAME" (actual: {len(tag)}, maximum: 128)'
        if quality is not None and abs(quality) > 99_999:
            return 1438, "value larger than specified precision allowed for this column"
        if self.server.row_errors is not None:
            return self.server.row_errors(row)
        return None


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.server = conn.server
        self.sizes: tuple[Any, ...] = ()
        self.batch_errors: list[Any] = []
        self.result: list[tuple[Any, ...]] = []
        self.rowcount = 0

    def close(self) -> None:
        pass

    def setinputsizes(self, *sizes: Any) -> None:
        self.sizes = sizes
        with self.server.lock:
            self.server.input_sizes.append(sizes)

    def _bind(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """What the server receives for one bound row (the driver's binding rules)."""
        tag, ts, value, quality = row
        if isinstance(ts, datetime):
            ts = ts.replace(tzinfo=None)  # the driver ignores tzinfo
            if len(self.sizes) < 2 or self.sizes[1] is not oracledb.DB_TYPE_TIMESTAMP:
                ts = ts.replace(microsecond=0)  # bound as DATE
        if isinstance(value, float) and math.isnan(value) and (
            len(self.sizes) < 3 or self.sizes[2] is not oracledb.DB_TYPE_BINARY_DOUBLE
        ):
            raise ora(1722, "invalid number")  # NaN bound as NUMBER
        return (tag, ts, value, quality)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], *, batcherrors: bool = False) -> None:
        self.conn._check("executemany")
        if not sql.startswith(f'INSERT INTO "{self.server.table}"'):
            raise dpy(2001) if not sql else oracledb.ProgrammingError(f"fake: unknown statement {sql!r}")
        with self.server.lock:
            self.server.executemany_calls += 1
            if not self.server.exists:
                raise ora(942, "table or view does not exist")
        self.batch_errors = []
        inserted = 0
        for offset, raw in enumerate(rows):
            try:
                self._insert(self._bind(raw), offset)
                inserted += 1
            except oracledb.DatabaseError as exc:
                if not batcherrors:
                    raise
                self.batch_errors.append(_errors._Error(exc.args[0].message.split("\nHelp:")[0],
                                                        code=exc.args[0].code, offset=offset))
        self.rowcount = inserted

    def _insert(self, row: tuple[Any, ...], offset: int) -> None:
        problem = self.conn._row_problem(row)
        if problem is not None:
            raise ora(*problem)
        key = (row[0], row[1])
        with self.server.lock:
            if key in self.server.rows or key in self.conn.pending:
                raise ora(1, f"unique constraint (SCOTT.{self.server.table}_PK) violated")
            self.conn.pending[key] = (row[0], row[1], row[2], row[3])

    def getbatcherrors(self) -> list[Any]:
        return list(self.batch_errors)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        self.conn._check("execute")
        s = self.server
        t = s.table
        self.result = []
        if sql.startswith(f'SELECT 1 FROM "{t}"'):
            if not s.exists:
                raise ora(942, "table or view does not exist")
        elif sql.startswith(f'INSERT INTO "{t}"'):
            if not s.exists:
                raise ora(942, "table or view does not exist")
            self._insert(self._bind(params or ()), 0)
        elif sql.startswith("SELECT column_name"):
            self.result = list(s.columns) if s.exists and params and params[0] == t else []
        elif sql.startswith("SELECT c.constraint_type"):
            self.result = list(s.key) if s.exists else []
        elif sql.startswith("SELECT SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA')"):
            self.result = [("SCOTT",)]
        elif sql.startswith("CREATE TABLE"):
            with s.lock:
                s.ddl.append(sql)
                if s.exists:
                    raise ora(955, "name is already used by an existing object")
                s.exists = True
        elif sql.startswith(f'DROP TABLE "{t}"'):
            with s.lock:
                if not s.exists:
                    raise ora(942, "table or view does not exist")
                s.exists = False
                s.rows.clear()
        elif sql.startswith("SELECT \"") and sql.endswith(f'FROM "{t}"'):
            with s.lock:
                self.result = list(s.rows.values())
        elif sql.startswith("SELECT \"") and f'FROM "{t}" WHERE' in sql:
            lo, hi = params or (None, None)
            with s.lock:
                self.result = [(tag, ts) for (tag, ts) in s.rows if lo <= ts <= hi]
        else:
            raise oracledb.ProgrammingError(f"fake: unknown statement {sql!r}")

    def fetchall(self) -> list[tuple[Any, ...]]:
        result, self.result = self.result, []
        return result

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.result.pop(0) if self.result else None


# -- a driver that does nothing (for the benchmark and the fast-path tests) ----------------


class NoopDriver:
    """A FAKE python-oracledb whose calls do nothing: the sink's own cost, with no server work.

    `executemany` checks only what the real driver requires of the bind rows
    (a list of sequences: DPY-2004 otherwise) and counts them; `commit` makes
    them count as stored (`rows`). `thread_names` holds the names of the
    threads that called `executemany`, `connect_thread_names` of those that
    called `connect`. Not thread-safe beyond what the sink needs (one writer
    thread).
    """

    DB_TYPE_TIMESTAMP = oracledb.DB_TYPE_TIMESTAMP
    DB_TYPE_BINARY_DOUBLE = oracledb.DB_TYPE_BINARY_DOUBLE
    Error = oracledb.Error

    def __init__(self) -> None:
        self.rows = 0
        self.connects = 0
        self.thread_names: set[str] = set()
        self.connect_thread_names: set[str] = set()

    def is_thin_mode(self) -> bool:
        return True

    def connect(self, **params: Any) -> NoopConnection:
        self.connects += 1
        self.connect_thread_names.add(threading.current_thread().name)
        return NoopConnection(self)


class NoopConnection:
    def __init__(self, driver: NoopDriver) -> None:
        self.driver = driver
        self.call_timeout = 0
        self.version = "23.4.0.24.5"
        self.pending = 0

    def cursor(self) -> NoopCursor:
        return NoopCursor(self)

    def commit(self) -> None:
        self.driver.rows += self.pending
        self.pending = 0

    def rollback(self) -> None:
        self.pending = 0

    def ping(self) -> None:
        pass

    def is_healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


class NoopCursor:
    def __init__(self, conn: NoopConnection) -> None:
        self.conn = conn

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def executemany(self, sql: str, rows: Any, *, batcherrors: bool = False) -> None:
        if not isinstance(rows, list) or (rows and len(rows[0]) != 4):
            raise dpy(2004)
        self.conn.driver.thread_names.add(threading.current_thread().name)
        self.conn.pending += len(rows)

    def getbatcherrors(self) -> list[Any]:
        return []

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        pass

    def close(self) -> None:
        pass

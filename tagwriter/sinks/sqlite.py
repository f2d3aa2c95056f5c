"""SQLite, the embedded default: one file, WAL, synchronous=NORMAL.

The key is PRIMARY KEY (ts, tag_name) WITHOUT ROWID: values arrive in time
order, so inserts land at the right edge of the B-tree (~8x faster to insert
than (tag_name, ts) with 1,000 tags; see DESIGN.md). The cost: "one tag over
a time range" scans by time unless the optional (tag_name, ts) index exists
(`tagwriter init-db --read-index`). `ts` is ISO-8601 UTC text with six
fractional digits, so text order is time order. SQLite stores NaN as NULL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from tagwriter.checks import verify_table
from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError, FatalError, RowError, SinkError, TransientError
from tagwriter.models import Chunk, TagValue, format_ts
from tagwriter.sinks.base import ColumnInfo, ColumnRule, TableInfo, TableSpec, WriteResult, table_differences

log = logging.getLogger(__name__)


def classify(exc: sqlite3.Error, where: str) -> SinkError:
    """Map a sqlite3 error to transient (retry) or fatal (configuration)."""
    text = str(exc)
    low = text.lower()
    code = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    if "no such table" in low:
        return FatalError(f"{where}: {text}", code=code, hint="run tagwriter init-db")
    if "no such column" in low or "has no column" in low:
        return FatalError(f"{where}: {text}", code=code, hint="the table has other columns than database.* "
                          "names: tagwriter test-connection shows the differences")
    if "file is not a database" in low or "readonly" in low or "read-only" in low:
        return FatalError(f"{where}: {text}", code=code)
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.DatabaseError)):
        return TransientError(f"{where}: {text}", code=code)
    return FatalError(f"{where}: {text}", code=code)


class SqliteSink:
    """A SQLite file. Not shared between threads except `probe`, which opens its own."""

    kind = "sqlite"

    def __init__(
        self, path: str | Path, spec: TableSpec | None = None, *,
        busy_timeout: float = 5.0, create: bool = True,
    ) -> None:
        self.path = str(path)
        self.spec = spec = spec or TableSpec()
        self.busy_timeout = busy_timeout
        self.create = create
        self._conn: sqlite3.Connection | None = None
        t, (c_tag, c_ts, c_val, c_q) = spec.table, spec.columns
        self._insert_head = f'INSERT INTO "{t}" ("{c_tag}", "{c_ts}", "{c_val}", "{c_q}") VALUES '
        self._inserts: dict[int, str] = {}  # rows per statement -> its INSERT
        self._insert = self._insert_of(1)

    @classmethod
    def from_config(cls, config: DatabaseConfig) -> SqliteSink:
        return cls(parse_url(config.url).path, TableSpec.from_config(config),
                   busy_timeout=config.call_timeout)

    def describe(self) -> str:
        return f"sqlite:///{self.path} table {self.spec.table}"

    def ddl(self, *, read_index: bool = False, partition_by_day: bool = False) -> list[str]:
        """CREATE statements for the table (and the optional read-side index).

        Raises ConfigError for `partition_by_day`: SQLite has no partitions.
        """
        if partition_by_day:
            raise ConfigError("partitioning by day is an Oracle option; SQLite has no partitions",
                              hint="leave out --partition-by-day")
        t, (c_tag, c_ts, c_val, c_q) = self.spec.table, self.spec.columns
        stmts = [
            f'CREATE TABLE IF NOT EXISTS "{t}" (\n'
            f'    "{c_tag}" TEXT NOT NULL,\n'
            f'    "{c_ts}" TEXT NOT NULL,\n'
            f'    "{c_val}" REAL,\n'
            f'    "{c_q}" INTEGER,\n'
            f'    PRIMARY KEY ("{c_ts}", "{c_tag}")\n'
            f') WITHOUT ROWID'
        ]
        if read_index:
            stmts.append(f'CREATE INDEX IF NOT EXISTS "{t}_tag_ts" ON "{t}" ("{c_tag}", "{c_ts}")')
        return stmts

    def connect(self) -> sqlite3.Connection:
        """A new connection with the pragmas set; raises TransientError/FatalError."""
        try:
            if self.create:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        except sqlite3.Error as exc:
            raise self._unopenable() or classify(exc, f"open {self.path}") from None
        except OSError as exc:
            raise self._unopenable() or TransientError(f"open {self.path}: {exc}") from None

    def _unopenable(self) -> FatalError | None:
        """Why the path can never be a database file (a folder, or under a file), else None."""
        path = Path(self.path)
        if path.is_dir():
            return FatalError(f"open {self.path}: this is a folder, not a database file", code="EISDIR",
                              hint="give a file path in database.url, e.g. sqlite:///data/tagwriter.db")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return FatalError(f"open {self.path}: {parent} is a file, not a folder", code="ENOTDIR",
                                      hint="check database.url")
                break
        return None

    def open(self) -> None:
        """Connect, create the table if it is missing (`create`), and check its shape.

        Raises FatalError for a table without the (tag, ts) key or with other
        columns (`checks.verify_table`, as init-db and test-connection say).
        """
        if self._conn is not None:
            return
        conn = self.connect()
        try:
            if self.create:
                for stmt in self.ddl():
                    conn.execute(stmt)
            verify_table(self, self._table_info(conn), where=f"open {self.path}")
        except sqlite3.Error as exc:
            conn.close()
            raise classify(exc, f"open {self.path}") from None
        except SinkError:
            conn.close()
            raise
        self._conn = conn

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if not rows:
            return WriteResult(0)
        self.open()
        conn = self._conn
        assert conn is not None
        flat = _flat(rows)
        try:
            conn.execute("BEGIN")
            before = conn.total_changes
            try:
                at = 0
                for k in _pieces(len(rows)):
                    end = at + k * 4
                    conn.execute(self._insert_of(k), flat[at:end])
                    at = end
                written = conn.total_changes - before
                result = WriteResult(written, len(rows) - written)
            except sqlite3.IntegrityError:
                # A row broke a constraint: insert one by one in the same
                # transaction; a failed statement only undoes itself.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                result = self._write_rows(conn, list(_params(rows)))
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            self._reset()
            raise classify(exc, f"write to {self.spec.table}") from None

    def _insert_of(self, k: int) -> str:
        """The INSERT of `k` rows (made once per `k`; `_pieces` needs a few)."""
        sql = self._inserts.get(k)
        if sql is None:
            sql = self._inserts[k] = self._insert_head + ", ".join(["(?, ?, ?, ?)"] * k) + " ON CONFLICT DO NOTHING"
        return sql

    def _write_rows(self, conn: sqlite3.Connection, params: list[tuple[object, ...]]) -> WriteResult:
        written = duplicates = 0
        rejected: list[RowError] = []
        for i, p in enumerate(params):
            try:
                cur = conn.execute(self._insert, p)
            except sqlite3.IntegrityError as exc:
                code = getattr(exc, "sqlite_errorname", "") or "SQLITE_CONSTRAINT"
                rejected.append(RowError(i, code, str(exc)))
                continue
            if cur.rowcount == 1:
                written += 1
            else:
                duplicates += 1
        return WriteResult(written, duplicates, rejected)

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def probe(self) -> None:
        """Take the write lock (BEGIN IMMEDIATE) and roll back: a file another process holds
        write-locked is not reachable. Waits at most the busy timeout."""
        self._query_once(f'SELECT 1 FROM "{self.spec.table}" LIMIT 0', f"probe {self.path}", begin="BEGIN IMMEDIATE")

    def close(self) -> None:
        self._reset()

    # -- AdminSink (init-db, test-connection) --------------------------------

    def reach(self) -> str:
        """The folder the database file lives in (or will be created in) is usable."""
        folder = Path(self.path).resolve().parent
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise FatalError(f"{existing} is not a folder", code="ENOTDIR", hint="check database.url")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise FatalError(f"folder {existing} is not writable", code="EACCES",
                             hint="check the folder's permissions or database.url")
        return f"folder {folder}" + ("" if existing == folder else " (will be created)")

    def login(self) -> None:
        """Open the file and read its schema (detects a file that is not a database)."""
        self._query_once("SELECT count(*) FROM sqlite_master", f"open {self.path}")

    def server_version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"

    def create_table(self, *, read_index: bool = False, partition_by_day: bool = False) -> None:
        """Run `ddl()`; idempotent (IF NOT EXISTS)."""
        stmts = self.ddl(read_index=read_index, partition_by_day=partition_by_day)
        conn = self.connect()
        try:
            for stmt in stmts:
                conn.execute(stmt)
        except sqlite3.Error as exc:
            raise classify(exc, f"create table {self.spec.table}") from None
        finally:
            conn.close()

    def inspect_table(self) -> TableInfo | None:
        """Columns from PRAGMA table_info; the key is the primary key, else a unique index on (tag, ts)."""
        conn = self.connect()
        try:
            return self._table_info(conn)
        except sqlite3.Error as exc:
            raise classify(exc, f"inspect {self.spec.table}") from None
        finally:
            conn.close()

    def _table_info(self, conn: sqlite3.Connection) -> TableInfo | None:
        """The table as `conn` sees it (None: it does not exist). Raises sqlite3.Error."""
        t = self.spec.table
        cols = conn.execute(f'PRAGMA table_info("{t}")').fetchall()
        if not cols:
            return None
        columns = [ColumnInfo(name, (ctype or "").upper(), not notnull and not pk)
                   for _cid, name, ctype, notnull, _dflt, pk in cols]
        key = [name for _cid, name, _t, _nn, _d, pk in sorted(cols, key=lambda c: c[5]) if pk]
        if not key:
            wanted = {self.spec.tag.lower(), self.spec.ts.lower()}
            for _seq, index, unique, *_ in conn.execute(f'PRAGMA index_list("{t}")').fetchall():
                names = [r[2] for r in conn.execute(f'PRAGMA index_info("{index}")').fetchall()]
                if unique and {n.lower() for n in names} == wanted:
                    key = names
                    break
        return TableInfo(columns, key)

    def table_differences(self, info: TableInfo) -> list[str]:
        """Differences from DESIGN.md's SQLite table, compared by type affinity ([] = matches)."""
        s = self.spec

        def affinity(want: str) -> Callable[[str], bool]:
            return lambda declared: _affinity(declared) == want

        rules = [ColumnRule(s.tag, "TEXT", affinity("TEXT"), False), ColumnRule(s.ts, "TEXT", affinity("TEXT"), False),
                 ColumnRule(s.value, "REAL", affinity("REAL"), True),
                 ColumnRule(s.quality, "INTEGER", affinity("INTEGER"), True)]
        return table_differences(info, rules, (s.tag, s.ts))

    def try_insert(self) -> None:
        """Insert a probe row inside a transaction and roll it back."""
        self._query_once(self._insert, f"insert into {self.spec.table}", begin="BEGIN",
                         params=("__tagwriter_probe__", format_ts(0), 0.0, 0))

    def ping(self) -> None:
        """One query on a connection of its own (thread-safe, like probe)."""
        self._query_once("SELECT 1", f"ping {self.path}")

    def _query_once(self, sql: str, action: str, *, begin: str = "", params: tuple[Any, ...] = ()) -> None:
        """`sql` on a connection of its own (thread-safe); inside `begin` ... ROLLBACK when given."""
        conn = self.connect()
        try:
            if begin:
                conn.execute(begin)
            try:
                conn.execute(sql, params).fetchone()
            finally:
                if begin:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise classify(exc, action) from None
        finally:
            conn.close()


def _affinity(declared: str) -> str:
    """SQLite's type affinity rules (https://sqlite.org/datatype3.html, 3.1)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if not t or "BLOB" in t:
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


#: Rows one INSERT statement carries (400 parameters: under the 999 of old SQLite builds). A multi-row
#: VALUES statement keeps SQLite's cursor on the table open across its rows and steps once, where
#: `executemany` resets, rebinds and steps (releasing the GIL) per row: half the CPU for a 500-row batch.
STATEMENT_ROWS = 100


def _pieces(n: int) -> list[int]:
    """Rows per statement for `n` rows: STATEMENT_ROWS each, the rest in powers of two, so that a few
    statements (at most 8) serve every batch size and stay in the connection's statement cache."""
    out = [STATEMENT_ROWS] * (n // STATEMENT_ROWS)
    rest, k = n % STATEMENT_ROWS, 64
    while rest:
        if rest >= k:
            out.append(k)
            rest -= k
        k //= 2
    return out


def _flat(rows: Sequence[TagValue]) -> list[object]:
    """The bind parameters of `rows`, row after row, in one list (what the multi-row INSERTs take): a Chunk's
    columns laid in by four slice assignments, no tuple per row (half the time of flattening `params`)."""
    if not isinstance(rows, Chunk):
        return list(chain.from_iterable(_params(rows)))
    flat: list[object] = [None] * (4 * len(rows))
    flat[0::4] = rows.tags
    flat[1::4] = rows.stamp_column(format_ts)
    flat[2::4] = rows.values
    flat[3::4] = rows.qualities
    return flat


def _params(rows: Sequence[TagValue]) -> Iterable[tuple[object, ...]]:
    """Bind tuples, one text timestamp per distinct ts: a Chunk's columns as they are (`Chunk.params`); other
    rows (a replay's, from spool lines) one by one, which costs them less than making a chunk first."""
    if isinstance(rows, Chunk):
        return rows.params(format_ts)
    out: list[tuple[object, ...]] = []
    last_us: int | None = None
    last_text = ""
    for tag, ts_us, value, quality in rows:
        if ts_us != last_us:
            last_us, last_text = ts_us, format_ts(ts_us)
        out.append((tag, last_text, value, quality))
    return out

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
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import FatalError, RowError, SinkError, TransientError
from tagwriter.models import TagValue, format_ts
from tagwriter.sinks.base import TableSpec, WriteResult

log = logging.getLogger(__name__)


def classify(exc: sqlite3.Error, where: str) -> SinkError:
    """Map a sqlite3 error to transient (retry) or fatal (configuration)."""
    text = str(exc)
    low = text.lower()
    code = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    if "no such table" in low or "no such column" in low or "has no column" in low:
        return FatalError(f"{where}: {text}", code=code, hint="run tagwriter init-db")
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
        self._insert = (
            f'INSERT INTO "{t}" ("{c_tag}", "{c_ts}", "{c_val}", "{c_q}") VALUES (?, ?, ?, ?) '
            f'ON CONFLICT DO NOTHING'
        )

    @classmethod
    def from_config(cls, config: DatabaseConfig) -> SqliteSink:
        return cls(parse_url(config.url).path, TableSpec.from_config(config),
                   busy_timeout=config.call_timeout)

    def describe(self) -> str:
        return f"sqlite:///{self.path} table {self.spec.table}"

    def ddl(self, *, read_index: bool = False) -> list[str]:
        """CREATE statements for the table (and the optional read-side index)."""
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
            raise classify(exc, f"open {self.path}") from None
        except OSError as exc:
            raise TransientError(f"open {self.path}: {exc}") from None

    def open(self) -> None:
        if self._conn is not None:
            return
        conn = self.connect()
        try:
            if self.create:
                for stmt in self.ddl():
                    conn.execute(stmt)
            conn.execute(f'SELECT 1 FROM "{self.spec.table}" LIMIT 0')
        except sqlite3.Error as exc:
            conn.close()
            raise classify(exc, f"open {self.path}") from None
        self._conn = conn

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if not rows:
            return WriteResult(0)
        self.open()
        conn = self._conn
        assert conn is not None
        params = _params(rows)
        try:
            conn.execute("BEGIN")
            before = conn.total_changes
            try:
                conn.executemany(self._insert, params)
                written = conn.total_changes - before
                result = WriteResult(written, len(rows) - written)
            except sqlite3.IntegrityError:
                # A row broke a constraint: insert one by one in the same
                # transaction; a failed statement only undoes itself.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN")
                result = self._write_rows(conn, params)
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            self._reset()
            raise classify(exc, f"write to {self.spec.table}") from None

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
        conn = self.connect()
        try:
            conn.execute(f'SELECT 1 FROM "{self.spec.table}" LIMIT 0')
        except sqlite3.Error as exc:
            raise classify(exc, f"probe {self.path}") from None
        finally:
            conn.close()

    def close(self) -> None:
        self._reset()


def _params(rows: Sequence[TagValue]) -> list[tuple[object, ...]]:
    """Bind tuples; one timestamp string per distinct ts (a group shares one)."""
    out: list[tuple[object, ...]] = []
    last_us: int | None = None
    last_text = ""
    for tag, ts_us, value, quality in rows:
        if ts_us != last_us:
            last_us, last_text = ts_us, format_ts(ts_us)
        out.append((tag, last_text, value, quality))
    return out

"""The sinks the contract suite (tests/test_sink_contract.py) runs against, by name.

Each `SinkCase` opens a fresh, empty table and yields `(sink, read_rows)`:
an opened AdminSink and a function returning every stored row as TagValues
sorted by (tag, ts). "sqlite" always runs; "oracle" runs when
TAGWRITER_TEST_ORACLE_URL is set (oracle://USER:PASSWORD@HOST:PORT/SERVICE, or
the password in TAGWRITER_TEST_ORACLE_PASSWORD) and is skipped with that reason
otherwise; "postgresql" runs against the real server of tests/pg_util.py (a
fresh database per test) and is skipped with the reason where none answers.
Adding a database is a factory plus one entry in SINKS.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagwriter.config import DatabaseConfig
from tagwriter.models import TagValue, parse_ts
from tagwriter.sinks.base import AdminSink

Reader = Callable[[], list[TagValue]]
Opened = tuple[AdminSink, Reader]


@dataclass(frozen=True)
class SinkCase:
    """One database under the contract.

    `nan`: what a NaN value reads back as: "nan", or "null" (stored as NULL).
    `bad_row`: a row this database rejects (quarantine path), or None if it
    accepts every row tagwriter can build. `quality_max`: the largest quality
    its default table holds (DESIGN.md: PostgreSQL's is smallint).
    """

    name: str
    open: Callable[[Path], AbstractContextManager[Opened]]
    unavailable: Callable[[], str | None] = lambda: None
    nan: str = "nan"
    bad_row: TagValue | None = None
    quality_max: int = 65535


_counter = itertools.count()


def unique_table_name(prefix: str = "TW_T") -> str:
    """A table name no other test (or test run) uses; at most 30 characters."""
    return f"{prefix}{os.getpid()}_{next(_counter)}"[:30]


# -- sqlite --------------------------------------------------------------------------


@contextmanager
def _sqlite(tmp_path: Path) -> Iterator[Opened]:
    from tagwriter.sinks.sqlite import SqliteSink

    sink = SqliteSink.from_config(DatabaseConfig(url=f"sqlite:///{tmp_path / 'contract.db'}"))
    sink.open()

    def read() -> list[TagValue]:
        with sqlite3.connect(sink.path) as conn:
            rows = conn.execute('SELECT tag_name, ts, value, quality FROM "tag_values"').fetchall()
        return sorted(TagValue(tag, parse_ts(ts), value, quality) for tag, ts, value, quality in rows)

    try:
        yield sink, read
    finally:
        sink.close()


# -- oracle ------------------------------------------------------------------------------


def _oracle_unavailable() -> str | None:
    if not os.environ.get("TAGWRITER_TEST_ORACLE_URL"):
        return "TAGWRITER_TEST_ORACLE_URL is not set (oracle://USER:PASSWORD@HOST:PORT/SERVICE)"
    return None


@contextmanager
def _oracle(tmp_path: Path) -> Iterator[Opened]:
    from tagwriter.sinks.oracle import OracleSink, to_us

    config = DatabaseConfig(url=os.environ["TAGWRITER_TEST_ORACLE_URL"],
                            password=os.environ.get("TAGWRITER_TEST_ORACLE_PASSWORD", ""),
                            table=unique_table_name())
    sink = OracleSink.from_config(config)
    sink.create_table()
    sink.open()

    def read() -> list[TagValue]:
        c_tag, c_ts, c_val, c_q = sink.columns

        def fetch(conn: Any) -> list[Any]:
            cur = conn.cursor()
            cur.execute(f'SELECT "{c_tag}", "{c_ts}", "{c_val}", "{c_q}" FROM "{sink.table}"')
            return list(cur.fetchall())

        rows = sink._with_connection("read back", fetch)
        return sorted(TagValue(tag, to_us(ts), value, None if q is None else int(q)) for tag, ts, value, q in rows)

    def drop(conn: Any) -> None:
        conn.cursor().execute(f'DROP TABLE "{sink.table}" PURGE')

    try:
        yield sink, read
    finally:
        try:
            sink._with_connection("drop test table", drop)
        finally:
            sink.close()


# -- postgresql --------------------------------------------------------------------------


@contextmanager
def _postgresql(tmp_path: Path) -> Iterator[Opened]:
    from pg_util import fresh_database  # skips (with the reason) without psycopg or a server

    from tagwriter.sinks.postgresql import PostgresSink

    with fresh_database("tw_contract") as db:
        sink = PostgresSink.from_config(DatabaseConfig(url=db.url()))
        sink.create_table()
        sink.open()

        def read() -> list[TagValue]:
            with db.connect() as conn:
                rows = conn.execute(
                    "SELECT tag_name, ((extract(epoch FROM ts - 'epoch'::timestamptz) * 1000000))::int8, "
                    "value, quality FROM tag_values"
                ).fetchall()
            return sorted(TagValue(tag, ts_us, value, quality) for tag, ts_us, value, quality in rows)

        try:
            yield sink, read
        finally:
            sink.close()


SINKS: dict[str, SinkCase] = {
    "sqlite": SinkCase("sqlite", _sqlite, nan="null",
                       bad_row=TagValue(None, 1_700_000_000_000_000, 1.0)),  # type: ignore[arg-type]
    "oracle": SinkCase("oracle", _oracle, unavailable=_oracle_unavailable, nan="nan",
                       bad_row=TagValue("x" * 200, 1_700_000_000_000_000, 1.0)),
    "postgresql": SinkCase("postgresql", _postgresql, nan="nan", quality_max=32767,
                           bad_row=TagValue("nul\x00tag", 1_700_000_000_000_000, 1.0)),
}

"""SqliteSink.open on a real SQLite file: the table is created as DESIGN.md says, or refused when
another table of that name would break the (tag, ts) key (the writer of `run` and `replay` both open it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tagwriter.checks import KEY_HINT
from tagwriter.errors import FatalError
from tagwriter.models import TagValue
from tagwriter.sinks.sqlite import SqliteSink

ROW = TagValue("t", 1_714_564_800_000_000, 1.0, 192)


def test_open_creates_a_missing_table_with_the_key(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "tags.db")
    assert sink.write_batch([ROW]).written == 1
    assert sink.write_batch([ROW]).duplicates == 1
    sink.close()


def test_open_refuses_a_table_without_the_key_with_the_init_db_hint(tmp_path: Path) -> None:
    """Before: open accepted it and every replay stored the rows again. Now: FatalError, nothing written."""
    db = tmp_path / "tags.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, quality INTEGER)")
    sink = SqliteSink(db)
    with pytest.raises(FatalError) as caught:
        sink.write_batch([ROW])
    assert "no primary key or unique constraint on (tag_name, ts)" in caught.value.message
    assert caught.value.hint == KEY_HINT
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM tag_values").fetchone() == (0,)


def test_open_accepts_a_unique_index_on_tag_and_ts_as_the_key(tmp_path: Path) -> None:
    db = tmp_path / "tags.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, quality INTEGER)")
        conn.execute("CREATE UNIQUE INDEX k ON tag_values (tag_name, ts)")
    sink = SqliteSink(db)
    assert sink.write_batch([ROW, ROW]).written == 1
    sink.close()

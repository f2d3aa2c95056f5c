"""SqliteSink.open on a real SQLite file: the table is created as DESIGN.md says, or refused when
another table of that name would break the (tag, ts) key (the writer of `run` and `replay` both open it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tagwriter.checks import KEY_HINT
from tagwriter.errors import FatalError
from tagwriter.models import Chunk, TagValue, format_ts
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


def _stored(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY ts, tag_name").fetchall()


@pytest.mark.parametrize("as_chunk", [False, True], ids=["rows", "chunk"])
@pytest.mark.parametrize("size", [1, 7, 63, 64, 99, 100, 101, 127, 199, 200, 257, 499, 500, 501, 1234])
def test_a_batch_of_any_size_lands_whole_across_its_multi_row_statements(
    tmp_path: Path, size: int, as_chunk: bool,
) -> None:
    """write_batch splits a batch into INSERTs of 100 rows and powers of two: every row lands once, each
    exactly, with rows already stored and repeats inside the batch counted as duplicates, not written;
    from a list of rows (replay) as from a Chunk (the writer's, its columns laid into the parameters)."""
    db = tmp_path / "tags.db"
    sink = SqliteSink(db)
    base = 1_714_564_800_000_000
    rows = [TagValue(f"g{i % 7}.t{i}", base + (i // 50) * 1_000_000, i * 0.5 if i % 11 else None, 192 + i % 3)
            for i in range(size)]
    old = rows[::5]  # stored before: duplicates in the batch
    assert sink.write_batch(Chunk.of(old) if as_chunk else old).written == len(old)
    repeats = rows[:3]  # and repeats inside it
    batch = rows + repeats
    result = sink.write_batch(Chunk.of(batch) if as_chunk else batch)
    assert (result.written, result.duplicates, result.rejected) == (size - len(old), len(old) + len(repeats), [])
    expected = sorted(((r.tag, format_ts(r.ts_us), r.value, r.quality) for r in rows), key=lambda r: (r[1], r[0]))
    assert _stored(db) == expected
    sink.close()


def test_a_rejected_row_in_a_multi_row_statement_is_the_only_one_kept_out(tmp_path: Path) -> None:
    """A CHECK the table adds fails one row of a 250-row batch: the statement fails whole, the batch goes
    row by row in the same transaction, and only that row comes back rejected, by its index."""
    db = tmp_path / "tags.db"
    with sqlite3.connect(db) as conn:
        conn.execute('CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, '
                     'quality INTEGER CHECK (quality < 1000), PRIMARY KEY (ts, tag_name)) WITHOUT ROWID')
    sink = SqliteSink(db)
    rows = [TagValue(f"t{i}", 1_714_564_800_000_000, float(i), 192) for i in range(250)]
    rows[137] = TagValue("t137", 1_714_564_800_000_000, 1.0, 5000)
    result = sink.write_batch(rows)
    assert result.written == 249 and result.duplicates == 0
    assert [(e.index, e.code) for e in result.rejected] == [(137, "SQLITE_CONSTRAINT_CHECK")]
    assert len(_stored(db)) == 249 and ("t137",) not in [r[:1] for r in _stored(db)]
    sink.close()

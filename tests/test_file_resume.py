"""File sources resume with the disk queue: after the last durable line, never twice, never a gap.

In-process with a real `Pipeline` (durability disk) into a real SQLite file,
then through `tagwriter run --input F` as a user runs it.
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from procs import run_env, start_run, summary

from tagwriter.config import load
from tagwriter.pipeline import Pipeline
from tagwriter.settle import Receipt
from tagwriter.sources.files import READ_BYTES, FileSource, Position, cursor_key

N = 5000
BASE_TS = 1_700_000_000


def jsonl_line(i: int) -> str:
    return json.dumps({"tag": f"t{i % 13}", "ts": BASE_TS + i, "value": i})


def write_jsonl(path: Path, n: int = N, *, line: Any = jsonl_line) -> Path:
    path.write_text("".join(line(i) + "\n" for i in range(n)))
    return path


def make_pipeline(tmp_path: Path, durability: str = "disk") -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "buffer.durability": durability,
        "buffer.directory": str(tmp_path / "queue"),
        "writer.flush_interval": 0.05,
    })
    return Pipeline(config)


def values(tmp_path: Path) -> list[float]:
    """Every value in the table, in key order."""
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        return [v for (v,) in db.execute("SELECT value FROM tag_values ORDER BY ts, tag_name")]


class StopAfter:
    """The pipeline as an `Intake`, which sets `stop` once `submits` submits with rows went through."""

    def __init__(self, pipeline: Pipeline, stop: threading.Event, submits: int) -> None:
        self.pipeline = pipeline
        self.stop = stop
        self.left = submits

    def submit(self, data: Iterable[Any], *, cursor: tuple[str, str] | None = None) -> Receipt:
        rows = list(data)
        receipt = self.pipeline.submit(rows, cursor=cursor)
        if rows:
            self.left -= 1
            if self.left <= 0:
                self.stop.set()
        return receipt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


def read(tmp_path: Path, source: FileSource, *, stop_after: int | None = None,
         durability: str = "disk") -> Pipeline:
    """One run of `source` into the table (stopped after `stop_after` submits); returns the stopped pipeline."""
    pipeline = make_pipeline(tmp_path, durability).start()
    stop = threading.Event()
    intake: Any = pipeline if stop_after is None else StopAfter(pipeline, stop, stop_after)
    source.run(intake, stop)
    assert pipeline.stop(10.0)
    return pipeline


def half_read(tmp_path: Path, path: Path, kind: str = "jsonl") -> tuple[Pipeline, FileSource]:
    """A run stopped at the end of the first 64 KiB block of a file of several: a line is half read there."""
    source = FileSource(kind, str(path))
    source.lines.chunk_rows = 50
    first = read(tmp_path, source, stop_after=3)
    assert not source.result.ended
    assert 0 < source.result.rows < N
    return first, source


def test_a_stopped_read_resumes_after_the_last_durable_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "in.jsonl")
    first, source = half_read(tmp_path, path)
    done = source.result.rows
    stored = Position.decode(first.resume_point(f"file:{path.resolve()}") or "")
    assert stored is not None and stored.lineno == done
    assert stored.offset == sum(len(jsonl_line(i)) + 1 for i in range(done))
    assert stored.offset < READ_BYTES < stored.offset + len(jsonl_line(done)) + 1, "line done + 1 was half read"
    assert values(tmp_path) == list(range(done))

    again = FileSource("jsonl", str(path))
    with caplog.at_level(logging.INFO, logger="tagwriter.sources.files"):
        second = read(tmp_path, again)
    assert f"resuming {path} after line {done} (byte {stored.offset})" in caplog.text
    snap = second.snapshot()
    assert (snap.submitted, snap.written, snap.duplicates) == (N - done, N - done, 0)
    assert again.result.ended and again.start == stored
    assert values(tmp_path) == list(range(N))  # no duplicate, no gap


def test_from_start_reads_again_and_counts_duplicates_by_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "in.jsonl")
    read(tmp_path, FileSource("jsonl", str(path)))
    with caplog.at_level(logging.INFO, logger="tagwriter.sources.files"):
        again = read(tmp_path, FileSource("jsonl", str(path), from_start=True)).snapshot()
    assert (again.submitted, again.written, again.duplicates, again.quarantined) == (N, 0, N, 0)
    assert f"reading {path} from the start (--from-start): the last run got to line {N}" in caplog.text
    assert values(tmp_path) == list(range(N))


def test_a_finished_file_read_again_takes_nothing(tmp_path: Path) -> None:
    """The last line is not sent again (telegraf#16981), with or without a newline at the end."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(jsonl_line(i) for i in range(N)))  # no newline after the last line
    read(tmp_path, FileSource("jsonl", str(path)))
    again = FileSource("jsonl", str(path))
    snap = read(tmp_path, again).snapshot()
    assert (snap.submitted, snap.duplicates) == (0, 0)
    assert again.start.lineno == N and again.result.ended
    assert values(tmp_path) == list(range(N))


@pytest.mark.parametrize("change", ["shorter", "same length, other values"])
def test_a_replaced_file_is_read_from_the_start_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl")
    read(tmp_path, FileSource("jsonl", str(path)))
    if change == "shorter":
        expected_new = 100
        write_jsonl(path, 100, line=lambda i: jsonl_line(N + i))
        reason = "the file is shorter now"
    else:  # each line as long as before, so only the bytes before the position tell
        expected_new = N
        write_jsonl(path, N, line=lambda i: jsonl_line(i).replace('"tag": "t', '"tag": "u'))
        reason = "have changed"
    with caplog.at_level(logging.WARNING, logger="tagwriter.sources.files"):
        snap = read(tmp_path, FileSource("jsonl", str(path))).snapshot()
    assert f"cannot resume {path} after line {N}" in caplog.text and reason in caplog.text
    assert "reading it from the start" in caplog.text
    assert (snap.submitted, snap.written) == (expected_new, expected_new)
    assert len(values(tmp_path)) == N + expected_new


def test_a_csv_resumes_with_its_header_and_true_line_numbers(tmp_path: Path) -> None:
    """Columns in an unusual order: the header is read from the top again; a bad line keeps its number."""
    path = tmp_path / "in.csv"
    bad_line = N - 10  # a data line in the part the second run reads
    lines = ["\ufeffvalue,quality,ts,tag_name"]  # a byte order mark, as Excel writes
    lines += [f"{i},{i % 200},{BASE_TS + i},t{i % 13}" if i != bad_line else "oops,1,2,x" for i in range(N)]
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    _, source = half_read(tmp_path, path, "csv")
    done = source.result.rows
    second = read(tmp_path, FileSource("csv", str(path))).snapshot()
    assert (second.submitted, second.duplicates, second.bad_input) == (N - done - 1, 0, 1)
    assert values(tmp_path) == [i for i in range(N) if i != bad_line]
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT quality FROM tag_values WHERE value = 4321").fetchone() == (4321 % 200,)
    (kept,) = (row for p in sorted((tmp_path / "backup" / "quarantine").glob("*.csv"))
               for row in csv.DictReader(p.open(newline="", encoding="utf-8")))
    assert kept["source"] == f"{path}:{bad_line + 2}"  # + the header line, counted from 1


def test_trailing_bad_lines_move_the_cursor_and_are_not_kept_twice(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", 100)
    with path.open("a") as f:
        f.write("not json\n" * 7)
    first = read(tmp_path, FileSource("jsonl", str(path)))
    assert first.snapshot().bad_input == 7
    stored = Position.decode(first.resume_point(f"file:{path.resolve()}") or "")
    assert stored is not None and stored.lineno == 107
    again = read(tmp_path, FileSource("jsonl", str(path))).snapshot()
    assert (again.submitted, again.bad_input) == (0, 0)


def test_in_memory_nothing_resumes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", 500)
    first = read(tmp_path, FileSource("jsonl", str(path)), durability="memory")
    assert first.resume_point(f"file:{path.resolve()}") is None
    again = read(tmp_path, FileSource("jsonl", str(path)), durability="memory").snapshot()
    assert (again.submitted, again.duplicates) == (500, 500)
    assert not (tmp_path / "queue").exists()


def test_stdin_and_pipes_have_no_cursor_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", 1)
    assert cursor_key("-") is None
    assert cursor_key(str(tmp_path)) is None  # not a regular file
    assert cursor_key(str(path)) == f"file:{path.resolve()}"


@pytest.mark.parametrize("text", ["", "12", "a b", "-1 2", "1 2 3 4", "1 2 zz"])
def test_a_position_not_written_by_tagwriter_is_refused(text: str) -> None:
    assert Position.decode(text) is None


def test_position_round_trip() -> None:
    for position in (Position(10, 2), Position(10, 2, 0xDEADBEEF)):
        assert Position.decode(position.encode()) == position


# -- as a user runs it ---------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> tuple[dict[str, int], str]:
    proc = start_run(tmp_path, "--input", "in.jsonl", "--no-panel", "--database",
                     f"sqlite:///{tmp_path / 'db.sqlite'}", *args, env=run_env())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return summary(out), err


def test_tagwriter_run_twice_resumes_and_writes_nothing_new(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl")
    first, _ = run_cli(tmp_path)
    assert first["written"] == N
    second, err = run_cli(tmp_path)
    assert (second["submitted"], second["written"], second["duplicates"]) == (0, 0, 0)
    assert f"resuming in.jsonl after line {N}" in err
    third, err = run_cli(tmp_path, "--from-start")
    assert (third["submitted"], third["written"], third["duplicates"]) == (N, 0, N)
    assert values(tmp_path) == list(range(N))

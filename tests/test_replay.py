"""`tagwriter.replay`: spool files back into a real SQLite table, exactly once.

The database is a real SQLite file; faults (down, failing midway, rejected
rows) come from `MemorySink` wrapped around the real `SqliteSink`. Pacing
(`rate`) is checked with a fake clock whose `wait()` advances time.
"""

from __future__ import annotations

import csv
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from tagwriter.errors import TransientError
from tagwriter.models import TagValue, format_ts
from tagwriter.replay import REPLAYED_DIR, FileStatus, ReplayReport, replay_files
from tagwriter.sinks.base import WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import Spool
from tagwriter.spoolformat import QUARANTINE_HEADER, SpoolReader, count_lines, read_spool

T0 = 1_714_564_800_000_000  # 2024-05-01T12:00:00Z in µs


def rows(n: int, start: int = 0, tags: int = 7) -> list[TagValue]:
    """n rows; every `tags` rows share one timestamp, as a polling group does."""
    return [TagValue(f"t{i % tags}", T0 + (i // tags) * 1_000_000, i / 8, 192) for i in range(start, start + n)]


def write_spool(directory: Path, data: Sequence[TagValue], *, roll_rows: int = 100_000) -> list[Path]:
    before = set(directory.glob("tagwriter-*.csv"))
    spool = Spool(directory, directory / "quarantine", roll_rows=roll_rows, roll_seconds=3600)
    for i in range(0, len(data), 100):  # the spool rolls between appends
        spool.write_rows(data[i:i + 100])
    spool.seal()
    return [f for f in spool.backup.files() if f not in before]


def table(db: Path) -> list[tuple[str, str, float | None, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY tag_name, ts").fetchall()


def as_table(data: Sequence[TagValue]) -> list[tuple[str, str, float | None, int]]:
    return sorted((r.tag, format_ts(r.ts_us), r.value, r.quality) for r in data)


def quarantined(directory: Path) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for f in sorted(directory.glob("quarantine-*.csv")):
        with open(f, newline="", encoding="utf-8") as fh:
            out += list(csv.DictReader(fh))
    return out


class StepClock:
    """A single-thread fake clock: `wait()` records the timeout and advances time by it."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.waits.append(timeout)
        self.now += max(0.0, timeout)
        return event.is_set()


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.backup = tmp_path / "backup"
        self.db = tmp_path / "tags.db"
        self.spool = Spool(self.backup, self.backup / "quarantine")

    def replay(self, paths: Sequence[Path | str], sink: object | None = None, **kw: object) -> ReplayReport:
        return replay_files(paths, sink=sink if sink is not None else SqliteSink(self.db),  # type: ignore[arg-type]
                            spool=self.spool, retry_delays=(0.0,), **kw)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# -- idempotence ---------------------------------------------------------------------


def test_replay_inserts_every_row_and_moves_the_file(env: Env) -> None:
    data = rows(1234)
    files = write_spool(env.backup, data, roll_rows=500)
    assert len(files) == 3
    report = env.replay(files, batch_size=100)
    assert report.ok, report.reason()
    assert [f.status for f in report.files] == [FileStatus.REPLAYED] * 3
    assert report.total("rows_read") == report.total("inserted") == 1234
    assert table(env.db) == as_table(data)
    assert not list(env.backup.glob("tagwriter-*.csv"))
    assert sorted(p.name for p in (env.backup / REPLAYED_DIR).iterdir()) == [f.name for f in files]


def test_replaying_twice_inserts_nothing_the_second_time(env: Env) -> None:
    data = rows(900)
    files = write_spool(env.backup, data)
    first = env.replay(files)
    assert first.total("inserted") == 900
    again = env.replay(list((env.backup / REPLAYED_DIR).iterdir()))
    assert again.ok, again.reason()
    assert again.total("inserted") == 0
    assert again.total("duplicates") == again.total("rows_read") == 900
    assert table(env.db) == as_table(data)


def test_a_file_partly_in_the_table_inserts_only_the_rest(env: Env) -> None:
    data = rows(1000)
    sink = SqliteSink(env.db)
    sink.write_batch(data[200:450])  # an ambiguous commit, or a live write of the same values
    sink.close()
    files = write_spool(env.backup, data)
    report = env.replay(files, batch_size=128)
    assert report.ok
    assert (report.total("inserted"), report.total("duplicates")) == (750, 250)
    assert table(env.db) == as_table(data)


def test_delete_removes_the_replayed_file(env: Env) -> None:
    files = write_spool(env.backup, rows(10))
    report = env.replay(files, delete=True)
    assert [f.status for f in report.files] == [FileStatus.DELETED]
    assert not files[0].exists() and not (env.backup / REPLAYED_DIR).exists()


def test_a_folder_stands_for_its_completed_spool_files_oldest_first(env: Env) -> None:
    files = write_spool(env.backup, rows(30), roll_rows=10)
    (env.backup / "tagwriter-99999999T000000000000Z-1-0001.csv.partial").write_text("tag_name,ts,value,quality\n")
    report = env.replay([env.backup])
    assert [f.path.name for f in report.files] == [f.name for f in files]
    assert report.total("inserted") == 30


# -- failures midway -----------------------------------------------------------------


class FailAfter(MemorySink):
    """A real SQLite write path that goes down after `good` successful batches."""

    def __init__(self, inner: SqliteSink, good: int) -> None:
        super().__init__(inner=inner)
        self.good = good

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if self.commits >= self.good:
            self.go_down()
        return super().write_batch(rows)


def test_a_file_that_fails_midway_stays_and_replays_safely_later(env: Env) -> None:
    data = rows(1000)
    files = write_spool(env.backup, data[:600]) + write_spool(env.backup, data[600:])
    assert len(files) == 2
    sink = FailAfter(SqliteSink(env.db), good=3)
    report = env.replay(files, sink=sink, batch_size=100)
    assert not report.ok
    assert [f.status for f in report.files] == [FileStatus.FAILED, FileStatus.SKIPPED]
    assert report.files[0].inserted == 300
    assert "TEST-DOWN" in report.files[0].error
    assert "1 files failed" in report.reason() or "1 file failed" in report.reason()
    assert all(f.exists() for f in files)  # both stay where they were
    assert len(table(env.db)) == 300
    assert not quarantined(env.backup / "quarantine")

    again = env.replay(files, batch_size=100)
    assert again.ok, again.reason()
    assert (again.total("inserted"), again.total("duplicates")) == (700, 300)
    assert table(env.db) == as_table(data)


def test_transient_failures_are_retried_like_live_writes(env: Env) -> None:
    files = write_spool(env.backup, rows(300))
    sink = MemorySink(inner=SqliteSink(env.db))
    sink.fail_times(2)
    clock = StepClock()
    report = replay_files(files, sink=sink, spool=env.spool, batch_size=100, retry_delays=(1.0, 2.0, 4.0),
                          clock=clock)
    assert report.ok
    assert clock.waits == [1.0, 2.0]
    assert report.total("inserted") == 300


def test_a_stop_leaves_the_current_file_in_place(env: Env) -> None:
    files = write_spool(env.backup, rows(500))
    stop = threading.Event()

    class StopAfterFirst(MemorySink):
        def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
            result = super().write_batch(rows)
            stop.set()
            return result

    report = env.replay(files, sink=StopAfterFirst(inner=SqliteSink(env.db)), batch_size=100, stop=stop)
    assert report.files[0].status is FileStatus.SKIPPED
    assert files[0].exists()
    assert len(table(env.db)) == 100


# -- bad lines -----------------------------------------------------------------------


GOOD = ["a,2024-05-01T12:00:00.000000Z,1.5,192", "e,2024-05-01T12:00:02.000000Z,2.5,192",
        'g,2024-05-01T12:00:03.000000Z,,0', "h,1714564804.5,nan,192"]
BAD = {
    3: ("b,2024-05-01T12:00:00.000000Z,1.5", "expected 4 columns, found 3"),
    4: ("c,yesterday noon,1.5,192", "unparsable timestamp 'yesterday noon'"),
    5: ("d,2024-05-01T12:00:01.000000Z,12abc,192", "unparsable value '12abc'"),
    7: ("f,2024-05-01T12:00:02.000000Z,1.0,good", "unparsable quality 'good'"),
    9: ("x,2024-05-01T12:00:02.000000Z,1.0,192,extra", "expected 4 columns, found 5"),
    11: ("i,2024-05-01T12:00:05.000000Z,3.5,19", "truncated line (no line end)"),
}


def bad_file(path: Path) -> Path:
    lines = ["tag_name,ts,value,quality", GOOD[0], BAD[3][0], BAD[4][0], BAD[5][0], GOOD[1], BAD[7][0], GOOD[2],
             BAD[9][0], GOOD[3], BAD[11][0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")  # no line end after the last: truncated
    return path


def test_each_kind_of_bad_line_is_reported_with_its_line_and_quarantined(env: Env) -> None:
    path = bad_file(env.backup / "tagwriter-20240501T120000000000Z-1-0001.csv")
    good = write_spool(env.backup, rows(50))
    report = env.replay([path, *good])
    f = report.files[0]
    assert f.problems == [f"{path}:{n}: {reason}" for n, (_raw, reason) in sorted(BAD.items())]
    assert (f.rows_read, f.inserted, f.bad_lines) == (4, 4, 6)
    assert f.status is FileStatus.REPLAYED  # every line settled: inserted or quarantined
    assert report.files[1].ok and report.files[1].inserted == 50  # the other file goes on
    assert not report.ok and "6 bad lines quarantined" in report.reason()
    got = {(r[0], r[2]) for r in table(env.db) if r[0] in "aegh"}
    assert got == {("a", 1.5), ("e", 2.5), ("g", None), ("h", None)}  # SQLite stores NaN as NULL
    q = quarantined(env.backup / "quarantine")
    assert [(row["source"], row["error_message"], row["raw"], row["error_code"]) for row in q] == [
        (f"{path}:{n}", reason, raw, "BAD_LINE") for n, (raw, reason) in sorted(BAD.items())
    ]


def test_a_line_that_is_not_utf8_or_not_csv_is_a_bad_line(env: Env) -> None:
    path = env.backup / "tagwriter-x.csv"
    env.backup.mkdir()
    path.write_bytes(b'tag_name,ts,value,quality\nok,2024-05-01T12:00:00Z,1,192\n'
                     b'\xff\xfe,2024-05-01T12:00:00Z,1,192\n"unclosed,2024-05-01T12:00:00Z,1,192\n')
    report = env.replay([path])
    f = report.files[0]
    assert f.inserted == 1 and f.bad_lines == 2
    assert f.problems[0] == f"{path}:3: not valid UTF-8"
    assert f.problems[1].startswith(f"{path}:4: ")


def test_a_file_that_is_not_a_spool_file_is_refused_and_the_others_go_on(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "export.csv"
    other.write_text("tag,time,val\na,1,2\n")
    good = write_spool(env.backup, rows(20))
    report = env.replay([other, tmp_path / "missing.csv", *good])
    assert [f.status for f in report.files] == [FileStatus.REFUSED, FileStatus.REFUSED, FileStatus.REPLAYED]
    assert report.files[0].error == (
        "not a tagwriter spool file (header 'tag,time,val', expected 'tag_name,ts,value,quality')")
    assert report.files[1].error == "no such file"
    assert other.read_text() == "tag,time,val\na,1,2\n"
    assert report.files[2].inserted == 20
    assert "2 files refused" in report.reason()


def test_an_empty_file_left_by_a_crash_is_an_empty_spool_file(env: Env) -> None:
    env.backup.mkdir()
    empty = env.backup / "tagwriter-a.csv"
    empty.write_text("")
    cut = env.backup / "tagwriter-b.csv"
    cut.write_text("tag_name,ts,va")
    report = env.replay([empty, cut])
    assert report.ok and [f.rows_read for f in report.files] == [0, 0]


def test_reading_in_small_chunks_gives_what_read_spool_gives_in_line_order(env: Env) -> None:
    """Chunk boundaries (3 lines here, thousands in read_spool) change neither the verdicts nor their order."""
    path = bad_file(env.backup / "tagwriter-1.csv")
    expected_good = [x.row for x in read_spool(path) if not isinstance(x, Exception)]
    expected_bad = [str(x) for x in read_spool(path) if isinstance(x, Exception)]
    with SpoolReader(path) as reader:
        got_rows, _lines, bad = reader.read(3)
        while not reader.done:
            more_rows, _lines, more_bad = reader.read(3)
            got_rows += more_rows
            bad += more_bad
    assert list(map(repr, got_rows)) == list(map(repr, expected_good))  # repr: nan != nan
    assert [str(b) for b in bad] == expected_bad


def test_count_lines_counts_data_lines_including_a_truncated_last_one(env: Env) -> None:
    path = bad_file(env.backup / "tagwriter-1.csv")
    assert count_lines(path) == 10
    assert count_lines(env.backup / "nope.csv") == 0


# -- dry run -------------------------------------------------------------------------


def test_dry_run_counts_and_validates_and_touches_nothing(env: Env) -> None:
    path = bad_file(env.backup / "tagwriter-1.csv")
    before = path.read_bytes()
    report = replay_files([path], sink=None, spool=env.spool, dry_run=True)
    f = report.files[0]
    assert f.status is FileStatus.CHECKED
    assert (f.rows_read, f.inserted, f.bad_lines) == (4, 0, 6)
    assert not report.ok
    assert path.read_bytes() == before
    assert sorted(p.name for p in env.backup.iterdir()) == ["tagwriter-1.csv"]  # no quarantine, no replayed/
    assert not env.db.exists()


# -- rows the database rejects, and --from-quarantine ----------------------------------


def test_rejected_rows_go_to_quarantine_with_the_error_and_come_back_from_it(env: Env) -> None:
    data = rows(200)
    files = write_spool(env.backup, data)
    sink = MemorySink(inner=SqliteSink(env.db))
    sink.reject_if(lambda r: r.tag == "t3", "ORA-12899", "value too large for column")
    report = env.replay(files, sink=sink, batch_size=64)
    rejected = [r for r in data if r.tag == "t3"]
    assert report.total("quarantined") == len(rejected) > 0
    assert report.total("inserted") == len(data) - len(rejected)
    assert not report.ok and "rejected by the database" in report.reason()
    assert report.files[0].status is FileStatus.REPLAYED
    q = quarantined(env.backup / "quarantine")
    assert {(row["error_code"], row["error_message"]) for row in q} == {("ORA-12899", "value too large for column")}
    assert sorted((row["tag_name"], row["ts"], float(row["value"])) for row in q) == sorted(
        (r.tag, format_ts(r.ts_us), r.value) for r in rejected)
    moved = Path(report.files[0].moved_to or "")
    where = re.fullmatch(rf"{re.escape(str(files[0]))}:(\d+) replay into memory \(sqlite:///.*", q[0]["source"])
    assert where is not None and int(where[1]) > 1, q[0]["source"]

    # The operator fixed the cause: re-submit the quarantine folder.
    qfiles = sorted((env.backup / "quarantine").glob("quarantine-*.csv"))
    again = env.replay([env.backup / "quarantine"], from_quarantine=True)
    assert again.ok, again.reason()
    assert again.total("inserted") == len(rejected)
    assert table(env.db) == as_table(data)
    assert all(not p.exists() for p in qfiles)
    assert moved.exists()


def test_from_quarantine_keeps_bad_lines_in_quarantine_with_their_origin(env: Env) -> None:
    path = bad_file(env.backup / "tagwriter-1.csv")
    env.replay([path])
    qdir = env.backup / "quarantine"
    first = quarantined(qdir)
    again = env.replay([qdir], from_quarantine=True)
    assert again.total("bad_lines") == len(BAD)
    assert again.total("inserted") == 0
    now = quarantined(qdir)
    assert [(r["source"], r["raw"]) for r in now] == [(r["source"], r["raw"]) for r in first]


def test_a_spool_file_given_as_quarantine_is_refused(env: Env) -> None:
    files = write_spool(env.backup, rows(5))
    report = env.replay(files, from_quarantine=True)
    assert report.files[0].status is FileStatus.REFUSED
    assert ",".join(QUARANTINE_HEADER) in report.files[0].error


# -- pacing --------------------------------------------------------------------------


def test_rate_paces_writes_to_the_given_values_per_second(env: Env) -> None:
    files = write_spool(env.backup, rows(1000))
    clock = StepClock()
    start = clock.now
    report = env.replay(files, batch_size=100, rate=250.0, clock=clock)
    assert report.ok
    # 10 batches of 100 at 250/s: each batch may start 0.4 s after the previous one began.
    assert clock.now - start == pytest.approx(1000 / 250.0)
    assert clock.waits == pytest.approx([0.4] * 10)


def test_rate_does_not_wait_when_writes_are_slower_than_the_rate(env: Env) -> None:
    files = write_spool(env.backup, rows(300))

    class SlowClock(StepClock):
        def monotonic(self) -> float:
            self.now += 1.0  # every look at the clock costs a second: writes far slower than the rate
            return self.now

    clock = SlowClock()
    report = env.replay(files, batch_size=100, rate=1000.0, clock=clock)
    assert report.ok and clock.waits == []


def test_no_rate_never_waits(env: Env) -> None:
    files = write_spool(env.backup, rows(300))
    clock = StepClock()
    env.replay(files, batch_size=100, clock=clock)
    assert clock.waits == []


def test_transient_error_raised_by_open_is_retried_then_reported(env: Env) -> None:
    files = write_spool(env.backup, rows(10))
    sink = MemorySink(inner=SqliteSink(env.db))
    sink.go_down(TransientError("connection refused", code="DPY-6005"))
    clock = StepClock()
    report = replay_files(files, sink=sink, spool=env.spool, retry_delays=(1.0, 2.0), clock=clock)
    assert clock.waits == [1.0, 2.0]
    assert report.files[0].status is FileStatus.FAILED
    assert "DPY-6005" in report.files[0].error
    assert files[0].exists()


# -- wrong and repeated headers, bytes that are not UTF-8 ------------------------------


def test_a_wrong_header_on_spool_rows_is_a_bad_line_and_the_rows_are_replayed(env: Env) -> None:
    env.backup.mkdir()
    path = env.backup / "tagwriter-x.csv"
    path.write_text("tag,time,val,q\n" + "".join(f"{g}\n" for g in GOOD), encoding="utf-8")
    report = env.replay([path])
    f = report.files[0]
    assert f.status is FileStatus.REPLAYED
    assert (f.rows_read, f.inserted, f.bad_lines) == (4, 4, 1)
    assert f.problems == [f"{path}:1: wrong header 'tag,time,val,q', expected 'tag_name,ts,value,quality'"]
    q = quarantined(env.backup / "quarantine")
    assert [(r["source"], r["raw"], r["error_code"]) for r in q] == [(f"{path}:1", "tag,time,val,q", "BAD_LINE")]
    assert {r[0] for r in table(env.db)} == {"a", "e", "g", "h"}


def test_a_wrong_header_on_lines_that_are_not_rows_refuses_the_file(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "export.csv"
    other.write_text("tag,time,val,q\n1;2;3\nx,y\n4;5;6\n")  # four columns in the header, but no rows
    report = env.replay([other])
    assert report.files[0].status is FileStatus.REFUSED
    assert report.files[0].error.startswith("not a tagwriter spool file (header 'tag,time,val,q'")
    assert not (env.backup / "quarantine").exists()


def test_a_header_repeated_in_the_middle_is_reported_as_such(env: Env) -> None:
    env.backup.mkdir()
    path = env.backup / "tagwriter-x.csv"
    path.write_text("tag_name,ts,value,quality\n" + GOOD[0] + "\ntag_name,ts,value,quality\n" + GOOD[1] + "\n")
    report = env.replay([path])
    f = report.files[0]
    assert f.problems == [f"{path}:3: repeated header line"]
    assert (f.inserted, f.bad_lines) == (2, 1)


def test_a_line_that_is_not_utf8_keeps_its_bytes_visible_in_quarantine(env: Env) -> None:
    env.backup.mkdir()
    path = env.backup / "tagwriter-x.csv"
    path.write_bytes(b"tag_name,ts,value,quality\nok,2024-05-01T12:00:00Z,1,192\n"
                     b"t\xff\xfe,2024-05-01T12:00:00Z,1,192\n\xef\xbf\xbd,2024-05-01T12:00:00Z,2,192\n")
    report = env.replay([path])
    f = report.files[0]
    assert f.problems == [f"{path}:3: not valid UTF-8"]
    assert f.inserted == 2  # a real U+FFFD in valid UTF-8 is a tag name like any other
    q = quarantined(env.backup / "quarantine")
    raw = "t\\xff\\xfe,2024-05-01T12:00:00Z,1,192"  # the original bytes, as escapes
    assert [(r["error_message"], r["raw"]) for r in q] == [("not valid UTF-8", raw)]


def test_replayed_quarantine_files_move_to_the_quarantine_replayed_folder(env: Env) -> None:
    files = write_spool(env.backup, rows(100))
    sink = MemorySink(inner=SqliteSink(env.db))
    sink.reject_if(lambda r: r.tag == "t3")
    env.replay(files, sink=sink)
    qdir = env.backup / "quarantine"
    qfiles = sorted(qdir.glob("quarantine-*.csv"))
    assert qfiles
    again = env.replay([qdir], from_quarantine=True)
    assert again.ok, again.reason()
    assert [f.moved_to for f in again.files] == [qdir / REPLAYED_DIR / q.name for q in qfiles]
    assert sorted(p.name for p in (env.backup / REPLAYED_DIR).iterdir()) == [f.name for f in files]

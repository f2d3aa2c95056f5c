"""Spool: CSV backup and quarantine files, atomic completion, rolling, size cap, recovery, reading back."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import threading
import time
import zlib
from pathlib import Path

import pytest
from clocks import ManualClock

from tagwriter.errors import InputError, SpoolError, SpoolFullError
from tagwriter.models import TagValue, format_ts
from tagwriter.replay import replay_files
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import LOOK_INTERVAL, PARTIAL, Spool
from tagwriter.spoolformat import CHECKED_HEADER, QUARANTINE_HEADER, SpoolLine, read_spool

TS0 = 1_700_000_000_123_456  # µs


def rows(n: int, start: int = 0, tag: str = "t") -> list[TagValue]:
    return [TagValue(f"{tag}{i}", TS0 + i, i / 3, 192) for i in range(start, start + n)]


def read_back(spool: Spool) -> list[TagValue]:
    out: list[TagValue] = []
    for f in spool.backup.files():
        for item in read_spool(f):
            assert isinstance(item, SpoolLine), item
            out.append(item.row)
    return out


def same_value(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a):
        return math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# -- format and round trip ---------------------------------------------------


def test_file_has_the_header_and_one_line_per_row(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    assert spool.write_rows(rows(3)) == 3
    spool.seal()
    (path,) = spool.backup.files()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(CHECKED_HEADER) == "tag_name,ts,value,quality,crc32"
    assert len(lines) == 4
    body = f"t0,{format_ts(TS0)},0.0,192"
    assert lines[1] == f"{body},{zlib.crc32(body.encode()):08x}"


def test_round_trip_is_exact_for_timestamps_floats_and_specials(tmp_path: Path) -> None:
    values: list[float | None] = [
        0.1, 1 / 3, -2.5e-300, 5e-324, 1.7976931348623157e308, -0.0, 0.0,
        math.nan, math.inf, -math.inf, None, 123456789.123456789, 2.0**53 + 1,
    ]
    timestamps = [0, 1, -1, TS0, 253_402_300_799_999_999, -62_135_596_800_000_000]
    written = [
        TagValue(f"tag,with \"quotes\" {i}", timestamps[i % len(timestamps)], v, i * 1000)
        for i, v in enumerate(values)
    ]
    spool = Spool(tmp_path / "backup")
    spool.write_rows(written)
    spool.seal()
    back = read_back(spool)
    assert len(back) == len(written)
    for w, b in zip(written, back, strict=True):
        assert (b.tag, b.ts_us, b.quality) == (w.tag, w.ts_us, w.quality)
        assert same_value(w.value, b.value), (w, b)


def test_empty_write_makes_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    assert spool.write_rows([]) == 0
    spool.seal()
    assert not (tmp_path / "backup").exists() or list((tmp_path / "backup").iterdir()) == []


# -- atomic completion ---------------------------------------------------------


def test_rows_go_to_a_partial_file_until_sealed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    spool.write_rows(rows(5))
    names = [p.name for p in (tmp_path / "backup").iterdir() if p.is_file()]
    assert len(names) == 1 and names[0].endswith(".csv" + PARTIAL)
    assert spool.backup.files() == []  # readers see no file yet
    assert spool.stats()[0] == 1  # ...but the count includes the open one
    path = spool.backup.seal()
    assert path is not None and path.name == names[0][: -len(PARTIAL)]
    assert [p.name for p in (tmp_path / "backup").iterdir() if p.is_file()] == [path.name]
    assert spool.backup.seal() is None  # nothing open: no-op


def test_seal_fsyncs_the_file_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    spool = Spool(tmp_path / "backup")
    spool.write_rows(rows(2))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = spool.backup.seal()
    assert path is not None
    partial = str(path) + PARTIAL
    assert events[0] == ("fsync", partial)
    assert events[1] == ("replace", partial)
    assert ("fsync", str(tmp_path / "backup")) in events[2:]  # the directory entry too


def test_timestamped_names_under_the_backup_folder(tmp_path: Path) -> None:
    clock = ManualClock(wall=1_700_000_000.0)  # 2023-11-14T22:13:20Z
    spool = Spool(tmp_path / "backup", roll_rows=1, clock=clock)
    spool.write_rows(rows(1))
    clock.advance(1.5)
    spool.write_rows(rows(1, 1))
    files = spool.backup.files()
    assert [f.parent for f in files] == [tmp_path / "backup"] * 2
    pattern = re.compile(rf"tagwriter-(\d{{8}}T\d{{12}}Z)-{os.getpid()}-(\d{{4}})\.csv")
    stamps = [m.group(1) for f in files if (m := pattern.fullmatch(f.name))]
    assert stamps == ["20231114T221320000000Z", "20231114T221321500000Z"]
    assert spool.quarantine_directory == tmp_path / "backup" / "quarantine"


def test_reader_never_sees_a_half_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup", roll_rows=200)
    total = 20_000
    stop = threading.Event()
    seen: dict[Path, int] = {}
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for f in spool.backup.files():
                if f in seen:
                    continue
                items = list(read_spool(f))
                bad = [i for i in items if isinstance(i, InputError)]
                if bad or len(items) != 200:
                    problems.append(f"{f.name}: {len(items)} lines, {len(bad)} bad")
                seen[f] = len(items)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for start in range(0, total, 50):
            spool.write_rows(rows(50, start))
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert problems == []
    assert len(spool.backup.files()) == total // 200
    assert len(read_back(spool)) == total


# -- rolling -------------------------------------------------------------------


def test_rolls_by_row_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup", roll_rows=10)
    for start in range(0, 25, 5):
        spool.write_rows(rows(5, start))
    files = spool.backup.files()
    assert [sum(1 for _ in read_spool(f)) for f in files] == [10, 10]
    assert spool.stats()[0] == 3  # two complete + the open one with 5 rows
    spool.seal()
    assert [r.tag for r in read_back(spool)] == [f"t{i}" for i in range(25)]


def test_rolls_by_age_with_injected_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "backup", roll_seconds=60.0, clock=clock)
    spool.write_rows(rows(3))
    clock.advance(59.9)
    spool.maybe_roll()
    assert spool.backup.files() == []
    clock.advance(0.1)
    spool.maybe_roll()
    assert len(spool.backup.files()) == 1
    spool.maybe_roll()  # nothing open: nothing to do
    spool.write_rows(rows(2, 3))  # a new file starts its own age
    clock.advance(30)
    spool.maybe_roll()
    assert len(spool.backup.files()) == 1
    clock.advance(30)
    spool.maybe_roll()
    assert len(spool.backup.files()) == 2
    assert len(read_back(spool)) == 5


# -- size cap --------------------------------------------------------------------


def test_size_cap_raises_spool_full_and_alerts_loudly_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    spool = Spool(tmp_path / "backup", roll_rows=5, max_bytes=400, clock=clock)
    written = 0
    with caplog.at_level(logging.WARNING, logger="tagwriter.spool"):
        with pytest.raises(SpoolFullError) as info:
            for start in range(0, 1000, 5):
                written += spool.write_rows(rows(5, start))
        assert "size cap" in str(info.value) and info.value.hint
        assert spool.backup.full
        for _ in range(5):  # still full: raises again, but the alert is not repeated
            with pytest.raises(SpoolFullError):
                spool.write_rows(rows(1))
            clock.advance(2.0)
    alerts = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(alerts) == 1 and "SPOOL FULL" in alerts[0].getMessage()
    assert 0 < written < 1000
    assert spool.backup.folder_bytes() >= 400
    spool.seal()
    assert len(read_back(spool)) == written  # what was accepted before the cap is intact
    # force (shutdown) writes past the cap: nothing is lost at stop
    assert spool.write_rows(rows(3, 5000), force=True) == 3
    spool.seal()
    assert len(read_back(spool)) == written + 3


def full_spool(folder: Path, clock: ManualClock) -> Spool:
    """A spool filled up to its cap of 300 bytes, its files complete."""
    spool = Spool(folder, roll_rows=5, max_bytes=300, clock=clock)
    with pytest.raises(SpoolFullError):
        for start in range(0, 1000, 5):
            spool.write_rows(rows(5, start))
    spool.seal()
    return spool


def test_size_cap_clears_when_files_are_moved_away(tmp_path: Path) -> None:
    clock = ManualClock()
    spool = full_spool(tmp_path / "backup", clock)
    for f in spool.backup.files():  # what the alert's hint says: replay or move them
        f.rename(tmp_path / f.name)
    clock.advance(1.0)
    assert spool.write_rows(rows(2)) == 2
    assert not spool.backup.full


# -- the counts behind stats() -----------------------------------------------------


def counted_by_a_scan(folder: Path) -> tuple[int, int]:
    """(complete and partial spool files, their bytes), by a look at every file."""
    found = [p for p in folder.glob("tagwriter-*") if p.is_file()]
    return len(found), sum(p.stat().st_size for p in found)


def test_counts_follow_writes_seals_replays_deletes_and_another_process(tmp_path: Path) -> None:
    """Kept, not scanned per call: this process's changes count at once, another's after the next look."""
    clock = ManualClock()
    backup = tmp_path / "backup"
    spool = Spool(backup, roll_rows=10, clock=clock)
    assert spool.stats() == (0, 0)
    for start in range(0, 25, 5):  # two complete files, one open with 5 rows
        spool.write_rows(rows(5, start))
    assert spool.stats() == counted_by_a_scan(backup) and spool.stats()[0] == 3
    spool.seal()
    assert spool.stats() == counted_by_a_scan(backup) and spool.stats()[0] == 3
    first, second, third = spool.backup.files()
    assert replay_files([first], sink=SqliteSink(tmp_path / "tags.db"), spool=spool).ok  # moved to replayed/
    assert spool.stats() == counted_by_a_scan(backup) and spool.stats()[0] == 2
    assert replay_files([second], sink=SqliteSink(tmp_path / "tags.db"), spool=spool, delete=True).ok
    assert spool.stats() == counted_by_a_scan(backup) and spool.stats()[0] == 1
    assert spool.backup.completed() == (1, third.stat().st_size)

    quiet = time.time_ns() - 10 * 10**9
    os.utime(backup, ns=(quiet, quiet))  # the folder unchanged for a while: its mtime can be trusted
    clock.advance(LOOK_INTERVAL)
    assert spool.backup.refresh()  # counted just after changes: counts again
    clock.advance(LOOK_INTERVAL)
    assert not spool.backup.refresh()  # the same mtime: no scan
    # A `tagwriter replay` in another process, with its own Spool, moves the last file away.
    assert replay_files([third], sink=SqliteSink(tmp_path / "tags.db"), spool=Spool(backup)).ok
    assert counted_by_a_scan(backup) == (0, 0)
    assert not spool.backup.refresh() and spool.stats()[0] == 1  # no look before LOOK_INTERVAL has passed
    clock.advance(LOOK_INTERVAL)
    spool.maybe_roll()  # the writer's housekeeping looks: the mtime moved
    assert spool.stats() == (0, 0)


def test_the_cap_uses_the_counts_so_a_replay_frees_it_at_once(tmp_path: Path) -> None:
    spool = full_spool(tmp_path / "backup", ManualClock())
    with pytest.raises(SpoolFullError):  # still full; the folder was just looked at
        spool.write_rows(rows(1))
    assert spool.backup.folder_bytes() == counted_by_a_scan(tmp_path / "backup")[1] >= 300
    report = replay_files(spool.backup.files(), sink=SqliteSink(tmp_path / "tags.db"), spool=spool)
    assert report.ok
    assert spool.write_rows(rows(2)) == 2  # no clock advance, no new look: the replay told the spool
    assert not spool.backup.full
    assert spool.stats() == counted_by_a_scan(tmp_path / "backup")


# -- quarantine --------------------------------------------------------------------


def test_quarantine_keeps_each_row_with_its_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup", tmp_path / "rejected")
    bad = [(TagValue("a", TS0, 1e300, 1), "ORA-12899", "value too large"),
           (TagValue("b", TS0 + 1, None, 2), "NOT_NULL", "NULL in a NOT NULL column, \"value\"")]
    assert spool.quarantine_rows(bad, source="sqlite:x.db") == 2
    assert spool.quarantine_lines([("in.jsonl:7", "not JSON", "{oops")]) == 1
    spool.seal()
    assert spool.backup.files() == []  # quarantine is its own folder
    (qfile,) = spool.quarantine.files()
    assert qfile.parent == tmp_path / "rejected"
    with open(qfile, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == QUARANTINE_HEADER
    assert table[1][4:7] == ["ORA-12899", "value too large", "sqlite:x.db"]
    assert table[2][4:6] == ["NOT_NULL", "NULL in a NOT NULL column, \"value\""]
    assert table[3][4:] == ["BAD_LINE", "not JSON", "in.jsonl:7", "{oops"]
    items = list(read_spool(qfile, quarantine=True))
    assert [i.row for i in items if isinstance(i, SpoolLine)] == [r for r, _, _ in bad]
    (bad_line,) = [i for i in items if isinstance(i, InputError)]
    assert bad_line.location == f"{qfile}:4" and "not JSON" in bad_line.reason


def test_quarantine_entries_stay_one_line_each(tmp_path: Path) -> None:
    """Database messages span lines (PostgreSQL's DETAIL); readers resume by line, so CR/LF are escaped."""
    spool = Spool(tmp_path / "backup", tmp_path / "rejected")
    row = TagValue("a", TS0, 1.0, 192)
    spool.quarantine_rows([(row, "23514", "violates check\nDETAIL:  Failing row")])
    spool.quarantine_lines([("in.csv:3", "bad\r\nreason", "x,\ry")])
    spool.seal()
    (qfile,) = spool.quarantine.files()
    assert len(qfile.read_text(encoding="utf-8").splitlines()) == 3
    items = list(read_spool(qfile, quarantine=True))
    assert [i.row for i in items if isinstance(i, SpoolLine)] == [row]
    with open(qfile, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[1][5] == "violates check\\nDETAIL:  Failing row"
    assert table[2][5:] == ["bad\\r\\nreason", "in.csv:3", "x,\\ry"]


# -- recovery after a crash ----------------------------------------------------------


def test_recover_renames_partials_left_by_a_crash(tmp_path: Path) -> None:
    crashed = Spool(tmp_path / "backup")
    crashed.write_rows(rows(4))
    crashed.quarantine_rows([(TagValue("q", TS0, 1.0), "E1", "bad")])
    # the process dies here: no seal. A new run starts on the same folders.
    fresh = Spool(tmp_path / "backup")
    fresh.write_rows(rows(1, 100))  # the new run's own open file must not be touched
    recovered = fresh.recover()
    assert len(recovered) == 2
    assert all(p.exists() and p.suffix == ".csv" for p in recovered)
    assert len(list((tmp_path / "backup").glob("tagwriter-*.csv" + PARTIAL))) == 1  # the new run's
    assert len(fresh.backup.files()) == 1
    assert [r.tag for r in read_back(fresh)] == ["t0", "t1", "t2", "t3"]
    fresh.seal()
    assert len(read_back(fresh)) == 5
    assert len(fresh.quarantine.files()) == 1
    assert fresh.recover() == []


def test_recovered_file_with_a_truncated_last_line_reports_it(tmp_path: Path) -> None:
    folder = tmp_path / "backup"
    folder.mkdir()
    partial = folder / f"tagwriter-20240101T000000000000Z-1-0001.csv{PARTIAL}"
    partial.write_text(f"tag_name,ts,value,quality\nt0,{format_ts(TS0)},1.5,192\nt1,{format_ts(TS0)[:10]}")
    (final,) = Spool(folder).recover()
    items = list(read_spool(final))
    assert isinstance(items[0], SpoolLine) and items[0].row == TagValue("t0", TS0, 1.5, 192)
    assert isinstance(items[1], InputError)
    assert items[1].location == f"{final}:3" and "truncated" in items[1].reason


# -- reading back ------------------------------------------------------------------


def test_read_spool_reports_corrupt_lines_with_file_and_line(tmp_path: Path) -> None:
    ts = format_ts(TS0)
    path = tmp_path / "tagwriter-x.csv"
    path.write_text(
        "tag_name,ts,value,quality\n"
        f"good1,{ts},1.0,192\n"  # 2
        f"short,{ts},1.0\n"  # 3: too few columns
        "badts,yesterday,1.0,192\n"  # 4
        f"badval,{ts},abc,192\n"  # 5
        f"badq,{ts},1.0,good\n"  # 6
        f",{ts},1.0,192\n"  # 7: empty tag
        f"good2,{ts},,0\n",  # 8
        encoding="utf-8",
    )
    items = list(read_spool(path))
    assert [i.line for i in items if isinstance(i, SpoolLine)] == [2, 8]
    assert [i.row for i in items if isinstance(i, SpoolLine)] == [
        TagValue("good1", TS0, 1.0, 192), TagValue("good2", TS0, None, 0)
    ]
    errors = [i for i in items if isinstance(i, InputError)]
    assert [e.location for e in errors] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7)]
    reasons = [e.reason for e in errors]
    assert "expected 4 columns, found 3" in reasons[0]
    assert "timestamp" in reasons[1] and "value" in reasons[2] and "quality" in reasons[3]
    assert "empty tag_name" in reasons[4]
    assert errors[2].raw == f"badval,{ts},abc,192"
    assert str(errors[0]).startswith(f"{path}:3: ")


def test_read_spool_refuses_a_file_that_is_not_a_spool(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        list(read_spool(path))
    assert info.value.location == f"{path}:1"
    with pytest.raises(InputError):
        list(read_spool(path, quarantine=True))


def test_unwritable_folder_raises_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "backup"
    blocker.write_text("a file where the folder should be")
    spool = Spool(blocker)
    with pytest.raises(SpoolError) as info:
        spool.write_rows(rows(1))
    assert not isinstance(info.value, SpoolFullError)


def test_a_folder_that_cannot_be_made_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    spool = Spool(tmp_path / "afile" / "backup")
    with pytest.raises(SpoolError) as info:
        spool.write_rows([TagValue("t", 0, 1.0, 192)])
    message = str(info.value)
    assert f"cannot write to folder {tmp_path / 'afile' / 'backup'}" in message, message
    assert "None" not in message and info.value.hint

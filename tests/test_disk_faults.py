"""Overflow and disk faults: the default policy spills, a full disk holds values, checksums, unwritable folders.

The full disk is real: a 1 MB tmpfs mounted for the test (`mount -t tmpfs`,
tests run as root); read-only folders are real read-only bind mounts, since
root ignores permission bits. Without mount rights these tests are skipped.
The database is the in-memory sink with fault injection (a cut database).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from waits import wait_until

from tagwriter.cli.app import app
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.errors import SpoolError
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.replay import replay_files
from tagwriter.service import Service
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.simulate import SimulatedSource, Simulator
from tagwriter.spool import Spool, SpoolDiskFullError
from tagwriter.spoolformat import SpoolLine, read_spool

TS0 = 1_700_000_000_000_000


def values(n: int, start: int = 0) -> list[TagValue]:
    return [TagValue(f"line1.tag{i % 100:03d}", TS0 + (i // 100) * 1000, i / 7, 192) for i in range(start, start + n)]


def config_for(tmp_path: Path, *, backup: Path, quarantine: Path | None = None,
               buffer: dict[str, Any] | None = None, retry_delays: list[float] | None = None) -> Config:
    config = Config(
        buffer=BufferConfig(**(buffer or {})),
        writer=WriterConfig(batch_size=100, flush_interval=0.05, retry_delays=retry_delays or [0.01],
                            probe_interval=0.05, probe_max_interval=0.1, shutdown_timeout=5.0),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(directory=str(backup), quarantine_directory=str(quarantine or backup / "quarantine"),
                            auto_replay=False),
    )
    validate(config)
    return config


def spooled_rows(*folders: Path) -> tuple[int, int]:
    """(good rows, bad lines) in the completed spool files of `folders`."""
    good = bad = 0
    for folder in folders:
        for path in sorted(folder.glob("tagwriter-*.csv")):
            for item in read_spool(path):
                if isinstance(item, SpoolLine):
                    good += 1
                else:
                    bad += 1
    return good, bad


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB file system (tmpfs): writes past it fail with ENOSPC."""
    where = tmp_path / "tiny"
    where.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A real read-only folder (a read-only bind mount): root cannot write in it either."""
    src, where = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    where.mkdir()
    if not _mount("--bind", str(src), str(where)):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _mount("-o", "remount,bind,ro", str(where)):
            pytest.skip("cannot remount read-only here")
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# -- the default overflow policy -------------------------------------------------


def test_the_default_policy_spools_what_overflows_while_a_cut_database_is_retried(tmp_path: Path) -> None:
    """Fails on the old default (drop-oldest): 2,000 of 3,000 values dropped during the retry phase."""
    config = config_for(tmp_path, backup=tmp_path / "backup", buffer={"capacity": 1000}, retry_delays=[60.0])
    assert config.buffer.overflow_policy == "spill"
    sink = MemorySink()
    with Pipeline(config, sink=sink) as p:
        wait_until(lambda: sink.opened, "the sink to open")
        sink.go_down()
        p.submit(values(100))
        wait_until(lambda: p.snapshot().retries, "the writer to retry the first batch")
        for start in range(100, 3000, 100):  # 2,900 more into 1,000 places while the batch waits to retry
            assert p.submit(values(100, start))
        mid = p.snapshot()
        assert mid.dropped == 0 and mid.spooled >= 1900
    s = p.snapshot()
    assert s.dropped == 0 and s.spooled == 3000 == s.submitted
    assert spooled_rows(tmp_path / "backup") == (3000, 0)


# -- a full disk -----------------------------------------------------------------


def test_a_full_disk_keeps_exactly_the_counted_rows_in_the_file(tiny_disk: Path) -> None:
    """ENOSPC part-way through an append: the file is cut back, so it holds exactly what was counted."""
    spool = Spool(tiny_disk / "backup", roll_rows=10**9)
    written = 0
    with pytest.raises(SpoolDiskFullError, match="disk is full"):
        for start in range(0, 10**6, 500):
            written += spool.write_rows(values(500, start))
    assert spool.backup.disk_full
    spool.seal()
    assert written > 0 and spooled_rows(tiny_disk / "backup") == (written, 0)


def test_a_full_disk_holds_values_in_memory_and_spools_them_when_space_frees(
    tmp_path: Path, tiny_disk: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Fails on the old main: a full disk was a spool *error*, every batch after it dropped
    (77,500 of 100,000 in the issue's trial), and the torn file held rows the counters did not."""
    backup = tiny_disk / "backup"
    config = config_for(tmp_path, backup=backup, buffer={"capacity": 20_000})
    sink = MemorySink()
    sink.go_down()
    moved = tmp_path / "moved"
    moved.mkdir()
    with Pipeline(config, sink=sink) as p:
        for start in range(0, 25_000, 100):  # 14,800 spool lines fill the 1 MB disk; the rest waits in memory
            p.submit(values(100, start))
        wait_until(lambda: p.snapshot().held_spool_full, "the writer to hold a batch for the full disk")
        s = p.snapshot()
        assert s.dropped == 0 and s.spool_full
        assert not p.readiness()[0] and "full" in p.readiness()[1]
        assert "DISK FULL" in caplog.text
        # The operator moves the spool files to another disk: the held values are spooled now.
        for path in backup.glob("tagwriter-*.csv"):
            shutil.move(path, moved / path.name)
        wait_until(lambda: p.snapshot().spooled == 25_000, "the held values to be spooled")
    s = p.snapshot()
    assert s.dropped == 0 and s.spooled == s.submitted == 25_000
    assert spooled_rows(backup, moved) == (25_000, 0)


def test_with_memory_and_disk_full_only_what_fits_nowhere_is_dropped_and_the_files_match_the_counts(
    tmp_path: Path, tiny_disk: Path,
) -> None:
    backup = tiny_disk / "backup"
    config = config_for(tmp_path, backup=backup, buffer={"capacity": 5_000})
    sink = MemorySink()
    sink.go_down()
    with Pipeline(config, sink=sink) as p:
        for start in range(0, 100_000, 100):
            p.submit(values(100, start))
        wait_until(lambda: p.snapshot().held_spool_full, "the writer to hold a batch for the full disk")
        s = p.snapshot()
        assert set(s.dropped_by_reason) == {"spool_full"}  # counted: memory and disk both full
        assert s.dropped <= 100_000 - s.spooled - 5_000
    s = p.snapshot()
    assert s.submitted == s.spooled + s.dropped
    assert spooled_rows(backup) == (s.spooled, 0)  # every counted row in the files, no torn line


def test_a_torn_spool_file_replays_all_but_its_bad_tail_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    spool.write_rows(values(50))
    path = spool.backup.seal()
    assert path is not None
    path.write_bytes(path.read_bytes()[:-7])  # a crash mid-line
    report = replay_files([path], sink=SqliteSink(tmp_path / "tags.db"), spool=spool)
    f = report.files[0]
    assert (f.inserted, f.bad_lines) == (49, 1)
    assert f.problems == [f"{path}:51: truncated line (no line end)"]


def test_a_full_quarantine_disk_counts_and_reports_only_the_lines_kept(
    tmp_path: Path, tiny_disk: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Fails on the old main: all 50,000 lines were counted as kept (6,638 were, in the issue's trial)."""
    config = config_for(tmp_path, backup=tmp_path / "backup", quarantine=tiny_disk / "quarantine")
    with Pipeline(config, sink=MemorySink()) as p:
        kept = sum(p.quarantine_input([(f"in.jsonl:{n + i}", "not JSON", "x" * 40) for i in range(100)])
                   for n in range(0, 50_000, 100))
        s = p.snapshot()
    assert 0 < kept < 50_000
    assert (s.bad_input, s.bad_input_lost) == (kept, 50_000 - kept)
    assert "QUARANTINE FAILED" in caplog.text
    in_files = sum(
        1 for q in (tiny_disk / "quarantine").glob("quarantine-*.csv")
        for item in read_spool(q, quarantine=True) if not isinstance(item, SpoolLine))
    assert in_files == kept


# -- checksums -------------------------------------------------------------------


def test_no_single_byte_flip_in_a_spool_file_replays_as_a_changed_row(tmp_path: Path) -> None:
    """Fails on the old main (no checksum): some flips inserted a row under a changed tag or timestamp."""
    spool = Spool(tmp_path / "backup")
    original = values(60)
    spool.write_rows(original)
    path = spool.backup.seal()
    assert path is not None
    data = path.read_bytes()
    body = data.index(b"\n") + 1  # flips in the rows, not the header
    rng = random.Random(12)
    changed = 0
    for position in rng.sample(range(body, len(data)), 60):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        items = list(read_spool(path))
        good = [i.row for i in items if isinstance(i, SpoolLine)]
        assert set(good) <= set(original), f"a flip at byte {position} changed a row"
        changed += len(good) < len(original)
    assert changed == 60  # each flip made its line a bad line


def test_a_line_failing_its_checksum_is_quarantined_and_the_rest_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    spool.write_rows(values(10))
    path = spool.backup.seal()
    assert path is not None
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("line1.tag002", "line1.tag902")
    path.write_text("".join(lines))
    report = replay_files([path], sink=SqliteSink(tmp_path / "tags.db"), spool=spool)
    f = report.files[0]
    assert (f.inserted, f.bad_lines) == (9, 1)
    assert "checksum mismatch" in f.problems[0] and f.problems[0].startswith(f"{path}:4:")
    spool.seal()
    (q,) = spool.quarantine.files()
    assert "line1.tag902" in q.read_text()


def test_a_file_written_before_checksums_still_replays(tmp_path: Path) -> None:
    (tmp_path / "backup").mkdir()
    old = tmp_path / "backup" / "tagwriter-old.csv"
    old.write_text("tag_name,ts,value,quality\na,2024-05-01T12:00:00.000000Z,1.5,192\nb,2024-05-01T12:00:00Z,,0\n")
    report = replay_files([old], sink=SqliteSink(tmp_path / "tags.db"), spool=Spool(tmp_path / "backup"))
    assert report.ok and report.files[0].inserted == 2


# -- folders that take no files --------------------------------------------------


@pytest.mark.parametrize("which", ["backup", "quarantine", "database"])
def test_an_unwritable_folder_is_refused_at_start_before_any_value_is_taken(
    tmp_path: Path, read_only: Path, which: str,
) -> None:
    """Fails on the old main: a read-only spool was noticed only at the first outage, a read-only
    SQLite folder was taken for an outage and probed forever."""
    config = config_for(tmp_path, backup=read_only / "backup" if which == "backup" else tmp_path / "backup",
                        quarantine=read_only / "q" if which == "quarantine" else None)
    if which == "database":
        config = config.replace(database=DatabaseConfig(url=f"sqlite:///{read_only / 'tags.db'}"))
    service = Service(config, SimulatedSource(Simulator.from_config(config.source), duration=0.1))
    with pytest.raises(SpoolError) as info:
        service.start()
    assert str(read_only) in str(info.value) and "not writable" in str(info.value)
    assert "Read-only file system" in str(info.value) and info.value.hint
    assert not service.pipeline.running


def test_config_validate_names_a_read_only_spool_folder(tmp_path: Path, read_only: Path) -> None:
    (tmp_path / "tagwriter.toml").write_text(f'[backup]\ndirectory = "{read_only / "backup"}"\n')
    result = CliRunner().invoke(app, ["config", "validate", str(tmp_path / "tagwriter.toml")])
    assert result.exit_code == 1
    assert f"the backup folder {read_only / 'backup'} (to be made in {read_only}) is not writable" in result.stderr
    assert "hint:" in result.stderr

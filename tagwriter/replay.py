"""Replay spool (backup) files into the database through the live write path.

`replay_files` is what `tagwriter replay` runs; `FileReplay` (one file, batch by
batch) is also what the automatic drain (`tagwriter.recovery`) steps through.
Idempotent: the table's unique key turns a row already there into a counted
duplicate, so a file that failed midway is simply replayed again.

A file moves to `<backup dir>/replayed/` (a quarantine file replayed with
`from_quarantine`: `<quarantine dir>/replayed/`), or is deleted, only once every line
is settled: inserted, a duplicate, or quarantined (rejected by the database,
or a bad line). Its quarantine entries are written and fsynced just before
that, so a file that fails midway leaves no quarantine entries behind to be
repeated by the next replay.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from tagwriter.backoff import retry
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.errors import FatalError, InputError, SinkError, SpoolError
from tagwriter.models import TagValue
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.spool import PARTIAL, Spool
from tagwriter.spoolformat import SpoolReader, rejected_fields

log = logging.getLogger(__name__)

REPLAYED_DIR = "replayed"
MAX_PROBLEMS = 100  # bad-line messages kept per file report (all are counted and quarantined)
QUARANTINE_FLUSH = 10_000  # entries held per file before they are written early

T = TypeVar("T")
Progress = Callable[[Path, int], None]  # (file, lines just processed)


class FileStatus(StrEnum):
    REPLAYED = "replayed"  # every line settled; moved to replayed/
    DELETED = "deleted"  # every line settled; deleted (--delete)
    CHECKED = "checked"  # dry run: parsed and validated only
    FAILED = "failed"  # the database failed midway: the file stays
    REFUSED = "refused"  # not a tagwriter file, missing, or still being written: untouched
    SKIPPED = "skipped"  # not attempted (an earlier file failed, or stopped): the file stays


@dataclass(slots=True)
class FileReport:
    """What replaying one file did. `rows_read` counts good data lines."""

    path: Path
    status: FileStatus = FileStatus.SKIPPED
    rows_read: int = 0
    inserted: int = 0
    duplicates: int = 0
    quarantined: int = 0  # rejected by the database
    bad_lines: int = 0
    error: str = ""
    hint: str = ""  # what to do about `error`
    fatal: bool = False  # `error` is one retrying cannot fix (the table, the configuration)
    moved_to: Path | None = None
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS "file:line: reason"

    @property
    def complete(self) -> bool:
        return self.status in (FileStatus.REPLAYED, FileStatus.DELETED, FileStatus.CHECKED)

    @property
    def ok(self) -> bool:
        """Every line was read, and inserted or a duplicate (dry run: would be)."""
        return self.complete and not self.quarantined and not self.bad_lines


@dataclass(slots=True)
class ReplayReport:
    files: list[FileReport] = field(default_factory=list)
    dry_run: bool = False

    def total(self, name: str) -> int:
        return sum(int(getattr(f, name)) for f in self.files)

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)

    def reason(self) -> str:
        """Why the replay is not ok, in one line ('' when it is)."""
        parts: list[str] = []
        bad, rejected = self.total("bad_lines"), self.total("quarantined")
        if bad:
            parts.append(f"{bad} bad line{'s' * (bad != 1)}" + ("" if self.dry_run else " quarantined"))
        if rejected:
            parts.append(f"{rejected} row{'s' * (rejected != 1)} rejected by the database (quarantined)")
        for status in (FileStatus.REFUSED, FileStatus.FAILED, FileStatus.SKIPPED):
            n = sum(f.status is status for f in self.files)
            if n:
                parts.append(f"{n} file{'s' * (n != 1)} {status}")
                if status is FileStatus.FAILED:  # one database error stops them all: say which
                    parts[-1] += f" ({next(f.error for f in self.files if f.status is status)})"
        if not self.files:
            parts.append("no files")
        return "; ".join(parts)


# -- which files -----------------------------------------------------------


def expand(paths: Iterable[Path | str], *, from_quarantine: bool = False) -> list[Path]:
    """The files to replay: a folder stands for its completed tagwriter files
    (oldest first); repeats are dropped; other paths are kept as given."""
    prefix = "quarantine-" if from_quarantine else "tagwriter-"
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        found = (
            sorted(c for c in p.iterdir() if c.is_file() and c.name.startswith(prefix) and c.suffix == ".csv")
            if p.is_dir() else [p]
        )
        for c in found:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


# -- one file --------------------------------------------------------------


class FileReplay:
    """One file being replayed, batch by batch. One thread uses it.

    `next_batch` reads rows (bad lines are collected); the caller writes them
    and hands the result to `settle`; `finish` quarantines what was collected
    and moves (or deletes) the file; `close` without `finish` leaves it where
    it is. Raises InputError from the constructor if the file is refused.
    """

    def __init__(
        self,
        path: Path | str,
        spool: Spool | None,
        *,
        from_quarantine: bool = False,
        replayed_dir: Path | None = None,
        source: str = "",
    ) -> None:
        self.path = path = Path(path)
        self.report = FileReport(path)
        self.spool = spool  # None: dry run, nothing is written anywhere
        self.replayed_dir = replayed_dir
        self.source = source
        if path.name.endswith(PARTIAL):
            raise InputError(str(path), "still being written (a .partial file); it is replayed once complete")
        try:
            self.reader = SpoolReader(path, quarantine=from_quarantine)
        except FileNotFoundError:
            raise InputError(str(path), "no such file") from None
        except IsADirectoryError:
            raise InputError(str(path), "is a folder") from None
        except OSError as exc:
            raise InputError(str(path), f"cannot open: {exc.strerror}") from None
        self._lines: Sequence[int] = []
        self._bad: list[tuple[str, str, str]] = []
        self._rejected: list[tuple[object, ...]] = []
        self._early = 0  # quarantine entries already written (flushed early)

    @property
    def done(self) -> bool:
        return self.reader.done

    def next_batch(self, size: int) -> list[TagValue]:
        """Up to `size` more rows (maybe none while bad lines are read); [] with `done` at the end."""
        rows, lines, bad = self.reader.read(size)
        self._lines = lines
        r = self.report
        r.rows_read += len(rows)
        if bad:
            r.bad_lines += len(bad)
            room = MAX_PROBLEMS - len(r.problems)
            if room > 0:
                r.problems.extend(str(b) for b in bad[:room])
            self._bad.extend(b.keep for b in bad)
            self._flush_early()
        return rows

    def lines_processed(self) -> int:
        return self.reader.line - 1

    def settle(self, rows: Sequence[TagValue], result: WriteResult) -> None:
        """Count a committed batch; its rejected rows are held for quarantine."""
        r = self.report
        r.inserted += result.written
        r.duplicates += result.duplicates
        if result.rejected:
            r.quarantined += len(result.rejected)
            where = str(self.path)
            for e in result.rejected:
                self._rejected.append(rejected_fields(
                    rows[e.index], e.code, e.message, f"{where}:{self._lines[e.index]} {self.source}".rstrip()))
            self._flush_early()

    def finish(self, *, delete: bool = False) -> FileReport:
        """Every line is settled: quarantine what was collected, then move or delete the file."""
        self.reader.close()
        r = self.report
        if self.spool is None:
            r.status = FileStatus.CHECKED
            return r
        if self._write_quarantine():
            self.spool.quarantine.seal()  # durable before the file disappears
        if delete:
            self.path.unlink(missing_ok=True)  # missing: replayed by another process meanwhile
            self.spool.forget(self.path)
            r.status = FileStatus.DELETED
            return r
        target_dir = self.replayed_dir or self.path.parent / REPLAYED_DIR
        r.moved_to = _move(self.path, target_dir)
        if r.moved_to != self.path:
            self.spool.forget(self.path)
        r.status = FileStatus.REPLAYED
        return r

    def close(self, error: str = "") -> FileReport:
        """Stop here; the file stays for a later replay (which yields duplicates, not errors)."""
        self.reader.close()
        if not self.report.complete:
            self.report.status = FileStatus.FAILED if error else FileStatus.SKIPPED
            self.report.error = error
        return self.report

    def _flush_early(self) -> None:
        # Bounded memory for a file of mostly bad lines; the price is that a
        # failure later in this file repeats these entries on the next replay.
        if self.spool is not None and len(self._bad) + len(self._rejected) >= QUARANTINE_FLUSH:
            self._write_quarantine()

    def _write_quarantine(self) -> bool:
        assert self.spool is not None
        wrote = False
        if self._bad:
            self.spool.quarantine_lines(self._bad)
            self._early += len(self._bad)
            self._bad = []
            wrote = True
        if self._rejected:
            self.spool.quarantine.append(self._rejected)
            self._early += len(self._rejected)
            self._rejected = []
            wrote = True
        return wrote or self._early > 0


def _move(path: Path, directory: Path) -> Path:
    """Move `path` into `directory` under a name not taken yet; returns where it went."""
    if path.parent.resolve() == directory.resolve():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / path.name
    k = 1
    while target.exists():
        target = directory / f"{path.stem}.{k}{path.suffix}"
        k += 1
    try:
        shutil.move(path, target)
    except FileNotFoundError:
        return target  # moved by another process replaying it too
    return target


# -- many files ------------------------------------------------------------


class Replayer:
    """Replays files through one sink with the writer's retries. One thread uses it.

    `rate` > 0 paces the writes to that many values per second; `stop` (an
    Event) interrupts retries and pacing, leaving the current file in place.
    A replayed spool file moves to `<backup dir>/replayed/`, a replayed
    quarantine file to `<quarantine dir>/replayed/` (unless `replayed_dir`).
    """

    def __init__(
        self,
        sink: Sink | None,
        spool: Spool,
        *,
        batch_size: int = 500,
        retry_delays: Sequence[float] = (1.0, 2.0, 4.0),
        rate: float = 0.0,
        replayed_dir: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        stop: threading.Event | None = None,
    ) -> None:
        self.sink = sink
        self.spool = spool
        self.batch_size = batch_size
        self.retry_delays = list(retry_delays)
        self.rate = rate
        self.replayed_dir = replayed_dir or spool.directory / REPLAYED_DIR
        self.quarantine_replayed_dir = replayed_dir or spool.quarantine_directory / REPLAYED_DIR
        self.clock = clock
        self.stop = stop or threading.Event()
        self._opened = False
        self._paced_rows = 0
        self._paced_since: float | None = None

    def replay_file(
        self,
        path: Path | str,
        *,
        dry_run: bool = False,
        delete: bool = False,
        from_quarantine: bool = False,
        progress: Progress | None = None,
    ) -> FileReport:
        """Replay one file; never raises for a bad file or a database failure (see the report)."""
        path = Path(path)
        try:
            fr = FileReplay(
                path, None if dry_run else self.spool, from_quarantine=from_quarantine,
                replayed_dir=self.quarantine_replayed_dir if from_quarantine else self.replayed_dir,
                source=f"replay into {self.sink.describe()}" if self.sink and not dry_run else "",
            )
        except InputError as exc:
            log.debug("refused %s", exc)  # the caller reports it
            return FileReport(path, FileStatus.REFUSED, error=exc.reason, problems=[str(exc)])
        try:
            seen = 0
            while not fr.done:
                if self.stop.is_set():
                    return fr.close()
                rows = fr.next_batch(self.batch_size)
                if rows and not dry_run:
                    fr.settle(rows, self._write(rows))
                    self._pace(len(rows))
                if progress is not None:
                    now = fr.lines_processed()
                    progress(path, now - seen)
                    seen = now
            if self.stop.is_set() and not dry_run:
                return fr.close()
            return fr.finish(delete=delete)
        except SinkError as exc:
            log.warning("replay of %s stopped at line %d: %s; the file stays for a later replay",
                      path, fr.reader.line, exc)
            report = fr.close(str(exc))
            report.hint, report.fatal = exc.hint, isinstance(exc, FatalError)
            return report
        except (SpoolError, OSError) as exc:
            log.warning("replay of %s stopped: %s; the file stays for a later replay", path, exc)
            return fr.close(str(exc))
        finally:
            fr.reader.close()

    def _write(self, rows: list[TagValue]) -> WriteResult:
        assert self.sink is not None
        sink = self.sink
        if self._paced_since is None:
            self._paced_since = self.clock.monotonic()  # pacing counts from the first write
        if not self._opened:
            self._retrying(sink.open, "open the database")
            self._opened = True
        return self._retrying(lambda: sink.write_batch(rows), f"batch of {len(rows)}")

    def _retrying(self, call: Callable[[], T], what: str) -> T:
        """`call()`, retried after each of `retry_delays` on a TransientError, as live writes are."""

        def failed(exc: Exception, n: int, delay: float | None) -> None:
            if delay is not None:
                log.warning("replay: %s failed (%s); retry %d in %gs", what, exc, n, delay)

        return retry(call, self.retry_delays, clock=self.clock, stop=self.stop, on_failure=failed)

    def _pace(self, n: int) -> None:
        if self.rate <= 0:
            return
        assert self._paced_since is not None
        self._paced_rows += n
        wait = self._paced_since + self._paced_rows / self.rate - self.clock.monotonic()
        if wait > 0:
            self.clock.wait(self.stop, wait)


def replay_files(
    paths: Iterable[Path | str],
    *,
    sink: Sink | None,
    spool: Spool,
    batch_size: int = 500,
    retry_delays: Sequence[float] = (1.0, 2.0, 4.0),
    rate: float = 0.0,
    dry_run: bool = False,
    delete: bool = False,
    from_quarantine: bool = False,
    replayed_dir: Path | None = None,
    progress: Progress | None = None,
    clock: Clock = SYSTEM_CLOCK,
    stop: threading.Event | None = None,
) -> ReplayReport:
    """Replay `paths` in order into `sink` (None with `dry_run`); a report per file.

    A folder in `paths` stands for its completed tagwriter files. Once the
    database fails (retries exhausted) the remaining files are skipped, and
    stay. Bad lines and refused files never stop the others.
    """
    if sink is None and not dry_run:
        raise ValueError("a sink is needed unless dry_run")
    replayer = Replayer(
        sink, spool, batch_size=batch_size, retry_delays=retry_delays, rate=rate,
        replayed_dir=replayed_dir, clock=clock, stop=stop,
    )
    report = ReplayReport(dry_run=dry_run)
    failed = ""
    try:
        for path in expand(paths, from_quarantine=from_quarantine):
            if failed or replayer.stop.is_set():
                report.files.append(FileReport(
                    path, FileStatus.SKIPPED, error=f"not attempted: {failed or 'stopped'}"))
                continue
            fr = replayer.replay_file(
                path, dry_run=dry_run, delete=delete, from_quarantine=from_quarantine, progress=progress
            )
            report.files.append(fr)
            if fr.status is FileStatus.FAILED:
                failed = f"the database failed on {path.name}"
    finally:
        if not dry_run:
            try:
                spool.seal()
            except SpoolError as exc:
                log.error("%s", exc)
            if sink is not None:
                sink.close()
    return report


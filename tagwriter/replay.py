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

import csv
import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import TextIO, TypeVar

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.errors import FatalError, InputError, SinkError, SpoolError, TransientError
from tagwriter.models import TagValue, parse_ts
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.spool import PARTIAL, QUARANTINE_HEADER, SPOOL_HEADER, Spool, spool_fields

log = logging.getLogger(__name__)

REPLAYED_DIR = "replayed"
MAX_PROBLEMS = 100  # bad-line messages kept per file report (all are counted and quarantined)
QUARANTINE_FLUSH = 10_000  # entries held per file before they are written early
BAD_LINE = "BAD_LINE"
HEADER_PROBE_LINES = 5  # lines after a wrong header that must look like rows to replay the file
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as read with surrogateescape

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
        if not self.files:
            parts.append("no files")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not a valid row. `keep` is what goes to quarantine:
    (location, reason, raw); a quarantined bad line re-read keeps its original."""

    location: str
    reason: str
    keep: tuple[str, str, str]

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


# -- reading ---------------------------------------------------------------


class SpoolReader:
    """Reads a spool (or quarantine) file in chunks of rows and bad lines, with line numbers.

    The same verdicts as `spool.read_spool` and the same reasons, plus: a line
    that is not valid UTF-8 is bad (read_spool would replace the bytes), and a
    line the csv module cannot split is bad instead of raising. Faster: plain
    lines are split without the csv module, and a timestamp text equal to the
    previous line's (a polling group shares one) is not parsed again.
    A wrong header line is a bad line (line 1) when the next lines read as
    rows; when they do not, the file is not a tagwriter file: InputError.
    Bytes that are not UTF-8 go to quarantine as \\xNN escapes.
    """

    def __init__(self, path: Path | str, *, quarantine: bool = False) -> None:
        self.path = Path(path)
        self.quarantine = quarantine
        expected = QUARANTINE_HEADER if quarantine else SPOOL_HEADER
        self._header = expected
        self._width = len(expected)
        # surrogateescape: bytes that are not UTF-8 stay recoverable (see `visible`).
        self._file: TextIO = open(self.path, newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        self.line = 1  # last line read
        self.done = False
        self._last_ts = ""
        self._last_us = 0
        self._header_bad: BadLine | None = None  # a wrong header line, reported with the first chunk
        self.chars = 0  # characters read so far (bytes for ASCII)
        try:
            first = self._file.readline()
            header = next(csv.reader([first]), [])
            if not first.endswith("\n") and ",".join(expected).startswith(first):
                # Empty, or the header cut off: a crash before any row was written
                # (the header reaches the disk with the first rows). No rows to replay.
                header = list(expected)
            if tuple(header) != expected:
                self._wrong_header(first, expected)
        except (OSError, csv.Error) as exc:
            self._file.close()
            raise InputError(f"{self.path}:1", f"cannot read: {exc}") from None
        except InputError:
            self._file.close()
            raise
        self.chars += len(first)

    def _wrong_header(self, first: str, expected: tuple[str, ...]) -> None:
        """The first line is not the header: a bad line if the next lines are rows, else refuse the file."""
        where = self._file.tell()
        probe = [line for line in islice(self._file, HEADER_PROBE_LINES) if line.strip()]
        self._file.seek(where)
        rows = sum(self._is_record(line) for line in probe)
        shown = visible(first.rstrip("\r\n"))
        if not probe or rows * 2 < len(probe):
            kind = "quarantine" if self.quarantine else "spool"
            raise InputError(
                f"{self.path}:1",
                f"not a tagwriter {kind} file (header {shown.strip()[:80]!r}, expected {','.join(expected)!r})",
            )
        if self._is_record(first):  # no header at all: line 1 is a row like the others
            log.warning("%s:1: no header line; the first line is read as a row", self.path)
            self._file.seek(0)
            self.line = 0
            self.chars = -len(first)  # read again as data
            return
        reason = f"wrong header {shown[:80]!r}, expected {','.join(expected)!r}"
        location = f"{self.path}:1"
        self._header_bad = BadLine(location, reason, (location, reason, shown))
        self._last_ts = ""  # the probe filled the timestamp cache; harmless, but start clean

    def _is_record(self, raw: str) -> bool:
        """True if `raw` reads as a row (or, in a quarantine file, as a quarantined bad line)."""
        verdict = self._verdict(raw, 0)
        return not isinstance(verdict, BadLine) or verdict.reason.startswith("quarantined bad line")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, max_lines: int) -> tuple[list[TagValue], Sequence[int], list[BadLine]]:
        """Up to `max_lines` more lines: (rows, their line numbers, bad lines).

        Sets `done` at the end of the file.
        """
        if self._header_bad is not None:  # once: the wrong header line comes first
            header, self._header_bad = self._header_bad, None
            rows, lines, bad = self._read(max_lines)
            return rows, lines, [header, *bad]
        return self._read(max_lines)

    def _read(self, max_lines: int) -> tuple[list[TagValue], Sequence[int], list[BadLine]]:
        chunk = list(islice(self._file, max_lines))
        if len(chunk) < max_lines:
            self.done = True
        if not chunk:
            return [], [], []
        blob = "".join(chunk)
        first = self.line + 1
        self.line += len(chunk)
        self.chars += len(blob)
        # The hot path: a chunk of plain spool lines (what the spool writes) is
        # split without the csv module and without per-line checks; any line
        # it cannot take goes through `_verdict`, which gives the reason.
        if (self.quarantine or '"' in blob or "\r" in blob or blob[-1] != "\n"
                or (not blob.isascii() and _UNDECODED.search(blob))):
            return self._read_checked(chunk, first)
        rows: list[TagValue] = []
        append, new_row = rows.append, tuple.__new__
        last_ts, last_us = self._last_ts, self._last_us
        bad_at: list[int] = []
        for i, raw in enumerate(chunk):
            try:
                tag, ts, value, quality = raw[:-1].split(",")
                if ts != last_ts:
                    last_us = parse_ts(ts)
                    last_ts = ts
                if not tag:
                    raise ValueError
                append(new_row(TagValue, (tag, last_us, None if value == "" else float(value), int(quality))))
            except ValueError:
                bad_at.append(i)
        self._last_ts, self._last_us = last_ts, last_us
        if not bad_at:
            return rows, range(first, first + len(chunk)), []
        return self._read_checked(chunk, first)  # rare: redo the chunk line by line for the reasons

    def _read_checked(self, chunk: list[str], first: int) -> tuple[list[TagValue], list[int], list[BadLine]]:
        rows: list[TagValue] = []
        lines: list[int] = []
        bad: list[BadLine] = []
        for lineno, raw in enumerate(chunk, first):
            verdict = self._verdict(raw, lineno)
            if isinstance(verdict, BadLine):
                bad.append(verdict)
            else:
                rows.append(verdict)
                lines.append(lineno)
        return rows, lines, bad

    def _verdict(self, raw: str, lineno: int) -> TagValue | BadLine:
        """One line as a row, or as a bad line with its reason."""
        location = f"{self.path}:{lineno}"
        if raw[-1] != "\n":
            reason = "truncated line (no line end)"
        elif not raw.isascii() and _UNDECODED.search(raw):
            reason = "not valid UTF-8"
        else:
            reason = ""
            if '"' in raw or "\r" in raw:
                try:
                    fields = next(csv.reader([raw]), [])
                except csv.Error as exc:
                    fields, reason = [], f"not a CSV line: {exc}"
            else:
                fields = raw[:-1].split(",")
            if reason:
                pass
            elif len(fields) != self._width:
                reason = f"expected {self._width} columns, found {len(fields)}"
            elif tuple(fields) == self._header:
                reason = "repeated header line"
            elif self.quarantine and fields[4] == BAD_LINE and not fields[0]:
                return BadLine(location, f"quarantined bad line: {fields[5]}", (fields[6], fields[5], fields[7]))
            else:
                tag, ts, value, quality = fields[0], fields[1], fields[2], fields[3]
                if not tag:
                    reason = "empty tag_name"
                else:
                    try:
                        if ts != self._last_ts:
                            self._last_us = parse_ts(ts)
                            self._last_ts = ts
                    except ValueError:
                        reason = f"unparsable timestamp {ts!r}"
                    if not reason:
                        try:
                            val = None if value == "" else float(value)
                        except ValueError:
                            reason = f"unparsable value {value!r}"
                    if not reason:
                        try:
                            q = int(quality)
                        except ValueError:
                            reason = f"unparsable quality {quality!r}"
                    if not reason:
                        return TagValue(tag, self._last_us, val, q)
        return BadLine(location, reason, (location, reason, visible(raw.rstrip("\r\n"))))


def visible(text: str) -> str:
    """`text` with bytes that were not UTF-8 (read with surrogateescape) shown as \\xNN escapes."""
    if text.isascii() or not _UNDECODED.search(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def count_lines(path: Path | str) -> int:
    """Data lines in a spool file (lines after the header); 0 if unreadable."""
    n = 0
    last = b"\n"
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return 0
    if last != b"\n":
        n += 1  # a last line without its line end
    return max(0, n - 1)


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
                self._rejected.append(
                    (*spool_fields(rows[e.index]), e.code, e.message,
                     f"{where}:{self._lines[e.index]} {self.source}".rstrip(), "")
                )
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
            r.status = FileStatus.DELETED
            return r
        target_dir = self.replayed_dir or self.path.parent / REPLAYED_DIR
        r.moved_to = _move(self.path, target_dir)
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
            return fr.close(str(exc))
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
        attempt = 0
        while True:
            try:
                return call()
            except FatalError:
                raise
            except TransientError as exc:
                if attempt >= len(self.retry_delays) or self.stop.is_set():
                    raise
                delay = self.retry_delays[attempt]
                log.warning("replay: %s failed (%s); retry %d in %gs", what, exc, attempt + 1, delay)
                if self.clock.wait(self.stop, delay):
                    raise
                attempt += 1

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


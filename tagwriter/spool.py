"""CSV backup (spool) and quarantine files: rolling, atomic completion, recovery, the size cap.

Both are appended through `RollingCsv`: rows go to `NAME.csv.partial`, which
is written (one `os.write` per append, no user-space buffer) after every append
and, when it rolls (row count, age, or `seal()`), fsynced and renamed to
`NAME.csv`, so a reader never sees half a file. An append that fails part-way
(ENOSPC) is cut off again (`ftruncate`), so a file holds exactly the rows
counted as in it. A full disk raises `SpoolDiskFullError`, which callers treat
as a full spool (the writer holds the batch in memory and tries again).
A `.partial` left by a crash is recovered (renamed) at start-up; its last
line may be truncated, which the reader reports as a bad line. The lines
themselves (headers, fields, the reader) are `tagwriter.spoolformat`'s.
`check_writable` proves a folder takes files (create, fsync, remove), for start-up.

File and byte counts are kept as files are written and leave (`forget`), so
`stats()` costs the same whatever the folder holds; `refresh()` (the writer's
housekeeping) recounts when something else changed the folder, such as a
`tagwriter replay` in another process.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.errors import SpoolError, SpoolFullError
from tagwriter.models import TagValue, format_ts
from tagwriter.spoolformat import (
    CHECKED_HEADER,
    QUARANTINE_HEADER,
    bad_line_fields,
    line_writer,
    rejected_fields,
    spool_lines,
)

log = logging.getLogger(__name__)

PARTIAL = ".partial"
LOOK_INTERVAL = 5.0  # seconds between looks at the folder's mtime for changes made by others
FULL_LOOK_INTERVAL = 1.0  # the same while the cap is reached: files moved away free it soon
RACY_NS = 2_000_000_000  # a folder changed this recently may change again within its mtime's tick
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # no room: wait for some, as for the size cap
PROBE_NAME = ".tagwriter-write-probe"


class SpoolDiskFullError(SpoolFullError):
    """The disk (or quota) of a spool or quarantine folder is full: nothing of the append was kept."""


def check_writable(directory: Path | str, what: str, key: str) -> None:
    """Prove that files can be made in `directory` (or, while it is missing, in the nearest folder above,
    where it would be made): create, write, fsync and remove a probe file. Makes no folder.

    A real write, not permission bits: root ignores those, a read-only mount or
    an immutable folder does not. Raises SpoolError naming the folder, the
    setting `key` and a hint.
    """
    directory = Path(directory)
    hint = f"make it writable by this user (not a read-only mount), or set {key} to a folder that is"
    there = next((p for p in (directory, *directory.absolute().parents) if p.exists()), Path("/"))
    if not there.is_dir():
        raise SpoolError(f"the {what} folder {directory} cannot be made: {there} is a file", hint=f"check {key}")
    probe = there / f"{PROBE_NAME}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in DISK_FULL:  # writable, only full now: the writer holds values and tries again
            log.error("DISK FULL: the %s folder %s has no room now (%s)", what, directory, exc.strerror)
            return
        shown = directory if there == directory else f"{directory} (to be made in {there})"
        raise SpoolError(f"the {what} folder {shown} is not writable: {exc.strerror or exc}", hint=hint) from None


@dataclass(slots=True)
class _Census:
    """What one scan of a folder found: files by name with their bytes, and the mtime before it."""

    mtime: int | None
    completed: dict[str, int] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)  # partial files: bytes


def _mtime(directory: Path) -> int | None:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return None


def _census(directory: Path, prefix: str) -> _Census:
    """Scan `directory` for `prefix-*` files (no lock: the caller reconciles)."""
    mtime = _mtime(directory)  # before the scan: a change during it shows as a new mtime...
    if mtime is not None and time.time_ns() - mtime < RACY_NS:
        # ...unless it falls in the same tick of the file system's coarse clock (git's "racy
        # clean" case): then the mtime proves nothing, and the next look counts again.
        # The real wall clock on purpose: it is the one the file system stamps with.
        mtime = -1
    census = _Census(mtime)
    try:
        entries = os.scandir(directory)
    except OSError:  # no folder yet, or not a folder
        return census
    with entries:
        for entry in entries:
            name = entry.name
            if not name.startswith(prefix + "-"):
                continue
            try:
                if not entry.is_file():
                    continue
                size = entry.stat().st_size
            except FileNotFoundError:  # moved meanwhile (the drain finished it, a replay, a roll)
                continue
            (census.completed if name.endswith(".csv") else census.others)[name] = size
    return census


class RollingCsv:
    """Appends rows to a `.partial` CSV that rolls into a complete file.

    Thread-safe. Rolls after `roll_rows` rows or `roll_seconds` since the file
    was opened; `max_bytes` caps the folder (0 = no cap) unless `force=True`.
    The folder's file and byte counts are kept as it changes (see `stats`).
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        header: Sequence[str],
        *,
        roll_rows: int = 100_000,
        roll_seconds: float = 60.0,
        max_bytes: int = 0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.header = tuple(header)
        self.roll_rows = roll_rows
        self.roll_seconds = roll_seconds
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.RLock()
        self._file: int | None = None  # the open .partial's descriptor
        self._path: Path | None = None
        self._rows_in_file = 0
        self._header_pending = False
        self._unsynced = False  # rows written since the last fsync
        self._opened_at = 0.0
        self._seq = 0
        self.full = False
        self.disk_full = False  # the last append met ENOSPC/EDQUOT; cleared by the next one that lands
        self.files_written = 0
        # The counts, under _lock; taken by one scan on first need, then kept as files come and go.
        self._counted = False
        self._completed: dict[str, int] = {}  # completed files by name: bytes
        self._completed_bytes = 0
        self._other_bytes = 0  # partial files of other (crashed) runs
        self._open_bytes = 0  # the file being written
        self._changes = 0  # bumped by every change this object makes to the folder
        self._census_mtime: int | None = None  # the folder's mtime when it was last counted
        self._look_at = float("-inf")  # when `refresh` may look at the folder again

    # -- writing -----------------------------------------------------------

    def append(self, rows: Iterable[Sequence[object]], *, force: bool = False) -> int:
        """Append rows (already as fields, written as the csv module does); returns how many were written.

        Raises as `append_lines` does.
        """
        out = io.StringIO()
        writer = line_writer(out)
        count = 0
        for count, fields in enumerate(rows, 1):  # noqa: B007
            writer.writerow(fields)
        return self.append_lines(out.getvalue(), count, force=force)

    def append_lines(self, text: str, count: int, *, force: bool = False) -> int:
        """Append `count` complete lines (`text`); all or nothing. Returns `count`.

        Raises SpoolFullError when the cap is reached (unless `force`),
        SpoolDiskFullError when the disk is full (even with `force`), and
        SpoolError when the write fails otherwise or `text` cannot be encoded.
        """
        if not count:
            return 0
        if self.full or self.disk_full:
            self.refresh()  # files may have been replayed or moved away since (the alert's hint)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SpoolError(f"cannot write to {self.directory}: {exc}",
                             hint="a value the spool cannot encode; see the log") from None
        with self._lock:
            if not force and self._over_cap():
                raise SpoolFullError(
                    f"{self.directory} reached its size cap of {self.max_bytes} bytes",
                    hint="replay or move backup files, or raise backup.max_bytes",
                )
            try:
                if self._file is None:
                    self._open()
                assert self._file is not None
                if self._header_pending:
                    data = (",".join(self.header) + "\n").encode("utf-8") + data
                self._write_all(data)
                self._header_pending = False
                self._unsynced = True
            except OSError as exc:
                raise self._failed(exc) from exc
            if self.disk_full:
                self.disk_full = False
                log.warning("%s takes files again: the disk has room", self.directory)
            self._rows_in_file += count
            if self._rows_in_file >= self.roll_rows:
                self._seal()
            return count

    def _write_all(self, data: bytes) -> None:
        """Write `data` at the end of the open file; on failure cut the file back to where it was."""
        assert self._file is not None
        fd, start, done = self._file, self._open_bytes, 0
        view = memoryview(data)
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError:
            if done:
                try:  # shrinking needs no room: the file then holds exactly the rows counted
                    os.ftruncate(fd, start)
                    os.lseek(fd, start, os.SEEK_SET)
                except OSError:
                    # Cannot cut it back: end this file here; its torn last line is a bad line at replay.
                    landed = data[:done].count(b"\n")
                    log.error("%s keeps %d lines of a failed write (replay counts them as duplicates) "
                              "and a torn last line", self._path, landed)
                    self._open_bytes = start + done
                    self._close_torn()
            raise
        self._open_bytes = start + done

    def _failed(self, exc: OSError) -> SpoolError:
        """The error for a failed append, naming the file (or, before there is one, the folder)."""
        where = self._path if self._file is not None else f"to folder {self.directory}"
        if exc.errno in DISK_FULL:
            if not self.disk_full:
                log.error("DISK FULL: cannot write %s (%s); values stay in memory and the write is "
                          "tried again as space frees; free space on that disk", where, exc.strerror)
            self.disk_full = True
            if self._file is not None and self._rows_in_file:
                self._close_torn()  # complete what it holds, so it can be moved away or replayed
            return SpoolDiskFullError(f"cannot write {where}: the disk is full ({exc.strerror})",
                                      hint="free space on that disk, or move backup files elsewhere")
        return SpoolError(f"cannot write {where}: {exc}", hint="check backup.directory and its disk")

    def _close_torn(self) -> None:
        """Seal the open file as it is (a full disk, or a write that could not be cut back)."""
        try:
            self._seal()
        except SpoolError as exc:
            log.error("%s", exc)

    def sync(self) -> None:
        """fsync the open file if rows were added since the last sync (a disk queue releases them after)."""
        with self._lock:
            if self._file is None or not self._unsynced:
                return
            try:
                os.fsync(self._file)
            except OSError as exc:
                raise self._failed(exc) from exc
            self._unsynced = False

    def maybe_roll(self) -> None:
        """Seal the current file if it is older than `roll_seconds`; then `refresh`."""
        with self._lock:
            if self._file is not None and (
                self._clock.monotonic() - self._opened_at >= self.roll_seconds
            ):
                self._seal()
        self.refresh()

    def seal(self) -> Path | None:
        """Complete the current file (fsync, rename); returns its final path."""
        with self._lock:
            return self._seal()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count()
        stamp = format_ts(round(self._clock.time() * 1_000_000))
        stamp = stamp.replace("-", "").replace(":", "").replace(".", "")
        while True:
            # An earlier run may have used this name (same pid, a coarse or stepped-back
            # wall clock): never reuse it, or sealing would replace that run's file.
            self._seq += 1
            name = f"{self.prefix}-{stamp}-{os.getpid()}-{self._seq:04d}.csv"
            self._path = self.directory / name
            if self._path.exists():
                continue
            try:
                # Held open across appends until the file rolls; _seal() closes it.
                fd = os.open(self._path.with_name(name + PARTIAL), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            break
        self._file = fd
        self._changes += 1
        self._open_bytes = 0
        self._rows_in_file = 0
        self._opened_at = self._clock.monotonic()
        self._header_pending = True  # written with the first rows: a failed first write leaves no header alone

    def _seal(self) -> Path | None:
        if self._file is None or self._path is None:
            return None
        path, fd = self._path, self._file
        try:
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.replace(path.with_name(path.name + PARTIAL), path)
            _fsync_dir(self.directory)
        except OSError as exc:
            self._counted = False  # the file may be complete, partial or gone: count the folder again
            raise SpoolError(f"cannot complete {path}: {exc}") from exc
        finally:
            self._file = None
            self._open_bytes = 0
            self._changes += 1
        self.files_written += 1
        self._add(path.name, size)
        return path

    def _over_cap(self) -> bool:
        if self.max_bytes <= 0:
            return False
        self._count()
        size = self._bytes()
        over = size >= self.max_bytes
        if over and not self.full:
            log.error(
                "SPOOL FULL: %s holds %d bytes, cap is %d; new data stays in memory "
                "and the buffer's overflow policy applies",
                self.directory, size, self.max_bytes,
            )
        self.full = over
        return over

    # -- the counts ----------------------------------------------------------

    def stats(self) -> tuple[int, int]:
        """(completed file count plus the open one, bytes in completed and partial files), from the counts."""
        with self._lock:
            self._count()
            return len(self._completed) + (self._file is not None), self._bytes()

    def folder_bytes(self) -> int:
        """Bytes in completed and partial files of this folder, from the counts."""
        return self.stats()[1]

    def completed(self, excluding: Collection[Path] = ()) -> tuple[int, int]:
        """(count, bytes) of the completed files, from the counts, leaving out `excluding` (files of this folder)."""
        with self._lock:
            self._count()
            n, size = len(self._completed), self._completed_bytes
            for p in excluding:
                s = self._completed.get(p.name)
                if s is not None:
                    n, size = n - 1, size - s
            return n, size

    def forget(self, path: Path | str) -> None:
        """`path` left the folder (replayed: moved or deleted); stop counting it. Any thread."""
        path = Path(path)
        if path.parent.resolve() != self.directory.resolve():
            return
        with self._lock:
            size = self._completed.pop(path.name, None)
            if size is not None:
                self._completed_bytes -= size
                self._changes += 1

    def refresh(self) -> bool:
        """Recount if the folder changed since it was counted (its mtime moved).

        Looks at most every LOOK_INTERVAL seconds (FULL_LOOK_INTERVAL while the
        cap is reached); scans outside the lock. Returns True if it recounted.
        """
        now = self._clock.monotonic()
        with self._lock:
            if not self._counted or now < self._look_at:
                return False
            self._look_at = now + (FULL_LOOK_INTERVAL if self.full else LOOK_INTERVAL)
            seen, changes = self._census_mtime, self._changes
        if _mtime(self.directory) == seen:
            return False
        census = _census(self.directory, self.prefix)
        with self._lock:
            if changes != self._changes:  # this object changed the folder during the scan: next time
                self._look_at = now
                return False
            self._adopt(census)
        return True

    def _count(self) -> None:
        """Take the counts by one scan, the first time they are needed (under the lock)."""
        if not self._counted:
            self._adopt(_census(self.directory, self.prefix))

    def _adopt(self, census: _Census) -> None:
        if self._file is not None and self._path is not None:
            census.others.pop(self._path.name + PARTIAL, None)  # ours: counted as we write it
        self._completed = census.completed
        self._completed_bytes = sum(census.completed.values())
        self._other_bytes = sum(census.others.values())
        self._census_mtime = census.mtime
        self._counted = True

    def _add(self, name: str, size: int) -> None:
        if self._counted:
            self._completed_bytes += size - self._completed.get(name, 0)
            self._completed[name] = size

    def _bytes(self) -> int:
        return self._completed_bytes + self._other_bytes + self._open_bytes

    # -- the folder ----------------------------------------------------------

    def files(self) -> list[Path]:
        """Completed files in this folder, oldest first (names sort by time). Lists the folder."""
        try:
            with os.scandir(self.directory) as entries:
                names = [e.name for e in entries
                         if e.name.startswith(self.prefix + "-") and e.name.endswith(".csv") and e.is_file()]
        except OSError:  # no folder (yet)
            return []
        return [self.directory / name for name in sorted(names)]

    def recover(self) -> list[Path]:
        """Rename `.partial` files left by a crashed process so they get replayed."""
        recovered: list[Path] = []
        if not self.directory.is_dir():
            return recovered
        with self._lock:
            current = self._path.name + PARTIAL if self._file is not None and self._path else None
            for p in sorted(self.directory.glob(f"{self.prefix}-*.csv{PARTIAL}")):
                if p.name == current:
                    continue
                final = p.with_name(p.name[: -len(PARTIAL)])
                os.replace(p, final)
                recovered.append(final)
                log.warning("recovered %s left by an earlier run", final)
            if recovered or not self._counted:
                self._changes += 1
                self._adopt(_census(self.directory, self.prefix))
        return recovered


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """The backup folder and the quarantine folder of one pipeline. Thread-safe."""

    def __init__(
        self,
        directory: Path | str = "backup",
        quarantine_directory: Path | str | None = None,
        *,
        roll_rows: int = 100_000,
        roll_seconds: float = 60.0,
        max_bytes: int = 0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        directory = Path(directory)
        qdir = Path(quarantine_directory) if quarantine_directory else directory / "quarantine"
        self.backup = RollingCsv(
            directory, "tagwriter", CHECKED_HEADER,
            roll_rows=roll_rows, roll_seconds=roll_seconds, max_bytes=max_bytes, clock=clock,
        )
        self.quarantine = RollingCsv(
            qdir, "quarantine", QUARANTINE_HEADER,
            roll_rows=roll_rows, roll_seconds=roll_seconds, clock=clock,
        )

    @property
    def directory(self) -> Path:
        return self.backup.directory

    @property
    def quarantine_directory(self) -> Path:
        return self.quarantine.directory

    def write_rows(self, rows: Sequence[TagValue], *, force: bool = False) -> int:
        """Spool rows for a later replay; returns the count written."""
        if not rows:
            return 0
        return self.backup.append_lines(spool_lines(rows), len(rows), force=force)

    def quarantine_rows(self, rejected: Iterable[tuple[TagValue, str, str]], source: str = "") -> int:
        """Keep rows the database rejected, each with its error code and message."""
        return self.quarantine.append(rejected_fields(row, code, message, source) for row, code, message in rejected)

    def quarantine_lines(self, bad: Iterable[tuple[str, str, str]]) -> int:
        """Keep malformed input lines: `(location, reason, raw line)`."""
        return self.quarantine.append(bad_line_fields(location, reason, raw) for location, reason, raw in bad)

    def maybe_roll(self) -> None:
        """Seal files older than `roll_seconds`; recount a folder something else changed (see `refresh`)."""
        self.backup.maybe_roll()
        self.quarantine.maybe_roll()

    def sync(self) -> None:
        """Make every row spooled or quarantined so far survive a power cut (without sealing the files)."""
        self.backup.sync()
        self.quarantine.sync()

    def seal(self) -> None:
        """Complete the open backup and quarantine files."""
        self.backup.seal()
        self.quarantine.seal()

    def stats(self) -> tuple[int, int]:
        """(backup file count, backup bytes), the open file included; from the counts, not a scan."""
        return self.backup.stats()

    def forget(self, path: Path | str) -> None:
        """A backup or quarantine file left its folder (replayed: moved or deleted)."""
        self.backup.forget(path)
        self.quarantine.forget(path)

    def recover(self) -> list[Path]:
        return self.backup.recover() + self.quarantine.recover()


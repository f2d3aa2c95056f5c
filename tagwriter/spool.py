"""CSV backup (spool) and quarantine files.

Both are appended through `RollingCsv`: rows go to `NAME.csv.partial`, which
is flushed after every write and, when it rolls (row count, age, or `seal()`),
fsynced and renamed to `NAME.csv`, so a reader never sees half a file.
A `.partial` left by a crash is recovered (renamed) at start-up; its last
line may be truncated, which the reader reports as a bad line.

Spool format: header `tag_name,ts,value,quality`; `ts` is ISO-8601 UTC with
six fractional digits; `value` is Python's `repr` of the float (exact
round-trip, `nan`, `inf`, `-inf`) or empty for None.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.errors import InputError, SpoolError, SpoolFullError
from tagwriter.models import TagValue, format_ts, parse_ts

log = logging.getLogger(__name__)

SPOOL_HEADER = ("tag_name", "ts", "value", "quality")
QUARANTINE_HEADER = (*SPOOL_HEADER, "error_code", "error_message", "source", "raw")
PARTIAL = ".partial"


def _fmt_value(value: float | None) -> str:
    return "" if value is None else repr(value)


def spool_fields(row: TagValue) -> tuple[str, str, str, int]:
    """A row as the four text fields of a spool line."""
    return (row.tag, format_ts(row.ts_us), _fmt_value(row.value), row.quality)


class RollingCsv:
    """Appends rows to a `.partial` CSV that rolls into a complete file.

    Thread-safe. Rolls after `roll_rows` rows or `roll_seconds` since the file
    was opened; `max_bytes` caps the folder (0 = no cap) unless `force=True`.
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
        self._file: TextIO | None = None
        self._writer: csv._writer | None = None  # type: ignore[name-defined]
        self._path: Path | None = None
        self._rows_in_file = 0
        self._opened_at = 0.0
        self._seq = 0
        self._bytes = -1  # folder size, scanned lazily
        self._rescan_at = float("-inf")  # when a full folder may be scanned again
        self.full = False
        self.files_written = 0

    # -- writing -----------------------------------------------------------

    def append(self, rows: Iterable[Sequence[object]], *, force: bool = False) -> int:
        """Append rows (already as fields); returns how many were written.

        Raises SpoolFullError when the cap is reached (unless `force`), and
        SpoolError when the disk write fails.
        """
        with self._lock:
            if not force and self._over_cap():
                raise SpoolFullError(
                    f"{self.directory} reached its size cap of {self.max_bytes} bytes",
                    hint="replay or move backup files, or raise backup.max_bytes",
                )
            try:
                if self._file is None:
                    self._open()
                assert self._file is not None and self._writer is not None
                before = self._file.tell()
                count = 0
                for count, fields in enumerate(rows, 1):  # noqa: B007
                    self._writer.writerow(fields)
                self._file.flush()
                self._rows_in_file += count
                self._bytes += self._file.tell() - before
            except OSError as exc:
                # No file yet when the folder itself cannot be made: name the folder.
                where = self._path if self._file is not None else f"to folder {self.directory}"
                raise SpoolError(f"cannot write {where}: {exc}",
                                 hint="check backup.directory and its disk") from exc
            if self._rows_in_file >= self.roll_rows:
                self._seal()
            return count

    def maybe_roll(self) -> None:
        """Seal the current file if it is older than `roll_seconds`."""
        with self._lock:
            if self._file is not None and (
                self._clock.monotonic() - self._opened_at >= self.roll_seconds
            ):
                self._seal()

    def seal(self) -> Path | None:
        """Complete the current file (fsync, rename); returns its final path."""
        with self._lock:
            return self._seal()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._bytes < 0:
            self._bytes = self.folder_bytes()
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
                self._file = open(self._path.with_name(name + PARTIAL), "x", newline="", encoding="utf-8")  # noqa: SIM115
            except FileExistsError:
                continue
            break
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(self.header)
        self._rows_in_file = 0
        self._opened_at = self._clock.monotonic()

    def _seal(self) -> Path | None:
        if self._file is None or self._path is None:
            return None
        path = self._path
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(path.with_name(path.name + PARTIAL), path)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise SpoolError(f"cannot complete {path}: {exc}") from exc
        finally:
            self._file = None
            self._writer = None
        self.files_written += 1
        self._bytes = self.folder_bytes()
        return path

    def _over_cap(self) -> bool:
        if self.max_bytes <= 0:
            return False
        if self._bytes < 0:
            self._bytes = self.folder_bytes()
        over = self._bytes >= self.max_bytes
        if over and self._clock.monotonic() >= self._rescan_at:
            # Files may have been replayed or moved away since (the alert's hint): look again,
            # at most once a second so a full spool does not scan the folder on every append.
            self._rescan_at = self._clock.monotonic() + 1.0
            self._bytes = self.folder_bytes()
            over = self._bytes >= self.max_bytes
        if over and not self.full:
            log.error(
                "SPOOL FULL: %s holds %d bytes, cap is %d; new data stays in memory "
                "and the buffer's overflow policy applies",
                self.directory, self._bytes, self.max_bytes,
            )
        self.full = over
        return over

    # -- reading the folder ------------------------------------------------

    def files(self) -> list[Path]:
        """Completed files in this folder, oldest first (names sort by time)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p for p in self.directory.iterdir()
            if p.is_file() and p.name.startswith(self.prefix + "-") and p.suffix == ".csv"
        )

    def folder_bytes(self) -> int:
        """Bytes in completed and partial files of this folder."""
        if not self.directory.is_dir():
            return 0
        total = 0
        for entry in os.scandir(self.directory):
            if entry.is_file() and entry.name.startswith(self.prefix + "-"):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:  # moved meanwhile (the drain finished it, a replay, a roll)
                    continue
        return total

    def stats(self) -> tuple[int, int]:
        """(file count including the open one, bytes)."""
        with self._lock:
            return len(self.files()) + (self._file is not None), self.folder_bytes()

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
            directory, "tagwriter", SPOOL_HEADER,
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
        return self.backup.append(map(spool_fields, rows), force=force)

    def quarantine_rows(self, rejected: Iterable[tuple[TagValue, str, str]], source: str = "") -> int:
        """Keep rows the database rejected, each with its error code and message."""
        return self.quarantine.append(
            (*spool_fields(row), code, one_line(message), source, "") for row, code, message in rejected
        )

    def quarantine_lines(self, bad: Iterable[tuple[str, str, str]]) -> int:
        """Keep malformed input lines: `(location, reason, raw line)`."""
        return self.quarantine.append(
            ("", "", "", "", "BAD_LINE", one_line(reason), one_line(location), one_line(raw))
            for location, reason, raw in bad
        )

    def maybe_roll(self) -> None:
        self.backup.maybe_roll()
        self.quarantine.maybe_roll()

    def seal(self) -> None:
        """Complete the open backup and quarantine files."""
        self.backup.seal()
        self.quarantine.seal()

    def stats(self) -> tuple[int, int]:
        """(backup file count, backup bytes), the open file included."""
        return self.backup.stats()

    def recover(self) -> list[Path]:
        return self.backup.recover() + self.quarantine.recover()


# -- reading spool files back --------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolLine:
    """One data line of a spool file: its 1-based line number and row."""

    line: int
    row: TagValue


def parse_row(fields: Sequence[str]) -> TagValue:
    """Fields of a spool line as a row; raises ValueError with the reason."""
    tag, ts, value, quality = fields[0], fields[1], fields[2], fields[3]
    if not tag:
        raise ValueError("empty tag_name")
    try:
        ts_us = parse_ts(ts)
    except ValueError:
        raise ValueError(f"unparsable timestamp {ts!r}") from None
    try:
        val = None if value == "" else float(value)
    except ValueError:
        raise ValueError(f"unparsable value {value!r}") from None
    try:
        q = int(quality)
    except ValueError:
        raise ValueError(f"unparsable quality {quality!r}") from None
    return TagValue(tag, ts_us, val, q)


def one_line(text: str) -> str:
    """`text` with CR and LF shown as \\r and \\n: a quarantine entry stays one line (readers resume by line)."""
    return text.replace("\r", "\\r").replace("\n", "\\n") if ("\n" in text or "\r" in text) else text


def read_spool(path: Path | str, *, quarantine: bool = False) -> Iterator[SpoolLine | InputError]:
    """Stream a spool (or, with `quarantine=True`, a quarantine) file.

    Yields a `SpoolLine` per good line and an `InputError` (file:line: reason,
    `raw` attached) per bad one. Raises InputError if the header shows the
    file is not a tagwriter file at all.
    """
    path = Path(path)
    expected = QUARANTINE_HEADER if quarantine else SPOOL_HEADER
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
        header = next(csv.reader([first]), [])
        if tuple(header) != expected:
            kind = "quarantine" if quarantine else "spool"
            raise InputError(
                f"{path}:1",
                f"not a tagwriter {kind} file (header {first.strip()[:80]!r}, "
                f"expected {','.join(expected)!r})",
            )
        width = len(expected)
        for lineno, raw in enumerate(f, 2):
            if not raw.endswith("\n"):
                yield _bad(path, lineno, "truncated line (no line end)", raw)
                continue
            fields = next(csv.reader([raw]), [])
            if len(fields) != width:
                yield _bad(path, lineno, f"expected {width} columns, found {len(fields)}", raw)
                continue
            if quarantine and fields[4] == "BAD_LINE" and not fields[0]:
                yield _bad(path, lineno, f"quarantined bad line: {fields[5]}", raw)
                continue
            try:
                yield SpoolLine(lineno, parse_row(fields))
            except ValueError as exc:
                yield _bad(path, lineno, str(exc), raw)


def _bad(path: Path, lineno: int, reason: str, raw: str) -> InputError:
    return InputError(f"{path}:{lineno}", reason, raw.rstrip("\n"))

"""The spool line format: headers, fields, escaping, and the one reader with its bad-line verdicts.

Spool file: header `tag_name,ts,value,quality,crc32`, then a row per line; `ts` is
ISO-8601 UTC with six fractional digits; `value` is Python's `repr` of the
float (exact round-trip, `nan`, `inf`, `-inf`) or empty for None; `crc32` is
the CRC-32 of the line's UTF-8 text before its last comma, as eight lowercase
hex digits, so a line changed on disk is a bad line, not a wrong row. Files
written before checksums (header `tag_name,ts,value,quality`) still read,
unchecked. Quarantine
file: the same four fields, then `error_code,error_message,source,raw`; a
malformed input line is kept as `BAD_LINE` with empty row fields. Lines end in
LF; fields are quoted as the csv module does; CR and LF inside a quarantine
text are escaped (`one_line`), so every entry is one line and readers resume
by line number.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tagwriter.errors import InputError
from tagwriter.models import TagValue, format_ts, parse_ts

if TYPE_CHECKING:
    from _csv import Writer

log = logging.getLogger(__name__)

SPOOL_HEADER = ("tag_name", "ts", "value", "quality")  # the row's fields; the header before checksums
CHECKED_HEADER = (*SPOOL_HEADER, "crc32")  # what the spool writes
CRC_TAIL = 10  # ",xxxxxxxx\n": the checksum field and the line end
QUARANTINE_HEADER = (*SPOOL_HEADER, "error_code", "error_message", "source", "raw")
BAD_LINE = "BAD_LINE"  # the error_code of a quarantined malformed line
HEADER_PROBE_LINES = 5  # lines after a wrong header that must look like rows to read the file
READ_SPOOL_CHUNK = 4096  # lines per read in `read_spool`
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as read with surrogateescape
#: Characters a field may hold when read back: a quarantined input line of 1 MiB (sources/files.py
#: MAX_LINE_BYTES) is up to 4 characters a byte as \xNN escapes; the csv module's default is 128 KiB.
FIELD_LIMIT = 8 * 1024 * 1024
csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))  # process-wide; only ever raised


# -- writing ---------------------------------------------------------------


def line_writer(file: TextIO) -> Writer:
    """A csv writer that writes lines as this format does (quoted as needed, LF line ends)."""
    return csv.writer(file, lineterminator="\n")


def spool_lines(rows: Iterable[TagValue]) -> str:
    """Rows as checksummed spool lines (CHECKED_HEADER), quoted as the csv module quotes them."""
    crc32 = zlib.crc32
    out = []
    for tag, ts_us, value, quality in rows:
        if "," in tag or '"' in tag or "\r" in tag or "\n" in tag:
            tag = '"' + tag.replace('"', '""') + '"'
        body = f"{tag},{format_ts(ts_us)},{'' if value is None else repr(value)},{quality}"
        out.append(f"{body},{crc32(body.encode('utf-8')):08x}\n")
    return "".join(out)


def spool_fields(row: TagValue) -> tuple[str, str, str, int]:
    """A row as the four fields of a spool line."""
    return (row.tag, format_ts(row.ts_us), "" if row.value is None else repr(row.value), row.quality)


def rejected_fields(row: TagValue, code: str, message: str, source: str) -> tuple[object, ...]:
    """A quarantine line for a row the database rejected with `code` and `message`."""
    return (*spool_fields(row), code, one_line(message), one_line(source), "")


def bad_line_fields(location: str, reason: str, raw: str) -> tuple[str, ...]:
    """A quarantine line for a malformed input line found at `location`."""
    return ("", "", "", "", BAD_LINE, one_line(reason), one_line(location), one_line(raw))


def one_line(text: str) -> str:
    """`text` with CR and LF shown as \\r and \\n: a quarantine entry stays one line (readers resume by line)."""
    return text.replace("\r", "\\r").replace("\n", "\\n") if ("\n" in text or "\r" in text) else text


def visible(text: str) -> str:
    """`text` with bytes that were not UTF-8 (read with surrogateescape) shown as \\xNN escapes."""
    if text.isascii() or not _UNDECODED.search(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- reading ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not a valid row: where, why, and the line as read (`visible`).

    `original` is set for a quarantined bad line read again: the (location,
    reason, raw) it was first quarantined with, which is what it keeps.
    """

    location: str
    line: int
    reason: str
    raw: str
    original: tuple[str, str, str] | None = None

    @property
    def keep(self) -> tuple[str, str, str]:
        """What goes to quarantine: (location, reason, raw)."""
        return self.original or (self.location, self.reason, self.raw)

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


class SpoolReader:
    """Reads a spool (or quarantine) file in chunks of rows and bad lines, with line numbers.

    A bad line has its reason: truncated (no line end), not valid UTF-8, not a
    CSV line, wrong column count, repeated header, empty tag, unparsable
    timestamp, value or quality, checksum mismatch (a checksummed file: each
    line's `crc32` is verified). Plain lines are split without the csv module,
    and a timestamp text equal to the previous line's (a polling group shares
    one) is not parsed again. A wrong header line is a bad line (line 1) when
    the next lines read as rows; when they do not, the file is not a tagwriter
    file: InputError. Bytes that are not UTF-8 go to quarantine as \\xNN escapes.
    """

    def __init__(self, path: Path | str, *, quarantine: bool = False) -> None:
        self.path = Path(path)
        self.quarantine = quarantine
        expected = QUARANTINE_HEADER if quarantine else CHECKED_HEADER
        self._set_format(expected)
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
            header = tuple(next(csv.reader([first]), []))
            if not first.endswith("\n") and ",".join(expected).startswith(first):
                # Empty, or the header cut off: a crash before any row was written
                # (the header reaches the disk with the first rows). No rows to replay.
                header = expected
            if header == SPOOL_HEADER and not quarantine:
                self._set_format(SPOOL_HEADER)  # written before checksums: read unchecked
            elif header != expected:
                self._wrong_header(first)
        except (OSError, csv.Error) as exc:
            self._file.close()
            raise InputError(f"{self.path}:1", f"cannot read: {exc}") from None
        except InputError:
            self._file.close()
            raise
        self.chars += len(first)

    def _set_format(self, header: tuple[str, ...]) -> None:
        self._header = header
        self._width = len(header)
        self._checked = header == CHECKED_HEADER

    def _wrong_header(self, first: str) -> None:
        """The first line is not the header: a bad line if the next lines are rows, else refuse the file.

        A spool file's rows tell its format: checksummed, else the one before checksums.
        """
        where = self._file.tell()
        probe = [line for line in islice(self._file, HEADER_PROBE_LINES) if line.strip()]
        self._file.seek(where)
        rows = sum(self._is_record(line) for line in probe)
        if not self.quarantine and (not probe or rows * 2 < len(probe)):
            self._set_format(SPOOL_HEADER)
            rows = sum(self._is_record(line) for line in probe)
        expected = self._header
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
        self._header_bad = BadLine(f"{self.path}:1", 1, reason, shown)
        self._last_ts = ""  # the probe filled the timestamp cache; harmless, but start clean

    def _is_record(self, raw: str) -> bool:
        """True if `raw` reads as a row (or, in a quarantine file, as a quarantined bad line)."""
        verdict = self._verdict(raw, 0)
        return not isinstance(verdict, BadLine) or verdict.original is not None

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
                # not ASCII: a checksum covers UTF-8 bytes, not characters; else look for undecoded bytes
                or (not blob.isascii() and (self._checked or _UNDECODED.search(blob)))):
            return self._read_checked(chunk, first)
        rows: list[TagValue] = []
        append, new_row = rows.append, tuple.__new__
        last_ts, last_us = self._last_ts, self._last_us
        bad_at: list[int] = []
        # Two loops, not one with a per-line "checked?" test: this is the reader's hot path.
        if self._checked:
            crc32 = zlib.crc32
            for i, raw in enumerate(chunk):
                try:
                    tag, ts, value, quality, crc = raw[:-1].split(",")
                    # A crc field not of eight digits cuts into the body: a mismatch, so `_verdict` says why.
                    if crc32(raw[:-CRC_TAIL].encode()) != int(crc, 16):
                        raise ValueError
                    if ts != last_ts:
                        last_us = parse_ts(ts)
                        last_ts = ts
                    if not tag:
                        raise ValueError
                    append(new_row(TagValue, (tag, last_us, None if value == "" else float(value), int(quality))))
                except ValueError:
                    bad_at.append(i)
        else:
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
                return BadLine(location, lineno, f"quarantined bad line: {fields[5]}", raw.rstrip("\r\n"),
                               (fields[6], fields[5], fields[7]))
            elif self._checked and not _crc_matches(raw, fields[4]):
                reason = f"checksum mismatch (crc32 {fields[4][:8]!r}): the line changed after it was written"
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
        return BadLine(location, lineno, reason, visible(raw.rstrip("\r\n")))


def _crc_matches(raw: str, crc: str) -> bool:
    """True if `crc` is the CRC-32 (eight hex digits) of `raw`'s text before its last comma."""
    if len(crc) != 8:
        return False
    try:
        expected = int(crc, 16)
    except ValueError:
        return False
    body = raw[: raw.rstrip("\r\n").rfind(",")]
    return zlib.crc32(body.encode("utf-8", "surrogateescape")) == expected


@dataclass(frozen=True, slots=True)
class SpoolLine:
    """One data line of a spool file: its 1-based line number and row."""

    line: int
    row: TagValue


def read_spool(path: Path | str, *, quarantine: bool = False) -> Iterator[SpoolLine | InputError]:
    """Stream a spool (or, with `quarantine=True`, a quarantine) file through `SpoolReader`, in line order.

    Yields a `SpoolLine` per good line and an `InputError` (file:line: reason,
    `raw` attached) per bad one. Raises InputError if the file is not a
    tagwriter file at all.
    """
    with SpoolReader(path, quarantine=quarantine) as reader:
        while not reader.done:
            rows, lines, bad = reader.read(READ_SPOOL_CHUNK)
            good = (SpoolLine(n, row) for n, row in zip(lines, rows, strict=True))
            if not bad:
                yield from good
                continue
            pending = next(good, None)
            for b in bad:
                while pending is not None and pending.line < b.line:
                    yield pending
                    pending = next(good, None)
                yield InputError(b.location, b.reason, b.raw)
            if pending is not None:
                yield pending
                yield from good


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

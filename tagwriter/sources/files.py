"""jsonl and csv sources: one value per line, from a file or standard input ('-').

jsonl: `{"tag": "line1.temp", "ts": "2024-05-01T12:00:00Z", "value": 21.5, "quality": 192}`
(`ts` ISO-8601 or epoch seconds, `value` a number or null, `quality` optional).
csv: a header naming `tag` (or `tag_name`), `ts`, `value` and optionally `quality`.

Input is read in blocks of what is available (`read1`; stdin through its
descriptor, so a stop is noticed while it waits), so memory stays bounded
and values that trickle in through a pipe are submitted without waiting for a
full chunk. A malformed line never stops the run: it is counted, logged
(rate-limited) with its file:line, and kept in the quarantine folder (bytes
that are not UTF-8 as \\xNN escapes, as replay keeps them). Malformed includes
a number no float holds (400 digits), JSON nested too deep, and a tag name
`models.check_tag_names` refuses (control characters, lone surrogates).

Resume (a file, with the disk queue): every submit carries the `Position`
after its last line as its cursor, stored in the queue in the same
transaction as the values, so the last durable position is never ahead of
the values it covers. A restart seeks there (a csv reads its header from the
top first) and counts lines on from there, so locations stay true. A file
that is shorter now, or whose bytes before the position changed, is read
from the start again (duplicates are counted by the key). Standard input
has no position to return to: it never resumes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import select
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tagwriter.errors import InputError, PipelineStopped
from tagwriter.intake import Intake
from tagwriter.models import GOOD_QUALITY, TagValue, check_tag_names, parse_ts, short_repr, to_epoch_us
from tagwriter.spoolformat import visible

log = logging.getLogger(__name__)

KINDS = ("jsonl", "csv")
CHUNK_ROWS = 500  # rows per submit: one buffer lock per few hundred values
READ_BYTES = 64 * 1024
STOP_LOOK = 0.1  # seconds a read of stdin waits for input before it looks at `stop` again
MAX_LINE_BYTES = 1024 * 1024  # a longer "line" is reported as bad, not held in memory
QUALITY_MAX = 65_535
UTF8_BOM = b"\xef\xbb\xbf"
CHECK_BYTES = 64  # bytes before a position whose CRC-32 tells a changed file from the one read
CURSOR_PREFIX = "file:"


@dataclass(frozen=True, slots=True)
class Position:
    """Where reading stands: the byte offset just after a line, that line's number, and a check.

    `check` is the CRC-32 of the CHECK_BYTES before `offset` (None where the
    platform cannot read them without moving the stream: no `os.pread`).
    """

    offset: int = 0
    lineno: int = 0
    check: int | None = None

    def encode(self) -> str:
        """As stored in the disk queue's cursor: "offset lineno [check]"."""
        text = f"{self.offset} {self.lineno}"
        return text if self.check is None else f"{text} {self.check:08x}"

    @classmethod
    def decode(cls, text: str) -> Position | None:
        """The position `encode` wrote; None for text it did not write."""
        parts = text.split()
        try:
            offset, lineno = int(parts[0]), int(parts[1])
            check = int(parts[2], 16) if len(parts) == 3 else None
        except (IndexError, ValueError):
            return None
        if len(parts) > 3 or offset < 0 or lineno < 0:
            return None
        return cls(offset, lineno, check)


START = Position()


@dataclass(slots=True)
class Chunk:
    """Rows parsed from consecutive lines, the lines that were malformed, and the position after the last."""

    rows: list[TagValue] = field(default_factory=list)
    bad: list[InputError] = field(default_factory=list)
    end: Position = START


class LineSource:
    """Streams `Chunk`s from a jsonl or csv file; `path` '-' is standard input.

    Not thread-safe: one reader. Raises InputError for a file that cannot be
    read at all (missing, or a csv without a usable header).
    """

    def __init__(
        self, kind: str, path: str, *, chunk_rows: int = CHUNK_ROWS, stream: BinaryIO | None = None
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown line format {kind!r}")
        self.kind = kind
        self.path = path
        self.name = "stdin" if path == "-" else path
        self.chunk_rows = chunk_rows
        self._stream = stream
        self._columns: dict[str, int] | None = None  # csv: column index by field

    def open(self) -> BinaryIO:
        """The byte stream to read; raises InputError if the file cannot be opened."""
        if self._stream is not None:
            return self._stream
        if self.path == "-":
            return sys.stdin.buffer
        try:
            return open(Path(self.path), "rb")  # closed by chunks()
        except FileNotFoundError:
            raise InputError(self.path, "no such input file") from None
        except OSError as exc:
            raise InputError(self.path, f"cannot read: {exc.strerror}") from None

    def chunks(self, stop: threading.Event | None = None, start: Position = START) -> Iterator[Chunk]:
        """Chunks of at most `chunk_rows` rows, in input order, from `start` until end of input or `stop`.

        `start` must be a position an earlier read reported (`Chunk.end`) of a seekable file.
        """
        stream = self.open()
        try:
            if start.offset:
                self._seek(stream, start)
            fd = self._check_descriptor(stream)
            chunk = Chunk()
            for lineno, raw, end in self._lines(stream, stop, start):
                if lineno > 0:
                    self._parse_into(chunk, lineno, raw)
                    chunk.end = Position(end, lineno)
                # At the end of what is available now, do not hold values back waiting for more.
                if len(chunk.rows) >= self.chunk_rows or (lineno < 0 and (chunk.rows or chunk.bad)):
                    yield _checked(chunk, fd)
                    chunk = Chunk()
            if chunk.rows or chunk.bad:
                yield _checked(chunk, fd)
        finally:
            if stream is not self._stream and self.path != "-":
                stream.close()

    def _seek(self, stream: BinaryIO, start: Position) -> None:
        """Go to `start`; a csv reads its header first (the column order comes from the top of the file)."""
        if self.kind == "csv":
            scratch = Chunk()  # what precedes the header was reported by the run that read it
            for lineno, raw, _ in self._lines(stream, None, START):
                if lineno > 0:
                    self._parse_into(scratch, lineno, raw)
                if self._columns is not None or lineno >= start.lineno:
                    break
        stream.seek(start.offset)

    def _check_descriptor(self, stream: BinaryIO) -> int | None:
        """The descriptor `Position.check` is read from (os.pread: the stream does not move); None for stdin."""
        if self.path == "-" or not hasattr(os, "pread"):
            return None
        try:
            return stream.fileno() if stream.seekable() else None
        except (OSError, ValueError, io.UnsupportedOperation):  # an in-memory stream (tests)
            return None

    def _lines(
        self, stream: BinaryIO, stop: threading.Event | None, start: Position
    ) -> Iterator[tuple[int, bytes | None, int]]:
        """(line number, line without its end, byte offset after it), counted on from `start`.

        None for an oversized line (reported where it ends); (-1, b"", offset) ends one read.
        """
        read = getattr(stream, "read1", stream.read)
        if stream is sys.stdin.buffer and stop is not None:
            read = _stdin_reader(stop) or read
        tail = b""
        skipping = False  # inside an oversized line: discard up to its end
        lineno, offset = start.lineno, start.offset  # offset: where `tail` begins
        while stop is None or not stop.is_set():
            block = read(READ_BYTES)
            if not block:
                break
            if skipping:
                cut = block.find(b"\n")
                if cut < 0:
                    offset += len(block)
                    continue
                block, skipping, offset, lineno = block[cut + 1:], False, offset + cut + 1, lineno + 1
                yield lineno, None, offset
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lineno += 1
                offset += len(line) + 1
                yield lineno, line if len(line) <= MAX_LINE_BYTES else None, offset
            if len(tail) > MAX_LINE_BYTES:
                offset += len(tail)
                tail, skipping = b"", True
            yield -1, b"", offset
        if stop is not None and stop.is_set():
            return  # a line partly read is read whole next time
        if skipping:
            yield lineno + 1, None, offset
        elif tail:
            yield lineno + 1, tail, offset + len(tail)

    def _parse_into(self, chunk: Chunk, lineno: int, raw: bytes | None) -> None:
        location = f"{self.name}:{lineno}"
        if raw is None:
            chunk.bad.append(InputError(location, f"line longer than {MAX_LINE_BYTES} bytes", ""))
            return
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if lineno == 1 and line.startswith(UTF8_BOM):  # Excel "CSV UTF-8", PowerShell
            line = line[len(UTF8_BOM):]
        if not line.strip():
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Kept as replay keeps such lines: the bytes that are not UTF-8 as \xNN escapes, never U+FFFD.
            raw_text = visible(line.decode("utf-8", "surrogateescape"))
            chunk.bad.append(InputError(location, f"not UTF-8 ({exc.reason} at byte {exc.start + 1})", raw_text))
            return
        try:
            if self.kind == "jsonl":
                chunk.rows.append(parse_jsonl(text))
            elif self._columns is None:
                self._columns = parse_csv_header(text, location)
            else:
                chunk.rows.append(parse_csv(text, self._columns))
        except (ValueError, ArithmeticError, RecursionError) as exc:  # one bad line, never the end of the run
            reason = str(exc) if isinstance(exc, ValueError) else f"cannot be parsed ({type(exc).__name__}: {exc})"
            chunk.bad.append(InputError(location, reason, text))


def _checked(chunk: Chunk, fd: int | None) -> Chunk:
    """`chunk` with the check of its end position, read from `fd` (None: no check)."""
    end = chunk.end
    if fd is not None and end.offset:
        at, size = _check_span(end.offset)
        chunk.end = Position(end.offset, end.lineno, zlib.crc32(os.pread(fd, size, at)))
    return chunk


def _check_span(offset: int) -> tuple[int, int]:
    """(first byte, length) of what `Position.check` covers: the CHECK_BYTES before `offset`."""
    size = min(CHECK_BYTES, offset)
    return offset - size, size


def resume_problem(path: Path, position: Position) -> str | None:
    """Why `path` cannot be read on from `position` (it is not the file read before); None if it can.

    A file that cannot be opened is no problem here: reading it reports that.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < position.offset:
                return f"the file is shorter now ({size} bytes)"
            if not position.offset:
                return None
            f.seek(position.offset - 1)
            if f.read(1) != b"\n" and position.offset != size:  # a last line without newline ends at the end
                return f"byte {position.offset} is not the end of a line"
            if position.check is not None:
                at, size = _check_span(position.offset)
                f.seek(at)
                if zlib.crc32(f.read(size)) != position.check:
                    return f"the bytes before byte {position.offset} have changed"
    except OSError:
        return None
    return None


def _stdin_reader(stop: threading.Event) -> Callable[[int], bytes] | None:
    """A read of what stdin has, which returns b"" soon after `stop` is set; None if stdin has no descriptor.

    A thread blocked in `sys.stdin.buffer.read1` holds the buffer's lock, and
    the interpreter aborts at exit if it still does ("Fatal Python error:
    _enter_buffered_busy"): read the descriptor itself, waiting in `select`.
    """
    try:
        fd = sys.stdin.buffer.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):  # replaced by a test harness
        return None

    def read(n: int) -> bytes:
        while not stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], STOP_LOOK)
            except (OSError, ValueError):  # no select on this kind of file (Windows): block
                return os.read(fd, n)
            if ready:
                return os.read(fd, n)
        return b""

    return read


def parse_jsonl(text: str) -> TagValue:
    """One jsonl line as a row; raises ValueError with the reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("not JSON tagwriter can read: nested too deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"not JSON tagwriter can read: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key in ("tag", "ts", "value"):
        if key not in obj:
            raise ValueError(f"missing {key!r}")
    ts = obj["ts"]
    if isinstance(ts, str):
        ts_us = _ts(ts)
    elif isinstance(ts, (int, float)) and not isinstance(ts, bool):
        ts_us = to_epoch_us(ts)  # ValueError for NaN, inf and a number outside the years 1-9999
    else:
        raise ValueError(f"ts must be ISO-8601 text or epoch seconds, not {short_repr(ts)}")
    value = obj["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"value must be a number or null, not {short_repr(value)}")
    return TagValue(_tag(obj["tag"]), ts_us, _finite(value), _quality(obj.get("quality", GOOD_QUALITY)))


def parse_csv_header(text: str, location: str) -> dict[str, int]:
    """Column index of tag, ts, value (and quality); raises InputError: the file is unusable."""
    names = [n.strip().lower() for n in next(csv.reader([text]), [])]
    names = ["tag" if n == "tag_name" else n for n in names]
    missing = [n for n in ("tag", "ts", "value") if n not in names]
    if missing:
        raise InputError(
            location,
            f"csv header {text[:80]!r} lacks {', '.join(missing)}: expected tag,ts,value[,quality]",
        )
    return {n: names.index(n) for n in ("tag", "ts", "value", "quality") if n in names}


def parse_csv(text: str, columns: dict[str, int]) -> TagValue:
    """One csv data line as a row; raises ValueError with the reason."""
    fields = text.split(",") if '"' not in text else next(csv.reader([text]), [])
    width = max(columns["tag"], columns["ts"], columns["value"]) + 1  # quality may be left off
    if len(fields) < width:
        raise ValueError(f"expected at least {width} columns, found {len(fields)}")
    value_text = fields[columns["value"]].strip()
    try:
        value = None if value_text == "" else float(value_text)
    except ValueError:
        raise ValueError(f"value {value_text!r} is not a number") from None
    q_index = columns.get("quality")
    quality: Any = GOOD_QUALITY
    if q_index is not None and q_index < len(fields) and fields[q_index].strip():
        try:
            quality = int(fields[q_index])
        except ValueError:
            raise ValueError(f"quality {fields[q_index]!r} is not an integer") from None
    return TagValue(_tag(fields[columns["tag"]].strip()), _ts(fields[columns["ts"]]), _finite(value),
                    _quality(quality))


def _tag(tag: Any) -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"tag must be a non-empty string, not {short_repr(tag)}")
    check_tag_names((tag,))
    return tag


def _ts(text: str) -> int:
    try:
        return parse_ts(text)
    except (ValueError, OverflowError):
        raise ValueError(f"ts {text.strip()!r} is not ISO-8601 or epoch seconds") from None


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except OverflowError:  # a JSON integer of 400 digits
        raise ValueError(f"value {short_repr(value)} is too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"value {value!r} is not finite")
    return value


def _quality(q: Any) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= QUALITY_MAX:
        raise ValueError(f"quality must be an integer 0..{QUALITY_MAX}, not {short_repr(q)}")
    return q


# -- feeding a pipeline -------------------------------------------------------


class BadLineLog:
    """Logs the first few bad lines one by one, then one summary per `interval` seconds."""

    def __init__(self, *, first: int = 5, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.first = first
        self.interval = interval
        self.clock = clock
        self.count = 0
        self._unlogged = 0
        self._last: InputError | None = None
        self._next_summary = 0.0

    def add(self, bad: InputError) -> None:
        self.count += 1
        self._last = bad
        if self.count <= self.first:
            log.warning("malformed input line %s (kept in quarantine)", bad)
            if self.count == self.first:
                log.warning("further malformed lines are summarised every %gs", self.interval)
                self._next_summary = self.clock() + self.interval
            return
        self._unlogged += 1
        if self.clock() >= self._next_summary:
            self.flush()

    def flush(self) -> None:
        """Log the summary of lines not logged yet, if any."""
        if self._unlogged and self._last is not None:
            log.warning("%d more malformed input lines (latest %s)", self._unlogged, self._last)
            self._unlogged = 0
        self._next_summary = self.clock() + self.interval


@dataclass(slots=True)
class FeedResult:
    """What `feed` did: rows submitted, bad lines kept, and whether input ended."""

    rows: int = 0
    bad: int = 0
    ended: bool = False
    error: InputError | None = None


def feed(
    source: LineSource, intake: Intake, stop: threading.Event, result: FeedResult | None = None,
    *, start: Position = START, key: str | None = None,
) -> FeedResult:
    """Submit every row of `source` to `intake`, from `start`, until end of input or `stop`.

    Malformed lines are counted, logged (rate-limited) and quarantined
    (`intake.quarantine_input`). A source that cannot be read at all ends
    the feed with `result.error` set. `result` may be passed in so another
    thread can watch it.

    A file has no real-time constraint, so the feed waits for room in the
    buffer before each submit (back-pressure) instead of letting the overflow
    policy drop or spill values when the input outruns the database. Rows
    already read off the input when `stop` comes are handed to the spool,
    never left behind.

    With `key`, every chunk's submit carries the cursor (`key`, the position
    after its last line); a chunk without rows, or spooled whole at `stop`,
    moves the cursor with an empty submit.
    """
    result = result if result is not None else FeedResult()
    bad_log = BadLineLog()
    try:
        for chunk in source.chunks(stop, start):
            cursor = None if key is None else (key, chunk.end.encode())
            if chunk.bad:
                _keep_bad(intake, chunk.bad, bad_log)
                result.bad += len(chunk.bad)
            if not chunk.rows and cursor is not None:
                intake.submit([], cursor=cursor)
            step = intake.capacity
            for first in range(0, len(chunk.rows), step):
                rows = chunk.rows[first:first + step]
                last = first + step >= len(chunk.rows)  # the cursor goes with the chunk's last rows
                if not intake.wait_for_room(len(rows), stop):
                    _spool_rest(intake, chunk.rows[first:], cursor, result)
                    log.info("input: stopped after %d rows from %s", result.rows, source.name)
                    break
                intake.submit(rows, cursor=cursor if last else None)
                result.rows += len(rows)
        else:
            result.ended = not stop.is_set()
    except InputError as exc:
        result.error = exc
    except PipelineStopped:
        log.info("input: pipeline stopped after %d rows from %s", result.rows, source.name)
    finally:
        bad_log.flush()
    return result


def _spool_rest(intake: Intake, rows: list[TagValue], cursor: tuple[str, str] | None, result: FeedResult) -> None:
    """Spool rows read off the input at `stop`; once all are spooled the cursor passes them."""
    spooled = intake.spool_rows(rows)
    result.rows += spooled
    if spooled == len(rows) and cursor is not None:
        intake.submit([], cursor=cursor)


def _keep_bad(intake: Intake, bad: list[InputError], bad_log: BadLineLog) -> None:
    for item in bad:
        bad_log.add(item)
    intake.quarantine_input([(b.location, b.reason, b.raw) for b in bad])


def cursor_key(path: str) -> str | None:
    """The key a file's position is stored under: its absolute path; None for stdin or a pipe (no resume)."""
    if path == "-" or not Path(path).is_file():
        return None
    return CURSOR_PREFIX + str(Path(path).resolve())


class FileSource:
    """A jsonl or csv file (or stdin, path '-') as a `Source`; `result` says what the feed did.

    A regular file resumes after the last durable line the intake recorded
    under `key` (a disk queue; never in memory), unless `from_start`. `start` is
    where the last `run` began. `run` raises InputError when the input cannot
    be read at all.
    """

    def __init__(self, kind: str, path: str, *, from_start: bool = False) -> None:
        self.from_start = from_start  # with a disk queue: ignore the recorded resume point
        self.lines = LineSource(kind, path)
        self.name = f"{kind} from {self.lines.name}"
        self.key: str | None = None  # the cursor key of the last `run` (see `cursor_key`)
        self.start = START
        self.result = FeedResult()

    def run(self, intake: Intake, stop: threading.Event) -> None:
        self.key = cursor_key(self.lines.path)
        self.start = self._resume_point(intake)
        log.info("reading %s", self.name)
        feed(self.lines, intake, stop, self.result, start=self.start, key=self.key)
        if self.result.error is not None:
            raise self.result.error

    def _resume_point(self, intake: Intake) -> Position:
        """Where to begin: after the last durable line, if there is one and the file is still the one read."""
        stored = intake.resume_point(self.key) if self.key is not None else None
        if stored is None:
            return START
        position = Position.decode(stored)
        path = self.lines.path
        if position is None:
            log.warning("cannot resume %s: the recorded position %r is not one tagwriter writes; "
                        "reading it from the start", path, stored)
            return START
        if self.from_start:
            log.info("reading %s from the start (--from-start): the last run got to line %d (byte %d)",
                     path, position.lineno, position.offset)
            return START
        problem = resume_problem(Path(path), position)
        if problem is not None:
            log.warning("cannot resume %s after line %d (byte %d): %s; reading it from the start "
                        "(values read before are counted as duplicates)", path, position.lineno,
                        position.offset, problem)
            return START
        log.info("resuming %s after line %d (byte %d)", path, position.lineno, position.offset)
        return position

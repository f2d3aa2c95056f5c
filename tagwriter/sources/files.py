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


@dataclass(slots=True)
class Chunk:
    """Rows parsed from consecutive lines, and the lines that were malformed."""

    rows: list[TagValue] = field(default_factory=list)
    bad: list[InputError] = field(default_factory=list)


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

    def chunks(self, stop: threading.Event | None = None) -> Iterator[Chunk]:
        """Chunks of at most `chunk_rows` rows, in input order, until end of input or `stop`."""
        stream = self.open()
        try:
            chunk = Chunk()
            for lineno, raw in self._lines(stream, stop):
                self._parse_into(chunk, lineno, raw)
                if len(chunk.rows) >= self.chunk_rows:
                    yield chunk
                    chunk = Chunk()
                elif lineno < 0 and (chunk.rows or chunk.bad):
                    # End of what is available now: do not hold values back waiting for more.
                    yield chunk
                    chunk = Chunk()
            if chunk.rows or chunk.bad:
                yield chunk
        finally:
            if stream is not self._stream and self.path != "-":
                stream.close()

    def _lines(self, stream: BinaryIO, stop: threading.Event | None) -> Iterator[tuple[int, bytes | None]]:
        """(line number, line without its end); None for an oversized line; (-1, b"") ends one read."""
        read = getattr(stream, "read1", stream.read)
        if stream is sys.stdin.buffer and stop is not None:
            read = _stdin_reader(stop) or read
        tail = b""
        skipping = False  # inside an oversized line: discard up to its end
        lineno = 0
        while stop is None or not stop.is_set():
            block = read(READ_BYTES)
            if not block:
                break
            if skipping:
                cut = block.find(b"\n")
                if cut < 0:
                    continue
                block, skipping = block[cut + 1:], False
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line if len(line) <= MAX_LINE_BYTES else None
            if len(tail) > MAX_LINE_BYTES:
                lineno += 1
                yield lineno, None
                tail, skipping = b"", True
            yield -1, b""
        if tail and not skipping and (stop is None or not stop.is_set()):
            yield lineno + 1, tail

    def _parse_into(self, chunk: Chunk, lineno: int, raw: bytes | None) -> None:
        if lineno < 0:
            return
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


def feed(source: LineSource, intake: Intake, stop: threading.Event, result: FeedResult | None = None) -> FeedResult:
    """Submit every row of `source` to `intake` until end of input or `stop`.

    Malformed lines are counted, logged (rate-limited) and quarantined
    (`intake.quarantine_input`). A source that cannot be read at all ends
    the feed with `result.error` set. `result` may be passed in so another
    thread can watch it.

    A file has no real-time constraint, so the feed waits for room in the
    buffer before each submit (back-pressure) instead of letting the overflow
    policy drop or spill values when the input outruns the database. Rows
    already read off the input when `stop` comes are handed to the spool,
    never left behind.
    """
    result = result if result is not None else FeedResult()
    bad_log = BadLineLog()
    try:
        for chunk in source.chunks(stop):
            if chunk.bad:
                _keep_bad(intake, chunk.bad, bad_log)
                result.bad += len(chunk.bad)
            step = intake.capacity
            for start in range(0, len(chunk.rows), step):
                rows = chunk.rows[start:start + step]
                if not intake.wait_for_room(len(rows), stop):
                    result.rows += intake.spool_rows(chunk.rows[start:])
                    log.info("input: stopped after %d rows from %s", result.rows, source.name)
                    break
                intake.submit(rows)
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


def _keep_bad(intake: Intake, bad: list[InputError], bad_log: BadLineLog) -> None:
    for item in bad:
        bad_log.add(item)
    intake.quarantine_input([(b.location, b.reason, b.raw) for b in bad])


class FileSource:
    """A jsonl or csv file (or stdin, path '-') as a `Source`; `result` says what the feed did.

    `run` raises InputError when the input cannot be read at all.
    """

    def __init__(self, kind: str, path: str) -> None:
        self.lines = LineSource(kind, path)
        self.name = f"{kind} from {self.lines.name}"
        self.result = FeedResult()

    def run(self, intake: Intake, stop: threading.Event) -> None:
        log.info("reading %s", self.name)
        feed(self.lines, intake, stop, self.result)
        if self.result.error is not None:
            raise self.result.error

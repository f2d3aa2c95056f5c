"""The values tagwriter moves: `TagValue` rows and the `PollingData` groups they come in.

A buffered value is a `TagValue`: a 4-field named tuple holding the timestamp as
integer microseconds since the Unix epoch (UTC). That is exact to the
microsecond, cheaper than an aware `datetime` (~113 B per buffered value instead
of ~152 B), and the values of one polling group share one timestamp object.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, TypeVar, overload

#: OPC DA "good" quality, the default when a source does not say.
GOOD_QUALITY = 192

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MIN_EPOCH_S = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_EPOCH_S = 253_402_300_800  # 10000-01-01T00:00:00Z, exclusive


#: Characters no tag name may hold: control characters (C0, DEL, C1; CR and LF among them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SHOWN_CHARS = 60  # of a refused name in the error message: a 10 kB name must not flood the log
#: What a quality code may be: a signed 64-bit integer, the widest column a database gives it.
QUALITY_RANGE = range(-(2**63), 2**63)


def check_tag_names(tags: Collection[str]) -> None:
    """Raise ValueError unless every tag name is non-empty text that every place can keep exactly.

    Refused: not text; empty (a spool line needs a tag); a control character
    (NUL: PostgreSQL text cannot hold it; CR/LF: spool and quarantine files
    hold one value per line; the rest would garble logs and terminals); a
    lone surrogate (not encodable as UTF-8: no database driver or spool file
    can take it). One join and one scan in the common case (~10 ns a value):
    cheap enough for the submit path. A name longer than a database column
    (Oracle's VARCHAR2(128)) is that database's to reject, row by row, into quarantine.
    """
    try:
        joined = "".join(tags)
    except TypeError:
        bad = next(t for t in tags if not isinstance(t, str))
        raise ValueError(f"tag name {short_repr(bad)} is not text") from None
    if joined.isprintable() and all(tags):
        return
    for tag in tags:
        problem = _tag_problem(tag)
        if problem:
            raise ValueError(f"tag name {short_repr(tag)} {problem}")


_KNOWN_TAGS: dict[tuple[str, ...], tuple[str, ...]] = {}
_KNOWN_TAGS_MAX = 4096  # tag lists remembered (a plant has tens to thousands of polling groups)


def known_tag_names(tags: Sequence[str]) -> tuple[str, ...]:
    """`check_tag_names(tags)`, remembered: a polling group's tag list is checked once, not at every poll.

    Returns the first equal tuple seen, so that every chunk of a group shares
    one tuple of names (8 B a buffered value less). Raises ValueError as
    `check_tag_names` does (a refused list is not remembered). Thread-safe
    (single dict operations); forgets everything past `_KNOWN_TAGS_MAX` lists.
    """
    tags = tuple(tags)  # (a tuple as it is)
    known = _KNOWN_TAGS.get(tags)
    if known is not None:
        return known
    check_tag_names(tags)
    if len(_KNOWN_TAGS) >= _KNOWN_TAGS_MAX:
        _KNOWN_TAGS.clear()
    return _KNOWN_TAGS.setdefault(tags, tags)


def _tag_problem(tag: str) -> str:
    """Why `tag` is refused (empty if it is not)."""
    if not tag:
        return "is empty"
    if "\n" in tag or "\r" in tag:
        return "contains a line break (not allowed: spool files hold a value per line)"
    if _CONTROL.search(tag):
        return "contains a control character"
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not encodable as UTF-8 ({exc.reason}: {tag[exc.start:exc.end]!r})"
    return ""  # not printable, but fine: e.g. a no-break space or a format character


def to_epoch_us(ts: datetime | float | int) -> int:
    """Convert a timestamp to integer microseconds since the epoch (UTC).

    A naive `datetime` is taken as UTC; an aware one is converted. A number is
    seconds since the epoch. Raises ValueError for NaN, infinite or out-of-range numbers.
    """
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        delta = ts - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    # An int is compared as it is: math.isfinite() of a 400-digit int raises OverflowError.
    if isinstance(ts, bool) or not (isinstance(ts, int) or math.isfinite(ts)):
        raise ValueError(f"not a timestamp: {ts!r}")
    if not _MIN_EPOCH_S <= ts < _MAX_EPOCH_S:
        # e.g. epoch milliseconds: such a row could never be formatted, spooled or written
        raise ValueError(f"timestamp {short_repr(ts)} is outside the years 1-9999 (epoch seconds expected)")
    if isinstance(ts, int):
        return ts * 1_000_000
    return round(ts * 1_000_000)


def from_epoch_us(ts_us: int) -> datetime:
    """The aware UTC `datetime` for integer microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=ts_us)


def format_ts(ts_us: int) -> str:
    """ISO-8601 UTC with exactly six fractional digits and a `Z`.

    Fixed width, so text order is time order (the SQLite key relies on it):
    `isoformat` pads the year to four digits (glibc's `%Y` would not below
    1000) and, with `timespec`, always writes the microseconds. ~1.5 µs,
    a third of formatting with `strftime`.
    """
    return (_NAIVE_EPOCH + timedelta(0, 0, ts_us)).isoformat("T", "microseconds") + "Z"


def parse_ts(text: str) -> int:
    """Parse an ISO-8601 timestamp or epoch seconds into epoch microseconds.

    Timestamps without an offset are UTC. Raises ValueError on anything else.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty timestamp")
    if text[0].isdigit() and ("-" not in text and ":" not in text):
        return to_epoch_us(float(text))
    return to_epoch_us(datetime.fromisoformat(text))


class TagValue(NamedTuple):
    """One value of one tag at one instant: the row tagwriter writes.

    `ts_us` is microseconds since the epoch (UTC); `value` is a float or None.
    """

    tag: str
    ts_us: int
    value: float | None
    quality: int = GOOD_QUALITY

    @classmethod
    def at(
        cls, tag: str, ts: datetime | float, value: float | None, quality: int = GOOD_QUALITY
    ) -> TagValue:
        """Build from a `datetime` (naive = UTC) or epoch seconds."""
        return cls(tag, to_epoch_us(ts), None if value is None else float(value), int(quality))

    @property
    def ts(self) -> datetime:
        """The timestamp as an aware UTC `datetime`."""
        return from_epoch_us(self.ts_us)


#: A TagValue from a 4-tuple without NamedTuple's Python-level __new__ (a frame per row).
_row = partial(tuple.__new__, TagValue)


class Chunk(Sequence[TagValue]):
    """Rows kept column by column: what moves through the buffer, the queue and into the sinks.

    A polling group of n values is one chunk of four lists (tag names, epoch
    microseconds, values, qualities), not n `TagValue` objects: the buffer
    moves whole groups, a batch is the chunks it drained joined column by
    column (`Chunk.join`, a few C-level list extends), and a sink that knows
    chunks (SQLite, PostgreSQL, Oracle) binds the columns as they are. The
    values of a group share one timestamp object and one quality object, so a
    buffered value costs four list slots and its float.

    A chunk is also a `Sequence[TagValue]`: indexing, iteration and slicing
    give rows (made on demand), so code that wants rows needs no change. The
    columns are sequences of equal length (lists, or tuples: a group's tag
    names are one tuple shared by every poll of the group, see
    `known_tag_names`); nobody changes them once the chunk is built.

    `runs`, where known, tells the stamps column in short: `(stamp, count)`
    pairs whose expansion is `stamps` (a polling group is one run; a batch
    joined from groups, one run per group). A sink that turns each stamp into
    its database's form (`stamp_column`) then does so per run, not per row.
    None where not known (a chunk made from rows).
    """

    __slots__ = ("qualities", "runs", "stamps", "tags", "values")

    def __init__(
        self, tags: Sequence[str], stamps: Sequence[int], values: Sequence[float | None], qualities: Sequence[int],
        runs: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.tags = tags
        self.stamps = stamps
        self.values = values
        self.qualities = qualities
        self.runs = runs

    @classmethod
    def of(cls, rows: Iterable[TagValue]) -> Chunk:
        """The chunk of `rows` (a chunk is returned as it is)."""
        if isinstance(rows, Chunk):
            return rows
        rows = rows if isinstance(rows, (list, tuple)) else list(rows)
        if not rows:
            return cls([], [], [], [])
        tags, stamps, values, qualities = map(list, zip(*rows, strict=True))
        return cls(tags, stamps, values, qualities)

    @classmethod
    def join(cls, chunks: Sequence[Chunk]) -> Chunk:
        """One chunk of `chunks` in order (the only one as it is)."""
        if len(chunks) == 1:
            return chunks[0]
        tags: list[str] = []
        stamps: list[int] = []
        values: list[float | None] = []
        qualities: list[int] = []
        runs: list[tuple[int, int]] | None = []
        for c in chunks:
            tags += c.tags
            stamps += c.stamps
            values += c.values
            qualities += c.qualities
            if runs is not None:
                if c.runs is None:
                    runs = None
                else:
                    runs += c.runs
        return cls(tags, stamps, values, qualities, runs)

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def columns(self) -> tuple[Sequence[str], Sequence[int], Sequence[float | None], Sequence[int]]:
        return self.tags, self.stamps, self.values, self.qualities

    @overload
    def __getitem__(self, i: int) -> TagValue: ...
    @overload
    def __getitem__(self, i: slice) -> Chunk: ...
    def __getitem__(self, i: int | slice) -> TagValue | Chunk:
        if isinstance(i, slice):
            stamps = self.stamps[i]
            runs = None if self.runs is None else _cut_runs(self.runs, *i.indices(len(self.tags)))
            return Chunk(self.tags[i], stamps, self.values[i], self.qualities[i], runs)
        return _row((self.tags[i], self.stamps[i], self.values[i], self.qualities[i]))

    def __iter__(self) -> Iterator[TagValue]:
        return map(_row, zip(self.tags, self.stamps, self.values, self.qualities, strict=True))

    def __reversed__(self) -> Iterator[TagValue]:
        return iter(list(self)[::-1])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunk):
            return all(list(a) == list(b) for a, b in zip(self.columns, other.columns, strict=True))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside, like a list

    def __add__(self, other: Iterable[TagValue]) -> list[TagValue]:
        return [*self, *other]  # like a list's `+`

    def __radd__(self, other: Iterable[TagValue]) -> list[TagValue]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"Chunk({list(self)!r})"

    def stamp_column(self, fn: Callable[[int], T]) -> list[T]:
        """`fn(stamp)` for each row, `fn` called once per distinct stamp (once per run where `runs` is known).

        With runs the column is a few C-level list repeats; without, the
        stamps are scanned (one `count` where they are all the same).
        """
        stamps = self.stamps
        n = len(stamps)
        if not n:
            return []
        runs = self.runs
        if runs is not None:
            if len(runs) == 1:
                return [fn(stamps[0])] * n
            made: dict[int, T] = {}
            column: list[T] = []
            for stamp, count in runs:
                if stamp in made:
                    shown = made[stamp]
                else:
                    shown = made[stamp] = fn(stamp)
                column += [shown] * count
            return column
        first = stamps[0]
        if stamps.count(first) == n:  # one polling group (or several at one instant)
            return [fn(first)] * n
        distinct = set(stamps)
        if len(distinct) == n:  # all distinct (a replay of one tag): no dict
            return [fn(s) for s in stamps]
        by_stamp = {s: fn(s) for s in distinct}
        return list(map(by_stamp.__getitem__, stamps))

    def params(self, ts: Callable[[int], object]) -> Iterator[tuple[object, object, object, object]]:
        """(tag, ts(stamp), value, quality) per row, `ts` called once per distinct stamp: a sink's bind rows."""
        return zip(self.tags, self.stamp_column(ts), self.values, self.qualities, strict=True)


def _cut_runs(runs: Sequence[tuple[int, int]], start: int, stop: int, step: int) -> list[tuple[int, int]] | None:
    """The runs of rows `start` .. `stop - 1` (None for a stepped slice: no runs kept)."""
    if step != 1:
        return None
    out: list[tuple[int, int]] = []
    at = 0
    for stamp, count in runs:
        lo, hi = max(start, at), min(stop, at + count)
        if lo < hi:
            out.append((stamp, hi - lo))
        at += count
        if at >= stop:
            break
    return out


@dataclass(slots=True)
class PollingData:
    """One poll of one group of tags: what a collector hands to `Pipeline.submit`.

    `ts` is the poll's time (datetime, naive = UTC, or epoch seconds); `quality`
    applies to every value of the group.
    """

    group: str
    ts: datetime | float
    values: Mapping[str, float | None] = field(default_factory=dict)
    quality: int = GOOD_QUALITY

    def rows(self) -> Iterator[TagValue]:
        """The group expanded into rows; they share one timestamp object.

        Raises ValueError for a timestamp outside the years 1-9999, a quality
        outside QUALITY_RANGE or a value no float can hold (a 400-digit integer).
        """
        ts_us = to_epoch_us(self.ts)
        quality = int(self.quality)
        if quality not in QUALITY_RANGE:
            raise ValueError(f"quality {short_repr(quality)} is not a 64-bit integer")
        # tuple.__new__ skips NamedTuple's Python-level __new__: ~40% of the submit path.
        new = tuple.__new__
        try:
            for tag, value in self.values.items():
                yield new(TagValue, (tag, ts_us, None if value is None else float(value), quality))
        except OverflowError:
            raise ValueError(f"value {short_repr(value)} of tag {short_repr(tag)} is too large for a float") from None

    def chunk(self) -> Chunk:
        """The group as one `Chunk` (what `Pipeline.submit` queues): `rows()` without an object per value.

        Raises ValueError as `rows()` does; the tag names are not checked here (`check_tag_names`).
        """
        ts_us = to_epoch_us(self.ts)
        quality = int(self.quality)
        if quality not in QUALITY_RANGE:
            raise ValueError(f"quality {short_repr(quality)} is not a 64-bit integer")
        n = len(self.values)
        try:  # float() of a float is that float: one C-level pass, and ints become floats as rows() makes them
            values: list[float | None] = [*map(float, self.values.values())]  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):  # a None among them, or a value that is no number
            values = list(map(_as_float, self.values.items()))
        return Chunk(tuple(self.values), [ts_us] * n, values, [quality] * n, ((ts_us, n),) if n else ())

    def __len__(self) -> int:
        return len(self.values)


def _as_float(item: tuple[str, object]) -> float | None:
    """A group's value as `rows()` makes it: None, or `float(value)`."""
    tag, value = item
    try:
        return None if value is None else float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"value {short_repr(value)} of tag {short_repr(tag)} is too large for a float") from None


def checked_rows(rows: Sequence[TagValue]) -> Sequence[TagValue]:
    """`rows` if every field is what a sink and the spool can take, else a copy with int values as floats.

    Raises ValueError (nothing taken) for a refused tag name (`check_tag_names`),
    a `ts_us` that is not an integer in the years 1-9999, a value that is not a
    number or None (or too large for a float), or a quality that is not a
    64-bit integer. Column-wise C-level scans: ~50 ns a row.
    """
    if not rows:
        return rows
    columns: Sequence[Sequence[Any]] = (
        (rows.tags, rows.stamps, rows.values, rows.qualities) if isinstance(rows, Chunk)
        else tuple(zip(*rows, strict=True))
    )
    tags, stamps, values, qualities = columns
    check_tag_names(tags)
    if set(map(type, stamps)) != {int} or min(stamps) < _MIN_US or max(stamps) >= _MAX_US:
        bad = next(t for t in stamps if type(t) is not int or not _MIN_US <= t < _MAX_US)
        raise ValueError(f"ts_us {short_repr(bad)} is not integer microseconds in the years 1-9999")
    q_min, q_end = QUALITY_RANGE.start, QUALITY_RANGE.stop
    if set(map(type, qualities)) != {int} or min(qualities) < q_min or max(qualities) >= q_end:
        bad = next(q for q in qualities if type(q) is not int or q not in QUALITY_RANGE)
        raise ValueError(f"quality {short_repr(bad)} is not a 64-bit integer")
    if set(map(type, values)) <= _VALUE_TYPES:
        return rows
    fixed = [row if type(row[2]) in _VALUE_TYPES else row._replace(value=_float(row))
             for row in map(TagValue._make, rows)]
    return Chunk.of(fixed) if isinstance(rows, Chunk) else fixed


_VALUE_TYPES = {float, type(None)}
_MIN_US = _MIN_EPOCH_S * 1_000_000
_MAX_US = _MAX_EPOCH_S * 1_000_000


def _float(row: TagValue) -> float:
    value = row.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"value {short_repr(value)} of tag {short_repr(row.tag)} is not a number or None")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"value {short_repr(value)} of tag {short_repr(row.tag)} is too large for a float") from None


def short_repr(thing: object) -> str:
    """`repr(thing)`, cut short: a 10 kB tag name or a 5,000-digit integer must not flood a message."""
    if isinstance(thing, int) and not isinstance(thing, bool) and thing.bit_length() > 200:
        return f"(an integer of {len(str(abs(thing))) if thing.bit_length() < 14_000 else 'over 4,000'} digits)"
    if isinstance(thing, str) and len(thing) > _SHOWN_CHARS:
        return f"{thing[:_SHOWN_CHARS]!r}... ({len(thing)} characters)"
    text = repr(thing)
    return text if len(text) <= 2 * _SHOWN_CHARS else text[: 2 * _SHOWN_CHARS] + "..."

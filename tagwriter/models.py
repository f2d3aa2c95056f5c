"""The values tagwriter moves: `TagValue` rows and the `PollingData` groups they come in.

A buffered value is a `TagValue`: a 4-field named tuple holding the timestamp as
integer microseconds since the Unix epoch (UTC). That is exact to the
microsecond, cheaper than an aware `datetime` (~113 B per buffered value instead
of ~152 B), and the values of one polling group share one timestamp object.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

#: OPC DA "good" quality, the default when a source does not say.
GOOD_QUALITY = 192

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_EPOCH_S = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_EPOCH_S = 253_402_300_800  # 10000-01-01T00:00:00Z, exclusive


def check_tag_names(tags: Collection[str]) -> None:
    """Raise ValueError unless every tag name is text without a line break.

    Spool and quarantine files hold one value per line (a reader must be able
    to resume at any line after a crash), so a name with CR or LF could not be
    kept exactly; it is refused where it enters. One join and two scans: cheap
    enough for the submit path (~10 ns a value).
    """
    try:
        joined = "".join(tags)
    except TypeError:
        bad = next(t for t in tags if not isinstance(t, str))
        raise ValueError(f"tag name {bad!r} is not text") from None
    if "\n" in joined or "\r" in joined:
        bad = next(t for t in tags if "\n" in t or "\r" in t)
        raise ValueError(f"tag name {bad!r} contains a line break (not allowed: spool files hold a value per line)")


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
    if isinstance(ts, bool) or not math.isfinite(ts):
        raise ValueError(f"not a timestamp: {ts!r}")
    if not _MIN_EPOCH_S <= ts < _MAX_EPOCH_S:
        # e.g. epoch milliseconds: such a row could never be formatted, spooled or written
        raise ValueError(f"timestamp {ts!r} is outside the years 1-9999 (epoch seconds expected)")
    if isinstance(ts, int):
        return ts * 1_000_000
    return round(ts * 1_000_000)


def from_epoch_us(ts_us: int) -> datetime:
    """The aware UTC `datetime` for integer microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=ts_us)


def format_ts(ts_us: int) -> str:
    """ISO-8601 UTC with exactly six fractional digits and a `Z`.

    Fixed width, so text order is time order (the SQLite key relies on it).
    """
    seconds, micros = divmod(ts_us, 1_000_000)
    dt = _EPOCH + timedelta(seconds=seconds)
    if dt.year < 1000:  # glibc's %Y does not pad years below 1000 (e.g. 0001-01-01, .NET's MinValue)
        return f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}.{micros:06d}Z"
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{micros:06d}Z"


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
        """The group expanded into rows; they share one timestamp object."""
        ts_us = to_epoch_us(self.ts)
        quality = int(self.quality)
        # tuple.__new__ skips NamedTuple's Python-level __new__: ~40% of the submit path.
        new = tuple.__new__
        for tag, value in self.values.items():
            yield new(TagValue, (tag, ts_us, None if value is None else float(value), quality))

    def __len__(self) -> int:
        return len(self.values)

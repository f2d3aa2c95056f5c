"""Binding rows for python-oracledb and reading timestamps back.

A bare `datetime` binds as DATE and drops fractional seconds, and tzinfo is
ignored: bind naive UTC with `DB_TYPE_TIMESTAMP` set (the sink does).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from tagwriter.models import Chunk, TagValue

_EPOCH = datetime(1970, 1, 1)


def naive_utc(ts_us: int) -> datetime:
    """Naive UTC datetime (the driver ignores tzinfo) with microseconds."""
    return _EPOCH + timedelta(0, 0, ts_us)  # (days, seconds, microseconds): positional is faster


def to_us(ts: datetime) -> int:
    """Epoch microseconds of a naive UTC datetime read back from TIMESTAMP."""
    delta = ts.replace(tzinfo=None) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def bind_rows(rows: Sequence[TagValue]) -> list[tuple[object, ...]]:
    """Bind tuples (tag, naive UTC datetime, value, quality), in the list executemany wants.

    One datetime per distinct ts (a polling group shares one). A `Chunk`'s
    columns are zipped as they are (`Chunk.params`), with no TagValue made per
    row; other sequences are read row by row (faster for them than making a
    chunk first).
    """
    if isinstance(rows, Chunk):
        return list(rows.params(naive_utc))
    out: list[tuple[object, ...]] = []
    last_us: int | None = None
    last_dt = _EPOCH
    for tag, ts_us, value, quality in rows:
        if ts_us != last_us:
            last_us, last_dt = ts_us, naive_utc(ts_us)
        out.append((tag, last_dt, value, quality))
    return out

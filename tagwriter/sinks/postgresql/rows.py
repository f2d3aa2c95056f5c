"""Rows as binary COPY sends them: timestamps in PostgreSQL's epoch, and the rows it could never store refused first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tagwriter.errors import RowError
from tagwriter.models import TagValue

#: 2000-01-01T00:00:00Z (PostgreSQL's timestamp epoch) in Unix-epoch microseconds.
PG_EPOCH_US = 946_684_800_000_000
#: timestamptz range (4713 BC .. 294276 AD) in Unix-epoch microseconds; end exclusive.
TS_MIN_US = -211_813_488_000_000_000 + PG_EPOCH_US
TS_END_US = 9_223_371_331_200_000_000 + PG_EPOCH_US
INT8_END = 2**63  # int8 holds -INT8_END .. INT8_END - 1


def stage_rows(
    rows: Sequence[TagValue], quality_bound: int = INT8_END
) -> tuple[list[tuple[Any, ...]], list[int] | None, list[RowError]]:
    """COPY tuples `(tag, ts, value, quality)`, their indexes in the batch, and the rows refused.

    The indexes are None when no row was refused (then they are 0..n-1).
    Refused here: what PostgreSQL cannot store at all and would fail the whole
    COPY (NUL or unencodable text, a timestamp outside timestamptz's range, a
    non-number), and a quality outside the column's range (binary COPY would
    wrap it around instead of failing).
    """
    staged: list[tuple[Any, ...]] = []
    rejected: list[RowError] = []
    q_min = -quality_bound
    for pos, (tag, ts_us, value, quality) in enumerate(rows):
        if (
            type(tag) is str and type(ts_us) is int and type(quality) is int
            and (value is None or type(value) is float)
            and TS_MIN_US <= ts_us < TS_END_US and q_min <= quality < quality_bound
            and (tag.isascii() and "\x00" not in tag)
        ):
            staged.append((tag, ts_us - PG_EPOCH_US, value, quality))
            continue
        error = _row_problem(pos, tag, ts_us, value, quality, quality_bound)
        if error is None:  # a non-ASCII tag, an int value, ...: fine after all
            staged.append((tag, ts_us - PG_EPOCH_US, None if value is None else float(value), quality))
        else:
            rejected.append(error)
    if not rejected:
        return staged, None, rejected
    refused = {e.index for e in rejected}
    return staged, [i for i in range(len(rows)) if i not in refused], rejected


def _row_problem(pos: int, tag: Any, ts_us: Any, value: Any, quality: Any, quality_bound: int) -> RowError | None:
    if not isinstance(tag, str):
        return RowError(pos, "22P02", f"tag_name is not text: {tag!r}")
    if "\x00" in tag:
        return RowError(pos, "22021", "tag_name contains a NUL character")
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError as exc:
        return RowError(pos, "22021", f"tag_name is not valid UTF-8 text: {exc.reason}")
    if not isinstance(ts_us, int) or isinstance(ts_us, bool):
        return RowError(pos, "22P02", f"timestamp is not integer microseconds: {ts_us!r}")
    if not TS_MIN_US <= ts_us < TS_END_US:
        return RowError(pos, "22008", "timestamp out of range for timestamptz")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return RowError(pos, "22P02", f"value is not a number: {value!r}")
    if isinstance(value, int) and not -(2**1023) < value < 2**1023:
        return RowError(pos, "22003", "value out of range for double precision")
    if not isinstance(quality, int) or isinstance(quality, bool):
        return RowError(pos, "22P02", f"quality is not an integer: {quality!r}")
    if not -quality_bound <= quality < quality_bound:
        return RowError(pos, "22003", f"quality {quality} out of range for the quality column")
    return None

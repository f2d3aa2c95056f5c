"""Models: TagValue / PollingData rows, timestamp text round trip, memory per buffered value."""

from __future__ import annotations

import gc
import math
import random
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tagwriter.buffer import RingBuffer
from tagwriter.models import (
    GOOD_QUALITY,
    Chunk,
    PollingData,
    TagValue,
    checked_rows,
    format_ts,
    from_epoch_us,
    known_tag_names,
    parse_ts,
    to_epoch_us,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us_of(dt: datetime) -> int:
    """Epoch microseconds computed independently of the module under test."""
    return (dt - EPOCH) // timedelta(microseconds=1)


# -- TagValue ----------------------------------------------------------------


def test_tagvalue_at_datetime_naive_is_utc_and_aware_is_converted() -> None:
    naive = datetime(2024, 3, 1, 12, 30, 15, 123456)
    aware = datetime(2024, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    a = TagValue.at("line1.temp", naive, 21.5)
    b = TagValue.at("line1.temp", aware, 21.5)
    assert a.ts_us == b.ts_us == us_of(naive.replace(tzinfo=UTC))
    assert a.ts == datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    assert a.ts.tzinfo is not None and a.ts.utcoffset() == timedelta(0)
    assert a.quality == GOOD_QUALITY


def test_tagvalue_at_epoch_seconds_value_and_quality_types() -> None:
    row = TagValue.at("t", 1_700_000_000.25, 3, quality=0)
    assert row.ts_us == 1_700_000_000_250_000
    assert row.value == 3.0 and type(row.value) is float
    assert row.quality == 0 and type(row.quality) is int
    assert TagValue.at("t", 0, None).value is None
    assert TagValue.at("t", 1, 1.0).ts_us == 1_000_000  # int seconds


def test_tagvalue_is_a_compact_tuple() -> None:
    row = TagValue("t", 5, 1.0, 192)
    assert tuple(row) == ("t", 5, 1.0, 192)
    assert not hasattr(row, "__dict__")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, 1.7e12, -1e12])
def test_to_epoch_us_rejects_non_timestamps(bad: float) -> None:
    # 1.7e12 is epoch *milliseconds* passed as seconds: year ~55,000, unformattable
    with pytest.raises(ValueError):
        to_epoch_us(bad)


# -- PollingData -------------------------------------------------------------


def test_pollingdata_expands_into_one_row_per_tag() -> None:
    ts = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    pd = PollingData("line1", ts, {"a": 1.5, "b": None, "c": 7}, quality=64)
    rows = list(pd.rows())
    assert len(pd) == 3
    assert [r.tag for r in rows] == ["a", "b", "c"]
    assert [r.value for r in rows] == [1.5, None, 7.0]
    assert all(type(r.value) is float for r in rows if r.value is not None)
    assert {r.ts_us for r in rows} == {us_of(ts)}
    assert {r.quality for r in rows} == {64}
    # one timestamp object for the whole group (the memory budget relies on it)
    assert rows[0].ts_us is rows[1].ts_us is rows[2].ts_us


def test_pollingdata_epoch_ts_default_quality_and_empty_group() -> None:
    pd = PollingData("g", 10.5, {"x": 1.0})
    assert list(pd.rows()) == [TagValue("x", 10_500_000, 1.0, GOOD_QUALITY)]
    assert list(PollingData("g", 10.5).rows()) == []
    assert len(PollingData("g", 10.5)) == 0


def test_pollingdata_bad_timestamp_raises() -> None:
    with pytest.raises(ValueError):
        list(PollingData("g", math.nan, {"x": 1.0}).rows())


# -- timestamp text ------------------------------------------------------------

EDGE_DATETIMES = [
    datetime(1, 1, 1, tzinfo=UTC),  # .NET DateTime.MinValue
    datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1000, 1, 1, tzinfo=UTC),
    datetime(1601, 1, 1, tzinfo=UTC),  # Windows FILETIME zero (OPC)
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # -1 µs
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(2000, 2, 29, 12, 0, 0, 500000, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, 0, tzinfo=UTC),  # past 32-bit time_t
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("dt", EDGE_DATETIMES, ids=lambda d: d.isoformat())
def test_format_parse_round_trip_edges(dt: datetime) -> None:
    us = to_epoch_us(dt)
    assert us == us_of(dt)
    text = format_ts(us)
    assert len(text) == 27 and text.endswith("Z")
    assert text == (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f".{dt.microsecond:06d}Z"
    )
    assert datetime.fromisoformat(text) == dt
    assert parse_ts(text) == us
    assert from_epoch_us(us) == dt


def test_format_parse_round_trip_random_microseconds() -> None:
    rnd = random.Random(1234)
    lo, hi = us_of(datetime(1, 1, 1, tzinfo=UTC)), us_of(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    values = [rnd.randint(lo, hi) for _ in range(5000)]
    texts = [format_ts(v) for v in values]
    assert [parse_ts(t) for t in texts] == values
    # fixed width: text order is time order (the SQLite key relies on it)
    assert {len(t) for t in texts} == {27}
    assert sorted(texts) == [format_ts(v) for v in sorted(values)]


def test_parse_ts_accepts_offsets_naive_and_epoch_seconds() -> None:
    assert parse_ts("2024-01-01T02:00:00.000001+02:00") == us_of(datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC))
    assert parse_ts("2024-01-01T00:00:00") == us_of(datetime(2024, 1, 1, tzinfo=UTC))
    assert parse_ts("  2024-01-01T00:00:00.5Z \n") == us_of(datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC))
    assert parse_ts("1700000000.5") == 1_700_000_000_500_000
    assert parse_ts("0") == 0


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "yesterday", "nan", "inf", "1e400", "2024-13-01T00:00:00", "2024-02-30T00:00:00",
     "2024-01-01T25:00:00", "-5", "12:30", "1700000000000"],
)
def test_parse_ts_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ts(bad)


# -- memory per buffered value -----------------------------------------------

BUDGET_BYTES_PER_VALUE = 80  # issue 17 (issue 2 asked <= 130)


def test_memory_per_buffered_value_is_under_budget() -> None:
    """100,000 values in polling groups of 100 tags, held by a RingBuffer (tracemalloc).

    Tag names exist before (they are the source's tag list); timestamps and
    float values are made inside the measured region, as a collector makes them.
    """
    n_groups, per_group = 1000, 100
    tags = [f"plant.area{i // 10}.tag{i:03d}" for i in range(per_group)]
    buf = RingBuffer(capacity=n_groups * per_group)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for g in range(n_groups):
            pd = PollingData("g", 1_700_000_000.0 + g * 0.5, {t: g + i / 7.0 for i, t in enumerate(tags)})
            buf.put_many(pd.chunk())  # as Pipeline.submit puts a group
            del pd
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(buf) == n_groups * per_group
    per_value = used / len(buf)
    assert per_value <= BUDGET_BYTES_PER_VALUE, f"{per_value:.1f} B per buffered value"
    # the measurement really saw the values: four list slots (32 B) and a float (24 B) each
    assert per_value > 50, f"{per_value:.1f} B per value: the measurement missed the values"


# -- Chunk: rows column by column ----------------------------------------------


def _rows(n: int, start: int = 0) -> list[TagValue]:
    return [TagValue(f"t{i}", 1_700_000_000_000_000 + (i // 3), None if i % 5 == 0 else i / 4, 192 - i % 2)
            for i in range(start, start + n)]


def test_chunk_is_a_sequence_of_the_rows_it_was_made_of() -> None:
    rows = _rows(10)
    chunk = Chunk.of(rows)
    assert len(chunk) == 10
    assert list(chunk) == rows and chunk == rows and rows == chunk
    assert chunk[3] == rows[3] and type(chunk[3]) is TagValue and chunk[-1] == rows[-1]
    assert chunk[2:7] == rows[2:7] and isinstance(chunk[2:7], Chunk)
    assert chunk != rows[:9] and chunk != [*rows[:9], rows[0]]
    assert list(reversed(chunk)) == rows[::-1]
    assert chunk + rows[:2] == [*rows, *rows[:2]] and rows[:2] + chunk == [*rows[:2], *rows]
    assert Chunk.of(chunk) is chunk and Chunk.of([]) == [] and not Chunk.of([])


def test_chunk_join_keeps_the_order_and_returns_a_lone_chunk_as_it_is() -> None:
    parts = [Chunk.of(_rows(4)), Chunk.of(_rows(0)), Chunk.of(_rows(3, 4))]
    assert Chunk.join(parts) == _rows(7)
    assert Chunk.join(parts[:1]) is parts[0]


def test_chunk_params_format_each_distinct_stamp_once() -> None:
    calls: list[int] = []

    def fmt(ts_us: int) -> str:
        calls.append(ts_us)
        return f"ts{ts_us}"

    rows = _rows(9)  # three distinct stamps
    assert list(Chunk.of(rows).params(fmt)) == [(r.tag, f"ts{r.ts_us}", r.value, r.quality) for r in rows]
    assert sorted(calls) == sorted({r.ts_us for r in rows})
    calls.clear()
    group = PollingData("g", 1_700_000_000.5, {f"t{i}": i for i in range(50)}).chunk()
    assert len(list(group.params(fmt))) == 50 and len(calls) == 1


def _expand(runs: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> list[int]:
    return [stamp for stamp, count in runs for _ in range(count)]


def test_chunk_runs_follow_joins_and_cuts_and_give_the_stamp_column() -> None:
    """Groups joined, then cut anywhere (as the buffer's drain does): the runs always expand to the stamps,
    and `stamp_column` with or without them is each stamp's value, made once per distinct stamp."""
    rnd = random.Random(17)
    calls: list[int] = []

    def fmt(ts_us: int) -> str:
        calls.append(ts_us)
        return f"ts{ts_us}"

    for _ in range(300):
        groups = [PollingData("g", 1_700_000_000 + rnd.choice([0, 1, 2, 0.5]),
                              {f"t{i}": float(i) for i in range(rnd.randint(0, 6))}).chunk()
                  for _ in range(rnd.randint(1, 6))]
        joined = Chunk.join(groups)
        a = rnd.randint(-3, len(joined) + 3)
        b = rnd.randint(-3, len(joined) + 3)
        for chunk in (joined, joined[a:b], joined[a:], joined[:b]):
            assert chunk.runs is not None and _expand(chunk.runs) == list(chunk.stamps)
            calls.clear()
            assert chunk.stamp_column(fmt) == [f"ts{s}" for s in chunk.stamps]
            assert sorted(calls) == sorted(set(chunk.stamps))
            plain = Chunk(list(chunk.tags), list(chunk.stamps), list(chunk.values), list(chunk.qualities))
            assert plain.runs is None and plain.stamp_column(fmt) == [f"ts{s}" for s in chunk.stamps]
    assert joined[::2].runs is None  # a stepped slice keeps no runs
    zero = Chunk(["a"], [5], [1.0], [192], ((9, 0), (5, 1), (7, 0)))  # empty runs (an empty group's) are skipped
    assert zero.stamp_column(str) == ["5"]
    assert Chunk.join([groups[0], Chunk.of(list(groups[0]))]).runs is None  # one part without: unknown


def test_pollingdata_chunk_is_its_rows_with_one_timestamp_and_quality() -> None:
    pd = PollingData("g", 1_700_000_000.25, {"a": 1, "b": None, "c": 2.5, "d": True}, 3)
    chunk = pd.chunk()
    assert chunk == list(pd.rows())
    assert [type(v) for v in chunk.values] == [float, type(None), float, float]
    assert len({id(s) for s in chunk.stamps}) == 1  # one shared timestamp object


@pytest.mark.parametrize("bad", [
    PollingData("g", float("nan"), {"a": 1.0}),
    PollingData("g", 1.0, {"a": 1.0}, quality=2**63),
    PollingData("g", 1.0, {"a": 10**400}),
])
def test_pollingdata_chunk_refuses_what_rows_refuses(bad: PollingData) -> None:
    with pytest.raises(ValueError) as from_rows:
        list(bad.rows())
    with pytest.raises(ValueError) as from_chunk:
        bad.chunk()
    assert str(from_chunk.value) == str(from_rows.value)


def test_checked_rows_of_a_chunk_checks_its_columns() -> None:
    chunk = Chunk.of(_rows(5))
    assert checked_rows(chunk) is chunk
    with_int = Chunk(["a", "b"], [1, 2], [1.0, 7], [192, 192])
    fixed = checked_rows(with_int)
    assert isinstance(fixed, Chunk) and fixed.values == [1.0, 7.0] and type(fixed.values[1]) is float
    with pytest.raises(ValueError, match="not text"):
        checked_rows(Chunk(["a", 5], [1, 2], [1.0, 2.0], [192, 192]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="ts_us"):
        checked_rows(Chunk(["a"], [1.5], [1.0], [192]))  # type: ignore[list-item]


def test_known_tag_names_checks_a_list_once_and_shares_one_tuple() -> None:
    first = tuple(f"known.{i}" for i in range(5))
    again = tuple(f"known.{i}" for i in range(5))  # equal, another object
    assert first is not again
    assert known_tag_names(first) is first
    assert known_tag_names(again) is first
    bad = ("known.ok", "known\nbad")
    for _ in range(2):  # a refused list is refused every time, never remembered as good
        with pytest.raises(ValueError, match="line break"):
            known_tag_names(bad)

"""The same tests for every sink (tests/sink_factories.py): what the writer relies on from any database."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from sink_factories import SINKS, Opened, SinkCase

from tagwriter.models import TagValue

T0 = 1_700_000_000_123_456  # 2023-11-14T22:13:20.123456Z


@pytest.fixture(params=sorted(SINKS))
def case(request: pytest.FixtureRequest) -> SinkCase:
    c = SINKS[request.param]
    reason = c.unavailable()
    if reason:
        pytest.skip(f"{c.name}: {reason}")
    return c


@pytest.fixture
def opened(case: SinkCase, tmp_path: Path) -> Iterator[Opened]:
    with case.open(tmp_path) as pair:
        yield pair


def test_insert_and_read_back(opened: Opened) -> None:
    sink, read = opened
    rows = [TagValue(f"line1.t{i}", T0, i * 1.5, 192) for i in range(5)]
    result = sink.write_batch(rows)
    assert (result.written, result.duplicates, result.rejected) == (5, 0, [])
    assert read() == sorted(rows)


def test_duplicates_are_counted_not_failed(opened: Opened) -> None:
    sink, read = opened
    rows = [TagValue("a", T0, 1.0), TagValue("b", T0, 2.0)]
    sink.write_batch(rows)
    again = sink.write_batch([*rows, TagValue("c", T0, 3.0)])
    assert (again.written, again.duplicates, again.rejected) == (1, 2, [])
    in_batch = sink.write_batch([TagValue("d", T0, 4.0), TagValue("d", T0, 5.0)])
    assert (in_batch.written, in_batch.duplicates) == (1, 1)
    stored = read()
    assert [r.tag for r in stored] == ["a", "b", "c", "d"]
    assert stored[0].value == 1.0 and stored[3].value == 4.0  # the first write wins


def test_a_rejected_row_does_not_block_the_batch(case: SinkCase, opened: Opened) -> None:
    if case.bad_row is None:
        pytest.skip(f"{case.name} accepts every row tagwriter can build")
    sink, read = opened
    good = [TagValue("ok1", T0, 1.0), TagValue("ok2", T0, 2.0)]
    result = sink.write_batch([good[0], case.bad_row, good[1]])
    assert result.written == 2 and result.duplicates == 0
    assert [e.index for e in result.rejected] == [1]
    assert result.rejected[0].code and result.rejected[0].message
    assert read() == good


def test_types_round_trip(case: SinkCase, opened: Opened) -> None:
    sink, read = opened
    rows = [
        TagValue("Kessel-3/Temperatur °C", T0, 21.123456789012345, 192),
        TagValue("big", T0, 1.7976931348623157e308, 0),
        TagValue("tiny", T0, 5e-324, min(65535, case.quality_max)),
        TagValue("neg", T0, -0.1, 24),
        TagValue("x" * 128, T0, 0.0, 192),
    ]
    assert sink.write_batch(rows).written == 5
    assert read() == sorted(rows)


def test_null_value(opened: Opened) -> None:
    sink, read = opened
    sink.write_batch([TagValue("bad-quality", T0, None, 0)])
    assert read() == [TagValue("bad-quality", T0, None, 0)]


def test_microsecond_timestamps_are_kept_and_distinct(opened: Opened) -> None:
    sink, read = opened
    stamps = [0, T0 - 1, T0, T0 + 1, T0 + 999_999 - 123_456, 4_102_444_800_000_001]  # 1970 .. 2100
    rows = [TagValue("t", ts, float(i)) for i, ts in enumerate(stamps)]
    assert sink.write_batch(rows).written == len(stamps)
    assert [r.ts_us for r in read()] == sorted(stamps)


def test_empty_batch(opened: Opened) -> None:
    sink, read = opened
    result = sink.write_batch([])
    assert (result.written, result.duplicates, result.rejected) == (0, 0, [])
    assert read() == []


def test_nan(case: SinkCase, opened: Opened) -> None:
    sink, read = opened
    result = sink.write_batch([TagValue("nan", T0, math.nan)])
    (row,) = read()
    if case.nan == "nan":
        assert result.written == 1 and row.value is not None and math.isnan(row.value)
    else:
        assert case.nan == "null" and result.written == 1 and row.value is None


def test_admin_view_of_a_fresh_table(opened: Opened) -> None:
    sink, read = opened
    assert sink.reach()
    sink.login()
    assert sink.server_version()
    info = sink.inspect_table()
    assert info is not None and sink.table_differences(info) == []
    sink.try_insert()
    assert read() == []  # the probe row was rolled back
    sink.ping()
    sink.probe()

"""jsonl and csv sources: parsing, line numbers, bounded chunks, and feeding a real pipeline."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from waits import wait_until

from tagwriter.config import load
from tagwriter.errors import InputError
from tagwriter.models import TagValue, parse_ts
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sources.files import MAX_LINE_BYTES, BadLineLog, Chunk, FeedResult, LineSource, feed
from tagwriter.sources.simulate import Simulator


def chunks_of(kind: str, data: bytes, **kw: int) -> list[Chunk]:
    return list(LineSource(kind, "in.txt", stream=io.BufferedReader(io.BytesIO(data)), **kw).chunks())


def rows_and_bad(kind: str, data: bytes) -> tuple[list[TagValue], list[InputError]]:
    chunks = chunks_of(kind, data)
    return [r for c in chunks for r in c.rows], [b for c in chunks for b in c.bad]


# -- jsonl ---------------------------------------------------------------------


def test_jsonl_iso_epoch_null_and_quality() -> None:
    data = (
        b'{"tag": "a", "ts": "2024-05-01T12:00:00.5Z", "value": 1.5, "quality": 0}\n'
        b'{"tag": "b", "ts": 1714564800.25, "value": null}\n'
        b'{"tag": "c", "ts": "1714564800", "value": 7}\n'
    )
    rows, bad = rows_and_bad("jsonl", data)
    assert bad == []
    assert rows == [
        TagValue("a", parse_ts("2024-05-01T12:00:00.5+00:00"), 1.5, 0),
        TagValue("b", 1714564800_250000, None, 192),
        TagValue("c", 1714564800_000000, 7.0, 192),
    ]


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"tag": "a", "ts": 1, "value": 1', "not JSON"),
    (b'[1, 2, 3]', "not a JSON object"),
    (b'{"ts": 1, "value": 1}', "missing 'tag'"),
    (b'{"tag": "a", "value": 1}', "missing 'ts'"),
    (b'{"tag": "a", "ts": 1}', "missing 'value'"),
    (b'{"tag": "", "ts": 1, "value": 1}', "tag must be a non-empty string"),
    (b'{"tag": 5, "ts": 1, "value": 1}', "tag must be a non-empty string"),
    (b'{"tag": "a\\nb", "ts": 1, "value": 1}', "contains a line break"),
    (b'{"tag": "a", "ts": "noon", "value": 1}', "ts 'noon' is not ISO-8601"),
    (b'{"tag": "a", "ts": true, "value": 1}', "ts must be ISO-8601 text or epoch seconds"),
    (b'{"tag": "a", "ts": 1, "value": "high"}', "value must be a number or null"),
    (b'{"tag": "a", "ts": 1, "value": true}', "value must be a number or null"),
    (b'{"tag": "a", "ts": 1, "value": NaN}', "not finite"),
    (b'{"tag": "a", "ts": 1, "value": 1, "quality": 70000}', "quality must be an integer"),
    (b'{"tag": "a", "ts": 1, "value": 1, "quality": 1.5}', "quality must be an integer"),
    (b'\xff\xfe{"tag"}', "not UTF-8"),
])
def test_jsonl_malformed_line_reported_with_line_number(line: bytes, reason: str) -> None:
    data = b'{"tag": "ok", "ts": 1, "value": 1}\n' + line + b'\n{"tag": "ok2", "ts": 2, "value": 2}\n'
    rows, bad = rows_and_bad("jsonl", data)
    assert [r.tag for r in rows] == ["ok", "ok2"]
    assert len(bad) == 1
    assert bad[0].location == "in.txt:2"
    assert reason in bad[0].reason
    assert bad[0].raw  # the line itself is kept for the quarantine file


def test_line_numbers_count_blank_lines_crlf_and_a_last_line_without_newline() -> None:
    data = b'\n{"tag": "a", "ts": 1, "value": 1}\r\n\r\nnot json\r\n{"tag": "b", "ts": 2, "value": 2}'
    rows, bad = rows_and_bad("jsonl", data)
    assert [r.tag for r in rows] == ["a", "b"]
    assert [b.location for b in bad] == ["in.txt:4"]


def test_an_oversized_line_is_one_bad_line_and_reading_goes_on() -> None:
    good = b'{"tag": "%s", "ts": 1, "value": 1}\n'
    data = good % b"a" + b"x" * (MAX_LINE_BYTES + 10) + b"\n" + good % b"b" + b"y" * (3 * MAX_LINE_BYTES) + b"\n"
    rows, bad = rows_and_bad("jsonl", data + good % b"c")
    assert [r.tag for r in rows] == ["a", "b", "c"]
    reason = f"line longer than {MAX_LINE_BYTES} bytes"
    assert [(b.location, b.reason) for b in bad] == [("in.txt:2", reason), ("in.txt:4", reason)]


# -- csv -----------------------------------------------------------------------


def test_csv_with_header_in_any_order_tag_name_alias_and_optional_quality() -> None:
    data = (
        b"ts,value,tag_name,quality\n"
        b"2024-05-01T12:00:00Z,1.5,a,0\n"
        b"1714564800,,b,\n"
        b'1714564801,2,"c,with comma",192\n'
    )
    rows, bad = rows_and_bad("csv", data)
    assert bad == []
    assert rows == [
        TagValue("a", parse_ts("2024-05-01T12:00:00Z"), 1.5, 0),
        TagValue("b", 1714564800_000000, None, 192),
        TagValue("c,with comma", 1714564801_000000, 2.0, 192),
    ]


def test_csv_without_quality_column() -> None:
    rows, bad = rows_and_bad("csv", b"tag,ts,value\na,1,2\n")
    assert rows == [TagValue("a", 1_000_000, 2.0, 192)] and bad == []


@pytest.mark.parametrize(("line", "reason"), [
    (b"a,1", "expected at least 3 columns"),
    (b"a,yesterday,1", "ts 'yesterday' is not ISO-8601"),
    (b"a,1,high", "value 'high' is not a number"),
    (b"a,1,inf", "not finite"),
    (b"a,1,1,good", "quality 'good' is not an integer"),
    (b",1,1", "tag must be a non-empty string"),
])
def test_csv_malformed_line(line: bytes, reason: str) -> None:
    rows, bad = rows_and_bad("csv", b"tag,ts,value,quality\nok,1,1\n" + line + b"\nok2,2,2\n")
    assert [r.tag for r in rows] == ["ok", "ok2"]
    assert len(bad) == 1 and bad[0].location == "in.txt:3" and reason in bad[0].reason


def test_csv_without_a_usable_header_stops_the_source() -> None:
    with pytest.raises(InputError, match=r"in.txt:1: csv header 'a,1,2' lacks tag, ts, value"):
        chunks_of("csv", b"a,1,2\nb,2,3\n")


# -- chunks and streaming -------------------------------------------------------


def test_chunks_are_bounded() -> None:
    data = b"".join(b'{"tag": "t%d", "ts": %d, "value": 1}\n' % (i, i) for i in range(2000))
    chunks = chunks_of("jsonl", data, chunk_rows=300)
    assert sum(len(c.rows) for c in chunks) == 2000
    assert max(len(c.rows) for c in chunks) <= 300
    assert [r.ts_us for c in chunks for r in c.rows] == [i * 1_000_000 for i in range(2000)]


def test_lines_trickling_through_a_pipe_are_not_held_back() -> None:
    """A slow producer's lines come out as soon as they arrive, not when a chunk is full."""
    read_fd, write_fd = os.pipe()
    got: list[Chunk] = []
    arrived = threading.Event()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb", buffering=0) as writer:
        source = LineSource("jsonl", "pipe", stream=reader, chunk_rows=500)

        def consume() -> None:
            for chunk in source.chunks():
                got.append(chunk)
                arrived.set()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        writer.write(b'{"tag": "a", "ts": 1, "value": 1}\n{"tag": "b", "ts": 2, "value": 2}\n')
        assert arrived.wait(5.0), "two lines waited for a full chunk"
        assert [r.tag for r in got[0].rows] == ["a", "b"]
    thread.join(5.0)
    assert not thread.is_alive()


def test_a_missing_input_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such input file"):
        list(LineSource("jsonl", str(tmp_path / "nope.jsonl")).chunks())


def test_stop_ends_reading_after_the_current_block() -> None:
    stop = threading.Event()
    stop.set()
    data = b'{"tag": "a", "ts": 1, "value": 1}\n' * 10
    assert list(LineSource("jsonl", "x", stream=io.BytesIO(data)).chunks(stop)) == []


# -- bad-line logging is rate-limited --------------------------------------------


def test_bad_line_log_first_few_then_summaries(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = BadLineLog(first=3, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tagwriter.sources.files"):
        for i in range(10_000):
            now[0] = i * 0.001  # 10,000 bad lines within 10 s
            log.add(InputError(f"in:{i + 1}", "not JSON"))
        log.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) <= 3 + 1 + 2  # the first three, the notice, at most two summaries
    assert "in:1: not JSON" in messages[0]
    assert any("more malformed input lines" in m and "in:10000" in m for m in messages)
    assert log.count == 10_000


# -- feeding a real pipeline -----------------------------------------------------


def make_pipeline(tmp_path: Path) -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "writer.flush_interval": 0.05,
    })
    return Pipeline(config)


def quarantined_lines(tmp_path: Path) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted((tmp_path / "backup" / "quarantine").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            out.extend(csv.DictReader(f))
    return out


def test_feed_writes_good_lines_and_quarantines_bad_ones(tmp_path: Path) -> None:
    lines, bad_numbers = [], []
    for i in range(1, 3001):
        if i % 97 == 0:
            lines.append('{"tag": "broken", "ts": ')
            bad_numbers.append(i)
        elif i % 311 == 0:
            lines.append(json.dumps({"tag": "t", "ts": "not a time", "value": 1}))
            bad_numbers.append(i)
        else:
            lines.append(json.dumps({"tag": f"t{i % 50}", "ts": 1_700_000_000 + i, "value": i / 2}))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")

    pipeline = make_pipeline(tmp_path).start()
    result = feed(LineSource("jsonl", str(path)), pipeline, threading.Event())
    assert pipeline.stop(10.0)

    good = 3000 - len(bad_numbers)
    assert result == FeedResult(rows=good, bad=len(bad_numbers), ended=True)
    snap = pipeline.snapshot()
    assert snap.submitted == snap.written == good
    assert snap.bad_input == len(bad_numbers)
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("SELECT count(*) FROM tag_values").fetchone()[0] == good
    kept = quarantined_lines(tmp_path)
    assert [row["source"] for row in kept] == [f"{path}:{n}" for n in bad_numbers]
    assert all(row["error_code"] == "BAD_LINE" and row["error_message"] for row in kept)
    assert kept[0]["raw"] == '{"tag": "broken", "ts": '


def test_feed_reports_an_unreadable_csv_and_submits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("name,when\nx,1\n")
    pipeline = make_pipeline(tmp_path).start()
    result = feed(LineSource("csv", str(path)), pipeline, threading.Event())
    pipeline.stop(5.0)
    assert result.error is not None and f"{path}:1" in str(result.error)
    assert result.rows == 0 and not result.ended


# -- byte order mark, back-pressure ----------------------------------------------


@pytest.mark.parametrize(("kind", "data"), [
    ("csv", b"\xef\xbb\xbftag,ts,value\r\na,1714564800,1.5\r\n"),
    ("jsonl", b'\xef\xbb\xbf{"tag": "a", "ts": 1714564800, "value": 1.5}\n'),
])
def test_a_utf8_byte_order_mark_on_line_1_is_ignored(kind: str, data: bytes) -> None:
    rows, bad = rows_and_bad(kind, data)
    assert bad == []
    assert [(r.tag, r.value) for r in rows] == [("a", 1.5)]


def test_a_byte_order_mark_later_in_the_file_is_not_stripped() -> None:
    line = b'{"tag": "a", "ts": 1, "value": 1}\n'
    rows, bad = rows_and_bad("jsonl", line + b"\xef\xbb\xbf" + line)
    assert [r.tag for r in rows] == ["a"]
    assert [b.location for b in bad] == ["in.txt:2"]


def slow_pipeline(tmp_path: Path, *, capacity: int, policy: str = "drop-oldest") -> tuple[Pipeline, MemorySink]:
    """A pipeline whose sink (in memory) takes a millisecond per batch: far slower than parsing."""
    config = load(None, env={}, overrides={
        "buffer.capacity": capacity, "buffer.overflow_policy": policy,
        "writer.batch_size": 10, "writer.flush_interval": 0.01,
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
    })
    sink = MemorySink()
    sink.delay = 0.001
    return Pipeline(config, sink=sink), sink


@pytest.mark.parametrize("policy", ["drop-oldest", "spill"])
def test_feed_waits_for_room_so_a_file_larger_than_the_buffer_loses_nothing(tmp_path: Path, policy: str) -> None:
    n = 3000  # 30 times the capacity, in chunks of 500 (each larger than the buffer)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"tag": f"t{i % 7}", "ts": 1_700_000_000 + i, "value": i}) + "\n"
                            for i in range(n)))
    pipeline, sink = slow_pipeline(tmp_path, capacity=100, policy=policy)
    pipeline.start()
    result = feed(LineSource("jsonl", str(path)), pipeline, threading.Event())
    assert pipeline.stop(10.0)
    snap = pipeline.snapshot()
    assert result.rows == n and result.ended
    assert (snap.submitted, snap.written, snap.dropped, snap.spooled) == (n, n, 0, 0)
    assert len(sink.rows) == n
    assert pipeline._buffer.overflowed == 0


def test_feed_waiting_for_room_ends_when_stop_is_set_and_spools_the_chunk_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"tag": "t", "ts": 1_700_000_000 + i, "value": i}) + "\n"
                            for i in range(1000)))
    pipeline, sink = slow_pipeline(tmp_path, capacity=50)
    sink.block()  # the database hangs: the buffer fills and stays full
    pipeline.start()
    stop = threading.Event()
    result = FeedResult()
    feeder = threading.Thread(target=feed, args=(LineSource("jsonl", str(path)), pipeline, stop, result))
    feeder.start()
    try:
        assert sink.blocked.wait(5.0)
        # The writer holds one batch of 10 in the hung write; the feed's next slice of 50 does not fit.
        wait_until(lambda: pipeline.snapshot().buffer_size == 40, "the feed to fill the buffer", 5.0)
        held = pipeline.snapshot()
        assert feeder.is_alive() and not pipeline.wait_for_room(50, timeout=0.2)  # waiting for room, not dropping
        assert held.dropped == 0 and held.submitted == result.rows < 1000
        stop.set()
        feeder.join(5.0)
        assert not feeder.is_alive()
        assert not result.ended
    finally:
        stop.set()
        sink.release()
        pipeline.stop(5.0)
    s = pipeline.snapshot()
    # The chunk read off the input while waiting is spooled, not lost: every row read is accounted for.
    assert result.rows > held.submitted and s.spooled >= result.rows - held.submitted
    assert s.submitted == result.rows == s.accounted and s.dropped == 0


# -- the simulator -------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["sine", "random", "random-walk", "constant"])
def test_the_same_seed_gives_the_same_values_whenever_the_run_starts(shape: str) -> None:
    """`--seed` repeats a run: the default `sine` shape once followed the wall clock, so it did not."""

    def values(seed: int, start: float) -> list[dict[str, float]]:
        sim = Simulator(3, 4, 1.0, value_shape=shape, seed=seed)
        return [poll.values for poll in sim.polls(start, count=30)]

    first = values(7, 1_700_000_000.0)
    assert first == values(7, 1_700_003_725.5)  # an hour and a bit later
    assert first != values(8, 1_700_000_000.0)

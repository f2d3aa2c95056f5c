"""The JetStream sink (an edge gateway's database.url = nats://...) against the real nats-server on 127.0.0.1:4222.

Each test makes its own stream and deletes it. What the sink published is read
back from the stream by sequence (`Broker.messages`) and decoded as a writer
decodes it, so "stored once" is counted on the server, not taken from the
sink's word. Faults go through `FaultProxy` between the sink and the server.
"""

from __future__ import annotations

import math
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy, Feeder
from nats_util import NATS, Broker, key_counts, nats_answers, needs_nats, open_broker, temp_stream
from waits import wait_until

from tagwriter.batchformat import FORMAT, decode_batch, encode_batch, message_id
from tagwriter.config import DatabaseConfig, load, parse_url
from tagwriter.errors import ConfigError, FatalError, TransientError
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks import create_sink
from tagwriter.sinks.jetstream import (
    FORMAT_HEADER,
    MISSING_EXTRA,
    MSG_ID_HEADER,
    JetStreamSink,
    subject_matches,
)
from tagwriter.sources.jetstream import DECODERS, decode_message

T0_US = 1_700_000_000_000_000


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from open_broker()


def rows_of(n: int, *, tags: int = 50, start: int = 0, prefix: str = "edge1") -> list[TagValue]:
    """`n` rows: polls of `tags` tags 1 ms apart, values k + j / 1000."""
    return [TagValue(f"{prefix}.t{i % tags:03d}", T0_US + (start + i // tags) * 1000, (start + i // tags) + i % tags
                     / 1000, 192) for i in range(n)]


def exact(rows: list[TagValue]) -> list[tuple[str, int, bytes | None, int]]:
    """Rows with each value as its 8 bytes: NaN equals NaN, -0.0 differs from 0.0."""
    return [(r.tag, r.ts_us, None if r.value is None else struct.pack("<d", r.value), r.quality) for r in rows]


def sink_for(stream: str, port: int = NATS[1], **kw: Any) -> JetStreamSink:
    kw.setdefault("connect_timeout", 1.0)
    kw.setdefault("call_timeout", 2.0)
    return JetStreamSink(servers=[f"nats://127.0.0.1:{port}"], stream=stream, subject=f"{stream}.edge1", **kw)


# -- the URL, the format (no server needed) ---------------------------------------------


def test_a_nats_url_names_the_servers_the_stream_and_the_subject() -> None:
    url = parse_url("nats://10.0.0.5:4222,10.0.0.6,nats3:4223/PLANT/plant.edge1")
    assert (url.kind, url.name, url.subject) == ("jetstream", "PLANT", "plant.edge1")
    assert url.servers == ("nats://10.0.0.5:4222", "nats://10.0.0.6:4222", "nats://nats3:4223")
    assert (url.host, url.port) == ("10.0.0.5", 4222)
    tls = parse_url("tls://edge:p@ss/w@nats.plant:4443/PLANT")
    assert (tls.servers, tls.subject, tls.user, tls.password) == (("tls://nats.plant:4443",), "PLANT.batches",
                                                                 "edge", "p@ss/w")


@pytest.mark.parametrize(("url", "message"), [
    ("nats://127.0.0.1:4222", "the stream name '' must be a name"),
    ("nats://127.0.0.1:4222/A.B", "the stream name 'A.B' must be a name"),
    ("nats://127.0.0.1:4222/A/a.*", "'a.*' is not a subject to publish on"),
    ("nats://127.0.0.1:4222/A/a..b", "'a..b' is not a subject to publish on"),
    ("nats://127.0.0.1:x/A", "bad port in '127.0.0.1:x'"),
    ("nats:///A", "names no NATS server"),
])
def test_a_bad_nats_url_says_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_url(url)
    assert message in str(caught.value)


def test_the_password_of_a_nats_url_stays_out_of_describe_and_errors() -> None:
    sink = create_sink(DatabaseConfig(url="nats://edge:s3cret-pw@127.0.0.1:4222/PLANT/plant.edge1"))
    assert isinstance(sink, JetStreamSink)
    assert sink.describe() == "nats://edge@127.0.0.1:4222/PLANT/plant.edge1"
    assert "s3cret-pw" not in repr(sink.session.login)


def test_a_batch_comes_back_exactly_none_nan_and_all() -> None:
    rows = rows_of(500)
    rows[3] = rows[3]._replace(value=None)
    rows[4] = rows[4]._replace(value=math.nan, quality=-(2**63))
    rows[5] = rows[5]._replace(tag="Ofen 3/Zone ü", value=-0.0, quality=2**63 - 1)
    payload, _ = encode_batch(rows)
    assert exact(decode_batch(payload)) == exact(rows)
    assert exact(decode_message(payload, {FORMAT_HEADER: FORMAT})) == exact(rows)  # what a writer's source reads
    assert DECODERS[FORMAT] is decode_batch
    assert len(payload) < 15 * len(rows)  # compact: ~9 bytes a value here, against ~44 undeflated


def test_the_message_id_is_the_batch_content() -> None:
    rows = rows_of(100)
    assert message_id(rows) == encode_batch(rows)[1] == message_id(list(rows))
    assert message_id(rows) != message_id(rows[:-1])
    assert message_id(rows) != message_id([*rows[:-1], rows[-1]._replace(value=0.5)])


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: p[:3], "shorter than its header"),
    (lambda p: struct.pack("<I", 0) + p[4:], "says it holds 0 values"),
    (lambda p: struct.pack("<I", 11) + p[4:], "does not hold 11 values"),
    (lambda p: p[:-6], "cut short"),
    (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "not a deflated record"),  # Adler-32 catches the flipped bit
    (lambda p: p + b"x", "1 bytes after the record"),
    (lambda p: p[:4] + b"not zlib at all", "not a deflated record"),
    (lambda p: struct.pack("<I", 10) + zlib.compress(b"\0" * (65 * 2**20), 9), "inflates beyond 64 MiB"),
])
def test_a_damaged_batch_is_refused_with_the_reason(damage: Any, reason: str) -> None:
    payload, _ = encode_batch(rows_of(10))
    with pytest.raises(ValueError) as caught:
        decode_message(damage(payload), {FORMAT_HEADER: FORMAT})
    assert reason in str(caught.value)


def test_a_batch_with_a_tag_no_database_can_hold_is_refused_whole() -> None:
    from tagwriter.queueformat import encode_chunk

    bad = [TagValue("ok", T0_US, 1.0, 192), TagValue("nul\x00tag", T0_US, 2.0, 192)]
    payload = struct.pack("<I", 2) + zlib.compress(encode_chunk(bad))
    with pytest.raises(ValueError, match="control character"):
        decode_batch(payload)


def test_subject_wildcards_match_as_nats_matches_them() -> None:
    assert subject_matches("plant.>", "plant.edge1") and subject_matches("plant.>", "plant.a.b")
    assert not subject_matches("plant.>", "plant") and not subject_matches("plant.*", "plant.a.b")
    assert subject_matches("plant.*.x", "plant.a.x") and subject_matches("PLANT", "PLANT")
    assert not subject_matches("plant.a", "plant.b") and subject_matches(">", "anything.at.all")


def test_without_nats_py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(ConfigError, match=re.escape(MISSING_EXTRA)):
        create_sink(DatabaseConfig(url="nats://127.0.0.1:4222/PLANT"))


# -- against the real server -------------------------------------------------------------


@needs_nats
def test_a_batch_is_one_message_written_once_acked(broker: Broker) -> None:
    with temp_stream(broker) as stream:
        sink = sink_for(stream)
        try:
            sink.open()
            rows = rows_of(500)
            assert sink.write_batch(rows).written == 500
            assert sink.write_batch([]).written == 0
        finally:
            sink.close()
        [msg] = broker.messages(stream)
        assert msg.subject == f"{stream}.edge1"
        assert msg.headers[FORMAT_HEADER] == FORMAT and msg.headers[MSG_ID_HEADER] == message_id(rows)
        assert decode_message(msg.data, msg.headers) == rows


@needs_nats
def test_the_same_batch_twice_is_stored_once_and_counted_as_duplicates(broker: Broker) -> None:
    with temp_stream(broker) as stream:
        sink = sink_for(stream)
        try:
            rows = rows_of(300)
            first, again = sink.write_batch(rows), sink.write_batch(rows)
            other = sink.write_batch(rows_of(300, start=1000))
        finally:
            sink.close()
        assert (first.written, first.duplicates) == (300, 0)
        assert (again.written, again.duplicates) == (0, 300)  # JetStream's PubAck said duplicate
        assert other.written == 300
        assert broker.info(stream).state.messages == 2
        assert max(key_counts(broker.rows(stream)).values()) == 1


@needs_nats
def test_a_lost_puback_retried_by_the_writer_is_stored_once(tmp_path: Path, broker: Broker) -> None:
    """The message reaches the stream but its PubAck comes too late: the write fails, the writer retries
    with the same message id, JetStream answers `duplicate`, the values count as duplicates, stored once."""
    with temp_stream(broker) as stream, FaultProxy(NATS) as proxy:
        pipeline = edge_pipeline(tmp_path, stream, proxy.port, **{
            "database.call_timeout": 0.4, "writer.retry_delays": [1.5]})
        pipeline.start()
        try:
            wait_until(lambda: pipeline.snapshot().state == "writing", "the sink open", 10)
            proxy.latency(0.3)  # each way: the publish lands after 0.3 s, its PubAck after 0.6 s > 0.4 s
            rows = rows_of(200)
            pipeline.submit(rows)  # one submit: one batch
            wait_until(lambda: pipeline.snapshot().retries >= 1, "the write to fail and be retried", 10)
            wait_until(lambda: broker.info(stream).state.messages == 1, "the late message stored", 10)
            proxy.pass_through()
            assert pipeline.flush(10)
            snap = pipeline.snapshot()
        finally:
            pipeline.stop(5)
        assert (snap.submitted, snap.written, snap.duplicates, snap.spooled) == (200, 0, 200, 0)
        assert broker.info(stream).state.messages == 1
        assert broker.rows(stream) == rows


@needs_nats
def test_a_batch_too_large_for_one_message_goes_as_several_each_acked(broker: Broker) -> None:
    with temp_stream(broker, max_msg_size=4096) as stream:
        sink = sink_for(stream)
        try:
            rows = rows_of(5000, tags=5000)  # distinct tag names: ~10 bytes a value deflated, > 4 kB
            result = sink.write_batch(rows)
        finally:
            sink.close()
        assert (result.written, result.duplicates, result.rejected) == (5000, 0, [])
        messages = broker.messages(stream)
        assert len(messages) > 10 and all(len(m.data) <= 4096 for m in messages)
        assert sorted(broker.rows(stream)) == sorted(rows)


@needs_nats
def test_no_stream_or_a_subject_the_stream_does_not_take_is_fatal_with_a_hint(broker: Broker) -> None:
    with temp_stream(broker) as stream:
        missing = sink_for(f"{stream}_none")
        foreign = JetStreamSink(servers=["nats://127.0.0.1:4222"], stream=stream, subject="elsewhere.edge1")
        try:
            with pytest.raises(FatalError) as caught:
                missing.open()
            assert caught.value.code == "STREAM_MISSING" and "tagwriter init-db" in caught.value.hint
            with pytest.raises(FatalError, match=f"does not take subject elsewhere.edge1 .its subjects: {stream}"):
                foreign.open()
        finally:
            missing.close()
            foreign.close()


@needs_nats
def test_a_full_stream_refuses_the_batch_as_transient(broker: Broker) -> None:
    with temp_stream(broker, max_msgs=1, discard=api_discard_new()) as stream:
        sink = sink_for(stream)
        try:
            sink.write_batch(rows_of(10))
            with pytest.raises(TransientError) as caught:
                sink.write_batch(rows_of(10, start=100))
        finally:
            sink.close()
        assert caught.value.code == "JS-10077" and "maximum messages exceeded" in caught.value.message


def api_discard_new() -> Any:
    from nats.js import api

    return api.DiscardPolicy.NEW


@needs_nats
def test_a_silent_server_never_holds_a_write_past_the_call_timeout(broker: Broker) -> None:
    with temp_stream(broker) as stream, FaultProxy(NATS) as proxy:
        sink = sink_for(stream, proxy.port, call_timeout=1.0)
        try:
            sink.open()
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(TransientError):
                sink.write_batch(rows_of(100))
            took = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(TransientError):
                sink.probe()
            probe_took = time.monotonic() - started
        finally:
            proxy.pass_through()
            sink.close()
        bound = 1.0 * 1 + 1.0 + 1.0  # connect_timeout per server + call_timeout + margins
        assert took < bound and probe_took < bound


def edge_pipeline(tmp_path: Path, stream: str, port: int, **overrides: Any) -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"nats://127.0.0.1:{port}/{stream}/{stream}.edge1",
        "database.connect_timeout": 1.0, "database.call_timeout": 2.0,
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "writer.flush_interval": 0.05, "writer.retry_delays": [0.2, 0.2],
        "writer.probe_interval": 0.2, "writer.probe_max_interval": 0.5, "writer.shutdown_timeout": 3.0,
        **overrides,
    })
    return Pipeline(config)


@needs_nats
def test_an_outage_spools_then_drains_and_the_stream_holds_every_value_once(tmp_path: Path, broker: Broker) -> None:
    with temp_stream(broker) as stream, FaultProxy(NATS) as proxy:
        pipeline = edge_pipeline(tmp_path, stream, proxy.port).start()
        feeder = Feeder(pipeline, tags=50, prefix="edge1")
        try:
            feeder.submit_many(20)
            assert pipeline.flush(10)
            before = broker.info(stream).state.messages
            proxy.refuse()  # the link goes: connections reset, new ones refused
            feeder.submit_many(40)
            wait_until(lambda: pipeline.in_outage, "outage mode", 15)
            wait_until(lambda: pipeline.snapshot().spooled == 2000, "the outage's values spooled", 15)
            assert broker.info(stream).state.messages == before
            proxy.pass_through()
            wait_until(lambda: (s := pipeline.snapshot()).backlog_rows == 0 and s.extra.get("replayed") == 2000
                       and not pipeline.in_outage, "recovery and the spool drained", 30)
            feeder.submit_many(10)
            assert pipeline.flush(10)
            snap = pipeline.snapshot()
        finally:
            pipeline.stop(5)
        assert (snap.submitted, snap.written, snap.spooled, snap.duplicates) == (3500, 1500, 2000, 0)
        counts = key_counts(broker.rows(stream))
        assert set(counts) == set(feeder.values) and set(counts.values()) == {1}  # exactly once in the stream


@needs_nats
def test_an_edge_started_while_jetstream_is_unreachable_spools_then_forwards(tmp_path: Path, broker: Broker) -> None:
    with temp_stream(broker) as stream, FaultProxy(NATS) as proxy:
        proxy.refuse()
        pipeline = edge_pipeline(tmp_path, stream, proxy.port).start()
        feeder = Feeder(pipeline, tags=50, prefix="edge1")
        try:
            feeder.submit_many(20)
            wait_until(lambda: pipeline.snapshot().spooled == 1000, "the values spooled while unreachable", 15)
            proxy.pass_through()
            wait_until(lambda: pipeline.snapshot().extra.get("replayed") == 1000, "the spool drained", 30)
            loops = [t for t in threading.enumerate() if t.name == "tagwriter-edge-loop"]
        finally:
            pipeline.stop(5)
        assert len(loops) == 1  # one loop thread, whatever the failed connects before
        assert key_counts(broker.rows(stream)) == key_counts([TagValue(t, ts, v) for (t, ts), v in
                                                              feeder.values.items()])
        assert not [t for t in threading.enumerate() if t.name == "tagwriter-edge-loop"]  # closed with the sink


@needs_nats
def test_published_batches_reach_a_writer_through_the_jetstream_source(tmp_path: Path, broker: Broker) -> None:
    """Edge sink -> stream -> the JetStream source of a writer -> SQLite: the same rows, once."""
    import sqlite3

    from tagwriter.config import JetStreamConfig
    from tagwriter.sources.jetstream import JetStreamSource

    with temp_stream(broker, retention=work_queue()) as stream:
        sink = sink_for(stream)
        try:
            sent = [rows_of(500, start=k * 10) for k in range(20)]
            for batch in sent:
                sink.write_batch(batch)
        finally:
            sink.close()
        db = tmp_path / "central.sqlite"
        writer = Pipeline(load(None, env={}, overrides={
            "database.url": f"sqlite:///{db}", "backup.directory": str(tmp_path / "wb"),
            "backup.quarantine_directory": str(tmp_path / "wb" / "q"), "writer.flush_interval": 0.05}))
        writer.start()
        source = JetStreamSource(JetStreamConfig(stream=stream, durable="writers", fetch_batch=4),
                                 writer_batch_size=500)
        stop = threading.Event()
        thread = threading.Thread(target=source.run, args=(writer, stop), daemon=True)
        thread.start()

        def rows_in_table() -> int:
            if not db.exists():
                return 0
            with sqlite3.connect(db) as conn:
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tag_values'").fetchone():
                    return 0  # the writer has not made it yet
                return int(conn.execute("SELECT count(*) FROM tag_values").fetchone()[0])
        try:
            wait_until(lambda: rows_in_table() == 10_000, "every value in the central table", 30)
            wait_until(lambda: broker.info(stream).state.messages == 0, "the work queue emptied by acks", 10)
        finally:
            stop.set()
            thread.join(10)
            writer.stop(5)
        snap = writer.snapshot()
        assert (snap.written, snap.duplicates, snap.quarantined) == (10_000, 0, 0)
        assert source.status().messages == 20 and source.status().bad_messages == 0


def work_queue() -> Any:
    from nats.js import api

    return api.RetentionPolicy.WORK_QUEUE


@pytest.fixture
def server_with_login(tmp_path: Path) -> Iterator[int]:
    """A nats-server (JetStream on) that takes user edge / password s3cret-pw only; its port."""
    import subprocess

    from nats_cluster import nats_server_binary
    from procs import free_port

    binary = nats_server_binary()
    if binary is None:
        pytest.skip("the nats-server binary is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "store"),
                             "--user", "edge", "--pass", "s3cret-pw"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: nats_answers(("127.0.0.1", port)), "the server to listen", 10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_refused_login_is_fatal_at_once_and_the_password_never_shows(server_with_login: int,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    url = f"nats://edge:wrong-password@127.0.0.1:{server_with_login}/PLANT/PLANT.edge1"
    refused = create_sink(DatabaseConfig(url=url, connect_timeout=5.0))
    started = time.monotonic()
    try:
        with pytest.raises(FatalError) as caught:
            refused.open()
    finally:
        refused.close()
    assert caught.value.code == "AUTH" and "refused the authorisation" in caught.value.message
    assert time.monotonic() - started < 5.0  # the refusal ends the connect, not the timeout
    right = create_sink(DatabaseConfig(url=f"nats://edge@127.0.0.1:{server_with_login}/PLANT/PLANT.edge1",
                                       password="s3cret-pw"))
    try:
        with pytest.raises(FatalError) as missing:
            right.open()  # logged in: the next thing it finds is that there is no stream yet
    finally:
        right.close()
    assert missing.value.code == "STREAM_MISSING"
    assert "wrong-password" not in caught.value.message + caplog.text
    assert "s3cret-pw" not in missing.value.message + caplog.text

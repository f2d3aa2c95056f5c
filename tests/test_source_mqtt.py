"""The MQTT source against the real Mosquitto (127.0.0.1:1883), into a real SQLite file.

Each test uses its own topic prefix and client ids. Values are published by a
separate paho client; the source runs on a thread as the service runs it.
Ack-after-settle is shown from the broker's side: what the source settled is
not sent again to the next session with the same client id, and what it held
unsettled is (with DUP set). TLS and passwords run against a private
Mosquitto the test starts with a certificate it makes (openssl).
"""

from __future__ import annotations

import csv
import getpass
import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from faultproxy import FaultProxy
from procs import free_port
from test_pipeline import make_config
from waits import wait_until

from tagwriter.errors import ConfigError
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.mqtt import JsonDecoder, MqttConfig, MqttConnection, MqttSource, TopicTemplate

BROKER = ("127.0.0.1", 1883)
STOP_DEADLINE = 1.5  # seconds run() may take to return after stop (the service joins it for 1 s)
T0 = 1_714_564_800  # 2024-05-01T12:00:00Z


def _broker_answers() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


needs_broker = pytest.mark.skipif(not _broker_answers(), reason="no MQTT broker on 127.0.0.1:1883")


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A topic prefix and client id stem of this test alone."""
    return f"twtest-{uuid.uuid4().hex[:10]}"


def settings(prefix: str, protocol: str = "v5", **kw: Any) -> MqttConfig:
    base = MqttConfig(topics=[f"{prefix}/#"], client_id=f"{prefix}-src", protocol=protocol, session_expiry=120,
                      reconnect_min_delay=0.1, reconnect_max_delay=0.5, stop_timeout=5.0)
    return replace(base, **kw)


@contextmanager
def publisher(port: int = BROKER[1]) -> Iterator[Callable[[str, bytes | str], None]]:
    """A separate paho client; `publish(topic, payload)` returns once the broker has the message (QoS 1)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"twpub-{uuid.uuid4().hex[:8]}")
    client.connect(BROKER[0], port)
    client.loop_start()

    def publish(topic: str, payload: bytes | str) -> None:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published(), topic

    try:
        yield publish
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def running(source: MqttConnection, pipeline: Pipeline) -> Iterator[MqttConnection]:
    """`source.run` on a thread until the block ends; then it must return within STOP_DEADLINE."""
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(pipeline, stop), daemon=True)
    thread.start()
    try:
        wait_until(lambda: source.connected, "the source connected", 10)
        yield source
    finally:
        stop.set()
        started = time.monotonic()
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - started < STOP_DEADLINE
    wait_until(lambda: source.status().detail == "disconnected", "the session closed", 10)


def rows_in(db: Path) -> list[tuple[str, str, float | None, int]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tag_values'").fetchone():
            return []
        return conn.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY ts").fetchall()


def value_msg(i: int) -> str:
    return json.dumps({"value": i, "ts": T0 + i})


def publish_values(publish: Callable[[str, bytes | str], None], prefix: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        publish(f"{prefix}/line1/t{i % 7}", value_msg(i))


def values_of(db: Path) -> list[float | None]:
    return sorted(r[2] for r in rows_in(db))


@pytest.fixture
def forget_sessions() -> Iterator[list[str]]:
    """Client ids appended here have their broker session removed at teardown (clean start, expiry 0)."""
    ids: list[str] = []
    yield ids
    if not _broker_answers():
        return
    for cid in ids:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.connect(*BROKER, clean_start=True)
        c.loop_start()
        c.disconnect()
        c.loop_stop()


# -- settings and the missing extra --------------------------------------------


def test_missing_paho_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)  # `import paho.mqtt.client` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install '\.\[mqtt\]'"):
        MqttSource(MqttConfig())


@pytest.mark.parametrize(("changes", "message"), [
    ({"topics": []}, "at least one topic"),
    ({"topics": ["a/#/b"]}, "not a valid topic filter"),
    ({"topics": ["a/b+"]}, "not a valid topic filter"),
    ({"tag": "{topic}.{name}"}, "unknown placeholder"),
    ({"tag": ""}, "template is empty"),
    ({"password": "s3cret-pw"}, "without mqtt.username"),
    ({"tls": True, "key_file": "k.pem"}, "without mqtt.cert_file"),
    ({"tls": True, "ca_file": "/nonexistent/ca.pem"}, "TLS files cannot be used"),
])
def test_bad_settings_are_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        MqttSource(replace(MqttConfig(), **changes))
    assert "s3cret-pw" not in str(info.value)


# -- the JSON mapping rules ------------------------------------------------------


NOW = 1_700_000_000.5


def decode(payload: str | bytes, topic: str = "plant/line1/temp", **kw: Any) -> list[TagValue]:
    return JsonDecoder(replace(MqttConfig(), **kw), clock=lambda: NOW)(topic, payload.encode()
                                                                      if isinstance(payload, str) else payload)


NOW_US = 1_700_000_000_500_000
TAG = "plant/line1/temp"


@pytest.mark.parametrize(("payload", "kw", "rows"), [
    # 5: a bare number, true/false or null
    ("21.5", {}, [(TAG, NOW_US, 21.5, 192)]),
    ("true", {}, [(TAG, NOW_US, 1.0, 192)]),
    # 3: an object holding the value; ts ISO or epoch in ts_unit; quality
    ('{"value": 1, "ts": "2024-05-01T12:00:00.25Z", "quality": 0}', {}, [(TAG, T0 * 10**6 + 250_000, 1.0, 0)]),
    ('{"value": null, "ts": 1714564800.5}', {}, [(TAG, T0 * 10**6 + 500_000, None, 192)]),
    ('{"value": 2, "ts": 1714564800123}', {"ts_unit": "ms"}, [(TAG, T0 * 10**6 + 123_000, 2.0, 192)]),
    ('{"value": 2, "ts": 1714564800123456}', {"ts_unit": "us"}, [(TAG, T0 * 10**6 + 123_456, 2.0, 192)]),
    ('{"value": 3}', {}, [(TAG, NOW_US, 3.0, 192)]),
    ('{"d": {"v": 4, "t": 1714564800}, "name": "x.y"}',
     {"value_path": "d.v", "ts_path": "d.t", "tag_path": "name"}, [("x.y", T0 * 10**6, 4.0, 192)]),
    # 2: an array of objects
    ('[{"value": 1, "ts": 1714564800}, {"value": 2, "ts": 1714564801}]', {},
     [(TAG, T0 * 10**6, 1.0, 192), (TAG, (T0 + 1) * 10**6, 2.0, 192)]),
    # 4: an object of tag -> value, sharing ts and quality
    ('{"ts": 1714564800, "quality": 64, "temp": 21, "on": false}', {"tag": "{topic_dots}", "key_separator": "."},
     [("plant.line1.temp.temp", T0 * 10**6, 21.0, 64), ("plant.line1.temp.on", T0 * 10**6, 0.0, 64)]),
    # 1: the whole payload is the value
    ("7", {"value_path": "", "tag": "{2}.{-1}"}, [("line1.temp", NOW_US, 7.0, 192)]),
])
def test_mapping_rules(payload: str, kw: dict[str, Any], rows: list[tuple[str, int, float | None, int]]) -> None:
    assert decode(payload, **kw) == [TagValue(*r) for r in rows]


@pytest.mark.parametrize(("payload", "kw", "why"), [
    ("{not json", {}, "not JSON"),
    (b"\xff\xfe", {}, "not UTF-8"),
    ('"text"', {}, "must be a number"),
    ('{"value": "21.5"}', {}, "value must be a number"),
    ('{"value": 1, "ts": "yesterday"}', {}, "not ISO-8601"),
    ('{"value": 1, "ts": 1714564800123}', {}, "epoch seconds"),  # milliseconds read as seconds: year 56000
    ('{"value": 1, "quality": 1.5}', {}, "quality must be an integer"),
    ('{"value": 1e999}', {}, "not finite"),
    ('{"temp": 1, "unit": "C"}', {}, "member 'unit' must be a number"),
    ('{"ts": 1714564800}', {}, "no 'value' and no other members"),
    ("[]", {}, "empty array"),
    ("[1, 2]", {}, "array item 0 is not an object"),
    ('{"value": 1}', {"tag_path": "name"}, "tag 'name' must be a non-empty string"),
    ("1", {"tag": "{5}"}, "has no level 5"),
    ('{"value": 1}', {"value_path": ""}, "the payload must be a number"),
])
def test_mapping_refuses_with_a_reason(payload: str | bytes, kw: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode(payload, **kw)


def test_topic_template_levels() -> None:
    assert TopicTemplate("{topic_dots}|{1}|{-1}|{topic}").format("a/b/c") == "a.b.c|a|c|a/b/c"
    assert TopicTemplate("fixed").format("a/b") == "fixed"


# -- against Mosquitto -------------------------------------------------------------


@needs_broker
@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_n_messages_are_n_rows_once_and_acked(
    tmp_path: Path, prefix: str, protocol: str, forget_sessions: list[str]
) -> None:
    n = 300
    s = settings(prefix, protocol)
    forget_sessions.append(s.client_id)
    with Pipeline(make_config(tmp_path)) as p:
        source = MqttSource(s)
        with running(source, p), publisher() as publish:
            publish_values(publish, prefix, 0, n)
            wait_until(lambda: len(rows_in(tmp_path / "tags.db")) == n, f"{n} rows", 20)
            wait_until(lambda: source.status().acks_pending == 0, "every message acknowledged", 10)
        st = source.status()
        assert (st.messages, st.values, st.redeliveries, st.bad_messages, st.reconnects) == (n, n, 0, 0, 0)
        assert st.kind == "mqtt" and st.endpoint == "mqtt://127.0.0.1:1883" and not st.connected
        # The broker was told: the next session with this client id gets only what is new.
        again = MqttSource(s)
        with running(again, p), publisher() as publish:
            publish(f"{prefix}/sentinel", json.dumps({"value": -1, "ts": T0}))
            wait_until(lambda: again.status().values == 1, "the sentinel", 10)
        assert again.status().messages == 1 and again.status().redeliveries == 0
    assert values_of(tmp_path / "tags.db") == [-1.0] + [float(i) for i in range(n)]
    assert p.snapshot().written == n + 1


@needs_broker
def test_bad_messages_are_quarantined_with_topic_and_raw_payload(
    tmp_path: Path, prefix: str, forget_sessions: list[str]
) -> None:
    s = settings(prefix)
    forget_sessions.append(s.client_id)
    with Pipeline(make_config(tmp_path)) as p:
        source = MqttSource(s)
        with running(source, p), publisher() as publish:
            publish(f"{prefix}/a", value_msg(1))
            publish(f"{prefix}/bad", b'{"value": 1,\xff')
            publish(f"{prefix}/word", '{"value": "on"}')
            publish(f"{prefix}/a", value_msg(2))
            wait_until(lambda: source.status().messages == 4 and source.status().acks_pending == 0, "all acked", 10)
        assert source.status().bad_messages == 2
    assert values_of(tmp_path / "tags.db") == [1.0, 2.0]
    kept = []
    for path in sorted((tmp_path / "backup" / "quarantine").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            kept += [list(r) for r in csv.reader(f)]
    text = "\n".join(",".join(r) for r in kept)
    assert f"mqtt {prefix}/bad" in text and '{"value": 1,\\xff' in text and "not JSON" in text
    assert f"mqtt {prefix}/word" in text and "value must be a number" in text


@needs_broker
def test_unsettled_messages_are_not_acked_and_come_again(
    tmp_path: Path, prefix: str, forget_sessions: list[str]
) -> None:
    n = 50
    s = settings(prefix, stop_timeout=0.0)
    forget_sessions.append(s.client_id)
    held = MemorySink(inner=SqliteSink(tmp_path / "held.db"))
    held.block()  # the writer waits: nothing settles
    p1 = Pipeline(make_config(tmp_path, writer={"shutdown_timeout": 0.2}), sink=held).start()
    try:
        source = MqttSource(s)
        with running(source, p1), publisher() as publish:
            publish_values(publish, prefix, 0, n)
            wait_until(lambda: source.status().messages == n, f"{n} messages received", 10)
            assert source.status().acks_pending == n  # received, handed over, not settled: not acknowledged
        p1.stop()  # spools what it held; the session is already closed: still no PUBACK
    finally:
        held.release()
    with Pipeline(make_config(tmp_path / "second")) as p2:
        again = MqttSource(s)
        with running(again, p2):
            wait_until(lambda: len(rows_in(tmp_path / "second" / "tags.db")) == n, "the redelivered rows", 20)
            wait_until(lambda: again.status().acks_pending == 0, "the redeliveries acknowledged", 10)
        assert again.status().redeliveries == n  # MQTT DUP: the broker kept every unacknowledged message
    assert values_of(tmp_path / "second" / "tags.db") == [float(i) for i in range(n)]


@needs_broker
@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_messages_published_while_stopped_arrive_after_restart(
    tmp_path: Path, prefix: str, protocol: str, forget_sessions: list[str]
) -> None:
    n = 200
    s = settings(prefix, protocol)
    forget_sessions.append(s.client_id)
    with Pipeline(make_config(tmp_path)) as p:
        with running(MqttSource(s), p):  # the first run makes the session and its subscription
            pass
        with publisher() as publish:  # nobody is connected with this client id now
            publish_values(publish, prefix, 0, n)
        source = MqttSource(s)
        with running(source, p):
            assert "session resumed" in source.status().detail
            wait_until(lambda: len(rows_in(tmp_path / "tags.db")) == n, f"{n} rows queued while away", 20)
            wait_until(lambda: source.status().acks_pending == 0, "all acked", 10)
    assert values_of(tmp_path / "tags.db") == [float(i) for i in range(n)]


@needs_broker
@pytest.mark.slow
def test_thirty_seconds_away_from_the_broker_loses_nothing(
    tmp_path: Path, prefix: str, forget_sessions: list[str]
) -> None:
    s = settings(prefix, reconnect_max_delay=1.0)
    forget_sessions.append(s.client_id)
    with FaultProxy(BROKER) as proxy, Pipeline(make_config(tmp_path)) as p:
        source = MqttSource(replace(s, port=proxy.port))
        with running(source, p), publisher() as publish:
            publish_values(publish, prefix, 0, 100)
            wait_until(lambda: len(rows_in(tmp_path / "tags.db")) == 100, "the rows before", 10)
            proxy.reset()  # RST the session; every reconnect attempt is RST too
            wait_until(lambda: not source.status().connected, "the loss noticed", 10)
            publish_values(publish, prefix, 100, 100)  # straight to the broker: queued in the session
            away_until = time.monotonic() + 30
            while time.monotonic() < away_until:  # the fault lasts 30 s; the source says so throughout
                assert not source.status().connected
                time.sleep(0.5)
            assert "lost the connection" in source.status().detail or "cannot connect" in source.status().detail
            proxy.pass_through()
            wait_until(lambda: source.status().connected, "reconnected", 10)
            wait_until(lambda: len(rows_in(tmp_path / "tags.db")) == 200, "every row after", 20)
            wait_until(lambda: source.status().acks_pending == 0, "all acked", 10)
        st = source.status()
        assert st.reconnects >= 1 and st.messages >= 200
    assert values_of(tmp_path / "tags.db") == [float(i) for i in range(200)]


def test_stop_is_prompt_while_the_broker_cannot_be_reached(tmp_path: Path) -> None:
    source = MqttSource(replace(MqttConfig(), port=free_port(), client_id="tw-unreachable", connect_timeout=2.0,
                                reconnect_min_delay=0.2))
    stop = threading.Event()
    with Pipeline(make_config(tmp_path)) as p:
        thread = threading.Thread(target=source.run, args=(p, stop), daemon=True)
        thread.start()
        wait_until(lambda: "cannot connect" in source.status().detail, "a failed attempt", 10)
        assert not source.status().connected
        stop.set()
        started = time.monotonic()
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - started < STOP_DEADLINE


@needs_broker
def test_publish_goes_out_through_the_same_session(
    tmp_path: Path, prefix: str, forget_sessions: list[str]
) -> None:
    s = settings(prefix)
    forget_sessions.append(s.client_id)
    got: list[bytes] = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-listen")
    listener.on_message = lambda c, u, m: got.append(m.payload)
    listener.connect(*BROKER)
    listener.subscribe("twcmd/" + prefix, qos=1)
    listener.loop_start()
    try:
        source = MqttSource(s)
        assert source.publish("twcmd/" + prefix, b"early") is False  # not connected yet: nothing queued
        with Pipeline(make_config(tmp_path)) as p, running(source, p):
            assert source.publish("twcmd/" + prefix, b"rebirth", qos=1) is True
            wait_until(lambda: got == [b"rebirth"], "the published message", 10)
    finally:
        listener.disconnect()
        listener.loop_stop()


@needs_broker
def test_a_decoder_of_its_own_with_hooks(tmp_path: Path, prefix: str, forget_sessions: list[str]) -> None:
    """The layer the Sparkplug source builds on: rows, no rows and refusals from any decoder; hooks."""
    s = settings(prefix)
    forget_sessions.append(s.client_id)
    sessions: list[bool] = []

    def decoder(topic: str, payload: bytes) -> list[TagValue]:
        if topic.endswith("/state"):
            return []  # a message without values: acknowledged, nothing written
        if payload == b"?":
            raise ValueError("a question")
        return [TagValue(topic, T0 * 10**6, float(payload), 192)]

    conn = MqttConnection(s, decoder, kind="custom", on_connect=sessions.append)
    with Pipeline(make_config(tmp_path)) as p:
        with running(conn, p), publisher() as publish:
            publish(f"{prefix}/state", b"online")
            publish(f"{prefix}/v", b"?")
            publish(f"{prefix}/v", b"2.5")
            wait_until(lambda: conn.status().messages == 3 and conn.status().acks_pending == 0, "all acked", 10)
        st = conn.status()
    assert sessions == [False] and (st.kind, st.values, st.bad_messages) == ("custom", 1, 1)
    assert rows_in(tmp_path / "tags.db") == [(f"{prefix}/v", "2024-05-01T12:00:00.000000Z", 2.5, 192)]


# -- TLS and passwords, against a private Mosquitto --------------------------------


PASSWORD = "Secr3t-mqtt-pw"


def _make_certs(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=tagwriter test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A Mosquitto with TLS and a password file on a free port: (port, its folder with ca.pem)."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists() or not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto, mosquitto_passwd or openssl is not installed")
    d = tmp_path_factory.mktemp("tls-broker")
    _make_certs(d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "tagwriter", PASSWORD],
                   check=True, capture_output=True, timeout=30)
    port = free_port()
    (d / "mosquitto.conf").write_text(
        f"user {getpass.getuser()}\n"  # as root Mosquitto would switch to 'mosquitto', who cannot read tmp_path
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {d / 'passwd'}\n"
        f"cafile {d / 'ca.pem'}\ncertfile {d / 'server.pem'}\nkeyfile {d / 'server.key'}\npersistence false\n"
    )
    proc = subprocess.Popen([mosquitto, "-c", str(d / "mosquitto.conf")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
                return False

        wait_until(listening, "the TLS broker listening", 10)
        yield port, d
    finally:
        proc.terminate()
        proc.wait(10)


def test_tls_with_a_password(
    tmp_path: Path, prefix: str, tls_broker: tuple[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    port, d = tls_broker
    caplog.set_level(logging.DEBUG)
    s = settings(prefix, port=port, tls=True, ca_file=str(d / "ca.pem"), username="tagwriter", password=PASSWORD,
                 persistent_session=False)
    with Pipeline(make_config(tmp_path)) as p:
        source = MqttSource(s)
        assert source.status().endpoint == f"mqtts://127.0.0.1:{port}"
        with running(source, p):
            sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-pub")
            sender.username_pw_set("tagwriter", PASSWORD)
            sender.tls_set(ca_certs=str(d / "ca.pem"))
            sender.connect("127.0.0.1", port)
            sender.loop_start()
            sender.publish(f"{prefix}/x", value_msg(5), qos=1).wait_for_publish(5)
            sender.disconnect()
            sender.loop_stop()
            wait_until(lambda: values_of(tmp_path / "tags.db") == [5.0], "the value over TLS", 10)
        refused = MqttSource(replace(s, client_id=f"{prefix}-wrong", password=PASSWORD + "-wrong"))
        stop = threading.Event()
        thread = threading.Thread(target=refused.run, args=(p, stop), daemon=True)
        thread.start()
        try:
            wait_until(lambda: "refused" in refused.status().detail, "the refusal", 10)
            assert not refused.status().connected
        finally:
            stop.set()
            thread.join(5)
    shown = caplog.text + repr(refused.status()) + repr(source.status())
    assert PASSWORD not in shown


def test_tls_checks_the_broker_certificate(tmp_path: Path, prefix: str, tls_broker: tuple[int, Path]) -> None:
    port, _folder = tls_broker
    source = MqttSource(settings(prefix, port=port, tls=True, username="tagwriter", password=PASSWORD,
                                 persistent_session=False))  # the system's CAs: the test CA is unknown
    stop = threading.Event()
    with Pipeline(make_config(tmp_path)) as p:
        thread = threading.Thread(target=source.run, args=(p, stop), daemon=True)
        thread.start()
        try:
            wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in source.status().detail, "a refused certificate", 10)
            assert not source.status().connected
        finally:
            stop.set()
            thread.join(5)


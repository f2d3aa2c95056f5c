"""The MQTT source: `MqttConnection` (one broker session feeding an Intake) and the JSON mapping.

The connection does everything that is MQTT: connect (TLS, username/password), a persistent
session, subscribe at QoS 1, PUBACK only once the values are settled, reconnect, counters. What a
payload means is a *decoder*, `(topic, payload) -> rows`, raising ValueError for a bad payload:
`JsonDecoder` (the `[mqtt]` source, `MqttSource`) is one, Sparkplug B (sources/sparkplug*.py) another.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tagwriter import redact
from tagwriter.config import MqttConfig
from tagwriter.errors import ConfigError, InputError, PipelineStopped
from tagwriter.intake import BadInput, Intake
from tagwriter.models import GOOD_QUALITY, TagValue, check_tag_names, parse_ts, short_repr, to_epoch_us
from tagwriter.settle import SETTLED, Receipt
from tagwriter.sources.base import SourceStatus
from tagwriter.sources.files import BadLineLog
from tagwriter.spoolformat import visible

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

#: `(topic, payload) -> rows`; ValueError: the message is quarantined. Either way (also no rows) it is acked.
Decoder = Callable[[str, bytes], Sequence[TagValue]]


class MqttConnection:
    """One MQTT session whose messages go, through `decoder`, into an Intake; PUBACK only after settle.

    Threads: paho's network thread runs the `on_connect` / `on_disconnect` hooks (keep them short); `run`'s
    thread calls `decoder` and submits; a settling tagwriter thread queues the acks; `publish` from any
    thread. Reads only the connection keys of `settings` (`BrokerSettings`). Runs once per instance.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        decoder: Decoder,
        *,
        topics: Sequence[str] | None = None,  # default: settings.topics
        kind: str = "mqtt",  # SourceStatus.kind, and the prefix of quarantine `where` ("mqtt plant/x")
        on_connect: Callable[[bool], None] | None = None,  # after each CONNACK + SUBSCRIBE; arg: session_present
        on_disconnect: Callable[[], None] | None = None,  # after each lost/ended connection, before a retry
    ) -> None:
        self._init(settings, decoder, list(settings.topics if topics is None else topics), kind, on_connect,
                   on_disconnect)

    def run(self, intake: Intake, stop: threading.Event) -> None:
        """Connect, subscribe, submit until `stop` is set (reconnecting by itself); hand over what is held and
        return. A helper thread keeps the session up to `stop_timeout` for the PUBACKs of those last values."""
        self._run(intake, stop)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish through this session (e.g. a Sparkplug NCMD); any thread, never blocks; False if not connected."""
        return self._publish(topic, payload, qos, retain)

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """The last will for the next (re)connect: call before `run`, or from the `on_disconnect` hook."""
        self._client().will_set(topic, payload, qos, retain)

    @property
    def connected(self) -> bool:  # True between a CONNACK and the loss of that connection
        return self._connected

    def status(self) -> SourceStatus:
        """Counters since start (messages, values, acks pending, redeliveries, reconnects, bad messages)."""
        return self._status()

    # -- the rest is implementation --------------------------------------------------

    def _init(self, settings: BrokerSettings, decoder: Decoder, topics: list[str], kind: str,
              on_connect: Callable[[bool], None] | None, on_disconnect: Callable[[], None] | None) -> None:
        if not topics:
            raise ConfigError(f"the {kind} source needs at least one topic filter")
        self.settings = settings
        self.decoder = decoder
        self.topics = topics
        self.kind = kind
        scheme = "mqtts" if settings.tls else "mqtt"
        self.endpoint = f"{scheme}://{settings.host}:{settings.port}"
        self.name = f"{kind} {self.endpoint}"
        self.client_id = settings.client_id or default_client_id()
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        redact.register(settings.password)
        # Guards the connection generation against acks from settle threads (see `_ack`), and the counters.
        self._lock = threading.Lock()
        self._gen = 0  # bumped at every connect and every loss: an ack is sent only within its generation
        self._connected = False
        self._closed = False  # no more acks: the client is disconnecting or gone
        self._closing = False  # no more messages taken: `run` is handing over what it holds
        self._inbox: queue.Queue[tuple[int, paho.MQTTMessage]] = queue.Queue(maxsize=settings.receive_maximum)
        self._connects = 0
        self._messages = 0
        self._values = 0
        self._bad = 0
        self._redeliveries = 0
        self._unacked = 0
        self._last_message: float | None = None
        self._detail = "not started"
        self._last_receipt: Receipt = SETTLED  # of the last submit: later acks wait behind it (PUBACK order)
        self._bad_log = BadLineLog()
        self._mqtt = _new_client(settings, self.client_id)
        self._mqtt.on_connect = self._handle_connect
        self._mqtt.on_connect_fail = self._handle_connect_fail
        self._mqtt.on_disconnect = self._handle_disconnect
        self._mqtt.on_subscribe = self._handle_subscribe
        self._mqtt.on_message = self._handle_message

    def _client(self) -> paho.Client:
        return self._mqtt

    # -- paho's network thread -------------------------------------------------

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._note(f"the broker refused the connection: {reason}", logging.ERROR)
            return
        with self._lock:
            self._gen += 1
            self._connected = True
            self._connects += 1
            again = self._connects > 1
        present = bool(flags.session_present)
        self._note(f"{'reconnected' if again else 'connected'} to {self.endpoint} as {self.client_id!r}"
                   f" (session {'resumed' if present else 'new'})", logging.WARNING if again else logging.INFO)
        if self.settings.persistent_session and not present and again:
            log.warning("%s: the broker kept no session for %r: messages published while disconnected are lost",
                        self.name, self.client_id)
        client.subscribe(_subscriptions(self.topics, self.settings.protocol))
        if self._on_connect_hook is not None:
            self._call_hook(self._on_connect_hook, present)

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        why = sys.exc_info()[1]  # paho calls this inside its `except OSError` around the connect attempt
        self._note(f"cannot connect to {self.endpoint}{f': {why}' if why else ''}; retrying", logging.WARNING)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:  # from here no ack of this connection's messages can be queued (see `_ack`)
            self._gen += 1
            was = self._connected
            self._connected = False
        if was and not self._closed:
            self._note(f"lost the connection to {self.endpoint}: {reason}; reconnecting", logging.WARNING)
        if self._on_disconnect_hook is not None:
            self._call_hook(self._on_disconnect_hook)

    def _call_hook(self, hook: Callable[..., None], *args: Any) -> None:
        """A failing hook is logged: raised into paho it would end the network thread (no more reconnects)."""
        try:
            hook(*args)
        except Exception:
            log.exception("%s: a connection hook failed", self.name)

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        granted = []
        for topic, code in zip(self.topics, reasons, strict=False):
            if code.is_failure:
                self._note(f"the broker refused the subscription to {topic!r}: {code}", logging.ERROR)
            else:
                granted.append(topic)
        if granted:  # (logged, not the status detail, which keeps saying how the session came up)
            log.info("%s: subscribed to %s", self.name, ", ".join(map(repr, granted)))

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """Hand the message to `run`'s thread; the queue is bounded by `receive_maximum` (the broker's window)."""
        with self._lock:
            gen = self._gen
            self._unacked += message.qos > 0
        while not self._closing:
            try:
                self._inbox.put((gen, message), timeout=INBOX_WAIT)
                return
            except queue.Full:  # only with v3.1.1 (no receive window): hold the socket, so TCP pushes back
                continue
        with self._lock:  # stopping: left unacknowledged, the broker sends it again next session
            self._unacked -= message.qos > 0

    # -- run's thread ----------------------------------------------------------

    def _run(self, intake: Intake, stop: threading.Event) -> None:
        self._note(f"connecting to {self.endpoint} as {self.client_id!r}")
        s = self.settings
        self._mqtt.connect_async(s.host, s.port, s.keepalive, **_connect_args(s))
        self._mqtt.loop_start()
        try:
            while not stop.is_set():
                batch = self._take()
                if batch:
                    self._hand_over(intake, batch, stop)
            self._closing = True  # set before the last look, so nothing is left behind unseen
            held = self._take_all()
            if held:
                self._hand_over(intake, held, stop)
        except PipelineStopped:
            log.warning("%s: the pipeline stopped; messages not handed over are sent again next session", self.name)
        finally:
            self._closing = True
            self._bad_log.flush()
            acked = threading.Event()
            self._last_receipt.on_settled(acked.set)  # runs after the acks registered before it
            self._finish(acked)

    def _take(self) -> list[tuple[int, paho.MQTTMessage]]:
        """The messages waiting (up to BATCH_MESSAGES); waits up to POLL seconds for the first."""
        try:
            first = self._inbox.get(timeout=POLL)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < BATCH_MESSAGES:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _take_all(self) -> list[tuple[int, paho.MQTTMessage]]:
        held = []
        while True:
            try:
                held.append(self._inbox.get_nowait())
            except queue.Empty:
                return held

    def _hand_over(self, intake: Intake, batch: list[tuple[int, paho.MQTTMessage]], stop: threading.Event) -> None:
        """Decode, quarantine the bad, submit the rows as one group; ack them all once settled."""
        decoded: list[tuple[str, str, list[TagValue]]] = []  # (where, raw, rows) per good message
        bad: list[BadInput] = []
        for _gen, message in batch:
            topic, where, raw = self._describe(message)
            try:
                if topic is None:
                    raise ValueError("the topic is not UTF-8")
                rows = list(self.decoder(topic, bytes(message.payload)))
                check_tag_names({r.tag for r in rows})
            except ValueError as exc:
                bad.append((where, str(exc), raw))
                continue
            except Exception as exc:  # a decoder bug must not stop the source: keep the message, say so
                log.exception("%s: the decoder failed on %s", self.name, where)
                bad.append((where, f"decoder failed: {exc!r}", raw))
                continue
            decoded.append((where, raw, rows))
        self._count(batch, decoded)
        receipt = self._submit(intake, decoded, bad, stop)
        self._quarantine(intake, bad)
        acks = [(gen, m.mid, m.qos) for gen, m in batch if m.qos > 0]
        if receipt is None:  # not all taken (spool failed): unacknowledged, the broker sends them again
            self._abandon(len(acks))
            return
        self._last_receipt = receipt
        receipt.on_settled(lambda: self._ack(acks))

    def _submit(self, intake: Intake, decoded: list[tuple[str, str, list[TagValue]]], bad: list[BadInput],
                stop: threading.Event) -> Receipt | None:
        """One submit for the group (a spool write when stopping and full); the receipt that covers it.

        A group the pipeline refuses (ValueError) is submitted message by message, and the refused
        messages join `bad`. None if rows could not be spooled.
        """
        rows = [r for _w, _raw, got in decoded for r in got]
        if not rows:
            return self._last_receipt
        if not intake.wait_for_room(len(rows), stop):  # stopping while the buffer is full: spool them
            return self._last_receipt if intake.spool_rows(rows) == len(rows) else None
        try:
            return intake.submit(rows)
        except ValueError:
            pass
        receipt = self._last_receipt
        for where, raw, got in decoded:
            try:
                receipt = intake.submit(got) if got else receipt
            except ValueError as exc:
                bad.append((where, str(exc), raw))
        return receipt

    def _quarantine(self, intake: Intake, bad: list[BadInput]) -> None:
        if not bad:
            return
        intake.quarantine_input(bad)
        with self._lock:
            self._bad += len(bad)
        for where, why, raw in bad:
            self._bad_log.add(InputError(where, why, raw))

    def _count(self, batch: list[tuple[int, paho.MQTTMessage]], decoded: list[tuple[str, str, list[TagValue]]]) -> None:
        with self._lock:
            self._messages += len(batch)
            self._redeliveries += sum(1 for _g, m in batch if m.dup)
            self._values += sum(len(rows) for _w, _r, rows in decoded)
            self._last_message = time.monotonic()

    def _describe(self, message: paho.MQTTMessage) -> tuple[str | None, str, str]:
        """(topic, where, raw) of a message: None if the topic is not UTF-8, "mqtt <topic>", the payload as text."""
        raw = visible(message.payload.decode("utf-8", "surrogateescape"))
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers refuse such topics; paho would raise on reading it
            return None, f"{self.kind} (a topic that is not UTF-8)", raw
        return topic, f"{self.kind} {topic}", raw

    # -- acks, on the thread that settled the values ---------------------------

    def _ack(self, acks: list[tuple[int, int, int]]) -> None:
        """PUBACK each message received on the current connection; drop those of an older one.

        paho's `ack` only queues the packet for the network thread while that runs (`loop_start`); it would
        write the socket from this thread once it has stopped, and a PUBACK queued while paho reconnects
        could go out before CONNECT. The lock (also taken by the disconnect callback) rules both out.
        """
        sent = 0
        with self._lock:
            for gen, mid, qos in acks:
                if gen == self._gen and self._connected and not self._closed:
                    self._mqtt.ack(mid, qos)
                    sent += 1
            self._unacked -= len(acks)
        if sent < len(acks):
            log.info("%s: %d settled messages came on an earlier connection: the broker sends them again",
                     self.name, len(acks) - sent)

    def _abandon(self, n: int) -> None:
        with self._lock:
            self._unacked -= n

    # -- publish, status, shutdown --------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        if not self._connected or self._closed:  # paho itself queues nothing for the socket while not connected
            return False
        return bool(self._mqtt.publish(topic, payload, qos, retain).rc == 0)

    def _status(self) -> SourceStatus:
        with self._lock:
            age = None if self._last_message is None else time.monotonic() - self._last_message
            return SourceStatus(
                kind=self.kind, endpoint=self.endpoint, connected=self._connected, messages=self._messages,
                values=self._values, last_message_age=age, acks_pending=max(0, self._unacked),
                redeliveries=self._redeliveries, reconnects=max(0, self._connects - 1), bad_messages=self._bad,
                detail=self._detail,
            )

    def _note(self, detail: str, level: int = logging.INFO) -> None:
        """Set `status().detail` and log it; the same text again (a retry failing alike) only at DEBUG."""
        detail = redact.redact(detail)
        repeated, self._detail = detail == self._detail, detail
        log.log(logging.DEBUG if repeated else level, "%s: %s", self.name, detail)

    def _finish(self, acked: threading.Event) -> None:
        """Return at once; a helper thread keeps the session until the last acks are out, then disconnects.

        The service stops the pipeline after the source: values handed over last settle during that
        stop, and their PUBACKs still go out (up to `stop_timeout`); the rest the broker sends again.
        """
        closer = threading.Thread(target=self._close, args=(acked,), name=f"tagwriter-{self.kind}-close", daemon=True)
        closer.start()

    def _close(self, acked: threading.Event) -> None:
        acked.wait(self.settings.stop_timeout)
        with self._lock:
            self._closed = True
            self._unacked = 0
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._note("disconnected")


INBOX_WAIT = 0.2  # seconds the network thread waits for room in the hand-over queue before it looks again
POLL = 0.1  # seconds `run` waits for a message before it looks at `stop`
BATCH_MESSAGES = 200  # messages decoded per submit at most: one buffer lock per group


def default_client_id() -> str:
    """`tagwriter-<host name>`: stable across restarts (a persistent session needs that), distinct per host."""
    return f"tagwriter-{socket.gethostname()}"[:MAX_CLIENT_ID]


MAX_CLIENT_ID = 64


class BrokerSettings(Protocol):
    """The keys `MqttConnection` reads (those of `MqttConfig`; a Sparkplug section may reuse them)."""

    host: str
    port: int
    topics: list[str]
    client_id: str
    protocol: str
    persistent_session: bool
    session_expiry: int
    keepalive: int
    connect_timeout: float
    receive_maximum: int
    username: str
    password: str
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    tls_insecure: bool
    reconnect_min_delay: float
    reconnect_max_delay: float
    stop_timeout: float


class MqttSource(MqttConnection):
    """The `[mqtt]` source: JSON payloads mapped by `JsonDecoder` (the rules are in its docstring)."""

    def __init__(self, settings: MqttConfig, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings, JsonDecoder(settings, clock=clock))


# -- paho ----------------------------------------------------------------------


def _paho() -> Any:
    """paho.mqtt.client, imported when a source is built (it is the optional extra `mqtt`)."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ConfigError("the mqtt source needs paho-mqtt: pip install '.[mqtt]' in the tagwriter checkout") from None
    return mqtt


def _new_client(settings: BrokerSettings, client_id: str) -> paho.Client:
    """A paho client with manual acks, the session, credentials and TLS of `settings` (not connected)."""
    mqtt = _paho()
    check_topic_filters(settings.topics)
    v5 = settings.protocol == "v5"
    session = {} if v5 else {"clean_session": not settings.persistent_session}  # v5: CONNECT's clean_start
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, manual_ack=True, **session)
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    elif settings.password:
        raise ConfigError("mqtt.password is set without mqtt.username")
    if settings.tls:
        client.tls_set_context(_tls_context(settings))
    client.connect_timeout = settings.connect_timeout
    client.reconnect_delay_set(settings.reconnect_min_delay, settings.reconnect_max_delay)
    client.max_inflight_messages_set(settings.receive_maximum)  # our own QoS 1 publishes in flight at most
    return client


def _tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """Verifying by default (CA file or the system's); `tls_insecure` skips only the host name check."""
    if settings.key_file and not settings.cert_file:
        raise ConfigError("mqtt.key_file is set without mqtt.cert_file")
    try:
        context = ssl.create_default_context(cafile=settings.ca_file or None)
        if settings.cert_file:
            context.load_cert_chain(settings.cert_file, settings.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt TLS files cannot be used: {exc}") from None
    if settings.tls_insecure:
        context.check_hostname = False
    return context


def _connect_args(settings: BrokerSettings) -> dict[str, Any]:
    """v5: clean_start and the CONNECT properties (session expiry, receive maximum); v3.1.1: none."""
    if settings.protocol != "v5":
        return {}
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry if settings.persistent_session else 0
    props.ReceiveMaximum = settings.receive_maximum
    return {"clean_start": not settings.persistent_session, "properties": props}


def _subscriptions(topics: Sequence[str], protocol: str) -> list[tuple[str, Any]]:
    """QoS 1 for every filter; v5 asks for retained messages only on a new subscription (not on resume)."""
    if protocol != "v5":
        return [(t, 1) for t in topics]
    from paho.mqtt.subscribeoptions import SubscribeOptions

    return [(t, SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)) for t in topics]


def check_topic_filters(topics: Sequence[str]) -> None:
    """Raise ConfigError for a filter the broker would refuse ('#' not last, '+' or '#' inside a level)."""
    if not topics:
        raise ConfigError("mqtt.topics: at least one topic filter is needed")
    for topic in topics:
        levels = topic.split("/")
        bad = not topic or "\x00" in topic or any(
            ("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
            for i, lv in enumerate(levels)
        )
        if bad:
            raise ConfigError(f"mqtt.topics: {topic!r} is not a valid topic filter",
                              hint="'+' and '#' stand for whole levels; '#' only as the last one")


# -- JSON payloads ---------------------------------------------------------------


class TopicTemplate:
    """A tag name made from the topic: `{topic}`, `{topic_dots}` ('/' -> '.'), `{1}`..`{n}`, `{-1}`..

    Raises ConfigError for an unknown placeholder; `format` raises ValueError for a level the topic lacks.
    """

    _FIELD = re.compile(r"\{([^{}]*)\}")

    def __init__(self, template: str) -> None:
        if not template:
            raise ConfigError("mqtt.tag: the tag name template is empty")
        for name in self._FIELD.findall(template):
            if name not in ("topic", "topic_dots") and not re.fullmatch(r"-?[1-9][0-9]*", name):
                raise ConfigError(f"mqtt.tag = {template!r}: unknown placeholder {{{name}}}",
                                  hint="use {topic}, {topic_dots}, {1}..{n} or {-1}..{-n}")
        self.template = template
        self._constant = not self._FIELD.search(template)

    def format(self, topic: str) -> str:
        if self._constant:
            return self.template
        levels = topic.split("/")

        def field(m: re.Match[str]) -> str:
            name = m.group(1)
            if name == "topic":
                return topic
            if name == "topic_dots":
                return ".".join(levels)
            n = int(name)
            if n > len(levels) or -n > len(levels):
                raise ValueError(f"tag template {self.template!r}: the topic has no level {n}")
            return levels[n - 1 if n > 0 else n]

        return self._FIELD.sub(field, self.template)


_MISSING = object()


class JsonDecoder:
    """Maps a JSON payload to rows (`Decoder`). The rules, in order:

    1. `value_path` is '': the whole payload is the value (a number, true/false or null).
    2. An array: each item must be an object, mapped by rule 3 or 4 (one message, many rows).
    3. An object holding `value_path`: one row. Tag: `tag_path` if set, else the topic template;
       ts: `ts_path` (ISO-8601 text, or a number in `ts_unit`), absent or null = receive time;
       quality: `quality_path` (an integer 0..65535), absent = 192.
    4. An object without `value_path`: an object of tag -> value. Every top-level member except those
       `tag_path`, `ts_path` and `quality_path` start with is one row, tag `<tag><key_separator><key>`,
       sharing the object's ts and quality. Every such member must be a number, true/false or null.
    5. A number, true/false or null: one row with the topic template's tag, receive time, quality 192.
    Values: numbers (finite), true = 1.0, false = 0.0, null = no value. Anything else is a ValueError.
    """

    def __init__(self, settings: MqttConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.template = TopicTemplate(settings.tag)
        self.tag_path = _path(settings.tag_path)
        self.value_path = _path(settings.value_path)
        self.ts_path = _path(settings.ts_path)
        self.quality_path = _path(settings.quality_path)
        self.ts_scale = TS_SCALE[settings.ts_unit]
        self.separator = settings.key_separator
        self.clock = clock
        self._meta = {p[0] for p in (self.tag_path, self.ts_path, self.quality_path) if p}

    def __call__(self, topic: str, payload: bytes) -> list[TagValue]:
        doc = _load_json(payload)
        now = round(self.clock() * 1_000_000)
        if not self.value_path:
            return [TagValue(self.template.format(topic), now, _value(doc, "the payload"), GOOD_QUALITY)]
        if isinstance(doc, list):
            if not doc:
                raise ValueError("an empty array")
            rows = []
            for i, item in enumerate(doc):
                if not isinstance(item, dict):
                    raise ValueError(f"array item {i} is not an object but {short_repr(item)}")
                rows += self._object(item, topic, now, f"array item {i}: ")
            return rows
        if isinstance(doc, dict):
            return self._object(doc, topic, now, "")
        return [TagValue(self.template.format(topic), now, _value(doc, "the payload"), GOOD_QUALITY)]

    def _object(self, obj: dict[str, Any], topic: str, now: int, where: str) -> list[TagValue]:
        try:
            tag = self._tag(obj, topic)
            ts = self._ts(obj, now)
            quality = self._quality(obj)
            value = _get(obj, self.value_path)
            if value is not _MISSING:
                return [TagValue(tag, ts, _value(value, "value"), quality)]
            return self._members(obj, tag, ts, quality)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None

    def _members(self, obj: dict[str, Any], tag: str, ts: int, quality: int) -> list[TagValue]:
        """Rule 4, the hot loop of wide payloads: plain finite numbers skip `_value`'s checks and messages."""
        rows = []
        make, meta, prefix = TagValue._make, self._meta, tag + self.separator
        for k, v in obj.items():
            if k in meta:
                continue
            kind = type(v)
            if kind is float and v - v == 0.0:  # finite (inf - inf and nan - nan are nan)
                pass
            elif kind is int and -EXACT_INT < v < EXACT_INT:
                v = float(v)
            else:
                v = _value(v, f"member {k!r}")
            rows.append(make((prefix + k, ts, v, quality)))
        if not rows:
            raise ValueError(f"no {'.'.join(self.value_path)!r} and no other members")
        return rows

    def _tag(self, obj: dict[str, Any], topic: str) -> str:
        if not self.tag_path:
            return self.template.format(topic)
        tag = _get(obj, self.tag_path)
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag {'.'.join(self.tag_path)!r} must be a non-empty string, not "
                             f"{'missing' if tag is _MISSING else short_repr(tag)}")
        return tag

    def _ts(self, obj: dict[str, Any], now: int) -> int:
        ts = _get(obj, self.ts_path) if self.ts_path else None
        if ts is _MISSING or ts is None:
            return now
        try:
            if isinstance(ts, str):
                return parse_ts(ts)
            if isinstance(ts, int) and not isinstance(ts, bool):
                to_epoch_us(ts // (1_000_000 // self.ts_scale))  # range check: years 1-9999
                return ts * self.ts_scale
            if isinstance(ts, float):
                return to_epoch_us(ts * self.ts_scale / 1_000_000)
        except (ValueError, OverflowError):
            pass
        raise ValueError(f"ts {short_repr(ts)} is not ISO-8601 text or epoch {self._unit_name()}")

    def _unit_name(self) -> str:
        return {1_000_000: "seconds", 1000: "milliseconds", 1: "microseconds"}[self.ts_scale]

    def _quality(self, obj: dict[str, Any]) -> int:
        q = _get(obj, self.quality_path) if self.quality_path else _MISSING
        if q is _MISSING:
            return GOOD_QUALITY
        if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= QUALITY_MAX:
            raise ValueError(f"quality must be an integer 0..{QUALITY_MAX}, not {short_repr(q)}")
        return q


EXACT_INT = 2**53  # an int below this in size is a float exactly
TS_SCALE = {"s": 1_000_000, "ms": 1000, "us": 1}  # microseconds per unit of a numeric timestamp
QUALITY_MAX = 65_535


def _path(text: str) -> tuple[str, ...]:
    """'a.b' -> ('a', 'b'); '' -> () (not used / the whole payload)."""
    return tuple(text.split(".")) if text else ()


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _load_json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))  # not json.loads(bytes): that would take UTF-16 too
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except UnicodeDecodeError:
        raise ValueError("not JSON: not UTF-8 text") from None
    except RecursionError:
        raise ValueError("not JSON tagwriter can read: nested too deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"not JSON tagwriter can read: {exc}") from None


def _value(value: Any, what: str) -> float | None:
    """A JSON value as a row's value: a finite number, true/false as 1/0, null as None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, true/false or null, not {short_repr(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} {short_repr(value)} is too large for a float") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {value!r} is not finite")
    return number

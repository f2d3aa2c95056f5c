"""The Sparkplug B source: a Sparkplug host application that writes what edge nodes publish.

    source = SparkplugSource.from_config(config.mqtt, config.sparkplug)
    source.run(pipeline, stop)          # blocks on the source thread until `stop` is set

MQTT itself (session, QoS 1, PUBACK after settle, reconnects) is
`tagwriter.sources.mqtt.MqttConnection`, whose broker keys come from the
`[mqtt]` section; this module is the decoder that turns Sparkplug B messages
into rows, and the host-application state it needs:

- topics `spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH}/{edge node}[/{device}]`
  (NCMD, DCMD and STATE are not values and are passed over);
- NBIRTH / DBIRTH define each node's and device's metrics: name, alias and datatype;
  NDATA / DDATA may then name a metric by alias only;
- a metric's value is written at its own timestamp (epoch ms), else the payload's;
- `seq` (0..255, one counter per edge node) is checked: a gap not filled within
  `reorder_timeout` seconds, an alias no birth defined, or data from a node whose birth
  was not seen, request a rebirth (NCMD `Node Control/Rebirth` = true);
- NDEATH (matching the NBIRTH's bdSeq) and DDEATH write every metric's last value
  again with quality 0 (bad) at the death time, so a historian shows when data stopped.

Numbers (Int8..UInt64, Float, Double) become floats, Boolean 1.0 / 0.0; the
other datatypes (String, Text, UUID, DateTime, Bytes, File, DataSet, Template,
arrays) are skipped and counted: normal traffic, not bad input. A payload that
is not Sparkplug B is quarantined with its topic; a metric that cannot be
mapped (an unknown alias, a missing value) is quarantined in its text form.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import SparkplugConfig
from tagwriter.errors import ConfigError
from tagwriter.intake import BadInput, Intake
from tagwriter.models import GOOD_QUALITY, TagValue, check_tag_names, short_repr, to_epoch_us
from tagwriter.sources.base import SourceStatus

if TYPE_CHECKING:
    from tagwriter.sources.mqtt import BrokerSettings, MqttConnection

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
BAD_QUALITY = 0
UNCERTAIN_QUALITY = 64
SPARKPLUG_STALE = 500  # the Sparkplug "Quality" property's STALE code, kept as OPC DA uncertain
REBIRTH_METRIC = "Node Control/Rebirth"
SEQ_MODULUS = 256
DUPLICATE_WINDOW = 64  # a seq seen within this many messages of its node is a redelivery, not a gap
TICK = 0.25  # seconds between looks for reorder timeouts that ran out while no message came


def _schema() -> Any:
    """The schema module; ConfigError naming the extra when protobuf is not installed."""
    try:
        from tagwriter.sources import sparkplug_schema
    except ImportError as exc:
        raise ConfigError(
            f"the sparkplug source needs protobuf: pip install '.[mqtt]' in the tagwriter checkout ({exc})"
        ) from None
    return sparkplug_schema


# -- what the decoder knows of each edge node ---------------------------------


@dataclass(slots=True)
class _Metric:
    """A metric as its birth defined it: the tag it is written to (None: not written) and its datatype."""

    tag: str | None
    datatype: int


@dataclass(slots=True)
class _Scope:
    """The metrics of an edge node itself, or of one of its devices, since their birth."""

    aliases: dict[int, _Metric] = field(default_factory=dict)
    names: dict[str, _Metric] = field(default_factory=dict)
    last: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # tag -> newest (ts_us, value)


@dataclass(slots=True)
class _Node:
    """One edge node: its metrics and devices, and its `seq` bookkeeping."""

    scope: _Scope = field(default_factory=_Scope)
    devices: dict[str, _Scope] = field(default_factory=dict)
    born: bool = False
    bd_seq: int | None = None
    next_seq: int = 0
    messages: int = 0  # messages with a seq since the birth
    seen_at: dict[int, int] = field(default_factory=dict)  # seq -> `messages` when last seen
    missing: dict[int, float] = field(default_factory=dict)  # seq skipped -> monotonic deadline
    last_rebirth: float = -math.inf


@dataclass(slots=True)
class SparkplugStats:
    """What the decoder counted since start (shown in `SourceStatus.detail`)."""

    births: int = 0
    deaths: int = 0
    death_rows: int = 0
    seq_gaps: int = 0
    late: int = 0  # messages that filled a gap within the reorder timeout
    duplicates: int = 0  # a seq seen again (a QoS 1 redelivery)
    rebirths_requested: int = 0
    skipped: int = 0  # metrics of a datatype that is not a number (String, DataSet, ...)
    transient: int = 0  # metrics flagged is_transient, not written
    bad_metrics: int = 0  # quarantined one by one
    ignored: int = 0  # NCMD/DCMD/STATE, a stale NDEATH


class _BadMetric(ValueError):
    """One metric cannot be mapped; the rest of its message can."""


class _Skip(Exception):
    """A metric of a datatype that is not written."""


_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64: two's complement in uint32/uint64
_UNSIGNED_BITS = {5: 8, 6: 16, 7: 32, 8: 64}  # UInt8..UInt64
_FLOAT_TYPES = frozenset({9, 10})
_BOOLEAN = 11
_UNKNOWN = 0
_NUMBER_TYPES = frozenset({*_SIGNED_BITS, *_UNSIGNED_BITS, *_FLOAT_TYPES, _BOOLEAN})
_END_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z: rows hold the years 1-9999 (tagwriter.models)
_new_row = tuple.__new__  # TagValue without NamedTuple's Python-level __new__ (as PollingData.rows does)
_NUMERIC_FIELDS = frozenset({"int_value", "long_value", "float_value", "double_value", "boolean_value"})
_NODE_TYPES = frozenset({"NBIRTH", "NDATA", "NDEATH"})
_DEVICE_TYPES = frozenset({"DBIRTH", "DDATA", "DDEATH"})
_NOT_VALUES = frozenset({"NCMD", "DCMD", "STATE"})


class SparkplugDecoder:
    """`(topic, payload) -> rows` for `MqttConnection`, holding the host-application state.

    Raises ValueError for a message that is not Sparkplug B (the connection
    quarantines it with its raw bytes); quarantines single bad metrics itself
    through `quarantine`. `publish(topic, payload) -> bool` sends a rebirth
    request. Thread-safe: the connection calls it on the source thread, the
    reorder-timeout ticker (`due_rebirths`) from its own.
    """

    def __init__(
        self,
        settings: SparkplugConfig,
        *,
        publish: Callable[[str, bytes], bool] | None = None,
        quarantine: Callable[[Sequence[BadInput]], int] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        kind: str = "sparkplug",
    ) -> None:
        schema = _schema()
        self._payload_class = schema.Payload
        from google.protobuf import message as pb_message
        from google.protobuf import text_format

        self._decode_error = pb_message.DecodeError
        self._text_format = text_format
        self.settings = settings
        self.publish = publish
        self.quarantine = quarantine
        self.clock = clock
        self.kind = kind
        self.stats = SparkplugStats()
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._excluded = re.compile("|".join(fnmatch.translate(p) for p in settings.exclude_metrics) or "(?!)")
        self._lock = threading.Lock()

    # -- the decoder ---------------------------------------------------------

    def __call__(self, topic: str, payload: bytes) -> list[TagValue]:
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != NAMESPACE:
            raise ValueError(f"not a Sparkplug B topic (expected {NAMESPACE}/group/TYPE/edge node[/device])")
        verb = parts[2] if parts[1] != "STATE" else "STATE"
        if verb in _NOT_VALUES:
            self.stats.ignored += 1
            return []
        group, node_id, device = _topic_ids(parts, verb)
        try:
            message = self._payload_class.FromString(payload)
        except self._decode_error as exc:
            raise ValueError(f"not a Sparkplug B payload ({exc})") from None
        with self._lock:
            rows, bad = self._handle(topic, verb, group, node_id, device, message)
            self._request_due_rebirths()
        if bad and self.quarantine is not None:
            self.quarantine(bad)
        return rows

    def due_rebirths(self) -> None:
        """Request the rebirths whose reorder timeout ran out (for a ticker: no message may come)."""
        with self._lock:
            self._request_due_rebirths()

    def _handle(
        self, topic: str, verb: str, group: str, node_id: str, device: str | None, message: Any
    ) -> tuple[list[TagValue], list[BadInput]]:
        key = (group, node_id)
        now_us = to_epoch_us(self.clock.time())
        if verb == "NDEATH":
            return self._node_death(key, message, now_us), []
        if not message.HasField("seq"):
            raise ValueError(f"{verb} without a seq (every Sparkplug B message but NDEATH has one)")
        seq = message.seq
        if not 0 <= seq < SEQ_MODULUS:
            raise ValueError(f"seq {seq} is outside 0..255")
        payload_ms = message.timestamp if message.HasField("timestamp") else now_us // 1000
        if verb == "NBIRTH":
            node = self._node_birth(key, message, seq)
        else:
            node = self._nodes.setdefault(key, _Node())
            if node.born:
                self._check_seq(key, node, seq)
            else:
                self._rebirth(key, f"{verb} from an edge node whose NBIRTH was not seen")
        if device is None:
            scope = node.scope
        elif verb == "DBIRTH":
            scope = node.devices[device] = _Scope()
        else:
            scope = node.devices.get(device) or _Scope()
            if device not in node.devices and verb == "DDATA":
                self._rebirth(key, f"DDATA from device {device!r} whose DBIRTH was not seen")
                node.devices[device] = scope
        if verb == "DDEATH":
            node.devices.pop(device or "", None)
            return self._death_rows(scope, payload_ms * 1000, "DDEATH", topic), []
        prefix = self._prefix(group, node_id, device)
        return self._metric_rows(topic, key, scope, prefix, message, payload_ms, birth=verb.endswith("BIRTH"))

    # -- births, deaths and seq ------------------------------------------------

    def _node_birth(self, key: tuple[str, str], message: Any, seq: int) -> _Node:
        """A new session of the edge node: forget its metrics and devices (its DBIRTHs follow)."""
        old = self._nodes.get(key)
        node = _Node(born=True, next_seq=(seq + 1) % SEQ_MODULUS, bd_seq=_bd_seq(message))
        node.seen_at[seq] = 0
        if old is not None:
            node.last_rebirth = old.last_rebirth
        self._nodes[key] = node
        self.stats.births += 1
        return node

    def _node_death(self, key: tuple[str, str], message: Any, now_us: int) -> list[TagValue]:
        """NDEATH: the node and all its devices are offline, at the host's receive time (the spec:
        a Will Message's timestamp is the connect time). An NDEATH whose bdSeq is not the current
        NBIRTH's belongs to an older session (a late Will Message) and is passed over."""
        node = self._nodes.get(key)
        bd_seq = _bd_seq(message)
        if node is None or not node.born or (None not in (bd_seq, node.bd_seq) and bd_seq != node.bd_seq):
            self.stats.ignored += 1
            log.info("sparkplug: NDEATH of %s/%s passed over (no current session with bdSeq %s)",
                     key[0], key[1], bd_seq)
            return []
        rows = self._death_rows(node.scope, now_us, "NDEATH", f"{key[0]}/{key[1]}")
        for device in node.devices.values():
            rows += self._death_rows(device, now_us, "", "")
        self._nodes[key] = _Node(last_rebirth=node.last_rebirth)
        return rows

    def _death_rows(self, scope: _Scope, death_us: int, verb: str, what: str) -> list[TagValue]:
        """Every last value again with quality bad at the death time (or just after the value, if its
        timestamp is later: the bad row must be the newest one even when edge and host clocks differ)."""
        if verb:
            self.stats.deaths += 1
            log.info("sparkplug: %s of %s", verb, what)
        if not self.settings.mark_death:
            return []
        rows = [TagValue(tag, max(death_us, ts + 1), value, BAD_QUALITY) for tag, (ts, value) in scope.last.items()]
        scope.last.clear()
        self.stats.death_rows += len(rows)
        return rows

    def _check_seq(self, key: tuple[str, str], node: _Node, seq: int) -> None:
        """Follow the node's seq: a gap starts the reorder timeout of each missing number."""
        node.messages += 1
        seen = node.seen_at.get(seq)
        node.seen_at[seq] = node.messages
        if seq == node.next_seq:
            node.next_seq = (seq + 1) % SEQ_MODULUS
        elif node.missing.pop(seq, None) is not None:
            self.stats.late += 1
        elif seen is not None and node.messages - seen <= DUPLICATE_WINDOW:
            self.stats.duplicates += 1
        else:
            self.stats.seq_gaps += 1
            deadline = self.clock.monotonic() + self.settings.reorder_timeout
            gap = (seq - node.next_seq) % SEQ_MODULUS
            log.warning("sparkplug: seq gap from %s/%s: expected %d, got %d", key[0], key[1], node.next_seq, seq)
            for n in range(gap):
                node.missing[(node.next_seq + n) % SEQ_MODULUS] = deadline
            node.next_seq = (seq + 1) % SEQ_MODULUS

    def _request_due_rebirths(self) -> None:
        """Missing seqs whose reorder timeout ran out: a rebirth; kept (asked again later) while one
        cannot go out (held off, not connected)."""
        now = self.clock.monotonic()
        for key, node in self._nodes.items():
            if node.missing and min(node.missing.values()) <= now:
                gone = sorted(node.missing)
                shown = ", ".join(map(str, gone[:5])) + ("..." if len(gone) > 5 else "")
                if self._rebirth(key, f"seq {shown} missing"):
                    node.missing.clear()

    def _rebirth(self, key: tuple[str, str], why: str) -> bool:
        """Ask the edge node for NBIRTH + DBIRTHs, at most once per `rebirth_holdoff`; False if the
        request could not go out now (held off, or not connected), True if sent or rebirths are off."""
        node = self._nodes.setdefault(key, _Node())
        if not self.settings.rebirth or self.publish is None:
            return True
        now = self.clock.monotonic()
        if now - node.last_rebirth < self.settings.rebirth_holdoff:
            return False
        group, node_id = key
        if not self.publish(f"{NAMESPACE}/{group}/NCMD/{node_id}", self.rebirth_request()):
            return False
        node.last_rebirth = now
        self.stats.rebirths_requested += 1
        log.warning("sparkplug: rebirth requested from %s/%s: %s", group, node_id, why)
        return True

    def rebirth_request(self) -> bytes:
        """The NCMD payload asking for a rebirth: `Node Control/Rebirth` = true, no seq (the spec)."""
        now_ms = to_epoch_us(self.clock.time()) // 1000
        payload = self._payload_class(timestamp=now_ms)
        payload.metrics.add(name=REBIRTH_METRIC, timestamp=now_ms, datatype=_BOOLEAN, boolean_value=True)
        return bytes(payload.SerializeToString())

    # -- metrics -----------------------------------------------------------------

    def _prefix(self, group: str, node_id: str, device: str | None) -> str:
        parts = [group, node_id] if self.settings.include_group else [node_id]
        if device is not None:
            parts.append(device)
        sep = self.settings.separator
        return sep.join(parts) + sep

    def _metric_rows(
        self, topic: str, key: tuple[str, str], scope: _Scope, prefix: str, message: Any, payload_ms: int,
        *, birth: bool,
    ) -> tuple[list[TagValue], list[BadInput]]:
        rows: list[TagValue] = []
        bad: list[BadInput] = []
        last = scope.last
        for metric in message.metrics:
            try:
                row = self._metric_row(key, scope, prefix, metric, payload_ms, birth)
            except _Skip:
                continue
            except _BadMetric as exc:
                self.stats.bad_metrics += 1
                text = self._text_format.MessageToString(metric, as_one_line=True)
                bad.append((f"{self.kind} {topic}", str(exc), text))
                continue
            if row is not None:
                rows.append(row)
                tag, ts_us, value, _q = row
                newest = last.get(tag)
                if newest is None or ts_us >= newest[0]:
                    last[tag] = (ts_us, value)
        return rows, bad

    def _metric_row(
        self, key: tuple[str, str], scope: _Scope, prefix: str, metric: Any, payload_ms: int, birth: bool
    ) -> TagValue | None:
        known = self._resolve(key, scope, prefix, metric, birth)
        tag = known.tag
        if tag is None:
            return None
        if metric.is_transient and not self.settings.store_transient:
            self.stats.transient += 1
            return None
        ts_ms = metric.timestamp if metric.HasField("timestamp") else payload_ms
        if ts_ms >= _END_MS:  # an unsigned field: never before 1970
            raise _BadMetric(f"metric {tag!r}: timestamp {ts_ms} ms is outside the years 1-9999")
        if metric.is_null:
            return TagValue(tag, ts_ms * 1000, None, BAD_QUALITY)
        value = self._value(metric, metric.datatype if metric.HasField("datatype") else known.datatype, tag)
        if not math.isfinite(value):  # NaN or infinity: no database keeps it alike; a sensor fault
            return TagValue(tag, ts_ms * 1000, None, BAD_QUALITY)
        return _new_row(TagValue, (tag, ts_ms * 1000, value, _quality(metric)))

    def _resolve(self, key: tuple[str, str], scope: _Scope, prefix: str, metric: Any, birth: bool) -> _Metric:
        """The metric's tag and datatype: defined by a birth, or by its own name."""
        has_alias = metric.HasField("alias")
        if not birth and has_alias and not metric.name:
            known = scope.aliases.get(metric.alias)
            if known is None:
                self._rebirth(key, f"alias {metric.alias} not in the birth")
                raise _BadMetric(f"alias {metric.alias} is not in the birth certificate (rebirth requested)")
            return known
        if not metric.name:
            raise _BadMetric("a birth metric without a name")
        known = scope.names.get(metric.name)
        if known is None or birth:
            known = _Metric(self._tag(prefix, metric), metric.datatype)
            scope.names[metric.name] = known
        if birth and has_alias:
            scope.aliases[metric.alias] = known
        return known

    def _tag(self, prefix: str, metric: Any) -> str | None:
        if self._excluded.fullmatch(metric.name):
            return None
        tag = prefix + metric.name
        try:
            check_tag_names((tag,))
        except ValueError as exc:
            raise _BadMetric(str(exc)) from None
        return tag

    def _value(self, metric: Any, datatype: int, tag: str) -> float:
        """The value as a float; _Skip for a datatype that is not a number, _BadMetric for a mismatch."""
        kind = metric.WhichOneof("value")
        if datatype not in _NUMBER_TYPES and not (datatype == _UNKNOWN and kind in _NUMERIC_FIELDS):
            self.stats.skipped += 1
            raise _Skip
        if kind not in _NUMERIC_FIELDS:
            what = "no value" if kind is None else kind
            raise _BadMetric(f"metric {tag!r}: {what} for datatype {_type_name(datatype)} (is_null not set)")
        raw = getattr(metric, kind)
        if kind == "int_value" or kind == "long_value":
            return float(_integer(raw, datatype))
        return float(raw)

    # -- status ------------------------------------------------------------------

    def detail(self) -> str:
        """The counters for people (`SourceStatus.detail`)."""
        s = self.stats
        online = sum(1 for n in self._nodes.values() if n.born)
        return (f"{online} edge nodes online; {s.births} births, {s.deaths} deaths, {s.seq_gaps} seq gaps, "
                f"{s.rebirths_requested} rebirths requested, {s.skipped} non-numeric metrics skipped")


def _topic_ids(parts: list[str], verb: str) -> tuple[str, str, str | None]:
    """(group, edge node, device or None) of a Sparkplug topic split at '/'; ValueError if malformed."""
    if verb in _NODE_TYPES and len(parts) == 4 and all(parts):
        return parts[1], parts[3], None
    if verb in _DEVICE_TYPES and len(parts) == 5 and all(parts):
        return parts[1], parts[3], parts[4]
    if verb not in _NODE_TYPES | _DEVICE_TYPES:
        raise ValueError(f"unknown Sparkplug message type {short_repr(verb)}")
    shape = "group/TYPE/edge node" + ("/device" if verb in _DEVICE_TYPES else "")
    raise ValueError(f"a {verb} topic must be {NAMESPACE}/{shape}")


def _bd_seq(message: Any) -> int | None:
    """The `bdSeq` metric of an NBIRTH or NDEATH; None without one."""
    for metric in message.metrics:
        if metric.name == "bdSeq" and metric.WhichOneof("value") in ("int_value", "long_value"):
            return int(getattr(metric, metric.WhichOneof("value")))
    return None


def _integer(raw: int, datatype: int) -> int:
    """An int_value / long_value read as its datatype: signed types are two's complement of their width."""
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None:
        raw &= (1 << bits) - 1
        return raw - (1 << bits) if raw >> (bits - 1) else raw
    bits = _UNSIGNED_BITS.get(datatype)
    return raw & ((1 << bits) - 1) if bits is not None else raw


def _quality(metric: Any) -> int:
    """The metric's "Quality" property (0 bad, 192 good, 500 stale -> 64 uncertain); good without one."""
    if not metric.HasField("properties"):
        return GOOD_QUALITY
    props = metric.properties
    for name, value in zip(props.keys, props.values, strict=False):
        if name == "Quality" and value.WhichOneof("value") in ("int_value", "long_value"):
            code = _integer(getattr(value, value.WhichOneof("value")), value.type or 3)
            return UNCERTAIN_QUALITY if code == SPARKPLUG_STALE else code
    return GOOD_QUALITY


def _type_name(datatype: int) -> str:
    try:
        return str(_schema().DataType(datatype).name)
    except ValueError:
        return f"#{datatype}"


# -- the source ------------------------------------------------------------------


class SparkplugSource:
    """Sparkplug B edge nodes through one MQTT session (`MqttConnection`) into an Intake.

    `broker` holds the connection keys (the `[mqtt]` section: host, TLS, client id,
    persistent session...; its `topics` are not used: the subscriptions are
    `spBv1.0/{group}/#` per configured group). Acknowledgement is the
    connection's: a QoS 1 message is PUBACKed once its rows are settled (Sparkplug
    publishes BIRTH and DATA at QoS 0, which no broker acknowledges or keeps).
    """

    def __init__(self, broker: BrokerSettings, settings: SparkplugConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        from tagwriter.sources.mqtt import MqttConnection

        self.settings = settings
        self.clock = clock
        self.decoder = SparkplugDecoder(settings, clock=clock)
        self.connection: MqttConnection = MqttConnection(
            broker, self.decoder, topics=subscriptions(settings.groups), kind="sparkplug"
        )
        self.decoder.publish = self.connection.publish
        self.name = self.connection.name

    @classmethod
    def from_config(cls, broker: BrokerSettings, settings: SparkplugConfig) -> SparkplugSource:
        return cls(broker, settings)

    def run(self, intake: Intake, stop: threading.Event) -> None:
        """Receive and write until `stop` is set (see `MqttConnection.run`)."""
        self.decoder.quarantine = intake.quarantine_input
        ticker = None
        if self.settings.rebirth and self.settings.reorder_timeout > 0:
            ticker = threading.Thread(target=self._tick, args=(stop,), name="tagwriter-sparkplug-seq", daemon=True)
            ticker.start()
        try:
            self.connection.run(intake, stop)
        finally:
            if ticker is not None:
                ticker.join(TICK * 4)

    def _tick(self, stop: threading.Event) -> None:
        """Look for reorder timeouts that ran out while no message of that node came."""
        while not self.clock.wait(stop, TICK):
            self.decoder.due_rebirths()

    def status(self) -> SourceStatus:
        s = self.connection.status()
        return dataclasses.replace(
            s, bad_messages=s.bad_messages + self.decoder.stats.bad_metrics,
            detail=f"{s.detail}; {self.decoder.detail()}",
        )


def subscriptions(groups: Sequence[str]) -> list[str]:
    """The topic filters for `groups` (every group without any); ConfigError for a group id no topic can hold."""
    for group in groups:
        if not group or any(c in group for c in "/+#"):
            raise ConfigError(f"sparkplug.groups: {short_repr(group)} is not a Sparkplug group id "
                              "(non-empty, without '/', '+' or '#')")
    return [f"{NAMESPACE}/{g}/#" for g in groups] or [f"{NAMESPACE}/#"]

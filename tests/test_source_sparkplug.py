"""Sparkplug B source: the schema, the decoder's host-application rules, and end to end through Mosquitto.

The edge node in these tests (`EdgeNode`) speaks the same proto (tagwriter's
schema module) and publishes through a real paho client to the real Mosquitto
on 127.0.0.1:1883 (tests skip with the reason when it does not answer). It
publishes at QoS 1 (the spec says QoS 0 for BIRTH and DATA) so that the ack
after settle and the broker's redelivery are part of what is tested.
"""

from __future__ import annotations

import csv
import itertools
import os
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waits import wait_until

from tagwriter.config import load
from tagwriter.errors import ConfigError
from tagwriter.models import TagValue, format_ts, to_epoch_us
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.sparkplug import (
    SparkplugConfig,
    SparkplugDecoder,
    SparkplugSource,
    subscriptions,
)
from tagwriter.sources.sparkplug_schema import DataType as T
from tagwriter.sources.sparkplug_schema import Payload

M = Payload.Metric
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BROKER = ("127.0.0.1", 1883)
_ids = itertools.count()


# -- a Sparkplug edge node for the tests -----------------------------------------


def metric(datatype: int | None, value: Any, *, name: str = "", alias: int | None = None,
           ts: int | None = None, **flags: Any) -> Any:
    """One metric with `value` in the field the spec gives `datatype` (signed ints as two's complement)."""
    m = M(**flags)
    if name:
        m.name = name
    if alias is not None:
        m.alias = alias
    if ts is not None:
        m.timestamp = ts
    if datatype is not None:
        m.datatype = datatype
    if value is None:
        m.is_null = True
    elif datatype in (T.Int8, T.Int16, T.Int32, T.UInt8, T.UInt16, T.UInt32):
        m.int_value = value & 0xFFFF_FFFF
    elif datatype in (T.Int64, T.UInt64, T.DateTime):
        m.long_value = value & 0xFFFF_FFFF_FFFF_FFFF
    elif datatype == T.Float:
        m.float_value = value
    elif datatype == T.Double:
        m.double_value = value
    elif datatype == T.Boolean:
        m.boolean_value = value
    elif datatype in (T.String, T.Text, T.UUID):
        m.string_value = value
    elif datatype in (T.Bytes, T.File):
        m.bytes_value = value
    return m


class EdgeNode:
    """Builds (topic, payload) pairs the way a Sparkplug edge node does: one seq for the node, bdSeq, aliases."""

    def __init__(self, group: str, node: str, bd_seq: int = 7) -> None:
        self.group, self.node, self.bd_seq = group, node, bd_seq
        self.seq = 0

    def topic(self, verb: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{verb}/{self.node}" + (f"/{device}" if device else "")

    def message(self, verb: str, metrics: list[Any], *, device: str | None = None, ts: int = BASE_MS,
                with_seq: bool = True) -> tuple[str, bytes]:
        payload = Payload(timestamp=ts)
        if with_seq:
            payload.seq = self.seq
            self.seq = (self.seq + 1) % 256
        payload.metrics.extend(metrics)
        return self.topic(verb, device), payload.SerializeToString()

    def nbirth(self, metrics: list[Any], ts: int = BASE_MS) -> tuple[str, bytes]:
        self.seq = 0
        control = [metric(T.UInt64, self.bd_seq, name="bdSeq", ts=ts),
                   metric(T.Boolean, False, name="Node Control/Rebirth", ts=ts)]
        return self.message("NBIRTH", control + metrics, ts=ts)

    def ndeath(self) -> tuple[str, bytes]:
        return self.message("NDEATH", [metric(T.UInt64, self.bd_seq, name="bdSeq")], with_seq=False)


def pump_birth(edge: EdgeNode, ts: int = BASE_MS) -> list[tuple[str, bytes]]:
    """NBIRTH (one number, one string) and DBIRTH of device "pump" (Int32, Boolean, Double)."""
    return [
        edge.nbirth([metric(T.Float, 12.5, name="Supply Voltage", alias=1, ts=ts),
                     metric(T.String, "Raspbian", name="Properties/OS", alias=2, ts=ts)], ts),
        edge.message("DBIRTH", [metric(T.Int32, -5, name="speed", alias=10, ts=ts),
                                metric(T.Boolean, True, name="running", alias=11, ts=ts),
                                metric(T.Double, 20.5, name="Temp/Inlet", alias=12, ts=ts)],
                     device="pump", ts=ts),
    ]


def pump_data(edge: EdgeNode, i: int) -> tuple[str, bytes]:
    """DDATA by alias only: two metrics at their own timestamps, one at the payload's."""
    ts = BASE_MS + 1000 + 10 * i
    return edge.message("DDATA", [M(alias=10, timestamp=ts, int_value=i),
                                  M(alias=11, timestamp=ts, boolean_value=i % 2 == 0),
                                  M(alias=12, double_value=i / 4)],
                        device="pump", ts=ts + 5)


def pump_birth_rows(prefix: str, ts_ms: int = BASE_MS) -> list[TagValue]:
    ts = ts_ms * 1000
    return [TagValue(f"{prefix}/Supply Voltage", ts, 12.5), TagValue(f"{prefix}/pump/speed", ts, -5.0),
            TagValue(f"{prefix}/pump/running", ts, 1.0), TagValue(f"{prefix}/pump/Temp/Inlet", ts, 20.5)]


def pump_data_rows(prefix: str, i: int) -> list[TagValue]:
    ts = (BASE_MS + 1000 + 10 * i) * 1000
    return [TagValue(f"{prefix}/pump/speed", ts, float(i)),
            TagValue(f"{prefix}/pump/running", ts, 1.0 if i % 2 == 0 else 0.0),
            TagValue(f"{prefix}/pump/Temp/Inlet", ts + 5000, i / 4)]


class FakeClock:
    """Wall and monotonic time that move only when told (or waited on)."""

    def __init__(self) -> None:
        self.now = BASE_MS / 1000 + 3600.0
        self.mono = 0.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.advance(timeout)
        return event.is_set()

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.now += seconds


class Harness:
    """A decoder with a fake clock that records what it publishes and quarantines."""

    def __init__(self, **settings: Any) -> None:
        self.clock = FakeClock()
        self.published: list[tuple[str, bytes]] = []
        self.quarantined: list[tuple[str, str, str]] = []
        self.connected = True
        self.decoder = SparkplugDecoder(SparkplugConfig(**{"reorder_timeout": 0.0, **settings}),
                                        publish=self._publish, quarantine=self._quarantine, clock=self.clock)

    def _publish(self, topic: str, payload: bytes) -> bool:
        if self.connected:
            self.published.append((topic, payload))
        return self.connected

    def _quarantine(self, bad: Any) -> int:
        self.quarantined.extend(bad)
        return len(bad)

    def feed(self, *messages: tuple[str, bytes]) -> list[TagValue]:
        return [row for topic, payload in messages for row in self.decoder(topic, payload)]

    @property
    def rebirths(self) -> list[str]:
        return [topic for topic, _ in self.published]


# -- the schema: the specification's field numbers --------------------------------


def test_the_schema_encodes_the_specifications_field_numbers() -> None:
    """Wire bytes of known messages, written out by hand from the spec's field numbers and wire types."""
    assert Payload(timestamp=1, seq=2, uuid="u", body=b"b").SerializeToString() == (
        b"\x08\x01" b"\x18\x02" b"\x22\x01u" b"\x2a\x01b")
    one = {  # field number << 3 | wire type, then the value
        "name": (M(name="n"), b"\x0a\x01n"), "alias": (M(alias=3), b"\x10\x03"),
        "timestamp": (M(timestamp=4), b"\x18\x04"), "datatype": (M(datatype=9), b"\x20\x09"),
        "is_historical": (M(is_historical=True), b"\x28\x01"), "is_transient": (M(is_transient=True), b"\x30\x01"),
        "is_null": (M(is_null=True), b"\x38\x01"), "int_value": (M(int_value=5), b"\x50\x05"),
        "long_value": (M(long_value=6), b"\x58\x06"), "float_value": (M(float_value=1.0), b"\x65\x00\x00\x80\x3f"),
        "double_value": (M(double_value=1.0), b"\x69" + b"\x00" * 6 + b"\xf0\x3f"),
        "boolean_value": (M(boolean_value=True), b"\x70\x01"), "string_value": (M(string_value="s"), b"\x7a\x01s"),
        "bytes_value": (M(bytes_value=b"x"), b"\x82\x01\x01x"),
        "dataset_value": (M(dataset_value=Payload.DataSet(num_of_columns=1)), b"\x8a\x01\x02\x08\x01"),
        "template_value": (M(template_value=Payload.Template(version="1")), b"\x92\x01\x03\x0a\x011"),
        "metadata": (M(metadata=Payload.MetaData(size=2)), b"\x42\x02\x18\x02"),
        "properties": (M(properties=Payload.PropertySet(keys=["q"])), b"\x4a\x03\x0a\x01q"),
    }
    for field, (message, wire) in one.items():
        assert message.SerializeToString() == wire, field
    assert Payload(metrics=[M(alias=1)]).SerializeToString() == b"\x12\x02\x10\x01"  # metrics = 2


def test_the_data_types_are_the_specifications() -> None:
    assert [(t.name, t.value) for t in T][:22] == [
        ("Unknown", 0), ("Int8", 1), ("Int16", 2), ("Int32", 3), ("Int64", 4), ("UInt8", 5), ("UInt16", 6),
        ("UInt32", 7), ("UInt64", 8), ("Float", 9), ("Double", 10), ("Boolean", 11), ("String", 12),
        ("DateTime", 13), ("Text", 14), ("UUID", 15), ("DataSet", 16), ("Bytes", 17), ("File", 18),
        ("Template", 19), ("PropertySet", 20), ("PropertySetList", 21)]
    assert (T.Int8Array, T.DateTimeArray) == (22, 34) and len(T) == 35


# -- births, aliases, values ---------------------------------------------------------


def test_births_and_data_by_alias_become_rows_at_their_own_timestamps() -> None:
    h = Harness()
    edge = EdgeNode("plant", "edge1")
    assert h.feed(*pump_birth(edge)) == pump_birth_rows("plant/edge1")
    assert h.feed(pump_data(edge, 3)) == pump_data_rows("plant/edge1", 3)
    assert h.decoder.stats.skipped == 1  # Properties/OS, a String
    assert h.published == [] and h.quarantined == []


@pytest.mark.parametrize(("datatype", "sent", "value"), [
    (T.Int8, -1, -1.0), (T.Int8, 0xFF, -1.0), (T.Int16, -300, -300.0), (T.Int32, -2**31, -2.0**31),
    (T.Int64, -2, -2.0), (T.UInt8, 255, 255.0), (T.UInt16, 65535, 65535.0), (T.UInt32, 2**32 - 1, 2.0**32 - 1),
    (T.UInt64, 2**64 - 1, 2.0**64), (T.Float, 0.25, 0.25), (T.Double, -1e300, -1e300),
    (T.Boolean, True, 1.0), (T.Boolean, False, 0.0),
])
def test_numbers_and_booleans_become_floats(datatype: int, sent: Any, value: float) -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(edge.nbirth([metric(datatype, sent, name="m", alias=1)]))
    assert [r.value for r in h.feed(edge.message("NDATA", [metric(datatype, sent, alias=1)]))] == [value]


def test_signed_ints_written_the_tahu_way_in_a_64_bit_field_still_read_right() -> None:
    """Some encoders put an Int32 in long_value, or sign-extend an Int8 to 64 bits: the datatype decides."""
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(edge.nbirth([metric(T.Int32, 0, name="a", alias=1), metric(T.Int8, 0, name="b", alias=2)]))
    rows = h.feed(edge.message("NDATA", [M(alias=1, long_value=2**64 - 7), M(alias=2, long_value=2**64 - 1)]))
    assert [r.value for r in rows] == [-7.0, -1.0]


def test_nulls_non_finite_and_the_quality_property() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    stale = metric(T.Double, 3.0, alias=3)
    stale.properties.keys.append("Quality")
    stale.properties.values.add(type=T.Int32, int_value=500)
    bad = metric(T.Double, 4.0, alias=4)
    bad.properties.keys.append("Quality")
    bad.properties.values.add(type=T.Int32, int_value=0)
    h.feed(edge.nbirth([metric(T.Double, 0.0, name=n, alias=a) for a, n in enumerate("wxyz", 1)]))
    rows = h.feed(edge.message("NDATA", [metric(T.Double, None, alias=1), metric(T.Double, float("nan"), alias=2),
                                         stale, bad]))
    assert [(r.value, r.quality) for r in rows] == [(None, 0), (None, 0), (3.0, 64), (4.0, 0)]


def test_other_datatypes_are_skipped_and_counted_not_quarantined() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    dataset = M(name="ds", alias=3, datatype=T.DataSet, dataset_value=Payload.DataSet(num_of_columns=1))
    template = M(name="udt", alias=4, datatype=T.Template, template_value=Payload.Template(version="1"))
    rows = h.feed(edge.nbirth([metric(T.String, "x", name="s", alias=1), metric(T.Bytes, b"\0", name="b", alias=2),
                               dataset, template, metric(T.DateTime, BASE_MS, name="when", alias=5),
                               metric(T.Double, 1.0, name="ok", alias=6)]))
    assert [r.tag for r in rows] == ["g/n/ok"]
    assert h.decoder.stats.skipped == 5 and h.quarantined == []


def test_tag_names_by_separator_and_group_and_excluded_and_transient_metrics() -> None:
    h = Harness(separator=".", include_group=False, exclude_metrics=["Node Control/*", "bdSeq", "Debug*"])
    edge = EdgeNode("g", "n")
    rows = h.feed(edge.nbirth([metric(T.Double, 1.0, name="Inputs/A", alias=1),
                               metric(T.Double, 2.0, name="Debug/x", alias=2),
                               metric(T.Double, 3.0, name="t", alias=3, is_transient=True)]))
    assert [r.tag for r in rows] == ["n.Inputs/A"]  # folders inside a metric name are the metric's own
    assert h.decoder.stats.transient == 1
    kept = Harness(store_transient=True)
    assert len(kept.feed(EdgeNode("g", "n").nbirth([metric(T.Double, 3.0, name="t", alias=3, is_transient=True)]))) == 1


def test_a_value_without_a_timestamp_takes_the_payloads() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(edge.nbirth([metric(T.Double, 1.0, name="m", alias=1)]))
    rows = h.feed(edge.message("NDATA", [metric(T.Double, 2.0, alias=1)], ts=BASE_MS + 250))
    assert rows == [TagValue("g/n/m", (BASE_MS + 250) * 1000, 2.0)]


# -- seq, rebirth requests -----------------------------------------------------------


def decoded(payload: bytes) -> Any:
    return Payload.FromString(payload)


def test_a_seq_gap_requests_a_rebirth_once_per_holdoff() -> None:
    h = Harness(rebirth_holdoff=5.0)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge), pump_data(edge, 0))
    edge.seq += 1  # one message lost
    assert h.feed(pump_data(edge, 1)) == pump_data_rows("g/n", 1)  # still written
    assert h.rebirths == ["spBv1.0/g/NCMD/n"]
    request = decoded(h.published[0][1])
    assert not request.HasField("seq")  # the spec: NCMD has no seq
    rebirth = [(m.name, m.datatype, m.boolean_value) for m in request.metrics]
    assert rebirth == [("Node Control/Rebirth", T.Boolean, True)]
    edge.seq += 1
    h.feed(pump_data(edge, 2))
    assert len(h.rebirths) == 1 and h.decoder.stats.seq_gaps == 2  # held off
    h.clock.advance(5.0)
    edge.seq += 1
    h.feed(pump_data(edge, 3))
    assert len(h.rebirths) == 2


def test_seq_wraps_from_255_to_0_without_a_gap() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    h.feed(*(pump_data(edge, i) for i in range(300)))
    assert h.decoder.stats.seq_gaps == 0 and h.published == []


def test_a_late_message_within_the_reorder_timeout_is_no_gap() -> None:
    h = Harness(reorder_timeout=2.0)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    first, second, third = pump_data(edge, 0), pump_data(edge, 1), pump_data(edge, 2)
    h.feed(first, third)
    h.clock.advance(1.0)
    h.decoder.due_rebirths()
    assert h.published == []
    h.feed(second)  # arrives late, within the timeout
    h.clock.advance(5.0)
    h.decoder.due_rebirths()
    assert h.published == [] and h.decoder.stats.late == 1


def test_a_missing_message_requests_a_rebirth_when_the_reorder_timeout_ends() -> None:
    h = Harness(reorder_timeout=2.0)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    edge.seq += 1
    h.feed(pump_data(edge, 1))
    h.clock.advance(1.9)
    h.decoder.due_rebirths()
    assert h.published == []
    h.clock.advance(0.2)
    h.decoder.due_rebirths()
    assert h.rebirths == ["spBv1.0/g/NCMD/n"]


def test_a_rebirth_that_cannot_go_out_is_asked_again_once_connected() -> None:
    h = Harness(reorder_timeout=1.0)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    edge.seq += 1
    h.feed(pump_data(edge, 1))
    h.connected = False
    h.clock.advance(2.0)
    h.decoder.due_rebirths()
    h.connected = True
    h.decoder.due_rebirths()
    assert h.rebirths == ["spBv1.0/g/NCMD/n"]


def test_a_redelivered_message_is_a_duplicate_not_a_gap() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    sent = [pump_data(edge, i) for i in range(10)]
    h.feed(*sent)
    again = h.feed(*sent[4:])  # a reconnect: the broker sends the unacknowledged ones again
    h.feed(pump_data(edge, 10))
    assert again == [r for i in range(4, 10) for r in pump_data_rows("g/n", i)]  # duplicate rows: the key drops them
    assert h.decoder.stats.duplicates == 6 and h.decoder.stats.seq_gaps == 0 and h.published == []


def test_data_before_any_birth_asks_for_one_and_quarantines_what_has_no_name() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    edge.seq = 40  # tagwriter started while the node was long online
    rows = h.feed(edge.message("NDATA", [metric(T.Double, 1.0, alias=1), metric(T.Double, 2.0, name="named")]))
    assert rows == [TagValue("g/n/named", BASE_MS * 1000, 2.0)]
    assert h.rebirths == ["spBv1.0/g/NCMD/n"]
    (where, why, raw), = h.quarantined
    assert where == "sparkplug spBv1.0/g/NDATA/n"
    assert "alias 1" in why and "alias: 1" in raw and "double_value: 1" in raw


def test_an_alias_no_birth_defined_is_quarantined_and_asks_for_a_rebirth() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    rows = h.feed(edge.message("DDATA", [M(alias=99, double_value=1.0), M(alias=12, double_value=2.0)], device="pump"))
    assert [r.tag for r in rows] == ["g/n/pump/Temp/Inlet"]
    assert [q[0] for q in h.quarantined] == ["sparkplug spBv1.0/g/DDATA/n/pump"]
    assert h.rebirths == ["spBv1.0/g/NCMD/n"] and h.decoder.stats.bad_metrics == 1


def test_rebirth_requests_can_be_turned_off() -> None:
    h = Harness(rebirth=False)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    edge.seq += 3
    h.feed(pump_data(edge, 0))
    assert h.published == [] and h.decoder.stats.seq_gaps == 1


# -- deaths --------------------------------------------------------------------------


def test_ndeath_writes_every_last_value_again_bad_at_the_receive_time() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge), pump_data(edge, 0), pump_data(edge, 1))
    rows = h.feed(edge.ndeath())
    death_us = to_epoch_us(h.clock.now)
    assert sorted(rows) == sorted([TagValue("g/n/Supply Voltage", death_us, 12.5, 0),
                                   *(r._replace(ts_us=death_us, quality=0) for r in pump_data_rows("g/n", 1))])
    assert h.feed(edge.ndeath()) == []  # the Will Message after the node's own NDEATH
    edge.seq = 5
    h.feed(pump_data(edge, 2))  # data after the death, before a birth: unknown aliases
    assert h.rebirths == ["spBv1.0/g/NCMD/n"] and h.decoder.stats.bad_metrics == 3


def test_an_ndeath_of_an_older_session_is_passed_over() -> None:
    """The spec: a Will Message may arrive after the next NBIRTH; its bdSeq says it is old."""
    h = Harness()
    edge = EdgeNode("g", "n", bd_seq=3)
    stale_death = edge.ndeath()
    edge.bd_seq = 4
    h.feed(*pump_birth(edge))
    assert h.feed(stale_death) == []
    assert h.decoder.stats.deaths == 0 and h.decoder.stats.ignored == 1
    assert len(h.feed(edge.ndeath())) == 4


def test_ddeath_marks_the_device_bad_at_the_payload_time_and_forgets_its_aliases() -> None:
    h = Harness()
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge), pump_data(edge, 0))
    rows = h.feed(edge.message("DDEATH", [], device="pump", ts=BASE_MS + 9000))
    assert sorted(rows) == sorted(r._replace(ts_us=(BASE_MS + 9000) * 1000, quality=0)
                                  for r in pump_data_rows("g/n", 0))
    assert h.feed(pump_data(edge, 1)) == []  # its aliases died with it
    assert h.decoder.stats.bad_metrics == 3


def test_a_death_row_is_never_older_than_the_last_value() -> None:
    """A host clock behind the edge node's: the bad row goes just after the last value, so it is the newest."""
    h = Harness()
    edge = EdgeNode("g", "n")
    h.clock.now = BASE_MS / 1000 - 60
    h.feed(edge.nbirth([metric(T.Double, 1.0, name="m", alias=1)]))
    assert h.feed(edge.ndeath()) == [TagValue("g/n/m", BASE_MS * 1000 + 1, 1.0, 0)]


def test_mark_death_off_writes_nothing_at_a_death() -> None:
    h = Harness(mark_death=False)
    edge = EdgeNode("g", "n")
    h.feed(*pump_birth(edge))
    assert h.feed(edge.ndeath()) == [] and h.decoder.stats.deaths == 1


# -- what is not Sparkplug -------------------------------------------------------------


@pytest.mark.parametrize(("topic", "payload", "why"), [
    ("spBv1.0/g/NDATA/n", b"\xff\xff\xff garbage", "not a Sparkplug B payload"),
    ("spBv1.0/g/NDATA/n", Payload(timestamp=1).SerializeToString(), "NDATA without a seq"),
    ("spBv1.0/g/NDATA/n", Payload(seq=300).SerializeToString(), "seq 300 is outside 0..255"),
    ("spBv1.0/g/NDATA/n/extra", b"", "a NDATA topic must be spBv1.0/group/TYPE/edge node"),
    ("spBv1.0/g/DDATA/n", b"", "a DDATA topic must be spBv1.0/group/TYPE/edge node/device"),
    ("spBv1.0/g/NFOO/n", b"", "unknown Sparkplug message type 'NFOO'"),
    ("plant/line1/temp", b"1.5", "not a Sparkplug B topic"),
])
def test_what_is_not_sparkplug_b_raises_for_the_quarantine(topic: str, payload: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Harness().decoder(topic, payload)


def test_commands_and_host_state_are_not_values() -> None:
    h = Harness()
    assert h.decoder("spBv1.0/g/NCMD/n", b"anything") == []
    assert h.decoder("spBv1.0/g/DCMD/n/d", b"") == []
    assert h.decoder("spBv1.0/STATE/host1", b'{"online": true}') == []
    assert h.decoder.stats.ignored == 3


def test_group_ids_become_subscriptions() -> None:
    assert subscriptions([]) == ["spBv1.0/#"]
    assert subscriptions(["a", "b"]) == ["spBv1.0/a/#", "spBv1.0/b/#"]
    with pytest.raises(ConfigError, match=r"sparkplug\.groups"):
        subscriptions(["a/b"])


def test_without_protobuf_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import tagwriter.sources

    monkeypatch.delattr(tagwriter.sources, "sparkplug_schema")
    monkeypatch.setitem(sys.modules, "tagwriter.sources.sparkplug_schema", None)  # import fails like a missing one
    with pytest.raises(ConfigError, match=r"needs protobuf: pip install '\.\[mqtt\]'"):
        SparkplugDecoder(SparkplugConfig())


# -- through the real Mosquitto ---------------------------------------------------------


@pytest.fixture
def broker() -> tuple[str, int]:
    try:
        socket.create_connection(BROKER, timeout=1).close()
    except OSError as exc:
        pytest.skip(f"no MQTT broker at {BROKER[0]}:{BROKER[1]}: {exc}")
    return BROKER


class Publisher:
    """The edge node's MQTT client; it also collects the NCMDs sent to its group (rebirth requests)."""

    def __init__(self, address: tuple[str, int], group: str) -> None:
        import paho.mqtt.client as paho

        self.commands: list[tuple[str, bytes]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"edge-{group}",
                                  protocol=paho.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.commands.append((m.topic, m.payload))
        self.client.connect(*address)
        self.client.loop_start()
        result, _mid = self.client.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
        assert result == 0

    def send(self, *messages: tuple[str, bytes], qos: int = 1) -> None:
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_ids)}"


def make_pipeline(tmp_path: Path, sink: MemorySink | None = None) -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'tags.db'}",
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "writer.flush_interval": 0.02,
    })
    return Pipeline(config, sink=sink)


def table(tmp_path: Path) -> list[tuple[str, str, float | None, int]]:
    with sqlite3.connect(tmp_path / "tags.db") as db:
        return db.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY tag_name, ts").fetchall()


def as_table(rows: list[TagValue]) -> list[tuple[str, str, float | None, int]]:
    return sorted((r.tag, format_ts(r.ts_us), r.value, r.quality) for r in rows)


def quarantined(tmp_path: Path) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted((tmp_path / "backup" / "quarantine").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            out.extend(csv.DictReader(f))
    return out


class Running:
    """A SparkplugSource on its own thread, as the service runs it."""

    def __init__(self, pipeline: Pipeline, group: str, client_id: str, port: int = BROKER[1],
                 stop_timeout: float = 2.0, **sp: Any) -> None:
        from tagwriter.sources.mqtt import MqttConfig

        broker = MqttConfig(host="127.0.0.1", port=port, client_id=client_id, session_expiry=120,
                            reconnect_min_delay=0.1, reconnect_max_delay=0.5, stop_timeout=stop_timeout)
        self.source = SparkplugSource(broker, SparkplugConfig(groups=[group], **{"reorder_timeout": 0.0, **sp}))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.source.run, args=(pipeline, self.stop), daemon=True)
        self.thread.start()

    def subscribed(self, publisher: Publisher, group: str) -> None:
        """Wait until the source receives its group's messages (a DCMD: not a value, not counted as bad)."""
        probe = (f"spBv1.0/{group}/DCMD/probe/x", b"")

        def seen() -> bool:
            publisher.send(probe, qos=0)
            return self.source.status().messages > 0

        wait_until(seen, "the source to subscribe", 10)

    def end(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the source did not stop in time"


@pytest.fixture
def group() -> str:
    return unique("tw")


def test_birth_data_gap_rebirth_garbage_and_death_through_mosquitto(
        broker: tuple[str, int], tmp_path: Path, group: str) -> None:
    pipeline = make_pipeline(tmp_path).start()
    edge = EdgeNode(group, "edge1")
    publisher = Publisher(broker, group)
    running = Running(pipeline, group, unique("host"), reorder_timeout=0.5)  # the ticker sees the gap
    prefix = f"{group}/edge1"
    try:
        running.subscribed(publisher, group)
        publisher.send(*pump_birth(edge), *(pump_data(edge, i) for i in range(30)))
        edge.seq += 1  # a message the broker never saw: a seq gap
        publisher.send(pump_data(edge, 30))
        wait_until(lambda: publisher.commands, "the rebirth request (NCMD)", 10)
        (topic, request), = publisher.commands
        assert topic == f"spBv1.0/{group}/NCMD/edge1"
        assert [(m.name, m.boolean_value) for m in decoded(request).metrics] == [("Node Control/Rebirth", True)]
        rebirth_ms = BASE_MS + 1000 + 10 * 30 + 7  # after DDATA 30, before DDATA 31
        publisher.send(*pump_birth(edge, rebirth_ms), *(pump_data(edge, i) for i in range(31, 60)))
        publisher.send((edge.topic("DDATA", "pump"), b"\x0bnot protobuf\xff"))
        publisher.send(edge.ndeath())
        wait_until(lambda: running.source.decoder.stats.deaths == 1, "the NDEATH", 10)
        wait_until(lambda: running.source.status().acks_pending == 0, "every message acknowledged", 10)
        status = running.source.status()
    finally:
        running.end()
        publisher.close()
    assert pipeline.stop(10.0)

    births = pump_birth_rows(prefix) + pump_birth_rows(prefix, rebirth_ms)
    data = [r for i in range(60) for r in pump_data_rows(prefix, i)]
    got = table(tmp_path)
    deaths = [row for row in got if row[3] == 0]
    assert sorted(row for row in got if row[3] != 0) == as_table(births + data)  # each value exactly once
    assert sorted((tag, value) for tag, _ts, value, _q in deaths) == sorted(
        [(f"{prefix}/Supply Voltage", 12.5)] + [(r.tag, r.value) for r in pump_data_rows(prefix, 59)])
    assert len({ts for _tag, ts, _v, _q in deaths}) == 1  # one death time: when tagwriter received the NDEATH
    snap = pipeline.snapshot()
    assert snap.written == len(got) == len(births) + len(data) + 4 and snap.duplicates == 0
    (bad,) = quarantined(tmp_path)
    assert bad["source"] == f"sparkplug spBv1.0/{group}/DDATA/edge1/pump"
    assert "not a Sparkplug B payload" in bad["error_message"]
    assert bad["raw"] == "\x0bnot protobuf\\xff"  # the bytes that are not UTF-8 as \xNN escapes
    assert status.bad_messages == 1 and status.kind == "sparkplug" and status.connected
    assert "1 seq gaps, 1 rebirths requested" in status.detail


def test_unsettled_messages_come_again_after_a_restart_and_are_written_once(
        broker: tuple[str, int], tmp_path: Path, group: str) -> None:
    """Ack after settle: what a stopped source held unsettled is not acknowledged, so the broker keeps it."""
    client_id = unique("host")
    blocked = MemorySink()
    blocked.block()
    first = make_pipeline(tmp_path / "first", blocked).start()
    edge = EdgeNode(group, "edge1")
    publisher = Publisher(broker, group)
    running = Running(first, group, client_id, stop_timeout=0.5)
    try:
        running.subscribed(publisher, group)
        publisher.send(*pump_birth(edge), *(pump_data(edge, i) for i in range(20)))
        # Nothing settles (the sink holds its first batch), so nothing is acknowledged.
        wait_until(lambda: running.source.status().acks_pending == 22, "the messages to arrive unacknowledged", 10)
        running.end()
        wait_until(lambda: not running.source.connection.connected, "the first source to disconnect", 10)
        blocked.release()
        first.stop(5.0)

        second = make_pipeline(tmp_path).start()
        again = Running(second, group, client_id)
        wait_until(lambda: again.source.status().messages >= 22, "the broker to send them again", 10)
        wait_until(lambda: again.source.status().acks_pending == 0, "every message acknowledged", 10)
        status = again.source.status()
        again.end()
    finally:
        publisher.close()
    assert second.stop(10.0)
    prefix = f"{group}/edge1"
    data = [r for i in range(20) for r in pump_data_rows(prefix, i)]
    assert table(tmp_path) == as_table(pump_birth_rows(prefix) + data)
    assert status.redeliveries > 0 and publisher.commands == []  # DUP: those the broker had in flight


@pytest.mark.slow
def test_a_30s_disconnect_loses_nothing_and_redeliveries_are_no_seq_gap(
        broker: tuple[str, int], tmp_path: Path, group: str) -> None:
    from faultproxy import FaultProxy

    gate = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    pipeline = make_pipeline(tmp_path, gate).start()
    edge = EdgeNode(group, "edge1")
    publisher = Publisher(broker, group)
    with FaultProxy(broker).start() as proxy:
        running = Running(pipeline, group, unique("host"), port=proxy.address[1])
        try:
            running.subscribed(publisher, group)
            publisher.send(*pump_birth(edge), *(pump_data(edge, i) for i in range(10)))
            # Written first: acks_pending is 0 as well before the first of them has arrived.
            wait_until(lambda: pipeline.snapshot().written == 4 + 30 and running.source.status().acks_pending == 0,
                       "the first messages written and acknowledged", 10)
            gate.block()  # the next ones arrive but do not settle: not acknowledged
            publisher.send(*(pump_data(edge, i) for i in range(10, 20)))
            wait_until(lambda: running.source.status().acks_pending == 10, "unsettled messages", 10)
            proxy.refuse()
            wait_until(lambda: not running.source.status().connected, "the source to see the disconnect", 10)
            publisher.send(*(pump_data(edge, i) for i in range(20, 30)))  # kept by the broker for the session
            gate.release()
            wait_until(lambda: pipeline.snapshot().written >= 4 + 60, "the held values written", 10)
            end = time.monotonic() + 30.0  # the outage lasts 30 s; the state stays visible all along
            while time.monotonic() < end:
                assert not running.source.status().connected
                time.sleep(1.0)
            proxy.pass_through()
            wait_until(lambda: running.source.status().connected, "the reconnect", 15)
            wait_until(lambda: pipeline.snapshot().written >= 4 + 90, "the values sent while away", 15)
            wait_until(lambda: running.source.status().acks_pending == 0, "every message acknowledged", 10)
            status = running.source.status()
        finally:
            running.end()
            publisher.close()
    assert pipeline.stop(10.0)
    prefix = f"{group}/edge1"
    data = [r for i in range(30) for r in pump_data_rows(prefix, i)]
    assert table(tmp_path) == as_table(pump_birth_rows(prefix) + data)
    assert status.reconnects == 1 and status.redeliveries == 10
    assert pipeline.snapshot().duplicates == 30  # the ten redelivered messages' rows
    stats = running.source.decoder.stats
    assert stats.duplicates == 10 and stats.seq_gaps == 0 and publisher.commands == []


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_until(lambda: not [t for t in set(threading.enumerate()) - before
                            if t.name.startswith("tagwriter-sparkplug")], "the seq ticker to end", 5)

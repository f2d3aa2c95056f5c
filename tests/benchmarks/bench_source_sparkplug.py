"""Benchmark: Sparkplug B values/s through the real Mosquitto into SQLite, vs paho alone receiving them.

Not collected by pytest. Run:  python tests/benchmarks/bench_source_sparkplug.py [--messages 4000] [--rounds 3]

An edge node in a child process (so it does not share the GIL with the
receiver) publishes NBIRTH + DBIRTH, then `messages` DDATA payloads of
`metrics` Double metrics each, by alias, each with its own timestamp, at QoS 1
to 127.0.0.1:1883. Mosquitto keeps at most 1,000 queued QoS 1 messages per
client beyond those in flight (its default max_queued_messages) and drops the
rest, so the parent paces the publisher: it may run at most LAG messages
ahead of what the receiver has acknowledged (tagwriter acknowledges after
settle, up to a flush interval later than it receives; unpaced, Mosquitto
drops messages and the Sparkplug seq check sees the gaps). The same pacing for every receiver; rounds alternate:
- paho:        a bare paho 2.x client, QoS 1, auto-ack; counts messages;
- paho+decode: the same, and parses each payload with the Sparkplug schema;
- tagwriter:   SparkplugSource -> Pipeline -> SQLite (a fresh file per round),
               PUBACK after settle; done when every value is written;
- pipeline:    the same rows submitted straight to a Pipeline into SQLite, no MQTT: the
               ceiling the database side sets (same defaults: batches of 500, flush 1 s).
Reported: values/s per receiver (medians over the rounds) and tagwriter's ratio to each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LAG = 400  # messages the publisher may run ahead of the receiver (below Mosquitto's queue of 1,000)
BASE_MS = 1_767_225_600_000
BROKER = ("127.0.0.1", 1883)


# -- the edge node (child process) ---------------------------------------------------


def payloads(group: str, messages: int, metrics: int) -> list[tuple[str, bytes]]:
    """NBIRTH, DBIRTH, then the DDATA messages, serialized ahead of time."""
    from tagwriter.sources.sparkplug_schema import DataType, Payload

    node, dev = f"spBv1.0/{group}/NBIRTH/edge", f"spBv1.0/{group}/DBIRTH/edge/dev"
    out = []
    birth = Payload(timestamp=BASE_MS, seq=0)
    birth.metrics.add(name="bdSeq", datatype=DataType.UInt64, long_value=0, timestamp=BASE_MS)
    out.append((node, birth.SerializeToString()))
    dbirth = Payload(timestamp=BASE_MS, seq=1)
    for a in range(metrics):
        dbirth.metrics.add(name=f"m{a:03d}", alias=a, datatype=DataType.Double, double_value=0.0, timestamp=BASE_MS)
    out.append((dev, dbirth.SerializeToString()))
    topic = f"spBv1.0/{group}/DDATA/edge/dev"
    for i in range(messages):
        ts = BASE_MS + 1 + i
        data = Payload(timestamp=ts, seq=(i + 2) % 256)
        for a in range(metrics):
            data.metrics.add(alias=a, double_value=i + a / 1000, timestamp=ts)
        out.append((topic, data.SerializeToString()))
    return out


def publish(group: str, messages: int, metrics: int) -> None:
    """Child: publish while the parent allows (it writes the allowed total on stdin, one number a line)."""
    import paho.mqtt.client as paho

    todo = payloads(group, messages, metrics)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-edge-{group}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect(*BROKER)
    client.loop_start()
    print("ready", flush=True)
    sent = 0
    infos = []
    for line in sys.stdin:
        allowed = min(int(line), len(todo))
        while sent < allowed:
            infos.append(client.publish(*todo[sent], qos=1))
            sent += 1
        if sent == len(todo):
            break
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


# -- the receivers (parent) -------------------------------------------------------------


def run_round(group: str, messages: int, metrics: int, received: Callable[[], int], done: Callable[[], bool]) -> float:
    """Start the edge node, pace it by `received()` messages, return seconds until `done()`."""
    child = subprocess.Popen([sys.executable, __file__, "--publish", group, str(messages), str(metrics)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    total = messages + 2
    started = time.perf_counter()
    allowed = 0
    while not done():
        if allowed < total and received() + LAG > allowed:
            allowed = min(total, received() + LAG + LAG // 2)
            child.stdin.write(f"{allowed}\n")
            child.stdin.flush()
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    child.stdin.close()
    child.wait(30)
    return elapsed


def bench_paho(group: str, messages: int, metrics: int, decode: bool) -> float:
    import paho.mqtt.client as paho

    from tagwriter.sources.sparkplug_schema import Payload

    count = 0
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, m: paho.MQTTMessage) -> None:
        nonlocal count
        if decode:
            Payload.FromString(m.payload)
        count += 1

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-host-{group}", protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(*BROKER)
    client.loop_start()
    client.subscribe(f"spBv1.0/{group}/#", qos=1)
    subscribed.wait(5)
    try:
        elapsed = run_round(group, messages, metrics, lambda: count, lambda: count >= messages + 2)
    finally:
        client.disconnect()
        client.loop_stop()
    return messages * metrics / elapsed


def bench_tagwriter(group: str, messages: int, metrics: int, work: Path) -> float:
    from tagwriter.pipeline import Pipeline
    from tagwriter.sources.mqtt import MqttConfig
    from tagwriter.sources.sparkplug import SparkplugConfig, SparkplugSource

    pipeline = Pipeline(_config(work)).start()
    broker = MqttConfig(client_id=f"bench-host-{group}", session_expiry=60)
    source = SparkplugSource(broker, SparkplugConfig(groups=[group]))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(pipeline, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not source.connection.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the SUBACK follows the CONNACK; no message of this group is sent before the round
    values = messages * metrics + metrics  # the DBIRTH's values too
    try:
        elapsed = run_round(group, messages, metrics, lambda: acked(source),
                            lambda: pipeline.snapshot().written >= values)
    finally:
        stop.set()
        thread.join(10)
        pipeline.stop(30)
    stats = source.decoder.stats
    assert stats.seq_gaps == 0 and stats.bad_metrics == 0, stats
    return messages * metrics / elapsed


def bench_pipeline(messages: int, metrics: int, work: Path) -> float:
    from tagwriter.models import TagValue
    from tagwriter.pipeline import Pipeline

    pipeline = Pipeline(_config(work)).start()
    rows = [TagValue(f"g/edge/dev/m{a:03d}", (BASE_MS + 1 + i) * 1000, i + a / 1000, 192)
            for i in range(messages) for a in range(metrics)]
    started = time.perf_counter()
    step = 200 * metrics  # what one hand-over of the MQTT connection submits at most
    for k in range(0, len(rows), step):
        pipeline.wait_for_room(step)
        pipeline.submit(rows[k:k + step])
    while pipeline.snapshot().written < len(rows):
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    pipeline.stop(30)
    return len(rows) / elapsed


def _config(work: Path) -> Any:
    from tagwriter.config import load

    return load(None, env={}, overrides={
        "database.url": f"sqlite:///{work / 'tags.db'}", "backup.directory": str(work / "backup"),
        "backup.quarantine_directory": str(work / "backup" / "quarantine"),
    })


def acked(source: object) -> int:
    """Messages the source has acknowledged: the broker holds the rest (and drops what passes its queue)."""
    status = source.status()  # type: ignore[attr-defined]
    return int(status.messages - status.acks_pending)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--metrics", type=int, default=50, help="values per DDATA message")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--publish", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.publish:
        publish(args.publish[0], int(args.publish[1]), int(args.publish[2]))
        return 0
    results: dict[str, list[float]] = {"paho": [], "paho+decode": [], "tagwriter": [], "pipeline": []}
    tag = f"b{os.getpid()}"
    for r in range(args.rounds):
        for name in results:
            group = f"{tag}r{r}{name.replace('+', '')}"
            if name in ("tagwriter", "pipeline"):
                with tempfile.TemporaryDirectory() as tmp:
                    if name == "tagwriter":
                        rate = bench_tagwriter(group, args.messages, args.metrics, Path(tmp))
                    else:
                        rate = bench_pipeline(args.messages, args.metrics, Path(tmp))
            else:
                rate = bench_paho(group, args.messages, args.metrics, decode=name == "paho+decode")
            results[name].append(rate)
            print(f"round {r + 1} {name:12} {rate:12,.0f} values/s", flush=True)
    med = {name: statistics.median(rates) for name, rates in results.items()}
    print(f"\n{args.messages} DDATA x {args.metrics} metrics per round, medians of {args.rounds} rounds:")
    for name, rate in med.items():
        print(f"  {name:12} {rate:12,.0f} values/s  ({rate / args.metrics:9,.0f} messages/s)")
    print(f"  tagwriter / paho        = {med['tagwriter'] / med['paho']:.2f}")
    print(f"  tagwriter / paho+decode = {med['tagwriter'] / med['paho+decode']:.2f}")
    print(f"  tagwriter / pipeline    = {med['tagwriter'] / med['pipeline']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

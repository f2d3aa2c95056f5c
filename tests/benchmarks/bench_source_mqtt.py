"""Benchmark: the MQTT source (broker -> MqttSource -> Pipeline -> SQLite) vs paho alone receiving.

Not collected by pytest. Run:

    python tests/benchmarks/bench_source_mqtt.py [--messages 20000] [--rounds 3] [--json out.json]

Each round drains a backlog: a private Mosquitto (started here on a free port,
no queue limit, no persistence) holds N QoS 1 messages published into a
persistent session while nobody was connected; then the receiver connects with
that client id and the clock runs from connect until the last value is in
(MQTT v5, receive maximum 1000 for both, so the publisher is not in the
measured path and both get the same stream):
- tagwriter: `MqttSource` (JSON decode, one submit per up to 200 messages, PUBACK after settle)
  into a Pipeline writing a fresh SQLite file; done when every value is written and acked;
- paho:      a bare paho client with auto-ack that counts messages (no decode, no storage).
Two payload shapes: `single` ({"value", "ts"} per message) and `object-50` (one object of
50 tag -> value members and a ts per message). Rounds alternate which receiver goes first;
the figures are medians of values/s and their ratio. Targets: single >= 5,000 values/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tagwriter.config import BackupConfig, Config, DatabaseConfig, validate
from tagwriter.pipeline import Pipeline
from tagwriter.sources.mqtt import MqttConfig, MqttSource

RECEIVE_MAXIMUM = 1000
TARGET_SINGLE = 5_000
T0 = 1_714_564_800
SHAPES = {"single": 1, "object-50": 50}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A Mosquitto that queues any number of messages for an offline persistent session."""
    import getpass

    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                    "persistence false\nmax_queued_messages 0\nmax_queued_bytes 0\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("the benchmark's Mosquitto did not start")


def payloads(n: int, per_message: int) -> list[bytes]:
    if per_message == 1:
        return [json.dumps({"value": i, "ts": T0 + i}).encode() for i in range(n)]
    return [json.dumps({"ts": T0 + i, **{f"m{k:02d}": i + k for k in range(per_message)}}).encode()
            for i in range(n)]


def v5_client(client_id: str, **kw: Any) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kw)


def session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


def make_session(port: int, client_id: str, topic: str) -> None:
    """Connect once with `client_id` and subscribe, so the broker queues for it while it is away."""
    c = v5_client(client_id)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port, clean_start=True, properties=session_props())
    c.loop_start()
    c.subscribe(topic, qos=1)
    assert done.wait(10), "no SUBACK"
    c.disconnect()
    c.loop_stop()


def preload(port: int, topic: str, data: list[bytes]) -> None:
    """Publish every payload at QoS 1 and wait until the broker has them all."""
    c = v5_client(f"bench-pub-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(topic, p, qos=1) for p in data]
    for info in infos:
        info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


def run_paho(port: int, client_id: str, n: int) -> float:
    """Seconds for a bare paho client to receive the `n` queued messages."""
    got = 0
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    c = v5_client(client_id)
    c.on_message = on_message
    started = time.perf_counter()
    c.connect("127.0.0.1", port, clean_start=False, properties=session_props())
    c.loop_start()
    assert done.wait(300), f"paho got {got} of {n}"
    seconds = time.perf_counter() - started
    c.disconnect()
    c.loop_stop()
    return seconds


def run_tagwriter(port: int, client_id: str, topic: str, n: int, values: int, work: Path) -> float:
    """Seconds for MqttSource to put the `n` queued messages' values into SQLite and ack them all."""
    db = work / f"tw-{uuid.uuid4().hex[:6]}.db"
    config = Config(database=DatabaseConfig(url=f"sqlite:///{db}"),
                    backup=BackupConfig(directory=str(work / "backup"),
                                        quarantine_directory=str(work / "backup" / "q"), auto_replay=False))
    config.buffer.overflow_policy = "block"
    validate(config)
    settings = replace(MqttConfig(), port=port, topics=[topic], client_id=client_id,
                       receive_maximum=RECEIVE_MAXIMUM, session_expiry=600, key_separator=".")
    stop = threading.Event()
    with Pipeline(config) as p:
        source = MqttSource(settings)
        thread = threading.Thread(target=source.run, args=(p, stop), daemon=True)
        started = time.perf_counter()
        thread.start()
        while p.snapshot().written < values or source.status().acks_pending:
            time.sleep(0.01)
            if time.perf_counter() - started > 300:
                raise SystemExit(f"tagwriter wrote {p.snapshot().written} of {values}")
        seconds = time.perf_counter() - started
        stop.set()
        thread.join(5)
        status = source.status()
    assert status.messages == n and status.bad_messages == 0, status
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=20_000, help="messages per round (default 20,000)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    n = args.messages
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        work = Path(tmp)
        broker, port = start_broker(work)
        try:
            for shape, per in SHAPES.items():
                data = payloads(n, per)
                rates: dict[str, list[float]] = {"tagwriter": [], "paho": []}
                for r in range(args.rounds):
                    order = ["paho", "tagwriter"] if r % 2 else ["tagwriter", "paho"]
                    for name in order:
                        cid = f"bench-{name}-{uuid.uuid4().hex[:6]}"
                        topic = f"bench/{cid}/x"
                        make_session(port, cid, topic)
                        preload(port, topic, data)
                        seconds = (run_paho(port, cid, n) if name == "paho"
                                   else run_tagwriter(port, cid, topic, n, n * per, work))
                        rates[name].append(n * per / seconds)
                        print(f"{shape:9s} round {r + 1}: {name:9s} {n * per / seconds:>10,.0f} values/s "
                              f"({n / seconds:,.0f} messages/s, {seconds:.2f} s)", flush=True)
                tw, bare = statistics.median(rates["tagwriter"]), statistics.median(rates["paho"])
                figures[shape] = {"tagwriter": tw, "paho": bare, "ratio": tw / bare}
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"\nbench_source_mqtt: {n:,} queued QoS 1 messages per round, {args.rounds} alternating rounds, "
          f"MQTT v5, receive maximum {RECEIVE_MAXIMUM}, SQLite")
    for shape, f in figures.items():
        print(f"  {shape:9s} tagwriter {f['tagwriter']:>10,.0f} values/s   paho alone {f['paho']:>10,.0f} values/s"
              f"   ratio {f['ratio']:.2f}")
    ok = figures["single"]["tagwriter"] >= TARGET_SINGLE
    print(f"  single-value target >= {TARGET_SINGLE:,} values/s: {'ok' if ok else 'BELOW TARGET'}")
    if args.json:
        text = json.dumps({"messages": n, "rounds": args.rounds, "figures": figures}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

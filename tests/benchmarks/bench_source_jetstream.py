"""Benchmark: the JetStream source, nats-server -> tagwriter -> SQLite, vs nats-py alone receiving the same messages.

Not collected by pytest. Needs the nats-server on 127.0.0.1:4222 (JetStream on). Run:

    python tests/benchmarks/bench_source_jetstream.py [--messages 50000] [--groups 2000] [--rounds 3] [--json out.json]

Two payload shapes, each published once into a stream of its own (not timed):
- value: one JSON value object per message (`{"tag", "ts", "value"}`), `--messages` of them;
- group: one polling group of 100 tags per message, `--groups` of them.
Each run reads the whole stream through a fresh durable pull consumer (deliver
all, explicit acks), so every run receives exactly the same messages. Runners:
- bare: nats-py alone: `fetch(500)` in a loop, `msg.ack()` for each message;
  no decoding, no database (the ceiling of the client library here);
- tagwriter-memory / tagwriter-disk: `JetStreamSource` into a `Pipeline` writing
  a fresh SQLite file (buffer.durability memory / disk), acks after settle.
A run's figure is values per second from its start to the moment every message
is acknowledged (tagwriter: `status().acks_pending == 0` with every message
received; then every value is checked in the table). Rounds alternate the
runner order; medians are compared as a ratio to bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js import api

from tagwriter.config import load
from tagwriter.pipeline import Pipeline
from tagwriter.sources.jetstream import JetStreamConfig, JetStreamSource

SERVER = "nats://127.0.0.1:4222"
FETCH = 500
T0 = 1_700_000_000


def payloads(shape: str, n: int) -> tuple[list[bytes], int]:
    """`n` messages of `shape` and how many values they hold."""
    if shape == "value":
        return [json.dumps({"tag": f"t{i % 100}", "ts": T0 + i / 1000, "value": i * 0.5}).encode()
                for i in range(n)], n
    return [json.dumps({"group": f"g{k % 10}", "ts": T0 + k / 100,
                        "values": {f"line{k % 10}.tag{j:03d}": k + j / 100 for j in range(100)}}).encode()
            for k in range(n)], n * 100


async def publish(stream: str, messages: list[bytes]) -> None:
    nc = await nats.connect(SERVER)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    for start in range(0, len(messages), 5000):
        futures = [await js.publish_async(f"{stream}.data", m) for m in messages[start:start + 5000]]
        await asyncio.gather(*futures)
    await nc.close()


async def delete(stream: str) -> None:
    nc = await nats.connect(SERVER)
    await nc.jetstream().delete_stream(stream)
    await nc.close()


async def unacknowledged(stream: str, durable: str, within: float = 10.0) -> int:
    """Messages of the consumer not acknowledged (or not delivered), once JetStream has processed the acks sent."""
    nc = await nats.connect(SERVER)
    deadline = time.monotonic() + within
    while True:
        info = await nc.jetstream().consumer_info(stream, durable)
        left = int(info.num_ack_pending or 0) + int(info.num_pending or 0)
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)  # the server applies acks asynchronously
    await nc.close()
    return left


# -- the runners ---------------------------------------------------------------


async def bare(stream: str, durable: str, n_messages: int) -> float:
    """nats-py alone: fetch batches, ack every message; seconds until all are acked."""
    nc = await nats.connect(SERVER)
    js = nc.jetstream()
    await js.add_consumer(stream, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                                     max_ack_pending=10_000))
    t0 = time.perf_counter()
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    got = 0
    while got < n_messages:
        try:
            msgs = await sub.fetch(FETCH, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await nc.close()
    return elapsed


def run_tagwriter(stream: str, durable: str, n_messages: int, n_values: int, durability: str, work: Path) -> float:
    folder = work / durable
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{folder / 'tags.sqlite'}", "backup.directory": str(folder / "backup"),
        "backup.quarantine_directory": str(folder / "backup" / "q"), "buffer.durability": durability,
        "buffer.directory": str(folder / "queue"), "writer.batch_size": FETCH,
    })
    pipeline = Pipeline(config).start()
    source = JetStreamSource(JetStreamConfig(servers=SERVER, stream=stream, durable=durable),
                             writer_batch_size=config.writer.batch_size)
    stop = threading.Event()
    t0 = time.perf_counter()
    thread = threading.Thread(target=source.run, args=(pipeline, stop), name="bench-source")
    thread.start()
    while True:
        status = source.status()
        if status.messages >= n_messages and status.acks_pending == 0:
            break
        if not thread.is_alive():
            raise RuntimeError(f"the source ended: {status}")
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join(10)
    pipeline.stop(30)
    with sqlite3.connect(folder / "tags.sqlite") as conn:
        (rows,) = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    if rows != n_values or pipeline.snapshot().written != n_values:
        raise RuntimeError(f"{rows} rows, {pipeline.snapshot()}: expected {n_values}")
    return elapsed


def one_run(runner: str, stream: str, n_messages: int, n_values: int, work: Path) -> float:
    durable = f"bench_{runner.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    if runner == "bare":
        elapsed = asyncio.run(bare(stream, durable, n_messages))
    else:
        elapsed = run_tagwriter(stream, durable, n_messages, n_values, runner.split("-")[1], work)
    left = asyncio.run(unacknowledged(stream, durable))
    if left:
        raise RuntimeError(f"{runner}: {left} messages not acknowledged")
    return n_values / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000, help="value shape: messages (one value each)")
    parser.add_argument("--groups", type=int, default=2_000, help="group shape: messages (100 values each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    runners = ["bare", "tagwriter-memory", "tagwriter-disk"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-jetstream-") as tmp:
        work = Path(tmp)
        for shape, count in (("value", args.messages), ("group", args.groups)):
            stream = f"bench_{shape}_{uuid.uuid4().hex[:8]}"
            messages, n_values = payloads(shape, count)
            asyncio.run(publish(stream, messages))
            rates: dict[str, list[float]] = {r: [] for r in runners}
            try:
                for k in range(args.rounds):
                    order = runners if k % 2 == 0 else runners[::-1]
                    for runner in order:
                        rates[runner].append(one_run(runner, stream, count, n_values, work))
            finally:
                asyncio.run(delete(stream))
            medians = {r: statistics.median(v) for r, v in rates.items()}
            results[shape] = {"messages": count, "values": n_values, "rates": rates, "medians": medians,
                              "ratio_to_bare": {r: medians[r] / medians["bare"] for r in runners}}
            print(f"\n{shape}: {count:,} messages, {n_values:,} values, {args.rounds} rounds")
            for r in runners:
                print(f"  {r:17s} median {medians[r]:>10,.0f} values/s   ratio {medians[r] / medians['bare']:.2f}"
                      f"   rounds {', '.join(f'{x:,.0f}' for x in rates[r])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

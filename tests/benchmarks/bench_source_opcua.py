"""Benchmark: OPC UA data changes through a real asyncua server into SQLite via tagwriter, vs asyncua alone.

Not collected by pytest. Run:

    python tests/benchmarks/bench_source_opcua.py [--nodes 100] [--per-node 500] [--rounds 3] [--json out.json]

An asyncua server runs in its own process (its own core) with `--nodes` Double
variables. Each round a client subscribes to all of them (publishing every
100 ms, a queue of `--per-node` + 10 per node); then the server switches that
subscription's publishing off (a benchmark-only reach into asyncua's server
internals), writes `--per-node` values to every node, and switches publishing
on again. So every round drains the same pre-queued values at the speed of the
client, not of the server's writes. The clock runs from the server's "go" to
the last value: received and counted, for the baseline (asyncua's Client with
a subscription handler that counts, nothing else: the library alone); written
to the SQLite table, for tagwriter (`OpcUaSource` into a `Pipeline`, `block`
overflow policy, checked row for row), once with `buffer.durability =
"memory"` and once with "disk" (the default of `tagwriter run`). Rounds
alternate the order; medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tagwriter.config import load
from tagwriter.pipeline import Pipeline
from tagwriter.sources.opcua import OpcUaConfig, OpcUaSource

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PUBLISHING_MS = 100.0
NS = "urn:tagwriter:bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server process -------------------------------------------------------------


def serve(port: int, nodes: int, conn: Connection) -> None:
    """The server process: build the address space, then answer ("fill", round, per_node) until ("quit",)."""
    asyncio.run(_serve(port, nodes, conn))


async def _serve(port: int, nodes: int, conn: Connection) -> None:
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.disable_clock()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
    idx = await server.register_namespace(NS)
    folder = await server.nodes.objects.add_folder(ua.NodeId("Bench", idx), f"{idx}:Bench")
    ids = []
    for i in range(nodes):
        var = await folder.add_variable(ua.NodeId(f"v{i}", idx), f"{idx}:v{i}", 0.0)
        await var.write_value(ua.DataValue(ua.Variant(0.0, ua.VariantType.Double), SourceTimestamp=T0))
        ids.append(var.nodeid)
    await server.start()
    loop = asyncio.get_running_loop()
    conn.send(("ready",))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "quit":
            break
        _, round_no, per_node = command
        subs = list(server.iserver.subscription_service.subscriptions.values())
        live = [s for s in subs if len(s.monitored_item_srv._monitored_items) == nodes]
        for sub in live:
            sub._publishing_enabled = False  # benchmark only: queue everything first
        base = T0 + timedelta(days=round_no + 1)
        for k in range(per_node):
            ts = base + timedelta(milliseconds=k)
            for i, node_id in enumerate(ids):
                dv = ua.DataValue(ua.Variant(float(k * 1000 + i + 1), ua.VariantType.Double), SourceTimestamp=ts)
                await server.write_attribute_value(node_id, dv)
            await asyncio.sleep(0)  # keep answering requests (a health check) while filling, as servers do
        await asyncio.sleep(0.2)  # let the data-change callbacks queue every value
        for sub in live:
            await sub.set_publishing_mode(True)
        conn.send(("go", len(live)))
    await server.stop()


class ServerProcess:
    def __init__(self, nodes: int) -> None:
        self.port = free_port()
        self.url = f"opc.tcp://127.0.0.1:{self.port}/bench"
        self.conn, child = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(target=serve, args=(self.port, nodes, child), daemon=True)
        self.process.start()
        if not self.conn.poll(60) or self.conn.recv() != ("ready",):
            raise RuntimeError("the server process did not start")

    def fill(self, round_no: int, per_node: int) -> float:
        """Queue and release a round of values; the perf_counter time of the "go"."""
        self.conn.send(("fill", round_no, per_node))
        if not self.conn.poll(300):
            raise RuntimeError("the server did not fill in time")
        reply = self.conn.recv()
        if reply != ("go", 1):
            raise RuntimeError(f"expected one live subscription, got {reply}")
        return time.perf_counter()

    def close(self) -> None:
        self.conn.send(("quit",))
        self.process.join(10)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 300.0, step: float = 0.002) -> float:
    """Poll until `predicate`; the perf_counter time it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)
    return time.perf_counter()


# -- the baseline: asyncua alone ---------------------------------------------------------


def run_bare(server: ServerProcess, nodes: int, per_node: int, round_no: int, work: Path) -> dict[str, Any]:
    return asyncio.run(_bare(server, nodes, per_node, round_no))


async def _bare(server: ServerProcess, nodes: int, per_node: int, round_no: int) -> dict[str, Any]:
    from asyncua import Client, ua

    class Count:
        n = 0
        last = 0.0

        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            self.n += 1
            self.last = time.perf_counter()

    counter = Count()
    client = Client(server.url, timeout=10)
    await client.connect()
    try:
        ns = await client.get_namespace_index(NS)
        sub = await client.create_subscription(PUBLISHING_MS, counter)
        await sub.subscribe_data_change([client.get_node(ua.NodeId(f"v{i}", ns)) for i in range(nodes)],
                                        queuesize=per_node + 10, sampling_interval=0)
        while counter.n < nodes:  # the initial values
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = await loop.run_in_executor(None, server.fill, round_no, per_node)
        total = nodes + nodes * per_node
        deadline = time.monotonic() + 300
        while counter.n < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline received {counter.n} of {total}")
            await asyncio.sleep(0.002)
        elapsed = counter.last - t0
    finally:
        await client.disconnect()
    return {"rate": nodes * per_node / elapsed, "seconds": elapsed}


# -- tagwriter ----------------------------------------------------------------------


def run_tagwriter(server: ServerProcess, nodes: int, per_node: int, round_no: int, work: Path,
                  durability: str) -> dict[str, Any]:
    db = work / f"tw-{durability}-{round_no}.db"
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{db}", "buffer.overflow_policy": "block", "buffer.block_timeout": 600.0,
        "buffer.durability": durability, "buffer.directory": str(work / f"queue-{round_no}"),
        "backup.directory": str(work / "backup"), "backup.quarantine_directory": str(work / "backup" / "q"),
        "backup.auto_replay": False,
    })
    pipeline = Pipeline(config).start()
    source = OpcUaSource(OpcUaConfig(
        url=server.url, browse_paths=["Objects/Bench"], publishing_interval=PUBLISHING_MS / 1000,
        queue_size=per_node + 10,
    ))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(pipeline, stop), name="opcua-source", daemon=True)
    thread.start()
    try:
        wait_for(lambda: source.status().values >= nodes, "the initial values")
        wait_for(lambda: pipeline.snapshot().written >= nodes, "the initial values written")
        t0 = server.fill(round_no, per_node)
        total = nodes + nodes * per_node
        t1 = wait_for(lambda: pipeline.snapshot().written >= total, "every value written")
        elapsed = t1 - t0
        peak = source.peak_unsettled
    finally:
        stop.set()
        thread.join(10)
        pipeline.stop(30)
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    if rows != total:
        raise RuntimeError(f"tagwriter wrote {rows} rows of {total}")
    return {"rate": nodes * per_node / elapsed, "seconds": elapsed, "peak_unsettled": peak}


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, default=100, help="variables subscribed to (default 100)")
    ap.add_argument("--per-node", type=int, default=500, help="values written per node per round (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)

    results: dict[str, list[dict[str, Any]]] = {"asyncua alone": [], "tagwriter memory": [], "tagwriter disk": []}
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        "asyncua alone": run_bare,
        "tagwriter memory": lambda *a: run_tagwriter(*a, durability="memory"),
        "tagwriter disk": lambda *a: run_tagwriter(*a, durability="disk"),
    }
    server = ServerProcess(args.nodes)
    round_no = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
            for r in range(args.rounds):
                order = list(runners) if r % 2 == 0 else list(reversed(runners))
                for name in order:
                    round_no += 1
                    result = runners[name](server, args.nodes, args.per_node, round_no, Path(tmp))
                    results[name].append(result)
                    print(f"round {r + 1}: {name:17s} {result['rate']:>9,.0f} values/s ({result['seconds']:.2f} s)",
                          flush=True)
    finally:
        server.close()

    medians = {name: statistics.median(x["rate"] for x in rs) for name, rs in results.items()}
    base = medians["asyncua alone"]
    n = args.nodes * args.per_node
    print(f"\nbench_source_opcua: {n:,} queued values per round ({args.nodes} nodes x {args.per_node}), "
          f"{args.rounds} alternating rounds, publishing every {PUBLISHING_MS:g} ms, server in its own process")
    for name, rate in medians.items():
        ratio = "" if name == "asyncua alone" else f"   ratio {rate / base:.2f}"
        print(f"  {name:17s} (median) {rate:>9,.0f} values/s{ratio}")
    peaks = [x["peak_unsettled"] for name in ("tagwriter memory", "tagwriter disk") for x in results[name]]
    print(f"  most values received and unsettled at once: {max(peaks):,} (max_unsettled 10,000; the server "
          "sends a round in few messages)")
    report = {"values_per_round": n, "nodes": args.nodes, "per_node": args.per_node, "rounds": args.rounds,
              "rates": {k: [x["rate"] for x in v] for k, v in results.items()}, "medians": medians,
              "ratios": {k: v / base for k, v in medians.items()}, "peak_unsettled": max(peaks)}
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: Modbus TCP values/s into SQLite through `ModbusSource` vs the pymodbus client alone.

Not collected by pytest. Run:  python tests/benchmarks/bench_source_modbus.py [--seconds 5] [--rounds 3]

A pymodbus server in its own process (its own interpreter and GIL, as a
device is) holds 1,000 holding registers: 500 float32 tags, word order little
(CDAB). Both sides read the same 9 requests (8 of 124 registers, 1 of 8) as fast
as the server answers, for `--seconds` each:

- tagwriter: `ModbusSource` (poll interval 1 ms, so it is never idle) into a
  real `Pipeline` writing SQLite (memory durability); the figure is rows in
  the table / time from the first poll to the end of the final flush.
- the client alone: a `ModbusTcpClient` loop doing the same 8 reads and
  decoding each value with pymodbus's `convert_from_registers`; nothing kept.

Rounds alternate which side goes first; the medians are compared, and so is
the median of each round's own ratio (the two sides of a round run seconds
apart, so it suffers less from other load on the machine, which is printed).
Modbus is one request at a time, so both sides are bound by round trips: the
ratio says what tagwriter's decoding, submitting and writing cost on top.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tagwriter.config import load
from tagwriter.pipeline import Pipeline
from tagwriter.sources.modbus import ModbusConfig, ModbusSource

TAGS = 500  # float32: two registers each
REGISTERS = 2 * TAGS
TARGET_RATIO = 0.7


def serve(port: int) -> None:
    """The device: a pymodbus server with REGISTERS holding registers, until killed."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    values = [(i * 7919) % 65_536 for i in range(REGISTERS)]
    device = SimDevice(id=1, simdata=[SimData(0, values=values, datatype=DataType.REGISTERS)])

    async def main() -> None:
        server = ModbusTcpServer([device], address=("127.0.0.1", port))
        await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the pymodbus server did not start")


def register_map() -> list[dict[str, object]]:
    return [{"tag": f"line1.value{i:03d}", "address": 2 * i, "type": "float32", "word_order": "little"}
            for i in range(TAGS)]


def bench_tagwriter(port: int, seconds: float, work: Path) -> float:
    db = work / "modbus.db"
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{db}", "backup.directory": str(work / "backup"),
        "backup.quarantine_directory": str(work / "backup" / "quarantine"),
        "buffer.overflow_policy": "block",
    })
    pipeline = Pipeline(config).start()
    source = ModbusSource.from_config(ModbusConfig(port=port, poll_interval=0.001, registers=register_map()))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(pipeline, stop))
    t = time.perf_counter()
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(10)
    assert pipeline.stop(60.0)
    elapsed = time.perf_counter() - t
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM tag_values").fetchone()[0]
    snap = pipeline.snapshot()
    assert rows == snap.written == snap.submitted == source.counts.values, (rows, snap)
    assert source.counts.failed_values == 0
    db.unlink()
    return float(rows) / elapsed


def bench_client(port: int, seconds: float) -> float:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
    assert client.connect()
    float32 = client.DATATYPE.FLOAT32
    # The requests ModbusSource plans: 124 registers (62 whole float32 values; 125 would split one), 9 in all.
    spans = [(start, min(124, REGISTERS - start)) for start in range(0, REGISTERS, 124)]
    values = 0
    t = time.perf_counter()
    deadline = t + seconds
    while time.perf_counter() < deadline:
        for start, count in spans:
            words = client.read_holding_registers(start, count=count, device_id=1).registers
            for i in range(0, len(words), 2):
                client.convert_from_registers(words[i:i + 2], float32, word_order="little")
                values += 1
    elapsed = time.perf_counter() - t
    client.close()
    return values / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    port = free_port()
    server = start_server(port)
    ours: list[float] = []
    bare: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                sides = [("tagwriter", lambda: ours.append(bench_tagwriter(port, args.seconds, Path(tmp)))),
                         ("client", lambda: bare.append(bench_client(port, args.seconds)))]
                for name, run in sides if r % 2 == 0 else sides[::-1]:
                    run()
                    print(f"round {r + 1} {name:9s} {(ours if name == 'tagwriter' else bare)[-1]:>10,.0f} values/s")
    finally:
        server.kill()
        server.wait()
    ratio = statistics.median(ours) / statistics.median(bare)
    paired = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
    print(f"tagwriter (ModbusSource -> SQLite): {statistics.median(ours):,.0f} values/s (median)")
    print(f"pymodbus client alone:              {statistics.median(bare):,.0f} values/s (median)")
    print(f"ratio of medians {ratio:.2f}, median of round ratios {paired:.2f} (target >= {TARGET_RATIO}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

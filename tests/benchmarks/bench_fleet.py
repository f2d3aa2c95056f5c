"""Benchmark: the writer fleet. Values/s with 1, 2 and 3 writer processes on one durable consumer into
PostgreSQL, and what each value costs in CPU (writer processes, PostgreSQL, nats-server), so the sizing
rule holds on machines with more cores than this one. Also one edge gateway's publish rate and cost.

Not collected by pytest. Needs nats-server (JetStream) on 127.0.0.1:4222 and PostgreSQL on 127.0.0.1:5432
(user postgres; the benchmark makes its own database and stream and drops them). Run:

    python tests/benchmarks/bench_fleet.py [--values 500000] [--rounds 3] [--writers 1,2,3] [--json out.json]

Setup (timed as the edge figure): one edge gateway, `tagwriter run` with a jsonl file of `--values`
values and database.url = nats://..., publishes them as batch/1 messages of 2,000 values into a stream
with *limits* retention, so that every run can read the same messages again through a new durable
consumer (deliver all). Each run: TRUNCATE the table, start N `tagwriter run --source jetstream`
processes (memory durability, fetch_batch 4, batch_size 5,000) on a new durable, and time from the
first row written to the last (the writers' `written` summed from their metrics endpoints); CPU is
read from /proc over that window: the writer processes, all PostgreSQL processes, nats-server, and the
whole machine (busy share of all cores). Rounds rotate the order of N; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers: fleet, procs

import psycopg
from fleet import CLOCK_TICKS, Part, edge, write_input, writer

from tagwriter.config import DatabaseConfig, JetStreamConfig
from tagwriter.sinks.postgresql import PostgresSink
from tagwriter.streamadmin import StreamSettings, session_from_settings, setup

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def processes_cpu(names: tuple[str, ...]) -> float:
    """CPU seconds (user + system) of every process whose command name is one of `names`."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        if head.partition("(")[2] in names:
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def cpu_now(parts: list[Part]) -> dict[str, float]:
    busy, total = machine_busy()
    return {"writers": sum(p.cpu_seconds() for p in parts), "postgres": processes_cpu(("postgres",)),
            "nats": processes_cpu(("nats-server",)), "busy": busy, "total": total}


def written(parts: list[Part]) -> int:
    return sum(int(p.metric("written") or 0) for p in parts)


def publish(work: Path, stream: str, values: int) -> dict[str, float]:
    """One edge gateway publishes the input; its values/s and CPU s per 1,000 values (process, whole run)."""
    e = edge(work, 1, stream)
    write_input(e.folder / "input.jsonl", 1, values)
    started = time.monotonic()
    e.start()
    cpu = 0.0
    while e.proc is not None and e.proc.poll() is None:
        cpu = e.cpu_seconds()
        time.sleep(0.05)
    took = time.monotonic() - started
    code, out, err = e.wait(60)
    if code != 0:
        raise SystemExit(f"the edge failed ({code}): {out}\n{err[-2000:]}")
    return {"values_per_s": values / took, "cpu_s_per_1000": cpu / (values / 1000), "seconds": took}


def run_writers(work: Path, stream: str, db_url: str, n: int, values: int, tag: str) -> dict[str, float]:
    """N writers read the whole stream into the (emptied) table; the run's figures."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE tag_values")
    parts = [writer(work / tag, i, stream, db_url, durable=tag) for i in range(1, n + 1)]
    for p in parts:
        p.start()
    try:
        while written(parts) == 0:
            time.sleep(0.01)
        t0, first, cpu0 = time.monotonic(), written(parts), cpu_now(parts)
        while (done := written(parts)) < values:
            if time.monotonic() - t0 > 600:
                raise SystemExit(f"{n} writers: only {done} of {values} values after 600 s")
            time.sleep(0.02)
        t1, cpu1 = time.monotonic(), cpu_now(parts)
    finally:
        for p in parts:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in parts:
            if p.proc is not None:
                p.wait(60)
    moved = values - first
    per_k = moved / 1000
    d = {k: cpu1[k] - cpu0[k] for k in cpu0}
    return {"values_per_s": moved / (t1 - t0), "writer_cpu_s_per_1000": d["writers"] / per_k,
            "postgres_cpu_s_per_1000": d["postgres"] / per_k, "nats_cpu_s_per_1000": d["nats"] / per_k,
            "machine_busy_pct": 100 * d["busy"] / d["total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", default="1,2,3")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.writers.split(",")]
    stream = f"tw_bench_{uuid.uuid4().hex[:8]}"
    dbname = f"tw_bench_{uuid.uuid4().hex[:8]}"
    db_url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
    session = session_from_settings(JetStreamConfig())
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        setup(session, StreamSettings(stream, (f"{stream}.>",), retention="limits", max_bytes=1024**3), None)
        PostgresSink.from_config(DatabaseConfig(url=db_url)).create_table()
        with tempfile.TemporaryDirectory(prefix="bench_fleet_") as tmp:
            work = Path(tmp)
            edge_runs = [publish(work / "edge", stream, args.values)]
            results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
            for r in range(args.rounds):
                order = counts[r % len(counts):] + counts[:r % len(counts)]
                for n in order:
                    results[n].append(run_writers(work, stream, db_url, n, args.values, f"r{r}w{n}"))
                    print(f"round {r + 1}: {n} writer(s): {results[n][-1]['values_per_s']:,.0f} values/s",
                          flush=True)
    finally:
        session.run(lambda js: js.delete_stream(stream), "delete stream")
        session.close()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    report(counts, results, edge_runs, args)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(counts: list[int], results: dict[int, list[dict[str, float]]], edge_runs: list[dict[str, float]],
           args: argparse.Namespace) -> None:
    base = median(results[counts[0]], "values_per_s")
    print(f"\n{args.values:,} values, {args.rounds} rounds, {os.cpu_count()} cores; medians\n")
    print("| writers | values/s | vs 1 writer | writer CPU s / 1,000 values | PostgreSQL CPU s / 1,000 | "
          "nats-server CPU s / 1,000 | machine busy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out: dict[str, Any] = {"values": args.values, "rounds": args.rounds, "cores": os.cpu_count(),
                           "edge": edge_runs[0], "writers": {}}
    for n in counts:
        runs = results[n]
        row = {k: median(runs, k) for k in runs[0]}
        out["writers"][n] = {"median": row, "runs": runs}
        print(f"| {n} | {row['values_per_s']:,.0f} | {row['values_per_s'] / base:.2f} | "
              f"{row['writer_cpu_s_per_1000']:.4f} | {row['postgres_cpu_s_per_1000']:.4f} | "
              f"{row['nats_cpu_s_per_1000']:.4f} | {row['machine_busy_pct']:.0f} % |")
    e = edge_runs[0]
    print(f"\nedge gateway (jsonl file -> disk queue -> JetStream, batches of 2,000): {e['values_per_s']:,.0f} "
          f"values/s, {e['cpu_s_per_1000']:.4f} CPU s per 1,000 values")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

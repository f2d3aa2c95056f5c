"""Benchmark: the core, end to end (producer thread -> Pipeline -> SQLite commit), vs a bare script.

Not collected by pytest. Run:

    python tests/benchmarks/bench_core.py [--values 500000] [--rounds 3] [--json out.json]

Throughput. A producer thread submits polling groups (10 groups of 100 tags,
aware UTC datetimes, float values) as fast as it can; the figure is values
committed per second from the first submit to the last commit. tagwriter runs
with the `block` overflow policy (back-pressure: nothing is dropped, every
value is committed and checked in the table). The baseline is a bare
producer thread + writer thread with no tagwriter code: a bounded deque with
two Conditions, the timestamp formatted once per group, 500-row
`executemany` transactions into the same table (DDL written out below),
the same PRAGMAs (WAL, synchronous=NORMAL) and the same INSERT. Both consume
the same prebuilt polls; rounds alternate which goes first; medians are
compared. Targets: >= 100,000 values/s and >= 0.6 of the bare script.

Memory. 100,000 values (1,000 groups of 100) submitted into a `RingBuffer`
the way `Pipeline.submit` does it, measured with tracemalloc after the
source dicts are gone: what the buffered values themselves cost (rows,
float values, shared timestamps, deque and marks). Tag names are the
collector's long-lived strings and are not counted. Target: <= 13 MB.

`--profile` adds one tagwriter round under cProfile (producer and writer
threads profiled separately) and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tagwriter.buffer import RingBuffer
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.models import PollingData
from tagwriter.pipeline import Pipeline

BATCH = 500
CAPACITY = 100_000
QUALITY = 192
TARGET_RATE = 100_000
TARGET_RATIO = 0.6
TARGET_MB = 13.0

# The bare script's table: DESIGN.md's SQLite table, written out (no tagwriter code on that side).
BARE_DDL = (
    'CREATE TABLE IF NOT EXISTS "tag_values" ("tag_name" TEXT NOT NULL, "ts" TEXT NOT NULL, '
    '"value" REAL, "quality" INTEGER, PRIMARY KEY ("ts", "tag_name")) WITHOUT ROWID'
)
BARE_INSERT = (
    'INSERT INTO "tag_values" ("tag_name", "ts", "value", "quality") VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING'
)

Poll = tuple[str, datetime, dict[str, float]]


def make_polls(values: int, groups: int = 10, tags: int = 100) -> list[Poll]:
    """Polls of `groups` groups of `tags` tags, one poll of each group every 100 ms."""
    names = [[f"line{g}.tag{i:03d}" for i in range(tags)] for g in range(groups)]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    polls: list[Poll] = []
    k = 0
    while len(polls) * tags < values:
        g = k % groups
        ts = t0 + timedelta(microseconds=100_000 * (k // groups) + 17 * g)
        polls.append((f"line{g}", ts, {name: 20.0 + ((k * 7 + i) % 1000) * 0.01 for i, name in enumerate(names[g])}))
        k += 1
    return polls


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    return int(n)


# -- tagwriter ---------------------------------------------------------------


def tagwriter_config(work: Path) -> Config:
    config = Config(
        buffer=BufferConfig(capacity=CAPACITY, overflow_policy="block", block_timeout=600.0),
        writer=WriterConfig(batch_size=BATCH, flush_interval=1.0),
        database=DatabaseConfig(url=f"sqlite:///{work / 'tagwriter.db'}"),
        backup=BackupConfig(directory=str(work / "backup"), quarantine_directory=str(work / "backup" / "q"),
                            auto_replay=False),
    )
    validate(config)
    return config


def run_tagwriter(
    polls: list[Poll], work: Path, profilers: dict[str, cProfile.Profile] | None = None
) -> dict[str, Any]:
    db = work / "tagwriter.db"
    db.unlink(missing_ok=True)
    p = Pipeline(tagwriter_config(work))
    if profilers is not None:
        run = p._writer._run

        def profiled_run() -> None:
            profilers["writer"].runcall(run)

        p._writer._thread = threading.Thread(target=profiled_run, name="tagwriter-writer", daemon=True)
    p.start()
    deadline = time.monotonic() + 30
    while p.snapshot().state != "writing":  # the table exists and the writer waits
        if time.monotonic() > deadline:
            raise RuntimeError(f"writer did not start: {p.snapshot().last_error}")
        time.sleep(0.01)

    def produce() -> None:
        submit = p.submit
        for group, ts, values in polls:
            submit(PollingData(group, ts, values, QUALITY))

    target: Callable[[], None] = produce
    if profilers is not None:
        target = lambda: profilers["producer"].runcall(produce)  # noqa: E731
    producer = threading.Thread(target=target, name="producer")
    gc.collect()
    t0 = time.perf_counter()
    producer.start()
    producer.join()
    if not p.flush(600.0):
        raise RuntimeError("flush did not finish")
    elapsed = time.perf_counter() - t0
    snap = p.snapshot()
    p.stop()
    n = sum(len(v) for _, _, v in polls)
    if not (snap.written == n == count_rows(db)) or snap.dropped or snap.spooled:
        raise RuntimeError(f"tagwriter lost values: {snap}")
    return {"rate": n / elapsed, "seconds": elapsed, "latency_p50_s": snap.latency_p50_s,
            "latency_p99_s": snap.latency_p99_s, "avg_batch": snap.avg_batch_size_5m}


# -- the bare script -----------------------------------------------------------


def run_bare(polls: list[Poll], work: Path) -> dict[str, Any]:
    """Producer thread + writer thread, deque + Conditions, sqlite3 executemany: no tagwriter code."""
    db = work / "bare.db"
    db.unlink(missing_ok=True)
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(BARE_DDL)
    rows: deque[tuple[str, str, float, int]] = deque()
    mutex = threading.Lock()
    not_empty = threading.Condition(mutex)
    not_full = threading.Condition(mutex)
    done = [False]

    def produce() -> None:
        for _group, ts, values in polls:
            text = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            group_rows = [(tag, text, float(v), QUALITY) for tag, v in values.items()]
            with mutex:
                while len(rows) + len(group_rows) > CAPACITY:
                    not_full.wait()
                rows.extend(group_rows)
                not_empty.notify()
        with mutex:
            done[0] = True
            not_empty.notify()

    def write() -> None:
        while True:
            with mutex:
                while len(rows) < BATCH and not done[0]:
                    not_empty.wait(1.0)
                n = min(BATCH, len(rows))
                if n == 0 and done[0]:
                    return
                batch = [rows.popleft() for _ in range(n)]
                not_full.notify()
            conn.execute("BEGIN")
            conn.executemany(BARE_INSERT, batch)
            conn.execute("COMMIT")

    writer = threading.Thread(target=write, name="bare-writer")
    producer = threading.Thread(target=produce, name="bare-producer")
    gc.collect()
    t0 = time.perf_counter()
    writer.start()
    producer.start()
    producer.join()
    writer.join()
    elapsed = time.perf_counter() - t0
    conn.close()
    n = sum(len(v) for _, _, v in polls)
    if count_rows(db) != n:
        raise RuntimeError("bare script lost values")
    return {"rate": n / elapsed, "seconds": elapsed}


# -- memory ----------------------------------------------------------------------


def buffered_bytes(values: int = 100_000, tags: int = 100) -> float:
    """Bytes per buffered value, values held in a RingBuffer as Pipeline.submit puts them."""
    names = [f"line{g}.tag{i:03d}" for g in range(10) for i in range(tags)]  # long-lived, not counted
    buffer = RingBuffer(values)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(values // tags):
        g = k % 10
        pd = PollingData(f"line{g}", t0 + timedelta(milliseconds=k),
                         {names[g * tags + i]: 20.0 + k * 0.001 + i for i in range(tags)}, QUALITY)
        buffer.put_many(list(pd.rows()))
        del pd
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if len(buffer) != values:
        raise RuntimeError("buffer did not hold every value")
    return (after - before) / values


# -- main --------------------------------------------------------------------------


def print_profile(profilers: dict[str, cProfile.Profile], top: int = 18) -> None:
    for name, prof in profilers.items():
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        print(f"\n--- cProfile: {name} thread (by own time) ---")
        print("\n".join(out.getvalue().splitlines()[:top + 12]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--values", type=int, default=500_000, help="values per round (default 500,000)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    ap.add_argument("--profile", action="store_true", help="one extra tagwriter round under cProfile")
    args = ap.parse_args(argv)

    polls = make_polls(args.values)
    n = sum(len(v) for _, _, v in polls)
    tw: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            order = [("bare", run_bare, bare), ("tagwriter", run_tagwriter, tw)]
            if r % 2:
                order.reverse()
            for name, fn, out in order:
                result = fn(polls, work)
                out.append(result)
                print(f"round {r + 1}: {name:9s} {result['rate']:>10,.0f} values/s ({result['seconds']:.2f} s)",
                      flush=True)
        profilers: dict[str, cProfile.Profile] | None = None
        if args.profile:
            profilers = {"producer": cProfile.Profile(), "writer": cProfile.Profile()}
            run_tagwriter(polls, work, profilers)
    mem = buffered_bytes()

    tw_rate = statistics.median(r["rate"] for r in tw)
    bare_rate = statistics.median(r["rate"] for r in bare)
    ratio = tw_rate / bare_rate
    mb = mem * 100_000 / 1e6
    ok = {"rate": tw_rate >= TARGET_RATE, "ratio": ratio >= TARGET_RATIO, "memory": mb <= TARGET_MB}
    mark = {True: "ok", False: "BELOW TARGET"}
    print(f"\nbench_core: {n:,} values per round, {args.rounds} alternating rounds, batch {BATCH}, "
          f"SQLite WAL synchronous=NORMAL")
    print(f"  tagwriter (median)   {tw_rate:>10,.0f} values/s   target >= {TARGET_RATE:,}      "
          f"{mark[ok['rate']]}")
    print(f"  bare script (median) {bare_rate:>10,.0f} values/s")
    print(f"  ratio                {ratio:>10.2f}            target >= {TARGET_RATIO}        {mark[ok['ratio']]}")
    print(f"  memory               {mb:>10.2f} MB per 100,000 buffered values ({mem:.0f} B each)   "
          f"target <= {TARGET_MB:g} MB   {mark[ok['memory']]}")
    p50 = statistics.median(r["latency_p50_s"] for r in tw)
    p99 = statistics.median(r["latency_p99_s"] for r in tw)
    print(f"  tagwriter end-to-end latency (median of rounds): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
          "(producer saturating the buffer)")
    if profilers is not None:
        print_profile(profilers)
    report = {
        "values_per_round": n, "rounds": args.rounds, "batch_size": BATCH,
        "tagwriter_rates": [r["rate"] for r in tw], "bare_rates": [r["rate"] for r in bare],
        "tagwriter_median": tw_rate, "bare_median": bare_rate, "ratio": ratio,
        "bytes_per_buffered_value": mem, "mb_per_100k": mb,
        "latency_p50_s": p50, "latency_p99_s": p99,
        "targets": {"rate": TARGET_RATE, "ratio": TARGET_RATIO, "mb_per_100k": TARGET_MB}, "met": ok,
    }
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

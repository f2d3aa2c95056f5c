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
the same PRAGMAs (WAL, synchronous=NORMAL) and the same INSERT; "bare-multi"
is the same script with INSERTs of 100 rows each (multi-row VALUES, as
tagwriter's SQLite sink writes), the faster way. Both consume the same
prebuilt polls; rounds alternate which goes first; medians are compared.
Targets: >= 100,000 values/s and >= 0.9 of the faster bare script.

Overhead. The same two run again with a sink that does nothing: tagwriter's
pipeline with a `Sink` whose `write_batch` only counts, against the bare
script whose writer thread takes its 500-row batches off the deque and drops
them. What is left is the cost of moving values (submit, buffer, batch,
accounting) against the cheapest competent way to move them between two
threads. Target: >= 0.75.

Memory. 100,000 values (1,000 groups of 100) submitted into a `RingBuffer`
the way `Pipeline.submit` does it, measured with tracemalloc after the
source dicts are gone: what the buffered values themselves cost (the
chunks' columns, float values, shared timestamps, the deque). Tag names are
the collector's long-lived strings and are not counted. Target: <= 80 B a
value (8 MB).

`--profile` adds one tagwriter round under cProfile (producer and writer
threads profiled separately) and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tagwriter.buffer import RingBuffer
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.models import PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import WriteResult

BATCH = 500
CAPACITY = 100_000
QUALITY = 192
TARGET_RATE = 100_000
TARGET_RATIO = 0.9
BARE_STATEMENT_ROWS = 100  # bare-multi: rows per INSERT (as tagwriter's SQLite sink does)
TARGET_NULL_RATIO = 0.75
TARGET_BYTES = 80.0

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


class NullSink:
    """A sink that does nothing but count: what is left is the cost of moving values."""

    kind = "null"

    def __init__(self) -> None:
        self.rows = 0

    def open(self) -> None:
        pass

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        self.rows += len(rows)
        return WriteResult(len(rows))

    def probe(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "null sink"


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
    polls: list[Poll], work: Path, profilers: dict[str, cProfile.Profile] | None = None, *, null: bool = False,
) -> dict[str, Any]:
    db = work / "tagwriter.db"
    db.unlink(missing_ok=True)
    sink = NullSink() if null else None
    p = Pipeline(tagwriter_config(work), sink=sink)
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
    landed = sink.rows if sink is not None else count_rows(db)
    if not (snap.written == n == landed) or snap.dropped or snap.spooled:
        raise RuntimeError(f"tagwriter lost values: {snap}")
    return {"rate": n / elapsed, "seconds": elapsed, "latency_p50_s": snap.latency_p50_s,
            "latency_p99_s": snap.latency_p99_s, "avg_batch": snap.avg_batch_size_5m}


# -- the bare script -----------------------------------------------------------


def bare_multi_insert(rows: int) -> str:
    """The bare script's INSERT of `rows` rows in one multi-row VALUES statement."""
    head, tail = BARE_INSERT.split(" VALUES (?, ?, ?, ?) ")
    return f"{head} VALUES {', '.join(['(?, ?, ?, ?)'] * rows)} {tail}"


def run_bare(polls: list[Poll], work: Path, *, null: bool = False, statement_rows: int = 0) -> dict[str, Any]:
    """Producer thread + writer thread, deque + Conditions, sqlite3 executemany: no tagwriter code.

    `null`: the writer drops each batch instead of inserting it. `statement_rows`: instead of
    `executemany`, INSERTs of that many rows each (multi-row VALUES, the rest one by one)."""
    db = work / "bare.db"
    db.unlink(missing_ok=True)
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(BARE_DDL)
    multi = bare_multi_insert(statement_rows) if statement_rows else ""
    rows: deque[tuple[str, str, float, int]] = deque()
    mutex = threading.Lock()
    not_empty = threading.Condition(mutex)
    not_full = threading.Condition(mutex)
    done = [False]
    taken = [0]

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
            if null:
                taken[0] += len(batch)
                continue
            conn.execute("BEGIN")
            if statement_rows:
                flat = list(itertools.chain.from_iterable(batch))
                whole = len(batch) // statement_rows * statement_rows
                for at in range(0, whole, statement_rows):
                    conn.execute(multi, flat[at * 4:(at + statement_rows) * 4])
                conn.executemany(BARE_INSERT, batch[whole:])
            else:
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
    if (taken[0] if null else count_rows(db)) != n:
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
        buffer.put_many(Pipeline._rows_of(pd))  # what Pipeline.submit puts
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
    ap.add_argument("--profile-null", action="store_true", help="profile the do-nothing sink's round instead")
    args = ap.parse_args(argv)

    polls = make_polls(args.values)
    n = sum(len(v) for _, _, v in polls)
    args.profile = args.profile or args.profile_null
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        work = Path(tmp)
        names = list(VARIANTS)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # each variant leads once in turn
            if r % 2:
                order.reverse()
            for name in order:
                result = VARIANTS[name](polls, work)
                runs[name].append(result)
                print(f"round {r + 1}: {name:16s} {result['rate']:>10,.0f} values/s ({result['seconds']:.2f} s)",
                      flush=True)
        profilers: dict[str, cProfile.Profile] | None = None
        if args.profile:
            profilers = {"producer": cProfile.Profile(), "writer": cProfile.Profile()}
            run_tagwriter(polls, work, profilers, null=args.profile_null)
    mem = buffered_bytes()

    med = {name: statistics.median(r["rate"] for r in results) for name, results in runs.items()}
    strongest = max(("bare", "bare-multi"), key=med.__getitem__)  # the target is against the faster baseline
    ratio = med["tagwriter"] / med[strongest]
    null_ratio = med["tagwriter-null"] / med["bare-null"]
    ok = {"rate": med["tagwriter"] >= TARGET_RATE, "ratio": ratio >= TARGET_RATIO,
          "null_ratio": null_ratio >= TARGET_NULL_RATIO, "memory": mem <= TARGET_BYTES}
    mark = {True: "ok", False: "BELOW TARGET"}

    def spread(name: str) -> str:
        rates = [r["rate"] for r in runs[name]]
        return f"{min(rates):,.0f}-{max(rates):,.0f}"

    def ratio_spread(a: str, b: str) -> str:
        pairs = [x["rate"] / y["rate"] for x, y in zip(runs[a], runs[b], strict=True)]
        return f"{min(pairs):.2f}-{max(pairs):.2f}"

    print(f"\nbench_core: {n:,} values per round, {args.rounds} rounds, batch {BATCH}, SQLite WAL synchronous=NORMAL")
    for name in names:
        print(f"  {name:16s} median {med[name]:>10,.0f} values/s   (min-max {spread(name)})")
    for base in ("bare", "bare-multi"):
        print(f"  into SQLite:     tagwriter / {base:10s} {med['tagwriter'] / med[base]:.2f} "
              f"(per round {ratio_spread('tagwriter', base)})")
    print(f"  into SQLite, vs the stronger baseline ({strongest}): {ratio:.2f}   target >= {TARGET_RATIO}   "
          f"{mark[ok['ratio']]};  rate target >= {TARGET_RATE:,}  {mark[ok['rate']]}")
    print(f"  do-nothing sink: tagwriter / bare  {null_ratio:.2f} "
          f"(per round {ratio_spread('tagwriter-null', 'bare-null')})   "
          f"target >= {TARGET_NULL_RATIO}   {mark[ok['null_ratio']]}")
    print(f"  memory           {mem:.0f} B per buffered value ({mem * 100_000 / 1e6:.2f} MB per 100,000)   "
          f"target <= {TARGET_BYTES:g} B   {mark[ok['memory']]}")
    p50 = statistics.median(r["latency_p50_s"] for r in runs["tagwriter"])
    p99 = statistics.median(r["latency_p99_s"] for r in runs["tagwriter"])
    print(f"  tagwriter end-to-end latency (median of rounds): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
          "(producer saturating the buffer)")
    if profilers is not None:
        print_profile(profilers)
    report = {
        "values_per_round": n, "rounds": args.rounds, "batch_size": BATCH,
        "rates": {name: [r["rate"] for r in results] for name, results in runs.items()},
        "medians": med, "ratio": ratio, "ratio_against": strongest, "null_ratio": null_ratio,
        "ratio_per_round": [x["rate"] / y["rate"] for x, y in zip(runs["tagwriter"], runs[strongest], strict=True)],
        "null_ratio_per_round": [x["rate"] / y["rate"]
                                 for x, y in zip(runs["tagwriter-null"], runs["bare-null"], strict=True)],
        "bytes_per_buffered_value": mem, "latency_p50_s": p50, "latency_p99_s": p99,
        "targets": {"rate": TARGET_RATE, "ratio": TARGET_RATIO, "null_ratio": TARGET_NULL_RATIO,
                    "bytes_per_value": TARGET_BYTES},
        "met": ok,
    }
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


VARIANTS: dict[str, Callable[[list[Poll], Path], dict[str, Any]]] = {
    "bare": run_bare,
    "bare-multi": lambda polls, work: run_bare(polls, work, statement_rows=BARE_STATEMENT_ROWS),
    "tagwriter": run_tagwriter,
    "bare-null": lambda polls, work: run_bare(polls, work, null=True),
    "tagwriter-null": lambda polls, work: run_tagwriter(polls, work, null=True),
}


if __name__ == "__main__":
    sys.exit(main())

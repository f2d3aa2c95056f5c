"""Benchmark: the Oracle sink's own cost in the pipeline, against a sink that does nothing.

Not collected by pytest. Run:

    python tests/benchmarks/bench_oracle.py [--values 500000] [--rounds 5] [--json out.json]

A producer thread submits polling groups (10 groups of 100 tags, one
timestamp per group, float values) as fast as it can into a
`tagwriter.pipeline.Pipeline` (memory buffer, `block` overflow policy: back
pressure, nothing dropped); the figure is values per second from the first
submit to the end of the final flush. The same prebuilt polls go through the
same pipeline twice per round, in alternating order:

- "null": a do-nothing `Sink` whose `write_batch` returns
  `WriteResult(len(rows))` (the ceiling: the core's cost alone);
- "binds": the do-nothing sink plus the one piece of work python-oracledb's
  `executemany` demands of any caller, written here as plainly and as fast
  as we know (no tagwriter code): the list of (tag, naive datetime, value,
  quality) row tuples, from the batch's columns, one datetime per polling
  group. It is the floor of any sink that binds rows to `executemany`: the
  gap from "null" to "binds" is the driver's API, the gap from "binds" to
  "oracle" the sink's own cost;
- "oracle": the real `OracleSink` (pool, bounds, error mapping, bind rows)
  over `NoopDriver` from tests/oracle_fake.py, a FAKE python-oracledb at the
  DB-API seam whose `executemany` and `commit` do nothing (it checks only that
  the bind rows are a list of 4-tuples, as the real driver requires). It is a
  fake because no Oracle server can run on our machines (DESIGN.md), so the
  figure is the sink's Python cost and its threads, not Oracle's.

Target: oracle / null >= 0.9 (medians of the rounds); oracle / binds is
printed beside it. The machine is shared
and has 2 cores: read the ratio, and the median of each round's own ratio,
not the absolute rates. Also shown: the process CPU time per value of each
pass (`time.process_time`, this process's threads only), which other load
on the machine disturbs less than the wall clock; their ratio null / oracle
is what the throughput ratio would be with the GIL as the only limit.

To measure another checkout's sink with this same script (e.g. "before"),
run it with that checkout first on the path:
`PYTHONPATH=/path/to/checkout python tests/benchmarks/bench_oracle.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers: oracle_fake

from oracle_fake import NoopDriver

import tagwriter
from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.models import PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import Sink, WriteResult
from tagwriter.sinks.oracle import OracleSink

BATCH = 500
CAPACITY = 100_000
QUALITY = 192
TARGET_RATIO = 0.9
EPOCH = datetime(1970, 1, 1)

Poll = tuple[str, datetime, dict[str, float]]


class NullSink:
    """A sink that does nothing: the ceiling the Oracle sink is compared with."""

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


class BindsSink(NullSink):
    """The null sink plus building the row tuples `executemany` takes (the floor; see the module docstring)."""

    kind = "binds"

    def __init__(self) -> None:
        super().__init__()
        self.last: list[tuple[object, ...]] = []

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        # a Chunk, with its runs (not imported by name: this script also runs on checkouts without Chunk)
        chunk: Any = rows
        if getattr(chunk, "runs", None) is not None:
            stamps: list[datetime] = []
            for stamp, count in chunk.runs:
                stamps += [EPOCH + timedelta(microseconds=stamp)] * count
            self.last = list(zip(chunk.tags, stamps, chunk.values, chunk.qualities, strict=True))
        else:  # not what the pipeline hands over here; kept correct for any sequence of rows
            self.last = [(r.tag, EPOCH + timedelta(microseconds=r.ts_us), r.value, r.quality) for r in rows]
        self.rows += len(rows)
        return WriteResult(len(rows))


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


def pipeline_config(work: Path) -> Config:
    config = Config(
        buffer=BufferConfig(capacity=CAPACITY, overflow_policy="block", block_timeout=600.0),
        writer=WriterConfig(batch_size=BATCH, flush_interval=1.0),
        database=DatabaseConfig(url="oracle://scott@127.0.0.1:1521/orclpdb"),
        backup=BackupConfig(directory=str(work / "backup"), quarantine_directory=str(work / "backup" / "q"),
                            auto_replay=False),
    )
    validate(config)
    return config


def oracle_sink(driver: NoopDriver) -> OracleSink:
    return OracleSink(user="scott", password="bench", dsn="127.0.0.1:1521/orclpdb", driver=driver,
                      pool_min=1, pool_max=2)


def run(polls: list[Poll], work: Path, sink: Sink, stored: Callable[[], int]) -> dict[str, Any]:
    """One pass of `polls` through a pipeline into `sink`; values/s, checked against `stored()`."""
    p = Pipeline(pipeline_config(work), sink=sink).start()
    deadline = time.monotonic() + 30
    while p.snapshot().state != "writing":
        if time.monotonic() > deadline:
            raise RuntimeError(f"writer did not start: {p.snapshot().last_error}")
        time.sleep(0.01)

    def produce() -> None:
        submit = p.submit
        for group, ts, values in polls:
            submit(PollingData(group, ts, values, QUALITY))

    producer = threading.Thread(target=produce, name="producer")
    gc.collect()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    producer.start()
    producer.join()
    if not p.flush(600.0):
        raise RuntimeError("flush did not finish")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    snap = p.snapshot()
    p.stop()
    n = sum(len(v) for _, _, v in polls)
    if not (snap.written == n == stored()) or snap.dropped or snap.spooled:
        raise RuntimeError(f"values lost: {snap}")
    return {"rate": n / elapsed, "seconds": elapsed, "cpu_us_per_value": cpu / n * 1e6,
            "avg_batch": snap.avg_batch_size_5m}


def run_null(polls: list[Poll], work: Path) -> dict[str, Any]:
    sink = NullSink()
    return run(polls, work, sink, lambda: sink.rows)


def run_binds(polls: list[Poll], work: Path) -> dict[str, Any]:
    sink = BindsSink()
    return run(polls, work, sink, lambda: sink.rows)


def run_oracle(polls: list[Poll], work: Path) -> dict[str, Any]:
    driver = NoopDriver()
    result = run(polls, work, oracle_sink(driver), lambda: driver.rows)
    result["threads"] = sorted(driver.thread_names)
    return result


def spread(xs: list[float]) -> str:
    return f"{min(xs):,.0f}-{max(xs):,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--values", type=int, default=500_000, help="values per pass (default 500,000)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each (default 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)

    polls = make_polls(args.values)
    n = sum(len(v) for _, _, v in polls)
    null: list[dict[str, Any]] = []
    binds: list[dict[str, Any]] = []
    oracle: list[dict[str, Any]] = []
    passes = [("null", run_null, null), ("binds", run_binds, binds), ("oracle", run_oracle, oracle)]
    with tempfile.TemporaryDirectory(prefix="bench-oracle-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            order = passes[r % 3:] + passes[:r % 3]  # each pass first, middle and last in turn
            if r % 2:
                order.reverse()
            for name, fn, out in order:
                result = fn(polls, work)
                out.append(result)
                print(f"round {r + 1}: {name:6s} {result['rate']:>10,.0f} values/s ({result['seconds']:.2f} s, "
                      f"{result['cpu_us_per_value']:.3f} us CPU a value)", flush=True)

    null_rates = [r["rate"] for r in null]
    binds_rates = [r["rate"] for r in binds]
    oracle_rates = [r["rate"] for r in oracle]
    null_med = statistics.median(null_rates)
    binds_med = statistics.median(binds_rates)
    oracle_med = statistics.median(oracle_rates)
    ratio = oracle_med / null_med
    per_round = [o / z for o, z in zip(oracle_rates, null_rates, strict=True)]
    floor_ratio = oracle_med / binds_med
    floor_rounds = [o / b for o, b in zip(oracle_rates, binds_rates, strict=True)]
    binds_ratio = binds_med / null_med
    ok = ratio >= TARGET_RATIO
    threads = sorted({name for r in oracle for name in r["threads"]})
    null_cpu = statistics.median(r["cpu_us_per_value"] for r in null)
    binds_cpu = statistics.median(r["cpu_us_per_value"] for r in binds)
    oracle_cpu = statistics.median(r["cpu_us_per_value"] for r in oracle)
    print(f"\nbench_oracle: {n:,} values per pass, {args.rounds} alternating rounds, batch {BATCH}, "
          f"tagwriter from {Path(tagwriter.__file__).parent}")
    print(f"  null sink   (median) {null_med:>10,.0f} values/s   min-max {spread(null_rates)}")
    print(f"  binds only  (median) {binds_med:>10,.0f} values/s   min-max {spread(binds_rates)}   "
          "(null + the row tuples executemany takes)")
    print(f"  oracle sink (median) {oracle_med:>10,.0f} values/s   min-max {spread(oracle_rates)}   "
          "(FAKE no-op driver)")
    print(f"  oracle / null        {ratio:>10.2f}            target >= {TARGET_RATIO}   "
          f"{'ok' if ok else 'BELOW TARGET'}")
    print(f"    per-round ratios   median {statistics.median(per_round):.2f}, "
          f"min-max {min(per_round):.2f}-{max(per_round):.2f}")
    print(f"  binds / null         {binds_ratio:>10.2f}            (the most any executemany sink can reach)")
    print(f"  oracle / binds       {floor_ratio:>10.2f}            (the sink's own cost beyond the driver's API)")
    print(f"    per-round ratios   median {statistics.median(floor_rounds):.2f}, "
          f"min-max {min(floor_rounds):.2f}-{max(floor_rounds):.2f}")
    print(f"  CPU per value (median) null {null_cpu:.3f} us, binds {binds_cpu:.3f} us, oracle {oracle_cpu:.3f} us: "
          f"null / oracle {null_cpu / oracle_cpu:.2f}, binds / oracle {binds_cpu / oracle_cpu:.2f}")
    print(f"  threads that called executemany: {', '.join(threads)}")
    report = {
        "values_per_pass": n, "rounds": args.rounds, "batch_size": BATCH,
        "null_rates": null_rates, "oracle_rates": oracle_rates,
        "binds_rates": binds_rates, "null_median": null_med, "binds_median": binds_med,
        "oracle_median": oracle_med, "ratio": ratio, "round_ratios": per_round,
        "binds_ratio": binds_ratio, "floor_ratio": floor_ratio, "floor_round_ratios": floor_rounds,
        "null_cpu_us_per_value": null_cpu, "binds_cpu_us_per_value": binds_cpu,
        "oracle_cpu_us_per_value": oracle_cpu,
        "cpu_ratio": null_cpu / oracle_cpu,
        "executemany_threads": threads, "target_ratio": TARGET_RATIO, "met": ok,
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

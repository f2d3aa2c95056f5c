"""Benchmark: the durable queue through a real Pipeline: disk vs memory, acknowledgement latency, CPU, profile.

Not collected by pytest. Run:

    python tests/benchmarks/bench_queue.py [--quick] [--values 500000] [--rounds 3] [--ack-seconds 3]
                                           [--ack-rounds 2] [--cpu-seconds 10] [--cpu-rounds 2]
                                           [--no-profile] [--profile-size 100|1000] [--profile-clock wall|cpu]
                                           [--dir PATH] [--json out.json]

`--quick` (~30 s instead of ~2 to 2.5 min): 150,000 values and 2 rounds at max
rate, one 1 s acknowledgement round per interval, one 3 s CPU round per mode.
Its max-rate ratio flatters disk mode: of 150,000 values only a third pass
the read-ahead and are read back from disk (of 500,000, four fifths).

tests/benchmarks/bench_queue_engines.py chose the engine on a model of the
queue; this one measures the queue as built (tagwriter/diskqueue.py) inside
`Pipeline`, against the in-memory ring in the same run. Every run gets a
fresh SQLite table and queue folder on `--dir` (default: the folder holding
the checkout, the disk a queue would use), and every value is checked in the
table afterwards: a lost or duplicated value fails the run, not the figure.

1. Max rate. A producer thread submits polling groups (10 groups of 100, or
   of 1,000 tags) as fast as it can into a Pipeline with
   `buffer.durability = "disk"` (fsync_interval at its default) or
   `"memory"`, both with the `block` policy (memory: back-pressure at
   `capacity`; disk: the default 1 GiB cap is never reached, the queue grows
   on disk, and what passes the `capacity` values of read-ahead the writer
   reads back and decodes, work memory mode never does). Figure: values/s from the first submit until `flush()` returns
   (every value committed to the table). Rounds alternate which mode goes
   first; medians (min-max of rounds) and the ratio disk/memory.
   Targets: disk >= 100,000 values/s and >= 0.6 of memory (issue 13);
   >= 0.7 (issue 17).
2. Acknowledgement latency. Groups of 100 submitted at a steady 10,000
   values/s (one every 10 ms) for each `buffer.fsync_interval`, 0 included
   ("always": submit waits for its own fsync). Latency = submit called ->
   `receipt.on_settled` fired (time.perf_counter() both), pooled over
   rounds; also group commits per second, the slowest commit (p99 of the
   queue's own figure, worst round) and process CPU per 1,000 values.
   Target: p99 <= fsync_interval + 20 ms.
3. CPU at plant load: the load test's plant preset (10 groups x 100 tags
   every second = 1,000 values/s, `tagwriter.loadtest.run_trial`, a paced
   SimulatedSource through `Service`), 1 s warm-up, then process CPU time
   (time.process_time: every thread, simulator and 4 buffer samples/s of the
   load test's sampler included, as `load-test` reports it) per 1,000
   values committed. Target (issue 17): <= 8 ms.
4. Profile: one more max-rate round in disk mode (groups of 1,000 unless
   `--profile-size 100`) with cProfile on the producer, writer and queue
   commit threads separately; the top functions of each by own time, on
   each thread's CPU clock (`--profile-clock wall`: waits included).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, WriterConfig, validate
from tagwriter.loadtest import PRESETS, LoadShape, run_trial
from tagwriter.models import PollingData
from tagwriter.pipeline import Pipeline

MODES = ("disk", "memory")
SIZES = (100, 1000)
LINES = 10  # polling groups, each polled every 100 ms of data time
QUALITY = 192
CAPACITY = 100_000
BATCH = 500
TARGET_RATE = 100_000
TARGET_RATIO = 0.6  # issue 13
TARGET_RATIO_17 = 0.7  # issue 17
ACK_RATE = 10_000  # values/s offered in the acknowledgement runs
ACK_GROUP = 100
INTERVALS = (0.0, 0.01, 0.025, 0.05, 0.1)
ACK_SLACK = 0.020
TARGET_CPU_MS = 8.0  # per 1,000 values at plant load (issue 17)
CPU_WARMUP = 1.0
RUN_TIMEOUT = 300.0  # seconds a producer or a flush may take before the run counts as hung
PROFILE_TOP = 12

Poll = tuple[str, datetime, dict[str, float]]


def make_polls(values: int, size: int) -> list[Poll]:
    """Polls of LINES groups of `size` tags, one poll of each group every 100 ms (distinct keys throughout)."""
    names = [[f"line{g}.tag{i:04d}" for i in range(size)] for g in range(LINES)]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    polls: list[Poll] = []
    for k in range(-(-values // size)):
        g = k % LINES
        ts = t0 + timedelta(microseconds=100_000 * (k // LINES) + 17 * g)
        polls.append((f"line{g}", ts, {name: 20.0 + ((k * 7 + i) % 1000) * 0.01 for i, name in enumerate(names[g])}))
    return polls


def load() -> str:
    """The 1-minute load average, for reading the spread ("?" where the platform has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "?"


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100); NaN for no samples."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def spread(xs: Sequence[float], fmt: str = ",.0f") -> str:
    """'median (min-max)' of the rounds."""
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    return int(n)


def make_config(work: Path, mode: str, fsync_interval: float | None = None) -> Config:
    """A pipeline writing into `work`/tagwriter.db, its queue (disk mode) in `work`/queue."""
    buffer = BufferConfig(capacity=CAPACITY, overflow_policy="block", block_timeout=600.0, durability=mode,
                          directory=str(work / "queue"))
    if fsync_interval is not None:
        buffer.fsync_interval = fsync_interval
    config = Config(
        buffer=buffer,
        writer=WriterConfig(batch_size=BATCH, flush_interval=1.0),
        database=DatabaseConfig(url=f"sqlite:///{work / 'tagwriter.db'}"),
        backup=BackupConfig(directory=str(work / "backup"), quarantine_directory=str(work / "backup" / "q"),
                            auto_replay=False),
    )
    validate(config)
    return config


def started(config: Config, threads: dict[str, cProfile.Profile] | None = None) -> Pipeline:
    """A started pipeline whose writer is ready (table made); `threads` profiles its writer and commit threads."""
    p = Pipeline(config)
    if threads is not None:
        profile_thread(p._writer, "_thread", p._writer._run, "tagwriter-writer", threads["writer"])
        if p._queue is not None:
            profile_thread(p._queue, "_thread", p._queue._run, "tagwriter-queue", threads["commit"])
    p.start()
    deadline = time.monotonic() + 30
    while p.snapshot().state != "writing":
        if time.monotonic() > deadline:
            p.stop(5.0)
            raise RuntimeError(f"writer did not start: {p.snapshot().last_error}")
        time.sleep(0.01)
    return p


def profile_thread(owner: Any, attr: str, run: Callable[[], None], name: str, prof: cProfile.Profile) -> None:
    """Replace the not yet started thread `owner.attr` by one that runs `run` under `prof`."""
    setattr(owner, attr, threading.Thread(target=lambda: prof.runcall(run), name=name, daemon=True))


def checked_stop(p: Pipeline, db: Path, n: int, what: str) -> dict[str, Any]:
    """Stop `p`; raise unless exactly `n` values reached the table and nothing was spooled, dropped or left."""
    snap = p.snapshot()
    ok = p.stop(30.0)
    rows = count_rows(db)
    after = p.snapshot()
    if not ok or not (snap.written == n == rows) or snap.dropped or snap.spooled or after.queue_values:
        raise RuntimeError(f"{what}: {n:,} submitted, {snap.written:,} written, {rows:,} in the table, "
                           f"{snap.dropped:,} dropped, {snap.spooled:,} spooled, {after.queue_values:,} left "
                           f"queued, stop -> {ok}: {after}")
    return {"commits": snap.queue_commits, "fsync_p50_s": snap.queue_fsync_p50_s,
            "fsync_p99_s": snap.queue_fsync_p99_s}


# -- 1. max rate ---------------------------------------------------------------


def run_max_rate(polls: list[Poll], work: Path, mode: str,
                 threads: dict[str, cProfile.Profile] | None = None) -> dict[str, Any]:
    """Submit every poll flat out from a producer thread; values/s until flush() returns."""
    p = started(make_config(work, mode), threads)

    def produce() -> None:
        submit = p.submit
        for group, ts, values in polls:
            submit(PollingData(group, ts, values, QUALITY))

    target: Callable[[], None] = produce
    if threads is not None:
        target = lambda: threads["producer"].runcall(produce)  # noqa: E731
    producer = threading.Thread(target=target, name="producer")
    n = sum(len(v) for _, _, v in polls)
    gc.collect()
    t0 = time.perf_counter()
    producer.start()
    producer.join(RUN_TIMEOUT)
    produced = time.perf_counter() - t0
    if producer.is_alive() or not p.flush(RUN_TIMEOUT):
        snap = p.snapshot()
        p.abort()
        raise RuntimeError(f"{mode}: hung (producer alive: {producer.is_alive()}) after {RUN_TIMEOUT:g} s: {snap}")
    elapsed = time.perf_counter() - t0
    queue = checked_stop(p, work / "tagwriter.db", n, f"{mode} max rate")
    return {"rate": n / elapsed, "seconds": elapsed, "producer_s": produced, **queue}


def max_rate_rounds(work: Path, values: int, rounds: int) -> dict[int, dict[str, list[dict[str, Any]]]]:
    results: dict[int, dict[str, list[dict[str, Any]]]] = {s: {m: [] for m in MODES} for s in SIZES}
    for size in SIZES:
        polls = make_polls(values, size)
        for r in range(rounds):
            for mode in MODES[r % 2:] + MODES[:r % 2]:
                res = in_fresh(work, lambda w: run_max_rate(polls, w, mode))  # noqa: B023
                results[size][mode].append(res)
                extra = (f"; {res['commits']} group commits, p50 {res['fsync_p50_s'] * 1000:.1f} ms, "
                         f"p99 {res['fsync_p99_s'] * 1000:.0f} ms" if mode == "disk" else "")
                print(f"round {r + 1}: groups of {size:<5d} {mode:6s} {res['rate']:>10,.0f} values/s "
                      f"({res['seconds']:.2f} s, producer done at {res['producer_s']:.2f} s{extra})", flush=True)
    return results


def in_fresh(work: Path, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`fn` in a new folder under `work` (table, queue, spool), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        return fn(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_max_rate(results: dict[int, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    mark = {True: "ok", False: "BELOW TARGET"}
    report: dict[str, Any] = {}
    print("\n1. max rate into SQLite through Pipeline (values/s, median (min-max) of rounds)")
    print(f"  {'groups':>6s} {'disk':>28s} {'memory':>28s} {'disk/memory':>22s}  targets: disk >= "
          f"{TARGET_RATE:,}, ratio >= {TARGET_RATIO} (issue 13), >= {TARGET_RATIO_17} (issue 17)")
    for size, by_mode in results.items():
        disk = [r["rate"] for r in by_mode["disk"]]
        memory = [r["rate"] for r in by_mode["memory"]]
        ratio = statistics.median(disk) / statistics.median(memory)
        paired = [d / m for d, m in zip(disk, memory, strict=True)]
        verdict = (f"rate {mark[statistics.median(disk) >= TARGET_RATE]}, 0.6 {mark[ratio >= TARGET_RATIO]}, "
                   f"0.7 {mark[ratio >= TARGET_RATIO_17]}")
        print(f"  {size:>6d} {spread(disk):>28s} {spread(memory):>28s} {ratio:>6.2f} ({min(paired):.2f}-"
              f"{max(paired):.2f} by round)  {verdict}")
        report[str(size)] = {"disk_rates": disk, "memory_rates": memory, "ratio": ratio, "paired_ratios": paired,
                             "disk_commits": [r["commits"] for r in by_mode["disk"]],
                             "disk_fsync_p50_s": [r["fsync_p50_s"] for r in by_mode["disk"]],
                             "disk_fsync_p99_s": [r["fsync_p99_s"] for r in by_mode["disk"]]}
    return report


# -- 2. acknowledgement latency ------------------------------------------------------


def run_acks(polls: list[Poll], work: Path, interval: float) -> dict[str, Any]:
    """Submit `polls` one every ACK_GROUP / ACK_RATE seconds; the latency of each receipt."""
    p = started(make_config(work, "disk", interval))
    pace = ACK_GROUP / ACK_RATE
    latencies: list[float] = []

    def stamp(t0: float) -> Callable[[], None]:
        return lambda: latencies.append(time.perf_counter() - t0)

    cpu0 = time.process_time()
    commits0 = p.snapshot().queue_commits
    start = next_at = time.perf_counter()
    receipt = None
    for group, ts, values in polls:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # pacing the offered load, not synchronisation
        data = PollingData(group, ts, values, QUALITY)
        t0 = time.perf_counter()
        receipt = p.submit(data)
        receipt.on_settled(stamp(t0))
        if not receipt:
            raise RuntimeError(f"fsync_interval {interval}: a submit was refused: {p.snapshot()}")
        next_at += pace
    if receipt is not None and not receipt.wait(RUN_TIMEOUT):
        raise RuntimeError(f"fsync_interval {interval}: the last receipt did not settle: {p.snapshot()}")
    window = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    commits = p.snapshot().queue_commits - commits0
    n = sum(len(v) for _, _, v in polls)
    if len(latencies) != len(polls):
        raise RuntimeError(f"fsync_interval {interval}: {len(latencies)} of {len(polls)} receipts settled")
    if not p.flush(RUN_TIMEOUT):
        raise RuntimeError(f"fsync_interval {interval}: flush hung: {p.snapshot()}")
    queue = checked_stop(p, work / "tagwriter.db", n, f"fsync_interval {interval}")
    return {"latencies": latencies, "offered_per_s": n / window, "cpu_ms_per_1000": 1000 * 1000 * cpu / n,
            "commits_per_s": commits / window, "commit_p99_ms": queue["fsync_p99_s"] * 1000}


def ack_rounds(work: Path, seconds: float, rounds: int) -> dict[float, list[dict[str, Any]]]:
    polls = make_polls(int(ACK_RATE * seconds), ACK_GROUP)
    runs: dict[float, list[dict[str, Any]]] = {i: [] for i in INTERVALS}
    for r in range(rounds):
        order = list(INTERVALS[r % len(INTERVALS):] + INTERVALS[:r % len(INTERVALS)])
        for interval in order:
            res = in_fresh(work, lambda w: run_acks(polls, w, interval))  # noqa: B023
            runs[interval].append(res)
            lat = res["latencies"]
            print(f"ack round {r + 1}: fsync_interval {interval * 1000:>5.1f} ms: p50 "
                  f"{percentile(lat, 50) * 1000:6.2f} ms, p99 {percentile(lat, 99) * 1000:6.2f} ms "
                  f"({len(lat)} receipts)", flush=True)
    return runs


def print_acks(runs: dict[float, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    print(f"\n2. acknowledgement latency, submit -> receipt settled, disk mode, {ACK_RATE:,} values/s offered in "
          f"groups of {ACK_GROUP}, {seconds:g} s a run, runs pooled per interval: {len(next(iter(runs.values())))} "
          f"(target p99 <= interval + {ACK_SLACK * 1000:.0f} ms)")
    print(f"  {'interval':>9s} {'receipts':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'p99 by round':>15s} {'max ms':>7s} "
          f"{'target':>7s} {'commits/s':>9s} {'commit p99':>10s} {'CPU ms/1k':>9s}")
    report: dict[str, Any] = {}
    for interval, got in runs.items():
        lat = [x for res in got for x in res["latencies"]]
        p99 = percentile(lat, 99)
        by_round = [percentile(res["latencies"], 99) * 1000 for res in got]
        limit = interval + ACK_SLACK
        row = {"p50_ms": percentile(lat, 50) * 1000, "p99_ms": p99 * 1000, "max_ms": max(lat) * 1000,
               "p99_by_round_ms": by_round, "receipts": len(lat), "target_ms": limit * 1000, "met": p99 <= limit,
               "offered_per_s": statistics.median(r["offered_per_s"] for r in got),
               "commits_per_s": statistics.median(r["commits_per_s"] for r in got),
               "commit_p99_ms": max(r["commit_p99_ms"] for r in got),
               "cpu_ms_per_1000": statistics.median(r["cpu_ms_per_1000"] for r in got)}
        name = "0 always" if interval == 0 else f"{interval * 1000:g} ms"
        report[name] = row
        print(f"  {name:>9s} {len(lat):>8d} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
              f"{min(by_round):>7.2f}-{max(by_round):<7.2f} {row['max_ms']:>7.2f} {limit * 1000:>7.0f} "
              f"{row['commits_per_s']:>9.1f} {row['commit_p99_ms']:>10.1f} {row['cpu_ms_per_1000']:>9.2f}  "
              f"{'ok' if row['met'] else 'ABOVE TARGET'}")
    return report


# -- 3. CPU at plant load ------------------------------------------------------------


def run_plant(work: Path, mode: str, seconds: float) -> dict[str, Any]:
    """The load test's plant preset through Service for `seconds` after a warm-up; CPU per 1,000 values."""
    config = make_config(work, mode)
    result = run_trial(config, LoadShape(*PRESETS["plant"]), duration=seconds, warmup=CPU_WARMUP)
    f = result.final
    if f is None or not result.stopped_cleanly or f.submitted != f.accounted or f.dropped or f.spooled:
        raise RuntimeError(f"plant load, {mode}: did not add up or stop cleanly (stopped cleanly: "
                           f"{result.stopped_cleanly}): {f}")
    if f.written != count_rows(work / "tagwriter.db"):
        raise RuntimeError(f"plant load, {mode}: {f.written:,} written but {count_rows(work / 'tagwriter.db'):,} "
                           "in the table")
    return {"cpu_ms_per_1000": result.cpu_s_per_1000_values * 1000, "achieved_per_s": result.achieved_per_s,
            "cpu_s": result.cpu_s, "window_s": result.window_s}


def cpu_rounds(work: Path, seconds: float, rounds: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES[r % 2:] + MODES[:r % 2]:
            res = in_fresh(work, lambda w: run_plant(w, mode, seconds))  # noqa: B023
            runs[mode].append(res)
            print(f"cpu round {r + 1}: {mode:6s} {res['cpu_ms_per_1000']:6.2f} ms CPU per 1,000 values "
                  f"({res['achieved_per_s']:,.0f} values/s over {res['window_s']:.1f} s)", flush=True)
    return runs


def print_cpu(runs: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    groups, tags, interval = PRESETS["plant"]
    print(f"\n3. CPU per 1,000 values at plant load ({groups} x {tags} tags every {interval:g} s, "
          f"{seconds:g} s after {CPU_WARMUP:g} s warm-up, process CPU; target <= {TARGET_CPU_MS:g} ms)")
    report: dict[str, Any] = {}
    for mode, got in runs.items():
        xs = [r["cpu_ms_per_1000"] for r in got]
        report[mode] = {"cpu_ms_per_1000": xs, "median": statistics.median(xs)}
        met = statistics.median(xs) <= TARGET_CPU_MS
        print(f"  {mode:6s} {spread(xs, '.2f'):>22s} ms  {'ok' if met else 'ABOVE TARGET'}")
    report["ratio_disk_memory"] = report["disk"]["median"] / report["memory"]["median"]
    report["extra_ms_disk"] = report["disk"]["median"] - report["memory"]["median"]
    print(f"  disk/memory {report['ratio_disk_memory']:.2f}; the queue adds {report['extra_ms_disk']:.2f} ms "
          "per 1,000 values")
    return report


# -- 4. profile ----------------------------------------------------------------------


def profile_disk(work: Path, values: int, size: int, clock: str) -> dict[str, Any]:
    """One disk round at max rate under cProfile: the top functions of each thread by own time.

    `clock` "cpu": each thread's CPU clock, what the code costs (a system call per event: the round runs
    several times slower). "wall": cProfile's default timer; a thread's waits count as own time, not only
    lock `acquire` and fsync but the wait to get the GIL back after any call that lets it go (sqlite3,
    zlib.crc32 of a large record), so a busy producer makes those calls look costly.
    """
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    threads = {name: cProfile.Profile(timer) for name in ("producer", "writer", "commit")}
    res = in_fresh(work, lambda w: run_max_rate(make_polls(values, size), w, "disk", threads))
    print(f"\n4. where the time goes: disk mode, max rate, groups of {size}, one round under cProfile, {clock} "
          f"clock ({res['rate']:,.0f} values/s profiled, {res['seconds']:.2f} s); top {PROFILE_TOP} by own time "
          "per thread")
    report: dict[str, Any] = {"size": size, "clock": clock, "rate": res["rate"], "seconds": res["seconds"]}
    for name, prof in threads.items():
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        own = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(PROFILE_TOP)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
        table = [line for line in lines[start:] if line.strip()]
        print(f"\n--- {name} thread: {own:.2f} s own time in all ---")
        print("\n".join(table))
        report[name] = {"own_s": own, "top": table[1:]}
    return report


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    project = Path(__file__).resolve().parents[3]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--values", type=int, default=500_000, help="values per max-rate round (default 500,000)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating max-rate rounds per group size (default 3)")
    ap.add_argument("--ack-seconds", type=float, default=3.0, help="seconds per acknowledgement run (default 3)")
    ap.add_argument("--ack-rounds", type=int, default=2, help="acknowledgement rounds, pooled (default 2)")
    ap.add_argument("--cpu-seconds", type=float, default=10.0, help="measured seconds per plant-load run")
    ap.add_argument("--cpu-rounds", type=int, default=2, help="alternating plant-load rounds (default 2)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile round")
    ap.add_argument("--profile-size", type=int, choices=SIZES, default=1000,
                    help="group size of the cProfile round (default 1000)")
    ap.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                    help="cProfile's timer: each thread's CPU clock (default) or wall (waits included)")
    ap.add_argument("--quick", action="store_true", help="~30 s: fewer values, rounds and seconds")
    ap.add_argument("--dir", type=Path, default=project,
                    help=f"folder for tables and queues, on the disk the queue will use (default {project})")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' = stdout)")
    args = ap.parse_args(argv)
    if args.quick:
        args.values, args.rounds, args.ack_seconds, args.ack_rounds = 150_000, 2, 1.0, 1
        args.cpu_seconds, args.cpu_rounds = 3.0, 1

    t_start = time.perf_counter()
    print(f"bench_queue: tables and queues in {args.dir}; sqlite {sqlite3.sqlite_version}; "
          f"fsync_interval default {BufferConfig().fsync_interval:g} s; batch {BATCH}, capacity {CAPACITY:,}; "
          f"{os.cpu_count()} CPUs, load average {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-queue-", dir=args.dir) as tmp:
        work = Path(tmp)
        report: dict[str, Any] = {"max_rate": print_max_rate(max_rate_rounds(work, args.values, args.rounds))}
        report["ack_latency"] = print_acks(ack_rounds(work, args.ack_seconds, args.ack_rounds), args.ack_seconds)
        report["cpu_plant"] = print_cpu(cpu_rounds(work, args.cpu_seconds, args.cpu_rounds), args.cpu_seconds)
        if not args.no_profile:
            report["profile"] = profile_disk(work, args.values, args.profile_size, args.profile_clock)
    print(f"\nbench_queue: {time.perf_counter() - t_start:.0f} s; load average {load()} (other work on the machine "
          "widens the min-max)")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

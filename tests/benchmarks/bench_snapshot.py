"""Benchmark: what a metrics snapshot pays for the spool, with 1,000 and 5,000 spool files.

Not collected by pytest. Run:  python tests/benchmarks/bench_snapshot.py [--files 1000 5000] [--calls 5000]

A folder holds N completed spool files (5,000 is a 3.5-day outage at the
default one-minute roll) and one open `.partial`. Before: `old_stats` below
reproduces how `RollingCsv.stats` answered until the counts were kept: under
the spool lock, list the folder (a stat per entry) and stat every file again
for the bytes. After: `Spool.stats()`, from the counts. Also timed, the
same way: `SpoolDrain.status()`, the spool's other share of
`Pipeline.snapshot()`, which listed and stat'ed every file too (`old_backlog`).
Each figure is the median of many calls.
Target: every "after" under 1 ms whatever the folder holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tagwriter.config import Config
from tagwriter.models import TagValue
from tagwriter.recovery import SpoolDrain
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import Spool
from tagwriter.spoolformat import SPOOL_HEADER, spool_fields

T0 = 1_700_000_000_000_000


def make_folder(directory: Path, files: int) -> Spool:
    """`files` completed spool files of 100 rows each, then a Spool with one open file."""
    directory.mkdir(parents=True)
    body = ",".join(SPOOL_HEADER) + "\n" + "".join(
        ",".join(map(str, spool_fields(TagValue(f"line1.tag{i:04d}", T0, 20.5 + i, 192)))) + "\n" for i in range(100)
    )
    for k in range(files):
        (directory / f"tagwriter-20240101T{k // 60:04d}{k % 60:02d}000000Z-1-{k % 10_000:04d}.csv").write_text(body)
    spool = Spool(directory, directory / "quarantine", roll_seconds=86_400)
    spool.write_rows([TagValue("live.tag", T0, 1.0, 192)])  # the open file
    return spool


def old_stats(directory: Path, prefix: str, lock: threading.RLock, open_file: bool) -> tuple[int, int]:
    """The scanning way (`len(files()) + open, folder_bytes()` under the lock), as the code was."""
    with lock:
        files = sorted(
            p for p in directory.iterdir()
            if p.is_file() and p.name.startswith(prefix + "-") and p.suffix == ".csv"
        )
        total = 0
        for entry in os.scandir(directory):
            if entry.is_file() and entry.name.startswith(prefix + "-"):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    continue
        return len(files) + open_file, total


def old_backlog(directory: Path, prefix: str) -> tuple[int, int]:
    """The scan `SpoolDrain.status()` made before the counts: list the completed files, stat each."""
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.startswith(prefix + "-") and p.suffix == ".csv"
    )
    size = 0
    for p in files:
        try:
            size += p.stat().st_size
        except OSError:
            continue
    return len(files), size


def median_us(call: Callable[[], object], calls: int) -> float:
    times: list[int] = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--calls", type=int, default=5000, help="calls per 'after' figure")
    ap.add_argument("--old-calls", type=int, default=50, help="calls per 'before' figure (each scans)")
    args = ap.parse_args()
    lock = threading.RLock()
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        for n in args.files:
            folder = Path(tmp) / f"backup-{n}"
            spool = make_folder(folder, n)
            drain = SpoolDrain(spool, SqliteSink(Path(tmp) / "unused.db"), Config())
            old = old_stats(folder, "tagwriter", lock, True)
            assert spool.stats() == old, (spool.stats(), old)  # the same figures, counted instead of scanned
            assert old_backlog(folder, "tagwriter") == spool.backup.completed()
            before = median_us(lambda: old_stats(folder, "tagwriter", lock, True), args.old_calls)  # noqa: B023
            after = median_us(spool.stats, args.calls)
            status_before = median_us(lambda: old_backlog(folder, "tagwriter"), args.old_calls)  # noqa: B023
            status_after = median_us(drain.status, args.calls)
            print(f"{n:>6,} files: Spool.stats() before {before:>9,.1f} us, after {after:5.2f} us, "
                  f"ratio {before / after:>8,.0f}x | SpoolDrain.status() before {status_before:>9,.1f} us, "
                  f"after {status_after:5.2f} us, ratio {status_before / status_after:>7,.0f}x "
                  f"(target: after < 1,000 us)")


if __name__ == "__main__":
    main()

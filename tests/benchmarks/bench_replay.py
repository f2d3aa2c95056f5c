"""Benchmark: `tagwriter replay` rows/s into SQLite vs a bare csv + executemany script.

Not collected by pytest. Run:  python tests/benchmarks/bench_replay.py [--rows 1000000] [--reps 3]

Both sides read the same spool files (1,000 tags in polling groups of 100
sharing a timestamp, rolled every 100,000 rows) into the same table (the
SqliteSink DDL: PRIMARY KEY (ts, tag_name) WITHOUT ROWID, WAL,
synchronous=NORMAL) in 500-row transactions, in the same process run; the
repetitions alternate and the medians are compared. Targets: >= 100,000
rows/s and >= 0.7 of the bare script.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from tagwriter.models import TagValue
from tagwriter.replay import replay_files
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import Spool

BATCH = 500


def make_spool(directory: Path, rows: int, tags: int = 1000, group: int = 100) -> list[Path]:
    spool = Spool(directory, directory / "quarantine", roll_rows=100_000, roll_seconds=86_400)
    t0 = 1_700_000_000_000_000
    done = 0
    poll = 0
    while done < rows:
        g = poll % max(1, tags // group)
        ts = t0 + poll * 100_000  # a poll every 0.1 s
        n = min(group, rows - done)
        spool.write_rows([TagValue(f"line{g}.tag{i:04d}", ts, 20.0 + (poll % 97) * 0.37 + i, 192)
                          for i in range(n)])
        done += n
        poll += 1
    spool.seal()
    return spool.backup.files()


def bench_replay(files: list[Path], work: Path) -> float:
    backup = work / "backup"
    backup.mkdir()
    copies = [Path(shutil.copy(f, backup / f.name)) for f in files]
    sink = SqliteSink(work / "replay.db")
    spool = Spool(backup, backup / "quarantine")
    t = time.perf_counter()
    report = replay_files(copies, sink=sink, spool=spool, batch_size=BATCH)
    elapsed = time.perf_counter() - t
    assert report.ok, report.reason()
    assert report.total("inserted") == sum(f.rows_read for f in report.files)
    return report.total("inserted") / elapsed


def bench_bare(files: list[Path], work: Path) -> float:
    path = work / "bare.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for stmt in SqliteSink(path).ddl():
        conn.execute(stmt)
    sql = "INSERT INTO tag_values (tag_name, ts, value, quality) VALUES (?, ?, ?, ?)"
    n = 0
    t = time.perf_counter()
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader)
            batch: list[tuple[object, ...]] = []
            for tag, ts, value, quality, *_ in reader:  # the checksum column, unchecked here
                batch.append((tag, ts, float(value) if value else None, int(quality)))
                if len(batch) == BATCH:
                    conn.execute("BEGIN")
                    conn.executemany(sql, batch)
                    conn.execute("COMMIT")
                    n += len(batch)
                    batch = []
            if batch:
                conn.execute("BEGIN")
                conn.executemany(sql, batch)
                conn.execute("COMMIT")
                n += len(batch)
    elapsed = time.perf_counter() - t
    conn.close()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=100, help="values per polling group (sharing a timestamp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        files = make_spool(root / "source", args.rows, group=args.group)
        print(f"spool: {len(files)} files, {args.rows:,} rows, "
              f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB (made in {time.perf_counter() - t:.1f} s)")
        replay_rates: list[float] = []
        bare_rates: list[float] = []
        for rep in range(args.reps):
            for name, fn, out in (("bare", bench_bare, bare_rates), ("replay", bench_replay, replay_rates)):
                work = root / f"{name}-{rep}"
                work.mkdir()
                out.append(fn(files, work))
                shutil.rmtree(work)
                print(f"  rep {rep + 1} {name:6s} {out[-1]:>10,.0f} rows/s")
        replay, bare = statistics.median(replay_rates), statistics.median(bare_rates)
        paired = statistics.median(r / b for r, b in zip(replay_rates, bare_rates, strict=True))
        print(f"median: replay {replay:,.0f} rows/s, bare csv+executemany {bare:,.0f} rows/s, "
              f"ratio {replay / bare:.2f}, median of the per-round ratios {paired:.2f} "
              f"(targets: >= 100,000 rows/s, >= 0.70)")


if __name__ == "__main__":
    main()

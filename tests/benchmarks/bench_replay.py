"""Benchmark: `tagwriter replay` rows/s into SQLite vs a bare csv + executemany script.

Not collected by pytest. Run:  python tests/benchmarks/bench_replay.py [--rows 1000000] [--reps 3]

Both sides read the same spool files (1,000 tags in polling groups of 100
sharing a timestamp, rolled every 100,000 rows) into the same table (the
SqliteSink DDL: PRIMARY KEY (ts, tag_name) WITHOUT ROWID, WAL,
synchronous=NORMAL) in 500-row transactions, in the same process run; the
repetitions alternate and the medians are compared. Two bare scripts: rows
by `executemany`, and ("bare-multi") by INSERTs of 100 rows each (multi-row
VALUES, as tagwriter's SQLite sink writes). Targets: >= 100,000 rows/s and
>= 0.7 of the faster bare script.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tagwriter.models import TagValue
from tagwriter.replay import replay_files
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.spool import Spool

BATCH = 500
BARE_STATEMENT_ROWS = 100  # bare-multi: rows per INSERT (as tagwriter's SQLite sink does)


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


def bench_bare(files: list[Path], work: Path, statement_rows: int = 0) -> float:
    """csv.reader + 500-row transactions of `executemany`, or (`statement_rows`) of INSERTs of that many
    rows each (multi-row VALUES, the rest by executemany)."""
    path = work / "bare.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for stmt in SqliteSink(path).ddl():
        conn.execute(stmt)
    head = "INSERT INTO tag_values (tag_name, ts, value, quality) VALUES "
    sql = head + "(?, ?, ?, ?)"
    multi = head + ", ".join(["(?, ?, ?, ?)"] * statement_rows)

    def write(batch: list[tuple[object, ...]]) -> None:
        conn.execute("BEGIN")
        whole = len(batch) // statement_rows * statement_rows if statement_rows else 0
        if whole:
            flat = list(itertools.chain.from_iterable(batch[:whole]))
            for at in range(0, whole * 4, statement_rows * 4):
                conn.execute(multi, flat[at:at + statement_rows * 4])
        conn.executemany(sql, batch[whole:])
        conn.execute("COMMIT")

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
                    write(batch)
                    n += len(batch)
                    batch = []
            if batch:
                write(batch)
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
        sides: dict[str, Callable[[list[Path], Path], float]] = {
            "bare": bench_bare, "bare-multi": lambda f, w: bench_bare(f, w, BARE_STATEMENT_ROWS),
            "replay": bench_replay}
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for rep in range(args.reps):
            for name, fn in (sides.items() if rep % 2 == 0 else reversed(sides.items())):
                work = root / f"{name}-{rep}"
                work.mkdir()
                rates[name].append(fn(files, work))
                shutil.rmtree(work)
                print(f"  rep {rep + 1} {name:10s} {rates[name][-1]:>10,.0f} rows/s")
        med = {name: statistics.median(r) for name, r in rates.items()}
        print("median: " + ", ".join(f"{name} {m:,.0f} rows/s" for name, m in med.items()))
        for base, what in (("bare", "csv + executemany"), ("bare-multi", f"csv + {BARE_STATEMENT_ROWS}-row INSERTs")):
            pairs = [r / b for r, b in zip(rates["replay"], rates[base], strict=True)]
            print(f"  replay / {base:10s} ({what}): {med['replay'] / med[base]:.2f} "
                  f"(per round {min(pairs):.2f}-{max(pairs):.2f})")
        strongest = max(("bare", "bare-multi"), key=med.__getitem__)
        print(f"  against the faster ({strongest}): {med['replay'] / med[strongest]:.2f} "
              f"(targets: >= 100,000 rows/s, >= 0.70)")


if __name__ == "__main__":
    main()

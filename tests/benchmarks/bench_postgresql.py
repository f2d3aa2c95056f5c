"""Benchmark: PostgresSink.write_batch (binary COPY + INSERT ... SELECT) vs psycopg executemany.

Not collected by pytest. Run:  python tests/benchmarks/bench_postgresql.py [--rows 100000] [--rounds 5]

Both sides write the same rows (1,000 tags in polling groups of 100 sharing a
timestamp) into the same table (PostgresSink's DDL: PRIMARY KEY (tag_name,
ts)) of a throwaway database on the local server, in the same batches (one
transaction each), in the same process run. The table is truncated before
every pass; the order of the two sides alternates between rounds; medians
are compared. Baselines, both with a commit per batch:

- executemany ON CONFLICT: `INSERT ... VALUES (%s, %s, %s, %s) ON CONFLICT
  (tag_name, ts) DO NOTHING` (what a sink that counts duplicates must run),
  rows converted to datetimes in the timed part, as a sink would have to;
- executemany plain: the same without ON CONFLICT (cannot count duplicates;
  shown for reference);
- COPY direct: binary COPY straight into the table, no staging table (fails
  the whole batch on one duplicate; shown for reference: the staging
  table's cost is the gap between it and write_batch).

Target: COPY >= 3x executemany ON CONFLICT. The machine is shared: read the
ratios (also as the median of each round's ratio, which load changes between
rounds disturb less), not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tagwriter.models import TagValue
from tagwriter.sinks.postgresql import PG_EPOCH_US, PostgresSink

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INSERT = "INSERT INTO tag_values (tag_name, ts, value, quality) VALUES (%s, %s, %s, %s)"


def make_rows(n: int, tags: int = 1000, group: int = 100) -> list[TagValue]:
    t0 = 1_700_000_000_000_000
    rows: list[TagValue] = []
    poll = 0
    while len(rows) < n:
        g = poll % max(1, tags // group)
        ts = t0 + poll * 100_000  # a poll every 0.1 s
        rows.extend(TagValue(f"line{g}.tag{i:04d}", ts, 20.0 + (poll % 97) * 0.37 + i, 192)
                    for i in range(min(group, n - len(rows))))
        poll += 1
    return rows


def batches(rows: Sequence[TagValue], size: int) -> list[Sequence[TagValue]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def bench_copy(sink: PostgresSink, parts: list[Sequence[TagValue]]) -> float:
    t = time.perf_counter()
    n = sum(sink.write_batch(b).written for b in parts)
    return n / (time.perf_counter() - t)


def copy_direct(conn: psycopg.Connection[Any]) -> Callable[[list[Sequence[TagValue]]], float]:
    def run(parts: list[Sequence[TagValue]]) -> float:
        n = 0
        t = time.perf_counter()
        with conn.cursor() as cur:
            for b in parts:
                with cur.copy("COPY tag_values (tag_name, ts, value, quality) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(("text", "int8", "float8", "int2"))
                    for r in b:
                        cp.write_row((r.tag, r.ts_us - PG_EPOCH_US, r.value, r.quality))
                conn.commit()
                n += len(b)
        return n / (time.perf_counter() - t)
    return run


def executemany(conn: psycopg.Connection[Any], sql: str) -> Callable[[list[Sequence[TagValue]]], float]:
    def run(parts: list[Sequence[TagValue]]) -> float:
        n = 0
        t = time.perf_counter()
        with conn.cursor() as cur:
            for b in parts:
                cur.executemany(sql, [(r.tag, EPOCH + timedelta(microseconds=r.ts_us), r.value, r.quality)
                                      for r in b])
                conn.commit()
                n += len(b)
        return n / (time.perf_counter() - t)
    return run


def count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM tag_values").fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-sizes", default="500,5000", help="comma-separated")
    ap.add_argument("--admin", default=ADMIN, help="libpq conninfo of a user allowed to CREATE DATABASE")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows = make_rows(args.rows)
    name = f"tw_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        info = admin.info
        try:
            host = "127.0.0.1" if info.host.startswith("/") else info.host
            sink = PostgresSink(host=host, port=info.port, dbname=name, user=info.user, call_timeout=60.0)
            sink.create_table()
            conn = psycopg.connect(host=host, port=info.port, dbname=name, user=info.user)
            sides: dict[str, Callable[[list[Sequence[TagValue]]], float]] = {
                "COPY (write_batch)": lambda parts: bench_copy(sink, parts),
                "executemany ON CONFLICT": executemany(conn, INSERT + " ON CONFLICT (tag_name, ts) DO NOTHING"),
                "executemany plain": executemany(conn, INSERT),
                "COPY direct": copy_direct(conn),
            }
            print(f"PostgreSQL {info.server_version}, psycopg {psycopg.__version__}, {len(rows):,} rows, "
                  f"{args.rounds} rounds")
            for size in sizes:
                parts = batches(rows, size)
                rates: dict[str, list[float]] = {k: [] for k in sides}
                for rnd in range(args.rounds):
                    order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
                    for side in order:
                        conn.execute("TRUNCATE tag_values")
                        conn.commit()
                        rates[side].append(sides[side](parts))
                        assert count(conn) == len(rows), side
                    print(f"  batch {size:>5}, round {rnd + 1}: "
                          + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()) + " rows/s")
                med = {k: statistics.median(v) for k, v in rates.items()}
                copy = med["COPY (write_batch)"]
                base = med["executemany ON CONFLICT"]
                print(f"batch {size}: median rows/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in med.items()))
                paired = statistics.median(c / e for c, e in zip(
                    rates["COPY (write_batch)"], rates["executemany ON CONFLICT"], strict=True))
                print(f"batch {size}: COPY / executemany ON CONFLICT = {copy / base:.2f}x "
                      f"(median of per-round ratios {paired:.2f}x), "
                      f"COPY / executemany plain = {copy / med['executemany plain']:.2f}x, "
                      f"write_batch / COPY direct = {copy / med['COPY direct']:.2f} "
                      f"(target >= 3x: {'met' if copy >= 3 * base else 'NOT met'})")
            conn.close()
            sink.close()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()

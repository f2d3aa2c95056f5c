"""Benchmark: PostgresSink.write_batch against psycopg written by hand, with 0 %, 1 % and 100 % duplicates.

Not collected by pytest. Run:
    python tests/benchmarks/bench_postgresql.py [--rows 100000] [--rounds 5] [--batch 500] [--json out.json]

Every side writes the same rows (1,000 tags in polling groups of 100 sharing
a timestamp, a poll every 0.1 s) in the same batches, each batch committed
before the next, into a table of its own (PostgresSink's DDL: PRIMARY KEY
(tag_name, ts)) in a throwaway database on the local server. The cases put
0 %, 1 % or 100 % of the rows in the tables before the timed part, spread
evenly (at 1 %, five rows of every 500-row batch), as after an outage whose
spool is replayed over rows that did land.

Baselines, written with psycopg alone (no tagwriter code), each the
strongest a competent programmer would write for its job:

- a COPY: binary COPY straight into the table, one COPY per batch in
  autocommit (one statement is one committed transaction; no BEGIN/COMMIT
  round trips). Fails a whole batch on one duplicate: 0 % only.
- a COPY tx: the same inside BEGIN ... COMMIT (what the previous version of
  this script measured; shown for reference).
- b stage: per batch BEGIN, binary COPY into a session's temporary staging
  table (ON COMMIT DELETE ROWS), INSERT ... SELECT ... ON CONFLICT DO NOTHING,
  COMMIT: the usual way to bulk-load when duplicates may exist.
- c executemany: INSERT ... VALUES ... ON CONFLICT DO NOTHING by executemany
  (psycopg pipelines it), commit per batch, a datetime made once per distinct stamp.
- d unnest: one INSERT ... SELECT FROM unnest(text[], timestamptz[], float8[],
  int2[]) ON CONFLICT DO NOTHING per batch in autocommit, the lists adapted by
  psycopg in binary (close to what tagwriter does with duplicates: shown so
  that its share of the gain is visible).

tagwriter sides: `tagwriter` (PostgresSink as configured by default), and
`tagwriter conflict` (optimistic=False: every batch through the path that
tolerates duplicates, measured even when there are none). Rows reach
write_batch as `tagwriter.models.Chunk`s (what the writer hands it; `--lists`
hands lists of TagValue instead), built before the clock starts.

The machine is shared and its load changes by the second: the sides take
turns batch by batch (batch i of every side, then batch i + 1, the order
reversed every other batch and round), each timed on its own, so a burst of
load hits all of them alike. A round starts with a TRUNCATE and the case's
rows in every table, a CHECKPOINT, and a new connection (a new sink) per side.
Printed per case: each side's median rows/s over the rounds with min-max, and
tagwriter's ratio to each baseline as the ratio of medians and as the median
(min-max) of the per-round ratios. Read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tagwriter.models import Chunk, TagValue
from tagwriter.sinks.base import TableSpec
from tagwriter.sinks.postgresql import PostgresSink

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
COLS = "(tag_name, ts, value, quality)"
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01Z: binary timestamptz is int8 microseconds since then
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
COPY_TYPES = ("text", "int8", "float8", "int2")
ON_CONFLICT = "ON CONFLICT (tag_name, ts) DO NOTHING"
CASES = {"0 %": 0.0, "1 %": 0.01, "100 %": 1.0}
TAGWRITER = ("tagwriter", "tagwriter conflict")

Columns = tuple[list[str], list[int], list[float | None], list[int]]


class Side:
    """One way of writing batches into `table`: `start` before the clock, `write` per batch, `stop` after."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn, self.table = dsn, table
        self.inserted = 0  # rows the database reported inserting (-1: it does not say)

    def start(self, batches: list[Columns]) -> None: ...
    def write(self, i: int) -> None: ...
    def stop(self) -> None: ...


class Psycopg(Side):
    autocommit = True

    def start(self, batches: list[Columns]) -> None:
        self.batches = batches
        self.conn = psycopg.connect(self.dsn, autocommit=self.autocommit)
        self.cur = self.conn.cursor()
        self.inserted = -1

    def stop(self) -> None:
        self.conn.close()


def copy_rows(cp: psycopg.Copy, b: Columns) -> None:
    cp.set_types(COPY_TYPES)
    write = cp.write_row
    for row in zip(b[0], [s - PG_EPOCH_US for s in b[1]], b[2], b[3], strict=True):
        write(row)


class ACopy(Psycopg):
    def write(self, i: int) -> None:
        with self.cur.copy(f"COPY {self.table} {COLS} FROM STDIN (FORMAT BINARY)") as cp:
            copy_rows(cp, self.batches[i])


class ACopyTx(ACopy):
    autocommit = False

    def write(self, i: int) -> None:
        super().write(i)
        self.conn.commit()


class BStage(Psycopg):
    autocommit = False

    def start(self, batches: list[Columns]) -> None:
        super().start(batches)
        self.cur.execute("CREATE TEMPORARY TABLE stage (tag_name text, ts timestamptz, value float8, "
                         "quality int2) ON COMMIT DELETE ROWS")
        self.conn.commit()
        self.inserted = 0

    def write(self, i: int) -> None:
        with self.cur.copy(f"COPY stage {COLS} FROM STDIN (FORMAT BINARY)") as cp:
            copy_rows(cp, self.batches[i])
        self.cur.execute(f"INSERT INTO {self.table} {COLS} SELECT tag_name, ts, value, quality FROM stage "
                         f"{ON_CONFLICT}")
        self.inserted += self.cur.rowcount
        self.conn.commit()


class CExecutemany(Psycopg):
    autocommit = False

    def write(self, i: int) -> None:
        tags, stamps, values, qualities = self.batches[i]
        ts = {s: EPOCH + timedelta(microseconds=s) for s in set(stamps)}
        self.cur.executemany(f"INSERT INTO {self.table} {COLS} VALUES (%s, %s, %s, %s) {ON_CONFLICT}",
                             list(zip(tags, map(ts.__getitem__, stamps), values, qualities, strict=True)))
        self.conn.commit()


class DUnnest(Psycopg):
    def start(self, batches: list[Columns]) -> None:
        super().start(batches)
        self.inserted = 0

    def write(self, i: int) -> None:
        tags, stamps, values, qualities = self.batches[i]
        ts = {s: EPOCH + timedelta(microseconds=s) for s in set(stamps)}
        self.cur.execute(f"INSERT INTO {self.table} {COLS} SELECT * FROM unnest(%b::text[], %b::timestamptz[], "
                         f"%b::float8[], %b::int2[]) {ON_CONFLICT}",
                         (tags, list(map(ts.__getitem__, stamps)), values, qualities), prepare=True)
        self.inserted += self.cur.rowcount


class Tagwriter(Side):
    optimistic = True
    lists = False

    def sink(self) -> PostgresSink:
        info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return PostgresSink(host=str(info["host"]), port=int(str(info["port"])), dbname=str(info["dbname"]),
                            user=str(info["user"]), spec=TableSpec(table=self.table), call_timeout=60.0,
                            optimistic=self.optimistic)

    def start(self, batches: list[Columns]) -> None:
        self.parts: list[Sequence[TagValue]] = [Chunk(*b) for b in batches]
        if self.lists:
            self.parts = [list(map(TagValue._make, zip(*b, strict=True))) for b in batches]
        self.s = self.sink()
        self.s.open()
        self.inserted = 0

    def write(self, i: int) -> None:
        r = self.s.write_batch(self.parts[i])
        assert r.written + r.duplicates + len(r.rejected) == len(self.parts[i]), "counts do not add up"
        self.inserted += r.written

    def stop(self) -> None:
        self.s.close()


class TagwriterConflict(Tagwriter):
    optimistic = False


SIDES: dict[str, type[Side]] = {
    "tagwriter": Tagwriter, "tagwriter conflict": TagwriterConflict,
    "a COPY": ACopy, "a COPY tx": ACopyTx, "b stage": BStage, "c executemany": CExecutemany, "d unnest": DUnnest,
}


def make_columns(n: int, tags: int = 1000, group: int = 100) -> Columns:
    t0 = 1_700_000_000_000_000
    names: list[str] = []
    stamps: list[int] = []
    values: list[float | None] = []
    poll = 0
    while len(names) < n:
        g = poll % max(1, tags // group)
        k = min(group, n - len(names))
        names += [f"line{g}.tag{i:04d}" for i in range(k)]
        stamps += [t0 + poll * 100_000] * k
        values += [20.0 + (poll % 97) * 0.37 + i for i in range(k)]
        poll += 1
    return names, stamps, values, [192] * n


def split(cols: Columns, size: int) -> list[Columns]:
    n = len(cols[0])
    return [(cols[0][i:i + size], cols[1][i:i + size], cols[2][i:i + size], cols[3][i:i + size])
            for i in range(0, n, size)]


def prefill(conn: psycopg.Connection[Any], table: str, cols: Columns, share: float) -> int:
    """TRUNCATE, then put `share` of the rows (spread evenly) in the table; the number of rows put."""
    conn.execute(f"TRUNCATE {table}")
    n = len(cols[0])
    step = round(1 / share) if share else 0
    picked = range(n) if share >= 1.0 else range(step // 2, n, step) if step else range(0)
    if picked:
        with conn.cursor().copy(f"COPY {table} {COLS} FROM STDIN (FORMAT BINARY)") as cp:
            copy_rows(cp, ([cols[0][i] for i in picked], [cols[1][i] for i in picked],
                           [cols[2][i] for i in picked], [cols[3][i] for i in picked]))
    return len(picked)


def count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def run_round(conn: psycopg.Connection[Any], sides: dict[str, Side], cols: Columns, batches: list[Columns],
              share: float, rnd: int) -> dict[str, float]:
    """One round of every side, batch by batch; rows/s per side."""
    there = {k: prefill(conn, s.table, cols, share) for k, s in sides.items()}
    conn.execute("CHECKPOINT")
    for s in sides.values():
        s.start(batches)
    took = dict.fromkeys(sides, 0.0)
    order = list(sides)
    try:
        for i in range(len(batches)):
            for k in order if (i + rnd) % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                sides[k].write(i)
                took[k] += time.perf_counter() - t
    finally:
        for s in sides.values():
            s.stop()
    n = len(cols[0])
    for k, s in sides.items():
        assert count(conn, s.table) == n, k
        assert s.inserted in (-1, n - there[k]), (k, s.inserted)
    return {k: n / t for k, t in took.items()}


def summary(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def report_case(case: str, rates: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {"sides": {k: {"rates": v, **summary(v)} for k, v in rates.items()}, "ratios": {}}
    print(f"\n{case} of the rows already in the table: rows/s, median (min-max)")
    for k, v in rates.items():
        print(f"  {k:<20} {med[k]:>9,.0f} ({min(v):,.0f}-{max(v):,.0f})")
    for mine in (k for k in TAGWRITER if k in rates):
        for base in (k for k in rates if k not in TAGWRITER):
            paired = [m / b for m, b in zip(rates[mine], rates[base], strict=True)]
            ratio = {"of_medians": med[mine] / med[base], **summary(paired)}
            out["ratios"][f"{mine} / {base}"] = ratio
            print(f"  {mine} / {base}: {ratio['of_medians']:.2f} "
                  f"(per round {ratio['median']:.2f}, {ratio['min']:.2f}-{ratio['max']:.2f})")
    return out


def tagwriter_source() -> str:
    """Where the measured tagwriter came from (a benchmark of the sink "before" runs from another tree)."""
    import tagwriter
    return str(tagwriter.__file__)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of: " + ", ".join(SIDES))
    ap.add_argument("--lists", action="store_true", help="hand write_batch lists of TagValue, not Chunks")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--admin", default=ADMIN, help="libpq conninfo of a user allowed to CREATE DATABASE")
    args = ap.parse_args()
    Tagwriter.lists = args.lists
    cols = make_columns(args.rows)
    batches = split(cols, args.batch)
    chosen = [k.strip() for k in args.sides.split(",")]
    name = f"tw_bench_{uuid.uuid4().hex[:10]}"
    results: dict[str, Any] = {}
    with psycopg.connect(args.admin, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        info = admin.info
        server = info.server_version
        try:
            host = "127.0.0.1" if info.host.startswith("/") else info.host
            dsn = f"host={host} port={info.port} dbname={name} user={info.user}"
            every = {k: SIDES[k](dsn, f"t{i}") for i, k in enumerate(chosen)}
            for s in every.values():
                PostgresSink(host=host, port=info.port, dbname=name, user=info.user,
                             spec=TableSpec(table=s.table)).create_table()
            print(f"PostgreSQL {server}, psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), "
                  f"Python {sys.version.split()[0]}, {len(cols[0]):,} rows in batches of {args.batch}, "
                  f"{args.rounds} rounds, rows as {'lists' if args.lists else 'Chunks'}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                for case in (c.strip() for c in args.cases.split(",")):
                    share = CASES[case]
                    sides = {k: s for k, s in every.items() if share == 0 or not k.startswith("a ")}
                    rates: dict[str, list[float]] = {k: [] for k in sides}
                    for rnd in range(args.rounds):
                        for k, r in run_round(conn, sides, cols, batches, share, rnd).items():
                            rates[k].append(r)
                        print(f"  {case} round {rnd + 1}: "
                              + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()), flush=True)
                    results[case] = report_case(case, rates)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.json:
        meta = {"rows": len(cols[0]), "batch": args.batch, "rounds": args.rounds, "lists": args.lists,
                "server": server, "psycopg": psycopg.__version__, "tagwriter": tagwriter_source()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Issue 15: edge gateways -> JetStream -> a writer fleet -> PostgreSQL, as real processes.

- The fleet: 3 writers (`tagwriter run --source jetstream`, one durable) into one PostgreSQL table and
  2 edge gateways (`tagwriter run` with a jsonl file and database.url = nats://...), 1,000,000 values;
  one writer is killed with SIGKILL and one edge gateway killed and started again mid-run; at the end
  the table holds exactly the 1,000,000 rows of the inputs.
- An edge that cannot reach JetStream for 60 s (a FaultProxy dropping everything between it and the
  server): it queues and spools, forwards after, and every value is in the table once.

Needs nats-server (JetStream) on 127.0.0.1:4222 and PostgreSQL on 127.0.0.1:5432; skipped otherwise.
Each test makes its own stream and database. Figures go to the "reports" section at the end of the run
(the `report` fixture of conftest.py).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from fleet import TAGS, Part, edge, expected_sum, input_lines, setup_stream, write_input, writer
from nats_util import NATS, Broker, needs_nats, open_broker
from pg_util import PgDatabase, fresh_database
from procs import summary
from waits import wait_until

pytestmark = [needs_nats, pytest.mark.slow]

FLEET_VALUES = 1_000_000  # in total, half from each edge
OUTAGE_S = 60.0


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from open_broker()


@pytest.fixture
def stream(broker: Broker) -> Iterator[str]:
    name = f"tw_fleet_{uuid.uuid4().hex[:10]}"
    yield name
    broker.delete_stream(name)


def table(db: PgDatabase) -> tuple[int, float, int]:
    """Rows, the sum of their values, and distinct tags, in one look (0s while the table is missing)."""
    with db.connect() as conn:
        if conn.execute("SELECT to_regclass('tag_values')").fetchone() == (None,):
            return 0, 0.0, 0
        n, total, tags = conn.execute(
            "SELECT count(*), coalesce(sum(value), 0), count(DISTINCT tag_name) FROM tag_values").fetchone()
    return int(n), float(total), int(tags)


def rows(db: PgDatabase) -> int:
    return table(db)[0]


def stop_all(parts: list[Part]) -> None:
    for part in parts:
        if part.proc is not None and part.proc.poll() is None:
            part.proc.kill()
            part.proc.communicate(timeout=30)


def final_counts(part: Part) -> dict[str, int]:
    code, out, err = part.outputs[-1]
    assert code == 0, f"{part.name}: exit {code}\n{out}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return summary(out)


@pytest.mark.timeout(900)
def test_three_writers_two_edges_a_million_values_kill_9_a_writer_restart_an_edge(
        tmp_path: Path, broker: Broker, stream: str, report: Callable[[str], None]) -> None:
    per_edge = FLEET_VALUES // 2
    for n in (1, 2):
        (tmp_path / f"edge{n}").mkdir()
        write_input(tmp_path / f"edge{n}" / "input.jsonl", n, per_edge)
    with fresh_database("tw_fleet") as db:
        setup_stream(tmp_path, stream, db.url())
        writers = [writer(tmp_path, n, stream, db.url()) for n in (1, 2, 3)]
        edges = [edge(tmp_path, n, stream) for n in (1, 2)]
        parts = writers + edges
        try:
            for w in writers:
                w.start()
            for w in writers:
                wait_until(lambda w=w: (w.metric("source") or {}).get("connected"), f"{w.name} on the consumer", 30)
            started = time.monotonic()
            for e in edges:
                e.start()
            # An edge gateway restarted mid-run: SIGKILL while it publishes, then started again.
            wait_until(lambda: (edges[0].metric("written") or 0) >= per_edge // 4, "edge1 a quarter through", 60)
            edges[0].kill()
            edge_killed_at = time.monotonic() - started
            edges[0].start()
            # A writer killed mid-run: what it held unacknowledged goes to the others after ack_wait.
            wait_until(lambda: rows(db) >= FLEET_VALUES * 3 // 10, "30 % of the values in the table", 300)
            held = (writers[0].metric("source") or {}).get("acks_pending", 0)
            writers[0].kill()
            writer_killed_at, rows_at_kill = time.monotonic() - started, rows(db)
            for e in edges:
                e.wait(300)
            wait_until(lambda: rows(db) >= FLEET_VALUES, "every value in the table", 300)
            took = time.monotonic() - started
            wait_until(lambda: broker.consumer(stream, "writers").num_ack_pending == 0, "every message acked", 30)
            consumer = broker.consumer(stream, "writers")
            left_in_stream = broker.info(stream).state.messages
            redelivered = sum((w.metric("source") or {}).get("redeliveries", 0) for w in writers[1:])
            for w in writers[1:]:
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
                w.wait(60)
        finally:
            stop_all(parts)
        n, total, tags = table(db)
    assert n == FLEET_VALUES and tags == 2 * TAGS  # exactly the inputs' rows: the key makes count distinct
    assert total == pytest.approx(expected_sum({1: per_edge, 2: per_edge}), rel=1e-12)
    assert (consumer.num_pending, consumer.num_ack_pending, left_in_stream) == (0, 0, 0)
    assert held == 0 or redelivered > 0  # what the killed writer held went to the others
    counts = {w.name: final_counts(w) for w in writers[1:]}
    edge_runs = [summary(out) for _, out, _ in edges[0].outputs if out] + [final_counts(edges[1])]
    written = sum(c["written"] for c in counts.values())
    duplicates = sum(c["duplicates"] for c in counts.values())
    report(f"fleet: {FLEET_VALUES:,} values, 3 writers, 2 edges: all in the table after {took:.1f} s "
           f"(edge1 killed at {edge_killed_at:.1f} s and restarted; writer1 killed at {writer_killed_at:.1f} s "
           f"with {rows_at_kill:,} rows in the table, {held} messages held by it just before); the others got "
           f"{redelivered} messages redelivered; the two surviving writers wrote {written:,} and counted "
           f"{duplicates:,} duplicates; edge runs: {edge_runs}")


@pytest.mark.timeout(600)
def test_an_edge_cut_off_from_jetstream_for_60_s_queues_spools_and_forwards_every_value_once(
        tmp_path: Path, broker: Broker, stream: str, report: Callable[[str], None]) -> None:
    per_phase = 20_000
    with fresh_database("tw_fleet") as db, FaultProxy(NATS) as proxy:
        setup_stream(tmp_path, stream, db.url())
        w = writer(tmp_path, 1, stream, db.url())
        e = edge(tmp_path, 1, stream, nats=f"127.0.0.1:{proxy.port}", input_path="-")
        try:
            w.start()
            e.start()
            assert e.proc is not None and e.proc.stdin is not None
            feed = e.proc.stdin
            feed.writelines(input_lines(1, 0, per_phase))
            feed.flush()
            wait_until(lambda: rows(db) == per_phase, "the first values in the table", 60)
            proxy.blackhole()  # the edge's network goes: nothing answers, nothing is refused
            cut = time.monotonic()
            feed.writelines(input_lines(1, per_phase, per_phase))
            feed.flush()
            wait_until(lambda: e.metric("state") == "outage", "the edge in outage mode", 60)
            wait_until(lambda: (e.metric("spooled") or 0) > 0, "the edge spooling", 60)
            assert rows(db) == per_phase
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut)))  # the outage's length is the scenario
            during = {k: e.metric(k) for k in ("state", "spooled", "written", "queue_values")}
            proxy.pass_through()
            back = time.monotonic()
            feed.writelines(input_lines(1, 2 * per_phase, per_phase))
            feed.flush()
            wait_until(lambda: rows(db) == 3 * per_phase, "every value in the table", 120)
            recovered_in = time.monotonic() - back
            wait_until(lambda: (e.metric("backlog_rows") or 0) == 0, "the edge's spool drained", 60)
            extra = e.metric("extra") or {}
            e.wait(60)  # closes its stdin: the end of its input
            assert w.proc is not None
            w.proc.send_signal(signal.SIGTERM)
            w.wait(60)
        finally:
            stop_all([w, e])
        n, total, _ = table(db)
    assert n == 3 * per_phase
    assert total == pytest.approx(expected_sum({1: 3 * per_phase}), rel=1e-12)
    edge_counts, writer_counts = final_counts(e), final_counts(w)
    assert edge_counts["submitted"] == 3 * per_phase and edge_counts["spooled"] > 0
    # Every spooled value forwarded after; a batch whose publish was stuck in the cut link when it went
    # silent may reach the stream late: its replay is then a duplicate JetStream's window catches.
    assert extra["replayed"] + extra["replay_duplicates"] == edge_counts["spooled"]
    assert writer_counts["written"] == 3 * per_phase
    report(f"edge outage: {OUTAGE_S:g} s without JetStream; during it {during}; after it all "
           f"{3 * per_phase:,} values were in the table within {recovered_in:.1f} s; edge {edge_counts}, "
           f"replayed {extra['replayed']} (+ {extra['replay_duplicates']} already in the stream); "
           f"writer {writer_counts}")

"""A 3-node JetStream cluster on loopback (tests/nats_cluster.py) with a replicas=3 stream: an edge publishes,
a writer consumes, the stream's leader node is killed with SIGKILL, and both go on; every value ends in the
table once. Needs the nats-server binary; skipped (with the reason) without it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Feeder
from nats_cluster import NatsCluster, nats_server_binary
from nats_util import Broker
from typer.testing import CliRunner
from waits import wait_until

from tagwriter.cli.app import app
from tagwriter.config import JetStreamConfig, load
from tagwriter.pipeline import Pipeline
from tagwriter.sources.jetstream import JetStreamSource

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nats_server_binary() is None, reason="the nats-server binary is not installed")]

STREAM = "CLUSTERED"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        c.wait_ready()
        yield c


def count(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=5) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tag_values'").fetchone():
            return 0
        return int(conn.execute("SELECT count(*) FROM tag_values").fetchone()[0])


def pipeline(tmp_path: Path, name: str, url: str, **overrides: Any) -> Pipeline:
    folder = tmp_path / name
    return Pipeline(load(None, env={}, overrides={
        "database.url": url, "backup.directory": str(folder / "backup"),
        "backup.quarantine_directory": str(folder / "backup" / "q"), "writer.flush_interval": 0.1,
        "writer.probe_interval": 0.2, "writer.probe_max_interval": 1.0, **overrides}))


@pytest.mark.timeout(300)
def test_killing_the_stream_leader_of_a_3_node_cluster_stops_neither_publishing_nor_consuming(
        tmp_path: Path, cluster: NatsCluster, report: Callable[[str], None]) -> None:
    config = tmp_path / "setup.toml"
    config.write_text("")
    result = CliRunner().invoke(app, ["jetstream", "setup", "--servers", cluster.urls, "--stream", STREAM,
                                      "--subjects", "cl.>", "--max-bytes", "256MiB"],
                                env={"TAGWRITER_CONFIG": str(config), "TAGWRITER_JETSTREAM__DURABLE": "writers",
                                     "TAGWRITER_JETSTREAM__ACK_WAIT": "5", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "replicas 3" in result.output  # auto: a cluster of 3
    hosts = cluster.urls.replace("nats://", "")
    edge = pipeline(tmp_path, "edge", f"nats://{hosts}/{STREAM}/cl.edge1", **{
        "database.call_timeout": 2.0, "database.connect_timeout": 1.0, "writer.retry_delays": [0.5, 1.0, 2.0, 4.0]})
    db = tmp_path / "central.sqlite"
    central = pipeline(tmp_path, "writer", f"sqlite:///{db}")
    source = JetStreamSource(JetStreamConfig(servers=cluster.urls, stream=STREAM, durable="writers", ack_wait=5.0,
                                             fetch_batch=4, reconnect_wait=0.2), writer_batch_size=500)
    broker = Broker(cluster.urls.split(","))
    stop = threading.Event()
    consumer = threading.Thread(target=source.run, args=(central.start(), stop), daemon=True)
    feeder = Feeder(edge.start(), tags=50, interval=0.01, prefix="edge1")
    try:
        consumer.start()
        feeder.start()
        wait_until(lambda: count(db) >= 5000, "values through the cluster", 60)
        leader = broker.info(STREAM).cluster.leader
        cluster.kill(leader)
        killed_at, rows_at_kill = time.monotonic(), count(db)
        wait_until(lambda: count(db) >= rows_at_kill + 10_000, "values still arriving without the leader", 90)
        going_on_after = time.monotonic() - killed_at
        new_leader = broker.info(STREAM).cluster.leader
        cluster.start(leader)
        wait_until(lambda: all(p.current and not p.offline for p in broker.info(STREAM).cluster.replicas or []),
                   "the restarted node caught up", 60)
        feeder.stop()
        assert edge.flush(30)
        wait_until(lambda: count(db) == len(feeder.values), "every value in the table", 60)
        wait_until(lambda: broker.consumer(STREAM, "writers").num_ack_pending == 0, "every message acked", 30)
        edge_snap = edge.snapshot()
    finally:
        feeder.stop()
        stop.set()
        consumer.join(10)
        edge.stop(5)
        central.stop(5)
        broker.close()
    assert count(db) == len(feeder.values) and central.snapshot().written + central.snapshot().duplicates == \
        central.snapshot().submitted
    assert new_leader and new_leader != leader
    assert edge_snap.submitted == len(feeder.values) == edge_snap.written + edge_snap.duplicates + edge_snap.spooled
    report(f"cluster: leader {leader} killed with {rows_at_kill:,} rows in the table; new leader {new_leader}; "
           f"10,000 more rows {going_on_after:.1f} s after the kill; {len(feeder.values):,} values in all, "
           f"each in the table once; edge: {edge_snap.retries} retries, {edge_snap.spooled} spooled, "
           f"{edge_snap.duplicates} duplicates; writer: {central.snapshot().duplicates} duplicates")

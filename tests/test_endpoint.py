"""The HTTP metrics endpoint against a running pipeline writing to a real SQLite file."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from procs import free_port
from prometheus_client.parser import text_string_to_metric_families
from waits import wait_until

from tagwriter.config import BackupConfig, BufferConfig, Config, DatabaseConfig, MetricsConfig, WriterConfig
from tagwriter.endpoint import PROMETHEUS_LATENCY_BOUNDS, MetricsServer, health
from tagwriter.errors import ConfigError
from tagwriter.metrics import LATENCY_BOUNDS, MetricsSnapshot
from tagwriter.models import PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.service import Service
from tagwriter.sinks.base import WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink
from tagwriter.sources.simulate import SimulatedSource, Simulator

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_config(tmp_path: Path, **sections: object) -> Config:
    cfg = Config(
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine")),
        writer=WriterConfig(batch_size=100, flush_interval=0.05, retry_delays=[0.01, 0.01],
                            probe_interval=0.05, probe_max_interval=0.1, shutdown_timeout=5.0),
    )
    return dataclasses.replace(cfg, **sections)


def polls(n_groups: int, tags: int = 10, start: int = 0) -> Iterator[PollingData]:
    for g in range(start, start + n_groups):
        ts = T0 + timedelta(seconds=g)
        yield PollingData("line1", ts, {f"line1.tag{t}": float(g * t) for t in range(tags)})


def get(url: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) for any status, with a bounded timeout."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


def wait_status(url: str, status: int, what: str, timeout: float = 5.0) -> str:
    """Poll `url` until it answers `status` (bounded); its body."""
    bodies: list[str] = []

    def answered() -> bool:
        code, body, _ = get(url)
        bodies.append(body)
        return code == status

    wait_until(answered, what, timeout)
    return bodies[-1]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Pipeline, MetricsServer]]:
    pipeline = Pipeline(make_config(tmp_path)).start()
    server = MetricsServer(pipeline, port=0).start()
    try:
        yield pipeline, server
    finally:
        server.stop(1.0)
        pipeline.stop(5.0)


def test_json_matches_the_snapshot_after_a_flush(running: tuple[Pipeline, MetricsServer]) -> None:
    pipeline, server = running
    for data in polls(25):
        pipeline.submit(data)
    assert pipeline.flush(5.0)
    status, body, headers = get(server.url + "/api/buffer/metrics")
    snap = pipeline.snapshot()
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert set(data) == {f.name for f in dataclasses.fields(MetricsSnapshot)}
    moving = {"uptime_s", "rate_in_per_s", "rate_out_per_s", "state_age_s", "last_commit_age_s",  # change
              "spool_disk_free_bytes"}
    for key, value in snap.as_dict().items():
        if key not in moving:
            assert data[key] == value, key
    assert data["submitted"] == data["written"] == 250
    assert data["state"] == "writing"
    assert data["batches_ok"] >= 3 and data["batches_failed"] == 0
    assert 0 < data["uptime_s"] <= snap.uptime_s
    # The JSON rebuilds the snapshot (what `tagwriter status` does).
    assert MetricsSnapshot(**data).accounted == 250


def test_prometheus_output_parses_with_the_right_types(running: tuple[Pipeline, MetricsServer]) -> None:
    pipeline, server = running
    for data in polls(30):
        pipeline.submit(data)
    assert pipeline.flush(5.0)
    status, body, headers = get(server.url + "/metrics")
    snap = pipeline.snapshot()
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    types = {name: f.type for name, f in families.items()}
    for name in ("tagwriter_rows_written", "tagwriter_rows_duplicate", "tagwriter_rows_spooled",
                 "tagwriter_rows_quarantined", "tagwriter_values_dropped", "tagwriter_values_submitted",
                 "tagwriter_batches", "tagwriter_retries", "tagwriter_outages", "tagwriter_fatal_errors"):
        assert types[name] == "counter", name
    for name in ("tagwriter_buffer_values", "tagwriter_buffer_capacity_values", "tagwriter_buffer_utilization_ratio",
                 "tagwriter_write_latency_seconds", "tagwriter_write_batch_size_values", "tagwriter_backup_files",
                 "tagwriter_backup_bytes", "tagwriter_writer_state", "tagwriter_uptime_seconds",
                 "tagwriter_overflow_ratio_1h", "tagwriter_backlog_rows", "tagwriter_backlog_files",
                 "tagwriter_waiting_values"):
        assert types[name] == "gauge", name
    assert types["tagwriter_end_to_end_latency_seconds"] == "histogram"

    def value(family: str, sample: str | None = None, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(f"no sample {sample or family} {labels}")

    assert value("tagwriter_rows_written", "tagwriter_rows_written_total") == snap.written == 300
    assert value("tagwriter_values_submitted", "tagwriter_values_submitted_total") == 300
    assert value("tagwriter_batches", "tagwriter_batches_total", result="ok") == snap.batches_ok
    assert value("tagwriter_batches", "tagwriter_batches_total", result="failed") == 0
    assert value("tagwriter_values_dropped", "tagwriter_values_dropped_total", reason="overflow") == 0
    assert value("tagwriter_buffer_capacity_values") == snap.buffer_capacity
    assert value("tagwriter_buffer_utilization_ratio") == snap.buffer_utilization_pct / 100
    assert value("tagwriter_writer_state", state="writing") == 1
    assert value("tagwriter_writer_state", state="outage") == 0

    hist = families["tagwriter_end_to_end_latency_seconds"]
    buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert buckets[-1] == ("+Inf", 300)
    assert value("tagwriter_end_to_end_latency_seconds", "tagwriter_end_to_end_latency_seconds_count") == 300
    assert value("tagwriter_end_to_end_latency_seconds", "tagwriter_end_to_end_latency_seconds_sum") > 0
    assert len(buckets) == len(PROMETHEUS_LATENCY_BOUNDS) + 1


def test_histogram_buckets_are_exact_subsets_of_the_latency_bounds(running: tuple[Pipeline, MetricsServer]) -> None:
    pipeline, server = running
    assert all(b in LATENCY_BOUNDS for b in PROMETHEUS_LATENCY_BOUNDS)
    # Values at known latencies: 3 below 1 ms-ish bounds, 2 between 0.1 s and 0.3 s, 1 above 10,000 s.
    for seconds, weight in ((0.0005, 3), (0.2, 2), (20_000.0, 1)):
        pipeline._metrics.latency.add(seconds, weight)
    families = {f.name: f for f in text_string_to_metric_families(get(server.url + "/metrics")[1])}
    le = {s.labels["le"]: s.value for s in families["tagwriter_end_to_end_latency_seconds"].samples
          if s.name.endswith("_bucket")}
    assert le["0.001"] == 3
    assert le["0.1"] == 3
    assert le["0.31622776601683794"] == 5
    assert le["10000.0"] == 5
    assert le["+Inf"] == 6


def test_healthz_503_in_outage_and_200_after_recovery(tmp_path: Path) -> None:
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    with Pipeline(make_config(tmp_path), sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, render_ttl=0).start()  # each answer reads the state now
        try:
            wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
            assert get(server.url + "/healthz")[:2] == (200, "ok: writing\n")
            sink.go_down()
            for data in polls(5):
                pipeline.submit(data)
            wait_until(lambda: pipeline.snapshot().state == "outage", "outage mode", 5)
            status, body, _ = get(server.url + "/healthz")
            assert status == 503
            assert body.startswith("unhealthy: outage: the database is unreachable")
            assert "database down (injected)" in body
            sink.come_up()
            wait_until(lambda: pipeline.snapshot().state == "writing", "recovery", 5)
            assert get(server.url + "/healthz")[:2] == (200, "ok: writing\n")
        finally:
            server.stop(1.0)


def test_livez_and_readyz_200_in_an_outage_while_healthz_is_503(tmp_path: Path) -> None:
    """An outage spooled without loss is live and ready (a Kubernetes probe must not restart the pod);
    only /healthz, for people, says 503."""
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    with Pipeline(make_config(tmp_path), sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, render_ttl=0).start()
        try:
            wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
            assert get(server.url + "/livez")[0] == 200
            assert get(server.url + "/readyz")[:2] == (200, "ok: writing\n")
            sink.go_down()
            for data in polls(5):
                pipeline.submit(data)
            wait_until(lambda: pipeline.snapshot().spooled == 50, "the outage to spool the values", 5)
            assert get(server.url + "/healthz")[0] == 503
            status, body, _ = get(server.url + "/livez")
            assert (status, body.startswith("ok: outage: the writer loop ticked")) == (200, True), body
            status, body, _ = get(server.url + "/readyz")
            assert (status, body) == (200, f"ok: outage: spooling to {tmp_path / 'backup'}\n")
            assert get(server.url + "/livez", method="HEAD")[:2] == (200, "")
            sink.come_up()
            wait_until(lambda: pipeline.snapshot().state == "writing", "recovery", 5)
            assert [get(server.url + p)[0] for p in ("/livez", "/readyz", "/healthz")] == [200, 200, 200]
        finally:
            server.stop(1.0)


class _Killed(BaseException):
    """Escapes every `except Exception`: ends the thread that raises it, as a bug would."""


class DyingSink(MemorySink):
    """Writes kill the writer thread once `die` is set; probes kill the probe thread once `die_probe` is."""

    def __init__(self, inner: SqliteSink) -> None:
        super().__init__(inner=inner)
        self.die = self.die_probe = False

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if self.die:
            raise _Killed("writer killed by the test")
        return super().write_batch(rows)

    def probe(self) -> None:
        if self.die_probe:
            raise _Killed("probe killed by the test")
        super().probe()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_writer_thread_fails_livez_readyz_and_healthz_at_once(tmp_path: Path) -> None:
    sink = DyingSink(SqliteSink(tmp_path / "tags.db"))
    pipeline = Pipeline(make_config(tmp_path), sink=sink).start()
    server = MetricsServer(pipeline, port=0, render_ttl=0).start()
    try:
        wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
        sink.die = True
        pipeline.submit(next(polls(1)))
        wait_until(lambda: not pipeline.alive, "the writer thread to die", 5)
        for path, word in (("/livez", "not live"), ("/readyz", "not ready"), ("/healthz", "unhealthy")):
            assert get(server.url + path)[:2] == (
                503, f"{word}: the writer thread has ended unexpectedly (see the log)\n"), path
        assert pipeline.snapshot().state == "failed"
        assert pipeline.writer_failed
        # Stopping spools what the dead writer held, its batch in flight included.
        assert pipeline.stop(5.0) is True
        snap = pipeline.snapshot()
        assert snap.spooled == snap.submitted == 10
    finally:
        server.stop(1.0)
        pipeline.stop(1.0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_probe_thread_in_an_outage_fails_livez(tmp_path: Path) -> None:
    sink = DyingSink(SqliteSink(tmp_path / "tags.db"))
    with Pipeline(make_config(tmp_path), sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, render_ttl=0).start()
        try:
            sink.die_probe = True
            sink.go_down()
            pipeline.submit(next(polls(1)))
            wait_until(lambda: pipeline.in_outage, "outage mode", 5)
            body = wait_status(server.url + "/livez", 503, "/livez to see the probe gone")
            assert body == "not live: outage mode without a probe thread: the database is never tried again\n"
            assert get(server.url + "/readyz")[0] == 200  # the spool still takes every value
        finally:
            server.stop(1.0)


def test_a_stuck_writer_loop_fails_livez_and_recovers(tmp_path: Path) -> None:
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    with Pipeline(make_config(tmp_path), sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, render_ttl=0).start()
        try:
            assert pipeline.writer_stall_limit >= 30.0  # the default: about a minute
            pipeline.writer_stall_limit = 0.2
            sink.block()
            pipeline.submit(next(polls(1)))
            assert sink.blocked.wait(5.0)  # a write that never returns (a real sink bounds its calls)
            body = wait_status(server.url + "/livez", 503, "/livez to see the writer stuck")
            assert body.startswith("not live: the writer loop has not ticked for ") and "(limit 0.2s)" in body
            pipeline.writer_stall_limit = 30.0
            sink.release()
            assert pipeline.flush(5.0)
            assert get(server.url + "/livez")[0] == 200
        finally:
            sink.release()
            server.stop(1.0)


def test_readyz_503_in_an_outage_once_the_spool_is_full(tmp_path: Path) -> None:
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(cfg, backup=dataclasses.replace(cfg.backup, max_bytes=1))
    with Pipeline(cfg, sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, render_ttl=0).start()
        try:
            sink.go_down()
            pipeline.submit(next(polls(1)))
            wait_until(lambda: pipeline.snapshot().spooled == 10, "the first batch to be spooled", 5)
            assert get(server.url + "/readyz")[0] == 200
            pipeline.submit(next(polls(1, start=1)))  # the next batch finds the cap reached
            wait_until(lambda: pipeline.snapshot().spool_full, "the spool to reach its cap", 5)
            body = wait_status(server.url + "/readyz", 503, "/readyz to see the spool full")
            assert body == "not ready: outage and the spool is full (backup.max_bytes): values are held in memory\n"
            assert get(server.url + "/livez")[0] == 200  # a restart would not help
        finally:
            server.stop(1.0)


def test_readyz_and_livez_503_once_stopped(tmp_path: Path) -> None:
    pipeline = Pipeline(make_config(tmp_path))
    server = MetricsServer(pipeline, port=0, render_ttl=0).start()
    try:
        assert get(server.url + "/livez")[:2] == (200, "ok: starting\n")  # not started yet, but alive
        assert get(server.url + "/readyz")[:2] == (503, "not ready: starting\n")
        pipeline.start()
        wait_until(lambda: get(server.url + "/readyz")[:2] == (200, "ok: writing\n"), "/readyz ready", 5)
        assert pipeline.stop(5.0) is True
        assert get(server.url + "/readyz")[:2] == (503, "not ready: stopped\n")
        assert get(server.url + "/livez")[:2] == (503, "not live: stopped\n")
    finally:
        server.stop(1.0)
        pipeline.stop(1.0)


class FailingSource:
    """A source with a bug: it raises at once."""

    name = "failing"

    def run(self, intake: object, stop: threading.Event) -> None:
        raise RuntimeError("bug in the source (injected)")


def test_the_service_livez_fails_when_the_source_thread_failed(tmp_path: Path) -> None:
    port = free_port()
    service = Service(make_config(tmp_path, metrics=MetricsConfig(port=port)), FailingSource())
    service.start()
    try:
        wait_until(lambda: service.source.done, "the source thread to fail", 5)
        status, body, _ = get(f"http://127.0.0.1:{port}/livez")
        assert (status, body) == (503, "not live: the source thread failed: RuntimeError('bug in the source "
                                       "(injected)')\n")
    finally:
        service.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_run_whose_writer_thread_dies_stops_spools_and_fails(tmp_path: Path) -> None:
    sink = DyingSink(SqliteSink(tmp_path / "tags.db"))
    sink.die = True
    service = Service(make_config(tmp_path), SimulatedSource(Simulator(1, 5, 0.01)), sink=sink)
    verdict = service.run(threading.Event(), duration=30.0)
    assert verdict.reason == "the writer thread failed"
    assert verdict.exit_code == 1
    assert verdict.snapshot.written == 0 and verdict.snapshot.spooled == verdict.snapshot.submitted > 0


def test_the_kubernetes_example_probes_livez_and_readyz() -> None:
    text = (Path(__file__).resolve().parents[1] / "examples" / "kubernetes.yaml").read_text()
    probes = dict(re.findall(r"^ +(\w+Probe):\n +httpGet: \{path: (\S+), port: metrics\}", text, re.MULTILINE))
    assert probes == {"livenessProbe": "/livez", "readinessProbe": "/readyz"}
    assert "containerPort: 9108" in text and '{name: TAGWRITER_METRICS__PORT, value: "9108"}' in text


def test_healthz_503_when_the_buffer_is_above_the_threshold(tmp_path: Path) -> None:
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    cfg = make_config(tmp_path, buffer=BufferConfig(capacity=100),
                      writer=WriterConfig(batch_size=10, flush_interval=0.01))
    with Pipeline(cfg, sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, health_max_buffer_pct=50.0, render_ttl=0).start()
        try:
            sink.block()
            pipeline.submit(next(polls(1, tags=10)))
            assert sink.blocked.wait(5.0)  # the writer holds those 10 at the gate
            pipeline.submit(next(polls(1, tags=60, start=1)))
            status, body, _ = get(server.url + "/healthz")
            assert status == 503
            assert body == ("unhealthy: writing: buffer 60.0% full "
                            "(above metrics.health_max_buffer_pct = 50%)\n")
            sink.release()
            assert pipeline.flush(5.0)
            assert get(server.url + "/healthz")[0] == 200
        finally:
            sink.release()
            server.stop(1.0)


def test_health_for_every_state() -> None:
    base = MetricsSnapshot(**{f.name: 0 for f in dataclasses.fields(MetricsSnapshot)
                              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
                           | {"state": "writing", "last_error": "", "dropped_by_reason": {}, "spool_full": False})
    assert health(base, 80.0) == (True, "writing")
    assert health(dataclasses.replace(base, buffer_utilization_pct=80.0), 80.0)[0] is True
    assert health(dataclasses.replace(base, buffer_utilization_pct=80.1), 80.0)[0] is False
    for state in ("starting", "retrying", "outage", "failed", "stopping", "stopped"):
        ok, reason = health(dataclasses.replace(base, state=state, last_error="ORA-12541"), 80.0)
        assert ok is False and reason.startswith(state + ": ")
        assert ("ORA-12541" in reason) == (state in ("retrying", "outage", "failed"))


def test_unknown_path_method_and_head(running: tuple[Pipeline, MetricsServer]) -> None:
    _, server = running
    status, body, _ = get(server.url + "/nope")
    assert status == 404 and "/api/buffer/metrics" in body and "/livez /readyz" in body
    status, _, headers = get(server.url + "/healthz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, body, headers = get(server.url + "/api/buffer/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 100
    assert get(server.url + "/metrics?x=1")[0] == 200  # a query string does not change the path


def test_binds_loopback_by_default_and_logs_nothing_per_request_at_info(
    running: tuple[Pipeline, MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    _, server = running
    assert server.address[0] == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}"
    with caplog.at_level(logging.INFO, logger="tagwriter"):
        for path in ("/healthz", "/metrics", "/api/buffer/metrics", "/nope"):
            get(server.url + path)
    assert [r for r in caplog.records if r.name == "tagwriter.endpoint"] == []


def test_stop_is_bounded_even_with_an_idle_client_connected(tmp_path: Path) -> None:
    with Pipeline(make_config(tmp_path)) as pipeline:
        server = MetricsServer(pipeline, port=0).start()
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=5)  # connects, never sends
        try:
            t0 = time.monotonic()
            assert server.stop(timeout=1.0) is True
            assert time.monotonic() - t0 < 1.5
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(server.url + "/healthz", timeout=2)
        finally:
            idle.close()


def test_the_service_serves_while_running_when_metrics_port_is_set(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(tmp_path, metrics=MetricsConfig(port=port))
    service = Service(config, SimulatedSource(Simulator(1, 5, 0.1)))
    assert service.metrics_server is None
    service.start()
    try:
        assert service.metrics_server is not None and service.metrics_server.port == port
        wait_until(lambda: service.pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
        assert get(f"http://127.0.0.1:{port}/healthz")[:2] == (200, "ok: writing\n")
    finally:
        t0 = time.monotonic()
        service.stop()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_pipeline_alone_serves_no_http(tmp_path: Path) -> None:
    port = free_port()
    with Pipeline(make_config(tmp_path, metrics=MetricsConfig(port=port))) as pipeline:
        wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_taken_port_fails_start_before_anything_runs(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(make_config(tmp_path, metrics=MetricsConfig(port=port)), SimulatedSource(Simulator(1, 5)))
        with pytest.raises(ConfigError, match=rf"metrics.port = {port}: cannot listen on 127.0.0.1:{port}"):
            service.start()
        assert not service.pipeline.running
        assert not service.pipeline.alive
        assert service.pipeline.stop(1.0) is True


def test_requests_are_served_concurrently(running: tuple[Pipeline, MetricsServer]) -> None:
    """Requests in flight at once are answered each on its own: clients that sent half a request
    (each holds its handler until the 5 s read timeout) do not delay a whole one, and are answered too.

    A server answering one request at a time would sit on the first stalled client for 5 s.
    """
    _, server = running
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        for client in stalled:
            client.sendall(b"GET /api/buffer/metrics HTTP/1.0\r\n")  # the request line, not the blank line that ends it
        began = time.monotonic()
        assert get(server.url + "/metrics")[0] == 200
        assert time.monotonic() - began < 2.0  # well under the 5 s a stalled client could hold a serial server
        for client in stalled:
            client.sendall(b"\r\n")
        for client in stalled:
            assert read_to_close(client).startswith(b"HTTP/1.0 200 "), "a stalled request was not answered"
    finally:
        for client in stalled:
            client.close()


def read_to_close(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (HTTP/1.0); bounded by the socket timeout."""
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_drain_counters_are_exported_by_outcome() -> None:
    """The automatic drain's figures (snapshot.extra) reach /metrics as counters."""
    from tagwriter.endpoint import snapshot_families
    from tagwriter.metrics import Metrics

    snap = Metrics().snapshot(replayed=7, replay_duplicates=3, replay_quarantined=1, replay_bad_lines=2,
                              replayed_files=4)
    families = {f.name: f for f in snapshot_families(snap)}
    rows = families["tagwriter_replayed_rows"]
    assert rows.type == "counter"
    assert {s.labels["outcome"]: s.value for s in rows.samples if s.name.endswith("_total")} == {
        "inserted": 7, "duplicate": 3, "quarantined": 1, "bad_line": 2}
    assert [s.value for s in families["tagwriter_replayed_files"].samples if s.name.endswith("_total")] == [4]


def test_concurrent_scrapers_share_one_rendering(running: tuple[Pipeline, MetricsServer]) -> None:
    """Requests within the render TTL get the same body, rendered once; all 20 concurrent ones are answered."""
    import concurrent.futures

    pipeline, _ = running
    server = MetricsServer(pipeline, port=0, render_ttl=60.0).start()  # a TTL no scheduling delay reaches
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: get(server.url + "/metrics"), range(20)))
        assert all(status == 200 for status, _, _ in answers)
        assert len({body for _, body, _ in answers}) == 1
        assert server.renders == 1
        first = server.response("/api/buffer/metrics")
        assert server.response("/api/buffer/metrics") is first and server.renders == 2
    finally:
        server.stop(1.0)

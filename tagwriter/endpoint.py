"""The HTTP metrics endpoint: JSON, Prometheus text, probes and a health check.

    server = MetricsServer(pipeline, "127.0.0.1", 0).start()   # 0 = an ephemeral port
    ... server.port ...
    server.stop(timeout=1.0)

Paths (GET or HEAD; anything else 404 / 405):
- `/api/buffer/metrics`: `MetricsSnapshot.as_dict()` as JSON (field names are
  the snapshot's; units are in the names: `_s` seconds, `_pct` percent).
- `/metrics`: the same figures in the Prometheus text format (prometheus_client),
  with the end-to-end latency and batch write histograms and prometheus_client's
  process, platform and GC collectors (`promtool check metrics` clean).
- `/livez`: 200 while the process and its worker threads are alive and the
  writer loop ticks (a liveness probe); 503 means only a restart helps.
  Independent of the database: an outage is live.
- `/readyz`: 200 while values are taken without loss, written or spooled (a
  readiness probe): an outage with room in the spool is ready.
- `/healthz`: for people: 200 `ok: writing`, or 503 with the reason (see
  `health`), an outage included. A database outage is an alert (`/metrics`,
  `tagwriter_writer_state`), never a probe failure: probes use `/livez` and `/readyz`.

The server runs in one daemon thread, answers each request in its own daemon
thread and never blocks the writer beyond the metrics lock a snapshot takes.
A rendered response is reused for RENDER_TTL (concurrent scrapers share one
snapshot) and accepts are paced (MIN_INTERVAL), so a client asking back to
back cannot take the writer's CPU. Requests are logged at DEBUG
only. The client side, used by `tagwriter status`, is `tagwriter.cli.status_client`.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tagwriter._version import __version__
from tagwriter.errors import ConfigError
from tagwriter.metrics import (
    LATENCY_BOUNDS,
    LATENCY_BUCKETS_PER_DECADE,
    LatencyHistogram,
    MetricsSnapshot,
    WriterState,
)

log = logging.getLogger(__name__)

JSON_PATH = "/api/buffer/metrics"
PROMETHEUS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
LIVE_PATH = "/livez"
READY_PATH = "/readyz"
PATHS = (JSON_PATH, PROMETHEUS_PATH, LIVE_PATH, READY_PATH, HEALTH_PATH)

#: A probe's verdict: (passes, one-line reason).
Check = Callable[[], tuple[bool, str]]

# Histogram bounds exposed to Prometheus, taken from LATENCY_BOUNDS itself so every
# cumulative bucket count is exact. End to end: every bound (10% apart) from 1 ms to
# 10 s, where a p99 lives from 100,000 values/s (~40 ms) to a slow plant (~1 s), so
# `histogram_quantile` is within 10% of the exact quantile there; then half-decades
# to 10,000 s (outages, retries). 103 buckets. Batch writes: 6 a decade, 100 µs to 100 s.
_PER_DECADE = LATENCY_BUCKETS_PER_DECADE
_MS, _TEN_S = _PER_DECADE, 5 * _PER_DECADE  # indexes of 1 ms and 10 s (LATENCY_BOUNDS[0] = 100 µs)
PROMETHEUS_LATENCY_BOUNDS = [b for i, b in enumerate(LATENCY_BOUNDS)
                             if _MS <= i <= _TEN_S or (i > _TEN_S and i % (_PER_DECADE // 2) == 0)]
PROMETHEUS_WRITE_BOUNDS = [b for i, b in enumerate(LATENCY_BOUNDS)
                           if i % (_PER_DECADE // 6) == 0 and i <= 6 * _PER_DECADE]  # to 100 s

# Unpaced and rendering a snapshot per request, a client requesting back to back cut
# the writer's throughput to 15-20% on 2 cores. Now a rendered response is reused for
# RENDER_TTL seconds, and accepts are paced to one per MIN_INTERVAL (50/s) sustained,
# with bursts of ACCEPT_BURST taken at once (many scrapers or dashboards asking at once).
RENDER_TTL = 0.025
MIN_INTERVAL = 0.020
ACCEPT_BURST = 50

# Drop reasons the pipeline records; exposed at 0 from the start so rate() works.
DROP_REASONS = ("overflow", "block_timeout", "spool_full", "spool_error", "quarantine_error", "queue_corrupt")

# States in which /healthz answers 503 whatever the buffer fill, and why.
UNHEALTHY_STATES = {
    WriterState.STARTING.value: "the database is not opened yet",
    WriterState.RETRYING.value: "a batch failed and is being retried",
    WriterState.OUTAGE.value: "the database is unreachable; values go to the spool",
    WriterState.FAILED.value: "a database error that retrying cannot fix; values go to the spool",
    WriterState.STOPPING.value: "shutting down",
    WriterState.STOPPED.value: "stopped",
}


class MetricsSource(Protocol):
    """What the endpoint reads: a `Pipeline` fits."""

    def snapshot(self) -> MetricsSnapshot: ...

    def latency_histogram(self) -> LatencyHistogram: ...

    def write_duration_histogram(self) -> LatencyHistogram: ...

    def liveness(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...


def health(snapshot: MetricsSnapshot, max_buffer_pct: float) -> tuple[bool, str]:
    """(healthy, one-line reason). Healthy = writing and the buffer at most `max_buffer_pct` full.

    `starting` is unhealthy until the sink opened (bounded by the connect
    timeout); `stopping` and `stopped` are unhealthy so monitors see the
    instance going away.
    """
    state = snapshot.state
    if state in UNHEALTHY_STATES:
        why = UNHEALTHY_STATES[state]
        if snapshot.last_error and state in ("retrying", "outage", "failed"):
            why = f"{why}: {snapshot.last_error}"
        return False, f"{state}: {why}"
    if snapshot.buffer_utilization_pct > max_buffer_pct:
        return False, (
            f"{state}: buffer {snapshot.buffer_utilization_pct:.1f}% full "
            f"(above metrics.health_max_buffer_pct = {max_buffer_pct:g}%)"
        )
    return True, state


def snapshot_json(snapshot: MetricsSnapshot) -> bytes:
    """The snapshot as JSON; a non-finite number becomes null (JSON has no NaN)."""
    return json.dumps(_finite(snapshot.as_dict()), separators=(",", ":"), sort_keys=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class SnapshotCollector(Collector):
    """Reads one snapshot per scrape and yields it as Prometheus metric families."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        s = self.source.snapshot()
        yield from snapshot_families(s)
        yield latency_histogram(self.source.latency_histogram())
        yield write_duration_histogram(self.source.write_duration_histogram())


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def source_families(s: MetricsSnapshot) -> Iterator[Metric]:
    """A plant source's state (MQTT, OPC UA, JetStream, Modbus); nothing for sources without a status."""
    src = s.source
    if not src:
        return
    kind = str(src.get("kind", ""))

    def labelled(family: GaugeMetricFamily | CounterMetricFamily, value: float) -> Metric:
        family.add_metric([kind], value)
        return family

    yield labelled(GaugeMetricFamily("tagwriter_source_connected", "1 while the source is connected.",
                                     labels=["kind"]), float(bool(src.get("connected", True))))
    age = src.get("last_message_age")
    if age is not None:
        yield labelled(GaugeMetricFamily("tagwriter_source_last_message_age_seconds",
                                         "Seconds since the source's last message.", labels=["kind"]), age)
    yield labelled(GaugeMetricFamily("tagwriter_source_acks_pending",
                                     "Messages received and not yet acknowledged upstream.", labels=["kind"]),
                   src.get("acks_pending", 0))
    for key, doc in (("messages", "Messages the source received."), ("values", "Values it submitted."),
                     ("redeliveries", "Messages the upstream sent again."),
                     ("reconnects", "Times the source reconnected."),
                     ("bad_messages", "Messages that could not be read (kept in quarantine).")):
        yield labelled(CounterMetricFamily(f"tagwriter_source_{key}", doc, labels=["kind"]), src.get(key, 0))


def queue_families(s: MetricsSnapshot) -> Iterator[Metric]:
    """The durable queue (buffer.durability = "disk"); nothing in memory mode."""
    if s.durability != "disk":
        return
    yield _gauge("tagwriter_queue_values", "Values durable in the disk queue, not yet released.", s.queue_values)
    yield _gauge("tagwriter_queue_bytes", "Bytes of the disk queue's records.", s.queue_bytes)
    yield _gauge("tagwriter_queue_max_bytes", "The disk queue's cap (buffer.max_disk_bytes; 0 = none).",
                 s.queue_max_bytes)
    yield _gauge("tagwriter_queue_pending_values", "Values submitted and not yet fsynced.", s.queue_pending)
    yield _gauge("tagwriter_queue_oldest_age_seconds", "Age of the oldest value in the disk queue.",
                 s.queue_oldest_age_s)
    yield _gauge("tagwriter_queue_disk_full", "1 while the disk queue cannot commit (disk full or failing).",
                 float(s.queue_disk_full))
    yield _counter("tagwriter_queue_acknowledged_values_total", "Values made durable (fsynced) in the disk queue.",
                   s.queue_acknowledged)
    yield _counter("tagwriter_queue_recovered_values_total",
                   "Values found queued at start (a run that ended before writing them).", s.queue_recovered)
    yield _counter("tagwriter_queue_corrupt_values_total", "Values in queue records that failed their CRC.",
                   s.queue_corrupt)
    yield _counter("tagwriter_queue_torn_tails_total", "Torn WAL tails cut at start.", s.queue_torn_tails)
    yield _counter("tagwriter_queue_commits_total", "Group commits (one fsync each).", s.queue_commits)
    if s.queue_fsync_p99_s is not None:
        fsync = GaugeMetricFamily("tagwriter_queue_commit_seconds",
                                  "Group commit (write + fsync) time over the last 1,024 commits.", labels=["q"])
        fsync.add_metric(["0.5"], s.queue_fsync_p50_s or 0.0)
        fsync.add_metric(["0.99"], s.queue_fsync_p99_s)
        yield fsync


def snapshot_families(s: MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot's figures with conventional names, units and types."""
    yield _counter("tagwriter_values_submitted_total", "Values handed to the pipeline.", s.submitted)
    yield _counter("tagwriter_rows_written_total", "Rows committed to the database.", s.written)
    yield rows_landed(s)
    yield _counter("tagwriter_rows_duplicate_total",
                   "Rows the database already held (duplicate key), counted as written.", s.duplicates)
    yield _counter("tagwriter_rows_spooled_total", "Rows written to spool (backup) files.", s.spooled)
    yield _counter("tagwriter_rows_quarantined_total",
                   "Rows the database rejected, kept in quarantine files.", s.quarantined)
    dropped = CounterMetricFamily("tagwriter_values_dropped_total",
                                  "Values dropped, counted, by reason.", labels=["reason"])
    for reason, n in sorted({**dict.fromkeys(DROP_REASONS, 0), **s.dropped_by_reason}.items()):
        dropped.add_metric([reason], n)
    yield dropped
    yield _counter("tagwriter_bad_input_total", "Malformed input lines (kept in quarantine).", s.bad_input)
    batches = CounterMetricFamily("tagwriter_batches_total", "Batch write attempts by result.", labels=["result"])
    batches.add_metric(["ok"], s.batches_ok)
    batches.add_metric(["failed"], s.batches_failed)
    yield batches
    yield _counter("tagwriter_retries_total", "Failed batch writes that were retried.", s.retries)
    yield _counter("tagwriter_outages_total", "Times the writer entered outage mode.", s.outages)
    yield _counter("tagwriter_fatal_errors_total",
                   "Fatal database errors (configuration: table, login, privileges); a recovery keeps them.",
                   s.fatal_errors)

    yield _gauge("tagwriter_buffer_values", "Values held in the in-memory buffer.", s.buffer_size)
    yield _gauge("tagwriter_buffer_capacity_values", "Buffer capacity in values.", s.buffer_capacity)
    yield _gauge("tagwriter_buffer_utilization_ratio", "Buffer fill, 0 to 1.", s.buffer_utilization_pct / 100.0)
    yield _gauge("tagwriter_inflight_values", "Values in the batch being written now.", s.inflight)
    yield _gauge("tagwriter_waiting_values", "Values of submits blocked for room (block policy).", s.waiting)
    yield _gauge("tagwriter_pending_values", "Values buffered, in flight or waiting.", s.pending)
    yield _gauge("tagwriter_write_batch_size_values", "Average rows per batch over 5 minutes.", s.avg_batch_size_5m)
    yield _gauge("tagwriter_write_latency_seconds",
                 "Average seconds per batch write over 5 minutes.", s.avg_write_latency_5m_s)
    yield _gauge("tagwriter_write_latency_p99_seconds",
                 "99th percentile seconds per batch write over 5 minutes.", s.p99_write_latency_5m_s)
    # The panel's own percentiles. `q`, not `quantile`: that label belongs to summaries
    # (promtool rejects it on a gauge). No series while the window holds no value.
    e2e = GaugeMetricFamily("tagwriter_end_to_end_latency_5m_seconds",
                            "Submit-to-commit latency percentiles over 5 minutes (q=1: the max).", labels=["q"])
    if s.latency_samples_5m:
        for q, v in (("0.5", s.latency_p50_s), ("0.95", s.latency_p95_s),
                     ("0.99", s.latency_p99_s), ("1", s.latency_max_s)):
            e2e.add_metric([q], v)
    yield e2e
    yield _gauge("tagwriter_overflow_values_1h", "Values evicted by buffer overflow in the last hour.", s.overflow_1h)
    yield _gauge("tagwriter_overflow_ratio_1h",
                 "Overflow evictions per value submitted over the last hour, 0 to 1.", s.overflow_rate_1h_pct / 100.0)
    yield _gauge("tagwriter_backup_files", "Spool (backup) files, the open one included.", s.backup_files)
    yield _gauge("tagwriter_backup_bytes", "Size of the spool (backup) folder.", s.backup_bytes)
    yield _gauge("tagwriter_spool_full", "1 if the spool reached backup.max_bytes or its disk is full.",
                 1.0 if s.spool_full else 0.0)
    yield _gauge("tagwriter_held_spool_full", "Values held in memory because the spool is full.", s.held_spool_full)
    yield _gauge("tagwriter_backlog_rows", "Spooled rows waiting to be replayed.", s.backlog_rows)
    yield _gauge("tagwriter_backlog_files", "Spool files waiting to be replayed.", s.backlog_files)
    yield _gauge("tagwriter_drain_rate_values_per_second", "Spool replay rate.", s.drain_rate_per_s)
    drained = CounterMetricFamily("tagwriter_replayed_rows_total",
                                  "Spooled rows the automatic drain settled, by outcome.", labels=["outcome"])
    for outcome, key in (("inserted", "replayed"), ("duplicate", "replay_duplicates"),
                         ("quarantined", "replay_quarantined"), ("bad_line", "replay_bad_lines")):
        drained.add_metric([outcome], float(s.extra.get(key, 0)))
    yield drained
    yield _counter("tagwriter_replayed_files_total", "Spool files the automatic drain finished.",
                   float(s.extra.get("replayed_files", 0)))
    if s.drain_eta_s is not None and math.isfinite(s.drain_eta_s):
        yield _gauge("tagwriter_drain_eta_seconds", "Estimated seconds until the spool is drained.", s.drain_eta_s)
    yield from queue_families(s)
    yield from source_families(s)
    # A state set: one series per state, 1 for the current one (alert on state="outage").
    states = GaugeMetricFamily("tagwriter_writer_state", "The writer's state (1 = current).", labels=["state"])
    for st in WriterState:
        states.add_metric([st.value], 1.0 if st.value == s.state else 0.0)
    yield states
    yield _gauge("tagwriter_uptime_seconds", "Seconds since the pipeline was created.", s.uptime_s)
    info = GaugeMetricFamily("tagwriter_build_info", "tagwriter version (always 1).", labels=["version"])
    info.add_metric([__version__], 1.0)
    yield info


def rows_landed(s: MetricsSnapshot) -> CounterMetricFamily:
    """Rows this process inserted into the database, by path: no hole after an outage.

    `live` is tagwriter_rows_written_total; `replay` is what the automatic drain
    inserted from the spool (tagwriter_replayed_rows_total{outcome="inserted"}),
    so `sum(rate(...))` follows the database's intake through an outage and its recovery.
    """
    landed = CounterMetricFamily("tagwriter_rows_landed_total",
                                 "Rows inserted into the database by path: live writes, replay of the spool.",
                                 labels=["path"])
    landed.add_metric(["live"], s.written)
    landed.add_metric(["replay"], float(s.extra.get("replayed", 0)))
    return landed


def latency_histogram(hist: LatencyHistogram) -> HistogramMetricFamily:
    """The cumulative end-to-end latency histogram on PROMETHEUS_LATENCY_BOUNDS."""
    return HistogramMetricFamily(
        "tagwriter_end_to_end_latency_seconds", "Seconds from submit to commit per value, since start.",
        buckets=cumulative_buckets(hist, PROMETHEUS_LATENCY_BOUNDS), sum_value=hist.sum,
    )


def write_duration_histogram(hist: LatencyHistogram) -> HistogramMetricFamily:
    """Seconds per committed batch write (the database call and its commit) since start."""
    return HistogramMetricFamily(
        "tagwriter_batch_write_duration_seconds", "Seconds per committed batch write, commit included, since start.",
        buckets=cumulative_buckets(hist, PROMETHEUS_WRITE_BOUNDS), sum_value=hist.sum,
    )


def cumulative_buckets(hist: LatencyHistogram, bounds: list[float]) -> list[tuple[str, float]]:
    """Prometheus `le` buckets of `hist` at `bounds` (each one of LATENCY_BOUNDS: the counts are exact)."""
    buckets: list[tuple[str, float]] = []
    seen = 0
    i = 0
    for bound in bounds:
        # counts[k] holds values in (LATENCY_BOUNDS[k-1], LATENCY_BOUNDS[k]].
        while i < len(LATENCY_BOUNDS) and LATENCY_BOUNDS[i] <= bound:
            seen += hist.counts[i]
            i += 1
        buckets.append((repr(bound), seen))
    buckets.append(("+Inf", hist.total))
    return buckets


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # a client that connects and sends nothing cannot hold a thread forever
    protocol_version = "HTTP/1.0"
    server_version = f"tagwriter/{__version__}"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _method_not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", "text/plain; charset=utf-8",
                   send_body=True, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    # The monitoring page: one static file whose figures all come from JSON_PATH.
    PAGE_PATHS = ("/", "/index.html")
    # Its script and style are inline; it may read this server and load nothing from anywhere
    # else, so it works in a plant network with no internet and cannot be made to call out.
    PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    def _respond(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in self.PAGE_PATHS:
            self._send_page(send_body=send_body)
            return
        status, body, ctype = self.server.app.response(path)
        self._send(status, body, ctype, send_body=send_body)

    def _send_page(self, *, send_body: bool) -> None:
        """The page from the package data (tagwriter/web/index.html), read per request: it is small."""
        from importlib.resources import files  # only the page needs it

        try:
            page = (files("tagwriter") / "web" / "index.html").read_bytes()
        except OSError as exc:  # an install without the package data
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"the page is not installed: {exc}\n".encode(),
                       "text/plain; charset=utf-8", send_body=send_body)
            return
        self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", send_body=send_body,
                   extra={"Content-Security-Policy": self.PAGE_CSP})

    @staticmethod
    def render(app: MetricsServer, path: str) -> tuple[HTTPStatus, bytes, str]:
        """The response for `path`, computed now."""
        try:
            if path == JSON_PATH:
                status, body, ctype = HTTPStatus.OK, snapshot_json(app.source.snapshot()), "application/json"
            elif path == PROMETHEUS_PATH:
                status, body, ctype = HTTPStatus.OK, generate_latest(app.registry), CONTENT_TYPE_LATEST
            elif path == LIVE_PATH:
                status, body, ctype = _verdict(*app.liveness(), failed="not live")
            elif path == READY_PATH:
                status, body, ctype = _verdict(*app.readiness(), failed="not ready")
            elif path == HEALTH_PATH:
                ok, reason = app.liveness()  # a dead thread first: the state may not show it
                if ok:
                    ok, reason = health(app.source.snapshot(), app.health_max_buffer_pct)
                status, body, ctype = _verdict(ok, reason, failed="unhealthy")
            else:
                status, ctype = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8"
                body = f"not found; paths: {' '.join(PATHS)}\n".encode()
        except Exception as exc:  # a bug in reading metrics must not kill the server
            log.exception("metrics endpoint: %s failed", path)
            status, body, ctype = HTTPStatus.INTERNAL_SERVER_ERROR, f"error: {exc}\n".encode(), "text/plain"
        return status, body, ctype

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, *, send_body: bool,
              extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except OSError:  # the client went away; nothing to tell it
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _verdict(ok: bool, reason: str, *, failed: str) -> tuple[HTTPStatus, bytes, str]:
    """200 `ok: <reason>`, or 503 `<failed>: <reason>`, as plain text."""
    status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
    return status, f"{'ok' if ok else failed}: {reason}\n".encode(), "text/plain; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an in-flight request never holds up the exit
    block_on_close = False  # server_close() must not wait for in-flight requests
    allow_reuse_address = True
    request_queue_size = 64  # clients wait in the kernel's backlog while accepts are paced
    app: MetricsServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics endpoint: error serving %s", client_address, exc_info=True)


class MetricsServer:
    """Serves `source` over HTTP from a daemon thread. `start()` binds; `stop(timeout)` is bounded.

    `liveness` and `readiness` answer `/livez` and `/readyz` (default: the
    source's own); the service passes checks that cover its source thread too.
    """

    def __init__(
        self, source: MetricsSource, host: str = "127.0.0.1", port: int = 0, *,
        health_max_buffer_pct: float = 80.0, min_interval: float = MIN_INTERVAL, render_ttl: float = RENDER_TTL,
        liveness: Check | None = None, readiness: Check | None = None,
    ) -> None:
        self.source = source
        self.liveness: Check = liveness or source.liveness
        self.readiness: Check = readiness or source.readiness
        self.min_interval = min_interval
        self.render_ttl = render_ttl
        self.renders = 0  # responses rendered (not served from the cache)
        self.host = host
        self.health_max_buffer_pct = health_max_buffer_pct
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(source))
        # Memory, CPU, file descriptors, process_start_time_seconds; the interpreter; its GC.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._requested_port = port
        self._bound_port = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cache: dict[str, tuple[float, tuple[HTTPStatus, bytes, str]]] = {}
        self._cache_lock = threading.Lock()

    def response(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        """The response for `path`, rendered at most once per RENDER_TTL (requests at the same time share it)."""
        with self._cache_lock:
            now = time.monotonic()
            hit = self._cache.get(path)
            if hit is not None and now - hit[0] < self.render_ttl:
                return hit[1]
            rendered = _Handler.render(self, path)
            self.renders += 1
            if path in PATHS:
                self._cache[path] = (now, rendered)
            return rendered

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when created with port 0); 0 before `start()`."""
        return self._bound_port

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) while serving."""
        if self._httpd is None:
            return self.host, self._bound_port
        return str(self._httpd.server_address[0]), int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        """Bind and serve; raises ConfigError naming metrics.port if the address is taken."""
        if self._httpd is not None:
            return self
        server_class: type[_Server] = _Server
        if ":" in self.host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            httpd = server_class((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port = {self._requested_port}: cannot listen on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}",
                hint="pick a free metrics.port (or --metrics-port), or 0 to turn the endpoint off",
            ) from None
        httpd.app = self
        self._bound_port = int(httpd.server_address[1])
        httpd.timeout = 0.2  # how often the serve loop looks at the stop flag
        self._httpd = httpd
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="tagwriter-metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics endpoint on %s (%s)", self.url, ", ".join(PATHS))
        return self

    def _serve(self) -> None:
        httpd = self._httpd
        assert httpd is not None
        # Pace accepts with a token bucket: a burst of up to ACCEPT_BURST requests (many
        # scrapers at once) is taken at once, a client asking back to back gets one per
        # min_interval and cannot take the writer's CPU (tests/benchmarks/bench_endpoint.py);
        # callers wait in the listen backlog.
        tokens, last = float(ACCEPT_BURST), time.monotonic()
        while not self._stop.is_set():
            httpd.handle_request()  # waits at most httpd.timeout; each request gets its own thread
            now = time.monotonic()
            tokens = min(float(ACCEPT_BURST), tokens + (now - last) / self.min_interval) - 1.0
            last = now
            if tokens < 0:
                self._stop.wait(-tokens * self.min_interval)

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop serving and close the socket; True if the server thread ended within `timeout`."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return True
        self._stop.set()
        ended = True
        if thread is not None:
            thread.join(timeout)
            ended = not thread.is_alive()
        httpd.server_close()
        self._httpd = None
        self._thread = None
        if not ended:
            log.warning("metrics endpoint thread did not end within %gs (a daemon: it will not block the exit)",
                        timeout)
        return ended

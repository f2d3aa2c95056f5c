"""`tagwriter status` against a live endpoint of a pipeline writing to a real SQLite file."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_endpoint import make_config, polls
from typer.testing import CliRunner, Result
from waits import wait_until

from tagwriter.cli import status as status_mod
from tagwriter.cli.app import app
from tagwriter.config import BufferConfig, MetricsConfig, WriterConfig
from tagwriter.endpoint import MetricsServer
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sinks.sqlite import SqliteSink


def invoke(args: list[str], tmp_path: Path, config_text: str = "") -> Result:
    config = tmp_path / "tagwriter.toml"
    config.write_text(config_text, encoding="utf-8")
    return CliRunner().invoke(app, ["--config", str(config), *args], env={"COLUMNS": "120"})


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Pipeline, MetricsServer, MemorySink]]:
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    pipeline = Pipeline(make_config(tmp_path), sink=sink).start()
    server = MetricsServer(pipeline, port=0, render_ttl=0).start()
    try:
        for data in polls(12):
            pipeline.submit(data)
        assert pipeline.flush(5.0)
        wait_until(lambda: pipeline.snapshot().state == "writing", "the writer to open the sink", 5)
        yield pipeline, server, sink
    finally:
        server.stop(1.0)
        pipeline.stop(5.0)


def test_status_prints_the_panel_of_a_healthy_instance(
    live: tuple[Pipeline, MetricsServer, MemorySink], tmp_path: Path
) -> None:
    _, server, _ = live
    result = invoke(["status", "--url", server.url], tmp_path)
    assert result.exit_code == 0, result.output
    assert "120" in result.stdout  # 12 polls x 10 tags written
    assert "writing" in result.stdout
    assert result.stderr == ""


def test_status_reads_the_url_from_the_config(
    live: tuple[Pipeline, MetricsServer, MemorySink], tmp_path: Path
) -> None:
    _, server, _ = live
    result = invoke(["status"], tmp_path, f"[metrics]\nport = {server.port}\n")
    assert result.exit_code == 0, result.output
    assert "writing" in result.stdout


def test_status_exits_1_when_unhealthy(live: tuple[Pipeline, MetricsServer, MemorySink], tmp_path: Path) -> None:
    pipeline, server, sink = live
    sink.go_down()
    pipeline.submit(next(polls(1, start=100)))
    wait_until(lambda: pipeline.snapshot().state == "outage", "outage mode", 5)
    result = invoke(["status", "--url", server.url], tmp_path)
    assert result.exit_code == 1
    assert "outage" in result.stdout  # the panel is still shown
    assert f"error: {server.url}: unhealthy: outage: the database is unreachable" in result.stderr


def test_status_exits_1_with_a_clear_line_when_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    result = invoke(["status", "--url", f"http://127.0.0.1:{port}"], tmp_path)
    assert result.exit_code == 1
    assert result.stdout == ""
    first, hint = result.stderr.splitlines()
    assert first == f"error: cannot reach http://127.0.0.1:{port}: Connection refused"
    assert hint.startswith("hint: is `tagwriter run` running with metrics.port set")
    assert "Traceback" not in result.output


def test_status_is_bounded_when_the_endpoint_never_answers(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the connect; nobody ever reads or answers
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        result = invoke(["status", "--url", f"127.0.0.1:{port}", "--timeout", "0.3"], tmp_path)
        elapsed = time.monotonic() - t0
    assert result.exit_code == 1
    assert f"error: cannot reach http://127.0.0.1:{port}: no answer within 0.3s" in result.stderr
    assert elapsed < 3.0


def test_status_rejects_an_endpoint_that_is_not_tagwriter(tmp_path: Path) -> None:
    handler = http.server.SimpleHTTPRequestHandler
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        result = invoke(["status", "--url", url], tmp_path)
    finally:
        other.shutdown()
        other.server_close()
    assert result.exit_code == 1
    assert f"error: {url}/api/buffer/metrics answered HTTP 404: not a tagwriter metrics endpoint" in result.stderr


def test_status_without_a_url_or_port_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke(["status"], tmp_path)
    assert result.exit_code == 2
    assert "error: no metrics endpoint configured (metrics.port = 0)" in result.stderr


def test_watch_refreshes_until_ctrl_c(
    live: tuple[Pipeline, MetricsServer, MemorySink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, server, _ = live
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # Stands in for the operator: more values arrive between refreshes, then Ctrl-C.
        sleeps.append(seconds)
        if len(sleeps) == 1:
            for data in polls(3, start=200):
                pipeline.submit(data)
            assert pipeline.flush(5.0)
            return
        raise KeyboardInterrupt

    monkeypatch.setattr(status_mod.time, "sleep", sleep)
    result = invoke(["status", "--url", server.url, "--watch", "--interval", "0.5"], tmp_path)
    assert result.exit_code == 0, result.output
    assert sleeps == [0.5, 0.5]
    assert "150" in result.stdout  # the refreshed view: 120 + 30 written


def test_status_exits_1_when_the_buffer_is_above_the_threshold(tmp_path: Path) -> None:
    health_pct = 10.0
    sink = MemorySink(inner=SqliteSink(tmp_path / "tags.db"))
    cfg = make_config(tmp_path, buffer=BufferConfig(capacity=100), writer=WriterConfig(batch_size=10),
                      metrics=MetricsConfig(health_max_buffer_pct=health_pct))
    with Pipeline(cfg, sink=sink) as pipeline:
        server = MetricsServer(pipeline, port=0, health_max_buffer_pct=health_pct, render_ttl=0).start()
        try:
            sink.block()
            pipeline.submit(next(polls(1, tags=10)))
            assert sink.blocked.wait(5.0)
            pipeline.submit(next(polls(1, tags=30, start=1)))
            result = invoke(["status", "--url", server.url], tmp_path)
        finally:
            sink.release()
            server.stop(1.0)
    assert result.exit_code == 1
    assert "unhealthy: writing: buffer 30.0% full" in result.stderr


"""The real python-oracledb driver against real loopback sockets (no Oracle server can run here).

Three listeners on 127.0.0.1 ephemeral ports: a closed port, one that accepts
and closes at once, one that accepts and never answers. For each: the error
class and `full_code`, the operator hint, that the writer spools everything
(the counter identity holds), and that open / write / probe / close / stop /
test-connection / init-db return within their bounds (asserted generously:
bound + 3 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from waits import wait_until

from tagwriter.cli.app import app
from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig
from tagwriter.errors import SinkError, TransientError
from tagwriter.models import PollingData, TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.oracle import OracleSink

PASSWORD = "tiger-secret-pw"
CONNECT = 0.5  # connect_timeout and pool_wait_timeout of the sinks under test
SLACK = 3.0


class Listener:
    """A loopback TCP port that refuses (closed), accepts and closes (closer), or accepts and stays silent."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.accepted: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        if mode == "closed":
            self._sock.close()
            return
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            if self.mode == "closer":
                conn.close()
            else:
                self.accepted.append(conn)

    def close(self) -> None:
        """Stop listening and close every accepted connection (the peer sees EOF)."""
        if self.mode == "closed":
            return
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()
        for conn in self.accepted:
            with_suppressed(lambda c=conn: c.shutdown(socket.SHUT_RDWR))
            conn.close()


def with_suppressed(fn: Callable[[], object]) -> None:
    with contextlib.suppress(OSError):
        fn()


@pytest.fixture(params=["closed", "closer", "silent"])
def listener(request: pytest.FixtureRequest) -> Iterator[Listener]:
    lst = Listener(request.param)
    yield lst
    lst.close()


def db_config(port: int) -> DatabaseConfig:
    return DatabaseConfig(url=f"oracle://scott@127.0.0.1:{port}/orclpdb", password=PASSWORD,
                          connect_timeout=CONNECT, pool_wait_timeout=CONNECT, call_timeout=1.0)


EXPECTED = {  # mode -> (full_code of open/write/probe, hint fragment)
    "closed": ("DPY-6005", "no listener at 127.0.0.1:{port}: check host, port, firewall"),
    "closer": ("DPY-6005", "accepted the connection and closed it"),
    "silent": ("DPY-4005", "a listener that accepts but never answers"),
}


def timed(fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_each_operation_is_classified_and_bounded(listener: Listener) -> None:
    sink = OracleSink.from_config(db_config(listener.port))
    code, hint = EXPECTED[listener.mode]
    hint = hint.format(port=listener.port)
    bound = CONNECT + CONNECT + SLACK
    for name, op in [("open", sink.open), ("write", lambda: sink.write_batch([TagValue("t", 1, 1.0)])),
                     ("probe", sink.probe), ("again", sink.probe)]:
        error, took = timed(op)
        assert isinstance(error, TransientError), (name, error)
        assert error.code == code, (name, str(error))
        assert hint in error.hint, (name, error.hint)
        assert PASSWORD not in str(error)
        assert took < bound, (name, took)
    error, took = timed(sink.close)
    assert error is None and took < 2.0 + SLACK


def test_reach_and_login(listener: Listener) -> None:
    sink = OracleSink.from_config(db_config(listener.port))
    error, _ = timed(sink.reach)
    if listener.mode == "closed":
        assert isinstance(error, TransientError) and error.code == "ECONNREFUSED"
        assert f"no listener at 127.0.0.1:{listener.port}" in error.hint
    else:
        assert error is None
        assert sink.reach() == f"127.0.0.1:{listener.port} (tcp)"
    error, took = timed(sink.login)
    assert isinstance(error, TransientError)
    assert error.code == {"closed": "DPY-6005", "closer": "DPY-6005", "silent": "TIMEOUT"}[listener.mode]
    assert took < CONNECT + SLACK
    sink.close()


def test_pipeline_spools_everything_and_stops_in_time(
    listener: Listener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tagwriter")
    config = Config().replace(
        database=db_config(listener.port),
        writer=WriterConfig(batch_size=50, flush_interval=0.01, retry_delays=[0.01, 0.01],
                            probe_interval=0.05, probe_max_interval=0.2, shutdown_timeout=2.0),
        backup=BackupConfig(directory=str(tmp_path / "backup"),
                            quarantine_directory=str(tmp_path / "backup" / "quarantine")),
    )
    pipeline = Pipeline(config).start()
    for i in range(5):
        pipeline.submit(PollingData("g", 1_700_000_000 + i, {f"tag{j}": float(j) for j in range(20)}))
    deadline = time.monotonic() + CONNECT * 4 + SLACK
    while pipeline.snapshot().spooled < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    assert pipeline.stop(2.0)
    assert time.monotonic() - started < 2.0 + SLACK
    snap = pipeline.snapshot()
    assert snap.submitted == 100 and snap.spooled == 100 and snap.written == 0
    assert snap.submitted == snap.accounted
    assert EXPECTED[listener.mode][0] in snap.last_error
    assert PASSWORD not in caplog.text


def test_a_silent_listener_does_not_wedge_the_pool() -> None:
    """When the silent peer finally closes, parked connects end and the next call sees the new truth."""
    lst = Listener("silent")
    sink = OracleSink.from_config(db_config(lst.port))
    error, _ = timed(sink.probe)
    assert isinstance(error, SinkError) and error.code == "DPY-4005"
    lst.close()
    pool = sink._get_pool()
    wait_until(lambda: pool.pending == 0, "the parked connects to end", 5.0)
    error, took = timed(sink.probe)
    assert isinstance(error, TransientError) and error.code == "DPY-6005", error
    assert "no listener" in error.hint and took < CONNECT + SLACK
    sink.close()


def test_a_silent_listener_parks_at_most_pool_max_workers_which_end_with_the_peer() -> None:
    """Each connect runs on the sink's one worker thread; a connect the silent peer never answers is
    abandoned within connect_timeout and the worker replaced, at most pool_max are parked, and they
    end when the peer closes. The writes meanwhile fail within their bounds."""
    lst = Listener("silent")
    sink = OracleSink.from_config(dataclasses.replace(db_config(lst.port), pool_max=2))
    worker = sink._worker
    before = set(threading.enumerate())
    try:
        for i in range(4):
            error, took = timed(lambda: sink.write_batch([TagValue("t", 1, 1.0)]))
            assert isinstance(error, TransientError) and error.code == "DPY-4005", (i, error)
            assert took < CONNECT + CONNECT + SLACK, (i, took)
        # writes 1 and 2 each parked a connect on a worker; 3 and 4 met the pool_max cap and connected nowhere
        assert (worker.started, worker.replaced, worker.spares) == (2, 2, 0)
        assert "not answered" in str(error)
        parked = [t for t in threading.enumerate() if t not in before and t.name == "tagwriter-oracle-worker"]
        assert len(parked) == 2
    finally:
        lst.close()
    wait_until(lambda: not any(t.is_alive() for t in parked), "the parked workers to end with the peer", 10.0)
    error, took = timed(lambda: sink.write_batch([TagValue("t", 1, 1.0)]))
    assert isinstance(error, TransientError) and error.code == "DPY-6005", error
    assert took < CONNECT + SLACK
    assert (worker.started, worker.replaced) == (3, 2)  # a fresh worker, kept: the refusal came in time
    sink.close()


def run_cli(args: list[str], port: int, tmp_path: Path) -> tuple[int, str, float]:
    env = {"TAGWRITER_DATABASE__URL": f"oracle://scott@127.0.0.1:{port}/orclpdb",
           "TAGWRITER_DATABASE_PASSWORD": PASSWORD, "TAGWRITER_CONFIG": str(tmp_path / "none.toml"),
           "COLUMNS": "160"}
    (tmp_path / "none.toml").write_text("")
    started = time.monotonic()
    result = CliRunner().invoke(app, args, env=env)
    return result.exit_code, result.output, time.monotonic() - started


def test_test_connection_cli_is_bounded_and_hints_right(listener: Listener, tmp_path: Path) -> None:
    code, out, took = run_cli(["test-connection", "--timeout", "2"], listener.port, tmp_path)
    assert code == 1
    assert took < 2.0 + SLACK
    assert PASSWORD not in out
    if listener.mode == "closed":
        assert "ECONNREFUSED" in out and f"no listener at 127.0.0.1:{listener.port}" in out
    elif listener.mode == "closer":
        assert "DPY-6005" in out and "accepted the connection and closed it" in out
    else:
        assert "host reachable?" in out and "a listener that accepts but never answers" in out
    assert "skipped" in out or "–" in out


def test_init_db_cli_is_bounded(tmp_path: Path) -> None:
    lst = Listener("silent")
    try:
        code, out, took = run_cli(["init-db", "--timeout", "1"], lst.port, tmp_path)
    finally:
        lst.close()
    assert code == 1 and took < 1.0 + SLACK
    assert "host reachable?" in out


# -- process exit ---------------------------------------------------------------------

CHILD_SINK = """
import sys
from tagwriter.config import DatabaseConfig
from tagwriter.sinks.oracle import OracleSink
from tagwriter.models import TagValue
sink = OracleSink.from_config(DatabaseConfig(url="oracle://scott@127.0.0.1:{port}/svc", password="x",
                              connect_timeout=0.3, pool_wait_timeout=0.3))
try:
    sink.write_batch([TagValue("t", 1, 1.0)])
except Exception as exc:
    print("failed", exc.code, flush=True)
sink.close()
"""

CHILD_DRIVER_POOL = """
import oracledb
pool = oracledb.create_pool(user="scott", password="x", dsn="127.0.0.1:{port}/svc", min=1, max=2,
                            getmode=oracledb.POOL_GETMODE_TIMEDWAIT, wait_timeout=300, tcp_connect_timeout=1)
try:
    pool.acquire()
except oracledb.Error as exc:
    print("failed", exc.args[0].full_code, flush=True)
"""


def run_child(code: str, port: int, wait: float) -> tuple[str, bool]:
    """Run `code` in a fresh interpreter; (stdout, exited within `wait` s after printing)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code.format(port=port))],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        try:
            proc.wait(wait)
            return line, True
        except subprocess.TimeoutExpired:
            return line, False
    finally:
        proc.kill()
        proc.wait(5)


def test_the_sink_lets_the_process_exit_after_a_silent_listener() -> None:
    lst = Listener("silent")
    try:
        line, exited = run_child(CHILD_SINK, lst.port, 5.0)
    finally:
        lst.close()
    assert line.split() == ["failed", "DPY-4005"]
    assert exited


def test_why_not_oracledb_create_pool_the_driver_pool_blocks_exit() -> None:
    """Documents the trap that made us write ConnectionPool (python-oracledb 26.1).

    After `create_pool` met a listener that never answers, acquire times out
    (DPY-4005) but the pool's non-daemon background thread never ends, so the
    interpreter cannot exit. If this starts failing, a newer driver fixed it
    and `oracledb.create_pool` could back the sink again.
    """
    lst = Listener("silent")
    try:
        line, exited = run_child(CHILD_DRIVER_POOL, lst.port, 3.0)
    finally:
        lst.close()
    assert line.split() == ["failed", "DPY-4005"]
    assert not exited

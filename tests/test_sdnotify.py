"""systemd notifications: a real AF_UNIX datagram socket stands in for systemd's; `tagwriter run` talks to it.

Also the example unit: Type=notify with a watchdog and reload, and its hardening
(rated by `systemd-analyze security` where it is installed).
"""

from __future__ import annotations

import configparser
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import run_env, start_run
from waits import wait_until

from tagwriter.config import BackupConfig, Config, DatabaseConfig, WriterConfig
from tagwriter.sdnotify import Notifier
from tagwriter.service import Service
from tagwriter.sinks.memory import MemorySink
from tagwriter.sources.simulate import SimulatedSource, Simulator

UNIT = Path(__file__).resolve().parents[1] / "examples" / "tagwriter.service"
#: A small simulation: 2 groups x 10 tags every 0.1 s.
SMALL = {"TAGWRITER_SOURCE__GROUPS": "2", "TAGWRITER_SOURCE__TAGS_PER_GROUP": "10",
         "TAGWRITER_SOURCE__INTERVAL": "0.1", "TAGWRITER_WRITER__FLUSH_INTERVAL": "0.1"}
_names = itertools.count()


class NotifySocket:
    """systemd's side of the protocol: a bound datagram socket; every message received, parsed, in order."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET gives it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.received: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.received.append(fields)

    def states(self) -> list[str]:
        """The state messages in order: READY, WATCHDOG, RELOADING, STOPPING (STATUS-only ones as STATUS)."""
        states = ("READY", "WATCHDOG", "RELOADING", "STOPPING")
        return [next((k for k in states if k in m), "STATUS") for m in list(self.received)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(params=["abstract", "path"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    """Both kinds of address systemd uses: '@name' (abstract namespace) and a file path."""
    if request.param == "abstract":
        address = f"@tagwriter-test-{os.getpid()}-{next(_names)}"
    else:
        address = str(tmp_path / "notify")
    receiver = NotifySocket(address)
    yield receiver
    receiver.close()


def test_run_notifies_ready_watchdog_reload_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    started_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    env = run_env(**SMALL, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="400000")  # a ping every 0.2 s
    proc = start_run(tmp_path, "--no-panel", env=env)
    try:
        wait_until(lambda: notify_socket.states()[:1] == ["READY"], "READY=1 first", 30)
        wait_until(lambda: notify_socket.states().count("WATCHDOG") >= 3, "watchdog pings", 10)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "READY" in notify_socket.states()[1:], "READY=1 after the reload", 10)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    keys = [k for k in notify_socket.states() if k != "WATCHDOG"]
    assert keys == ["READY", "RELOADING", "READY", "STOPPING"], notify_socket.received
    ready, reloading, _, stopping = (m for m in notify_socket.received if "WATCHDOG" not in m)
    assert ready["STATUS"] == "running"
    assert started_us <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert stopping["STATUS"] == "stopping: SIGTERM received"
    assert "SIGHUP received: reloading the config" in err
    # Pings come every half of WATCHDOG_USEC (0.2 s) while it runs; none before READY.
    pings = notify_socket.states().count("WATCHDOG")
    assert notify_socket.states().index("WATCHDOG") > 0 and pings >= 3


def test_watchdog_pings_stop_while_the_writer_loop_is_stuck(tmp_path: Path) -> None:
    """A writer blocked inside the database call: liveness fails, the pings stop, STATUS says why."""
    receiver = NotifySocket(f"@tagwriter-test-{os.getpid()}-{next(_names)}")
    sink = MemorySink()
    config = Config(writer=WriterConfig(batch_size=10, flush_interval=0.02),
                    database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'tags.db'}"),
                    backup=BackupConfig(directory=str(tmp_path / "backup"), auto_replay=False))
    service = Service(config, SimulatedSource(Simulator(1, 10, 0.05)), sink=sink,
                      notifier=Notifier(receiver.address, watchdog_usec=100_000))  # a ping due every 0.05 s
    service.pipeline.writer_stall_limit = 0.5
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_until(lambda: receiver.states().count("WATCHDOG") >= 2, "watchdog pings while live", 10)
        sink.block()
        wait_until(sink.blocked.is_set, "the writer to hang in write_batch", 10)
        status = wait_until(lambda: [m["STATUS"] for m in receiver.received if "READY" not in m and "STATUS" in m],
                            "a STATUS saying the service is not live", 10)
        assert status[0].startswith("not live: the writer loop has not ticked for"), status
        withheld_at = len(receiver.received)
        wait_until(lambda: len(receiver.received) >= withheld_at + 3, "more watchdog periods", 10)
        assert "WATCHDOG" not in receiver.states()[withheld_at:]  # not one ping while stuck
        sink.release()
        wait_until(lambda: "WATCHDOG" in receiver.states()[withheld_at:], "pings again once the loop ticks", 10)
    finally:
        sink.release()
        stop.set()
        runner.join(30)
        receiver.close()
    assert receiver.states()[-1] == "STOPPING"


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready() is False and not notifier.watchdog_due()


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(env).watchdog_interval is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environment(env).watchdog_interval == 0.5  # half of WATCHDOG_USEC


def test_a_socket_nobody_listens_on_warns_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(f"@tagwriter-test-nobody-{os.getpid()}", watchdog_usec=1000)
    assert notifier.ready() is False and notifier.watchdog(True) is False and notifier.stopping() is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


def test_status_is_one_line_and_redacted(tmp_path: Path) -> None:
    receiver = NotifySocket(str(tmp_path / "notify"))
    try:
        Notifier(receiver.address).status("down:\npostgresql://app:s3cret-pw@db/plant")
        wait_until(lambda: receiver.received, "the STATUS message", 5)
    finally:
        receiver.close()
    assert receiver.received == [{"STATUS": "down: postgresql://app:***@db/plant"}]


# -- the example unit --------------------------------------------------------------------


def unit_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit["Service"]


def test_the_example_unit_is_type_notify_with_watchdog_and_reload() -> None:
    service = unit_service()
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert float(service["WatchdogSec"]) > 0 and service["WatchdogSignal"] == "SIGTERM"  # a graceful stop
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # Hardened, and still writing its working folder (database, spool, queue) and logs.
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectKernelLogs": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}.items():
        assert service[key] == value, key
    assert service["WorkingDirectory"] in service["ReadWritePaths"].split()
    assert "ProcSubset" not in service  # the process metrics read /proc/stat


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_rates_the_example_unit_ok() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tagwriter\.service: (\d+\.\d) (\w+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", m.group(0)  # was 8.5 EXPOSED before hardening

"""The OPC UA source against a real asyncua server that each test starts on a free loopback port.

The server (`OpcServer`) runs on its own thread and loop with a user manager
and a small plant: Objects/Plant/Line1/{Temp, Pressure, Running, Count, Name,
Motor/Speed} and Objects/Plant/Line2/Temp. Tests write deterministic
sequences of values with their own source timestamps and compare the SQLite
table with exactly what was written; a restart stops the server and starts a
new one on the same port with the same nodes (holding the values the old one
ended with, as a PLC-backed server would).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from procs import free_port
from waits import wait_until

from tagwriter import redact
from tagwriter.clock import SystemClock
from tagwriter.config import load
from tagwriter.errors import ConfigError
from tagwriter.models import GOOD_QUALITY, format_ts, to_epoch_us
from tagwriter.pipeline import Pipeline
from tagwriter.sinks import create_sink
from tagwriter.sinks.memory import MemorySink
from tagwriter.sources.opcua import (
    BAD_QUALITY,
    UNCERTAIN_QUALITY,
    OpcUaConfig,
    OpcUaSource,
    Point,
    check_config,
    number_of,
    overflowed,
    pick_ts,
    quality_of,
    row_of,
)

ua = pytest.importorskip("asyncua").ua

USER, PASSWORD = "plant", "opc-pass-7f3a"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LINE1 = "Plant.Line1"
# name (string node id "Line<n>.<name>" in namespace 2) -> (variant type, initial value)
VARIABLES: dict[str, tuple[Any, Any]] = {
    "Line1.Temp": (ua.VariantType.Double, 20.0),
    "Line1.Pressure": (ua.VariantType.Double, 1.0),
    "Line1.Running": (ua.VariantType.Boolean, False),
    "Line1.Count": (ua.VariantType.Int32, 0),
    "Line1.Name": (ua.VariantType.String, "line one"),
    "Line1.Motor.Speed": (ua.VariantType.Double, 0.0),
    "Line2.Temp": (ua.VariantType.Double, 30.0),
}
NUMERIC_LINE1 = ["Line1.Temp", "Line1.Pressure", "Line1.Running", "Line1.Count", "Line1.Motor.Speed"]


def node(name: str) -> str:
    return f"ns=2;s={name}"


# -- the test server ----------------------------------------------------------------


class OpcServer:
    """An asyncua server on its own thread and event loop; `write` and `stop` may be called from the test.

    `initial` maps variable names to (value, source timestamp) to start with (default: VARIABLES at T0).
    `last` holds what each variable holds now, to start a successor with.
    """

    def __init__(self, port: int, *, initial: dict[str, tuple[Any, datetime]] | None = None,
                 certs: dict[str, Path] | None = None, policies: list[Any] | None = None) -> None:
        self.port = port
        self.url = f"opc.tcp://127.0.0.1:{port}/tagwriter-test"
        self.last = dict(initial or {name: (v, T0) for name, (_, v) in VARIABLES.items()})
        self.certs = certs
        self.policies = policies or [ua.SecurityPolicyType.NoSecurity]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="opc-test-server", daemon=True)
        self.nodes: dict[str, Any] = {}

    def start(self) -> OpcServer:
        self.thread.start()
        self._call(self._start(), 30)
        return self

    def write(self, name: str, value: Any, ts: datetime, status: int = 0) -> None:
        self._call(self._write(name, value, ts, status), 10)

    def reset(self) -> None:
        for name, (_, value) in VARIABLES.items():
            self.write(name, value, T0)

    def publishing(self) -> list[bool]:
        """Whether each subscription on the server publishes (asyncua's server internals: test-only)."""
        subs = self.server.iserver.subscription_service.subscriptions.values()
        return [bool(sub._publishing_enabled) for sub in subs]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self.server.stop(), 10)
        with contextlib.suppress(Exception):
            self._call(self._cancel_the_rest(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    async def _start(self) -> None:
        from asyncua import Server
        from asyncua.crypto.permission_rules import User, UserRole
        from asyncua.server.user_managers import UserManager

        class Users(UserManager):
            def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                         certificate: Any = None) -> User | None:
                return User(role=UserRole.User) if (username, password) == (USER, PASSWORD) else None

        server = Server(user_manager=Users())
        await server.init()
        server.disable_clock()  # its 1 s clock task would hold up every stop by a second
        server.set_endpoint(self.url)
        server.set_security_policy(self.policies)
        server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.certs:
            await server.set_application_uri("urn:tagwriter:test-server")  # before the endpoints are made
            await server.load_certificate(str(self.certs["server_cert"]))
            await server.load_private_key(str(self.certs["server_key"]))
        idx = await server.register_namespace("urn:tagwriter:test")
        plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", idx), f"{idx}:Plant")
        parents = {"Line1": await plant.add_object(ua.NodeId("Line1", idx), f"{idx}:Line1"),
                   "Line2": await plant.add_object(ua.NodeId("Line2", idx), f"{idx}:Line2")}
        parents["Line1.Motor"] = await parents["Line1"].add_object(ua.NodeId("Line1.Motor", idx), f"{idx}:Motor")
        for name, (vtype, _) in VARIABLES.items():
            parent, _, short = name.rpartition(".")
            value, ts = self.last[name]
            var = await parents[parent].add_variable(ua.NodeId(name, idx), f"{idx}:{short}", ua.Variant(value, vtype))
            await var.write_value(ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=ts))
            self.nodes[name] = var
        await self.nodes["Line1.Temp"].add_property(ua.NodeId("Line1.Temp.Unit", idx), f"{idx}:Unit", "degC")
        await server.start()
        self.server = server

    @staticmethod
    async def _cancel_the_rest() -> None:
        """Cancel the tasks a stopped asyncua server leaves (closing the loop on them would complain)."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2) if tasks else None

    async def _write(self, name: str, value: Any, ts: datetime, status: int) -> None:
        vtype = VARIABLES[name][0]
        await self.nodes[name].write_value(
            ua.DataValue(ua.Variant(value, vtype), ua.StatusCode(status), SourceTimestamp=ts))
        self.last[name] = (value, ts)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[OpcServer]:
    s = OpcServer(free_port()).start()  # starting one takes seconds (asyncua builds its address space)
    yield s
    s.stop()


@pytest.fixture
def server(shared_server: OpcServer) -> OpcServer:
    """The module's server with every variable back at its initial value (at T0), as a fresh one would be."""
    shared_server.reset()
    return shared_server


# -- tagwriter around the source --------------------------------------------------------


def make_pipeline(tmp_path: Path, *, sink: Any = None, **overrides: Any) -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "writer.flush_interval": 0.05,
        **overrides,
    })
    return Pipeline(config, sink=sink).start()


def settings(url: str, **kw: Any) -> OpcUaConfig:
    """Fast settings for tests: 50 ms publishing, deep server queues, quick health checks and retries."""
    base: dict[str, Any] = {
        "url": url, "browse_paths": ["Objects/Plant/Line1"], "username": USER, "password": PASSWORD,
        "publishing_interval": 0.05, "queue_size": 1000, "health_interval": 0.2, "timeout": 1.0,
        "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5,
    }
    return OpcUaConfig(**{**base, **kw})


class Run:
    """The source running on its own thread (as the service runs it) against `pipeline`."""

    def __init__(self, source: OpcUaSource, pipeline: Pipeline) -> None:
        self.source = source
        self.pipeline = pipeline
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=source.run, args=(pipeline, self.stop_event), daemon=True)
        self.thread.start()

    def stop(self) -> float:
        """Stop the source; the seconds it took to return."""
        t0 = time.monotonic()
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the source did not stop"
        return time.monotonic() - t0

    def connected(self, timeout: float = 20) -> None:
        wait_until(lambda: self.source.status().connected, "the source connected", timeout)

    def values(self, n: int, timeout: float = 20) -> None:
        wait_until(lambda: self.source.status().values >= n, f"{n} values submitted", timeout)


@contextlib.contextmanager
def running(source: OpcUaSource, pipeline: Pipeline) -> Iterator[Run]:
    run = Run(source, pipeline)
    try:
        yield run
    finally:
        run.stop()
        pipeline.stop(10)


def table(tmp_path: Path) -> list[tuple[str, str, float | None, int]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as db:
        return sorted(db.execute("SELECT tag_name, ts, value, quality FROM tag_values").fetchall())


def row(tag: str, ts: datetime, value: float | None, quality: int = GOOD_QUALITY) -> tuple[str, str, float | None, int]:
    return (tag, format_ts(to_epoch_us(ts)), value, quality)


def initial_rows(names: list[str], prefix: str = "Plant.") -> set[tuple[str, str, float | None, int]]:
    return {row(prefix + n, T0, float(VARIABLES[n][1])) for n in names}


def quarantined(tmp_path: Path) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted((tmp_path / "backup" / "quarantine").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            out.extend(csv.DictReader(f))
    return out


def write_sequence(server: OpcServer, start: int, stop: int) -> set[tuple[str, str, float | None, int]]:
    """Values `start`..`stop - 1` of a fixed sequence on four Line1 nodes; the rows they must become."""
    rows = set()
    for i in range(start, stop):
        ts = T0 + timedelta(seconds=i)
        name = ("Line1.Temp", "Line1.Count", "Line1.Running", "Line1.Motor.Speed")[i % 4]
        value: Any = {"Line1.Temp": 20.0 + i / 4, "Line1.Count": i, "Line1.Running": i % 8 == 2,
                      "Line1.Motor.Speed": 1500.0 + i}[name]
        server.write(name, value, ts)
        rows.add(row(f"Plant.{name}", ts, float(value)))
    return rows


# -- what a value becomes (no server) -------------------------------------------------


@pytest.mark.parametrize(("code", "quality"), [
    (ua.StatusCodes.Good, GOOD_QUALITY),
    (ua.StatusCodes.GoodLocalOverride, GOOD_QUALITY),
    (ua.StatusCodes.Good | 0x0480, GOOD_QUALITY),  # info bits (overflow) do not change the severity
    (ua.StatusCodes.Uncertain, UNCERTAIN_QUALITY),
    (ua.StatusCodes.UncertainLastUsableValue, UNCERTAIN_QUALITY),
    (ua.StatusCodes.UncertainSensorNotAccurate, UNCERTAIN_QUALITY),
    (ua.StatusCodes.Bad, BAD_QUALITY),
    (ua.StatusCodes.BadSensorFailure, BAD_QUALITY),
    (ua.StatusCodes.BadCommunicationError, BAD_QUALITY),
    (0xC0000000, BAD_QUALITY),  # severity 11 (reserved) counts as bad
])
def test_status_code_severity_is_the_quality(code: int, quality: int) -> None:
    assert quality_of(code) == quality


def test_overflow_bit_counts_only_with_the_data_value_info_type() -> None:
    assert overflowed(0x00000480)  # InfoType DataValue, Overflow
    assert not overflowed(0x00000080)  # the same bit without the InfoType
    assert not overflowed(ua.StatusCodes.Good)


def test_timestamp_choice_falls_back_to_the_other_then_receive_time() -> None:
    src, srv = T0, T0 + timedelta(seconds=1)
    assert pick_ts(src, srv, "source") == to_epoch_us(src)
    assert pick_ts(src, srv, "server") == to_epoch_us(srv)
    assert pick_ts(None, srv, "source") == to_epoch_us(srv)
    assert pick_ts(src, None, "server") == to_epoch_us(src)
    null = datetime(1601, 1, 1, tzinfo=UTC)  # OPC UA's null DateTime
    assert pick_ts(null, None, "source") is None

    class Received(SystemClock):
        def time(self) -> float:
            return 1_700_000_000.25

    dv = ua.DataValue(ua.Variant(1.0, ua.VariantType.Double), SourceTimestamp=null)
    assert row_of(Point("ns=2;s=X", "x"), dv, "source", Received()).ts_us == 1_700_000_000_250_000


def test_values_become_floats_and_non_numbers_are_refused_only_when_good() -> None:
    assert number_of(True, GOOD_QUALITY) == 1.0
    assert number_of(7, GOOD_QUALITY) == 7.0
    assert number_of(2.5, GOOD_QUALITY) == 2.5
    assert number_of(None, GOOD_QUALITY) is None
    assert number_of(float("nan"), BAD_QUALITY) is None
    assert number_of(23.0, BAD_QUALITY) is None
    assert number_of("offline", UNCERTAIN_QUALITY) is None
    with pytest.raises(ValueError, match="not finite"):
        number_of(float("inf"), GOOD_QUALITY)
    with pytest.raises(ValueError, match="type str is not a number"):
        number_of("running", GOOD_QUALITY)
    with pytest.raises(ValueError, match="type list is not a number"):
        number_of([1.0, 2.0], GOOD_QUALITY)


@pytest.mark.parametrize(("changes", "message"), [
    ({"url": "http://plc:4840"}, "opcua.url"),
    ({"nodes": [], "browse_paths": []}, "nothing to subscribe to"),
    ({"security_mode": "Sign"}, "both None, or neither"),
    ({"security_policy": "Basic256Sha256"}, "both None, or neither"),
    ({"security_mode": "SignAndEncrypt", "security_policy": "Basic256Sha256"}, "opcua.certificate: needed"),
    ({"certificate": "/nonexistent/cert.der"}, "no such file"),
    ({"deadband": "percent", "deadband_value": 150.0}, "0-100"),
    ({"tags": {"ns=2;s=A": "bad\nname"}}, "line break"),
    ({"reconnect_min_delay": 5.0, "reconnect_max_delay": 1.0}, "must not exceed"),
])
def test_settings_that_cannot_work_are_refused_with_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(replace(settings("opc.tcp://127.0.0.1:4840"), **changes))


def test_subscription_and_item_requests_carry_the_settings() -> None:
    source = OpcUaSource(settings("opc.tcp://127.0.0.1:4840", publishing_interval=0.5, sampling_interval=0.25,
                                  queue_size=40, deadband="percent", deadband_value=2.5, max_unsettled=5000,
                                  trigger="status-value-timestamp"))
    params = source._subscription_params()
    assert (params.RequestedPublishingInterval, params.RequestedMaxKeepAliveCount) == (500.0, 20)  # 10 s
    assert params.MaxNotificationsPerPublish == 500 and params.RequestedLifetimeCount == 600
    item = source._item_request("ns=2;s=Line1.Temp", 7)
    p = item.RequestedParameters
    assert item.ItemToMonitor.NodeId == ua.NodeId("Line1.Temp", 2)
    assert (p.ClientHandle, p.SamplingInterval, p.QueueSize, p.DiscardOldest) == (7, 250.0, 40, True)
    assert (p.Filter.Trigger, p.Filter.DeadbandType, p.Filter.DeadbandValue) == (
        ua.DataChangeTrigger.StatusValueTimestamp, 2, 2.5)
    plain = OpcUaSource(settings("opc.tcp://127.0.0.1:4840", sampling_interval=-1))._item_request("i=2258", 1)
    assert not isinstance(plain.RequestedParameters.Filter, ua.DataChangeFilter)  # the server default
    assert plain.RequestedParameters.SamplingInterval == -1.0


def test_a_node_id_that_is_none_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"opcua\.nodes: 'Temp' is not a node id"):
        OpcUaSource(settings("opc.tcp://127.0.0.1:4840", nodes=["Temp"]))


def test_without_asyncua_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncua", None)  # `import asyncua` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install '\.\[opcua\]'"):
        OpcUaSource(settings("opc.tcp://127.0.0.1:4840"))


# -- against the server -------------------------------------------------------------


@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_n_changes_are_n_rows_exactly_once(tmp_path: Path, server: OpcServer, durability: str) -> None:
    pipeline = make_pipeline(tmp_path, **{"buffer.durability": durability, "buffer.directory": str(tmp_path / "q")})
    source = OpcUaSource(settings(server.url))
    expected = initial_rows(NUMERIC_LINE1)  # Name (a string) and Temp's Unit (a property) are not subscribed
    with running(source, pipeline) as run:
        run.connected()
        run.values(len(expected))
        expected |= write_sequence(server, 1, 201)
        run.values(len(expected))
        assert pipeline.flush(10)
        assert table(tmp_path) == sorted(expected)
        wait_until(lambda: source.status().acks_pending == 0, "every value settled", 10)
    status = source.status()
    assert status.values == status.messages == len(expected)
    assert (status.reconnects, status.bad_messages) == (0, 0)
    snap = pipeline.snapshot()
    assert snap.written == len(expected) and snap.duplicates == 0
    assert table(tmp_path) == sorted(expected)


def test_uncertain_and_bad_status_become_quality_and_strings_are_quarantined(tmp_path: Path, server: OpcServer) -> None:
    pipeline = make_pipeline(tmp_path)
    source = OpcUaSource(settings(server.url, browse_paths=[], nodes=["nsu=urn:tagwriter:test;s=Line1.Temp",
                                                                      node("Line1.Name")],
                                  tags={"ns=2;s=Line1.Temp": "line1.temp"}))  # the map names it as the server does
    t = [T0 + timedelta(seconds=i) for i in range(5)]
    with running(source, pipeline) as run:
        run.connected()
        wait_until(lambda: source.status().bad_messages == 1, "the initial Name quarantined")
        server.write("Line1.Temp", 21.5, t[1], ua.StatusCodes.UncertainLastUsableValue)
        server.write("Line1.Temp", float("nan"), t[2], ua.StatusCodes.BadSensorFailure)
        server.write("Line1.Temp", 23.0, t[3], ua.StatusCodes.BadCommunicationError)
        server.write("Line1.Name", "line two", t[4])
        run.values(4)
        wait_until(lambda: source.status().bad_messages == 2, "the second Name quarantined")
        assert pipeline.flush(10)
    assert table(tmp_path) == [
        row("line1.temp", t[0], 20.0),
        row("line1.temp", t[1], 21.5, UNCERTAIN_QUALITY),
        row("line1.temp", t[2], None, BAD_QUALITY),  # no usable value: NULL, with its quality
        row("line1.temp", t[3], None, BAD_QUALITY),  # a Bad value is to be ignored (Part 4, 7.7.1)
    ]
    kept = quarantined(tmp_path)
    assert [(k["source"], k["raw"]) for k in kept] == [
        ("opcua ns=2;s=Line1.Name", "'line one'"), ("opcua ns=2;s=Line1.Name", "'line two'")]
    assert all("type str is not a number" in k["error_message"] for k in kept)


def test_tag_names_from_display_names_with_collisions_renamed_and_a_map_winning(
    tmp_path: Path, server: OpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = make_pipeline(tmp_path)
    source = OpcUaSource(settings(server.url, browse_paths=["Objects/2:Plant"], tag_names="display-name",
                                  tag_prefix="site1.", tags={"ns=2;s=Line1.Count": "counter"}))
    with caplog.at_level(logging.WARNING, "tagwriter"), running(source, pipeline) as run:
        run.connected()
        run.values(6)
        assert pipeline.flush(10)
    tags = sorted(r[0] for r in table(tmp_path))
    # Line1.Temp and Line2.Temp are both "Temp": the one found second is named by its node id.
    assert tags == sorted(["site1.Temp", "site1.ns=2;s=Line2.Temp", "site1.Pressure", "site1.Running",
                           "counter", "site1.Speed"])
    assert "would both be tag 'site1.Temp'" in caplog.text


def test_node_id_tag_names_and_an_absolute_deadband(tmp_path: Path, server: OpcServer) -> None:
    pipeline = make_pipeline(tmp_path)
    source = OpcUaSource(settings(server.url, browse_paths=[], nodes=[node("Line1.Temp")], tag_names="node-id",
                                  deadband="absolute", deadband_value=1.0))
    t = [T0 + timedelta(seconds=i) for i in range(5)]
    with running(source, pipeline) as run:
        run.values(1)
        for ts, value in zip(t[1:], [20.5, 22.0, 22.3, 30.0], strict=True):  # 0.5 and 0.3 are in the deadband
            server.write("Line1.Temp", value, ts)
        run.values(3)
        assert pipeline.flush(10)
        assert table(tmp_path) == [row("ns=2;s=Line1.Temp", ts, v) for ts, v in [(t[0], 20.0), (t[2], 22.0),
                                                                                  (t[4], 30.0)]]


def test_a_wrong_password_is_refused_visibly_and_never_shown(
    tmp_path: Path, server: OpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "not-the-password-91b"
    pipeline = make_pipeline(tmp_path)
    source = OpcUaSource(settings(server.url, password=secret))
    with caplog.at_level(logging.DEBUG, "tagwriter"), running(source, pipeline):
        wait_until(lambda: "BadUserAccessDenied" in source.status().detail, "the login refused")
        assert not source.status().connected
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("tagwriter"))
    assert "refused" in ours
    assert secret not in ours
    assert secret not in repr(source.status())
    assert redact.redact(f"password {secret} in a library's line") == "password *** in a library's line"


def test_a_server_restart_is_survived_without_loss(tmp_path: Path, port: int) -> None:
    restart(tmp_path, port, gap=0.5)


@pytest.mark.slow
def test_a_server_away_for_30_s_is_survived_without_loss(tmp_path: Path, port: int) -> None:
    restart(tmp_path, port, gap=30.0)


def restart(tmp_path: Path, port: int, gap: float) -> None:
    """Values before, a server down for `gap` seconds, a new server on the same port, values after: all kept."""
    first = OpcServer(port).start()
    pipeline = make_pipeline(tmp_path)
    source = OpcUaSource(settings(first.url))
    expected = initial_rows(NUMERIC_LINE1)
    with running(source, pipeline) as run:
        try:
            run.values(len(expected))
            expected |= write_sequence(first, 1, 41)
            run.values(len(expected))
        finally:
            first.stop()
        wait_until(lambda: not source.status().connected, "the source saw the server go")
        time.sleep(gap)  # the outage itself, not a wait for something
        assert not source.status().connected
        assert source.status().reconnects == 0
        second = OpcServer(port, initial=first.last).start()
        try:
            wait_until(lambda: source.status().reconnects == 1 and source.status().connected, "reconnected", 30)
            run.values(len(expected) + len(NUMERIC_LINE1))  # the new subscription's first values: duplicates
            expected |= write_sequence(second, 41, 81)
            run.values(len(expected) + len(NUMERIC_LINE1))
            assert pipeline.flush(10)
        finally:
            second.stop()
    assert table(tmp_path) == sorted(expected)
    snap = pipeline.snapshot()
    assert (snap.written, snap.duplicates) == (len(expected), len(NUMERIC_LINE1))
    assert source.status().reconnects == 1


def test_a_frozen_connection_is_noticed_by_the_health_check_and_rebuilt(tmp_path: Path, server: OpcServer) -> None:
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        url = f"opc.tcp://127.0.0.1:{proxy.port}/tagwriter-test"
        pipeline = make_pipeline(tmp_path)
        source = OpcUaSource(settings(url, browse_paths=[], nodes=[node("Line1.Temp")], tags={}))
        with running(source, pipeline) as run:
            run.values(1)
            proxy.blackhole()  # the socket stays open and nothing answers: only a health check can tell
            wait_until(lambda: not source.status().connected, "the frozen session noticed", 10)
            proxy.pass_through()
            wait_until(lambda: source.status().reconnects == 1 and source.status().connected, "reconnected", 20)
            server.write("Line1.Temp", 42.0, T0 + timedelta(seconds=1))
            wait_until(lambda: source.status().values >= 3, "the value written after the freeze")
            assert pipeline.flush(10)
    assert table(tmp_path) == [row("Plant.Line1.Temp", T0, 20.0),
                               row("Plant.Line1.Temp", T0 + timedelta(seconds=1), 42.0)]


def test_stop_is_bounded_while_connected_and_while_connecting(tmp_path: Path, server: OpcServer) -> None:
    pipeline = make_pipeline(tmp_path)
    run = Run(OpcUaSource(settings(server.url)), pipeline)
    run.connected()
    assert run.stop() < 1.5
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        proxy.blackhole()  # a connect that never gets an answer
        source = OpcUaSource(settings(f"opc.tcp://127.0.0.1:{proxy.port}/x", timeout=30.0))
        run = Run(source, pipeline)
        wait_until(lambda: proxy.connections() > 0, "the source connecting")
        assert run.stop() < 1.5
    pipeline.stop(10)


def test_unsettled_values_are_bounded_while_the_writer_is_held(tmp_path: Path, server: OpcServer) -> None:
    """OPC UA has no ack: settle bounds what is received. Held writer -> publishing off, the server keeps the rest."""
    sink = MemorySink(inner=create_sink(load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'db.sqlite'}"}).database))
    sink.block()
    pipeline = make_pipeline(tmp_path, sink=sink)
    source = OpcUaSource(settings(server.url, browse_paths=[], nodes=[node("Line1.Temp")], max_unsettled=50))
    expected = {row("Plant.Line1.Temp", T0, 20.0)}

    def write(i: int) -> None:
        ts = T0 + timedelta(seconds=i)
        server.write("Line1.Temp", float(i), ts)
        expected.add(row("Plant.Line1.Temp", ts, float(i)))

    try:
        with running(source, pipeline) as run:
            run.values(1)
            written = 0
            while False not in server.publishing():  # ten at a time, each ten received, until the source says stop
                for i in range(written + 1, written + 11):
                    write(i)
                written += 10
                wait_until(lambda: source.status().messages >= len(expected) or False in server.publishing(),
                           "a batch received, or publishing off")
            for i in range(written + 1, 301):  # publishing is off: the server queues these
                write(i)
            assert 50 <= source.status().acks_pending == source.peak_unsettled < 50 + 10
            assert source.status().values < len(expected)
            sink.release()
            run.values(len(expected))
            assert pipeline.flush(10)
            wait_until(lambda: source.status().acks_pending == 0, "every value settled")
            wait_until(lambda: False not in server.publishing(), "publishing on again")
    finally:
        sink.release()
    assert table(tmp_path) == sorted(expected)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server and a client certificate (self-signed, Basic256Sha256-able RSA 2048), made with asyncua's helpers."""
    import socket

    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = tmp_path_factory.mktemp("opc-certs")
    paths = {k: folder / f"{k}.{'pem' if k.endswith('key') else 'der'}"
             for k in ("server_cert", "server_key", "client_cert", "client_key")}
    host = socket.gethostname()
    asyncio.run(setup_self_signed_certificate(paths["server_key"], paths["server_cert"], "urn:tagwriter:test-server",
                                              host, [ExtendedKeyUsageOID.SERVER_AUTH], {}))
    asyncio.run(setup_self_signed_certificate(paths["client_key"], paths["client_cert"], "urn:tagwriter:opcua",
                                              host, [ExtendedKeyUsageOID.CLIENT_AUTH], {}))
    return paths


@pytest.mark.parametrize(("mode", "policy"), [
    ("SignAndEncrypt", ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt),
    ("Sign", ua.SecurityPolicyType.Basic256Sha256_Sign),
])
def test_basic256sha256_with_certificates_and_a_user(tmp_path: Path, port: int, certs: dict[str, Path],
                                                     mode: str, policy: Any) -> None:
    server = OpcServer(port, certs=certs, policies=[policy]).start()  # no unsecured endpoint at all
    try:
        pipeline = make_pipeline(tmp_path)
        source = OpcUaSource(settings(
            server.url, browse_paths=[], nodes=[node("Line1.Temp")], security_mode=mode,
            security_policy="Basic256Sha256", certificate=str(certs["client_cert"]),
            private_key=str(certs["client_key"]), server_certificate=str(certs["server_cert"]),
        ))
        with running(source, pipeline) as run:
            run.values(1)
            server.write("Line1.Temp", 25.0, T0 + timedelta(seconds=1))
            run.values(2)
            assert pipeline.flush(10)
        assert table(tmp_path) == [row("Plant.Line1.Temp", T0, 20.0),
                                   row("Plant.Line1.Temp", T0 + timedelta(seconds=1), 25.0)]
    finally:
        server.stop()


def test_an_unsecured_client_is_refused_by_a_secured_server(tmp_path: Path, port: int, certs: dict[str, Path]) -> None:
    server = OpcServer(port, certs=certs, policies=[ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]).start()
    try:
        pipeline = make_pipeline(tmp_path)
        source = OpcUaSource(settings(server.url, browse_paths=[], nodes=[node("Line1.Temp")]))
        with running(source, pipeline):
            wait_until(lambda: source.status().detail not in ("not started", ""), "the refusal reported")
            assert not source.status().connected
    finally:
        server.stop()

"""Modbus TCP source against pymodbus's own server on a free loopback port, into a real SQLite file.

The server (tests start and stop it) holds unit 1: coils and discrete
inputs 0..63, holding registers 0..299, input registers 0..99; any other
address answers exception 2 (illegal data address), and a read of holding
register 250 is never answered (a timeout for the source; never late either:
pymodbus's server stamps a late answer with the newest request's transaction
id, so a late answer would be taken as the answer to a later request). The
30 s outage test is marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import sqlite3
import struct
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from procs import free_port
from waits import wait_until

from tagwriter import config as config_module
from tagwriter.config import load
from tagwriter.errors import ConfigError
from tagwriter.intake import Intake
from tagwriter.models import format_ts
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.memory import MemorySink
from tagwriter.sources.base import SourceStatus
from tagwriter.sources.modbus import (
    ModbusConfig,
    ModbusSource,
    Register,
    check_section,
    parse_registers,
    plan_groups,
)
from tests.clocks import StepClock

pymodbus = pytest.importorskip("pymodbus", reason="the modbus extra (pymodbus) is not installed")
from pymodbus.client import ModbusTcpClient  # noqa: E402
from pymodbus.server import ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNIT = 1
SILENT_ADDRESS = 250  # the server never answers a read of it
UNMAPPED = 5000  # a holding register the server does not have: exception 2
INPUT_REGISTERS = [40_000 + i for i in range(100)]
DISCRETE = [i % 3 == 0 for i in range(64)]
STOP_DEADLINE = 3.0  # seconds a source may take to end after stop is set (timeout 0.5 s + slack)


@pytest.fixture(autouse=True)
def _quiet_pymodbus() -> Iterator[None]:
    """pymodbus logs every refused connect and unanswered request at ERROR; the tests cause them."""
    logger = logging.getLogger("pymodbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


# -- a real pymodbus server, on its own thread and loop ------------------------------


class Server:
    """pymodbus's ModbusTcpServer on 127.0.0.1:`port`; can be stopped and started again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None

    @staticmethod
    async def _hang_on_silent_address(function_code: int, start: int, address: int, count: int, registers: list[int],
                           values: Any) -> None:
        if function_code == 3 and address == SILENT_ADDRESS:
            await asyncio.Event().wait()  # until the server stops (cancelled)

    @staticmethod
    def device() -> SimDevice:
        return SimDevice(id=UNIT, action=Server._hang_on_silent_address, simdata=(
            [SimData(0, count=64, values=False, datatype=DataType.BITS)],
            [SimData(0, values=DISCRETE, datatype=DataType.BITS)],
            [SimData(0, count=300, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, values=INPUT_REGISTERS, datatype=DataType.REGISTERS)],
        ))

    def start(self) -> Server:
        ready = threading.Event()
        self._loop = loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = ModbusTcpServer([self.device()], address=("127.0.0.1", self.port))
            await self._server.serve_forever(background=True)
            ready.set()
            await self._server.serving
            hung = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in hung:
                task.cancel()
            await asyncio.gather(*hung, return_exceptions=True)

        self._thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the pymodbus server did not start"
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._thread.join(10)
        self._loop.close()

    def client(self) -> ModbusTcpClient:
        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2)
        assert client.connect()
        return client


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(free_port()).start()
    yield s
    with contextlib.suppress(Exception):
        s.stop()


def write_holding(server: Server, values: dict[int, int]) -> None:
    client = server.client()
    try:
        for address, word in values.items():
            assert not client.write_register(address, word, device_id=UNIT).isError()
    finally:
        client.close()


# -- a real pipeline into SQLite, the source on its own thread --------------------------


def make_pipeline(tmp_path: Path, **overrides: Any) -> Pipeline:
    config = load(None, env={}, overrides={
        "database.url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
        "writer.flush_interval": 0.05,
        **overrides,
    })
    return Pipeline(config)


def section(server: Server, registers: list[dict[str, Any]], **keys: Any) -> ModbusConfig:
    keys = {"timeout": 0.5, "poll_interval": 0.1, "reconnect_delay": 0.1, "reconnect_max_delay": 1.0, **keys}
    return ModbusConfig(host="127.0.0.1", port=server.port, registers=registers, **keys)


@contextlib.contextmanager
def running(source: ModbusSource, pipeline: Pipeline, *, intake: Intake | StopAfter | None = None,
            stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """`source.run` on a thread while the block runs; then stop it (within STOP_DEADLINE) and the pipeline.

    `intake`: what the source submits to, instead of `pipeline`; `stop`: the event to stop it by."""
    stop = stop or threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            source.run(intake or pipeline, stop)
        except BaseException as exc:  # surfaced in the test, not lost on the thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-modbus-source", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        started = time.monotonic()
        thread.join(STOP_DEADLINE + 1)
        took = time.monotonic() - started
        assert pipeline.stop(10.0)
    assert not thread.is_alive(), "the source did not stop"
    assert took <= STOP_DEADLINE, f"the source took {took:.2f}s to stop"
    assert not errors, errors


class StopAfter:
    """The pipeline as a source's intake that sets `stop` in the `n`-th submit: the source ends between two polls.

    A stop set from outside may fall between two requests of a poll; the source then submits that poll in
    part (by design), and the rows of a group's tags no longer count the same polls."""

    def __init__(self, pipeline: Pipeline, n: int, stop: threading.Event, source: ModbusSource | None = None) -> None:
        self.pipeline, self.n, self.stop, self.submits, self.source = pipeline, n, stop, 0, source
        self.status_at_stop: SourceStatus | None = None  # the source's status in the n-th submit, still running

    def submit(self, data: Any, **kw: Any) -> Any:
        receipt = self.pipeline.submit(data, **kw)
        self.submits += 1
        if self.submits >= self.n and not self.stop.is_set():
            self.status_at_stop = self.source.status() if self.source is not None else None
            self.stop.set()
        return receipt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


def table(tmp_path: Path) -> list[tuple[str, str, float | None, int]]:
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        return db.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY ts, tag_name").fetchall()


# -- decoding: every type, byte order and word order, through the server ------------------


def registers_of(type_code: str, value: float, byte_order: str, word_order: str) -> list[int]:
    """The registers a device holds `value` in: big-endian bytes, each register's two bytes swapped for
    byte order little, the registers reversed for word order little (ABCD, BADC, CDAB, DCBA)."""
    raw = struct.pack(f">{type_code}", value)
    words = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    if byte_order == "little":
        words = [w[::-1] for w in words]
    if word_order == "little":
        words.reverse()
    return [int.from_bytes(w, "big") for w in words]


def test_the_test_layout_matches_the_named_orders_abcd_badc_cdab_dcba() -> None:
    """float32 1.5 is 0x3FC00000: the four layouts as device manuals write them."""
    assert registers_of("f", 1.5, "big", "big") == [0x3FC0, 0x0000]
    assert registers_of("f", 1.5, "little", "big") == [0xC03F, 0x0000]
    assert registers_of("f", 1.5, "big", "little") == [0x0000, 0x3FC0]
    assert registers_of("f", 1.5, "little", "little") == [0x0000, 0xC03F]


SAMPLES = {  # type -> (struct code, a value that tells every byte apart, exact as a float)
    "int16": ("h", -12_345), "uint16": ("H", 54_321), "int32": ("i", -123_456_789),
    "uint32": ("I", 3_000_000_001), "float32": ("f", struct.unpack(">f", bytes.fromhex("b74f22a1"))[0]),
    "int64": ("q", -(2**50) - 12_345),
    "uint64": ("Q", 2**53 - 7), "float64": ("d", math.pi),
}


def test_every_type_byte_order_and_word_order_decodes_to_the_written_value(server: Server, tmp_path: Path) -> None:
    entries: list[dict[str, Any]] = []
    words: dict[int, int] = {}
    expected: dict[str, float] = {}
    address = 0
    for type_, (code, value) in SAMPLES.items():
        for byte_order in ("big", "little"):
            for word_order in ("big", "little"):
                tag = f"hr.{type_}.{byte_order}.{word_order}"
                regs = registers_of(code, value, byte_order, word_order)
                entries.append({"tag": tag, "address": address, "type": type_, "byte_order": byte_order,
                                "word_order": word_order})
                words.update(enumerate(regs, address))
                expected[tag] = float(value)
                address += len(regs)
    # bits in a register, scale and offset, and the other three kinds
    words[address] = 0b1000_0000_0000_0101
    entries += [
        {"tag": "hr.bit0", "address": address, "type": "bool", "bit": 0},
        {"tag": "hr.bit1", "address": address, "type": "bool", "bit": 1},
        {"tag": "hr.bit15", "address": address, "type": "bool", "bit": 15},
        {"tag": "hr.bit15.swapped", "address": address, "type": "bool", "bit": 7, "byte_order": "little"},
        {"tag": "hr.nonzero", "address": address, "type": "bool"},
        {"tag": "hr.scaled", "address": address + 1, "type": "int16", "scale": 0.5, "offset": -10},
        {"tag": "ir.7", "kind": "input", "address": 7},
        {"tag": "ir.8.int32", "kind": "input", "address": 8, "type": "int32", "word_order": "little"},
        {"tag": "coil.3", "kind": "coil", "address": 3},
        {"tag": "coil.4", "kind": "coil", "address": 4},
        {"tag": "di.9", "kind": "discrete_input", "address": 9},
        {"tag": "di.10", "kind": "discrete_input", "address": 10},
    ]
    words[address + 1] = registers_of("h", -300, "big", "big")[0]
    expected |= {"hr.bit0": 1.0, "hr.bit1": 0.0, "hr.bit15": 1.0, "hr.bit15.swapped": 1.0, "hr.nonzero": 1.0,
                 "hr.scaled": -160.0, "ir.7": float(INPUT_REGISTERS[7]),
                 "ir.8.int32": float((INPUT_REGISTERS[9] << 16 | INPUT_REGISTERS[8]) - 2**32),  # negative
                 "coil.3": 1.0, "coil.4": 0.0, "di.9": 1.0, "di.10": 0.0}
    write_holding(server, words)
    client = server.client()
    assert not client.write_coil(3, True, device_id=UNIT).isError()
    client.close()

    pipeline = make_pipeline(tmp_path).start()
    source = ModbusSource.from_config(section(server, entries, poll_interval=60.0))
    with running(source, pipeline):
        wait_until(lambda: source.counts.polls >= 1, "the first poll")
    rows = table(tmp_path)
    assert {tag: value for tag, _, value, _ in rows} == expected
    assert {quality for *_, quality in rows} == {192}
    assert len({ts for _, ts, _, _ in rows}) == 1  # one group, one poll, one timestamp


# -- exactly once ----------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_n_polls_of_k_tags_are_n_times_k_rows_exactly_once(server: Server, tmp_path: Path, durability: str) -> None:
    fast = [{"tag": f"fast.{i}", "address": i, "interval": 0.05} for i in range(150)]  # two requests
    slow = [{"tag": f"slow.{i}", "kind": "input", "address": i, "interval": 0.2} for i in range(10)]
    pipeline = make_pipeline(tmp_path, **{"buffer.durability": durability,
                                          "buffer.directory": str(tmp_path / "queue")}).start()
    source = ModbusSource.from_config(section(server, fast + slow))
    assert [len(g.reads) for g in source.groups] == [2, 1]
    stop = threading.Event()
    intake = StopAfter(pipeline, 40, stop)
    with running(source, pipeline, intake=intake, stop=stop):
        wait_until(stop.is_set, "40 polls")
    polls = source.counts.polls
    assert polls == 40
    rows = table(tmp_path)
    by_tag: dict[str, list[str]] = {}
    for tag, ts, _, quality in rows:
        assert quality == 192
        by_tag.setdefault(tag, []).append(ts)
    fast_polls = len(by_tag["fast.0"])
    slow_polls = len(by_tag["slow.0"])
    assert fast_polls + slow_polls == polls
    assert all(len(by_tag[f"fast.{i}"]) == fast_polls for i in range(150))
    assert all(len(by_tag[f"slow.{i}"]) == slow_polls for i in range(10))
    assert len(rows) == fast_polls * 150 + slow_polls * 10 == source.counts.values
    snap = pipeline.snapshot()
    assert snap.submitted == snap.written == len(rows) and snap.duplicates == 0
    assert source.counts.exception_responses == source.counts.timeouts == source.counts.failed_values == 0
    status = source.status()
    assert status.messages == polls and status.values == len(rows) and status.acks_pending == 0


# -- failed requests: exception responses and timeouts --------------------------------------------


@pytest.mark.parametrize("on_error", ["bad", "skip"])
def test_an_exception_response_makes_that_request_bad_and_the_rest_good(
    server: Server, tmp_path: Path, on_error: str
) -> None:
    entries = [{"tag": "ok.0", "address": 0}, {"tag": "ok.1", "address": 1},
               {"tag": "unmapped", "address": UNMAPPED}]
    pipeline = make_pipeline(tmp_path).start()
    source = ModbusSource.from_config(section(server, entries, on_error=on_error))
    stop = threading.Event()
    intake = StopAfter(pipeline, 3, stop, source)
    with running(source, pipeline, intake=intake, stop=stop):
        wait_until(stop.is_set, "3 polls")
    assert intake.status_at_stop is not None and intake.status_at_stop.connected
    polls = source.counts.polls
    assert polls == 3
    rows = table(tmp_path)
    unmapped = [r for r in rows if r[0] == "unmapped"]
    if on_error == "bad":
        assert [(value, quality) for _, _, value, quality in unmapped] == [(None, 0)] * polls
    else:
        assert unmapped == []
    assert sorted(r[2:] for r in rows if r[0] != "unmapped") == [(0.0, 192)] * (2 * polls)
    assert source.counts.exception_responses == polls and source.counts.failed_values == polls
    assert source.counts.connection_losses == 0
    assert "exception 2 (illegal data address)" in source.status().detail


def test_a_request_never_answered_is_a_timeout_bad_and_the_connection_stays(
    server: Server, tmp_path: Path
) -> None:
    entries = [{"tag": "ok", "address": 0}, {"tag": "silent", "address": SILENT_ADDRESS}]
    pipeline = make_pipeline(tmp_path).start()
    source = ModbusSource.from_config(section(server, entries, timeout=0.2))
    stop = threading.Event()
    with running(source, pipeline, intake=StopAfter(pipeline, 5, stop), stop=stop):
        wait_until(stop.is_set, "5 polls")
    polls = source.counts.polls
    assert polls == 5
    rows = table(tmp_path)
    assert [r[2:] for r in rows if r[0] == "silent"] == [(None, 0)] * polls
    assert [r[2:] for r in rows if r[0] == "ok"] == [(0.0, 192)] * polls
    assert source.counts.timeouts == polls
    assert source.counts.connection_losses == source.counts.reconnects == 0


def test_a_poll_the_pipeline_refuses_is_quarantined_with_where_it_came_from(server: Server, tmp_path: Path) -> None:
    """A map built past `parse_registers` (which refuses such a name): the poll is kept, polling goes on."""
    groups = plan_groups([Register(tag="line\nbreak", address=0), Register(tag="ok", address=1)])
    pipeline = make_pipeline(tmp_path).start()
    source = ModbusSource("127.0.0.1", server.port, groups, timeout=0.5)
    with running(source, pipeline):
        wait_until(lambda: source.counts.rejected >= 2, "2 refused polls")
    assert source.status().bad_messages == source.counts.rejected == pipeline.snapshot().bad_input
    kept = list((tmp_path / "backup" / "quarantine").glob("*.csv"))
    text = "".join(path.read_text() for path in kept)
    assert f"modbus 127.0.0.1:{server.port} every 1s" in text and "line break" in text


# -- the server away for 30 s ------------------------------------------------------------------


@pytest.mark.slow
def test_server_stopped_for_30s_then_restarted_reconnects_and_polling_resumes(
    server: Server, tmp_path: Path
) -> None:
    tags = [f"t.{i}" for i in range(5)]
    entries = [{"tag": tag, "address": i, "interval": 0.1} for i, tag in enumerate(tags)]
    entries.append({"tag": "slow", "address": 10, "interval": 0.5})
    pipeline = make_pipeline(tmp_path).start()
    source = ModbusSource.from_config(section(server, entries))
    with running(source, pipeline):
        wait_until(lambda: source.counts.polls >= 10, "10 polls before the outage")
        server.stop()
        down_at = time.time()
        wait_until(lambda: not source.status().connected, "status().connected false")
        time.sleep(30.0)  # the outage itself: what is measured is what the source does through it
        assert not source.status().connected
        assert source.counts.connect_failures >= 10  # kept trying, backoff capped at 1 s
        polls_during = source.counts.polls
        server.start()
        up_at = time.time()
        wait_until(lambda: source.status().connected and source.counts.reconnects == 1, "the reconnect")
        wait_until(lambda: source.counts.polls >= polls_during + 10, "10 polls after the restart")
    rows = table(tmp_path)
    assert source.counts.connection_losses == 1 and source.counts.reconnects == 1
    assert source.status().reconnects == 1
    # One bad row per tag marks the loss (stamped with the poll that found it: maybe sent just before the
    # stop); nothing else while the server is away.
    bad = [r for r in rows if r[3] != 192]
    assert sorted((tag, value, quality) for tag, _, value, quality in bad) == sorted(
        (tag, None, 0) for tag in [*tags, "slow"])
    assert len({ts for _, ts, _, _ in bad}) == 1
    assert format_ts_of(down_at - 1.0) < bad[0][1] < format_ts_of(up_at)
    assert [r for r in rows if r[3] == 192 and format_ts_of(down_at) <= r[1] < format_ts_of(up_at)] == []
    after = {tag for tag, ts, _, q in rows if ts >= format_ts_of(up_at) and q == 192}
    assert after == {*tags, "slow"}
    snap = pipeline.snapshot()
    assert snap.submitted == snap.written == len(rows)


def test_a_connection_that_goes_silent_is_dropped_and_made_again(server: Server, tmp_path: Path) -> None:
    """No FIN, no RST (a pulled cable): three requests without an answer and the connection is taken for dead."""
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        pipeline = make_pipeline(tmp_path).start()
        cfg = section(server, [{"tag": "a", "address": 0}], timeout=0.2)
        cfg.port = proxy.port
        source = ModbusSource.from_config(cfg)
        with running(source, pipeline):
            wait_until(lambda: source.counts.polls >= 3, "3 polls")
            proxy.blackhole()
            wait_until(lambda: source.counts.connection_losses >= 1, "the silent connection dropped")
            assert source.counts.timeouts >= 3
            proxy.pass_through()
            wait_until(lambda: source.counts.reconnects >= 1, "a reconnect")
            polls = source.counts.polls
            wait_until(lambda: source.counts.polls >= polls + 3, "polls again")
    rows = table(tmp_path)
    assert rows[-1][2:] == (0.0, 192)
    assert all(q == 0 for _, _, v, q in rows if v is None)


def test_a_gateway_that_takes_the_connection_and_resets_it_is_backed_off_not_flooded(
        server: Server, tmp_path: Path) -> None:
    """Connect works, every request meets a reset (a gateway whose device is gone): the source backs off
    between attempts, and bad rows come at most once a poll interval per tag, not once per attempt (it spun:
    thousands of bad rows a second against an unreachable gateway before)."""
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        pipeline = make_pipeline(tmp_path).start()
        cfg = section(server, [{"tag": "a", "address": 0}, {"tag": "b", "address": 1}], reconnect_delay=0.2)
        cfg.port = proxy.port
        source = ModbusSource.from_config(cfg)
        with running(source, pipeline):
            wait_until(lambda: source.counts.polls >= 3, "3 polls")
            proxy.reset()
            cut = time.monotonic()
            wait_until(lambda: source.counts.connection_losses >= 3, "three losses, backed off", 30)
            losses = source.counts.connection_losses
            time.sleep(1.0)  # the measurement window: attempts in one second with a 0.2 s doubling backoff
            assert source.counts.connection_losses - losses <= 4
            elapsed = time.monotonic() - cut
    bad = [row for row in table(tmp_path) if row[3] == 0]
    assert bad, "the loss marks the tags bad"
    assert len(bad) <= 2 * (elapsed / 0.1 + 2), f"{len(bad)} bad rows in {elapsed:.1f}s"  # 2 tags, 0.1 s polls


def format_ts_of(epoch_s: float) -> str:
    return format_ts(round(epoch_s * 1_000_000))


def test_no_server_at_start_keeps_trying_and_stops_promptly(tmp_path: Path) -> None:
    port = free_port()
    source = ModbusSource.from_config(ModbusConfig(
        port=port, timeout=0.5, reconnect_delay=0.05, reconnect_max_delay=0.2,
        registers=[{"tag": "a", "address": 0}]))
    pipeline = make_pipeline(tmp_path).start()
    with running(source, pipeline):
        wait_until(lambda: source.counts.connect_failures >= 3, "3 failed connects")
        assert not source.status().connected
        assert source.status().last_message_age is None
        late = Server(port).start()
        try:
            wait_until(lambda: source.counts.polls >= 2, "polls once the server is there")
            assert source.status().connected and source.counts.reconnects == 0  # a first connection
        finally:
            late.stop()
    assert {r[0] for r in table(tmp_path)} == {"a"}


# -- back-pressure: no polling ahead of a full buffer -----------------------------------------------


def test_a_full_buffer_holds_polling_back_and_nothing_is_dropped(server: Server, tmp_path: Path) -> None:
    sink = MemorySink()
    config = load(None, env={}, overrides={
        "buffer.capacity": 50, "buffer.overflow_policy": "drop-oldest",
        "writer.batch_size": 10, "writer.flush_interval": 0.01,
        "backup.directory": str(tmp_path / "backup"),
        "backup.quarantine_directory": str(tmp_path / "backup" / "quarantine"),
    })
    pipeline = Pipeline(config, sink=sink).start()
    entries = [{"tag": f"t.{i}", "address": i, "interval": 0.01} for i in range(10)]
    source = ModbusSource.from_config(section(server, entries))
    sink.block()
    try:
        with running(source, pipeline):
            assert sink.blocked.wait(5)
            wait_until(lambda: len(pipeline._buffer) >= 50, "the buffer to fill")
            held = source.counts.polls
            # The writer holds one batch of 10, the buffer 50: six polls, then no room.
            assert held <= 6
            assert source.status().acks_pending == held  # submitted, none settled
            assert not pipeline.wait_for_room(10, timeout=0.3)
            assert source.counts.polls == held  # waited for room instead of polling
            sink.release()
            wait_until(lambda: source.counts.polls >= held + 20, "polling to resume")
    finally:
        sink.release()
    snap = pipeline.snapshot()
    assert snap.dropped == 0 and snap.submitted == snap.written == source.counts.values
    assert source.status().acks_pending == 0
    assert source.counts.missed_polls > 0  # the instants passed while held are counted, not caught up


def test_a_late_poll_goes_at_once_without_a_burst_and_the_passed_instants_are_counted() -> None:
    clock = StepClock(start=0.0)
    source = ModbusSource("127.0.0.1", 1, [], clock=clock)
    clock.now = 0.4
    assert source._next_due(0.0, 1.0) == 1.0  # on time: one interval on
    clock.now = 5.5  # the poll due at 1.0 ran until 5.5
    assert source._next_due(1.0, 1.0) == 5.5  # at once, not at 2.0, 3.0, 4.0, 5.0 in a row
    assert source.counts.missed_polls == 3  # 3.0, 4.0, 5.0 passed; 2.0 is the one taken late


# -- planning requests -----------------------------------------------------------------------------


def regs(*spec: tuple[str, int] | tuple[str, int, str]) -> list[Register]:
    return [Register(tag=f"r{i}", address=a, kind=k, type=t[0] if t else "uint16")
            for i, (k, a, *t) in enumerate(spec)]


def spans(groups: list[Any]) -> list[tuple[int, str, int, int]]:
    return [(r.unit, r.kind, r.start, r.count) for g in groups for r in g.reads]


def test_contiguous_registers_are_one_request_and_125_is_the_most() -> None:
    registers = [Register(tag=f"t{i}", address=100 + i) for i in range(300)]
    assert spans(plan_groups(registers)) == [(1, "holding", 100, 125), (1, "holding", 225, 125),
                                             (1, "holding", 350, 50)]
    assert spans(plan_groups(registers, max_registers=100)) == [
        (1, "holding", 100, 100), (1, "holding", 200, 100), (1, "holding", 300, 100)]


def test_a_wide_value_never_straddles_two_requests() -> None:
    registers = [Register(tag=f"t{i}", address=i * 4, type="float64") for i in range(40)]  # 160 registers
    assert spans(plan_groups(registers)) == [(1, "holding", 0, 124), (1, "holding", 124, 36)]


def test_gaps_kinds_units_and_overlaps() -> None:
    registers = [
        Register(tag="a", address=0), Register(tag="b", address=1, type="float32"),  # 0..2
        Register(tag="bit", address=1, type="bool", bit=3),  # overlaps b: same request
        Register(tag="c", address=5),  # a gap of 2
        Register(tag="d", address=0, unit=2), Register(tag="e", address=0, kind="input"),
        *(Register(tag=f"coil{i}", address=i, kind="coil") for i in range(2001)),  # 2,000 bits a request
    ]
    assert spans(plan_groups(registers)) == [
        (1, "coil", 0, 2000), (1, "coil", 2000, 1), (1, "holding", 0, 3), (1, "holding", 5, 1),
        (1, "input", 0, 1), (2, "holding", 0, 1)]
    joined = spans(plan_groups(registers, max_gap=2))
    assert (1, "holding", 0, 6) in joined and (1, "holding", 5, 1) not in joined


def test_groups_are_by_interval_fastest_first() -> None:
    registers = [Register(tag="slow", address=0, interval=10.0), Register(tag="fast", address=1, interval=0.5),
                 Register(tag="fast2", address=2, interval=0.5)]
    groups = plan_groups(registers)
    assert [(g.name, g.interval, g.tags) for g in groups] == [
        ("every 0.5s", 0.5, ["fast", "fast2"]), ("every 10s", 10.0, ["slow"])]


# -- the register map's validation -------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "message"), [
    ({"tag": "a", "address": 0, "type": "int17"},
     'modbus.registers[1].type = "int17": must be one of int16, uint16'),
    ({"tag": "a"}, "modbus.registers[1]: missing 'address'"),
    ({"address": 0}, "modbus.registers[1]: missing 'tag'"),
    ({"tag": "a", "address": 0, "typ": "int16"}, "modbus.registers[1]: unknown key 'typ' (did you mean 'type'?)"),
    ({"tag": "first", "address": 1}, 'modbus.registers[1].tag = "first": already the tag of modbus.registers[0]'),
    ({"tag": "a", "address": 65_535, "type": "float32"},
     "modbus.registers[1].address = 65535: must be between 0 and 65534"),
    ({"tag": "a", "address": -1}, "modbus.registers[1].address = -1: must be between 0 and 65535"),
    ({"tag": "a", "address": "40001"}, 'modbus.registers[1].address = "40001": must be an integer'),
    ({"tag": "a", "address": 0, "unit": 256}, "modbus.registers[1].unit = 256: must be between 0 and 255"),
    ({"tag": "a", "address": 0, "kind": "holdings"},
     "modbus.registers[1].kind = \"holdings\": must be one of holding, input, coil, discrete_input (did you mean"),
    ({"tag": "a", "address": 0, "kind": "coil", "type": "int16"}, "a coil holds one bit: type must be bool"),
    ({"tag": "a", "address": 0, "word_order": "middle"},
     "modbus.registers[1].word_order = \"middle\": must be one of big"),
    ({"tag": "a", "address": 0, "scale": float("nan")}, "modbus.registers[1].scale = nan: must be a finite number"),
    ({"tag": "a", "address": 0, "type": "bool", "scale": 2}, "scale and offset do not apply to a bool"),
    ({"tag": "a", "address": 0, "bit": 3}, 'modbus.registers[1].bit: only for type = "bool"'),
    ({"tag": "a", "address": 0, "type": "bool", "bit": 16}, "modbus.registers[1].bit = 16: must be between 0 and 15"),
    ({"tag": "a", "address": 0, "interval": 0}, "modbus.registers[1].interval = 0: must be between 0.001"),
    ({"tag": "a\nb", "address": 0}, "modbus.registers[1].tag = \"a\nb\": tag name 'a\\nb' contains a line break"),
])
def test_a_bad_register_entry_is_refused_with_its_key_path(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_registers([{"tag": "first", "address": 0}, entry], poll_interval=1.0)
    assert message in str(err.value)


def test_an_empty_map_or_not_a_list_of_tables_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"modbus\.registers: no registers: add a \[\[modbus\.registers\]\] table"):
        parse_registers([], poll_interval=1.0)
    with pytest.raises(ConfigError, match=r"modbus\.registers: must be a list of tables"):
        parse_registers({"tag": "a"}, poll_interval=1.0)


def test_reconnect_delay_may_not_exceed_its_cap() -> None:
    cfg = ModbusConfig(reconnect_delay=5.0, reconnect_max_delay=1.0, registers=[{"tag": "a", "address": 0}])
    with pytest.raises(ConfigError) as err:
        check_section(cfg)
    assert str(err.value) == "modbus.reconnect_delay = 5: must not exceed modbus.reconnect_max_delay = 1"


def test_the_example_config_is_valid() -> None:
    """examples/modbus.toml: its [modbus] keys pass the `_opt` rules config.load applies, and its map plans."""
    raw = tomllib.loads((ROOT / "examples" / "modbus.toml").read_text())["modbus"]
    fields = {f.name: f for f in dataclasses.fields(ModbusConfig)}
    assert set(raw) <= set(fields)
    for key, value in raw.items():
        if key != "registers":
            config_module._coerce(f"modbus.{key}", fields[key], value)
    groups = check_section(ModbusConfig(**raw))
    assert sum(len(g) for g in groups) == len(raw["registers"])
    assert len(groups) >= 2


def test_without_pymodbus_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymodbus.client", None)
    with pytest.raises(ConfigError, match=r"the modbus source needs pymodbus: pip install '\.\[modbus\]'"):
        ModbusSource.from_config(ModbusConfig(registers=[{"tag": "a", "address": 0}]))

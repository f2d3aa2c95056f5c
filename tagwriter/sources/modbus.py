"""Modbus TCP source: a register map polled in groups, one submit per group per poll.

Each `[[modbus.registers]]` table maps one tag to a value on a Modbus server
(a device or a TCP gateway): unit (slave id), register kind, 0-based address,
type, byte and word order, scale and offset. Registers with the same poll
interval form one polling group; a group is read in as few requests as
possible (the registers of one unit and kind, contiguous or at most
`max_gap` apart, at most 125 registers or 2,000 bits a request) and handed
over as one `PollingData` stamped with the time its first request was sent.

A failed request (an exception response, a timeout, a short answer) makes
the values it was to read bad (value None, quality 0) or, with
`on_error = "skip"`, leaves them out; the group's other values are good.
When the connection is lost every tag not read in that poll gets one bad
value at that instant, nothing is submitted while it is down, and polling resumes after a
reconnect (capped backoff). Modbus has no acknowledgement: nothing upstream
waits for tagwriter, so the source polls only when the buffer has room for
the group (`wait_for_room`) and counts the polls not yet settled.

Runs the synchronous pymodbus client on the source thread; every network
call is bounded by `timeout`, so a stop is seen within about one timeout.
"""

from __future__ import annotations

import difflib
import logging
import math
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tagwriter.backoff import Backoff
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import MODBUS_MAX_READ_BITS, MODBUS_MAX_READ_REGISTERS, ModbusConfig
from tagwriter.errors import ConfigError, PipelineStopped
from tagwriter.intake import Intake
from tagwriter.models import GOOD_QUALITY, PollingData, TagValue, check_tag_names, short_repr
from tagwriter.sources.base import SourceStatus

log = logging.getLogger(__name__)

BAD_QUALITY = 0
MAX_READ_REGISTERS = MODBUS_MAX_READ_REGISTERS
MAX_READ_BITS = MODBUS_MAX_READ_BITS
# Requests in a row without any answer after which the connection is taken for dead (a pulled cable or a
# frozen gateway sends no FIN or RST): closed and made again. Any answer, an exception too, resets the count.
SILENT_LIMIT = 3


# -- the register map ----------------------------------------------------------

#: register kind -> (is a bit, pymodbus read method)
KINDS = {
    "holding": (False, "read_holding_registers"),
    "input": (False, "read_input_registers"),
    "coil": (True, "read_coils"),
    "discrete_input": (True, "read_discrete_inputs"),
}
#: type -> (struct code, registers)
TYPES = {
    "int16": ("h", 1), "uint16": ("H", 1), "int32": ("i", 2), "uint32": ("I", 2), "float32": ("f", 2),
    "int64": ("q", 4), "uint64": ("Q", 4), "float64": ("d", 4), "bool": ("", 1),
}
ORDERS = ("big", "little")
ENTRY_KEYS = ("tag", "unit", "kind", "address", "type", "byte_order", "word_order", "scale", "offset", "bit",
              "interval")
EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "server device failure",
    5: "acknowledge", 6: "server device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

Decoder = Callable[[Sequence[Any], int], float]  # (registers or bits of a response, offset) -> value


@dataclass(frozen=True, slots=True)
class Register:
    """One tag of the register map, validated."""

    tag: str
    address: int
    unit: int = 1
    kind: str = "holding"
    type: str = "uint16"
    byte_order: str = "big"
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None
    interval: float = 1.0

    @property
    def width(self) -> int:
        """Registers (or bits) the value occupies."""
        return 1 if KINDS[self.kind][0] else TYPES[self.type][1]

    def decoder(self) -> Decoder:
        """The function that turns a response's registers (or bits) at an offset into this tag's value."""
        if KINDS[self.kind][0]:
            return lambda bits, i: 1.0 if bits[i] else 0.0
        if self.type == "bool":
            swap = self.byte_order == "little"
            if self.bit is None:
                return lambda words, i: 1.0 if words[i] else 0.0
            bit = self.bit
            if swap:
                return lambda words, i: float((((words[i] & 0xFF) << 8 | words[i] >> 8) >> bit) & 1)
            return lambda words, i: float((words[i] >> bit) & 1)
        code, n = TYPES[self.type]
        # Each register's two bytes in `byte_order`, registers in `word_order`, read as one big-endian value.
        pack = struct.Struct(f"{'>' if self.byte_order == 'big' else '<'}{n}H").pack
        unpack = struct.Struct(f">{code}").unpack
        reverse = self.word_order == "little" and n > 1
        scale, offset = self.scale, self.offset

        def raw(words: Sequence[int], i: int) -> int | float:
            regs = words[i:i + n]
            return unpack(pack(*(regs[::-1] if reverse else regs)))[0]

        if scale == 1.0 and offset == 0.0:  # exact: float32 -0.0 stays -0.0
            return lambda words, i: float(raw(words, i))
        return lambda words, i: raw(words, i) * scale + offset


def parse_registers(entries: Any, *, poll_interval: float, path: str = "modbus.registers") -> list[Register]:
    """The register map from its TOML tables; raises ConfigError naming the key path (`modbus.registers[3].type`).

    Indexes count from 0 in file order. Tag names must be unique and valid
    (`models.check_tag_names`).
    """
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{path}: must be a list of tables ([[{path}]] in TOML)")
    if not entries:
        raise ConfigError(f"{path}: no registers: add a [[{path}]] table per tag",
                          hint='e.g. tag = "line1.temp", unit = 1, address = 0, type = "float32"')
    registers: list[Register] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        register = _parse_entry(entry, where, poll_interval)
        if register.tag in seen:
            raise ConfigError(f"{where}.tag = {_shown(register.tag)}: already the tag of {path}[{seen[register.tag]}]")
        seen[register.tag] = index
        registers.append(register)
    return registers


def _parse_entry(entry: Mapping[str, Any], where: str, poll_interval: float) -> Register:
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1, cutoff=0.6)
            maybe = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{maybe}", hint=f"keys: {', '.join(ENTRY_KEYS)}")
    for key in ("tag", "address"):
        if key not in entry:
            raise ConfigError(f"{where}: missing {key!r}")
    tag = _text(entry, "tag", where)
    try:
        check_tag_names([tag])
    except ValueError as exc:
        raise ConfigError(f"{where}.tag = {_shown(tag)}: {exc}") from None
    kind = _choice(entry, "kind", where, tuple(KINDS), "holding")
    is_bit = KINDS[kind][0]
    type_ = _choice(entry, "type", where, tuple(TYPES), "bool" if is_bit else "uint16")
    if is_bit and type_ != "bool":
        raise ConfigError(f"{where}.type = {_shown(type_)}: a {kind} holds one bit: type must be bool")
    width = 1 if is_bit else TYPES[type_][1]
    address = _integer(entry, "address", where, 0, 65_536 - width)
    scale = _number(entry, "scale", where, 1.0)
    offset = _number(entry, "offset", where, 0.0)
    if type_ == "bool" and ("scale" in entry or "offset" in entry):
        raise ConfigError(f"{where}: scale and offset do not apply to a bool")
    bit = None
    if "bit" in entry:
        if is_bit or type_ != "bool":
            raise ConfigError(f"{where}.bit: only for type = \"bool\" on a holding or input register")
        bit = _integer(entry, "bit", where, 0, 15)
    interval = _number(entry, "interval", where, poll_interval)
    if not 0.001 <= interval <= 86_400:
        raise ConfigError(f"{where}.interval = {interval:g}: must be between 0.001 and 86400")
    return Register(
        tag=tag, address=address, unit=_integer(entry, "unit", where, 0, 255, 1), kind=kind, type=type_,
        byte_order=_choice(entry, "byte_order", where, ORDERS, "big"),
        word_order=_choice(entry, "word_order", where, ORDERS, "big"),
        scale=scale, offset=offset, bit=bit, interval=interval,
    )


def _shown(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) and len(value) <= 60 else short_repr(value)


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} = {_shown(value)}: must be a non-empty string")
    return value


def _choice(entry: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...], default: str) -> str:
    value = entry.get(key, default)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}.{key} = {_shown(value)}: must be one of {', '.join(choices)}{maybe}")
    return str(value)


def _integer(entry: Mapping[str, Any], key: str, where: str, lo: int, hi: int, default: int | None = None) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} = {_shown(value)}: must be an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} = {value}: must be between {lo} and {hi}")
    return value


def _number(entry: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} = {_shown(value)}: must be a finite number")
    return float(value)


# -- requests and polling groups --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """One request: `count` registers (or bits) of one kind from `start` on one unit, and the tags in them."""

    unit: int
    kind: str
    start: int
    count: int
    fields: tuple[tuple[str, int, Decoder], ...]  # (tag, offset in the response, decoder)

    @property
    def tags(self) -> list[str]:
        return [tag for tag, _, _ in self.fields]

    def describe(self) -> str:
        """For people: `unit 1 holding 100..109`."""
        return f"unit {self.unit} {self.kind.replace('_', ' ')} {self.start}..{self.start + self.count - 1}"


@dataclass(frozen=True, slots=True)
class PollGroup:
    """The registers polled together every `interval` seconds."""

    name: str
    interval: float
    reads: tuple[Read, ...]

    @property
    def tags(self) -> list[str]:
        return [tag for read in self.reads for tag in read.tags]

    def __len__(self) -> int:
        return sum(len(read.fields) for read in self.reads)


def plan_groups(registers: Iterable[Register], *, max_registers: int = MAX_READ_REGISTERS,
                max_bits: int = MAX_READ_BITS, max_gap: int = 0) -> list[PollGroup]:
    """Polling groups (one per interval, fastest first), each read in as few requests as the limits allow."""
    by_interval: dict[float, list[Register]] = {}
    for register in registers:
        by_interval.setdefault(register.interval, []).append(register)
    groups = []
    for interval in sorted(by_interval):
        members = by_interval[interval]
        runs: dict[tuple[int, str], list[Register]] = {}
        for register in sorted(members, key=lambda r: (r.unit, r.kind, r.address)):
            runs.setdefault((register.unit, register.kind), []).append(register)
        reads: list[Read] = []
        for (unit, kind), run in runs.items():
            limit = max_bits if KINDS[kind][0] else max_registers
            reads.extend(_spans(unit, kind, run, limit, max_gap))
        groups.append(PollGroup(f"every {interval:g}s", interval, tuple(reads)))
    return groups


def _spans(unit: int, kind: str, run: list[Register], limit: int, max_gap: int) -> list[Read]:
    """`run` (sorted by address) cut into requests of at most `limit`, joined across gaps of `max_gap` or less."""
    reads: list[Read] = []
    members: list[Register] = []
    start = end = 0  # of the request being built; end exclusive
    for register in run:
        reg_end = register.address + register.width
        if members and register.address <= end + max_gap and max(end, reg_end) - start <= limit:
            members.append(register)
            end = max(end, reg_end)
            continue
        if members:
            reads.append(_read(unit, kind, start, end, members))
        members, start, end = [register], register.address, reg_end
    if members:
        reads.append(_read(unit, kind, start, end, members))
    return reads


def _read(unit: int, kind: str, start: int, end: int, members: list[Register]) -> Read:
    fields = tuple((r.tag, r.address - start, r.decoder()) for r in members)
    return Read(unit, kind, start, end - start, fields)


def check_section(section: ModbusConfig) -> list[PollGroup]:
    """Check what the `_opt` rules cannot (the register map, key against key); the polling groups.

    Raises ConfigError naming the key path. For `config.validate` once the section is there.
    """
    if section.reconnect_delay > section.reconnect_max_delay:
        raise ConfigError(f"modbus.reconnect_delay = {section.reconnect_delay:g}: must not exceed "
                          f"modbus.reconnect_max_delay = {section.reconnect_max_delay:g}")
    registers = parse_registers(section.registers, poll_interval=section.poll_interval)
    return plan_groups(registers, max_registers=section.max_registers, max_bits=section.max_bits,
                       max_gap=section.max_gap)


# -- the source --------------------------------------------------------------------


class ReadFailed(Exception):
    """One request got no usable answer (exception response, timeout, short answer); the connection is fine."""


class ConnectionLost(Exception):
    """The connection is gone: reconnect before the next request."""


@dataclass(slots=True)
class ModbusCounts:
    """What the source did since it started; read from other threads (each figure on its own)."""

    polls: int = 0  # group polls made on a connection
    values: int = 0  # values submitted, good and bad
    failed_values: int = 0  # values of failed requests (submitted bad, or skipped)
    exception_responses: int = 0
    timeouts: int = 0  # requests without a usable answer within `timeout` (none, undecodable or short)
    connection_losses: int = 0
    reconnects: int = 0  # connections made again after a loss
    connect_failures: int = 0
    missed_polls: int = 0  # poll instants passed over because a poll (or room in the buffer) came late
    rejected: int = 0  # polls refused by submit (kept in quarantine)


def pymodbus_parts() -> tuple[type, type[Exception], type[Exception]]:
    """pymodbus's synchronous TCP client, its connection error and its base error.

    Raises ConfigError naming the extra when pymodbus is not installed.
    """
    try:
        from pymodbus.client import ModbusTcpClient
        from pymodbus.exceptions import ConnectionException, ModbusException
    except ImportError:
        raise ConfigError(
            "the modbus source needs pymodbus: pip install '.[modbus]' in the tagwriter checkout") from None
    return ModbusTcpClient, ConnectionException, ModbusException


class ModbusSource:
    """Polls a Modbus TCP server's register map in groups and submits each poll (`Source`, `ReportingSource`).

    `run` blocks on the source thread until `stop` is set or the pipeline
    stops; `status` may be called from any thread.
    """

    kind = "modbus"

    def __init__(self, host: str, port: int, groups: Sequence[PollGroup], *, timeout: float = 1.0,
                 on_error: str = "bad", backoff: Backoff | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        if on_error not in ("bad", "skip"):
            raise ValueError(f"on_error must be bad or skip, not {on_error!r}")
        self.host, self.port = host, port
        self.endpoint = f"{host}:{port}"
        self.name = f"modbus {self.endpoint}"
        self.groups = list(groups)
        self.on_error = on_error
        self.clock = clock
        self.backoff = backoff or Backoff([0.5], cap=30.0, jitter=0.2)
        self.counts = ModbusCounts()
        client, self._connection_error, self._modbus_error = pymodbus_parts()
        self._client = client(host, port=port, timeout=timeout, retries=0)
        self._readers = {kind: getattr(self._client, method) for kind, (_, method) in KINDS.items()}
        self._connected = False
        self._was_connected = False
        self._session_good = False  # a value was read on the current connection
        self._silent = 0  # requests in a row without an answer
        self._failing: set[Read] = set()  # requests failing now: logged once, and again when they recover
        self._last_error = ""
        self._last_poll: float | None = None  # clock.monotonic() of the last poll with a good value
        self._unsettled = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, section: ModbusConfig, *, clock: Clock = SYSTEM_CLOCK) -> ModbusSource:
        """The source of a `[modbus]` section; raises ConfigError for a bad register map."""
        groups = check_section(section)
        backoff = Backoff([section.reconnect_delay], cap=section.reconnect_max_delay, jitter=0.2)
        return cls(section.host, section.port, groups, timeout=section.timeout, on_error=section.on_error,
                   backoff=backoff, clock=clock)

    # -- running ---------------------------------------------------------------

    def run(self, intake: Intake, stop: threading.Event) -> None:
        """Connect, poll, reconnect after a loss; until `stop` or the pipeline stops."""
        log.info("%s: polling %d tags in %d groups", self.name, sum(map(len, self.groups)), len(self.groups))
        try:
            delays = iter(self.backoff)
            while self._connect(stop):
                self._session_good = False
                self._poll_while_connected(intake, stop)
                if self._session_good:
                    delays = iter(self.backoff)
                elif not stop.is_set() and self.clock.wait(stop, next(delays, self.backoff.cap or 30.0)):
                    break  # a connection that takes the connect but answers nothing: back off, do not spin
        except PipelineStopped:
            log.info("%s: the pipeline stopped; polling ends", self.name)
        finally:
            self._close()

    def _connect(self, stop: threading.Event) -> bool:
        """Connect, waiting out the backoff between attempts; False once `stop` is set.

        The first failed attempt in a row is logged as a warning, the rest at debug (they are counted).
        """
        for attempt, delay in enumerate(self.backoff):
            if stop.is_set():
                return False
            if self._client.connect():
                if self._was_connected:
                    self.counts.reconnects += 1
                    log.info("%s: connected again after %d failed attempts", self.name, attempt)
                self._connected = self._was_connected = True
                return True
            self.counts.connect_failures += 1
            self._last_error = f"cannot connect to {self.endpoint}; next attempt in {delay:.1f}s"
            log.log(logging.DEBUG if attempt else logging.WARNING, "%s: %s", self.name, self._last_error)
            if self.clock.wait(stop, delay):
                return False
        return False  # a schedule without a cap ran out

    def _close(self) -> None:
        self._connected = False
        self._silent = 0
        self._client.close()

    def _poll_while_connected(self, intake: Intake, stop: threading.Event) -> None:
        """Poll each group on its schedule (first polls at once) until `stop` or the connection is lost."""
        now = self.clock.monotonic()
        due = [now] * len(self.groups)
        while not stop.is_set():
            index = min(range(len(due)), key=due.__getitem__)
            wait = due[index] - self.clock.monotonic()
            if wait > 0 and self.clock.wait(stop, wait):
                return
            group = self.groups[index]
            if not intake.wait_for_room(len(group), stop):
                return
            lost = self._poll(group, intake, stop)
            due[index] = self._next_due(due[index], group.interval)
            if lost:
                return

    def _next_due(self, due: float, interval: float) -> float:
        """The next poll instant: one interval on, or at once if that has passed (a poll or the buffer came late).

        Late, the schedule goes on from now, never catching up in a burst; the
        instants passed over beyond the one taken late are counted as missed.
        """
        due += interval
        now = self.clock.monotonic()
        if now <= due:
            return due
        self.counts.missed_polls += math.floor((now - due) / interval)
        return now

    def _poll(self, group: PollGroup, intake: Intake, stop: threading.Event) -> bool:
        """Read one group and submit it; True if the connection was lost (every tag then marked bad).

        A stop between two requests ends the poll there: what was read is submitted, the rest left out.
        """
        ts = self.clock.time()
        values: dict[str, float | None] = {}
        failed: list[str] = []
        lost = False
        for read in group.reads:
            if stop.is_set():
                break
            if lost:
                failed.extend(read.tags)
                continue
            try:
                data = self._request(read)
            except ReadFailed as exc:
                self._read_failed(read, str(exc))
                failed.extend(read.tags)
                continue
            except ConnectionLost as exc:
                self._lost(str(exc))
                lost = True
                failed.extend(read.tags)
                continue
            self._read_ok(read)
            for tag, offset, decode in read.fields:
                values[tag] = decode(data, offset)
        self.counts.polls += 1
        if values:
            self._last_poll = self.clock.monotonic()
            self._session_good = True
        if lost and not self._session_good:
            return True  # nothing was read on this connection: its values were marked bad when the last one was lost
        self._submit(intake, group, ts, values, failed)
        if lost:
            for other in self.groups:
                if other is not group:
                    self._submit(intake, other, ts, {}, other.tags)
        return lost

    def _request(self, read: Read) -> Sequence[Any]:
        """The registers (or bits) of one request; raises ReadFailed or ConnectionLost."""
        if not self._client.connected:
            raise ConnectionLost("not connected")
        try:
            response = self._readers[read.kind](read.start, count=read.count, device_id=read.unit)
        except self._connection_error as exc:
            raise ConnectionLost(str(exc)) from None
        except (self._modbus_error, OSError) as exc:  # no answer in time, or an answer that does not decode
            self.counts.timeouts += 1
            self._silent += 1
            if self._silent >= SILENT_LIMIT or not self._client.connected:
                raise ConnectionLost(f"no answer to {self._silent} requests in a row") from None
            raise ReadFailed(f"no answer within the timeout ({exc})") from None
        self._silent = 0
        if response.isError():
            code = getattr(response, "exception_code", 0)
            self.counts.exception_responses += 1
            raise ReadFailed(f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})")
        data = response.bits if KINDS[read.kind][0] else response.registers
        if len(data) < read.count:
            self.counts.timeouts += 1
            raise ReadFailed(f"short answer: {len(data)} of {read.count}")
        return data

    def _read_failed(self, read: Read, why: str) -> None:
        self._last_error = f"{read.describe()}: {why}"
        if read not in self._failing:
            self._failing.add(read)
            action = "left out" if self.on_error == "skip" else "bad quality"
            log.warning("%s: %s: its values are %s until it answers", self.name, self._last_error, action)

    def _read_ok(self, read: Read) -> None:
        if read in self._failing:
            self._failing.discard(read)
            log.info("%s: %s answers again", self.name, read.describe())

    def _lost(self, why: str) -> None:
        self.counts.connection_losses += 1
        self._last_error = f"connection lost: {why}"
        log.warning("%s: %s; reconnecting", self.name, self._last_error)
        self._close()

    def _submit(self, intake: Intake, group: PollGroup, ts: float, values: dict[str, float | None],
                failed: list[str]) -> None:
        """One submit for one poll: good values, and the failed ones bad (or left out)."""
        self.counts.failed_values += len(failed)
        if self.on_error == "bad" and failed:
            if values:
                good = PollingData(group.name, ts, values)
                data: PollingData | list[TagValue] = [
                    *good.rows(), *PollingData(group.name, ts, dict.fromkeys(failed), BAD_QUALITY).rows()]
            else:
                data = PollingData(group.name, ts, dict.fromkeys(failed), BAD_QUALITY)
        elif values:
            data = PollingData(group.name, ts, values, GOOD_QUALITY)
        else:
            return
        try:
            receipt = intake.submit(data)
        except ValueError as exc:  # nothing a validated map decodes to; kept, never the end of polling
            self.counts.rejected += 1
            intake.quarantine_input([(f"{self.name} {group.name}", str(exc), repr(values))])
            return
        self.counts.values += len(data)
        with self._lock:
            self._unsettled += 1
        receipt.on_settled(self._settled)

    def _settled(self) -> None:
        """On the thread that settled a poll's values: quick, never blocks."""
        with self._lock:
            self._unsettled -= 1

    # -- reporting ---------------------------------------------------------------

    def status(self) -> SourceStatus:
        c = self.counts
        last = self._last_poll
        detail = (f"{c.exception_responses} exception responses, {c.timeouts} timeouts, "
                  f"{c.connection_losses} connection losses, {c.missed_polls} missed polls")
        if self._last_error:
            detail += f"; last: {self._last_error}"
        return SourceStatus(
            kind=self.kind, endpoint=self.endpoint, connected=self._connected, messages=c.polls,
            values=c.values, last_message_age=None if last is None else max(0.0, self.clock.monotonic() - last),
            acks_pending=self._unsettled, reconnects=c.reconnects, bad_messages=c.rejected, detail=detail,
        )

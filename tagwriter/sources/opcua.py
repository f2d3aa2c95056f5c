"""The OPC UA source (asyncua): one subscription on one server; every data change becomes a row.

    source = OpcUaSource(OpcUaConfig(url="opc.tcp://plc:4840", browse_paths=["Objects/Plant/Line1"]))
    source.run(pipeline, stop)     # blocks on the source thread until `stop` is set

One thread, one asyncio loop: `run` makes the loop on the service's source
thread and the asyncua client lives on it. A *session* connects (security
mode/policy, user name), resolves the nodes (the configured node ids, and every
numeric Variable under the browse paths), and creates one subscription with a
monitored item per node. It ends when a health check fails (a read of the
server state every `health_interval`; one that waits behind a burst of values
proves nothing), the server reports a bad subscription status, or asyncua
reports the transport lost; then the client is closed and a
new one is built and subscribed, with capped backoff. asyncua's own
auto-reconnect is off: not every version has it, and one way that always works
is easier to trust.

A data change is a row: the node's tag name (`tag_names`, or `[opcua.tags]`),
the source or server timestamp (`timestamp`; the other one, then the receive
time, when absent), the value as a float (booleans 1/0) and the StatusCode as
an OPC DA quality (`quality_of`). A value that is no number (a string, an
array, NaN with a Good status) is quarantined with its node id.

OPC UA has no acknowledgement of data: a value settles when the pipeline has it
durable (or written), and that matters for back-pressure only. Values received
and not settled are bounded by `max_unsettled`: beyond it the source switches
publishing off (SetPublishingMode) until half of them have settled; meanwhile
the server queues `queue_size` values per node and drops the oldest beyond.
Rows go to the intake from one worker thread in the order received (a wait
for room, or a submit that waits for an fsync, never holds up the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections import deque
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagwriter import redact
from tagwriter.backoff import Backoff
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import OpcUaConfig
from tagwriter.errors import ConfigError, PipelineStopped
from tagwriter.intake import BadInput, Intake
from tagwriter.models import GOOD_QUALITY, TagValue, check_tag_names, short_repr, to_epoch_us
from tagwriter.sources.base import SourceStatus

if TYPE_CHECKING:
    from asyncua import Client, Node, ua

log = logging.getLogger(__name__)

KIND = "opcua"
UNCERTAIN_QUALITY = 64
BAD_QUALITY = 0
STOP_LOOK = 0.1  # seconds between looks at `stop` while connecting, watching or waiting to retry
CLOSE_TIMEOUT = 0.5  # seconds a closing session may take (the service gives a stopping source 1 s)
SESSION_TIMEOUT_MS = 120_000  # a server frees the session of a client that vanished after this
KEEPALIVE_SECONDS = 10.0  # the server sends a keep-alive at least this often when nothing changes
LIFETIME_KEEPALIVES = 30  # the server drops a subscription nobody asks for after this many keep-alives
ITEMS_PER_REQUEST = 1000  # monitored items created (or attributes read) per request
HAND_OVER_ROWS = 500  # rows handed over at once during a burst (the writer's default batch)
PUBLISH_SHARE = 10  # a notification message carries at most max_unsettled / PUBLISH_SHARE values
RESUME_FRACTION = 0.5  # publishing resumes once unsettled values are down to this share of max_unsettled
MAX_BROWSE_DEPTH = 32
MAX_BROWSE_NODES = 200_000
OVERFLOW_LOG_INTERVAL = 60.0  # seconds between warnings that the server dropped queued values
LOGIN_REFUSED = frozenset({
    "BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected", "BadSecurityChecksFailed",
    "BadCertificateUntrusted", "BadCertificateInvalid",
})
# Builtin DataTypes (namespace 0) whose values are numbers: Boolean..Double, Number, Integer, UInteger,
# Enumeration, Duration; other types are asked for their base type.
NUMERIC_DATA_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 26, 27, 28, 29, 290})
NON_NUMERIC_DATA_TYPES = frozenset({12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 25})
EXPECTED_ERRORS: tuple[type[Exception], ...] = (OSError, TimeoutError, ConnectionError, EOFError)
TRIGGERS = {"status": 0, "status-value": 1, "status-value-timestamp": 2}
DEADBANDS = {"none": 0, "absolute": 1, "percent": 2}


def check_config(c: OpcUaConfig) -> None:
    """Rules between the keys of [opcua]; raises ConfigError naming the key. Node id syntax is the source's."""
    if not c.url.lower().startswith("opc.tcp://"):
        raise ConfigError(f"opcua.url = {redact.redact_url(c.url)!r}: must be opc.tcp://HOST:PORT[/PATH]")
    if not c.nodes and not c.browse_paths:
        raise ConfigError("[opcua]: nothing to subscribe to", hint="set opcua.nodes or opcua.browse_paths")
    if (c.security_mode == "None") != (c.security_policy == "None"):
        raise ConfigError(
            f"opcua.security_mode = {c.security_mode!r} and opcua.security_policy = {c.security_policy!r}: "
            "both None, or neither",
            hint="e.g. security_mode = \"SignAndEncrypt\", security_policy = \"Basic256Sha256\"",
        )
    if c.security_mode != "None":
        for key in ("certificate", "private_key"):
            if not getattr(c, key):
                raise ConfigError(f"opcua.{key}: needed with security_mode = {c.security_mode!r}")
    for key in ("certificate", "private_key", "server_certificate"):
        path = getattr(c, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"opcua.{key} = {path!r}: no such file")
    if c.deadband == "percent" and c.deadband_value > 100:
        raise ConfigError(f"opcua.deadband_value = {c.deadband_value:g}: a percent deadband is 0-100")
    if c.reconnect_min_delay > c.reconnect_max_delay:
        raise ConfigError(f"opcua.reconnect_min_delay = {c.reconnect_min_delay:g}: must not exceed "
                          f"opcua.reconnect_max_delay = {c.reconnect_max_delay:g}")
    for node, tag in c.tags.items():
        if not isinstance(tag, str) or not tag:
            raise ConfigError(f"opcua.tags.{node!r}: the tag name must be a non-empty string")
        try:
            check_tag_names((tag,))
        except ValueError as exc:
            raise ConfigError(f"opcua.tags.{node!r}: {exc}") from None


# -- what a data change becomes ------------------------------------------------------


def quality_of(status: int) -> int:
    """The OPC DA quality of a 32-bit OPC UA StatusCode, from its severity (the top two bits).

    00 Good -> 192, 01 Uncertain -> 64, 10 Bad (and 11, reserved) -> 0.
    """
    severity = (status >> 30) & 0b11
    if severity == 0:
        return GOOD_QUALITY
    return UNCERTAIN_QUALITY if severity == 1 else BAD_QUALITY


def overflowed(status: int) -> bool:
    """True if the StatusCode says the server dropped queued values of the node before this one."""
    return (status >> 10) & 0b11 == 1 and bool(status & 0x80)  # InfoType DataValue, Overflow bit


def pick_ts(source: datetime | None, server: datetime | None, choice: str) -> int | None:
    """Epoch microseconds of the timestamp `choice` names ("source"/"server"), else of the other; None if neither.

    OPC UA's null DateTime (1601-01-01, or absent) counts as absent.
    """
    first, second = (source, server) if choice == "source" else (server, source)
    for ts in (first, second):
        if ts is not None and ts.year > 1601:
            with contextlib.suppress(ValueError):
                return to_epoch_us(ts)
    return None


def number_of(value: Any, quality: int) -> float | None:
    """The value as a float (booleans 1.0/0.0); None for no value, a Bad status (whose value is to be
    ignored: OPC UA Part 4, 7.7.1), or no usable value with an Uncertain status.

    Raises ValueError for a value that is no finite number while the status says Good.
    """
    if value is None or quality == BAD_QUALITY:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int):  # also an enumeration's IntEnum
        return float(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    if quality != GOOD_QUALITY:
        return None  # a bad or uncertain reading without a usable value: kept as NULL with its quality
    if isinstance(value, float):
        raise ValueError(f"value {value!r} is not finite")
    raise ValueError(f"value of type {type(value).__name__} is not a number")


@dataclass(frozen=True, slots=True)
class Point:
    """One monitored node: its node id as text (namespace index form) and its tag name."""

    node_id: str
    tag: str

    @property
    def where(self) -> str:
        return f"{KIND} {self.node_id}"


def row_of(point: Point, dv: ua.DataValue, choice: str, clock: Clock = SYSTEM_CLOCK) -> TagValue:
    """The row of one data change, timed by `pick_ts` (or `clock`, receiving it now); raises ValueError for
    a value that is no number (see `number_of`)."""
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    quality = quality_of(status)
    value = dv.Value.Value if dv.Value is not None else None
    ts_us = pick_ts(dv.SourceTimestamp, dv.ServerTimestamp, choice)
    if ts_us is None:
        ts_us = to_epoch_us(clock.time())
    return TagValue(point.tag, ts_us, number_of(value, quality), quality)


def path_tag(names: Sequence[str]) -> str:
    """The browse-path tag name: browse names below the Objects folder (or Root), joined with '.'."""
    names = list(names)
    if names and names[0] == "Root":
        names = names[1:]
    if names and names[0] == "Objects":
        names = names[1:]
    return ".".join(names)


def split_browse_path(path: str) -> list[str]:
    """The elements of a browse path ("Objects/Plant/2:Line1"); raises ConfigError for an empty one."""
    elements = [e.strip() for e in path.strip().strip("/").split("/")]
    if not all(elements):
        raise ConfigError(f"opcua.browse_paths: {path!r} is not a browse path", hint="e.g. \"Objects/Plant/Line1\"")
    return elements


# -- the source ---------------------------------------------------------------------


class SessionLost(Exception):
    """A session ended (or could not start) for a reason worth telling the operator."""


class OpcUaSource:
    """Subscribes to nodes of one OPC UA server and submits every data change; reconnects by itself.

    `run` blocks the calling thread (the service's source thread) until `stop`
    is set; `status` may be called from any thread. Raises ConfigError for
    settings that cannot work (and when asyncua is not installed).
    """

    def __init__(self, settings: OpcUaConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        _asyncua()
        check_config(settings)
        redact.register(settings.password, settings.private_key_password, *redact.url_passwords(settings.url))
        self.settings = settings
        self.clock = clock
        self.endpoint = redact.redact_url(settings.url)
        self.name = f"{KIND} {self.endpoint}"
        self._node_ids = [_checked_node_id(n, "opcua.nodes") for n in settings.nodes]
        self._tag_map = {_checked_node_id(k, "opcua.tags"): v for k, v in settings.tags.items()}
        self._browse_paths = [split_browse_path(p) for p in settings.browse_paths]
        self._backoff = Backoff([settings.reconnect_min_delay], cap=settings.reconnect_max_delay, jitter=0.2)
        self._tags: dict[str, str] = {}  # node id -> tag name, kept across sessions so names stay put
        self._skipped: set[str] = set()  # variables under a browse path already logged as not numeric
        self._node_of: dict[str, str] = {}  # tag name -> node id, this session (for quarantine entries)
        self._lock = threading.Lock()  # the counters that settle threads and the hand-over thread change
        self._unsettled = 0  # handed over and not yet settled (the held ones are `len(self._held)`)
        self.peak_unsettled = 0  # the most values received and not settled at one time (for tests, benchmarks)
        self._values = 0
        self._messages = 0
        self._bad = 0
        self._overflows = 0
        self._next_overflow_log = 0.0
        self._sessions = 0
        self._reconnects = 0
        self._failures = 0  # failed attempts since the source was last up
        self._last_failure = ""
        self._down_since: float | None = None
        self._connected = False
        self._last_message: float | None = None
        self._detail = "not started"
        # The rest lives on the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[TagValue] = []
        self._held_bad: list[BadInput] = []
        self._flush_due = False
        self._intake: Intake | None = None
        self._stop = threading.Event()
        self._worker: ThreadPoolExecutor | None = None  # one thread: hand-overs stay in the order received
        self._pipeline_gone = False
        self._handover_error: BaseException | None = None
        self._session_no = 0
        self._lost: str | None = None
        self._sub: Any = None  # the live asyncua Subscription
        self._paused = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, settings: OpcUaConfig) -> OpcUaSource:
        return cls(settings)

    def run(self, intake: Intake, stop: threading.Event) -> None:
        """Subscribe and submit until `stop` is set (or the pipeline stops); then hand over what is held."""
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(intake, stop))
        finally:
            self._loop = None  # settle callbacks from now on have nothing to tell
            _close_loop(loop)
        if self._handover_error is not None:
            raise self._handover_error  # a bug: the service reports it

    def status(self) -> SourceStatus:
        """Counters since start; `acks_pending` counts values received and not yet settled."""
        last = self._last_message
        return SourceStatus(
            kind=KIND, endpoint=self.endpoint, connected=self._connected, messages=self._messages,
            values=self._values, last_message_age=None if last is None else self.clock.monotonic() - last,
            acks_pending=self._pending(), reconnects=self._reconnects, bad_messages=self._bad,
            detail=self._detail,
        )

    def _pending(self) -> int:
        """Values received and not yet settled: held on the loop, or handed over (any thread; approximate)."""
        return len(self._held) + max(0, self._unsettled)

    # -- sessions, one after the other --------------------------------------------

    async def _main(self, intake: Intake, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._intake, self._stop = intake, stop
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="tagwriter-opcua")
        try:
            await self._follow(stop)
        finally:
            self._flush()
            self._worker.shutdown(wait=True)  # what is handed over is submitted (or spooled, stopping)

    def _done(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._pipeline_gone or self._handover_error is not None

    async def _follow(self, stop: threading.Event) -> None:
        """Run sessions until `stop`; after one that failed or was lost, wait the next backoff delay."""
        delays = iter(self._backoff)
        while not self._done(stop):
            sessions = self._sessions
            session = asyncio.create_task(self._session(stop))
            while not session.done() and not self._done(stop):
                await asyncio.wait({session}, timeout=STOP_LOOK)
            # A watching session ends by itself on stop (closing its session politely); one still
            # connecting is cancelled, and its `finally` closes the client.
            await asyncio.wait({session}, timeout=2 * STOP_LOOK)
            session.cancel()
            try:
                await session
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the server is away, refuses us, or has none of the nodes
                self._note_failure(exc)
            if self._sessions > sessions:  # it was up: the next outage starts the backoff afresh
                delays = iter(self._backoff)
            if not self._done(stop):
                await self._sleep(next(delays), stop)

    async def _sleep(self, seconds: float, stop: threading.Event) -> None:
        end = self.clock.monotonic() + seconds
        while not self._done(stop) and (left := end - self.clock.monotonic()) > 0:
            await asyncio.sleep(min(STOP_LOOK, left))

    async def _session(self, stop: threading.Event) -> None:
        """Connect, subscribe, watch; return when the session is lost or `stop` is set, raise if it cannot start."""
        self._session_no += 1
        number = self._session_no
        self._lost = None
        client = self._client(number)
        try:
            await self._connect(client)
            points = await self._points(client)
            self._sub, monitored = await self._subscribe(client, points, number)
            self._paused = False
            self._up(monitored)
            await self._watch(client, stop)
        finally:
            self._sub = None
            self._connected = False
            await _close_client(client)

    def _client(self, number: int) -> Client:
        from asyncua import Client

        s = self.settings
        # asyncua >= 2 probes the server itself, every `watchdog_intervall` with that as its timeout, and ends
        # the session when a probe waits behind a loop busy with a burst of notifications: keep its probe rare
        # (it still sees a lost transport at once); `_watch` checks health, and knows a busy session is alive.
        client = Client(s.url, timeout=s.timeout, watchdog_intervall=SESSION_TIMEOUT_MS / 2000)
        client.name = client.description = "tagwriter"
        client.application_uri = s.application_uri
        client.session_timeout = SESSION_TIMEOUT_MS
        if s.username:
            client.set_user(s.username)
            client.set_password(s.password)

        async def lost(exc: Exception) -> None:
            self._lose(f"connection lost ({_describe(exc)})", number)

        client.connection_lost_callback = lost  # asyncua >= 2 tells at once; the health check covers the rest
        return client

    async def _connect(self, client: Client) -> None:
        from asyncua import ua
        from asyncua.crypto import security_policies

        s = self.settings
        bound = 3 * s.timeout  # socket, hello, channel, session, activation: a few requests
        if s.security_mode != "None":
            policy = getattr(security_policies, f"SecurityPolicy{s.security_policy}")
            await asyncio.wait_for(client.set_security(
                policy, s.certificate, s.private_key, s.private_key_password or None,
                s.server_certificate or None, getattr(ua.MessageSecurityMode, s.security_mode),
            ), bound)
        await asyncio.wait_for(client.connect(), bound)

    def _up(self, nodes: int) -> None:
        if self._sessions:
            self._reconnects += 1
        self._sessions += 1
        self._connected = True
        self._detail = f"subscribed to {nodes} nodes"
        down, self._down_since = self._down_since, None
        if down is None:
            log.info("%s: %s", self.name, self._detail)
        else:
            log.info("%s: %s, after %d failed attempts in %.1f s", self.name, self._detail, self._failures,
                     self.clock.monotonic() - down)
        self._failures, self._last_failure = 0, ""

    async def _watch(self, client: Client, stop: threading.Event) -> None:
        """Until `stop`: read the server state every `health_interval`; return once the session is lost."""
        from asyncua import ua

        state = client.get_node(ua.ObjectIds.Server_ServerStatus_State)
        next_check = self.clock.monotonic() + self.settings.health_interval
        while not self._done(stop):
            if self._lost is not None:
                raise SessionLost(self._lost)
            if self.clock.monotonic() >= next_check:
                try:
                    await asyncio.wait_for(state.read_value(), self.settings.timeout)
                except TimeoutError:
                    if not self._busy():
                        raise SessionLost("health check failed (no answer in time)") from None
                except Exception as exc:  # a dead channel, a closed session: all the same here
                    raise SessionLost(f"health check failed ({_describe(exc)})") from None
                next_check = self.clock.monotonic() + self.settings.health_interval
            await asyncio.sleep(STOP_LOOK)

    def _busy(self) -> bool:
        """True if values arrived within the last `timeout`: a check waiting behind them proves nothing dead."""
        last = self._last_message
        return last is not None and self.clock.monotonic() - last < self.settings.timeout

    def _lose(self, why: str, number: int) -> None:
        if number == self._session_no and self._lost is None:
            self._lost = why

    def _note_failure(self, exc: Exception) -> None:
        """Say why a session ended or did not start: each new reason once, its repeats at DEBUG."""
        why = _describe(exc)
        self._detail = why
        if self._down_since is None:
            self._down_since = self.clock.monotonic()
        self._failures += 1
        repeat, self._last_failure = why == self._last_failure, why
        if any(name in why for name in LOGIN_REFUSED):
            log.log(logging.DEBUG if repeat else logging.ERROR,
                    "%s: refused: %s (check opcua.username, opcua.password and the certificates)", self.name, why)
        else:
            # An error of no kind a network or a server causes is a bug: its traceback, once.
            trace = not repeat and not isinstance(exc, (SessionLost, *EXPECTED_ERRORS, *_ua_errors()))
            log.log(logging.DEBUG if repeat else logging.WARNING, "%s: %s; reconnecting", self.name, why,
                    exc_info=exc if trace else None)

    # -- the nodes and their tag names ------------------------------------------

    async def _points(self, client: Client) -> list[Point]:
        """The nodes to monitor this session, with their tag names (computed once per node id per run)."""
        namespaces = await self._namespaces(client)
        ids = [_resolve(n, namespaces) for n in self._node_ids]
        paths: dict[str, list[str]] = {}
        for path in self._browse_paths:
            for node_id, names in await self._browse(client, path):
                paths.setdefault(node_id, names)
        ids += [n for n in paths if n not in ids]
        if not ids:
            raise SessionLost("no numeric variable found under " + ", ".join(self.settings.browse_paths))
        tag_map = {_resolve(k, namespaces): v for k, v in self._tag_map.items()}
        tags: dict[str, str] = {}
        for node_id in ids:
            tag = tag_map.get(node_id) or self._tags.get(node_id)
            if tag is None:
                tag = await self._derived_tag(client, node_id, paths)
                if tag is not None:  # kept for the run: a node keeps its name across reconnects
                    self._tags[node_id] = tag
            tags[node_id] = tag or self.settings.tag_prefix + node_id
        self._settle_collisions(tags, tag_map)
        self._node_of = {tag: node_id for node_id, tag in tags.items()}
        return [Point(n, tags[n]) for n in ids]

    async def _namespaces(self, client: Client) -> list[str]:
        if not any("nsu=" in n for n in (*self._node_ids, *self._tag_map)):
            return []
        return list(await asyncio.wait_for(client.get_namespace_array(), self.settings.timeout))

    async def _derived_tag(self, client: Client, node_id: str, paths: dict[str, list[str]]) -> str | None:
        """The tag name `tag_names` asks for; None when the server cannot say (or says nonsense)."""
        mode, prefix = self.settings.tag_names, self.settings.tag_prefix
        if mode == "node-id":
            return prefix + node_id
        node = client.get_node(node_id)
        try:
            if mode == "display-name":
                text = (await asyncio.wait_for(node.read_display_name(), self.settings.timeout)).Text or ""
            elif node_id in paths:
                text = path_tag(paths[node_id])
            else:
                names = await asyncio.wait_for(node.get_path(MAX_BROWSE_DEPTH, as_string=True), self.settings.timeout)
                text = path_tag([n.partition(":")[2] or n for n in names])
            tag = prefix + text
            check_tag_names((tag,))
        except TimeoutError:
            raise
        except Exception as exc:  # the node may not exist (its items fail below, with the reason)
            log.debug("%s: no %s for %s (%s): named by its node id this session", self.name, mode, node_id, exc)
            return None
        return tag if text else None

    def _settle_collisions(self, names: dict[str, str], tag_map: dict[str, str]) -> None:
        """Two nodes must never write one tag (the later one's rows would be duplicates): rename by node id."""
        owner: dict[str, str] = {}
        for node_id, tag in list(names.items()):
            if owner.setdefault(tag, node_id) != node_id and node_id not in tag_map:
                renamed = self.settings.tag_prefix + node_id
                log.warning("%s: nodes %s and %s would both be tag %r; %s is tag %r (name it in [opcua.tags])",
                            self.name, owner[tag], node_id, tag, node_id, renamed)
                names[node_id] = renamed
                if node_id in self._tags:
                    self._tags[node_id] = renamed
                owner[renamed] = node_id

    async def _browse(self, client: Client, path: list[str]) -> list[tuple[str, list[str]]]:
        """(node id, browse names from Root) of every numeric Variable under `path`, breadth first."""
        from asyncua import ua

        node, names = client.nodes.root, list[str]()
        for element in path:
            node, name = await self._child(node, element, names)
            names.append(name)
        found: list[tuple[str, list[str]]] = []
        if await asyncio.wait_for(node.read_node_class(), self.settings.timeout) == ua.NodeClass.Variable:
            found.append((node.nodeid.to_string(), names))
        seen = {node.nodeid.to_string()}
        level: deque[tuple[Node, list[str], int]] = deque([(node, names, 0)])
        while level and len(seen) < MAX_BROWSE_NODES:
            parent, parent_names, depth = level.popleft()
            for ref in await asyncio.wait_for(parent.get_children_descriptions(), self.settings.timeout):
                child_id = ref.NodeId.to_string()
                if _is_property(ref.ReferenceTypeId) or child_id in seen:
                    continue  # properties (EURange, EngineeringUnits, ...) describe a value, they are none
                seen.add(child_id)
                child_names = [*parent_names, ref.BrowseName.Name]
                if ref.NodeClass == ua.NodeClass.Variable:
                    found.append((child_id, child_names))
                if ref.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable) and depth < MAX_BROWSE_DEPTH:
                    level.append((client.get_node(ref.NodeId), child_names, depth + 1))
        return await self._numeric(client, found, "/".join(path))

    async def _child(self, node: Node, element: str, above: list[str]) -> tuple[Node, str]:
        """The child of `node` whose browse name is `element` ("Name", or "ns:Name" for one namespace)."""
        from asyncua import Node

        ns_text, _, name = element.rpartition(":")
        for ref in await asyncio.wait_for(node.get_children_descriptions(), self.settings.timeout):
            browse = ref.BrowseName
            if browse.Name == name and (not ns_text or str(browse.NamespaceIndex) == ns_text):
                return Node(node.session, ref.NodeId), browse.Name
        where = "/".join(above) or "the Root folder"
        raise SessionLost(f"browse path: no node {element!r} under {where}")

    async def _numeric(self, client: Client, found: list[tuple[str, list[str]]], under: str
                       ) -> list[tuple[str, list[str]]]:
        """The variables of `found` that hold scalar numbers; the rest are logged as skipped."""
        from asyncua import ua

        types = await self._read(client, [n for n, _ in found], ua.AttributeIds.DataType)
        ranks = await self._read(client, [n for n, _ in found], ua.AttributeIds.ValueRank)
        kept, skipped = [], []
        cache: dict[str, bool] = {}
        for (node_id, names), dtype, rank in zip(found, types, ranks, strict=True):
            scalar = rank.Value is None or rank.Value.Value is None or rank.Value.Value < 0
            data_type = dtype.Value.Value if dtype.Value is not None else None
            if scalar and await self._is_number_type(client, data_type, cache):
                kept.append((node_id, names))
            else:
                skipped.append(path_tag(names))
        new = [name for name in skipped if name not in self._skipped]
        if new:
            self._skipped.update(new)
            log.info("%s: not subscribed under %s, no scalar number: %s%s", self.name, under,
                     ", ".join(new[:5]), f" and {len(new) - 5} more" if len(new) > 5 else "")
        return kept

    async def _is_number_type(self, client: Client, data_type: Any, cache: dict[str, bool]) -> bool:
        from asyncua.common.ua_utils import data_type_to_variant_type

        if data_type is None:
            return True  # the server does not say: let the values decide
        if data_type.NamespaceIndex == 0 and data_type.Identifier in NUMERIC_DATA_TYPES:
            return True
        if data_type.NamespaceIndex == 0 and data_type.Identifier in NON_NUMERIC_DATA_TYPES:
            return False
        key = data_type.to_string()
        if key not in cache:
            try:
                variant = await asyncio.wait_for(
                    data_type_to_variant_type(client.get_node(data_type)), self.settings.timeout)
                cache[key] = variant.value in NUMERIC_DATA_TYPES or variant.name == "Variant"
            except TimeoutError:
                raise
            except Exception:  # an odd type tree: let the values decide
                cache[key] = True
        return cache[key]

    async def _read(self, client: Client, node_ids: list[str], attribute: Any) -> list[ua.DataValue]:
        from asyncua import ua

        values: list[ua.DataValue] = []
        for start in range(0, len(node_ids), ITEMS_PER_REQUEST):
            params = ua.ReadParameters()
            params.NodesToRead = [ua.ReadValueId(NodeId=ua.NodeId.from_string(n), AttributeId=attribute)
                                  for n in node_ids[start:start + ITEMS_PER_REQUEST]]
            values += await asyncio.wait_for(client.uaclient.read(params), self.settings.timeout)
        return values

    # -- the subscription --------------------------------------------------------

    async def _subscribe(self, client: Client, points: list[Point], number: int) -> tuple[Any, int]:
        """One subscription with a monitored item per point, and how many items were made.

        Raises SessionLost if no item could be made (the nodes may not exist yet: a later session tries again).
        """
        from asyncua import ua

        s = self.settings
        handles = dict(enumerate(points, start=1))
        sub = await asyncio.wait_for(
            client.create_subscription(self._subscription_params(), _Handler(self, handles, number)), s.timeout)
        made, failed = 0, []
        items = [(h, self._item_request(p.node_id, h)) for h, p in handles.items()]
        for start in range(0, len(items), ITEMS_PER_REQUEST):
            chunk = items[start:start + ITEMS_PER_REQUEST]
            results = await asyncio.wait_for(sub.create_monitored_items([r for _, r in chunk]), s.timeout)
            for (handle, _), result in zip(chunk, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    failed.append(f"{handles[handle].node_id} ({result.name})")
                else:
                    made += 1
        if failed:
            log.warning("%s: %d nodes cannot be monitored: %s%s", self.name, len(failed), ", ".join(failed[:5]),
                        ", ..." if len(failed) > 5 else "")
        if not made:
            raise SessionLost(f"no node could be monitored: {', '.join(failed[:3])}")
        return sub, made

    def _subscription_params(self) -> ua.CreateSubscriptionParameters:
        """Publishing interval; a keep-alive every KEEPALIVE_SECONDS; messages of at most a tenth of max_unsettled."""
        from asyncua import ua

        s = self.settings
        keepalive = max(1, math.ceil(KEEPALIVE_SECONDS / s.publishing_interval))
        return ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=s.publishing_interval * 1000,
            RequestedLifetimeCount=keepalive * LIFETIME_KEEPALIVES, RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=max(1, s.max_unsettled // PUBLISH_SHARE), PublishingEnabled=True, Priority=0,
        )

    def _item_request(self, node_id: str, handle: int) -> ua.MonitoredItemCreateRequest:
        """The MonitoredItemCreateRequest of one node: sampling, queue (oldest dropped), trigger and deadband."""
        from asyncua import ua

        s = self.settings
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = s.sampling_interval * 1000 if s.sampling_interval >= 0 else -1.0
        params.QueueSize = s.queue_size
        params.DiscardOldest = True
        if s.deadband != "none" or s.trigger != "status-value":
            params.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger(TRIGGERS[s.trigger]), DeadbandType=DEADBANDS[s.deadband],
                DeadbandValue=s.deadband_value,
            )
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=ua.NodeId.from_string(node_id), AttributeId=ua.AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

    # -- values in (on the loop) ------------------------------------------------

    def _received(self, point: Point | None, dv: ua.DataValue) -> None:
        self._messages += 1
        if point is None:
            return
        try:
            row = row_of(point, dv, self.settings.timestamp, self.clock)
        except ValueError as exc:
            value = dv.Value.Value if dv.Value is not None else None
            self._held_bad.append((point.where, str(exc), short_repr(value)))
            with self._lock:
                self._bad += 1
            self._flush_soon()
            return
        if dv.StatusCode is not None and overflowed(dv.StatusCode.value):
            self._note_overflow(point)
        held = self._held
        held.append(row)
        if len(held) >= HAND_OVER_ROWS:
            self._flush()
        elif not self._flush_due:
            self._flush_soon()
        if not self._paused and len(self._held) + self._unsettled >= self.settings.max_unsettled:
            self._set_publishing(False)

    def _status_changed(self, code: int, number: int) -> None:
        from asyncua import ua

        if quality_of(code) != GOOD_QUALITY:
            self._lose(f"the server ended the subscription ({ua.StatusCode(ua.UInt32(code)).name})", number)

    def _note_overflow(self, point: Point) -> None:
        self._overflows += 1
        now = self.clock.monotonic()
        if now >= self._next_overflow_log:
            self._next_overflow_log = now + OVERFLOW_LOG_INTERVAL
            log.warning("%s: the server dropped queued values (%d times so far; latest %s): raise opcua.queue_size "
                        "or lower the sampling rate", self.name, self._overflows, point.node_id)

    def _set_publishing(self, on: bool) -> None:
        """Switch publishing of the live subscription off (too much unsettled) or on again."""
        sub = self._sub
        if sub is None:
            return
        self._paused = not on
        log.debug("%s: publishing %s (%d values unsettled)", self.name, "on" if on else "off", self._pending())
        self._spawn(self._publishing(sub, on, self._session_no))

    async def _publishing(self, sub: Any, on: bool, number: int) -> None:
        try:
            await asyncio.wait_for(sub.set_publishing_mode(on), self.settings.timeout)
        except Exception as exc:  # a session that cannot do this is of no use: build a new one
            self._lose(f"cannot switch publishing {'on' if on else 'off'} ({_describe(exc)})", number)

    def _maybe_resume(self) -> None:
        if self._paused and self._pending() <= self.settings.max_unsettled * RESUME_FRACTION:
            self._set_publishing(True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- values out (the worker thread hands them over) ----------------------------

    def _flush_soon(self) -> None:
        """Hand over what is held once the notifications ready now have run (a burst goes out together)."""
        if not self._flush_due and self._loop is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Give what is held to the worker thread, behind what it has already (so in the order received)."""
        self._flush_due = False
        if not self._held and not self._held_bad:
            return
        self._last_message = self.clock.monotonic()  # once per hand-over: the age is for people and `_busy`
        rows, bad = self._held, self._held_bad
        self._held, self._held_bad = [], []
        if self._pipeline_gone or self._worker is None or self._intake is None:
            return  # the pipeline has stopped: nothing takes values any more (said once, in `_handed_over`)
        with self._lock:
            self._unsettled += len(rows)
            self.peak_unsettled = max(self.peak_unsettled, self._unsettled)
        self._worker.submit(self._hand_over, self._intake, rows, bad, self._stop).add_done_callback(
            self._handed_over)

    def _handed_over(self, done: Future[None]) -> None:
        exc = done.exception()
        if exc is None or self._pipeline_gone:
            return
        if isinstance(exc, PipelineStopped):
            log.error("%s: the pipeline has stopped: values received from now on are not kept", self.name)
            self._pipeline_gone = True
        elif self._handover_error is None:
            log.error("%s: handing values over failed", self.name, exc_info=exc)
            self._handover_error = exc

    def _hand_over(self, intake: Intake, rows: list[TagValue], bad: list[BadInput], stop: threading.Event) -> None:
        """Quarantine `bad`, submit `rows` as room allows; on `stop` with no room, spool the rest."""
        if bad:
            intake.quarantine_input(bad)
        step = intake.capacity
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            if not intake.wait_for_room(len(chunk), stop):
                rest = rows[start:]
                intake.spool_rows(rest)  # settled: spooled (or counted as lost by the spool)
                self._count(len(rest))
                self._settled(len(rest))
                log.info("%s: stopped with the buffer full: %d values spooled", self.name, len(rest))
                return
            self._submit(intake, chunk)

    def _submit(self, intake: Intake, rows: list[TagValue]) -> None:
        try:
            receipt = intake.submit(rows)
        except ValueError:  # a row no database can keep (a tag name the server made up): find it
            for row in rows:
                try:
                    intake.submit([row]).on_settled(lambda: self._settled(1))
                    self._count(1)
                except ValueError as exc:
                    self._quarantine_row(intake, row, str(exc))
            return
        self._count(len(rows))
        n = len(rows)
        receipt.on_settled(lambda: self._settled(n))

    def _quarantine_row(self, intake: Intake, row: TagValue, why: str) -> None:
        node_id = self._node_of.get(row.tag, row.tag)
        intake.quarantine_input([(f"{KIND} {node_id}", why, short_repr(row.value))])
        with self._lock:
            self._bad += 1
            self._unsettled -= 1

    def _count(self, submitted: int) -> None:
        with self._lock:
            self._values += submitted

    def _settled(self, n: int) -> None:
        """On whichever thread settled the values: count them, and let the loop resume publishing."""
        with self._lock:
            self._unsettled -= n
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(self._maybe_resume)


class _Handler:
    """asyncua's subscription handler for one session: data changes and status changes, on the loop."""

    def __init__(self, source: OpcUaSource, points: dict[int, Point], number: int) -> None:
        self.source = source
        self.points = points
        self.number = number

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        item = data.monitored_item
        self.source._received(self.points.get(item.ClientHandle), item.Value)

    def status_change_notification(self, status: Any) -> None:
        code = status.Status
        self.source._status_changed(getattr(code, "value", code), self.number)

    def event_notification(self, event: Any) -> None:
        pass  # no event items are created


# -- helpers ------------------------------------------------------------------------


def _ua_errors() -> tuple[type[Exception], ...]:
    from asyncua import ua

    return (ua.UaError,)


def _asyncua() -> Any:
    """The asyncua package; ConfigError naming the extra when it is not installed."""
    try:
        import asyncua
    except ImportError:
        raise ConfigError("the opcua source needs asyncua: pip install '.[opcua]' in the tagwriter checkout") from None
    return asyncua


def _checked_node_id(text: str, key: str) -> str:
    """`text` as asyncua writes the node id (so config spellings compare equal); ConfigError if it is none."""
    from asyncua import ua

    try:
        parsed = ua.NodeId.from_string(text.strip())
        # An nsu= id stays as written (asyncua writes it back in an order it cannot read); the others
        # are normalised so that spellings of one node compare equal.
        return text.strip() if getattr(parsed, "NamespaceUri", None) else str(parsed.to_string())
    except Exception:
        raise ConfigError(f"{key}: {text!r} is not a node id",
                          hint="e.g. ns=2;s=Line1.Temp, ns=3;i=1001 or nsu=urn:plc;s=Temp") from None


def _resolve(node_id: str, namespaces: list[str]) -> str:
    """A node id in the namespace index form: an `nsu=URI` one gets the server's index of that URI."""
    from asyncua import ua

    parsed = ua.NodeId.from_string(node_id)
    uri = getattr(parsed, "NamespaceUri", None)
    if not uri:
        return node_id
    if uri not in namespaces:
        raise SessionLost(f"{node_id}: the server has no namespace {uri!r}")
    return str(ua.NodeId(parsed.Identifier, ua.Int16(namespaces.index(uri)), parsed.NodeIdType).to_string())


def _is_property(reference_type: Any) -> bool:
    """True for a HasProperty reference (namespace 0, i=46)."""
    from asyncua import ua

    return bool(reference_type.NamespaceIndex == 0 and reference_type.Identifier == ua.ObjectIds.HasProperty)


def _describe(exc: BaseException) -> str:
    """One line for the log and the status: the error's kind and text, secrets redacted."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, SessionLost):
        return redact.redact(str(exc))
    text = str(exc) or type(exc).__name__
    return redact.redact(f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text)


async def _close_client(client: Client) -> None:
    """Close the session and the socket within CLOSE_TIMEOUT; a dead server only gets the socket closed."""
    try:
        await asyncio.wait_for(client.disconnect(), CLOSE_TIMEOUT)
    except Exception:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
        raise


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what asyncua left running, then close the loop and its worker threads."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=CLOSE_TIMEOUT))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


"""A TCP fault proxy for tests: sits between a client and a real server and fails on command.

    with FaultProxy(("127.0.0.1", 5432)) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        proxy.refuse()             # nothing listens: connection refused
        proxy.reset()              # accept, then RST; established connections RST too
        proxy.reset_after(4000, only=b"d")   # RST once 4000 bytes of CopyData went through
        proxy.blackhole()          # accept and never answer; established ones freeze
        proxy.latency(0.2)         # delay every chunk, both ways
        proxy.pass_through()       # back to normal

Threads: one accepting, two pumps per connection. Mode changes apply at once
to new and established connections. `only=` counts bytes of PostgreSQL
frontend messages of those types, their 5-byte headers included (the proxy
follows the client's message framing), so a reset can be aimed at the middle
of a COPY, or right after a Sync.

Also here, for the fault-injection suites (tests/test_faults_*.py): the
results table they fill (`FaultRow`, `record`, `write_results`) and their
harness (`TimedSink`, `Feeder`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

from tagwriter.models import PollingData
from tagwriter.pipeline import Pipeline
from tagwriter.sinks.base import WriteResult

LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
TICK = 0.05
PUMP_END = 10.0  # seconds a reset waits for its pump threads to leave select() (one TICK when not loaded)
# Untyped startup-phase requests after which another untyped message follows.
_NEGOTIATION_CODES = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class Mode(StrEnum):
    PASS = "pass"
    REFUSE = "refuse"
    RESET = "reset"
    BLACKHOLE = "blackhole"


@dataclass
class ProxyStats:
    accepted: int = 0
    forwarded: int = 0  # connections bridged to the upstream
    held: int = 0  # accepted in black-hole mode and never answered
    resets: int = 0  # connections ended with RST
    reset_mid_message: bytes = b""  # message type being sent when reset_after fired
    bytes_up: int = 0
    bytes_down: int = 0


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


class _Framer:
    """Follows PostgreSQL frontend message boundaries in the client's byte stream."""

    def __init__(self) -> None:
        self.untyped = True  # the startup phase has no type byte
        self.header = b""
        self.body_head = b""
        self.kind = b""
        self.remaining = 0

    def segments(self, data: bytes) -> list[tuple[bytes, int, int]]:
        """(message type, start, end) runs of `data`; b"" for the startup phase."""
        out: list[tuple[bytes, int, int]] = []
        i, n = 0, len(data)
        while i < n:
            if self.remaining == 0:
                size = 4 if self.untyped else 5
                take = min(size - len(self.header), n - i)
                self.header += data[i:i + take]
                # A typed message's header counts as part of it (Sync has nothing else).
                out.append((b"" if self.untyped else self.header[:1], i, i + take))
                i += take
                if len(self.header) == size:
                    if self.untyped:
                        self.kind, length = b"", int.from_bytes(self.header[:4], "big")
                    else:
                        self.kind, length = self.header[:1], int.from_bytes(self.header[1:5], "big")
                    self.header, self.body_head = b"", b""
                    self.remaining = max(0, length - 4)
                    if self.remaining == 0:
                        self._message_done()
                continue
            take = min(self.remaining, n - i)
            if self.untyped and len(self.body_head) < 4:
                self.body_head += data[i:i + min(take, 4 - len(self.body_head))]
            out.append((self.kind, i, i + take))
            i += take
            self.remaining -= take
            if self.remaining == 0:
                self._message_done()
        return out

    def _message_done(self) -> None:
        if self.untyped:
            code = int.from_bytes(self.body_head[:4], "big") if len(self.body_head) >= 4 else 0
            self.untyped = code in _NEGOTIATION_CODES


class _Link:
    """One accepted client connection and (unless held) its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.framer = _Framer()
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []

    def start(self) -> None:
        assert self.upstream is not None
        for src, dst, up in ((self.client, self.upstream, True), (self.upstream, self.client, False)):
            pump = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True,
                                    name=f"faultproxy-{'up' if up else 'down'}")
            self._pumps.append(pump)
            pump.start()

    def reset(self) -> None:
        """RST both sides; returns once the RSTs are sent.

        close() alone does not send them while a pump thread is inside select() on the socket: the
        kernel keeps the socket until that call returns (up to TICK, far longer on a loaded machine),
        and meanwhile the server still takes the connection as alive and sends into it (an MQTT
        broker then redelivers those messages marked DUP). So wait for the pumps to end."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        _rst(self.client)
        if self.upstream is not None:
            _rst(self.upstream)
        for pump in self._pumps:
            if pump is not threading.current_thread():
                pump.join(PUMP_END)
        self.proxy._count_reset()

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        proxy = self.proxy
        try:
            while not self.closed.is_set():
                if proxy.frozen:
                    self.closed.wait(TICK)
                    continue
                ready, _, _ = select.select([src], [], [], TICK)
                if not ready or self.closed.is_set():
                    continue
                if proxy.frozen:
                    continue  # the data stays unread: nothing answers
                data = src.recv(65536)
                if not data:
                    self.close()
                    return
                delay = proxy.delay
                if delay > 0 and self.closed.wait(delay):
                    return
                if up:
                    cut = proxy._budget_cut(self.framer, data)
                    if cut is not None:
                        with contextlib.suppress(OSError):
                            dst.sendall(data[:cut])
                        self.reset()
                        return
                dst.sendall(data)
                proxy._count_bytes(len(data), up)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            self.close()


class FaultProxy:
    """Listens on 127.0.0.1:ephemeral and forwards to `upstream`, failing on command. Thread-safe."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.mode = Mode.PASS
        self.delay = 0.0
        self.frozen = False
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._held: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._budget: int | None = None
        self._budget_size = 0
        self._budget_times = 0
        self._budget_only: bytes = b""

    # -- life cycle --------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._close_listener()
        self._drop_all(reset=False)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- modes -------------------------------------------------------------

    def pass_through(self) -> None:
        """Forward everything; frozen connections resume, held ones are closed."""
        with self._lock:
            self.mode = Mode.PASS
            self.frozen = False
            self.delay = 0.0
            held, self._held = self._held, []
        for s in held:
            _rst(s)
        self._listen()

    def refuse(self, *, reset_existing: bool = True) -> None:
        """Stop listening (new connections are refused); by default RST the established ones too."""
        with self._lock:
            self.mode = Mode.REFUSE
            self.frozen = False
        self._close_listener()
        if reset_existing:
            self._drop_all(reset=True)

    def reset(self) -> None:
        """Accept and RST at once; RST every established connection."""
        with self._lock:
            self.mode = Mode.RESET
            self.frozen = False
        self._listen()
        self._drop_all(reset=True)

    def blackhole(self, *, freeze_existing: bool = True) -> None:
        """Accept and never answer; established connections stop moving data both ways."""
        with self._lock:
            self.mode = Mode.BLACKHOLE
            self.frozen = freeze_existing
        self._listen()

    def latency(self, seconds: float) -> None:
        """Pass through, delaying every chunk by `seconds` in each direction."""
        with self._lock:
            self.mode = Mode.PASS
            self.frozen = False
            self.delay = seconds
        self._listen()

    def reset_after(self, n_bytes: int, *, only: bytes = b"", times: int = 1) -> None:
        """RST the connection carrying the client's byte that exhausts `n_bytes`, `times` times.

        `only`: count only bytes of frontend messages of these types (b"d" = CopyData).
        """
        with self._lock:
            self._budget = self._budget_size = n_bytes
            self._budget_times = times
            self._budget_only = only

    @property
    def resets_pending(self) -> int:
        with self._lock:
            return self._budget_times if self._budget is not None else 0

    def connections(self) -> int:
        with self._lock:
            self._links = [link for link in self._links if not link.closed.is_set()]
            return len(self._links) + len(self._held)

    # -- internals ---------------------------------------------------------

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.settimeout(TICK)
            self.port = sock.getsockname()[1]
            self._listener = sock

    def _close_listener(self) -> None:
        with self._lock:
            sock, self._listener = self._listener, None
        if sock is not None:
            # Connections still in the backlog get RST when the socket closes.
            with contextlib.suppress(OSError):
                sock.close()

    def _drop_all(self, *, reset: bool) -> None:
        with self._lock:
            links, self._links = self._links, []
            held, self._held = self._held, []
        for link in links:
            if reset:
                link.reset()
            else:
                link.close()
        for s in held:
            _rst(s)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                self._stop.wait(TICK)
                continue
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                self._stop.wait(TICK)  # closed under us by refuse()
                continue
            client.settimeout(None)
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            self.stats.accepted += 1
            mode = self.mode
        if mode is Mode.BLACKHOLE:
            with self._lock:
                self._held.append(client)
                self.stats.held += 1
            return
        if mode is not Mode.PASS:
            _rst(client)
            self._count_reset()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
            upstream.settimeout(None)
        except OSError:
            _rst(client)
            self._count_reset()
            return
        link = _Link(self, client, upstream)
        with self._lock:
            self._links.append(link)
            self.stats.forwarded += 1
        link.start()

    def _count_reset(self) -> None:
        with self._lock:
            self.stats.resets += 1

    def _count_bytes(self, n: int, up: bool) -> None:
        with self._lock:
            if up:
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n

    def _budget_cut(self, framer: _Framer, data: bytes) -> int | None:
        """Where to cut `data` for an armed reset_after, or None to send it all."""
        segments = framer.segments(data)
        with self._lock:
            if self._budget is None:
                return None
            for kind, start, end in segments:
                if self._budget_only and kind not in self._budget_only:
                    continue
                if kind == b"" and self._budget_only:
                    continue
                size = end - start
                if size < self._budget:
                    self._budget -= size
                    continue
                cut = start + self._budget
                self.stats.reset_mid_message = kind
                self._budget_times -= 1
                self._budget = self._budget_size if self._budget_times > 0 else None
                return cut
            return None


# -- the fault suite's results table --------------------------------------------------


@dataclass
class FaultRow:
    """One scenario's figures for the report table. `lost` must be 0."""

    scenario: str
    sink: str
    submitted: int
    written: int
    duplicates: int
    lost: int
    longest_stall: float  # seconds: the longest single sink call (or stop) of the scenario
    stall_call: str = ""
    submit_max: float = 0.0
    notes: str = ""


RESULTS: list[FaultRow] = []


def record(row: FaultRow) -> None:
    RESULTS.append(row)


def results_table(rows: list[FaultRow]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| scenario | sink | submitted | written | duplicates | lost | longest stall | submit max | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.sink} | {r.submitted} | {r.written} | {r.duplicates} | {r.lost} | "
            f"{r.longest_stall:.2f} s ({r.stall_call}) | {r.submit_max * 1000:.1f} ms | {r.notes} |"
        )
    return "\n".join(lines) + "\n"


def write_results(path: str, sink: str) -> str:
    """Write (append to) `path` the rows recorded for `sink`; returns the table text."""
    rows = [r for r in RESULTS if r.sink == sink]
    text = results_table(rows) if rows else ""
    if text:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"\n{sink}:\n\n{text}")
    return text


# -- the fault suite's harness: a timed sink and a paced producer -----------------------

T0 = 1_700_000_000.0  # epoch seconds of the first poll a Feeder submits
Values = dict[tuple[str, int], float | None]  # (tag, ts_us) -> value


class TimedSink:
    """The real sink, each call timed: `longest` is the longest any one call blocked its caller."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.longest = 0.0
        self.longest_call = ""
        self._lock = threading.Lock()

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return call()
        finally:
            took = time.monotonic() - started
            with self._lock:
                if took > self.longest:
                    self.longest, self.longest_call = took, name

    def open(self) -> None:
        self._timed("open", self.inner.open)

    def write_batch(self, rows: Any) -> WriteResult:
        result: WriteResult = self._timed("write_batch", lambda: self.inner.write_batch(rows))
        return result

    def probe(self) -> None:
        self._timed("probe", self.inner.probe)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return str(self.inner.describe())


class Feeder:
    """Submits polls of `tags` values every `interval` s on its own thread; remembers every value."""

    def __init__(self, pipeline: Pipeline, *, tags: int = 50, interval: float = 0.02, start: int = 0,
                 prefix: str = "g") -> None:
        self.pipeline = pipeline
        self.tags = tags
        self.interval = interval
        self.k = start
        self.prefix = prefix
        self.values: Values = {}
        self.submit_max = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def poll(self) -> PollingData:
        k = self.k
        self.k += 1
        return PollingData(self.prefix, T0 + k * 0.001,
                           {f"{self.prefix}.t{j:03d}": k + j / 1000 for j in range(self.tags)})

    def submit_one(self) -> None:
        poll = self.poll()
        started = time.monotonic()
        self.pipeline.submit(poll)
        self.submit_max = max(self.submit_max, time.monotonic() - started)
        for row in poll.rows():
            self.values[(row.tag, row.ts_us)] = row.value

    def submit_many(self, polls: int) -> None:
        for _ in range(polls):
            self.submit_one()

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.submit_one()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(10)
            assert not self._thread.is_alive()


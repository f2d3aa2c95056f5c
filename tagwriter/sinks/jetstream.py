"""JetStream sink: an edge gateway publishes each writer batch as one message to a stream.

    database.url = "nats://10.0.0.5:4222,10.0.0.6:4222,10.0.0.7:4222/PLANT/PLANT.edge1"

A batch counts as written only when JetStream has acknowledged it (a PubAck:
the message is stored, on every replica the stream asks for). Everything else
is as for a database: a timeout, no responders (no stream answered), a lost
connection or a full stream is a TransientError, so the writer retries, goes
into outage mode, spools, and replays when the probe finds the stream again;
with `buffer.durability = "disk"` the values wait in the durable queue first.

Each message is `Tagwriter-Format: batch/1` (tagwriter/batchformat.py) with
`Nats-Msg-Id` = a hash of its rows: JetStream stores a retried batch once
within its duplicate window (the PubAck then says `duplicate`, counted as
duplicates here) and the (tag, ts) key downstream absorbs whatever comes
twice after it. `Nats-Expected-Stream` makes the server refuse the message if
the subject belongs to another stream (a FatalError: a configuration matter).
A batch larger than the server's max_payload (or the stream's max_msg_size)
goes as several messages, halved until each fits.

nats-py is asyncio: the sink owns one event loop on one long-lived daemon
thread, started on first use; `write_batch`, `open` and `probe` (from the
writer and probe threads) submit coroutines to it and wait on the future with
`database.call_timeout` (connects with `connect_timeout`), so no call blocks
longer than configured. nats-py reconnects by itself; while it does, a write
fails at once instead of queueing in the client's buffer, where it could be
sent minutes later. Anything that could not be acknowledged is retried with
the same message id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tagwriter.batchformat import FORMAT, encode_batch
from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError, FatalError, RowError, SinkError, TransientError
from tagwriter.models import TagValue
from tagwriter.redact import redact, register
from tagwriter.sinks.base import WriteResult

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.api import StreamInfo
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)

T = TypeVar("T")

MISSING_EXTRA = "the jetstream sink needs nats-py: pip install '.[nats]' in the tagwriter checkout"
FORMAT_HEADER = "Tagwriter-Format"
MSG_ID_HEADER = "Nats-Msg-Id"
RECONNECT_WAIT = 1.0  # seconds between nats-py's reconnect attempts
PING_INTERVAL = 5  # seconds; with MAX_PINGS_OUT a silent (half-open) link is noticed within ~15 s
MAX_PINGS_OUT = 2
CLOSE_TIMEOUT = 2.0  # seconds for closing the connection and the loop
MARGIN = 0.5  # seconds the caller waits beyond a call's own timeout, so the call's error (clearer) comes first
HEADER_ROOM = 512  # bytes of a message's size left for its subject and headers
SETUP_HINT = "create it with `tagwriter init-db` (defaults) or `tagwriter jetstream setup`"

# JetStream API error codes (nats-server's errors.json) that no retry can fix.
EXPECTED_STREAM_MISMATCH = 10060  # the subject is another stream's
MESSAGE_TOO_LARGE = 10054  # the stream's max_msg_size
STREAM_NOT_FOUND = 10059
AUTH_REFUSED = "authorization violation"  # the server's -ERR for a wrong user, password or token


def import_nats() -> Any:
    """The nats package, or ConfigError naming the extra."""
    try:
        import nats
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return nats


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject `pattern` (with `*` and `>` wildcards) takes `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


# -- the loop thread ------------------------------------------------------------


class LoopThread:
    """One asyncio event loop on a daemon thread, started on first use; `run` waits for a coroutine with a bound.

    Thread-safe: any thread may `run`; the coroutines run one loop, so nats-py sees one thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        """The coroutine's result or exception; TransientError(TIMEOUT) if it is not done within `timeout`.

        At the deadline the coroutine is cancelled and left to unwind on the loop.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self._running_loop())
        done, _ = concurrent.futures.wait([future], max(0.0, timeout))
        if not done:
            future.cancel()
            raise TransientError(f"{what}: no answer within {timeout:g} s", code="TIMEOUT")
        return future.result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def stop(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the loop and its thread (waits up to `timeout`); a later `run` starts a new one."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


# -- connecting -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsLogin:
    """Where and as whom to connect: server URLs, user and password or a token, TLS. No secret in repr."""

    servers: tuple[str, ...]
    user: str = ""
    password: str = ""
    token: str = ""
    tls: ssl.SSLContext | None = None
    tls_hostname: str = ""

    def __repr__(self) -> str:
        return f"NatsLogin(servers={self.servers!r}, user={self.user!r})"


async def connect(login: NatsLogin, *, name: str, connect_timeout: float,
                  reconnect_wait: float = RECONNECT_WAIT, on_state: Callable[[str], None] | None = None) -> Client:
    """A connected nats-py client that reconnects by itself for ever once connected.

    The first connect is bounded by `connect_timeout` for each server; a refused
    authorisation is a FatalError, no answer a TransientError.
    """
    nats = import_nats()
    nc = nats.NATS()
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    say = on_state or (lambda text: None)
    last_error: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        last_error[:] = [text]
        denied = isinstance(exc, nats.errors.AuthorizationError) or AUTH_REFUSED in str(exc).lower()
        if denied and not refused.done():
            refused.set_result(text)
        say(redact(text))

    async def on_disconnected() -> None:
        say("disconnected; reconnecting")

    async def on_reconnected() -> None:
        say("reconnected")

    options: dict[str, Any] = {
        "servers": list(login.servers), "name": name, "connect_timeout": connect_timeout,
        "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": reconnect_wait,
        "ping_interval": PING_INTERVAL, "max_outstanding_pings": MAX_PINGS_OUT,
        "error_cb": on_error, "disconnected_cb": on_disconnected, "reconnected_cb": on_reconnected,
    }
    if login.user:
        options.update(user=login.user, password=login.password)
    if login.token:
        options["token"] = login.token
    if login.tls is not None:
        options["tls"] = login.tls
        if login.tls_hostname:
            options["tls_hostname"] = login.tls_hostname
    where = ", ".join(login.servers)
    task = asyncio.ensure_future(nc.connect(**options))
    # nats-py retries unreachable servers, and a refusal, for ever: the deadline and `refused` end that.
    await asyncio.wait({task, refused}, timeout=connect_timeout * len(login.servers),
                       return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not refused.done():
        try:
            task.result()
            return nc
        except (OSError, nats.errors.Error) as exc:  # TimeoutError is an OSError
            await close_quietly(nc)
            raise TransientError(f"connect to {where}: {type(exc).__name__}: {exc}") from None
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await close_quietly(nc)
    if refused.done():
        raise FatalError(f"connect to {where}: the server refused the authorisation ({refused.result()})",
                         code="AUTH", hint="check the user and password (database.user/password) or token")
    why = f"last error {last_error[0]}" if last_error else f"no server answered within {connect_timeout:g} s each"
    raise TransientError(f"connect to {where}: not connected ({why})", code="NATS-CONNECT",
                         hint="is nats-server running and reachable on that address?")


async def close_quietly(nc: Client) -> None:
    """Flush what is buffered and close, bounded; never raises."""
    with contextlib.suppress(BaseException):
        if nc.is_connected:
            await asyncio.wait_for(nc.flush(), CLOSE_TIMEOUT)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)


def classify(exc: BaseException, where: str) -> SinkError:
    """A nats-py error as TransientError (retry later) or FatalError (a configuration matter)."""
    nats = import_nats()
    js_errors = nats.js.errors
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, js_errors.APIError):
        text = f"{where}: {exc.description} (JetStream error {exc.err_code})"
        code = f"JS-{exc.err_code or exc.code}"
        if exc.err_code == EXPECTED_STREAM_MISMATCH:
            return FatalError(text, code=code, hint="the subject is another stream's: pick a subject of this stream")
        if exc.err_code == STREAM_NOT_FOUND:
            return FatalError(text, code=code, hint=SETUP_HINT)
        return TransientError(text, code=code)  # full (discard new), no quorum, leader election, ...
    if isinstance(exc, js_errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return TransientError(f"{where}: no stream answered (no responders): JetStream is unavailable here, "
                              "or no stream takes this subject", code="NO_RESPONDERS", hint=SETUP_HINT)
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is one
        return TransientError(f"{where}: no answer within the call timeout", code="TIMEOUT")
    return TransientError(f"{where}: {type(exc).__name__}: {exc}", code="NATS")


def check_stream(info: StreamInfo, stream: str, subject: str) -> None:
    """Raise FatalError unless the stream `info` describes takes `subject`."""
    subjects = info.config.subjects or []
    if not any(subject_matches(p, subject) for p in subjects):
        raise FatalError(f"stream {stream} does not take subject {subject} (its subjects: "
                         f"{', '.join(subjects) or 'none'})", code="SUBJECT",
                         hint="publish on one of its subjects, or add this one (`nats stream edit`)")


# -- a session ------------------------------------------------------------------


class NatsSession:
    """One NATS connection on its own loop thread, made on first use; every call bounded. Thread-safe.

    `run(fn, what)` runs `fn(js)` on the loop with the connected JetStream context and
    waits at most `connect_timeout` per server plus `call_timeout` (or `timeout`, for a
    call of several requests or one that must end sooner); errors come out as
    TransientError or FatalError (`classify`). While nats-py reconnects, a call fails at
    once (TransientError) rather than queue in the client's buffer.
    """

    def __init__(self, login: NatsLogin, *, connect_timeout: float, call_timeout: float, name: str,
                 describe: str = "") -> None:
        self.login = login
        self.connect_timeout, self.call_timeout = connect_timeout, call_timeout
        self.client_name = name
        self.target = describe or ", ".join(login.servers)
        self.state = "not connected"  # the connection's last state change, for logs and checks
        self._loop = LoopThread(f"{name}-loop")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting: asyncio.Lock | None = None

    @property
    def bound(self) -> float:
        """Seconds a call may take at most: connecting (each server in turn) plus the call."""
        return self.connect_timeout * len(self.login.servers) + self.call_timeout + MARGIN

    def run(self, fn: Callable[[JetStreamContext], Coroutine[Any, Any, T]], what: str,
            *, timeout: float | None = None) -> T:
        where = f"{what} {self.target}"
        bound = self.bound if timeout is None else timeout

        async def go() -> T:
            return await fn(await self.connected())
        try:
            return self._loop.run(go(), bound + MARGIN, where)
        except SinkError:
            raise
        except Exception as exc:
            raise classify(exc, where) from None

    @property
    def client(self) -> Client:
        """The connected client (after a `run`); for its server info, max_payload and rtt."""
        if self._nc is None:
            raise TransientError(f"not connected to {self.target}")
        return self._nc

    @property
    def server_info(self) -> dict[str, Any]:
        """The INFO the connected server sent (version, jetstream, cluster, connect_urls, max_payload).

        nats-py keeps it in `_server_info`: there is no public accessor for the cluster fields.
        """
        return dict(self.client._server_info)

    def close(self) -> None:
        """Flush, close the connection and stop the loop, bounded; never raises."""
        self.state = "closed"  # what nats-py reports from here on is the close itself
        nc, self._nc, self._js = self._nc, None, None
        if self._loop.started and nc is not None:
            with contextlib.suppress(Exception):
                self._loop.run(close_quietly(nc), CLOSE_TIMEOUT * 2, "close")
        self._loop.stop()
        self._connecting = None

    def _say(self, state: str) -> None:
        if self.state == "closed":
            return
        if state != self.state:
            log.info("jetstream %s: %s", self.target, state)
        self.state = state

    async def connected(self) -> JetStreamContext:
        """On the loop: the JetStream context of a connected client; TransientError while nats-py reconnects."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()  # made on the loop it serves
        async with self._connecting:  # two threads' calls may both find no connection
            nc = self._nc
            if nc is None or nc.is_closed:
                self._nc = self._js = None
                self.state = "connecting"
                nc = await connect(self.login, name=self.client_name, connect_timeout=self.connect_timeout,
                                   on_state=self._say)
                self._nc, self._js = nc, nc.jetstream(timeout=self.call_timeout)
                self._say(f"connected to {nc.connected_url.netloc if nc.connected_url else '?'}")
        if not nc.is_connected:
            # Never publish into nats-py's buffer while it reconnects: that batch would go out later,
            # long after it was retried or spooled here.
            raise TransientError(f"not connected to NATS ({self.state})", code="NATS-RECONNECTING")
        assert self._js is not None
        return self._js


def reach(servers: Sequence[str], timeout: float) -> str:
    """A TCP connection to the first server that takes one (no NATS protocol); returns host:port."""
    errors = []
    for server in servers:
        host, _, port = server.partition("://")[2].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return f"{host}:{port}"
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    raise TransientError(f"cannot reach {'; '.join(errors)}", hint="is nats-server running and listening there?")


# -- the sink -------------------------------------------------------------------


class JetStreamSink:
    """Publishes batches to a JetStream stream. `write_batch`/`open` from one thread, `probe` from another."""

    kind = "jetstream"

    def __init__(self, *, servers: Sequence[str], stream: str, subject: str, user: str = "",
                 password: str = "", connect_timeout: float = 5.0, call_timeout: float = 10.0,
                 name: str = "tagwriter-edge") -> None:
        self._nats = import_nats()
        register(password)
        tls = ssl.create_default_context() if any(s.lower().startswith("tls://") for s in servers) else None
        # A password without a user is a token (NATS's `authorization { token: ... }`).
        login = NatsLogin(tuple(servers), user=user, password=password if user else "",
                          token="" if user else password, tls=tls)
        self.stream, self.subject = stream, subject
        self.call_timeout = call_timeout
        self.session = NatsSession(login, connect_timeout=connect_timeout, call_timeout=call_timeout,
                                   name=name, describe=self._describe(login))
        self._max_message = 0  # bytes a message may have (the server's max_payload, the stream's max_msg_size)

    @classmethod
    def from_config(cls, config: DatabaseConfig) -> JetStreamSink:
        url = parse_url(config.url)
        return cls(servers=url.servers, stream=url.name, subject=url.subject, user=config.user or url.user,
                   password=config.password or url.password, connect_timeout=config.connect_timeout,
                   call_timeout=config.call_timeout)

    def _describe(self, login: NatsLogin) -> str:
        user = f"{login.user}@" if login.user else ""
        scheme = login.servers[0].partition("://")[0]
        hosts = ",".join(s.partition("://")[2] for s in login.servers)
        return f"{scheme}://{user}{hosts}/{self.stream}/{self.subject}"

    def describe(self) -> str:
        return self.session.target

    # -- Sink ------------------------------------------------------------

    def open(self) -> None:
        """Connect (if not connected) and check that the stream takes the subject."""
        self.session.run(self._check, "open")

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        """Publish the rows as one message (more if too large) and wait for JetStream's PubAck."""
        if not rows:
            return WriteResult(0)
        return self.session.run(lambda js: self._write(js, rows), "publish")

    def probe(self) -> None:
        """The stream answers and takes the subject (connecting again if the connection was closed)."""
        self.session.run(self._check, "probe")

    def close(self) -> None:
        self.session.close()

    def stream_info(self, timeout: float | None = None) -> StreamInfo | None:
        """The stream's info, or None if there is no such stream."""
        return self.session.run(self._stream_info, "stream info", timeout=timeout)

    # -- on the loop -------------------------------------------------------

    async def _stream_info(self, js: JetStreamContext) -> StreamInfo | None:
        try:
            return await js.stream_info(self.stream)
        except self._nats.js.errors.NotFoundError:
            return None

    async def _check(self, js: JetStreamContext) -> None:
        info = await self._stream_info(js)
        if info is None:
            raise FatalError(f"stream {self.stream} does not exist", code="STREAM_MISSING", hint=SETUP_HINT)
        check_stream(info, self.stream, self.subject)
        payload = self.session.client.max_payload
        limit = info.config.max_msg_size or -1
        self._max_message = min(payload, limit if limit > 0 else payload) - HEADER_ROOM

    async def _write(self, js: JetStreamContext, rows: Sequence[TagValue]) -> WriteResult:
        if not self._max_message:
            await self._check(js)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.call_timeout  # for all the messages of the batch together
        result = WriteResult(0)
        pending = [(0, len(rows))]
        while pending:
            lo, hi = pending.pop()
            payload, msg_id = encode_batch(rows[lo:hi])
            if len(payload) > self._max_message:
                if hi - lo == 1:
                    result.rejected.append(RowError(lo, f"JS-{MESSAGE_TOO_LARGE}",
                                                    f"one value makes a message of {len(payload)} bytes, more "
                                                    f"than the {self._max_message} a message may have here"))
                    continue
                mid = (lo + hi) // 2
                pending += [(mid, hi), (lo, mid)]
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransientError(f"publish: no PubAck within {self.call_timeout:g} s", code="TIMEOUT")
            headers = {FORMAT_HEADER: FORMAT, MSG_ID_HEADER: msg_id}
            ack = await js.publish(self.subject, payload, timeout=remaining, stream=self.stream, headers=headers)
            if ack.duplicate:
                result.duplicates += hi - lo
            else:
                result.written += hi - lo
        return result

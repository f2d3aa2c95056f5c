"""NATS JetStream source: a durable pull consumer, each message acknowledged only once its values are settled.

    source = JetStreamSource(JetStreamConfig(stream="PLANT", subject="plant.>"), writer_batch_size=500)
    Service(config, source).run(stop)

The source fetches batches of messages from a durable pull consumer, decodes
them (`decode_message`), hands their values to the pipeline in one submit per
fetch, and acknowledges each message (`+ACK`) only when the receipt of that
submit says the values are settled: durable in the disk queue, or written or
spooled in memory mode. Until then the messages count against the consumer's
`max_ack_pending`, which is the back-pressure: a writer that cannot keep up is
sent nothing more. Messages held longer than half of `ack_wait` are told to
JetStream as in progress (`+WPI`), so a slow settle is not redelivered; a
writer that dies leaves its messages unacknowledged and JetStream redelivers
them after `ack_wait` (to any writer on the same durable: N tagwriter
processes on one durable share the work). A redelivered value is a duplicate
of the (tag, ts) key, counted, never a failure.

Payloads (`Tagwriter-Format` header absent or "json"): one value
`{"tag": ..., "ts": ..., "value": ..., "quality": ...}`, a polling group
`{"group": ..., "ts": ..., "values": {tag: value, ...}, "quality": ...}`, or
an array of either. `ts` is ISO-8601 text or epoch seconds, `value` a number
or null, `quality` optional (192). `Tagwriter-Format: batch/1` is one writer
batch of an edge gateway's JetStream sink (tagwriter/batchformat.py). A message that cannot be taken whole is
quarantined with `where` = "nats <subject> seq <stream sequence>" and its raw
payload, then terminated (`+TERM`): the server stops redelivering it (as an
ack would) and publishes a MSG_TERMINATED advisory, so the poison message is
visible on the JetStream side too. If the quarantine cannot be written the
message is left unacknowledged, to come back after `ack_wait`.

The consumer is created if missing (`consumer = "create"`) or used as it is
(`"bind"`); an existing consumer is never changed: settings that differ are
reported and the run ends (InputError). nats-py runs on its own asyncio loop
on the source thread; decoding and submitting run on one helper thread so
that waiting for room in the buffer never stalls the loop (acks, pings).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tagwriter.backoff import Backoff
from tagwriter.batchformat import FORMAT as BATCH_FORMAT
from tagwriter.batchformat import decode_batch
from tagwriter.config import JetStreamConfig
from tagwriter.errors import ConfigError, InputError, PipelineStopped
from tagwriter.intake import BadInput, Intake
from tagwriter.models import GOOD_QUALITY, TagValue, check_tag_names, short_repr, to_epoch_us
from tagwriter.redact import redact, redact_url, register, url_passwords
from tagwriter.settle import SETTLED, Receipt
from tagwriter.sources.base import SourceStatus
from tagwriter.sources.files import BadLineLog, _finite, _quality, _tag, _ts
from tagwriter.spoolformat import visible

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerConfig, ConsumerInfo
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)

T = TypeVar("T")

KIND = "jetstream"
MISSING_EXTRA = "the jetstream source needs nats-py: pip install '.[nats]' in the tagwriter checkout"
FORMAT_HEADER = "Tagwriter-Format"  # names the payload format; absent = "json"
ACK, NAK, TERM, PROGRESS = b"+ACK", b"-NAK", b"+TERM", b"+WPI"
STOP_LOOK = 0.05  # seconds between looks at the stop event from the loop
SETTLE_GRACE = 0.5  # seconds a stopping source waits for held values to settle, to ack them
CLOSE_TIMEOUT = 1.0  # seconds for the last flush of acks, and for closing the connection
API_TIMEOUT = 5.0  # seconds any JetStream API request (consumer info, create) may take
PING_INTERVAL = 10  # seconds: a silent (half-open) connection is noticed within about two of these
CONSUMER_CHECK = 10.0  # seconds of empty fetches between looks at the consumer (deleted? lag)
SESSION_RETRY_CAP = 30.0  # seconds: a lost session is retried doubling from reconnect_wait up to this
MIN_PROGRESS_EVERY = 0.05  # seconds: the in-progress check never runs more often
PENDING_BYTES = 8 * 1024 * 1024  # nats-py's outgoing buffer: acks made while disconnected wait here
STREAM_NOT_FOUND = 10059  # the JetStream API's error code (nats-server's errors.json)
NAME_CHARS_REFUSED = frozenset(" \t\r\n.*>/\\")
AUTH_REFUSED = "authorization violation"  # the server's -ERR for a wrong user, password or token


def check_settings(s: JetStreamConfig) -> list[str]:
    """The server URLs of `s`; raises ConfigError naming the key. Registers the secrets for redaction."""
    register(s.password, s.token, *(p for url in s.servers.split(",") for p in url_passwords(url.strip())))
    servers = [url.strip() for url in s.servers.split(",") if url.strip()]
    if not servers:
        raise ConfigError("jetstream.servers = '': name at least one server, e.g. nats://127.0.0.1:4222")
    for key in ("stream", "durable"):
        name = getattr(s, key)
        if not name or NAME_CHARS_REFUSED & set(name):
            raise ConfigError(f"jetstream.{key} = {name!r}: must be a name without spaces, '.', '*', '>' or slashes")
    if s.token and (s.user or s.password):
        raise ConfigError("jetstream.token: set either a token or user and password, not both")
    if s.password and not s.user:
        raise ConfigError("jetstream.password: needs jetstream.user")
    if s.tls_key_file and not s.tls_cert_file:
        raise ConfigError("jetstream.tls_key_file: needs jetstream.tls_cert_file")
    return servers


def tls_context(s: JetStreamConfig, servers: Sequence[str]) -> ssl.SSLContext | None:
    """The TLS context the settings ask for (a tls:// URL or any tls_* file), else None; ConfigError if unusable."""
    wanted = s.tls_ca_file or s.tls_cert_file or any(url.lower().startswith("tls://") for url in servers)
    if not wanted:
        return None
    try:
        context = ssl.create_default_context(cafile=s.tls_ca_file or None)
        if s.tls_cert_file:
            context.load_cert_chain(s.tls_cert_file, s.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"jetstream TLS files: cannot be used: {exc}",
                          hint="check tls_ca_file, tls_cert_file and tls_key_file") from None
    return context


def _import_nats() -> Any:
    try:
        import nats
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return nats


# -- payloads -------------------------------------------------------------------


def decode_message(data: bytes, headers: Mapping[str, str] | None = None) -> list[TagValue]:
    """The rows of one message, held to the rules `Intake.submit` checks (so their submit never raises ValueError);
    raises ValueError with the reason.

    The format comes from the `Tagwriter-Format` header (absent: "json").
    """
    kind = (headers or {}).get(FORMAT_HEADER, "json")
    decoder = DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"payload format {short_repr(kind)} is not one this tagwriter reads ({', '.join(DECODERS)})")
    return decoder(data)


def decode_json(data: bytes) -> list[TagValue]:
    """A JSON value object, polling group, or an array of them, as rows; raises ValueError with the reason."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("not JSON tagwriter can read: nested too deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"not JSON tagwriter can read: {exc}") from None
    if not isinstance(obj, list):
        return _object_rows(obj)
    if not obj:
        raise ValueError("an empty JSON array")
    rows: list[TagValue] = []
    for number, item in enumerate(obj, 1):
        try:
            rows.extend(_object_rows(item))
        except ValueError as exc:
            raise ValueError(f"item {number}: {exc}") from None
    return rows


#: Payload formats by their `Tagwriter-Format` name; batch/1 is what an edge's JetStream sink publishes.
DECODERS: dict[str, Callable[[bytes], list[TagValue]]] = {"json": decode_json, BATCH_FORMAT: decode_batch}


def _object_rows(obj: Any) -> list[TagValue]:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "values" in obj:
        return _group_rows(obj)
    if "tag" in obj:
        for key in ("ts", "value"):
            if key not in obj:
                raise ValueError(f"missing {key!r}")
        ts_us = _timestamp(obj["ts"])
        return [TagValue(_tag(obj["tag"]), ts_us, _number(obj["value"]), _quality(obj.get("quality", GOOD_QUALITY)))]
    raise ValueError("a JSON object needs 'tag' (one value) or 'values' (a polling group)")


def _group_rows(obj: dict[str, Any]) -> list[TagValue]:
    values = obj["values"]
    if not isinstance(values, dict):
        raise ValueError(f"'values' must be an object of tag: value, not {short_repr(values)}")
    if "ts" not in obj:
        raise ValueError("missing 'ts'")
    ts_us = _timestamp(obj["ts"])
    quality = _quality(obj.get("quality", GOOD_QUALITY))
    try:
        return _plain_group_rows(values, ts_us, quality)
    except (ValueError, OverflowError):  # something is wrong: find it, one value at a time, to say what
        pass
    rows = []
    for tag, value in values.items():
        try:
            rows.append(TagValue(_tag(tag), ts_us, _number(value), quality))
        except ValueError as exc:
            raise ValueError(f"tag {short_repr(tag)}: {exc}") from None
    return rows


def _plain_group_rows(values: dict[str, Any], ts_us: int, quality: int) -> list[TagValue]:
    """The rows of a group whose tags and values are all fine, checked column-wise (~5x faster than one by one).

    Raises ValueError (or OverflowError) on any doubt, without saying which value: the caller finds it.
    """
    check_tag_names(values)
    if not set(map(type, values.values())) <= _JSON_NUMBERS:  # bool is not int here: type(True) is bool
        raise ValueError("not every value is a number or null")
    new = tuple.__new__  # as PollingData.rows: skips NamedTuple's Python-level __new__
    rows = [new(TagValue, (tag, ts_us, None if v is None else float(v), quality)) for tag, v in values.items()]
    if not all(map(math.isfinite, [r[2] for r in rows if r[2] is not None])):
        raise ValueError("a value is not finite")
    return rows


_JSON_NUMBERS = {float, int, type(None)}


def _timestamp(ts: Any) -> int:
    if isinstance(ts, str):
        return _ts(ts)
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return to_epoch_us(ts)  # ValueError for NaN, inf and a number outside the years 1-9999
    raise ValueError(f"ts must be ISO-8601 text or epoch seconds, not {short_repr(ts)}")


def _number(value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"value must be a number or null, not {short_repr(value)}")
    return _finite(value)


def where(msg: Msg) -> str:
    """Where a message came from, as quarantine keeps it: "nats <subject> seq <stream sequence>"."""
    try:
        return f"nats {msg.subject} seq {msg.metadata.sequence.stream}"
    except Exception:  # not a JetStream message (no metadata in its reply subject)
        return f"nats {msg.subject}"


def raw_text(data: bytes) -> str:
    """A payload as quarantine keeps it: UTF-8 text, bytes that are not UTF-8 as \\xNN escapes."""
    return visible(data.decode("utf-8", "surrogateescape"))


# -- the consumer ---------------------------------------------------------------


def wanted_consumer(s: JetStreamConfig) -> dict[str, Any]:
    """The consumer config (JetStream API JSON) that `consumer = "create"` makes: pull, explicit acks."""
    config: dict[str, Any] = {
        "durable_name": s.durable,
        "name": s.durable,
        "deliver_policy": "all",  # a new consumer starts at the stream's first message: nothing skipped
        "ack_policy": "explicit",
        "ack_wait": round(s.ack_wait * 1e9),
        "max_ack_pending": s.max_ack_pending,
        "max_deliver": s.max_deliver if s.max_deliver > 0 else -1,
        "replay_policy": "instant",
    }
    if s.subject:
        config["filter_subject"] = s.subject
    return config


def consumer_differences(have: ConsumerConfig, s: JetStreamConfig, *, bind: bool) -> list[str]:
    """How an existing consumer differs from what the settings need (bind: only what tagwriter cannot work with)."""
    out = []
    if have.deliver_subject:
        out.append(f"it is a push consumer (deliver_subject {have.deliver_subject!r}); tagwriter needs a pull consumer")
    ack_policy = getattr(have.ack_policy, "value", have.ack_policy)
    if ack_policy != "explicit":
        out.append(f"ack_policy {ack_policy} (tagwriter needs explicit: one ack per message after settle)")
    if bind:
        return out
    subjects = sorted(have.filter_subjects or ([have.filter_subject] if have.filter_subject else []))
    if subjects != ([s.subject] if s.subject else []):
        out.append(f"filter subject {', '.join(subjects) or 'none'} ([jetstream] subject = {s.subject!r})")
    if abs((have.ack_wait or 30.0) - s.ack_wait) > 1e-3:
        out.append(f"ack_wait {have.ack_wait:g}s ([jetstream] ack_wait = {s.ack_wait:g})")
    if have.max_ack_pending != s.max_ack_pending:
        out.append(f"max_ack_pending {have.max_ack_pending} ([jetstream] max_ack_pending = {s.max_ack_pending})")
    have_deliver = have.max_deliver if have.max_deliver and have.max_deliver > 0 else -1
    if have_deliver != (s.max_deliver if s.max_deliver > 0 else -1):
        out.append(f"max_deliver {have_deliver} ([jetstream] max_deliver = {s.max_deliver})")
    return out


def effective_ack_wait(have: ConsumerConfig) -> float:
    """Seconds until JetStream redelivers a first delivery: `ack_wait`, or the first `backoff` step."""
    ack_wait = have.ack_wait or 30.0
    return min(ack_wait, have.backoff[0]) if have.backoff else ack_wait


# -- the source -----------------------------------------------------------------


class _SessionLost(Exception):
    """The connection or the consumer went away in a way nats-py does not mend: start a new session.

    `got_going`: the session had reached its consumer (the retry schedule starts afresh).
    """

    def __init__(self, message: str, *, got_going: bool = False) -> None:
        super().__init__(message)
        self.got_going = got_going


@dataclass(slots=True)
class _Held:
    """Messages of one fetch not yet acknowledged: their reply subjects, and when JetStream last heard of them."""

    replies: list[str]
    touched: float


@dataclass(slots=True)
class _Handed:
    """What the hand-over did with one fetch: indices of the messages taken and quarantined, and the receipt.

    `receipt` None: the values were not submitted (stop, or the pipeline stopped): NAK them.
    """

    good: list[int]
    bad: list[int]
    kept_bad: bool = True  # False: the quarantine could not be written; leave those for redelivery
    receipt: Receipt | None = None
    accepted: bool = True  # False: the overflow policy dropped some; NAK after settle so they come again
    ended: bool = False  # the pipeline stopped: end the run


@dataclass(slots=True)
class _Counts:
    """What `status()` reports; written on the loop and helper threads, read anywhere (approximate)."""

    connected: bool = False
    messages: int = 0
    values: int = 0
    redeliveries: int = 0
    reconnects: int = 0
    bad: int = 0
    acks_pending: int = 0
    lag: int | None = None  # messages in the stream for this consumer not yet delivered
    last_message: float | None = None
    detail: str = "not started"


class JetStreamSource:
    """A durable JetStream pull consumer as a `Source` (`run` on the service's source thread)."""

    def __init__(self, settings: JetStreamConfig, *, writer_batch_size: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nats = _import_nats()
        self.servers = check_settings(settings)
        self._tls = tls_context(settings, self.servers)
        self.settings = settings
        self.name = KIND
        self.batch = settings.fetch_batch or writer_batch_size
        self.clock = clock
        self.endpoint = (f"{', '.join(redact_url(url) for url in self.servers)} "
                         f"stream {settings.stream} consumer {settings.durable}")
        self._counts = _Counts()
        self._bad_log = BadLineLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._held: dict[int, _Held] = {}
        self._batch_ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ever_connected = False

    # -- status -----------------------------------------------------------

    def status(self) -> SourceStatus:
        """One look at the source; thread-safe (the figures are read without a lock: approximate)."""
        c = self._counts
        last = c.last_message
        lag = "" if c.lag is None else f"lag {c.lag} messages; "
        return SourceStatus(
            kind=KIND, endpoint=self.endpoint, connected=c.connected, messages=c.messages, values=c.values,
            last_message_age=None if last is None else max(0.0, self.clock() - last),
            acks_pending=c.acks_pending, redeliveries=c.redeliveries, reconnects=c.reconnects,
            bad_messages=c.bad, detail=redact(lag + c.detail),
        )

    @property
    def lag(self) -> int | None:
        """Messages of the stream not yet delivered to this consumer, as last seen (None before the first look)."""
        return self._counts.lag

    def _say(self, detail: str, level: int = logging.INFO) -> None:
        detail = redact(detail)
        self._counts.detail = detail
        log.log(level, "jetstream: %s", detail)

    # -- running ----------------------------------------------------------

    def run(self, intake: Intake, stop: threading.Event) -> None:
        """Consume until `stop` is set (or the pipeline stops); raises InputError if the consumer cannot be used."""
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagwriter-jetstream-intake")
        try:
            asyncio.run(self._main(intake, stop, worker))
        finally:
            worker.shutdown(wait=True)
            self._counts.connected = False
            if self._held:
                log.info("jetstream: %d messages were not acknowledged (their values had not settled): "
                         "JetStream redelivers them after ack_wait, as duplicates", self._held_count())

    async def _main(self, intake: Intake, stop: threading.Event, worker: ThreadPoolExecutor) -> None:
        self._loop = asyncio.get_running_loop()
        stopped = asyncio.create_task(_until_set(stop))
        schedule = Backoff([self.settings.reconnect_wait], cap=SESSION_RETRY_CAP, jitter=0.2)
        retry = iter(schedule)
        try:
            while not stop.is_set():
                try:
                    await self._session(intake, stop, stopped, worker)
                    return
                except _SessionLost as exc:
                    self._say(f"session lost: {exc}; starting again", logging.WARNING)
                    if exc.got_going:
                        retry = iter(schedule)
                await _first(asyncio.sleep(next(retry)), stopped)
        finally:
            stopped.cancel()

    async def _session(self, intake: Intake, stop: threading.Event, stopped: asyncio.Task[None],
                       worker: ThreadPoolExecutor) -> None:
        """One connection and pull subscription, until stop or the pipeline stops; raises _SessionLost."""
        nc = await self._connect(stopped)
        if nc is None:
            return
        got_going = False
        try:
            js = nc.jetstream(timeout=API_TIMEOUT)
            info = await self._consumer(nc, js)
            sub = await js.pull_subscribe_bind(durable=self.settings.durable, stream=self.settings.stream)
            got_going = True
            keeper = asyncio.create_task(self._keep_alive(effective_ack_wait(info.config)))
            try:
                await self._consume(intake, stop, stopped, js, sub, worker)
            finally:
                keeper.cancel()
                await self._settle_grace()
        except (OSError, self._nats.errors.Error) as exc:  # TimeoutError is an OSError
            raise _SessionLost(f"{type(exc).__name__}: {exc}", got_going=got_going) from exc
        except _SessionLost as exc:
            exc.got_going = got_going
            raise
        finally:
            self._counts.connected = False
            await self._close(nc)

    async def _connect(self, stopped: asyncio.Task[None]) -> Client | None:
        """A connected client, or None on stop; nats-py retries unreachable servers every reconnect_wait.

        A refused authorisation ends the run (InputError): retrying a wrong password helps nobody.
        """
        s = self.settings
        nc = self._nats.NATS()
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            # While connecting, nats-py reports a refusal as a plain Error with the server's words.
            denied = isinstance(exc, self._nats.errors.AuthorizationError) or AUTH_REFUSED in str(exc).lower()
            if denied and not refused.done():
                refused.set_result(exc)
            self._counts.detail = redact(f"{type(exc).__name__}: {exc}")

        async def on_disconnected() -> None:
            if self._counts.connected:
                self._counts.connected = False
                self._say("disconnected; reconnecting", logging.WARNING)

        async def on_reconnected() -> None:
            self._counts.connected = True
            self._counts.reconnects += 1
            self._say(f"reconnected to {redact_url(str(nc.connected_url.geturl() if nc.connected_url else ''))}")

        options: dict[str, Any] = {
            "servers": self.servers, "name": "tagwriter", "connect_timeout": s.connect_timeout,
            "reconnect_time_wait": s.reconnect_wait, "max_reconnect_attempts": -1, "allow_reconnect": True,
            "ping_interval": PING_INTERVAL, "pending_size": PENDING_BYTES,
            "error_cb": on_error, "disconnected_cb": on_disconnected, "reconnected_cb": on_reconnected,
        }
        if s.user:
            options.update(user=s.user, password=s.password)
        if s.token:
            options["token"] = s.token
        if self._tls is not None:
            options["tls"] = self._tls
            if s.tls_hostname:
                options["tls_hostname"] = s.tls_hostname
        self._say(f"connecting to {self.endpoint}")
        try:
            await _first(nc.connect(**options), stopped, refused)
        except (OSError, self._nats.errors.Error) as exc:  # TimeoutError is an OSError
            await self._close(nc)
            raise _SessionLost(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        if refused.done():
            await self._close(nc)
            raise InputError(f"nats {', '.join(redact_url(u) for u in self.servers)}",
                             f"the server refused the authorisation ({refused.result()}): "
                             "check jetstream.user/password or jetstream.token")
        if not nc.is_connected:  # stopped while connecting
            await self._close(nc)
            return None
        if self._ever_connected:
            self._counts.reconnects += 1
        self._ever_connected = True
        self._nc = nc
        self._counts.connected = True
        return nc

    async def _consumer(self, nc: Client, js: JetStreamContext) -> ConsumerInfo:
        """The consumer's info: made if missing (create mode), checked, never changed; InputError if unusable."""
        s, errors = self.settings, self._nats.js.errors
        place = f"nats stream {s.stream} consumer {s.durable}"
        bind = s.consumer == "bind"
        try:
            info = await js.consumer_info(s.stream, s.durable)
            state = "bound" if bind else "exists"
        except errors.NotFoundError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                raise InputError(place, "no such stream: create it (subjects, retention, replicas) "
                                 "before tagwriter reads it") from None
            if bind:
                raise InputError(place, "no such consumer: jetstream.consumer = 'bind' reads an existing one; "
                                 "create it, or set jetstream.consumer = 'create'") from None
            info = await self._create_consumer(nc, js, place)
            state = "created"
        problems = consumer_differences(info.config, s, bind=bind)
        if problems:
            raise InputError(place, "exists with other settings: " + "; ".join(problems) +
                             ". tagwriter never changes an existing consumer: make [jetstream] match it, "
                             "set jetstream.consumer = 'bind' to use it as it is, or edit or delete it yourself")
        self._say(f"consumer {s.durable} on stream {s.stream} {state}; pulling batches of {self.batch}")
        return info

    async def _create_consumer(self, nc: Client, js: JetStreamContext, place: str) -> ConsumerInfo:
        """Create the durable consumer; if another writer made it meanwhile, its info (checked by the caller).

        Sent by hand with `"action": "create"`: nats-py's add_consumer updates an existing consumer
        on servers 2.10+, and an existing consumer must never change under its other readers.
        """
        s, api, errors = self.settings, self._nats.js.api, self._nats.js.errors
        config = wanted_consumer(s)
        subject = f"$JS.API.CONSUMER.CREATE.{s.stream}.{s.durable}"
        if s.subject and s.subject != ">":
            subject += f".{s.subject}"
        request = {"stream_name": s.stream, "config": config, "action": "create"}
        reply = await nc.request(subject, json.dumps(request).encode(), timeout=API_TIMEOUT)
        answer = json.loads(reply.data)
        if "error" not in answer:
            return api.ConsumerInfo.from_response(answer)
        error = errors.APIError.from_error(answer["error"])
        try:
            return await js.consumer_info(s.stream, s.durable)  # made meanwhile by another writer?
        except errors.NotFoundError:
            raise InputError(place, f"cannot be created: {error.description} (code {error.err_code})") from None

    async def _consume(self, intake: Intake, stop: threading.Event, stopped: asyncio.Task[None],
                       js: JetStreamContext, sub: Any, worker: ThreadPoolExecutor) -> None:
        """Fetch and hand over until stop or the pipeline stops; raises _SessionLost when the consumer is gone.

        The next fetch overlaps the hand-over of the last one (at most one of each at a time), so
        the network and the decoding do not wait for each other.
        """
        nc = self._nc
        assert nc is not None
        checked = self.clock()
        taking: asyncio.Task[bool] | None = None
        try:
            while not stop.is_set():
                if not nc.is_connected:
                    if nc.is_closed:
                        raise _SessionLost("the connection was closed")
                    await _first(asyncio.sleep(STOP_LOOK), stopped)  # nats-py is reconnecting
                    continue
                msgs = await _first(self._fetch(sub), stopped)
                if taking is not None and (msgs or taking.done()):
                    ended, taking = await taking, None
                    if ended:
                        return
                if msgs:
                    taking = asyncio.create_task(self._take(intake, stop, msgs, worker))
                elif msgs is not None and self.clock() - checked >= CONSUMER_CHECK:
                    await self._look_at_consumer(js)
                    checked = self.clock()
        finally:
            if taking is not None:
                await taking  # its messages are acked, NAKed or held: never forgotten

    async def _fetch(self, sub: Any) -> list[Msg]:
        try:
            msgs: list[Msg] = await sub.fetch(self.batch, timeout=self.settings.fetch_timeout)
        except TimeoutError:  # nothing to fetch (nats.errors.TimeoutError is one)
            return []
        return msgs

    async def _look_at_consumer(self, js: JetStreamContext) -> None:
        """While idle: the lag, and whether the consumer still exists (fetches do not say when it was deleted)."""
        s = self.settings
        try:
            info = await js.consumer_info(s.stream, s.durable)
        except self._nats.js.errors.NotFoundError as exc:
            if s.consumer == "bind" or exc.err_code == STREAM_NOT_FOUND:
                raise InputError(f"nats stream {s.stream} consumer {s.durable}",
                                 f"was deleted while tagwriter read it ({exc.description})") from None
            raise _SessionLost("the consumer was deleted; creating it again") from None
        self._counts.lag = info.num_pending

    async def _take(self, intake: Intake, stop: threading.Event, msgs: list[Msg], worker: ThreadPoolExecutor) -> bool:
        """Hold one fetch, hand it over on the helper thread, then ack (after settle), term or NAK its messages.

        Returns True if the pipeline has stopped (the source ends).
        """
        batch_id = next(self._batch_ids)
        held = _Held([m.reply for m in msgs], self.clock())
        self._held[batch_id] = held
        self._count_delivery(msgs)
        loop = asyncio.get_running_loop()
        handed = await loop.run_in_executor(worker, self._hand_over, intake, stop, msgs)
        if handed.bad:
            bad = [held.replies[i] for i in handed.bad]
            if handed.kept_bad:
                self._reply(bad, TERM)
            else:
                self._counts.acks_pending -= len(bad)  # not acknowledged: JetStream redelivers them
        held.replies = [held.replies[i] for i in handed.good]
        if handed.receipt is None:
            self._finish(batch_id, NAK)
        else:
            payload = ACK if handed.accepted else NAK
            handed.receipt.on_settled(lambda: self._settled_from_any_thread(batch_id, payload))
        return handed.ended

    def _hand_over(self, intake: Intake, stop: threading.Event, msgs: list[Msg]) -> _Handed:
        """On the helper thread: decode, quarantine the bad, wait for room, submit the rest in one go."""
        rows: list[TagValue] = []
        good: list[int] = []
        bad: list[int] = []
        kept: list[BadInput] = []
        for i, msg in enumerate(msgs):
            try:
                rows.extend(decode_message(msg.data, msg.headers))
                good.append(i)
            except ValueError as exc:
                bad.append(i)
                kept.append((where(msg), str(exc), raw_text(msg.data)))
        handed = _Handed(good, bad)
        if kept:
            handed.kept_bad = intake.quarantine_input(kept) == len(kept)
            if handed.kept_bad:
                self._counts.bad += len(kept)
                for item in kept:
                    self._bad_log.add(InputError(*item))
        if not rows:
            handed.receipt = SETTLED
            return handed
        return self._submit(intake, stop, rows, handed)

    def _submit(self, intake: Intake, stop: threading.Event, rows: list[TagValue], handed: _Handed) -> _Handed:
        step = intake.capacity
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            if not intake.wait_for_room(len(chunk), stop):
                handed.receipt = None  # stop while waiting: NAK, JetStream hands them to another writer
                return handed
            try:
                receipt = intake.submit(chunk)
            except PipelineStopped:
                handed.receipt, handed.ended = None, True
                return handed
            # Receipts settle in order: the last one settled means every one before it has.
            handed.receipt = receipt
            handed.accepted = handed.accepted and bool(receipt)
        self._counts.values += len(rows)
        return handed

    def _count_delivery(self, msgs: list[Msg]) -> None:
        c = self._counts
        c.messages += len(msgs)
        c.acks_pending += len(msgs)
        c.last_message = self.clock()
        redelivered = 0
        for msg in msgs:
            with contextlib.suppress(Exception):  # not a JetStream message: no metadata
                redelivered += msg.metadata.num_delivered > 1
        c.redeliveries += redelivered
        with contextlib.suppress(Exception):
            c.lag = msgs[-1].metadata.num_pending

    # -- acknowledging ----------------------------------------------------

    def _settled_from_any_thread(self, batch_id: int, payload: bytes) -> None:
        """The receipt's callback, on a tagwriter thread: hand the ack to the loop (must not block)."""
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            loop.call_soon_threadsafe(self._finish, batch_id, payload)
        except RuntimeError:  # the loop has closed: the source has stopped
            log.debug("jetstream: batch %d settled after the source stopped: redelivered later", batch_id)

    def _finish(self, batch_id: int, payload: bytes) -> None:
        """On the loop: ack (or NAK) every held message of one fetch."""
        held = self._held.pop(batch_id, None)
        if held is not None:
            self._reply(held.replies, payload)

    def _reply(self, replies: list[str], payload: bytes) -> None:
        """Send `payload` (+ACK, -NAK, +TERM) to each reply subject, through the current connection."""
        if not replies:
            return
        self._counts.acks_pending -= len(replies)
        task = asyncio.get_running_loop().create_task(self._publish(replies, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, replies: list[str], payload: bytes) -> None:
        nc = self._nc
        try:
            if nc is None or nc.is_closed:
                raise self._nats.errors.ConnectionClosedError
            for reply in replies:
                await nc.publish(reply, payload)
        except self._nats.errors.Error as exc:
            if payload != PROGRESS:
                log.warning("jetstream: %d %s could not be sent (%s): JetStream redelivers those messages "
                            "after ack_wait, as duplicates", len(replies), payload.decode(), type(exc).__name__)

    async def _keep_alive(self, ack_wait: float) -> None:
        """Tell JetStream that messages held for over half of ack_wait are in progress, so none is redelivered."""
        every = max(ack_wait / 4, MIN_PROGRESS_EVERY)
        while True:
            await asyncio.sleep(every)
            if not self._counts.connected:
                continue
            now = self.clock()
            due: list[str] = []
            for held in self._held.values():
                if now - held.touched >= ack_wait / 2:
                    due.extend(held.replies)
                    held.touched = now
            if due:
                await self._publish(due, PROGRESS)

    async def _settle_grace(self) -> None:
        """Stopping: give values just submitted a moment to settle, so their acks go out now."""
        deadline = self.clock() + SETTLE_GRACE
        while self._held and self.clock() < deadline:
            await asyncio.sleep(STOP_LOOK / 5)

    def _held_count(self) -> int:
        return sum(len(h.replies) for h in self._held.values())

    async def _close(self, nc: Client) -> None:
        """Send what is buffered (acks), then close; bounded."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_TIMEOUT)
        if nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.flush(), CLOSE_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)


async def _until_set(event: threading.Event) -> None:
    """Returns once a threading.Event is set (looked at every STOP_LOOK seconds)."""
    while not event.is_set():
        await asyncio.sleep(STOP_LOOK)


async def _first(aw: Awaitable[T], *stoppers: asyncio.Future[Any]) -> T | None:
    """The result of `aw`, or None if one of `stoppers` completes first (`aw` is then cancelled)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None

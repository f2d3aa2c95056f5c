"""The JetStream side of an edge-to-fleet deployment: create or verify the stream and the consumer, show their lag.

`setup` makes the stream (and the writers' durable consumer) when missing and
compares them with the wanted settings when present: an existing stream or
consumer is never changed (edges and writers rely on it), only its
differences are reported. `status` reads the stream's state and each
consumer's lag. `ensure_stream` is what `init-db` does for a nats:// database
URL, `connection_checks` what `test-connection` does. Everything goes through
a `NatsSession` (tagwriter/sinks/jetstream.py): bounded calls on one loop.

The JetStream API is used as JSON (`$JS.API.*`), as the server documents it:
durations in nanoseconds, compared exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tagwriter.checks import CheckResult
from tagwriter.config import JetStreamConfig
from tagwriter.errors import ConfigError, FatalError, SinkError, TagwriterError
from tagwriter.sinks.jetstream import (
    STREAM_NOT_FOUND,
    JetStreamSink,
    NatsLogin,
    NatsSession,
    check_stream,
    import_nats,
    reach,
)
from tagwriter.sources.jetstream import check_settings, consumer_differences, tls_context, wanted_consumer

NS = 1_000_000_000
GIB = 1024**3
DEFAULT_MAX_BYTES = 10 * GIB
LIMITS_MAX_AGE = 7 * 86_400.0  # seconds a limits stream keeps messages by default
DUPLICATE_WINDOW = 120.0  # seconds: JetStream's own default, long enough for the writer's retries (1+2+4 s)
RETENTIONS = ("workqueue", "limits")
WRONG_LAST_SEQUENCE = 10071  # the refusal the publish check asks for
NEVER_A_SEQUENCE = 2**63 - 1  # an expected last sequence no stream has: the server refuses, stores nothing


# -- sizes and durations on the command line ---------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_size(text: str) -> int:
    """Bytes from `10GiB`, `512M`, `1048576`; -1 for `none`; ConfigError otherwise."""
    if text.strip().lower() in ("none", "-1", "unlimited"):
        return -1
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"size {text!r}: give bytes, or a number with KiB, MiB, GiB or TiB (e.g. 10GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()[:1]])


def parse_duration(text: str) -> float:
    """Seconds from `7d`, `12h`, `90s`, `300`; 0 for `none`; ConfigError otherwise."""
    if text.strip().lower() in ("none", "0"):
        return 0.0
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"duration {text!r}: give seconds, or a number with s, m, h or d (e.g. 7d)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


# -- the stream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What a stream for tagwriter batches should be. `replicas` 0: 3 in a cluster of 3 or more, else 1.

    `max_age` None: the retention's default (work queue: none, limits: 7 days). Discard is
    always `new`: a full stream refuses publishes, so edges keep their values (queue,
    spool) instead of JetStream deleting the oldest unwritten ones.
    """

    name: str
    subjects: tuple[str, ...]
    retention: str = "workqueue"
    replicas: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age: float | None = None
    storage: str = "file"
    duplicate_window: float = DUPLICATE_WINDOW

    def __post_init__(self) -> None:
        if self.retention not in RETENTIONS:
            raise ConfigError(f"retention {self.retention!r}: must be one of {', '.join(RETENTIONS)}")
        if not self.subjects:
            raise ConfigError(f"stream {self.name}: needs at least one subject")
        if self.replicas < 0 or self.replicas > 5:
            raise ConfigError(f"replicas {self.replicas}: must be 1 to 5 (0 = 3 in a cluster, else 1)")

    @property
    def age(self) -> float:
        if self.max_age is not None:
            return self.max_age
        return LIMITS_MAX_AGE if self.retention == "limits" else 0.0


def default_subjects(stream: str, subject: str = "") -> tuple[str, ...]:
    """The subjects a new stream takes: all under the first token of `subject` (`plant.edge1` -> `plant.>`),
    or `<stream>.>` without one."""
    if not subject:
        return (f"{stream}.>",)
    first = subject.split(".")[0]
    return (f"{first}.>",) if first not in ("*", ">") and "." in subject else (subject,)


def cluster_size(server_info: dict[str, Any]) -> int:
    """Servers in the cluster of the server `server_info` (its INFO) came from; 1 when it is not clustered."""
    if not server_info.get("cluster"):
        return 1
    return max(1, len(set(server_info.get("connect_urls") or [])))


def stream_config(s: StreamSettings, replicas: int) -> dict[str, Any]:
    """The JetStream API config (`$JS.API.STREAM.CREATE`) of `s`."""
    return {
        "name": s.name,
        "subjects": list(s.subjects),
        "retention": s.retention,
        "storage": s.storage,
        "num_replicas": replicas,
        "max_bytes": s.max_bytes,
        "max_age": round(s.age * NS),
        "max_msgs": -1,
        "max_consumers": -1,
        "max_msg_size": -1,
        "discard": "new",
        "duplicate_window": round(s.duplicate_window * NS),
    }


_COMPARED = ("subjects", "retention", "storage", "num_replicas", "max_bytes", "max_age", "discard",
             "duplicate_window")


def stream_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """How an existing stream's config differs from the wanted one, in the settings tagwriter sets."""
    out = []
    for key in _COMPARED:
        a, b = have.get(key), want.get(key)
        if key == "subjects":
            a, b = sorted(a or []), sorted(b or [])
        if a != b:
            out.append(f"{key} {_shown(key, a)} (wanted {_shown(key, b)})")
    return out


def _shown(key: str, value: Any) -> str:
    if key in ("max_age", "duplicate_window") and isinstance(value, int):
        return f"{value / NS:g}s" if value else "none"
    if key == "max_bytes" and isinstance(value, int):
        return size_text(value)
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def size_text(n: int) -> str:
    """Bytes as people read them: `10 GiB`, `64 MiB`, `512 B`; `none` for a negative limit."""
    if n < 0:
        return "none"
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


# -- the JetStream API as JSON ------------------------------------------------------------


async def api(session: NatsSession, subject: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `$JS.API.*` request on the session's connection; raises the API error nats-py would."""
    nats = import_nats()
    payload = json.dumps(request).encode() if request is not None else b""
    reply = await session.client.request(f"$JS.API.{subject}", payload, timeout=session.call_timeout)
    answer: dict[str, Any] = json.loads(reply.data)
    if "error" in answer:
        raise nats.js.errors.APIError.from_error(answer["error"])
    return answer


async def stream_json(session: NatsSession, name: str) -> dict[str, Any] | None:
    """`$JS.API.STREAM.INFO`: the stream's config, state and cluster; None if there is no such stream."""
    nats = import_nats()
    try:
        return await api(session, f"STREAM.INFO.{name}")
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            return None
        raise


def _replicas(session: NatsSession, wanted: int) -> int:
    return wanted or (3 if cluster_size(session.server_info) >= 3 else 1)


@dataclass(slots=True)
class SetupReport:
    """What setup found or did, line by line, in order: (True, done or as wanted) or (False, a difference
    it left alone: the command exits 1)."""

    lines: list[tuple[bool, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [text for ok, text in self.lines if not ok]

    def say(self, text: str, *, ok: bool = True) -> None:
        self.lines.append((ok, text))


async def _ensure_stream(session: NatsSession, s: StreamSettings, report: SetupReport) -> dict[str, Any]:
    """Create the stream if missing; else compare. Returns the wanted config."""
    have = await stream_json(session, s.name)
    replicas = _replicas(session, s.replicas)
    if have is not None and not s.replicas:
        replicas = have["config"].get("num_replicas", replicas)  # auto: whatever it has is fine
    want = stream_config(s, replicas)
    if have is None:
        created = await api(session, f"STREAM.CREATE.{s.name}", want)
        report.say(f"stream {s.name}: created ({_summary(created['config'])})")
        return want
    problems = stream_differences(have["config"], want)
    if problems:
        report.say(f"stream {s.name} exists with other settings: {'; '.join(problems)}", ok=False)
    else:
        report.say(f"stream {s.name}: exists as wanted ({_summary(have['config'])})")
    return want


def _summary(config: dict[str, Any]) -> str:
    limits = ", ".join(f"{key} {_shown(key, config.get(key))}" for key in ("max_bytes", "max_age", "duplicate_window"))
    return (f"subjects {', '.join(config.get('subjects') or [])}; {config.get('retention')}, "
            f"{config.get('storage')}, replicas {config.get('num_replicas')}, discard {config.get('discard')}, "
            f"{limits}")


async def _ensure_consumer(session: NatsSession, stream: str, c: JetStreamConfig, report: SetupReport) -> None:
    """Create the writers' durable pull consumer if missing (never changing an existing one); else compare."""
    nats = import_nats()
    place = f"consumer {c.durable} on stream {stream}"
    settings = dataclasses.replace(c, stream=stream)
    try:
        info = nats.js.api.ConsumerInfo.from_response(await api(session, f"CONSUMER.INFO.{stream}.{c.durable}"))
    except nats.js.errors.NotFoundError:
        subject = f"CONSUMER.CREATE.{stream}.{c.durable}"
        if c.subject and c.subject != ">":
            subject += f".{c.subject}"
        # "action": "create" never updates a consumer another setup made meanwhile (servers 2.10+).
        request = {"stream_name": stream, "config": wanted_consumer(settings), "action": "create"}
        created = nats.js.api.ConsumerInfo.from_response(await api(session, subject, request))
        cfg = created.config
        report.say(f"{place}: created (pull, explicit acks, ack_wait {cfg.ack_wait:g}s, "
                   f"max_ack_pending {cfg.max_ack_pending}, filter {cfg.filter_subject or 'none'})")
        return
    problems = consumer_differences(info.config, settings, bind=False)
    if problems:
        report.say(f"{place} exists with other settings: {'; '.join(problems)}", ok=False)
    else:
        report.say(f"{place}: exists as wanted")


def setup(session: NatsSession, stream: StreamSettings, consumer: JetStreamConfig | None) -> SetupReport:
    """Create or verify the stream and (unless None) the durable consumer of `consumer` on it."""
    report = SetupReport()

    async def go(js: Any) -> None:
        await _ensure_stream(session, stream, report)
        if consumer is not None:
            await _ensure_consumer(session, stream.name, consumer, report)
    session.run(go, "jetstream setup", timeout=session.bound * 3)
    return report


def ensure_stream(sink: JetStreamSink, settings: StreamSettings | None = None) -> str:
    """init-db for a JetStream sink: the stream made with the defaults if missing, else checked to take
    the sink's subject. Returns the line to print; FatalError if the stream cannot take the batches."""
    info = sink.stream_info()
    if info is not None:
        check_stream(info, sink.stream, sink.subject)
        return (f"stream {sink.stream} exists and takes {sink.subject} ({_summary_typed(info)}): "
                "nothing to do")
    s = settings or StreamSettings(sink.stream, default_subjects(sink.stream, sink.subject))
    report = setup(sink.session, s, None)
    sink.open()  # the new stream takes the subject
    return "; ".join(text for _, text in report.lines)


def _summary_typed(info: Any) -> str:
    c = info.config
    retention = getattr(c.retention, "value", c.retention)
    return f"subjects {', '.join(c.subjects or [])}; {retention}, replicas {c.num_replicas}"


# -- status -------------------------------------------------------------------------------


@dataclass(slots=True)
class ConsumerLag:
    """One consumer as JetStream counts it: `pending` not yet delivered, `ack_pending` delivered and not acked."""

    name: str
    filter_subject: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int  # pull requests waiting: about the writers fetching now
    delivered_seq: int
    ack_floor_seq: int
    ack_wait_s: float
    max_ack_pending: int
    last_active: str


@dataclass(slots=True)
class StreamStatus:
    """A stream's settings and state, its cluster, and every consumer's lag."""

    name: str
    subjects: list[str]
    retention: str
    storage: str
    replicas: int
    max_bytes: int
    max_age_s: float
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    oldest_age_s: float | None  # age of the oldest message kept (work queue: the oldest not yet written)
    leader: str = ""
    peers: list[dict[str, Any]] = field(default_factory=list)  # name, current, offline, lag
    consumers: list[ConsumerLag] = field(default_factory=list)


def stream_status(session: NatsSession, name: str, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)
                  ) -> StreamStatus:
    """The stream `name` and its consumers; FatalError if there is no such stream."""
    async def go(js: Any) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        info = await stream_json(session, name)
        consumers: list[dict[str, Any]] = []
        offset = 0
        while info is not None:
            page = await api(session, f"CONSUMER.LIST.{name}", {"offset": offset})
            consumers += page.get("consumers") or []
            offset += len(page.get("consumers") or [])
            if not page.get("consumers") or offset >= page.get("total", 0):
                break
        return info, consumers
    info, consumers = session.run(go, "jetstream status", timeout=session.bound * 2)
    if info is None:
        raise FatalError(f"stream {name} does not exist", code="STREAM_MISSING",
                         hint="`tagwriter jetstream setup` creates it")
    return _status(info, consumers, now())


def _status(info: dict[str, Any], consumers: list[dict[str, Any]], now: datetime) -> StreamStatus:
    c, st, cluster = info["config"], info["state"], info.get("cluster") or {}
    first_ts = _time(st.get("first_ts"))
    oldest = (now - first_ts).total_seconds() if first_ts and st.get("messages") else None
    peers = [{"name": p.get("name", ""), "current": bool(p.get("current")), "offline": bool(p.get("offline")),
              "lag": p.get("lag", 0)} for p in cluster.get("replicas") or []]
    return StreamStatus(
        name=c["name"], subjects=c.get("subjects") or [], retention=c.get("retention", ""),
        storage=c.get("storage", ""), replicas=c.get("num_replicas", 1), max_bytes=c.get("max_bytes", -1),
        max_age_s=c.get("max_age", 0) / NS, messages=st.get("messages", 0), bytes=st.get("bytes", 0),
        first_seq=st.get("first_seq", 0), last_seq=st.get("last_seq", 0), oldest_age_s=oldest,
        leader=cluster.get("leader", ""), peers=peers,
        consumers=sorted((_lag(x) for x in consumers), key=lambda lag: lag.name),
    )


def _lag(x: dict[str, Any]) -> ConsumerLag:
    cfg = x.get("config") or {}
    delivered, floor = x.get("delivered") or {}, x.get("ack_floor") or {}
    return ConsumerLag(
        name=x.get("name", ""), filter_subject=cfg.get("filter_subject", ""), pending=x.get("num_pending", 0),
        ack_pending=x.get("num_ack_pending", 0), redelivered=x.get("num_redelivered", 0),
        waiting=x.get("num_waiting", 0), delivered_seq=delivered.get("stream_seq", 0),
        ack_floor_seq=floor.get("stream_seq", 0), ack_wait_s=cfg.get("ack_wait", 0) / NS,
        max_ack_pending=cfg.get("max_ack_pending", -1), last_active=delivered.get("last_active", "") or "",
    )


def _time(text: Any) -> datetime | None:
    """An RFC 3339 time of the JetStream API (nanoseconds, `Z`), or None (unset: year 1)."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00" if frac else f"{head}+00:00")
    except ValueError:
        return None


# -- test-connection ----------------------------------------------------------------------


def connection_checks(sink: JetStreamSink, *, timeout: float, pings: int = 5) -> list[CheckResult]:
    """test-connection for a JetStream sink: reach, log in, server, stream, subject, publish, latency.

    Each check is bounded by what is left of `timeout`; a required check that fails skips the rest.
    """
    deadline = time.monotonic() + timeout
    session = sink.session
    state: dict[str, Any] = {}

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    def reached() -> str:
        return f"reached {reach(session.login.servers, min(session.connect_timeout, left()))}"

    def logged_in() -> str:
        session.run(_nothing, "log in", timeout=left())
        who = f" as {session.login.user}" if session.login.user else ""
        url = session.client.connected_url
        return f"connected to {url.netloc if url else '?'}{who}"

    def server() -> str:
        info = session.server_info
        if not info.get("jetstream"):
            raise FatalError(f"nats-server {info.get('version')} has JetStream off",
                             hint="start it with -js (or jetstream {} in its config)")
        size = cluster_size(info)
        where = f"cluster {info['cluster']} of {size}" if info.get("cluster") else "not clustered"
        return f"nats-server {info.get('version')}, JetStream on, {where}, max_payload {info.get('max_payload')}"

    def stream() -> str:
        info = sink.stream_info(timeout=left())
        if info is None:
            raise FatalError(f"stream {sink.stream} does not exist", code="STREAM_MISSING",
                             hint="`tagwriter init-db` creates it with the defaults; `tagwriter jetstream setup` "
                                  "with chosen settings")
        state["info"] = info
        return f"{sink.stream}: {_summary_typed(info)}; {info.state.messages} messages, {info.state.bytes} bytes"

    def subject() -> str:
        check_stream(state["info"], sink.stream, sink.subject)
        return f"{sink.subject} is one of the stream's subjects"

    def publish() -> str:
        session.run(lambda js: _refused_publish(js, sink), "publish check", timeout=left())
        return "the stream answered a publish on the subject (refused on purpose: nothing stored)"

    def latency() -> str:
        times = [session.run(_rtt(session), "ping", timeout=left()) for _ in range(pings)]
        return f"median {statistics.median(times) * 1000:.2f} ms of {pings} round trips"

    steps: list[tuple[str, Callable[[], str], bool]] = [
        ("reach the server", reached, True), ("log in", logged_in, True), ("server version", server, True),
        ("stream exists", stream, True), ("stream takes the subject", subject, True),
        ("publish allowed", publish, False), ("round-trip latency", latency, False),
    ]
    results: list[CheckResult] = []
    for name, run, required in steps:
        if time.monotonic() >= deadline:
            results.append(CheckResult(name, "fail", 0.0, f"no time left within the --timeout of {timeout:g} s",
                                       "TIMEOUT"))
            break
        started = time.monotonic()
        try:
            detail = run()
        except TagwriterError as exc:
            results.append(CheckResult(name, "fail", time.monotonic() - started, exc.message, exc.code, exc.hint))
            if required:
                break
            continue
        results.append(CheckResult(name, "pass", time.monotonic() - started, detail))
    done = {r.name for r in results}
    results += [CheckResult(n, "skipped", detail="an earlier check failed") for n, _, _ in steps if n not in done]
    return results


async def _nothing(js: Any) -> None:
    return None


def _rtt(session: NatsSession) -> Callable[[Any], Any]:
    async def go(js: Any) -> float:
        return float(await session.client.rtt(timeout=max(1, int(session.call_timeout))))
    return go


async def _refused_publish(js: Any, sink: JetStreamSink) -> None:
    """Publish with an expected last sequence no stream has: the stream answers (refusing it), nothing is stored."""
    nats = import_nats()
    headers = {"Nats-Expected-Last-Sequence": str(NEVER_A_SEQUENCE)}
    try:
        await js.publish(sink.subject, b"", timeout=sink.call_timeout, stream=sink.stream, headers=headers)
    except nats.js.errors.APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            return
        raise
    raise SinkError(f"stream {sink.stream} stored a message with expected last sequence {NEVER_A_SEQUENCE}")


# -- the writers' side, from [jetstream] --------------------------------------------------


def session_from_settings(s: JetStreamConfig, *, call_timeout: float = 10.0) -> NatsSession:
    """A session on the servers of a [jetstream] section (the writers'), with its user, token and TLS."""
    servers = check_settings(s)
    login = NatsLogin(tuple(servers), user=s.user, password=s.password, token=s.token,
                      tls=tls_context(s, servers), tls_hostname=s.tls_hostname)
    return NatsSession(login, connect_timeout=s.connect_timeout, call_timeout=call_timeout,
                       name="tagwriter-admin")

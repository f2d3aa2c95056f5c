"""One run of tagwriter as an application: the pipeline, its source on a thread, the metrics server.

    service = Service(config)                 # the source and sink from config
    verdict = service.run(stop_event)         # start, watch, stop; never raises for a data problem
    sys.exit(verdict.exit_code)

`tagwriter run` wraps this with options, signals, the live panel and
printing; `load-test` and `overflow-test` run their load through it too.
The stop sequence: the source first (it hands over what it holds), then
`Pipeline.stop` within `writer.shutdown_timeout` on a helper thread (so a
second request can make it hurry), then the metrics server. `reload` takes a
new config while running: what `LIVE_SETTINGS` names applies at once, the
rest is reported as needing a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from tagwriter.buffer import Buffer
from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.config import Config, parse_url
from tagwriter.endpoint import MetricsServer
from tagwriter.errors import ConfigError, InputError
from tagwriter.metrics import MetricsSnapshot
from tagwriter.pipeline import Pipeline
from tagwriter.sdnotify import Notifier
from tagwriter.sinks import Sink
from tagwriter.sources.base import Source
from tagwriter.sources.files import FileSource
from tagwriter.sources.simulate import SimulatedSource, Simulator
from tagwriter.spool import check_writable

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between looks at the source and the duration while watching
SOURCE_JOIN = 1.0  # seconds a stopping source may take to hand over its last chunk
STOP_GRACE = 30.0  # beyond writer.shutdown_timeout, for spooling and sealing files
#: Drops the overflow policy makes on purpose (counted, reported); any other reason is a loss.
POLICY_DROPS = frozenset({"overflow", "block_timeout"})
#: Settings `Service.reload` applies to a running service (section.key); any other change needs a restart.
LIVE_SETTINGS = (
    "writer.batch_size", "writer.flush_interval", "writer.shutdown_timeout",
    "metrics.health_max_buffer_pct", "metrics.log_interval", "logging.level",
)


class ExitStatus(IntEnum):
    """The exit status of `tagwriter run`, by outcome; `EXIT_MEANINGS` says each in words."""

    OK = 0
    FAILED = 1
    USAGE = 2
    SHORTFALL = 3


EXIT_MEANINGS = {
    ExitStatus.OK: "every value was written, spooled or quarantined by the database, from good input",
    ExitStatus.FAILED: "values could not be written or spooled, the database refused writes for good, "
                       "the input could not be read, or a configuration error",
    ExitStatus.USAGE: "a malformed command line",
    ExitStatus.SHORTFALL: "the run finished and every value is accounted for, but values were dropped "
                          "by the overflow policy or input lines were malformed (kept in quarantine)",
}
WRITER_FAILED = "the writer thread failed"  # a stop reason


def check_folders(config: Config, *, database: bool = True) -> None:
    """Prove the backup and quarantine folders (and, with `database`, a SQLite file's folder) take files.

    Raises SpoolError naming the folder and a hint. A SQLite database needs
    its folder writable for its journal: a read-only one is no outage.
    """
    b = config.backup
    check_writable(b.directory, "backup", "backup.directory")
    quarantine = b.quarantine_directory or str(Path(b.directory) / "quarantine")
    check_writable(quarantine, "quarantine", "backup.quarantine_directory")
    url = parse_url(config.database.url) if database else None
    if url is not None and url.kind == "sqlite" and url.path != ":memory:" and not url.path.startswith("file:"):
        check_writable(Path(url.path).parent, "SQLite database", "database.url")


def source_from_config(config: Config, *, from_start: bool = False) -> Source:
    """The source `source.kind` names: simulated polling, or a jsonl/csv file ('-' = stdin).

    A file resumes after its last durable line (disk queue) unless `from_start`.
    """
    src = config.source
    if src.kind == "simulate":
        return SimulatedSource(Simulator.from_config(src))
    if src.kind in ("jsonl", "csv"):
        return FileSource(src.kind, src.path, from_start=from_start)
    return plant_source(config)


def plant_source(config: Config) -> Source:
    """The plant source `source.kind` names, from its own section. Each module (and its library, an extra)
    is imported only when chosen: a missing extra is a ConfigError naming it."""
    kind = config.source.kind
    if kind == "mqtt":
        from tagwriter.sources.mqtt import MqttSource

        return MqttSource(config.mqtt)
    if kind == "sparkplug":
        from tagwriter.sources.sparkplug import SparkplugSource

        return SparkplugSource.from_config(config.mqtt, config.sparkplug)
    if kind == "modbus":
        from tagwriter.sources.modbus import ModbusSource

        return ModbusSource.from_config(config.modbus)
    if kind == "opcua":
        from tagwriter.sources.opcua import OpcUaSource

        return OpcUaSource.from_config(config.opcua)
    if kind == "jetstream":
        from tagwriter.sources.jetstream import JetStreamSource

        return JetStreamSource(config.jetstream, writer_batch_size=config.writer.batch_size)
    raise ConfigError(f"source.kind = {kind!r}: not a source this version can build")


class SourceThread:
    """Runs a `Source` on its own daemon thread; keeps what ended it."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.stop = threading.Event()
        self.error: BaseException | None = None  # a bug in the source
        self.input_error: InputError | None = None  # the input cannot be read at all
        self._thread = threading.Thread(target=self._run, name="tagwriter-source", daemon=True)

    def start(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self._pipeline, self.stop)
        except InputError as exc:
            log.error("%s", exc)
            self.input_error = exc
        except Exception as exc:  # a bug in a source: end the run, report it
            log.exception("the source failed")
            self.error = exc

    @property
    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        if self._thread.ident is not None:
            self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a run did not end well, with a hint for the operator."""

    message: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a run ended: why it stopped, the final figures, and what went wrong (if anything)."""

    reason: str
    elapsed: float
    snapshot: MetricsSnapshot
    stopped: bool | None  # Pipeline.stop's result; None when the stop did not end in time
    problems: tuple[Problem, ...]  # any: ExitStatus.FAILED
    shortfalls: tuple[Problem, ...] = ()  # counted, not lost: policy drops, malformed input (SHORTFALL)

    @property
    def adds_up(self) -> bool:
        return self.snapshot.submitted == self.snapshot.accounted

    @property
    def exit_code(self) -> ExitStatus:
        if self.problems:
            return ExitStatus.FAILED
        return ExitStatus.SHORTFALL if self.shortfalls else ExitStatus.OK


@dataclass(frozen=True, slots=True)
class Reload:
    """What `Service.reload` did: settings applied (`key old -> new`), and keys changed that need a restart."""

    applied: tuple[str, ...] = ()
    need_restart: tuple[str, ...] = ()


class Service:
    """Start, watch, stop and judge one run. `start`/`stop` are for one caller thread."""

    def __init__(
        self, config: Config, source: Source | None = None, *,
        sink: Sink | None = None, buffer: Buffer | None = None, clock: Clock = SYSTEM_CLOCK,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        #: systemd (Type=notify): READY, watchdog pings, RELOADING, STOPPING; a no-op outside systemd.
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self._own_sink = sink is None  # made from database.url: its folder is checked at start
        self.pipeline = Pipeline(config, sink=sink, buffer=buffer, clock=clock)
        self.source = SourceThread(source if source is not None else source_from_config(config))
        status = getattr(self.source.source, "status", None)
        self.pipeline.report_source(status if callable(status) else None)
        self.metrics_server: MetricsServer | None = None
        self._started_at: float | None = None

    # -- life cycle --------------------------------------------------------

    def start(self) -> Service:
        """Serve metrics (if metrics.port > 0), start the pipeline, then the source.

        A taken metrics port raises ConfigError, a folder that takes no files
        SpoolError (`check_folders`), before anything runs.
        """
        check_folders(self.config, database=self._own_sink)
        m = self.config.metrics
        if m.port > 0:
            self.metrics_server = MetricsServer(
                self.pipeline, m.host, m.port, health_max_buffer_pct=m.health_max_buffer_pct,
                liveness=self.liveness,
            ).start()
        self._started_at = self.clock.monotonic()
        self.pipeline.start()
        self.source.start(self.pipeline)
        return self

    def liveness(self) -> tuple[bool, str]:
        """(live, reason) for `/livez`: the pipeline's threads, and the source thread not failed."""
        if self.source.error is not None:
            return False, f"the source thread failed: {self.source.error!r}"
        return self.pipeline.liveness()

    def watch(
        self, stop: threading.Event, *, duration: float | None = None,
        every: float | None = math.inf, on_interval: Callable[[MetricsSnapshot], None] | None = None,
        reload: threading.Event | None = None, on_reload: Callable[[], None] | None = None,
    ) -> str | None:
        """Wait until `stop` is set (returns None), the source ends, or `duration` passes; returns why.

        `on_interval` is called with a snapshot every `every` seconds (the status
        log line; None: `metrics.log_interval`, which a reload may change).
        `on_reload` is called (on this thread) each time `reload` is set; it clears it.
        """
        now = self.clock.monotonic()
        deadline = now + duration if duration else math.inf
        next_call = now + self._every(every)
        while True:
            if self.clock.wait(stop, max(0.0, min(TICK, deadline - self.clock.monotonic()))):
                return None
            if reload is not None and reload.is_set():
                reload.clear()
                if on_reload is not None:
                    self.notifier.reloading()
                    on_reload()
                    self.notifier.ready()
            self._watchdog_beat()
            now = self.clock.monotonic()
            if self.pipeline.writer_failed:
                return WRITER_FAILED
            if self.source.done:
                return self._source_end()
            if now >= deadline:
                return f"duration of {duration:g}s reached"
            if on_interval is not None and now >= next_call:
                on_interval(self.pipeline.snapshot())
                next_call = now + self._every(every)

    def _watchdog_beat(self) -> None:
        """Ping systemd's watchdog when due, only while `liveness()` holds: a writer loop that stopped
        ticking (or a dead thread) stops the pings, and systemd aborts and restarts the service."""
        if not self.notifier.watchdog_due():
            return
        live, why = self.liveness()
        if not live:
            log.error("not pinging the systemd watchdog: %s", why)
        self.notifier.watchdog(live, why)

    def _every(self, every: float | None) -> float:
        return self.config.metrics.log_interval if every is None else every

    def reload(self, new: Config) -> Reload:
        """Apply the `LIVE_SETTINGS` of `new` (a validated config) now; name the other changes.

        Batch size and flush interval apply from the writer's next batch; the
        rest of `new` is ignored until a restart. For the caller thread of `start`.
        """
        old_tree, new_tree = self.config.to_dict(redact=False), new.to_dict(redact=False)
        changed = [f"{section}.{key}" for section, values in new_tree.items()
                   for key, value in values.items() if old_tree[section][key] != value]
        live = [k for k in changed if k in LIVE_SETTINGS]
        applied = tuple(f"{k} {_setting(self.config, k)!r} -> {_setting(new, k)!r}" for k in live)
        sections: dict[str, Any] = {}
        for dotted in live:
            section, _, key = dotted.partition(".")
            current = sections.get(section, getattr(self.config, section))
            sections[section] = dataclasses.replace(current, **{key: new_tree[section][key]})
        self.config = self.config.replace(**sections)
        self.pipeline.apply_writer_settings(self.config.writer)
        if self.metrics_server is not None:
            self.metrics_server.health_max_buffer_pct = self.config.metrics.health_max_buffer_pct
        logging.getLogger("tagwriter").setLevel(self.config.logging.level)
        return Reload(applied, tuple(k for k in changed if k not in LIVE_SETTINGS))

    def wait_source(self, timeout: float) -> bool:
        """Wait up to `timeout` for the source to end by itself; True if it did."""
        return self.source.join(timeout)

    def stop(self, hurry: threading.Event | None = None) -> bool | None:
        """Stop the source, then the pipeline; `hurry` set meanwhile spools what is pending at once.

        Returns Pipeline.stop's result, or None if that did not end within
        writer.shutdown_timeout + STOP_GRACE (values may be left in memory).
        """
        self.source.stop.set()
        self.source.join(SOURCE_JOIN)
        timeout = self.config.writer.shutdown_timeout
        result: list[bool] = []
        stopper = threading.Thread(target=lambda: result.append(self.pipeline.stop(timeout)),
                                   name="tagwriter-stop", daemon=True)
        stopper.start()
        give_up = self.clock.monotonic() + timeout + STOP_GRACE
        hurried = False
        while stopper.is_alive() and self.clock.monotonic() < give_up:
            if hurry is not None and hurry.is_set() and not hurried:
                hurried = True
                if self.pipeline.queue_directory is not None:
                    log.warning("second interrupt: stopping now; what is pending stays in the queue %s "
                                "(the next run writes it first)", self.pipeline.queue_directory)
                else:
                    log.warning("second interrupt: spooling what is pending now")
                self.pipeline.abort()
            stopper.join(TICK)
        if self.metrics_server is not None:
            self.metrics_server.stop(timeout=1.0)
        return result[0] if result else None

    def run(
        self, stop: threading.Event, *, hurry: threading.Event | None = None, duration: float | None = None,
        every: float | None = math.inf, on_interval: Callable[[MetricsSnapshot], None] | None = None,
        reload: threading.Event | None = None, on_reload: Callable[[], None] | None = None,
        stop_reason: Callable[[], str] = lambda: "stop requested",
    ) -> Verdict:
        """`start`, `watch`, `stop` and judge; an unexpected error spools what is pending, then propagates.

        Under systemd it notifies READY once started, RELOADING/READY around
        each reload, watchdog pings while live, and STOPPING before the stop.

        A `stop` set before the start (a signal during start-up) ends the run
        before anything is opened or read.
        """
        if stop.is_set():
            early = stop_reason()
            log.info("stopping before the start: %s", early)
            return self.verdict(early, self.pipeline.stop(0.0))
        self.start()
        self.notifier.ready("running")
        try:
            reason = self.watch(stop, duration=duration, every=every, on_interval=on_interval,
                                reload=reload, on_reload=on_reload)
            reason = reason if reason is not None else stop_reason()
            log.info("stopping: %s", reason)
            self.notifier.stopping(f"stopping: {reason}")
            stopped = self.stop(hurry)
        except BaseException:  # a bug here must not leave values in memory: spool them
            self.pipeline.abort()
            self.pipeline.stop(0.0)
            raise
        return self.verdict(reason, stopped)

    # -- the verdict -------------------------------------------------------

    def _source_end(self) -> str:
        if self.source.error is not None:
            return "the source failed"
        if self.source.input_error is not None:
            return "the input cannot be read"
        return "the source ended" if isinstance(self.source.source, SimulatedSource) else "end of input"

    def verdict(self, reason: str, stopped: bool | None) -> Verdict:
        """The outcome as data: the final snapshot, every problem and shortfall (none = ExitStatus.OK)."""
        s = self.pipeline.snapshot()
        elapsed = self.clock.monotonic() - (self._started_at or self.clock.monotonic())
        problems: list[Problem] = []
        if self.source.error is not None:
            problems.append(Problem(f"the source failed: {self.source.error!r}"))
        if self.source.input_error is not None:
            problems.append(Problem(str(self.source.input_error)))
        if stopped is None:
            problems.append(Problem("the stop did not finish in time; values may be left in memory"))
        if reason == WRITER_FAILED or self.pipeline.writer_failed:  # failed during the stop too
            problems.append(Problem("the writer thread failed; what it held was spooled",
                                    "the log has the traceback: please report it"))
        # What stays durable in the disk queue is not lost: the next run writes it first.
        lost = s.pending - min(s.pending, s.queue_values) + sum(
            n for r, n in s.dropped_by_reason.items() if r not in POLICY_DROPS)
        if stopped is not None and (not stopped or lost or s.submitted != s.accounted):
            problems.append(Problem(f"{lost} values could not be written or spooled",
                                    "check the disk of backup.directory and the log"))
        if s.bad_input_lost:
            problems.append(Problem(
                f"{s.bad_input_lost} malformed input lines could not be kept in quarantine "
                f"({self.pipeline.quarantine_directory})", "check that folder's disk and the log"))
        # Sticky: a fatal error counts even if a probe later saw the database recover.
        fatal = self.pipeline.fatal_error
        if s.fatal_errors or fatal is not None:
            problems.append(Problem(
                f"the database refused writes: {fatal or s.last_error}",
                (fatal.hint if fatal else "") or "fix it, then tagwriter replay writes the backup files"))
        return Verdict(reason, elapsed, s, stopped, tuple(problems), self._shortfalls(s))

    def _shortfalls(self, s: MetricsSnapshot) -> tuple[Problem, ...]:
        """What was counted but not kept as given: drops the overflow policy made, malformed input lines."""
        found: list[Problem] = []
        policy_drops = sum(n for r, n in s.dropped_by_reason.items() if r in POLICY_DROPS)
        if policy_drops:
            found.append(Problem(
                f"{policy_drops} values were dropped by the overflow policy "
                f"(buffer.overflow_policy = {self.config.buffer.overflow_policy!r})",
                "a larger buffer.capacity, or buffer.overflow_policy = 'spill' (what does not fit is spooled)"))
        if s.bad_input:
            found.append(Problem(f"{s.bad_input} input lines were malformed",
                                 "the log names each file:line; the lines are kept in the quarantine folder"))
        return tuple(found)


def _setting(config: Config, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(config, section), key)

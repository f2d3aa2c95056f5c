"""`tagwriter run`: the pipeline from the effective config, with a live panel or status log lines.

Signal handlers only set Events; the main thread watches them, the source
and the duration, and runs `pipeline.stop()` in a helper thread so the panel
keeps showing the drain and a second interrupt can make the stop hurry
(`pipeline.abort()`: spool what is pending now).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console, RenderableType
from rich.live import Live

from tagwriter.cli.common import (
    BatchSizeOption,
    DatabaseOption,
    FlushIntervalOption,
    boundary,
    database_option,
    fail,
    load_config,
    setup_logging,
)
from tagwriter.config import Config
from tagwriter.errors import PipelineStopped
from tagwriter.logs import configure_logging
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import PollingData
from tagwriter.pipeline import Pipeline
from tagwriter.sources.files import FeedResult, LineSource, feed
from tagwriter.sources.simulate import Simulator, run_paced
from tagwriter.ui.panel import render_panel

log = logging.getLogger("tagwriter.run")

TICK = 0.25  # seconds between checks of the main loop
PANEL_HZ = 2.0
PRODUCER_JOIN = 1.0  # seconds a stopping source may take to hand over its last chunk
STOP_GRACE = 30.0  # beyond writer.shutdown_timeout, for spooling and sealing files
#: Drops the overflow policy makes on purpose (counted, reported); any other reason is a loss.
POLICY_DROPS = frozenset({"overflow", "block_timeout"})
SUFFIX_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


class SourceKind(StrEnum):
    simulate = "simulate"
    jsonl = "jsonl"
    csv = "csv"


@boundary
def run(
    ctx: typer.Context,
    duration: Annotated[
        float | None,
        typer.Option("--duration", "-d", min=0.1, help="Stop gracefully after SECONDS (default: run until stopped)."),
    ] = None,
    source: Annotated[
        SourceKind | None, typer.Option("--source", "-s", help="Where values come from (overrides source.kind).")
    ] = None,
    input_path: Annotated[
        str | None,
        typer.Option("--input", "-i", metavar="PATH",
                     help="jsonl/csv input file, '-' for standard input (overrides source.path)."),
    ] = None,
    database: DatabaseOption = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed of the simulated source.")] = None,
    batch_size: BatchSizeOption = None,
    flush_interval: FlushIntervalOption = None,
    no_panel: Annotated[
        bool, typer.Option("--no-panel", help="No live panel: one status log line every metrics.log_interval seconds.")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", metavar="PORT", help="Serve HTTP metrics on this port (metrics.port)."),
    ] = None,
) -> None:
    """Write tag values from the configured source to the database until stopped.

    Shows a live panel on a terminal (else a status log line every
    metrics.log_interval seconds). Ctrl-C or SIGTERM stops gracefully within
    writer.shutdown_timeout, spooling what cannot be written in time; a second
    Ctrl-C spools what is pending at once. A jsonl/csv source stops at the end
    of its input. Prints the final counts.

    Exit status: 0 when every value was written, spooled or quarantined (bad
    input lines are quarantined too); 1 if any value could not be written or
    spooled, or the database refused writes for good (writer state failed).

    Example: tagwriter run --duration 20 --database sqlite:///tagwriter.db
    """
    database_option(database)
    kind = source.value if source is not None else _kind_from_suffix(input_path)
    config = load_config(ctx, {
        "source.kind": kind,
        "source.path": input_path,
        "source.seed": seed,
        "database.url": database,
        "writer.batch_size": batch_size,
        "writer.flush_interval": flush_interval,
        "metrics.port": metrics_port,
    })
    if input_path is not None and config.source.kind == "simulate":
        raise fail(f"--input {input_path}: the source is simulate", hint="add --source jsonl or --source csv", code=2)
    src = config.source
    if src.kind != "simulate" and src.path != "-" and not Path(src.path).is_file():
        raise fail(f"source.path = {src.path!r}: no such input file", hint="give an existing file, or '-' for stdin")
    console = Console(highlight=False)
    panel = console.is_terminal and not no_panel
    if panel:
        configure_logging(config.logging.level, config.logging.file or None,
                          max_bytes=config.logging.max_bytes, backup_count=config.logging.backup_count,
                          console_handler=ConsoleLogHandler(console))
    else:
        setup_logging(config)
    code = Runner(config, console, panel=panel, duration=duration).run()
    raise typer.Exit(code=code)


def _kind_from_suffix(path: str | None) -> str | None:
    """jsonl or csv from an input file's name; None when it does not say."""
    return SUFFIX_KINDS.get(Path(path).suffix.lower()) if path else None



class ConsoleLogHandler(logging.Handler):
    """Prints log records through the Rich console, so they appear above the live panel."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a broken terminal must not break the run
            self.handleError(record)


class StopRequests:
    """What the signal handlers ask for, as Events: `stop` first, `hurry` on a repeat."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self.reason = ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.hurry.set()
            return
        self.reason = signal.Signals(signum).name
        self.stop.set()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM while inside; the old handlers come back after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


class Producer:
    """The source, on its own thread: simulated polls in real time, or a jsonl/csv stream."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.stop = threading.Event()
        self.feed = FeedResult()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tagwriter-source", daemon=True)

    @property
    def kind(self) -> str:
        return self.config.source.kind

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self.kind == "simulate":
                sim = Simulator.from_config(self.config.source)
                log.info("simulating %d groups x %d tags every %gs (%s values/s)",
                         sim.groups, sim.tags_per_group, sim.interval, f"{sim.rate:,.0f}")
                run_paced(sim, self._submit, self.stop)
            else:
                lines = LineSource(self.kind, self.config.source.path)
                log.info("reading %s from %s", self.kind, lines.name)
                feed(lines, self.pipeline, self.stop, self.feed)
        except Exception as exc:  # a bug in a source: end the run, report it
            log.exception("the source failed")
            self.error = exc

    def _submit(self, poll: PollingData) -> None:
        try:
            self.pipeline.submit(poll)
        except PipelineStopped:
            self.stop.set()


class Runner:
    """One `tagwriter run`: start, watch, stop, report. `run()` returns the exit code."""

    def __init__(
        self, config: Config, console: Console, *, panel: bool, duration: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.console = console
        self.panel = panel
        self.duration = duration
        self.clock = clock
        self.requests = StopRequests()
        self.pipeline = Pipeline(config)
        self.target = self.pipeline.sink.describe()
        self.producer = Producer(config, self.pipeline)

    def run(self) -> int:
        started = self.clock()
        with self.requests.installed():
            self.pipeline.start()
            self.producer.start()
            live = (
                Live(get_renderable=self._render, console=self.console, refresh_per_second=PANEL_HZ)
                if self.panel else nullcontext()
            )
            try:
                with live:
                    reason = self._watch(started)
                    log.info("stopping: %s", reason)
                    stopped = self._stop()
            except BaseException:  # a bug here must not leave values in memory: spool them
                self.pipeline.abort()
                self.pipeline.stop(0.0)
                raise
        return self._report(reason, stopped, self.clock() - started)

    def _render(self) -> RenderableType:
        return render_panel(self.pipeline.snapshot(), target=self.target)

    def _watch(self, started: float) -> str:
        """Wait until a signal, the end of the input, or the duration; returns why."""
        deadline = started + self.duration if self.duration else math.inf
        interval = self.config.metrics.log_interval
        next_log = started + interval
        while True:
            if self.requests.stop.wait(max(0.0, min(TICK, deadline - self.clock()))):
                return f"{self.requests.reason} received"
            now = self.clock()
            if self.producer.done():
                return self._source_end()
            if now >= deadline:
                return f"duration of {self.duration:g}s reached"
            if not self.panel and now >= next_log:
                log.info("%s", status_line(self.pipeline.snapshot()))
                next_log = now + interval

    def _source_end(self) -> str:
        if self.producer.error is not None:
            return "the source failed"
        if self.producer.feed.error is not None:
            return "the input cannot be read"
        return "end of input" if self.producer.kind != "simulate" else "the source ended"

    def _stop(self) -> bool | None:
        """Stop the source, then the pipeline (in a helper thread); None if that did not end."""
        self.producer.stop.set()
        self.producer.join(PRODUCER_JOIN)
        timeout = self.config.writer.shutdown_timeout
        result: list[bool] = []
        stopper = threading.Thread(target=lambda: result.append(self.pipeline.stop(timeout)),
                                   name="tagwriter-stop", daemon=True)
        stopper.start()
        give_up = self.clock() + timeout + STOP_GRACE
        hurried = False
        while stopper.is_alive() and self.clock() < give_up:
            if self.requests.hurry.is_set() and not hurried:
                hurried = True
                log.warning("second interrupt: spooling what is pending now")
                self.pipeline.abort()
            stopper.join(TICK)
        return result[0] if result else None

    def _report(self, reason: str, stopped: bool | None, elapsed: float) -> int:
        s = self.pipeline.snapshot()
        def echo(text: str) -> None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

        echo(f"stopped after {elapsed:.1f}s: {reason}")
        adds_up = s.submitted == s.accounted
        echo(
            f"submitted {s.submitted} = written {s.written} + duplicates {s.duplicates} + spooled {s.spooled} + "
            f"quarantined {s.quarantined} + dropped {s.dropped} + pending {s.pending}"
            f"  ({'adds up' if adds_up else 'DOES NOT ADD UP'})",
        )
        echo(f"batches: {s.batches_ok} written, {s.batches_failed} failed, {s.retries} retries")
        if s.dropped_by_reason:
            echo("dropped by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(s.dropped_by_reason.items())),
)
        if s.bad_input:
            echo(f"malformed input lines: {s.bad_input}, kept in {self.pipeline.spool.quarantine_directory}",
)
        if s.spooled or s.backup_files:
            echo(f"backup: {s.backup_files} files, {s.backup_bytes} bytes in {self.pipeline.spool.directory}"
                 " (tagwriter replay writes them to the database)")
        return self._exit_code(s, stopped, adds_up)

    def _exit_code(self, s: MetricsSnapshot, stopped: bool | None, adds_up: bool) -> int:
        problems: list[tuple[str, str]] = []
        if self.producer.error is not None:
            problems.append((f"the source failed: {self.producer.error!r}", ""))
        if self.producer.feed.error is not None:
            problems.append((str(self.producer.feed.error), ""))
        if stopped is None:
            problems.append(("the stop did not finish in time; values may be left in memory", ""))
        lost = s.pending + sum(n for r, n in s.dropped_by_reason.items() if r not in POLICY_DROPS)
        if stopped is not None and (not stopped or lost or not adds_up):
            problems.append((f"{lost} values could not be written or spooled",
                             "check the disk of backup.directory and the log"))
        # Sticky: a fatal error counts even if a probe later saw the database recover.
        fatal = self.pipeline.writer.fatal_error or self.pipeline.writer.last_fatal_error
        if s.fatal_errors or fatal is not None:
            problems.append((f"the database refused writes: {fatal or s.last_error}",
                             (fatal.hint if fatal else "") or "fix it, then tagwriter replay writes the backup files"))
        for message, hint in problems:
            fail(message, hint)
        return 1 if problems else 0


def status_line(s: MetricsSnapshot) -> str:
    """The concise status log line written when there is no panel."""
    line = (
        f"{s.state} | buffer {s.buffer_size}/{s.buffer_capacity} ({s.buffer_utilization_pct:.1f}%)"
        f" | in {s.rate_in_per_s:.0f}/s out {s.rate_out_per_s:.0f}/s"
        f" | written {s.written} dup {s.duplicates} spooled {s.spooled}"
        f" quarantined {s.quarantined} dropped {s.dropped}"
        f" | write p99 {s.p99_write_latency_5m_s * 1000:.1f} ms | backup {s.backup_files} files"
    )
    if s.backlog_rows:
        line += f" | backlog {s.backlog_rows} rows"
    if s.last_error and s.state != "writing":
        line += f" | last error: {s.last_error}"
    return line


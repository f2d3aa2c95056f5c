"""`tagwriter run`: options, signals, the live panel and printing around `tagwriter.service.Service`.

Signal handlers only set Events (tagwriter/cli/signals.py); the service
watches them, the source and the duration, and stops the pipeline on a
helper thread so the panel keeps showing the drain and a second interrupt
can make the stop hurry (spool what is pending now). SIGHUP reloads the
config. Console output goes through tagwriter/cli/terminal.py: a terminal
that closes (or a pipe whose reader went away) silences the panel, never the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
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
    warn,
)
from tagwriter.cli.signals import SignalRequests, take_early
from tagwriter.cli.terminal import stdout_console
from tagwriter.config import SOURCE_KINDS, Config
from tagwriter.errors import TagwriterError
from tagwriter.logs import configure_logging, reopen_log_files
from tagwriter.metrics import MetricsSnapshot
from tagwriter.service import EXIT_MEANINGS, ExitStatus, Service, Verdict, source_from_config
from tagwriter.ui.panel import render_panel

log = logging.getLogger("tagwriter.run")

PANEL_HZ = 2.0
SUFFIX_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


class Durability(StrEnum):
    MEMORY = "memory"
    DISK = "disk"


#: `tagwriter run` queues on disk unless the config file, the environment or --durability says otherwise;
#: the library's own default (and every other command's) stays memory.
RUN_DEFAULTS = {"buffer.durability": "disk"}


SourceKind = StrEnum("SourceKind", {kind: kind for kind in SOURCE_KINDS})  # type: ignore[misc]


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
    durability: Annotated[
        Durability | None,
        typer.Option("--durability", help="memory, or disk: fsynced to the queue folder first (buffer.durability; "
                     "default disk for run)."),
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Read --input from its first line, not after the last durable one.")
    ] = False,
) -> None:
    """Write tag values from the configured source to the database until stopped.

    Shows a live panel on a terminal (else a status log line every
    metrics.log_interval seconds). Ctrl-C or SIGTERM stops gracefully within
    writer.shutdown_timeout, spooling what cannot be written in time; a second
    Ctrl-C spools what is pending at once. SIGHUP reloads the config (batch
    size, flush interval, shutdown timeout, health threshold, log interval
    and log level apply at once) and reopens the log file. A jsonl/csv source
    stops at the end of its input. Prints the final counts.

    Exit status: {exit_status}.

    Example: tagwriter run --duration 20 --database sqlite:///tagwriter.db
    """
    database_option(database)
    kind = source.value if source is not None else _kind_from_suffix(input_path)
    overrides = {
        "source.kind": kind,
        "source.path": input_path,
        "source.seed": seed,
        "database.url": database,
        "writer.batch_size": batch_size,
        "writer.flush_interval": flush_interval,
        "metrics.port": metrics_port,
        "buffer.durability": durability.value if durability is not None else None,
    }
    config = load_config(ctx, overrides, RUN_DEFAULTS)
    if input_path is not None and config.source.kind == "simulate":
        raise fail(f"--input {input_path}: the source is simulate", hint="add --source jsonl or --source csv", code=2)
    src = config.source
    if src.kind in ("jsonl", "csv") and src.path != "-" and not Path(src.path).is_file():
        raise fail(f"source.path = {src.path!r}: no such input file", hint="give an existing file, or '-' for stdin")
    console = stdout_console()
    panel = console.is_terminal and not no_panel
    if panel:
        configure_logging(config.logging.level, config.logging.file or None,
                          max_bytes=config.logging.max_bytes, backup_count=config.logging.backup_count,
                          console_handler=ConsoleLogHandler(console), fmt=config.logging.format)
    else:
        setup_logging(config)
    runner = Runner(config, console, panel=panel, duration=duration, from_start=from_start,
                    load=lambda: load_config(ctx, overrides, RUN_DEFAULTS))
    raise typer.Exit(code=runner.run())


# The codes and their meanings are data in tagwriter.service; the help says them from there.
run.__doc__ = (run.__doc__ or "").replace(
    "{exit_status}", "; ".join(f"{int(code)} {meaning}" for code, meaning in sorted(EXIT_MEANINGS.items())))


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


class Runner:
    """One `tagwriter run` on a console: the service, with a panel or status lines. `run()` returns the exit code.

    `load` reads the config again (file, environment, the same flags) for a reload on SIGHUP.
    """

    def __init__(
        self, config: Config, console: Console, *, panel: bool, duration: float | None,
        load: Callable[[], Config] | None = None, from_start: bool = False,
    ) -> None:
        self.config = config
        self.console = console
        self.panel = panel
        self.duration = duration
        self.load = load
        # The entry point's requests hold a signal that came during start-up; else (a test harness) fresh ones.
        self.requests = take_early() or SignalRequests()
        self.service = Service(config, source_from_config(config, from_start=from_start))

    def run(self) -> int:
        with self.requests.installed():
            live = (
                Live(get_renderable=self._render, console=self.console, refresh_per_second=PANEL_HZ)
                if self.panel else nullcontext()
            )
            with live:
                verdict = self.service.run(
                    self.requests.stop, hurry=self.requests.hurry, duration=self.duration,
                    every=math.inf if self.panel else None,  # None: metrics.log_interval, reloadable
                    on_interval=lambda s: log.info("%s", status_line(s)),
                    reload=self.requests.reload, on_reload=self.reload,
                    stop_reason=lambda: f"{self.requests.reason} received",
                )
        self._report(verdict)
        return int(verdict.exit_code)

    def reload(self) -> None:
        """SIGHUP: reopen the log files, read the config again, apply what can change live, name the rest.

        A config that does not load or validate is reported; the run goes on with the one it has.
        """
        reopen_log_files()  # first, so the lines below land in the new file after logrotate
        log.info("SIGHUP received: reloading the config")
        if self.load is None:
            return
        try:
            new = self.load()
        except TagwriterError as exc:
            hint = f" (hint: {exc.hint})" if exc.hint else ""
            log.error("reload: the config is not valid, running on with the old one: %s%s", exc, hint)
            return
        except typer.Exit:  # a flag value load_config has reported
            log.error("reload: the config is not valid, running on with the old one")
            return
        result = self.service.reload(new)
        for change in result.applied:
            log.info("reload: applied %s", change)
        if result.need_restart:
            log.warning("reload: changed, but applied only after a restart: %s", ", ".join(result.need_restart))
        if not result.applied and not result.need_restart:
            log.info("reload: no setting changed")

    def _render(self) -> RenderableType:
        pipeline = self.service.pipeline
        return render_panel(pipeline.snapshot(), target=pipeline.target)

    def _report(self, v: Verdict) -> None:
        s = v.snapshot
        pipeline = self.service.pipeline

        def echo(text: str) -> None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

        echo(f"stopped after {v.elapsed:.1f}s: {v.reason}")
        echo(
            f"submitted {s.submitted} = written {s.written} + duplicates {s.duplicates} + spooled {s.spooled} + "
            f"quarantined {s.quarantined} + dropped {s.dropped} + pending {s.pending}"
            f"  ({'adds up' if v.adds_up else 'DOES NOT ADD UP'})",
        )
        echo(f"batches: {s.batches_ok} written, {s.batches_failed} failed, {s.retries} retries")
        if s.durability == "disk":
            echo(f"queue: recovered {s.queue_recovered} values at start; {s.queue_values} stay queued on disk in "
                 f"{pipeline.queue_directory}" + (" (the next run writes them first)" if s.queue_values else ""))
        if s.dropped_by_reason:
            echo("dropped by reason: " + ", ".join(f"{k} {n}" for k, n in sorted(s.dropped_by_reason.items())))
        if s.bad_input_lost:
            echo(f"malformed input lines: {s.bad_input + s.bad_input_lost}, {s.bad_input} kept in "
                 f"{pipeline.quarantine_directory}, {s.bad_input_lost} NOT kept (the quarantine write failed)")
        elif s.bad_input:
            echo(f"malformed input lines: {s.bad_input}, kept in {pipeline.quarantine_directory}")
        for line in spool_summary(s, pipeline.spool_directory, auto_replay=self.config.backup.auto_replay):
            echo(line)
        for shortfall in v.shortfalls:
            warn(f"{shortfall.message} (exit status {int(ExitStatus.SHORTFALL)}): {shortfall.hint}")
        for problem in v.problems:
            fail(problem.message, problem.hint)


def spool_summary(s: MetricsSnapshot, folder: Path, *, auto_replay: bool) -> list[str]:
    """What became of the backup files: what the automatic recovery drained, and what is left.

    The hint to replay comes only with files left; a spool drained to the end says so.
    """
    x = s.extra
    written, duplicates = x.get("replayed", 0), x.get("replay_duplicates", 0)
    quarantined = x.get("replay_quarantined", 0)
    drained = written + duplicates + quarantined
    lines = []
    if drained:
        bad = f", {x['replay_bad_lines']} malformed lines quarantined" if x.get("replay_bad_lines") else ""
        lines.append(f"recovered: drained {drained} rows from backup files into the database ({written} written, "
                     f"{duplicates} duplicates, {quarantined} quarantined{bad}; "
                     f"{_plural(x.get('replayed_files', 0), 'file')} done)")
    if s.backup_files:
        later = "; so does the next run" if auto_replay else ""
        lines.append(f"backup: {_plural(s.backup_files, 'file')}, {s.backup_bytes} bytes left in {folder} "
                     f"(tagwriter replay writes them to the database{later})")
    elif s.spooled or drained:
        lines.append(f"backup: no files left in {folder}")
    return lines


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def status_line(s: MetricsSnapshot) -> str:
    """The concise status log line written when there is no panel."""
    write_p99 = f"{s.p99_write_latency_5m_s * 1000:.1f} ms" if s.write_latency_samples_5m else "–"
    line = (
        f"{s.state} | buffer {s.buffer_size}/{s.buffer_capacity} ({s.buffer_utilization_pct:.1f}%)"
        f" | in {s.rate_in_per_s:.0f}/s out {s.rate_out_per_s:.0f}/s"
        f" | written {s.written} dup {s.duplicates} spooled {s.spooled}"
        f" quarantined {s.quarantined} dropped {s.dropped}"
        f" | write p99 {write_p99} | backup {s.backup_files} files"
    )
    if s.durability == "disk":
        line += f" | queue {s.queue_values} on disk"
    if s.backlog_rows:
        line += f" | backlog {s.backlog_rows} rows"
    if s.last_error and s.state != "writing":
        line += f" | last error: {s.last_error}"
    return line


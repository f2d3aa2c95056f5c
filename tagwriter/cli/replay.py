"""`tagwriter replay FILES...` (alias `replay-backups`): spool files back into the database."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from tagwriter.cli.common import (
    DatabaseOption,
    boundary,
    database_option,
    err_console,
    fail,
    global_options,
    load_config,
    setup_logging,
)
from tagwriter.config import DEFAULT_PATH, Config, DatabaseConfig, env_settings, read_toml
from tagwriter.logs import configure_logging
from tagwriter.replay import FileReport, FileStatus, ReplayReport, expand, replay_files
from tagwriter.replay import Progress as ProgressCallback
from tagwriter.sinks import create_sink
from tagwriter.spool import Spool
from tagwriter.spoolformat import count_lines
from tagwriter.spooltarget import TargetMismatch, replay_database

PLAIN_EVERY = 5.0  # seconds between plain progress lines
SHOWN_PROBLEMS = 10  # bad lines printed per file (all are counted and quarantined)
TABLE_WIDTH = 160  # columns of the report when not on a terminal


class RowRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "- rows/s")


@boundary
def replay(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Argument(metavar="FILES", help="Spool files, e.g. backup/*.csv (a folder stands for its spool files).",
                       show_default=False),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Parse and validate every file; touch no database, move nothing.")
    ] = False,
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete fully replayed files instead of moving them to <backup>/replayed/.")
    ] = False,
    from_quarantine: Annotated[
        bool, typer.Option("--from-quarantine",
                           help="Re-submit quarantine files (rows the database rejected), after fixing the cause.")
    ] = False,
    rate: Annotated[
        float, typer.Option("--rate", metavar="VALUES_PER_S", min=0.0,
                            help="Write at most this many values per second (0 = as fast as possible).")
    ] = 0.0,
    database: DatabaseOption = None,
    ignore_target: Annotated[
        bool, typer.Option("--ignore-target",
                           help="Replay into the configured or given database although the spool folder's "
                                ".target records another one.")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, max=10_000, help="Rows per transaction [writer.batch_size].")
    ] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar [on a terminal].", show_default=False)
    ] = None,
) -> None:
    """Replay spool (backup) files into the database they were spooled for, each value exactly once.

    The database is the one the spool folder's .target records (written by
    `tagwriter run`); a configured or given database that differs is refused
    (exit 2) unless --ignore-target. Without a .target: the configured one.
    Rows already in the table count as duplicates, so a file can be replayed
    again safely. Bad lines and rows the database rejects go to the quarantine
    folder. Exit 0 if every row read was inserted or a duplicate, else 1.

    Example: tagwriter replay backup/*.csv
    """
    database_option(database)
    config = load_config(ctx, {"writer.batch_size": batch_size, "database.url": database})
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: keep each file's table row on one line
        console = Console(highlight=False, width=max(console.width, TABLE_WIDTH))
    bar = console.is_terminal if progress is None else progress
    if bar:
        setup_logging(config, console=False)
        lc = config.logging
        configure_logging(lc.level, lc.file or None, max_bytes=lc.max_bytes, backup_count=lc.backup_count,
                          console_handler=RichHandler(console=console, show_path=False), fmt=lc.format)
    else:
        setup_logging(config)
    paths = expand(files, from_quarantine=from_quarantine)
    b = config.backup
    spool = Spool(b.directory, b.quarantine_directory, roll_rows=b.roll_rows, roll_seconds=b.roll_seconds)
    sink = None if dry_run else create_sink(_database(ctx, config, paths, given=database,
                                                      ignore_target=ignore_target, console=console))

    def run(progress: ProgressCallback) -> ReplayReport:
        return replay_files(
            paths, sink=sink, spool=spool, batch_size=config.writer.batch_size,
            retry_delays=config.writer.retry_delays, rate=rate, dry_run=dry_run, delete=delete,
            from_quarantine=from_quarantine, progress=progress,
        )

    total = sum(count_lines(p) for p in paths if p.is_file())
    if bar:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RowRateColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as live:
            task = live.add_task("replay", total=total)

            def advance(path: Path, n: int) -> None:
                live.update(task, advance=n, description=path.name)

            report = run(advance)
    else:
        report = run(PlainProgress(console, total, "checking" if dry_run else "replaying"))
    _print_report(console, report, spool)
    if not report.ok:
        raise fail(f"not everything was replayed: {report.reason()}",
                   _hint(report, spool, files, paths, from_quarantine=from_quarantine))
    what = "checked" if dry_run else "replayed"
    console.print(
        f"{what} {len(report.files)} file{'s' * (len(report.files) != 1)}: {report.total('rows_read'):,} rows"
        + ("" if dry_run else f", {report.total('inserted'):,} inserted, "
           f"{report.total('duplicates'):,} already in the table")
    )


class PlainProgress:
    """Progress as plain lines (not a terminal): one per file, then one every PLAIN_EVERY seconds."""

    def __init__(self, console: Console, total: int, verb: str = "replaying") -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.path: Path | None = None
        self.start = self.last = time.monotonic()
        self.verb = verb

    def __call__(self, path: Path, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if path != self.path:
            self.path = path
            self.console.print(f"{self.verb} {path}", markup=False)
        elif now - self.last >= PLAIN_EVERY:
            rate = self.done / max(now - self.start, 1e-9)
            left = self.total - self.done
            eta = f", ETA {left / rate:.0f}s" if rate and left > 0 else ""
            self.console.print(f"  {self.done:,}/{self.total:,} rows, {rate:,.0f} rows/s{eta}")
        else:
            return
        self.last = now


def _result(f: FileReport) -> str:
    if f.status is FileStatus.REPLAYED and f.moved_to is not None:
        where = f.moved_to if f.moved_to.name != f.path.name else f"{f.moved_to.parent}/"
        return f"moved to {where}"
    if f.status in (FileStatus.DELETED, FileStatus.CHECKED):
        return str(f.status)
    if f.status is FileStatus.REFUSED:
        return "REFUSED (see above); left in place"
    return f"{f.status.upper()}: {f.error}; left in place"


def _print_report(console: Console, report: ReplayReport, spool: Spool) -> None:
    for f in report.files:
        if f.status is FileStatus.REFUSED:  # "file:1: not a tagwriter spool file (...)"
            where = f.problems[0] if f.problems else f"{f.path}: {f.error}"
            err_console.print(f"{where}; refused, left in place", markup=False)
            continue
        for problem in f.problems[:SHOWN_PROBLEMS]:
            err_console.print(problem, markup=False)
        more = f.bad_lines - min(len(f.problems), SHOWN_PROBLEMS)
        if more > 0:
            err_console.print(f"{f.path}: ... and {more:,} more bad lines", markup=False)
    table = Table(title="dry run (nothing written)" if report.dry_run else None)
    table.add_column("file", overflow="fold")
    for name in ("rows read", "inserted", "duplicate", "quarantined", "bad lines"):
        table.add_column(name, justify="right")
    table.add_column("result", overflow="fold")
    for f in report.files:
        table.add_row(str(f.path), f"{f.rows_read:,}", f"{f.inserted:,}", f"{f.duplicates:,}",
                      f"{f.quarantined:,}", f"{f.bad_lines:,}", _result(f))
    if len(report.files) > 1:
        table.add_row("total", *(f"{report.total(k):,}" for k in
                                 ("rows_read", "inserted", "duplicates", "quarantined", "bad_lines")), "")
    console.print(table)
    if not report.dry_run and (report.total("bad_lines") or report.total("quarantined")):
        console.print(f"bad lines and rejected rows were copied to {spool.quarantine_directory}")


def _database(
    ctx: typer.Context, config: Config, paths: list[Path], *, given: str | None, ignore_target: bool, console: Console
) -> DatabaseConfig:
    """The database to replay into (see `spooltarget.replay_database`); exit 2 on a mismatch."""
    try:
        choice = replay_database(config.database, paths, chosen=_database_chosen(ctx, given),
                                 given_as_flag=bool(given), ignore_target=ignore_target)
    except TargetMismatch as exc:
        raise fail(str(exc), exc.hint, code=2) from None
    if choice.note:
        console.print(choice.note, markup=False)
    return choice.database


def _database_chosen(ctx: typer.Context, given: str | None) -> str:
    """Where the database was chosen: '--database', the config file or the variable ('' = the default)."""
    if given:
        return "--database"
    path = global_options(ctx).config_path or (DEFAULT_PATH if DEFAULT_PATH.is_file() else None)
    section = read_toml(Path(path)).get("database", {}) if path is not None else {}
    if isinstance(section, dict) and ({"url", "dsn"} & section.keys()):
        return f"database.url in {path}"
    for name, key in env_settings(os.environ, lambda message: None).items():
        if key in (("database", "url"), ("database", "dsn")):
            return f"environment {name}"
    return ""


def _hint(report: ReplayReport, spool: Spool, given: list[Path], paths: list[Path], *, from_quarantine: bool) -> str:
    failed = [f for f in report.files if f.status is FileStatus.FAILED]
    fatal = next((f for f in failed if f.fatal), None)
    if fatal is not None:  # the table or the configuration: running again changes nothing
        return (f"{fatal.hint or 'fix the database or the configuration'}; then run the same command again "
                "(rows already written count as duplicates)")
    if failed or any(f.status is FileStatus.SKIPPED for f in report.files):
        return ("files that failed or were skipped stay in place: run the same command again once the "
                "database is reachable (rows already written count as duplicates)")
    if not report.files:
        pattern = "quarantine-*.csv" if from_quarantine else "tagwriter-*.csv"
        return f"no {pattern} files in {', '.join(map(str, given))}: check the path"
    if report.dry_run:
        return "bad lines are quarantined when the files are replayed for real"
    hints = []
    if report.total("quarantined"):
        hints.append(f"rows the database rejected are in {spool.quarantine_directory}; after fixing the cause "
                     f"(the table or the values): tagwriter replay --from-quarantine {spool.quarantine_directory}")
    if report.total("bad_lines"):
        kept = sorted(set(expand([spool.quarantine_directory], from_quarantine=True)) - set(paths))
        where = ", ".join(map(str, kept)) if kept else str(spool.quarantine_directory)
        hints.append("bad lines replay only once corrected by hand: in " + where + ", fill in tag_name, ts, "
                     "value and quality of each BAD_LINE entry (its raw field is the line as read), then "
                     "tagwriter replay --from-quarantine FILE")
    if hints:
        return "; ".join(hints)
    return "a refused file is not a tagwriter spool file; check the path"

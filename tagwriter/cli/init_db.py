"""`tagwriter init-db`: create the configured database's table with its unique key (idempotent)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from tagwriter.bounded import close_bounded, run_bounded
from tagwriter.checks import verify_table
from tagwriter.cli.common import DatabaseOption, boundary, database_option, fail, load_config
from tagwriter.errors import FatalError
from tagwriter.sinks import create_sink
from tagwriter.sinks.base import AdminSink, Sink


@boundary
def init_db(
    ctx: typer.Context,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the DDL and exit; touch no database (for a DBA to run).")
    ] = False,
    partition_by_day: Annotated[
        bool, typer.Option("--partition-by-day", help="Oracle: interval range partitions of one day on ts.")
    ] = False,
    read_index: Annotated[
        bool, typer.Option("--read-index",
                           help="Also index (tag, ts) for one-tag time-range reads where the key does not "
                                "(SQLite); costs insert speed.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Give up after this many seconds.")
    ] = 60.0,
    database: DatabaseOption = None,
) -> None:
    """Create the table (tag, ts, value, quality) with its unique key for the configured database.

    An existing table with the expected shape is reported and left alone; one
    with a different shape is an error that lists what differs.

    Example: tagwriter init-db --print > create_tag_values.sql
    """
    database_option(database)
    config = load_config(ctx, {"database.url": database})
    sink = create_sink(config.database)
    if sink.kind == "jetstream":  # a stream, not a table
        return _init_stream(sink, print_only, timeout)
    if not isinstance(sink, AdminSink):
        raise fail(f"the {sink.kind} sink cannot create its table")
    stmts = sink.ddl(read_index=read_index, partition_by_day=partition_by_day)
    if print_only:
        typer.echo("\n\n".join(s if s.startswith("--") else f"{s};" for s in stmts))
        return
    console = Console(highlight=False)
    try:
        message = run_bounded(lambda: _init(sink, read_index, partition_by_day), timeout, "init-db",
                              hint="host reachable? a lock on the table, or an overloaded database? "
                                   "raise --timeout if it is just slow")
    finally:
        close_bounded(sink.close)
    console.print(message)


def _init(sink: AdminSink, read_index: bool, partition_by_day: bool) -> str:
    """Create the table or check the existing one; the line to print, or raise."""
    target = sink.describe()
    info = sink.inspect_table()
    if info is None:
        sink.create_table(read_index=read_index, partition_by_day=partition_by_day)
        created = sink.inspect_table()
        if created is None:
            raise FatalError(f"created the table but cannot see it: {target}")
        key = ", ".join(created.key) or "none"
        return f"created {target} (unique key: {key})"
    verify_table(sink, info, name=target)
    notes = []
    if read_index:
        sink.create_table(read_index=True)  # idempotent: adds only the index
        notes.append("read index ensured")
    if partition_by_day:
        notes.append("--partition-by-day applies only when the table is created")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{target} already exists with the expected columns and key: nothing to do{extra}"


def _init_stream(sink: Sink, print_only: bool, timeout: float) -> None:
    """init-db for a JetStream sink: make the stream with the defaults if missing, else check it takes
    the subject (`tagwriter jetstream setup` chooses the settings). --print: its config as JSON."""
    from tagwriter.sinks.jetstream import JetStreamSink
    from tagwriter.streamadmin import StreamSettings, default_subjects, ensure_stream, stream_config

    assert isinstance(sink, JetStreamSink)
    settings = StreamSettings(sink.stream, default_subjects(sink.stream, sink.subject))
    if print_only:
        typer.echo(json.dumps(stream_config(settings, 1), indent=2))
        return
    try:
        message = run_bounded(lambda: ensure_stream(sink, settings), timeout, "init-db")
    finally:
        close_bounded(sink.close)
    Console(highlight=False).print(message, markup=False)

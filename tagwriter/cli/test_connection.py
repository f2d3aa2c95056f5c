"""`tagwriter test-connection`: run `tagwriter.checks.run_checks` on the configured database and show the results."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tagwriter.bounded import close_bounded
from tagwriter.checks import CheckResult, run_checks
from tagwriter.cli.common import DatabaseOption, boundary, database_option, fail, load_config
from tagwriter.sinks import create_sink
from tagwriter.sinks.base import AdminSink, TableSpec

MARKS = {"pass": "✓", "fail": "✗", "skipped": "–"}


def render(results: list[CheckResult], target: str) -> Table:
    """The results as a Rich table: mark, check, time, and the detail or error with its hint."""
    table = Table(title=f"test-connection: {target}", title_justify="left", show_lines=False)
    table.add_column("", width=1)
    table.add_column("check")
    table.add_column("time", justify="right")
    table.add_column("result")
    for r in results:
        style = {"pass": "green", "fail": "red", "skipped": "dim"}[r.status]
        text = r.detail
        if r.status == "fail":
            text = f"{r.code}: {r.detail}" if r.code else r.detail
            if r.hint:
                text += f"\nhint: {r.hint}"
        ms = r.seconds * 1000
        took = "" if r.status == "skipped" else f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"
        table.add_row(f"[{style}]{MARKS[r.status]}[/]", r.name, took, text)
    return table


@boundary
def test_connection(
    ctx: typer.Context,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Finish within this many seconds, whatever the database does.")
    ] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON (for scripts).")] = False,
    pings: Annotated[int, typer.Option("--pings", min=1, max=100, help="Round trips for the latency check.")] = 5,
    database: DatabaseOption = None,
) -> None:
    """Check that the configured database can take writes: reach, log in, table, key, insert, latency.

    Each check shows ✓ or ✗, its time and, on failure, a hint. Exit 0 only if
    every check passes.

    Example: TAGWRITER_DATABASE_PASSWORD=... tagwriter test-connection --timeout 10
    """
    database_option(database)
    config = load_config(ctx, {"database.url": database})
    sink = create_sink(config.database)
    started = time.monotonic()
    try:
        if sink.kind == "jetstream":  # a stream, not a table: its own checks
            from tagwriter.sinks.jetstream import JetStreamSink
            from tagwriter.streamadmin import connection_checks

            assert isinstance(sink, JetStreamSink)
            results = connection_checks(sink, timeout=timeout, pings=pings)
        elif isinstance(sink, AdminSink):
            results = run_checks(sink, TableSpec.from_config(config.database), timeout=timeout, pings=pings)
        else:
            raise fail(f"the {sink.kind} sink cannot run test-connection")
    finally:
        close_bounded(sink.close, max(0.0, min(2.0, timeout - (time.monotonic() - started))))
    ok = all(r.status == "pass" for r in results)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "target": sink.describe(), "timeout_s": timeout,
                               "checks": [asdict(r) for r in results]}, indent=2))
    else:
        console = Console(highlight=False)
        console.print(render(results, sink.describe()))
        failed = sum(r.status == "fail" for r in results)
        if ok:
            console.print(f"[green]all {len(results)} checks passed[/]")
        else:
            console.print(f"[red]{failed} check(s) failed[/], {sum(r.status == 'skipped' for r in results)} skipped")
    if not ok:
        raise typer.Exit(code=1)

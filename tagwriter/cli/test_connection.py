"""`tagwriter test-connection`: check, step by step, that the configured database can take writes."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tagwriter.cli.common import DatabaseOption, boundary, database_option, fail, load_config
from tagwriter.errors import TagwriterError
from tagwriter.sinks import create_sink
from tagwriter.sinks.base import AdminSink, TableInfo, TableSpec

TIMEOUT_HINT = "host reachable? a listener that accepts but never answers, or an overloaded database"
MARKS = {"pass": "✓", "fail": "✗", "skipped": "–"}


@dataclass(slots=True)
class CheckResult:
    """One check: `status` is pass, fail or skipped; `seconds` is how long it took."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    code: str = ""
    hint: str = ""


class CheckFailed(TagwriterError):
    """A check found something wrong without a database error."""


@dataclass(slots=True)
class _Step:
    name: str
    run: Callable[[dict[str, Any]], str]
    required: bool  # later checks depend on this one


def _steps(sink: AdminSink, spec: TableSpec, pings: int) -> list[_Step]:
    wanted = {spec.tag.lower(), spec.ts.lower()}

    def reach(state: dict[str, Any]) -> str:
        return f"reached {sink.reach()}"

    def login(state: dict[str, Any]) -> str:
        sink.login()
        return "session opened and closed"

    def version(state: dict[str, Any]) -> str:
        return sink.server_version()

    def table(state: dict[str, Any]) -> str:
        info = sink.inspect_table()
        if info is None:
            raise CheckFailed(f"table {spec.table} does not exist",
                              hint="run `tagwriter init-db` (or `tagwriter init-db --print` for a DBA)")
        state["info"] = info
        return f"{spec.table}: {len(info.columns)} columns"

    def columns(state: dict[str, Any]) -> str:
        info: TableInfo = state["info"]
        # The key has a check of its own: compare the columns with a key the sink accepts.
        key = info.key if {k.lower() for k in info.key} == wanted else [spec.tag, spec.ts]
        diffs = sink.table_differences(TableInfo(info.columns, key))
        if diffs:
            raise CheckFailed("; ".join(diffs), hint="`tagwriter init-db --print` shows the expected table")
        return ", ".join(f"{c.name} {c.type}" for c in info.columns)

    def key(state: dict[str, Any]) -> str:
        info: TableInfo = state["info"]
        if not info.key:
            raise CheckFailed(f"no primary key or unique constraint on ({spec.tag}, {spec.ts})",
                              hint="without it duplicates are stored twice and replay is not idempotent")
        if {k.lower() for k in info.key} != wanted:
            raise CheckFailed(f"the key is ({', '.join(info.key)}), expected ({spec.tag}, {spec.ts})",
                              hint="`tagwriter init-db --print` shows the expected table")
        return f"({', '.join(info.key)})"

    def insert(state: dict[str, Any]) -> str:
        sink.try_insert()
        return "probe row inserted and rolled back"

    def latency(state: dict[str, Any]) -> str:
        times = []
        for _ in range(pings):
            started = time.perf_counter()
            sink.ping()
            times.append(time.perf_counter() - started)
        return f"median {statistics.median(times) * 1000:.2f} ms of {pings} round trips"

    return [
        _Step("reach the server", reach, True),
        _Step("log in", login, True),
        _Step("server version", version, True),
        _Step("table exists", table, True),
        _Step("columns and types match", columns, False),
        _Step("unique key on (tag, ts)", key, False),
        _Step("insert allowed", insert, False),
        _Step("round-trip latency", latency, False),
    ]


def run_checks(sink: AdminSink, spec: TableSpec, *, timeout: float, pings: int = 5) -> list[CheckResult]:
    """Run the checks in order in a worker thread; whatever is unfinished at `timeout` is failed/skipped.

    A required check that fails skips the rest. Returns one result per check.
    """
    steps = _steps(sink, spec, pings)
    results: list[CheckResult] = []
    lock = threading.Lock()
    current: list[Any] = [None, 0.0]  # the running step and when it started
    closed = False

    def record(result: CheckResult) -> bool:
        with lock:
            if closed:
                return False
            results.append(result)
            return True

    def work() -> None:
        state: dict[str, Any] = {}
        for step in steps:
            started = time.monotonic()
            with lock:
                current[:] = [step.name, started]
            try:
                detail = step.run(state)
            except TagwriterError as exc:
                ok = record(CheckResult(step.name, "fail", time.monotonic() - started,
                                        exc.message, exc.code, exc.hint))
                if not ok or step.required:
                    return
                continue
            except Exception as exc:  # a driver error a sink did not classify: still a result
                record(CheckResult(step.name, "fail", time.monotonic() - started, repr(exc)))
                if step.required:
                    return
                continue
            if not record(CheckResult(step.name, "pass", time.monotonic() - started, detail)):
                return

    worker = threading.Thread(target=work, name="tagwriter-test-connection", daemon=True)
    worker.start()
    worker.join(timeout)
    with lock:
        closed = True
        if worker.is_alive() and current[0] is not None and len(results) < len(steps):
            name, started = current
            if not results or results[-1].name != name:
                results.append(CheckResult(
                    name, "fail", time.monotonic() - started,
                    f"no answer within the --timeout of {timeout:g} s", "TIMEOUT", TIMEOUT_HINT))
        done = {r.name for r in results}
        results.extend(CheckResult(s.name, "skipped", detail="an earlier check failed")
                       for s in steps if s.name not in done)
        return list(results)


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
    if not isinstance(sink, AdminSink):
        raise fail(f"the {sink.kind} sink cannot run test-connection")
    started = time.monotonic()
    try:
        results = run_checks(sink, TableSpec.from_config(config.database), timeout=timeout, pings=pings)
    finally:
        closer = threading.Thread(target=sink.close, name="tagwriter-close", daemon=True)
        closer.start()
        closer.join(max(0.0, min(2.0, timeout - (time.monotonic() - started))))
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

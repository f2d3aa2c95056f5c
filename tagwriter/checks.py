"""Checks of a database target: the steps of `test-connection`, and the one table-shape check.

`run_checks` answers, step by step and within a deadline, whether a sink can
take writes (reach, log in, version, table, columns, key, insert, latency) and
returns the answers as data; `tagwriter test-connection` only renders them.
`verify_table` is the table-shape check that the writer's probe, `init-db`,
`test-connection` and the PostgreSQL sink's `open` share.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tagwriter.bounded import run_bounded
from tagwriter.errors import FatalError, TagwriterError, TransientError
from tagwriter.redact import redact
from tagwriter.sinks.base import AdminSink, TableInfo, TableSpec

TIMEOUT_HINT = "host reachable? a listener that accepts but never answers, or an overloaded database"

#: Codes of `verify_table`'s errors (a sink may pass its database's own).
TABLE_MISSING = "TABLE_MISSING"
TABLE_SHAPE = "TABLE_SHAPE"
MISSING_HINT = "run `tagwriter init-db` (or `tagwriter init-db --print` for a DBA)"
KEY_HINT = ("the table needs PRIMARY KEY (tag, ts): without it duplicates are stored twice and replay is not "
            "idempotent; `tagwriter init-db --print` shows the expected table")
SHAPE_HINT = ("fix or rename the table, or set database.table to a new name; "
              "`tagwriter init-db --print` shows the expected table")


# -- the table's shape -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableShape:
    """An existing table held against the expected one: how its columns differ, and how its key does."""

    info: TableInfo
    columns: list[str]
    key: list[str]

    @property
    def differences(self) -> list[str]:
        return [*self.columns, *self.key]


def compare_table(sink: AdminSink, info: TableInfo, spec: TableSpec | None = None) -> TableShape:
    """How the table `info` describes differs from the one `sink` writes ([] and [] = it matches)."""
    spec = spec or sink.spec
    wanted = {spec.tag.lower(), spec.ts.lower()}
    # The columns alone: compare them as if the key were one the sink accepts.
    key = info.key if {k.lower() for k in info.key} == wanted else [spec.tag, spec.ts]
    columns = sink.table_differences(TableInfo(info.columns, key))
    return TableShape(info, columns, [d for d in sink.table_differences(info) if d not in columns])


def missing_table(spec: TableSpec, *, where: str = "", name: str = "", code: str = TABLE_MISSING) -> FatalError:
    """The error for a table that does not exist (`name` for it: default "table <name>")."""
    prefix = f"{where}: " if where else ""
    return FatalError(f"{prefix}{name or 'table ' + spec.table} does not exist", code=code, hint=MISSING_HINT)


def verify_table(
    sink: AdminSink, info: TableInfo | None, *, where: str = "", name: str = "",
    codes: tuple[str, str] = (TABLE_MISSING, TABLE_SHAPE),
) -> TableInfo:
    """Raise FatalError unless the table exists with the expected columns and (tag, ts) key; its TableInfo.

    `info` is the table as the sink read it (`inspect_table`; None: it does not exist).
    `where` prefixes the message, `name` is what it calls the table (default
    "table <name>"; a target such as `sink.describe()`); `codes` are the codes
    for a missing table and for one of another shape.
    """
    spec = sink.spec
    if info is None:
        raise missing_table(spec, where=where, name=name, code=codes[0])
    shape = compare_table(sink, info, spec)
    if shape.differences:
        prefix = f"{where}: " if where else ""
        raise FatalError(
            f"{prefix}{name or 'table ' + spec.table} exists with a different shape "
            "(does not match what tagwriter writes): "
            + "; ".join(shape.differences),
            code=codes[1], hint=SHAPE_HINT if shape.columns else KEY_HINT,
        )
    return info


# -- test-connection -------------------------------------------------------------


@dataclass(slots=True)
class CheckResult:
    """One check: `status` is pass, fail or skipped; `seconds` is how long it took. Texts are redacted."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    code: str = ""
    hint: str = ""

    def __post_init__(self) -> None:
        # a driver error no sink classified (its repr) may echo the connect string
        self.detail, self.hint = redact(self.detail), redact(self.hint)


class CheckFailed(TagwriterError):
    """A check found something wrong without a database error."""


@dataclass(slots=True)
class _Step:
    name: str
    run: Callable[[dict[str, Any]], str]
    required: bool  # later checks depend on this one


def _steps(sink: AdminSink, spec: TableSpec, pings: int) -> list[_Step]:
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
            raise missing_table(spec)
        state["shape"] = compare_table(sink, info, spec)
        return f"{spec.table}: {len(info.columns)} columns"

    def columns(state: dict[str, Any]) -> str:
        shape: TableShape = state["shape"]
        if shape.columns:
            raise CheckFailed("; ".join(shape.columns), hint="`tagwriter init-db --print` shows the expected table")
        return ", ".join(f"{c.name} {c.type}" for c in shape.info.columns)

    def key(state: dict[str, Any]) -> str:
        shape: TableShape = state["shape"]
        if shape.key:
            raise CheckFailed("; ".join(shape.key), hint=KEY_HINT)
        return f"({', '.join(shape.info.key)})"

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

    try:
        run_bounded(work, timeout, "test-connection")
        timed_out = False
    except TransientError:  # the deadline: `work` never raises
        timed_out = True
    with lock:
        closed = True
        if timed_out and current[0] is not None and len(results) < len(steps):
            name, started = current
            if not results or results[-1].name != name:
                results.append(CheckResult(
                    name, "fail", time.monotonic() - started,
                    f"no answer within the --timeout of {timeout:g} s", "TIMEOUT", TIMEOUT_HINT))
        done = {r.name for r in results}
        results.extend(CheckResult(s.name, "skipped", detail="an earlier check failed")
                       for s in steps if s.name not in done)
        return list(results)

"""`tagwriter overflow-test`: prove the buffer's overflow policy against a stalled writer."""

from __future__ import annotations

import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tagwriter import loadtest, overflowtest
from tagwriter.cli.common import boundary, database_option, load_config, setup_logging, write_json_report
from tagwriter.overflowtest import OverflowSettings


class Policy(StrEnum):
    drop_oldest = "drop-oldest"
    spill = "spill"
    block = "block"


@boundary
def overflow_test(
    ctx: typer.Context,
    policy: Annotated[
        Policy | None, typer.Option("--policy", help="Overflow policy to test (default: buffer.overflow_policy).")
    ] = None,
    capacity: Annotated[int, typer.Option("--capacity", min=1, help="Buffer capacity in values.")] = 100_000,
    overfill: Annotated[
        float, typer.Option("--overfill", min=0.001, max=1000, help="Percent of the capacity submitted beyond it.")
    ] = 10.0,
    group_size: Annotated[int, typer.Option("--group-size", min=1, help="Values per submitted group.")] = 1000,
    block_timeout: Annotated[
        float | None, typer.Option("--block-timeout", min=0,
                                   help="block: seconds a submit waits for room (default: buffer.block_timeout).")
    ] = None,
    sustained: Annotated[
        float | None, typer.Option("--sustained", metavar="SECONDS", min=0.1,
                                   help="Also offer a rate just above the sink's capacity for SECONDS.")
    ] = None,
    max_overflow_pct: Annotated[
        float, typer.Option("--max-overflow-pct", min=0, help="--sustained: fail above this 1 h overflow rate (%).")
    ] = 1.0,
    sink_rate: Annotated[
        float, typer.Option("--sink-rate", min=1, help="--sustained: the sink is throttled to this many values/s.")
    ] = 10_000.0,
    overload: Annotated[
        float, typer.Option("--overload", min=0.1, help="--sustained: percent offered above --sink-rate.")
    ] = 10.0,
    database: Annotated[
        str | None,
        typer.Option("--database", metavar="URL",
                     help="Database behind the stalled writer (default: database.url if configured, "
                          "else a temporary SQLite file)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="PATH", help="Write the full report as JSON to PATH.")
    ] = None,
) -> None:
    """Stall the writer, overfill the buffer, and check what the overflow policy did.

    drop-oldest: exactly the oldest values evicted, the counter exact, the
    warning logged and rate-limited, the 1 h overflow rate. spill: nothing
    lost (read back from the spool). block: producers waited, drops match the
    timeouts. Exit 1 if any check fails, 0 otherwise.

    Example: tagwriter overflow-test --policy drop-oldest --capacity 100000 --overfill 10 --json overflow.json
    """
    database_option(database)
    base = load_config(ctx)
    setup_logging(base)
    if base.writer.batch_size > capacity:
        base = base.replace(writer=type(base.writer)(**{**_fields(base.writer), "batch_size": capacity}))
    settings = OverflowSettings(
        policy=(policy.value if policy is not None else base.buffer.overflow_policy), capacity=capacity,
        overfill_pct=overfill, group_size=group_size, block_timeout=block_timeout, sustained_s=sustained,
        max_overflow_pct=max_overflow_pct, sink_rate=sink_rate, overload_pct=overload)
    with tempfile.TemporaryDirectory(prefix="tagwriter-overflow-test-") as work:
        config, _ = loadtest.scratch_config(base, Path(work), database=database, db_name="overflow-test.db")
        env = loadtest.environment(config)
        result = overflowtest.run_overflow_test(config, settings)
        report = overflowtest.report_dict(config, result, env)
    _output(report, Console(highlight=False), json_path)
    if not report["ok"]:
        raise typer.Exit(code=1)


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _output(report: dict[str, Any], console: Console, json_path: Path | None) -> None:
    title = f"tagwriter overflow-test ({report['settings']['policy']}): " + ("PASS" if report["ok"] else "FAIL")
    if console.is_terminal:
        console.print(overflowtest.render_table(report, title))
    else:
        console.print(overflowtest.render_text(report, title), markup=False, highlight=False, soft_wrap=True)
    bad = list(overflowtest.failed(report))
    if bad:
        console.print(f"{len(bad)} of {len(report['checks'])} checks failed", style="red", markup=False)
    else:
        console.print(f"all {len(report['checks'])} checks passed", style="green", markup=False)
    if json_path is not None:
        write_json_report(report, json_path, console)

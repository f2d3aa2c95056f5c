"""`tagwriter load-test`: synthetic polling load through the real pipeline, with CI thresholds."""

from __future__ import annotations

import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tagwriter import loadtest
from tagwriter.cli.common import (
    BatchSizeOption,
    FlushIntervalOption,
    boundary,
    database_option,
    load_config,
    setup_logging,
    write_json_report,
)
from tagwriter.config import Config
from tagwriter.loadtest import LoadShape, Thresholds


class Preset(StrEnum):
    plant = "plant"


@boundary
def load_test(
    ctx: typer.Context,
    rate: Annotated[
        str | None,
        typer.Option("--rate", metavar="VALUES_PER_S|max",
                     help="Offered values per second, or 'max' to search for the highest sustained rate."),
    ] = None,
    preset: Annotated[
        Preset | None, typer.Option("--preset", help="plant = 10 groups x 100 tags every 1 s (1,000 values/s).")
    ] = None,
    groups: Annotated[int | None, typer.Option("--groups", min=1, help="Polling groups (source.groups).")] = None,
    tags: Annotated[int | None, typer.Option("--tags", min=1, help="Tags per group (source.tags_per_group).")] = None,
    interval: Annotated[
        float | None, typer.Option("--interval", min=0.001, help="Seconds between polls of a group.")
    ] = None,
    duration: Annotated[
        float, typer.Option("--duration", "-d", min=0.1,
                            help="Seconds measured after the warmup; with --rate max: the whole search's budget.")
    ] = 30.0,
    warmup: Annotated[float, typer.Option("--warmup", min=0, help="Seconds run before measuring.")] = 5.0,
    trial_duration: Annotated[
        float | None,
        typer.Option("--trial-duration", min=0.1, help="--rate max: seconds measured per trial (default: up to 5, "
                     "so that two trials fit the budget after the probe)."),
    ] = None,
    start_rate: Annotated[
        float | None,
        typer.Option("--start-rate", min=1, help="--rate max: ramp up from this rate (values/s), doubling, "
                     "instead of confirming an unthrottled probe's throughput."),
    ] = None,
    batch_size: BatchSizeOption = None,
    flush_interval: FlushIntervalOption = None,
    capacity: Annotated[
        int | None, typer.Option("--capacity", help="Buffer capacity in values (buffer.capacity).")
    ] = None,
    database: Annotated[
        str | None,
        typer.Option("--database", metavar="URL",
                     help="Database to load (default: database.url if configured, else a temporary SQLite file)."),
    ] = None,
    max_p99_latency: Annotated[
        float, typer.Option("--max-p99-latency", min=0, help="Fail above this end-to-end p99 latency (seconds).")
    ] = 2.0,
    max_buffer_pct: Annotated[
        float, typer.Option("--max-buffer-pct", min=0, help="Fail above this buffer utilization (percent).")
    ] = 80.0,
    min_throughput: Annotated[
        float | None, typer.Option("--min-throughput", min=0,
                                   help="Fail below this many values/s written (with --rate max: found).")
    ] = None,
    max_dropped: Annotated[int, typer.Option("--max-dropped", min=0, help="Fail above this many dropped values.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="PATH", help="Write the full report as JSON to PATH.")
    ] = None,
) -> None:
    """Run a synthetic polling load through the real pipeline and check it against thresholds.

    Reports offered and achieved values/s, end-to-end latency p50/p95/p99/max
    (warmup excluded), buffer utilization, batches, failures, spooled and
    dropped values, CPU per 1,000 values and peak memory. Exit 1 if a
    threshold is violated (each is listed with the amount), 0 otherwise.

    Example: tagwriter load-test --preset plant --duration 60 --json report.json
    """
    search = rate is not None and rate.strip().lower() == "max"
    shape_rate = None if search or rate is None else _parse_rate(rate)
    database_option(database)
    base = load_config(ctx, {"writer.batch_size": batch_size, "writer.flush_interval": flush_interval,
                             "buffer.capacity": capacity})
    setup_logging(base)
    shape = _shape(base, preset, shape_rate, groups, tags, interval, search)
    thresholds = Thresholds(max_p99_latency, max_buffer_pct, min_throughput, max_dropped)
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory(prefix="tagwriter-load-test-") as work:
        config, temporary = loadtest.scratch_config(base, Path(work), database=database)
        env = loadtest.environment(config)
        if search:
            result, found = _search(config, shape, thresholds, duration, trial_duration, warmup, start_rate, console)
        else:
            result, found = loadtest.run_trial(config, shape, duration=duration, warmup=warmup), None
        report = loadtest.report_dict(config=config, result=result, thresholds=thresholds,
                                      mode="max" if search else "fixed", env=env, search=found,
                                      temporary_database=temporary)
    _output(report, console, json_path)
    if not report["ok"]:
        raise typer.Exit(code=1)


def _parse_rate(text: str) -> float:
    try:
        value = float(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a number nor 'max'", param_hint="--rate") from None
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter("must be a positive number of values per second", param_hint="--rate")
    return value


def _shape(config: Config, preset: Preset | None, rate: float | None, groups: int | None, tags: int | None,
           interval: float | None, search: bool) -> LoadShape:
    """The load from --preset, --rate or --groups/--tags/--interval (over source.*)."""
    if (rate is not None or search) and interval is not None:
        raise typer.BadParameter("give either --rate or --interval, not both", param_hint="--interval")
    if preset is not None:
        g, t, i = loadtest.PRESETS[preset.value]
    else:
        g, t, i = config.source.groups, config.source.tags_per_group, config.source.interval
    if rate is not None:
        return LoadShape.for_rate(rate, groups or (g if preset else None), tags or (t if preset else None))
    return LoadShape(groups or g, tags or t, interval or i)


def _search(config: Config, shape: LoadShape, thresholds: Thresholds, budget: float, trial_duration: float | None,
            warmup: float, start_rate: float | None, console: Console,
            ) -> tuple[loadtest.TrialResult, loadtest.Search]:
    """--rate max: an unthrottled probe, then trials to confirm it (or a ramp from `start_rate`)."""
    trial_warmup = min(warmup, 1.0)
    probe_s = _probe_duration(budget) if start_rate is None else 0.0
    if trial_duration is None:
        trial_duration = _trial_duration(budget, probe_s, trial_warmup)

    def probe() -> loadtest.TrialResult:
        result = loadtest.run_probe(config, duration=probe_s, groups=shape.groups)
        console.print(f"probe, unthrottled: wrote {result.achieved_per_s:,.0f} values/s "
                      f"in {result.window_s:.1f} s", markup=False, soft_wrap=True)
        return result

    def run(rate: float) -> loadtest.TrialResult:
        trial = LoadShape.for_rate(rate, shape.groups, None)
        result = loadtest.run_trial(config, trial, duration=trial_duration, warmup=trial_warmup,
                                    give_up_pct=thresholds.max_buffer_pct)
        why = loadtest.trial_failures(result, thresholds)
        console.print(f"trial {rate:>12,.0f} values/s: achieved {result.achieved_per_s:,.0f}/s, "
                      f"p99 {result.latency_p99_s * 1000:,.1f} ms, buffer max {result.buffer_max_pct:.1f}%: "
                      + ("pass" if not why else "fail (" + "; ".join(why) + ")"), markup=False, soft_wrap=True)
        return result

    found = loadtest.find_max_rate(run, thresholds, budget_s=budget, start_rate=start_rate or 1000.0,
                                   probe=probe if start_rate is None else None)
    best = found.best if found.best is not None else found.trials[0][0]
    return best, found


#: Seconds a trial takes beyond its warmup and measured time: a fresh pipeline starts and stops.
TRIAL_OVERHEAD = 0.75


def _probe_duration(budget: float) -> float:
    """Seconds the probe measures: an eighth of the budget, between 0.5 and 2 (the rest confirms it)."""
    return min(2.0, max(0.5, budget / 8))


def _trial_duration(budget: float, probe_s: float, warmup: float) -> float:
    """--trial-duration's default: up to 5 s, and short enough (at least 1 s) that two trials fit the budget
    after the probe: the confirm, and one step down should the confirm fail."""
    probe_cost = probe_s + loadtest.PROBE_WARMUP + TRIAL_OVERHEAD if probe_s else 0.0
    spare = budget - probe_cost - 2 * (warmup + TRIAL_OVERHEAD)
    return max(1.0, min(5.0, spare / 2))


def _output(report: dict[str, Any], console: Console, json_path: Path | None) -> None:
    title = "tagwriter load-test: " + ("PASS" if report["ok"] else "FAIL")
    if console.is_terminal:
        console.print(loadtest.render_table(report, title))
    else:
        console.print(loadtest.render_text(report, title), markup=False, highlight=False, soft_wrap=True)
    for line in loadtest.verdict_lines(report):
        console.print(line, markup=False, style="red" if line.startswith("FAIL") else "green", soft_wrap=True)
    if json_path is not None:
        write_json_report(report, json_path, console)

"""`tagwriter load-test`: real pipeline runs into real SQLite files, thresholds, the report and its schema.

Runs are short (0.1 s warmup + 0.6 s) and small; no assertion depends on the
machine's speed except through thresholds set impossibly tight on purpose.
"""

from __future__ import annotations

import json
import os
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from tagwriter import loadtest
from tagwriter.cli.app import app
from tagwriter.loadtest import LoadShape, Thresholds, TrialResult
from tagwriter.metrics import LatencyHistogram

runner = CliRunner()

#: 2 groups x 10 tags every 0.05 s = 400 values/s, small batches so they commit often.
SMALL = ["--groups", "2", "--tags", "10", "--interval", "0.05", "--duration", "0.6", "--warmup", "0.1",
         "--batch-size", "50", "--flush-interval", "0.05"]


pytestmark = pytest.mark.usefixtures("in_tmp")


def schema() -> dict[str, Any]:
    text = resources.files("tagwriter").joinpath("report_schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema()).validate(report)


def invoke(args: list[str]) -> Result:
    return runner.invoke(app, ["--log-level", "WARNING", "load-test", *args])


def run_json(args: list[str], tmp_path: Path) -> tuple[Result, dict[str, Any]]:
    path = tmp_path / "report.json"
    result = invoke([*args, "--json", str(path)])
    assert path.is_file(), result.output
    report = json.loads(path.read_text())
    validate(report)
    return result, report


def test_a_passing_run_writes_into_the_given_database_and_reports_its_metrics(tmp_path: Path) -> None:
    db = tmp_path / "target.db"
    result, report = run_json([*SMALL, "--database", f"sqlite:///{db}"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    r, counts = report["result"], report["result"]["counts"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM tag_values").fetchone()[0]
    assert counts["written"] == rows > 0  # the report's counts are what reached the table
    assert counts["adds_up"] and counts["pending"] == 0 and counts["dropped"] == 0
    assert report["settings"]["rate_per_s"] == pytest.approx(400.0)
    assert report["settings"]["temporary_database"] is False
    assert r["latency"]["values"] > 0 and 0 < r["latency"]["p50_s"] <= r["latency"]["p99_s"] <= r["latency"]["max_s"]
    assert r["batches"]["written"] > 0 and r["achieved_per_s"] > 0
    assert r["metrics"]["written"] == counts["written"]  # the final MetricsSnapshot, every figure
    assert report["environment"]["database_kind"] == "sqlite"
    assert report["environment"]["database_version"].startswith("SQLite ")
    assert report["environment"]["cpu_count"] == os.cpu_count()
    assert r["memory"]["method"].startswith("ru_maxrss") and r["memory"]["peak_bytes"] > 0
    # the sampler woke at least once in the window, and its CPU is a part of the process's
    assert r["buffer"]["samples"] >= 1 and 0 < r["cpu"]["sampler_seconds"] <= r["cpu"]["seconds"]
    assert "the load test's own buffer sampler" in result.output
    assert report["violations"] == [] and report["problems"] == []
    assert "┃" not in result.output  # not a terminal: plain text, no Rich table


def test_default_database_is_a_temporary_sqlite_file(tmp_path: Path) -> None:
    result, report = run_json(SMALL, tmp_path)
    assert result.exit_code == 0, result.output
    assert report["settings"]["temporary_database"] is True
    assert not (tmp_path / "tagwriter.db").exists()
    assert not Path(report["environment"]["database"].removeprefix("sqlite:///")).exists()  # cleaned up


@pytest.mark.parametrize(("args", "option"), [
    (["--max-p99-latency", "0.000001"], "--max-p99-latency"),
    (["--min-throughput", "1e12"], "--min-throughput"),
    # the batch waits 2 s to fill, so a 1,000-value buffer fills well past 5% within the 0.6 s measured
    (["--capacity", "1000", "--batch-size", "1000", "--flush-interval", "2", "--max-buffer-pct", "5"],
     "--max-buffer-pct"),
    # polling groups of 200 values into a 100-value buffer: drop-oldest (chosen below) must drop
    (["--tags", "200", "--capacity", "100", "--batch-size", "100"], "--max-dropped"),
])
def test_each_violated_threshold_exits_1_naming_it(
    tmp_path: Path, args: list[str], option: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAGWRITER_BUFFER__OVERFLOW_POLICY", "drop-oldest")  # the default spills instead
    result, report = run_json([*SMALL, *args], tmp_path)
    assert result.exit_code == 1, result.output
    assert f"FAIL {option}" in result.output
    violated = {v["option"]: v for v in report["violations"]}
    assert option in violated
    v = violated[option]
    assert v["by"] > 0 and v["by"] == pytest.approx(abs(v["actual"] - v["limit"]))
    assert report["ok"] is False


def test_the_dropped_threshold_counts_the_metrics_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGWRITER_BUFFER__OVERFLOW_POLICY", "drop-oldest")  # the default spills instead
    args = [*SMALL, "--tags", "200", "--capacity", "100", "--batch-size", "100"]
    _, report = run_json([*args, "--max-dropped", "1000000"], tmp_path)
    counts = report["result"]["counts"]
    assert counts["dropped"] > 0 and counts["dropped_by_reason"] == {"overflow": counts["dropped"]}
    assert counts["adds_up"]
    assert "--max-dropped" not in {v["option"] for v in report["violations"]}


def test_rate_max_searches_and_min_throughput_applies_to_the_rate_found(tmp_path: Path) -> None:
    result, report = run_json(["--rate", "max", "--duration", "2", "--trial-duration", "0.3", "--warmup", "0.1",
                               "--start-rate", "500", "--flush-interval", "0.05", "--batch-size", "100",
                               "--max-p99-latency", "10", "--min-throughput", "1e12"], tmp_path)
    search = report["search"]
    trials = search["trials"]
    assert len(trials) >= 2, result.output
    assert trials[0]["offered_per_s"] == pytest.approx(500)
    if trials[0]["passed"]:
        assert trials[1]["offered_per_s"] == pytest.approx(1000)  # doubling while trials pass
    passed = [t["offered_per_s"] for t in trials if t["passed"]]
    assert search["max_sustained_per_s"] == (max(passed) if passed else 0)
    assert search["elapsed_s"] < 2 + 3  # the budget, plus at most the trial that was running
    assert report["settings"]["mode"] == "max"
    assert result.exit_code == 1
    [v] = [v for v in report["violations"] if v["option"] == "--min-throughput"]
    assert v["what"] == "max sustained rate" and v["actual"] == search["max_sustained_per_s"]


def test_rate_and_interval_together_are_a_usage_error() -> None:
    result = invoke(["--rate", "1000", "--interval", "1"])
    assert result.exit_code == 2
    result = invoke(["--rate", "fast"])
    assert result.exit_code == 2


def test_preset_plant_is_1000_values_per_second() -> None:
    from tagwriter.cli.load_test import Preset, _shape
    from tagwriter.config import Config

    shape = _shape(Config(), Preset.plant, None, None, None, None, False)
    assert (shape.groups, shape.tags_per_group, shape.interval, shape.rate) == (10, 100, 1.0, 1000.0)


def test_shape_for_a_rate() -> None:
    assert LoadShape.for_rate(100_000).interval == pytest.approx(0.01)
    low = LoadShape.for_rate(50)
    assert low.rate == pytest.approx(50) and low.interval <= 1.0
    assert LoadShape.for_rate(1000, groups=4, tags_per_group=25).interval == pytest.approx(0.1)


def test_warmup_is_excluded_from_the_latency_figures() -> None:
    warmup = LatencyHistogram()
    warmup.add(30.0, 1000)  # slow start
    baseline = LatencyHistogram()
    baseline.merge(warmup)
    now = LatencyHistogram()
    now.merge(warmup)
    now.add(0.010, 990)
    now.add(0.050, 10)
    diff = loadtest.histogram_since(now, baseline)
    assert diff.total == 1000
    assert diff.percentile(50) < 0.02 and 0.01 < diff.percentile(99.5) <= 0.06
    assert 0.05 <= diff.max < 0.07  # bounded by the bucket, not the warmup's 30 s
    assert now.percentile(99) > 29  # what the window would show with the warmup in it


def fake_trial(rate: float, capacity: float) -> TrialResult:
    """A trial of a system that writes at most `capacity` values/s; its latency explodes beyond."""
    r = TrialResult(LoadShape.for_rate(rate), 1.0, 0.0)
    r.achieved_per_s = min(rate, capacity)
    r.latency_p99_s = 0.1 if rate <= capacity else 5.0
    return r


def test_find_max_rate_doubles_then_bisects_to_the_precision() -> None:
    now = [0.0]

    def run(rate: float) -> TrialResult:
        now[0] += 1.0
        return fake_trial(rate, 5000)

    search = loadtest.find_max_rate(run, Thresholds(), budget_s=100, start_rate=1000, precision=0.05,
                                    clock=lambda: now[0])
    rates = [t.offered_per_s for t, _ in search.trials]
    assert rates[:4] == [1000, 2000, 4000, 8000]
    assert 4000 <= search.max_rate <= 5000 and search.max_rate >= 5000 / 1.05 - 1
    assert all(not why for t, why in search.trials if t.offered_per_s <= 5000)
    assert all(why for t, why in search.trials if t.offered_per_s > 5000)


def test_find_max_rate_stops_at_the_time_budget() -> None:
    now = [0.0]

    def run(rate: float) -> TrialResult:
        now[0] += 2.0
        return fake_trial(rate, 1e9)

    search = loadtest.find_max_rate(run, Thresholds(), budget_s=7, clock=lambda: now[0])
    assert len(search.trials) == 3  # a fourth would end at 8 s
    assert search.elapsed_s <= 7
    assert not search.bounded and search.as_dict()["bounded"] is False  # every trial passed: a lower bound


def test_find_max_rate_halves_when_the_start_rate_fails() -> None:
    search = loadtest.find_max_rate(lambda rate: fake_trial(rate, 300), Thresholds(), budget_s=1e9,
                                    start_rate=1000, precision=0.1, clock=lambda: 0.0)
    assert [t.offered_per_s for t, _ in search.trials][:3] == [1000, 500, 250]
    assert 250 <= search.max_rate <= 300
    assert search.bounded


def test_violation_messages_say_by_how_much() -> None:
    r = fake_trial(1000, 1000)
    r.latency_p99_s = 3.0
    r.buffer_max_pct = 90.0
    [lat, buf, thr] = loadtest.violations(r, Thresholds(min_throughput=2000))
    assert lat.message == ("--max-p99-latency: end-to-end latency p99 3 s is above the limit 2 s by 1 s, 50%")
    assert buf.option == "--max-buffer-pct" and buf.by == pytest.approx(10.0)
    assert thr.option == "--min-throughput" and thr.by == pytest.approx(1000) and "below" in thr.message


def test_schema_rejects_a_report_missing_figures(tmp_path: Path) -> None:
    _, report = run_json(SMALL, tmp_path)
    good = json.dumps(report)
    del report["result"]["latency"]["p99_s"]
    with pytest.raises(jsonschema.ValidationError):
        validate(report)
    report = json.loads(good)
    report["violations"] = [{"option": "--max-nothing"}]
    with pytest.raises(jsonschema.ValidationError):
        validate(report)


def test_rich_table_on_a_terminal(tmp_path: Path) -> None:
    _, report = run_json([*SMALL, "--duration", "0.3"], tmp_path)
    console = Console(width=140, color_system=None, record=True)
    console.print(loadtest.render_table(report, "tagwriter load-test: PASS"))
    text = console.export_text()
    for label in ("end-to-end latency", "buffer", "batches", "cpu", "peak memory", "achieved", "offered"):
        assert label in text
    assert "│" in text


def test_schema_ships_with_the_package() -> None:
    assert loadtest.SCHEMA_PATH.is_file()
    jsonschema.Draft202012Validator.check_schema(schema())


def test_against_real_postgresql(tmp_path: Path) -> None:
    """The configured database is the real PostgreSQL: init-db, then load-test into it."""
    from pg_util import fresh_database

    with fresh_database("tw_load") as db:
        url = db.url()
        created = runner.invoke(app, ["init-db"], env={"TAGWRITER_DATABASE__URL": url})
        assert created.exit_code == 0, created.output
        result = runner.invoke(app, ["--log-level", "WARNING", "load-test", *SMALL, "--json", "report.json"],
                               env={"TAGWRITER_DATABASE__URL": url})  # configured: used instead of a temporary file
        report = json.loads(Path("report.json").read_text())
        validate(report)
        assert result.exit_code == 0, result.output
        assert report["environment"]["database_kind"] == "postgresql"
        assert report["environment"]["database_version"].startswith("PostgreSQL ")
        assert report["settings"]["temporary_database"] is False
        assert report["result"]["counts"]["written"] == db.count() > 0


def test_a_database_that_refuses_writes_fails_the_run(tmp_path: Path) -> None:
    from pg_util import fresh_database

    with fresh_database("tw_load") as db:  # no table: the sink refuses (42P01), values go to the spool
        result, report = run_json([*SMALL, "--database", db.url()], tmp_path)
    assert result.exit_code == 1
    assert any("the database refused writes" in p for p in report["problems"]), report["problems"]
    assert report["result"]["counts"]["spooled"] == report["result"]["counts"]["submitted"] > 0


def test_a_database_that_goes_away_is_a_problem_even_when_thresholds_hold(tmp_path: Path) -> None:
    from tagwriter.config import Config, WriterConfig
    from tagwriter.sinks.memory import MemorySink

    base = Config(writer=WriterConfig(batch_size=50, flush_interval=0.05, retry_delays=[]))
    config, _ = loadtest.scratch_config(base, tmp_path)
    sink = MemorySink()
    sink.go_down()
    r = loadtest.run_trial(config, LoadShape(2, 10, 0.05), duration=0.5, warmup=0.1, sink_factory=lambda: sink)
    assert loadtest.violations(r, Thresholds()) == []  # nothing written: no latency, no buffer fill
    assert r.end_state == "outage"
    assert r.final is not None and r.final.spooled == r.final.submitted > 0
    assert any("went away" in p for p in loadtest.problems(r))


def test_scratch_config_keeps_a_configured_database_and_turns_off_the_endpoint(tmp_path: Path) -> None:
    from tagwriter.config import Config, DatabaseConfig, MetricsConfig

    base = Config(database=DatabaseConfig(url="postgresql://u@db:5432/plant"), metrics=MetricsConfig(port=9108))
    cfg, temporary = loadtest.scratch_config(base, tmp_path)
    assert cfg.database.url == "postgresql://u@db:5432/plant" and not temporary
    assert cfg.metrics.port == 0 and cfg.backup.directory == str(tmp_path / "backup")
    cfg, temporary = loadtest.scratch_config(Config(), tmp_path)
    assert temporary and cfg.database.url == f"sqlite:///{tmp_path / 'load-test.db'}"

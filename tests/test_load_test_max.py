"""`load-test --rate max`: an unthrottled probe first, then a paced trial to confirm its figure.

The search rules run against fake trials with a fake clock (exact sequences);
one real run into a temporary SQLite file checks that the maximum reported is
the probe's measured figure (or a step below it), not the ramp's 1,000/s start.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from tagwriter import loadtest
from tagwriter.cli.app import app
from tagwriter.cli.load_test import _trial_duration
from tagwriter.config import Config
from tagwriter.loadtest import LoadShape, Thresholds, TrialResult

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("in_tmp")


def fake_trial(rate: float, capacity: float) -> TrialResult:
    """A trial of a system that writes at most `capacity` values/s; its latency explodes beyond."""
    r = TrialResult(LoadShape.for_rate(rate), 1.0, 0.0)
    r.achieved_per_s = min(rate, capacity)
    r.latency_p99_s = 0.1 if rate <= capacity else 5.0
    return r


class FakeRuns:
    """Trials and a probe of a system with `capacity`, each advancing a fake clock by `seconds`."""

    def __init__(self, capacity: float, probe_figure: float, seconds: float = 1.0) -> None:
        self.capacity, self.probe_figure, self.seconds = capacity, probe_figure, seconds
        self.now = 0.0

    def trial(self, rate: float) -> TrialResult:
        self.now += self.seconds
        return fake_trial(rate, self.capacity)

    def probe(self) -> TrialResult:
        self.now += self.seconds
        r = TrialResult(LoadShape.for_rate(loadtest.PROBE_RATE), 1.0, 0.5)
        r.achieved_per_s = self.probe_figure
        return r

    def search(self, budget_s: float = 100.0) -> loadtest.Search:
        return loadtest.find_max_rate(self.trial, Thresholds(), budget_s=budget_s, probe=self.probe,
                                      clock=lambda: self.now)


def rates(search: loadtest.Search) -> list[float]:
    return [t.offered_per_s for t, _ in search.trials]


def test_a_confirmed_probe_is_the_maximum_in_one_trial() -> None:
    search = FakeRuns(capacity=50_000, probe_figure=48_000).search()
    assert rates(search) == [48_000]
    assert search.max_rate == 48_000 == search.ceiling and search.bounded
    assert search.elapsed_s == 2.0  # the probe is part of the budget


def test_an_optimistic_probe_steps_down_then_bisects() -> None:
    search = FakeRuns(capacity=50_000, probe_figure=60_000).search()
    # 60k fails having written 50k: next the rate it kept up with by the 95% rule, then bisect.
    assert rates(search)[:2] == [60_000, 50_000 * loadtest.KEEP_UP_RATIO]
    assert 50_000 / 1.1 <= search.max_rate <= 50_000
    assert all(rate <= 60_000 for rate in rates(search)) and search.bounded


def test_a_probe_that_wrote_nothing_falls_back_to_the_ramp() -> None:
    search = FakeRuns(capacity=3000, probe_figure=0.0).search()
    assert rates(search)[:2] == [1000, 2000] and search.ceiling is None
    assert 3000 / 1.1 <= search.max_rate <= 3000


def test_the_first_trial_runs_even_when_the_probe_used_the_budget() -> None:
    search = FakeRuns(capacity=50_000, probe_figure=60_000, seconds=2.0).search(budget_s=3.0)
    assert rates(search) == [60_000] and search.best is None


def test_default_trials_leave_room_for_a_step_down() -> None:
    assert _trial_duration(10.0, 1.25, 1.0) * 2 + 2 * (1.0 + 0.75) + 1.25 + loadtest.PROBE_WARMUP + 0.75 <= 10.0
    assert _trial_duration(600.0, 2.0, 1.0) == 5.0 and _trial_duration(3.0, 0.5, 1.0) == 1.0


def test_a_failing_trial_ends_once_the_buffer_passes_the_threshold(tmp_path: Path) -> None:
    """An offered rate far beyond the database: the measured window ends early instead of running out."""
    config, _ = loadtest.scratch_config(Config(), tmp_path)
    config = config.replace(buffer=dataclasses.replace(config.buffer, capacity=2000))
    result = loadtest.run_trial(config, LoadShape.for_rate(loadtest.PROBE_RATE), duration=30.0, warmup=0.1,
                                give_up_pct=50.0)
    assert result.window_s < 10.0 and result.buffer_max_pct > 50.0
    assert result.final is not None and result.final.submitted == result.final.accounted


# -- the real thing -------------------------------------------------------------------------


def validate(report: dict[str, Any]) -> None:
    schema = json.loads(resources.files("tagwriter").joinpath("report_schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(report)


def test_rate_max_in_10_s_reports_the_probes_figure_not_the_ramps_start(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    result = runner.invoke(app, ["--log-level", "WARNING", "load-test", "--rate", "max", "--duration", "10",
                                 "--json", str(path)])
    report = json.loads(path.read_text())
    validate(report)
    search = report["search"]
    probe, trials = search["probe"], search["trials"]
    assert "probe, unthrottled: wrote" in result.output
    # Loosely, a fact of these machines: SQLite takes far more than the ramp's 1,000/s start.
    assert probe["achieved_per_s"] > 10_000, result.output
    assert trials[0]["offered_per_s"] == pytest.approx(probe["achieved_per_s"])  # confirm at that rate
    if trials[0]["passed"]:
        assert search["max_sustained_per_s"] == pytest.approx(probe["achieved_per_s"])
        assert search["bounded"] and result.exit_code == 0, result.output
        assert "at least" not in result.output
    else:  # a busy machine: the confirm failed, so the search stepped down from the probe's figure
        assert all(t["offered_per_s"] < probe["achieved_per_s"] for t in trials[1:])
        assert search["max_sustained_per_s"] < probe["achieved_per_s"]
    assert search["elapsed_s"] < 10 + 8  # the budget, plus at most the trial that was running

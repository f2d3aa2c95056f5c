"""`tagwriter overflow-test`: the real Pipeline with a stalled sink in front of a real SQLite file.

Also proves the test can fail: deliberately wrong buffers (evicting the
newest values, warning on every overflow) are injected through
`run_overflow_test(buffer_class=...)` and must be caught.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from tagwriter.buffer import OverflowPolicy, PutResult, RingBuffer
from tagwriter.cli.app import app
from tagwriter.config import Config
from tagwriter.loadtest import scratch_config
from tagwriter.models import TagValue
from tagwriter.overflowtest import OverflowResult, OverflowSettings, report_dict, run_overflow_test, summarize

runner = CliRunner()
SMALL = OverflowSettings(capacity=2000, overfill_pct=10.0, group_size=100, block_timeout=0.2)


pytestmark = pytest.mark.usefixtures("in_tmp")


def config(tmp_path: Path) -> Config:
    cfg, _ = scratch_config(Config(), tmp_path, db_name="overflow.db")
    return cfg


def run(tmp_path: Path, policy: str = "drop-oldest", buffer_class: type[RingBuffer] = RingBuffer,
        **kwargs: Any) -> OverflowResult:
    settings = OverflowSettings(**{**_settings_dict(SMALL), "policy": policy, **kwargs})
    return run_overflow_test(config(tmp_path), settings, buffer_class=buffer_class)


def _settings_dict(s: OverflowSettings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in s.__dataclass_fields__}


def checks(result: OverflowResult) -> dict[str, bool]:
    return {c.name: c.ok for c in result.checks}


def validate(report: dict[str, Any]) -> None:
    text = resources.files("tagwriter").joinpath("report_schema.json").read_text(encoding="utf-8")
    jsonschema.Draft202012Validator(json.loads(text)).validate(report)


class NewestFirstBuffer(RingBuffer):
    """Deliberately wrong: when full it loses the newest values (the incoming ones) instead of the oldest."""

    def _put_evicting(self, rows: Sequence[TagValue], t_submit: float) -> PutResult:
        excess = len(self) + len(rows) - self.capacity
        if excess <= 0:
            return super()._put_evicting(rows, t_submit)
        keep, lost = rows[: len(rows) - excess], list(rows[len(rows) - excess:])
        self.overflowed += excess
        self._append(keep, t_submit)
        if self.policy is OverflowPolicy.SPILL:
            return PutResult(len(keep), 0, lost)
        return PutResult(len(keep), len(lost))


class ChattyBuffer(RingBuffer):
    """Deliberately wrong: warns on every overflow, no rate limit."""

    def _warn_overflow(self, n: int) -> None:
        self.warnings_logged += 1
        logging.getLogger("tagwriter.buffer").warning("buffer full (capacity %d): %d values", self.capacity, n)


def test_drop_oldest_passes_every_check_on_the_real_pipeline(tmp_path: Path) -> None:
    result = run(tmp_path)
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    f = result.figures
    # 500 held in flight by the stalled write, then capacity + 10% submitted: the 200 oldest of those go
    assert f["overfill"] == 200 and f["expected_evicted"] == 200 and f["buffer_overflowed"] == 200
    assert f["dropped_by_reason"] == {"overflow": 200}
    assert f["survivors_read_from"] == "table" and f["survivors"] == f["submitted"] - 200
    assert f["warnings_logged"] == 1 and f["overflowing_submits"] == 2
    assert f["overflow_rate_1h_pct"] == pytest.approx(100 * 200 / f["submitted"])
    assert "FIFO: exactly the oldest values evicted" in checks(result)


def test_a_buffer_that_evicts_the_newest_is_caught(tmp_path: Path) -> None:
    result = run(tmp_path, buffer_class=NewestFirstBuffer)
    c = checks(result)
    assert not result.ok
    assert c["FIFO: exactly the oldest values evicted"] is False
    assert c["overflow counter exact"] is True  # it counts right; it drops the wrong values
    [fifo] = [x for x in result.checks if x.name.startswith("FIFO")]
    assert fifo.expected == "500..699" and fifo.actual == "2,500..2,699"  # the newest 200 of 0..2,699


def test_spill_loses_nothing_and_spools_the_oldest(tmp_path: Path) -> None:
    result = run(tmp_path, "spill")
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    f = result.figures
    assert f["spooled"] == 200 and f["dropped"] == 0
    assert f["survivors"] + f["spooled"] == f["submitted"]


def test_spill_with_a_newest_first_buffer_is_caught(tmp_path: Path) -> None:
    result = run(tmp_path, "spill", buffer_class=NewestFirstBuffer)
    c = checks(result)
    assert c["FIFO: the spool holds exactly the oldest values"] is False
    assert c["no value lost (evicted values are in the spool)"] is True


def test_block_producers_wait_and_drops_match_the_timeouts(tmp_path: Path) -> None:
    result = run(tmp_path, "block")
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
    f = result.figures
    assert f["dropped_by_reason"] == {"block_timeout": 200}
    assert f["blocked_puts"] == 3  # two timed out, one got room when the sink was released
    assert all(w >= 0.2 - 0.01 for w in f["block_waits_s"])


def test_unlimited_warnings_are_caught(tmp_path: Path) -> None:
    result = run(tmp_path, buffer_class=ChattyBuffer)
    c = checks(result)
    assert c["overflow warning logged, rate-limited"] is False
    assert result.figures["warnings_logged"] == result.figures["overflowing_submits"] == 2


def test_sustained_overload_beyond_the_buffer_fails_the_overflow_rate(tmp_path: Path) -> None:
    path = tmp_path / "overflow.json"
    result = runner.invoke(app, ["--log-level", "ERROR", "overflow-test", "--capacity", "500", "--group-size", "50",
                                 "--sustained", "1.2", "--sink-rate", "2000", "--overload", "100",
                                 "--json", str(path)])
    assert result.exit_code == 1, result.output
    assert "--max-overflow-pct" in result.output
    report = json.loads(path.read_text())
    validate(report)
    s = report["sustained"]
    assert s["overflow_rate_1h_pct"] > 1.0 and s["ok"] is False
    assert s["overflow_rate_1h_pct"] == pytest.approx(100 * s["overflow_1h"] / s["submitted"])
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failed == ["sustained: overflow rate (1 h) within --max-overflow-pct"]


def test_cli_passes_writes_a_valid_report(tmp_path: Path) -> None:
    path = tmp_path / "overflow.json"
    result = runner.invoke(app, ["--log-level", "ERROR", "overflow-test", "--capacity", "1000", "--group-size", "100",
                                 "--policy", "spill", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "all" in result.output and "checks passed" in result.output
    report = json.loads(path.read_text())
    validate(report)
    assert report["ok"] and report["settings"]["policy"] == "spill" and report["sustained"] is None
    assert report["metrics"]["spooled"] == 100 and report["environment"]["database_kind"] == "sqlite"


def test_report_of_a_failed_run_validates(tmp_path: Path) -> None:
    result = run(tmp_path, buffer_class=NewestFirstBuffer)
    report = report_dict(config(tmp_path), result, env={
        "python": "3", "implementation": "CPython", "platform": "x", "cpu_count": 2, "tagwriter": "0",
        "database_kind": "sqlite", "database_version": "SQLite 3", "database": "sqlite:///x.db", "table": "t"})
    validate(report)
    assert report["ok"] is False


def test_summarize_ranges() -> None:
    assert summarize([1, 2, 3, 7, 9, 10]) == "1..3, 7, 9..10"
    assert summarize([]) == "none"
    assert summarize(list(range(0, 20, 2)), limit=2) == "0, 2, ... (8 more ranges)"

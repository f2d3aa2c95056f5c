"""Figures a test reports (fault tables, fleet timings), shown in a "reports" section at the end of the run.

A test (or a fixture's teardown) calls `add(config, nodeid, text)`, or takes the `report` fixture of
conftest.py. The texts are printed by conftest's `pytest_terminal_summary`, sorted by test id. Under
pytest-xdist a worker's terminal is not shown: each worker sends its texts to the controller in
`workeroutput` when it ends (conftest's `pytest_sessionfinish` and `pytest_testnodedown`), so the section
is the same with `-n 3` as without.
"""

from __future__ import annotations

from typing import Any

import pytest

KEY = pytest.StashKey[list[tuple[str, str]]]()
WORKER_OUTPUT = "tagwriter_reports"


def add(config: pytest.Config, nodeid: str, text: str) -> None:
    """Keep `text` (from test or module `nodeid`) for the end of the run."""
    if text:
        config.stash.setdefault(KEY, []).append((nodeid, text))


def taken(config: pytest.Config) -> list[tuple[str, str]]:
    return config.stash.get(KEY, [])


def received(config: pytest.Config, node: Any) -> None:
    """On the xdist controller: the texts a worker sent when it ended."""
    for nodeid, text in getattr(node, "workeroutput", {}).get(WORKER_OUTPUT, []):
        add(config, nodeid, text)


def write(config: pytest.Config, reporter: Any) -> None:
    texts = sorted(taken(config))
    if not texts:
        return
    reporter.write_sep("=", "reports")
    for nodeid, text in texts:
        reporter.write_line(f"{nodeid}:")
        reporter.write_line(text.strip("\n"))
        reporter.write_line("")

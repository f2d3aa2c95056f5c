"""Fixtures shared by several test files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import reports


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in `tmp_path` (tagwriter.db and backup/ land there) without outside TAGWRITER_* or forced terminals."""
    for name in list(os.environ):
        if name.startswith("TAGWRITER_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def fault_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After a fault-suite module (its FAULT_SINK names the sink): report its scenario table, write it to a file."""
    from faultproxy import write_results

    yield
    kind = request.module.FAULT_SINK
    path = os.environ.get("TAGWRITER_FAULT_TABLE") or str(tmp_path_factory.getbasetemp() / "faults.md")
    text = write_results(path, kind)
    if text:
        reports.add(request.config, request.node.nodeid, f"fault scenarios, {kind} (also in {path}):\n{text}")


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """`report(text)`: the test's figures, shown in the "reports" section at the end of the run (with -n too)."""
    return lambda text: reports.add(request.config, request.node.nodeid, text)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist: the files with a `slow` test first, so that the longest start early and the
    last files dealt out are short ones (otherwise one worker ends minutes after the others). Every worker
    sorts the same way (a stable sort of the same collection); a run without -n keeps the file order."""
    if not hasattr(config, "workerinput"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set on a pytest-xdist worker only
    if workeroutput is not None:
        workeroutput[reports.WORKER_OUTPUT] = reports.taken(session.config)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist, on the controller: a worker ended; keep the reports it sent."""
    reports.received(node.config, node)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    reports.write(config, terminalreporter)


@pytest.fixture(autouse=True)
def _drop_tagwriter_log_handlers() -> Iterator[None]:
    """Undo a command's logging set-up after each test.

    A command run through CliRunner installs a console handler on the stream
    CliRunner lent it; once that stream is closed, a later test's log line
    would end in "--- Logging error ---".
    """
    logger = logging.getLogger("tagwriter")
    level = logger.level
    yield
    for handler in list(logger.handlers):
        if getattr(handler, "_tagwriter", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)


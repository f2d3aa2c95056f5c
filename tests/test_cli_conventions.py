"""CLI conventions: shell completion (through a real bash), and `--log-format json` for log shippers."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from procs import free_port, run_env, summary
from typer.testing import CliRunner

from tagwriter.cli.app import app
from tagwriter.logs import configure_logging
from tagwriter.redact import register

runner = CliRunner()
TAGWRITER = Path(sys.executable).with_name("tagwriter")  # the console script, as a shell runs it
BASH = shutil.which("bash")

pytestmark = pytest.mark.usefixtures("in_tmp")


def jsonl(n: int) -> str:
    return "".join(json.dumps({"tag": f"t{i % 10}", "ts": 1_700_000_000 + i, "value": i}) + "\n" for i in range(n))


# -- shell completion -------------------------------------------------------------------


needs_bash = pytest.mark.skipif(BASH is None or not TAGWRITER.is_file(),
                                reason="needs bash and the installed `tagwriter` console script")


def in_bash(script: str, *options: str, **env: str) -> str:
    """Run `script` in a real bash whose PATH finds the installed `tagwriter`; its stdout."""
    environ = run_env(PATH=f"{TAGWRITER.parent}:/usr/bin:/bin", **env)
    result = subprocess.run([str(BASH), *(options or ("--norc",)), "-c", script], capture_output=True, text=True,
                            env=environ, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_offers_completion() -> None:
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output


@needs_bash
def test_show_completion_in_bash_prints_the_bash_script() -> None:
    script = in_bash("tagwriter --show-completion bash")
    assert "_TAGWRITER_COMPLETE=complete_bash" in script
    assert "complete -o default -F _tagwriter_completion tagwriter" in script


@needs_bash
@pytest.mark.parametrize(("line", "expected"), [
    ("tagwriter lo", ["load-test"]),
    ("tagwriter run --so", ["--source"]),
    ("tagwriter run --source ", ["simulate", "jsonl", "csv"]),
    ("tagwriter --log-format ", ["text", "json"]),
    ("tagwriter --log-form", ["--log-format"]),
])
def test_the_sourced_script_completes_commands_options_and_choices(line: str, expected: list[str]) -> None:
    """What bash does on TAB: source the script, fill COMP_WORDS/COMP_CWORD, call the function."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    array = " ".join(f"'{w}'" for w in words)
    out = in_bash(f"source <(tagwriter --show-completion bash); COMP_WORDS=({array}); "
                  f"COMP_CWORD={len(words) - 1}; _tagwriter_completion tagwriter; "
                  'printf "%s\\n" "${COMPREPLY[@]}"')
    offered = out.split()
    assert set(expected) <= set(offered), offered


@needs_bash
def test_install_completion_registers_it_for_the_next_bash(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = in_bash("tagwriter --install-completion bash", HOME=str(home))
    assert "bash completion installed in" in out
    rc = home / ".bashrc"
    assert ".bash_completions/tagwriter.sh" in rc.read_text()
    # A new interactive bash reads it: tagwriter is registered for completion.
    registered = in_bash("complete -p tagwriter", "--rcfile", str(rc), "-i", HOME=str(home))
    assert "-F _tagwriter_completion tagwriter" in registered


@needs_bash
def test_completion_env_var_protocol() -> None:
    out = in_bash('_TAGWRITER_COMPLETE=complete_bash COMP_WORDS="tagwriter init" COMP_CWORD=1 tagwriter')
    assert out.split() == ["init-db"]


# -- --log-format json -----------------------------------------------------------------------


def entries(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object (a line that is not one fails the test)."""
    found = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(e, dict) for e in found)
    return found


def test_run_logs_one_json_object_per_line_to_console_and_file(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(jsonl(50))
    before = datetime.now(UTC) - timedelta(seconds=1)
    result = runner.invoke(app, ["run", "-i", "in.jsonl", "--log-format", "json", "--log-file", "tw.log"])
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert result.exit_code == 0, result.output
    assert summary(result.stdout)["written"] == 50
    for text in (result.stderr, (tmp_path / "tw.log").read_text()):
        logged = entries(text)
        assert logged and all({"time", "level", "logger", "thread", "message"} <= e.keys() for e in logged)
        times = [datetime.fromisoformat(e["time"]) for e in logged]
        assert all(t.utcoffset() == timedelta(0) and before <= t <= after for t in times)
        assert {e["level"] for e in logged} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert all(e["logger"].startswith("tagwriter") for e in logged)
        assert any(e["message"] == "stopping: end of input" for e in logged)


def test_json_logs_hide_passwords_as_the_text_format_does(tmp_path: Path) -> None:
    """A PostgreSQL URL whose password holds '@' and '/', to a port nobody listens on: the run spools, logging why."""
    secret = "p@ss/w0rd"
    (tmp_path / "c.toml").write_text(
        f'[database]\nurl = "postgresql://app:{secret}@127.0.0.1:{free_port()}/plant?password=qp4ss"\n'
        "connect_timeout = 0.5\n"
    )
    (tmp_path / "in.jsonl").write_text(jsonl(20))
    result = runner.invoke(app, ["--log-format", "json", "--log-level", "debug", "--config", "c.toml",
                                 "run", "-i", "in.jsonl", "--log-file", "tw.log"])
    assert summary(result.stdout)["spooled"] == 20, result.output
    log_text = (tmp_path / "tw.log").read_text()
    assert any("outage mode" in e["message"] for e in entries(log_text))
    for text in (result.stdout, result.stderr, log_text):
        for part in (secret, "p@ss", "w0rd", "qp4ss"):
            assert part not in text


def test_an_exception_is_one_json_line_with_its_traceback_redacted() -> None:
    register("hunter2-secret")
    stream = io.StringIO()
    configure_logging("INFO", console_handler=logging.StreamHandler(stream), fmt="json")
    log = logging.getLogger("tagwriter.test")
    try:
        raise ValueError("connect failed for app/hunter2-secret@db")
    except ValueError:
        log.exception("write failed: password=%s", "hunter2-secret")
    [entry] = entries(stream.getvalue())
    assert entry["level"] == "ERROR" and entry["logger"] == "tagwriter.test"
    assert entry["message"] == "write failed: password=***"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: connect failed for app/***@db" in entry["exception"]
    assert "hunter2" not in stream.getvalue()


def test_the_choice_ends_with_the_invocation(tmp_path: Path) -> None:
    """One command's `--log-format json` does not leak into the next (a test harness, an embedding process)."""
    (tmp_path / "in.jsonl").write_text(jsonl(5))
    assert runner.invoke(app, ["--log-format", "json", "run", "-i", "in.jsonl"]).exit_code == 0
    result = runner.invoke(app, ["run", "-i", "in.jsonl"])
    assert result.exit_code == 0
    assert " INFO    tagwriter." in result.stderr and "{" not in result.stderr.splitlines()[0]


def test_logging_format_in_the_config_file_and_the_flag_over_it(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(jsonl(5))
    (tmp_path / "c.toml").write_text('[logging]\nformat = "json"\n')
    result = runner.invoke(app, ["--config", "c.toml", "run", "-i", "in.jsonl"])
    assert result.exit_code == 0, result.output
    assert any(e["message"] == "stopping: end of input" for e in entries(result.stderr))
    result = runner.invoke(app, ["--config", "c.toml", "--log-format", "text", "run", "-i", "in.jsonl"])
    assert " INFO    tagwriter." in result.stderr and not result.stderr.startswith("{")


def test_an_unknown_format_is_a_usage_error() -> None:
    result = runner.invoke(app, ["--log-format", "xml", "run"])
    assert result.exit_code == 2 and "'xml' is not one of 'text', 'json'" in result.output

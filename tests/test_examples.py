"""The examples users copy: embed.py runs, every config validates, the systemd unit matches the CLI."""

from __future__ import annotations

import configparser
import os
import shlex
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tagwriter.cli.app import app
from tagwriter.config import DatabaseConfig, parse_url

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = [*sorted(EXAMPLES.glob("*.toml")), ROOT / "tagwriter.toml"]
SECTIONS = ("source", "buffer", "writer", "database", "backup", "metrics", "logging")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_outside_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TAGWRITER_"):
            monkeypatch.delenv(name)


def test_the_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {"oracle.toml", "oracle-wallet.toml", "postgresql.toml", "embed.py",
            "tagwriter.service", "tagwriter.env.example", "ci-load-test.yml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_validates(path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"ok: {path} is valid")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_example_holds_a_password(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    db = data.get("database", {})
    assert not db.get("password") and not db.get("wallet_password")
    assert not parse_url(db.get("url", DatabaseConfig().url)).password


def test_top_level_sample_is_the_documented_default() -> None:
    text = (ROOT / "tagwriter.toml").read_text()
    data = tomllib.loads(text)
    assert tuple(data) == SECTIONS  # every section, in order
    assert data["database"]["url"] == "sqlite:///tagwriter.db"
    assert data["source"]["kind"] == "simulate"
    assert '# url = "oracle://' in text  # the Oracle example, commented out
    for section in SECTIONS:  # each section is explained
        before = text[:text.index(f"[{section}]")].rstrip().splitlines()
        after = text[text.index(f"[{section}]"):].splitlines()[1]
        assert after.startswith("#") or before[-1].startswith("#"), section


def test_oracle_examples_show_easy_connect_and_wallet() -> None:
    easy = tomllib.loads((EXAMPLES / "oracle.toml").read_text())["database"]
    url = parse_url(easy["url"])
    assert url.kind == "oracle" and url.host and url.port and url.name
    wallet = tomllib.loads((EXAMPLES / "oracle-wallet.toml").read_text())["database"]
    assert wallet["dsn"] and wallet["config_dir"] and wallet["wallet_location"]


def test_embed_example_runs_and_writes_every_value(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGWRITER_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py"), "--polls", "8", "--interval", "0.02"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitted 120 = written 120 + duplicates 0" in proc.stdout
    with sqlite3.connect(tmp_path / "embed.db") as conn:
        assert conn.execute("SELECT count(*) FROM tag_values").fetchone()[0] == 120


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_env_file_example_holds_valid_keys_and_the_password() -> None:
    values = read_env_file(EXAMPLES / "tagwriter.env.example")
    assert "TAGWRITER_DATABASE_PASSWORD" in values
    result = runner.invoke(app, ["config", "validate", str(EXAMPLES / "oracle.toml")], env=values)
    assert result.exit_code == 0, result.stderr
    # Every commented-out setting is a valid key too.
    commented = {}
    for line in (EXAMPLES / "tagwriter.env.example").read_text().splitlines():
        if line.startswith("# TAGWRITER_"):
            key, _, value = line[2:].partition("=")
            commented[key] = value
    result = runner.invoke(app, ["config", "validate", str(EXAMPLES / "oracle.toml")], env=commented)
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr  # each name is read as config, none ignored


def test_systemd_unit_runs_tagwriter_with_options_that_exist() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((EXAMPLES / "tagwriter.service").read_text())
    service = unit["Service"]
    assert service["EnvironmentFile"].endswith("tagwriter.env")
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > 10  # more than the default writer.shutdown_timeout
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/tagwriter")
    assert "--database" not in argv and not any("password" in a.lower() for a in argv)
    # Parse the arguments with the real command tree (no command runs): an unknown option fails here.
    group = typer.main.get_command(app)
    assert "run" in argv
    at = argv.index("run")
    ctx = group.make_context("tagwriter", argv[1:at])
    run = group.commands["run"]  # type: ignore[attr-defined]
    run_ctx = run.make_context("run", argv[at + 1:], parent=ctx)
    assert run_ctx.params["no_panel"] is True  # journald gets status lines, not panel frames


def test_ci_job_runs_commands_with_options_that_exist() -> None:
    """Every `run: tagwriter ...` step of the CI example parses with the real command tree."""
    text = (EXAMPLES / "ci-load-test.yml").read_text()
    steps = [line.split("run:", 1)[1].split("#", 1)[0].strip() for line in text.splitlines()
             if line.strip().startswith(("run: tagwriter", "- run: tagwriter"))]
    assert {shlex.split(s)[1] for s in steps} == {"load-test", "overflow-test"}
    assert "${{ secrets.TAGWRITER_DATABASE_PASSWORD }}" in text and "--database" not in text
    group = typer.main.get_command(app)
    for step in steps:
        argv = shlex.split(step)
        command = group.commands[argv[1]]  # type: ignore[attr-defined]
        ctx = command.make_context(argv[1], argv[2:])
        assert ctx.params["json_path"] is not None  # CI keeps the report


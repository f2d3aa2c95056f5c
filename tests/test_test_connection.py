"""`tagwriter test-connection`: SQLite for real; Oracle through the fake driver behind a real
listening socket (so the "reach" check does a real TCP connect)."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from oracle_fake import FakeDriver, FakeServer, dpy, ora
from rich.console import Console
from typer.testing import CliRunner

import tagwriter.sinks.oracle.sink as oracle_mod
from tagwriter.checks import run_checks
from tagwriter.cli.app import app
from tagwriter.cli.test_connection import render
from tagwriter.config import DatabaseConfig
from tagwriter.sinks.base import TableSpec
from tagwriter.sinks.sqlite import SqliteSink

CHECKS = ["reach the server", "log in", "server version", "table exists", "columns and types match",
          "unique key on (tag, ts)", "insert allowed", "round-trip latency"]


def invoke(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, str, float]:
    config = tmp_path / "tagwriter.toml"
    config.write_text("")
    started = time.monotonic()
    result = CliRunner().invoke(app, args, env={"TAGWRITER_CONFIG": str(config), "COLUMNS": "200", **env})
    return result.exit_code, result.output, time.monotonic() - started


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"TAGWRITER_DATABASE__URL": f"sqlite:///{tmp_path / 'tags.db'}"}


def test_sqlite_all_checks_pass(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    SqliteSink(tmp_path / "tags.db").create_table()
    code, out, _ = invoke(["test-connection"], sqlite_env, tmp_path)
    assert code == 0, out
    assert out.count("✓") == 8 and "✗" not in out
    assert "all 8 checks passed" in out and "SQLite 3." in out
    with sqlite3.connect(tmp_path / "tags.db") as conn:
        assert conn.execute("SELECT count(*) FROM tag_values").fetchone()[0] == 0


def test_missing_table_fails_with_the_init_db_hint_and_skips_the_rest(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    code, out, _ = invoke(["test-connection"], sqlite_env, tmp_path)
    assert code == 1
    assert "table tag_values does not exist" in out and "tagwriter init-db" in out
    assert out.count("✓") == 3 and out.count("✗") == 1 and out.count("–") == 4


def test_json_for_scripts(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    SqliteSink(tmp_path / "tags.db").create_table()
    code, out, _ = invoke(["test-connection", "--json", "--pings", "3"], sqlite_env, tmp_path)
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    assert [c["name"] for c in data["checks"]] == CHECKS
    assert all(c["status"] == "pass" and c["seconds"] >= 0 for c in data["checks"])
    assert "of 3 round trips" in data["checks"][-1]["detail"]


def test_wrong_key_fails_only_the_key_check(tmp_path: Path) -> None:
    path = tmp_path / "tags.db"
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, quality INTEGER)')
    results = run_checks(SqliteSink(path), TableSpec(), timeout=10)
    status = {r.name: r.status for r in results}
    assert status == {**dict.fromkeys(CHECKS, "pass"), "unique key on (tag, ts)": "fail"}
    key = next(r for r in results if r.status == "fail")
    assert "no primary key" in key.detail and "replay is not idempotent" in key.hint


def test_render_shows_marks_time_and_hint(tmp_path: Path) -> None:
    results = run_checks(SqliteSink(tmp_path / "none.db"), TableSpec(), timeout=10)
    console = Console(width=160, color_system=None, record=True)
    console.print(render(results, "sqlite:///none.db"))
    text = console.export_text()
    assert "✗ │ table exists" in text and "hint: run `tagwriter init-db`" in text
    assert " ms " in text


# -- Oracle through the fake driver ------------------------------------------------------


@pytest.fixture
def port() -> Iterator[int]:
    """A real listening socket, so the reach check's TCP connect succeeds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(oracle_mod, "DRIVER", FakeDriver(fake))
    return fake


def oracle_env(port: int, **extra: str) -> dict[str, str]:
    return {"TAGWRITER_DATABASE__URL": f"oracle://scott@127.0.0.1:{port}/orclpdb",
            "TAGWRITER_DATABASE_PASSWORD": "tiger-secret-pw",
            "TAGWRITER_DATABASE__CONNECT_TIMEOUT": "0.5", "TAGWRITER_DATABASE__POOL_WAIT_TIMEOUT": "0.5", **extra}


def test_oracle_all_checks_pass(server: FakeServer, port: int, tmp_path: Path) -> None:
    code, out, _ = invoke(["test-connection"], oracle_env(port), tmp_path)
    assert code == 0, out
    assert out.count("✓") == 8
    assert f"reached 127.0.0.1:{port} (tcp)" in out and "Oracle Database 23.4" in out
    assert "TAG_NAME VARCHAR2(128), TS TIMESTAMP(6), VALUE BINARY_DOUBLE, QUALITY NUMBER(5)" in out
    assert server.stored() == [] and server.pings == 5


@pytest.mark.parametrize(("error", "code", "hint"), [
    (lambda: ora(1017, "invalid credential or not authorized; logon denied"), "ORA-01017",
     "user or password wrong"),
    (lambda: dpy(6001, service_name="orclpdb", host="127.0.0.1", port=1521), "DPY-6001",
     "listener up but service name unknown"),
    (lambda: ora(28000, "The account is locked."), "ORA-28000", "locked"),
])
def test_oracle_login_errors_get_the_right_hint(
    server: FakeServer, port: int, tmp_path: Path, error: object, code: str, hint: str
) -> None:
    server.connect_error = error  # type: ignore[assignment]
    exit_code, out, _ = invoke(["test-connection", "--json"], oracle_env(port), tmp_path)
    data = json.loads(out)
    assert exit_code == 1 and data["ok"] is False
    login = data["checks"][1]
    assert (login["status"], login["code"]) == ("fail", code)
    assert hint in login["hint"]
    assert [c["status"] for c in data["checks"][2:]] == ["skipped"] * 6
    assert "tiger-secret-pw" not in out


def test_oracle_missing_table(server: FakeServer, port: int, tmp_path: Path) -> None:
    server.exists = False
    code, out, _ = invoke(["test-connection", "--json"], oracle_env(port), tmp_path)
    checks = json.loads(out)["checks"]
    assert code == 1
    assert [c["status"] for c in checks] == ["pass"] * 3 + ["fail"] + ["skipped"] * 4
    assert "tag_values does not exist" in checks[3]["detail"] and "init-db" in checks[3]["hint"]


def test_oracle_insert_privilege_check(server: FakeServer, port: int, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sink = oracle_mod.OracleSink.from_config(
        DatabaseConfig(url=f"oracle://scott@127.0.0.1:{port}/orclpdb", connect_timeout=0.5, pool_wait_timeout=0.5))
    real_try_insert = sink.try_insert

    def denied() -> None:
        server.fail_next("execute", ora(1031, "insufficient privileges"))
        real_try_insert()

    monkeypatch.setattr(sink, "try_insert", denied)
    results = {r.name: r for r in run_checks(sink, TableSpec(), timeout=10)}
    assert results["insert allowed"].status == "fail" and results["insert allowed"].code == "ORA-01031"
    assert results["round-trip latency"].status == "pass"
    sink.close()


def test_the_timeout_bounds_a_hanging_login_and_skips_the_rest(server: FakeServer, port: int, tmp_path: Path) -> None:
    server.hang_connects()
    try:
        env = oracle_env(port, TAGWRITER_DATABASE__CONNECT_TIMEOUT="30")
        code, out, took = invoke(["test-connection", "--timeout", "1", "--json"], env, tmp_path)
    finally:
        server.release_connects()
    data = json.loads(out)
    assert code == 1 and took < 1 + 3
    login = data["checks"][1]
    assert login["status"] == "fail" and login["code"] == "TIMEOUT"
    assert "a listener that accepts but never answers" in login["hint"]
    assert [c["status"] for c in data["checks"][2:]] == ["skipped"] * 6


def test_database_option_overrides_the_configured_url(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    SqliteSink(other).create_table()
    code, out, _ = invoke(["test-connection", "--database", f"sqlite:///{other}"], sqlite_env, tmp_path)
    assert code == 0, out  # the environment's tags.db has no table: it was not the one checked
    assert out.count("✓") == 8 and "other.db" in out
    assert not (tmp_path / "tags.db").exists()


def test_database_option_with_a_password_is_refused_with_exit_2(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    code, out, _ = invoke(["test-connection", "--database", "postgresql://writer:s3cret@127.0.0.1:5432/plant"],
                          sqlite_env, tmp_path)
    assert code == 2, out
    assert "the URL contains a password" in out and "s3cret" not in out

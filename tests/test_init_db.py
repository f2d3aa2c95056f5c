"""`tagwriter init-db` on a real SQLite file and on Oracle through the fake driver."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from oracle_fake import FakeDriver, FakeServer, ora
from typer.testing import CliRunner

import tagwriter.sinks.oracle.sink as oracle_mod
from tagwriter.cli.app import app


def invoke(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    config = tmp_path / "tagwriter.toml"
    if not config.exists():
        config.write_text("")
    result = CliRunner().invoke(app, args, env={"TAGWRITER_CONFIG": str(config), "COLUMNS": "200", **env})
    return result.exit_code, result.output


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"TAGWRITER_DATABASE__URL": f"sqlite:///{tmp_path / 'db' / 'tags.db'}"}


def test_print_shows_the_ddl_and_touches_nothing(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke(["init-db", "--print", "--read-index"], sqlite_env, tmp_path)
    assert code == 0
    assert 'PRIMARY KEY ("ts", "tag_name")\n) WITHOUT ROWID;' in out
    assert 'CREATE INDEX IF NOT EXISTS "tag_values_tag_ts"' in out
    assert not (tmp_path / "db").exists()


def test_creates_then_reports_an_existing_table(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke(["init-db"], sqlite_env, tmp_path)
    assert code == 0 and "created" in out and "unique key: ts, tag_name" in out
    code, out = invoke(["init-db"], sqlite_env, tmp_path)
    assert code == 0 and "already exists with the expected columns and key" in out
    with sqlite3.connect(tmp_path / "db" / "tags.db") as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index'").fetchone()[0] == 0
    code, out = invoke(["init-db", "--read-index"], sqlite_env, tmp_path)
    assert code == 0 and "read index ensured" in out
    with sqlite3.connect(tmp_path / "db" / "tags.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
    assert names == ["tag_values_tag_ts"]


def test_a_table_of_another_shape_is_an_error_that_says_what_differs(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "db").mkdir()
    with sqlite3.connect(tmp_path / "db" / "tags.db") as conn:
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts REAL, value REAL)")
    code, out = invoke(["init-db"], sqlite_env, tmp_path)
    assert code == 1
    assert "exists with a different shape" in out
    assert "column ts is REAL, expected TEXT" in out
    assert "column ts is nullable, expected NOT NULL" in out
    assert "column quality is missing" in out
    assert "no primary key or unique constraint" in out
    assert "Traceback" not in out


def test_partitioning_is_an_oracle_option(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke(["init-db", "--partition-by-day"], sqlite_env, tmp_path)
    assert code == 1 and "Oracle option" in out


ORACLE_ENV = {"TAGWRITER_DATABASE__URL": "oracle://scott@127.0.0.1:1521/orclpdb",
              "TAGWRITER_DATABASE_PASSWORD": "tiger-secret-pw"}


@pytest.fixture
def fake_oracle(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer(exists=False)
    monkeypatch.setattr(oracle_mod, "DRIVER", FakeDriver(server))
    return server


def test_oracle_print_needs_no_connection(fake_oracle: FakeServer, tmp_path: Path) -> None:
    code, out = invoke(["init-db", "--print", "--partition-by-day"], ORACLE_ENV, tmp_path)
    assert code == 0
    assert 'CREATE TABLE "TAG_VALUES"' in out and "USING INDEX LOCAL" in out and out.rstrip().endswith(";")
    assert fake_oracle.connects == 0


def test_oracle_creates_partitioned_table_once(fake_oracle: FakeServer, tmp_path: Path) -> None:
    code, out = invoke(["init-db", "--partition-by-day"], ORACLE_ENV, tmp_path)
    assert code == 0 and "created oracle scott@127.0.0.1:1521/orclpdb table TAG_VALUES" in out
    assert fake_oracle.exists and "NUMTODSINTERVAL(1, 'DAY')" in fake_oracle.ddl[0]
    code, out = invoke(["init-db", "--partition-by-day"], ORACLE_ENV, tmp_path)
    assert code == 0 and "nothing to do" in out and "applies only when the table is created" in out
    assert len(fake_oracle.ddl) == 1


def test_oracle_table_of_another_shape(fake_oracle: FakeServer, tmp_path: Path) -> None:
    fake_oracle.exists = True
    fake_oracle.columns[1] = ("TS", "DATE", None, None, None, "N")
    code, out = invoke(["init-db"], ORACLE_ENV, tmp_path)
    assert code == 1 and "column TS is DATE, expected TIMESTAMP(6)" in out


def test_oracle_bad_password_is_one_clear_line(fake_oracle: FakeServer, tmp_path: Path) -> None:
    fake_oracle.connect_error = lambda: ora(1017, "invalid credential or not authorized; logon denied")
    code, out = invoke(["init-db"], ORACLE_ENV, tmp_path)
    assert code == 1
    assert "ORA-01017" in out and "user or password wrong" in out
    assert "tiger-secret-pw" not in out and "Traceback" not in out


def test_database_option_overrides_the_configured_url(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    code, out = invoke(["init-db", "--database", f"sqlite:///{other}"], sqlite_env, tmp_path)
    assert code == 0, out
    assert "created" in out
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT count(*) FROM tag_values").fetchone()[0] == 0
    assert not (tmp_path / "db").exists()  # the URL from the environment was not used


def test_database_option_with_a_password_is_refused_with_exit_2(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke(["init-db", "--database", "postgresql://writer:s3cret@127.0.0.1:5432/plant"],
                       sqlite_env, tmp_path)
    assert code == 2, out
    assert "the URL contains a password" in out and "s3cret" not in out

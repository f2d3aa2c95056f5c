"""`tagwriter replay FILES...` (alias `replay-backups`) through CliRunner, into a real SQLite file.

Each test runs in its own folder: `tagwriter.db` and `backup/` land there
(the built-in defaults), as they would for an operator in a plant folder.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from tagwriter.cli.app import app
from tagwriter.models import TagValue
from tagwriter.spool import Spool

runner = CliRunner()
T0 = 1_714_564_800_000_000

pytestmark = pytest.mark.usefixtures("in_tmp")


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, args, env=env)


def spool_files(n_rows: int, *, start: int = 0, per_file: int = 100) -> list[Path]:
    """Real spool files in ./backup, as `tagwriter run` leaves them after an outage."""
    backup = Path("backup")
    before = set(backup.glob("tagwriter-*.csv"))
    spool = Spool(backup, backup / "quarantine", roll_rows=per_file, roll_seconds=3600)
    data = [TagValue(f"t{i % 5}", T0 + (i // 5) * 1_000_000, i * 0.5, 192) for i in range(start, start + n_rows)]
    for i in range(0, len(data), 50):
        spool.write_rows(data[i:i + 50])
    spool.seal()
    return sorted(set(backup.glob("tagwriter-*.csv")) - before)


def db_rows(db: str = "tagwriter.db") -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT tag_name, ts, value, quality FROM tag_values ORDER BY ts, tag_name").fetchall()


def table_row(output: str, name: str) -> list[str]:
    """The cells of the report table's row whose file cell ends with `name`."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        # a long file cell folds onto the next line: its first line starts the path
        if cells and (cells[0].endswith(name) or (len(cells[0]) > 20 and f"backup/{name}".startswith(cells[0]))):
            return cells
    raise AssertionError(f"no table row for {name} in:\n{output}")


def test_replay_writes_the_files_shows_a_table_and_moves_them() -> None:
    files = spool_files(250)
    result = invoke(["replay", *map(str, files)])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "rows read" in line)
    for column in ("file", "rows read", "inserted", "duplicate", "quarantined", "bad lines", "result"):
        assert column in header
    cells = table_row(result.stdout, files[0].name)
    assert cells[1:6] == ["100", "100", "0", "0", "0"]
    assert cells[6] == "moved to backup/replayed/"
    assert table_row(result.stdout, "total")[1:3] == ["250", "250"]
    assert "replayed 3 files: 250 rows, 250 inserted, 0 already in the table" in result.stdout
    assert len(db_rows()) == 250
    assert not any(f.exists() for f in files)
    assert sorted(p.name for p in Path("backup/replayed").iterdir()) == [f.name for f in files]


def test_replaying_again_reports_every_row_as_a_duplicate_and_exits_0() -> None:
    files = spool_files(120)
    assert invoke(["replay", *map(str, files)]).exit_code == 0
    before = db_rows()
    result = invoke(["replay-backups", "backup/replayed"])  # the alias, and a folder
    assert result.exit_code == 0, result.output
    assert "120 rows, 0 inserted, 120 already in the table" in result.stdout
    assert table_row(result.stdout, files[0].name)[1:4] == ["100", "0", "100"]
    assert db_rows() == before


def test_plain_progress_lines_when_not_a_terminal() -> None:
    files = spool_files(150)
    result = invoke(["replay", "backup"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("replaying ")] == [
        f"replaying {f}" for f in files]


def test_progress_bar_can_be_forced() -> None:
    files = spool_files(150)
    result = invoke(["replay", "--progress", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert "replaying backup" not in result.stdout  # the bar replaces the plain lines
    assert len(db_rows()) == 150


def test_bad_lines_are_reported_quarantined_and_exit_1() -> None:
    Path("backup").mkdir()
    bad = Path("backup/tagwriter-20240501T000000000000Z-1-0001.csv")
    bad.write_text("tag_name,ts,value,quality\n"
                   "a,2024-05-01T12:00:00.000000Z,1.5,192\n"
                   "b,2024-05-01T12:00:00.000000Z,1.5\n"
                   "c,noon,1.5,192\n"
                   "d,2024-05-01T12:00:00.000000Z,x1,192\n"
                   "e,2024-05-01T12:00:01.000000Z,2.5,192\n"
                   "f,2024-05-01T12:00:01.000000Z,2.5,1")
    good = spool_files(10)
    result = invoke(["replay", str(bad), *map(str, good)])
    assert result.exit_code == 1, result.output
    for line, reason in ((3, "expected 4 columns, found 3"), (4, "unparsable timestamp 'noon'"),
                         (5, "unparsable value 'x1'"), (7, "truncated line (no line end)")):
        assert f"{bad}:{line}: {reason}" in result.stderr
    assert table_row(result.stdout, bad.name)[1:6] == ["2", "2", "0", "0", "4"]
    assert table_row(result.stdout, good[0].name)[1:3] == ["10", "10"]
    assert "error: not everything was replayed: 4 bad lines quarantined" in result.stderr
    assert "--from-quarantine" in result.stderr
    assert len(db_rows()) == 12
    q = "".join(p.read_text() for p in Path("backup/quarantine").glob("quarantine-*.csv"))
    assert f"{bad}:4" in q and "c,noon,1.5,192" in q


def test_a_file_that_is_not_a_spool_file_is_refused_with_a_clear_message() -> None:
    Path("readings.csv").write_text("timestamp;tag;value\n1;a;2\n")
    result = invoke(["replay", "readings.csv", "missing.csv"])
    assert result.exit_code == 1
    assert ("readings.csv:1: not a tagwriter spool file (header 'timestamp;tag;value', "
            "expected 'tag_name,ts,value,quality'); refused, left in place") in result.stderr
    assert "missing.csv: no such file; refused, left in place" in result.stderr
    assert "2 files refused" in result.stderr
    assert Path("readings.csv").exists()


def test_dry_run_touches_nothing() -> None:
    files = spool_files(100)
    result = invoke(["replay", "--dry-run", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert "dry run (nothing written)" in result.stdout
    assert "checked 1 file: 100 rows" in result.stdout
    assert all(f.exists() for f in files)
    assert not Path("tagwriter.db").exists()
    assert sorted(p.name for p in Path("backup").iterdir()) == [f.name for f in files]


def test_delete_removes_replayed_files() -> None:
    files = spool_files(100)
    result = invoke(["replay", "--delete", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert table_row(result.stdout, files[0].name)[6] == "deleted"
    assert not files[0].exists() and not Path("backup/replayed").exists()


def test_a_database_that_fails_leaves_the_files_for_a_later_replay() -> None:
    files = spool_files(200)
    Path("blocker").write_text("a file where the database folder should be")
    env = {"TAGWRITER_WRITER__RETRY_DELAYS": "0.01,0.01"}
    result = invoke(["replay", *map(str, files)], env={**env, "TAGWRITER_DATABASE__URL": "sqlite:///blocker/x.db"})
    assert result.exit_code == 1, result.output
    assert table_row(result.stdout, files[0].name)[6].startswith("FAILED: ")
    assert table_row(result.stdout, files[1].name)[6].startswith("SKIPPED: not attempted")
    assert "run the same command again" in result.stderr
    assert all(f.exists() for f in files)
    result = invoke(["replay", *map(str, files)])
    assert result.exit_code == 0 and len(db_rows()) == 200


def test_rows_the_database_rejects_are_quarantined_then_resubmitted_with_from_quarantine() -> None:
    with sqlite3.connect("tagwriter.db") as conn:  # an operator's stricter table: values below 50 only
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL "
                     "CHECK (value < 50), quality INTEGER, PRIMARY KEY (ts, tag_name)) WITHOUT ROWID")
    files = spool_files(200)
    result = invoke(["replay", *map(str, files)])
    assert result.exit_code == 1, result.output
    assert "100 rows rejected by the database (quarantined)" in result.stderr
    assert len(db_rows()) == 100
    quarantine = "".join(p.read_text() for p in Path("backup/quarantine").glob("quarantine-*.csv"))
    assert quarantine.count("CHECK constraint failed") == 100

    with sqlite3.connect("tagwriter.db") as conn:  # the cause is fixed
        conn.execute("ALTER TABLE tag_values RENAME TO old")
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, "
                     "quality INTEGER, PRIMARY KEY (ts, tag_name)) WITHOUT ROWID")
        conn.execute("INSERT INTO tag_values SELECT * FROM old")
    result = invoke(["replay", "--from-quarantine", "backup/quarantine"])
    assert result.exit_code == 0, result.output
    assert "100 inserted" in result.stdout
    assert len(db_rows()) == 200


def test_rate_and_batch_size_are_validated() -> None:
    assert invoke(["replay", "--rate", "-5", "x.csv"]).exit_code == 2
    assert invoke(["replay", "--batch-size", "0", "x.csv"]).exit_code == 2
    files = spool_files(100)
    result = invoke(["replay", "--rate", "100000", "--batch-size", "30", *map(str, files)])
    assert result.exit_code == 0, result.output


def test_no_files_is_a_usage_error() -> None:
    assert invoke(["replay"]).exit_code == 2


def test_dry_run_progress_lines_say_checking_not_replaying() -> None:
    files = spool_files(150)
    result = invoke(["replay", "--dry-run", "backup"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith(("checking ", "replaying "))] == [
        f"checking {f}" for f in files]


def test_database_option_overrides_the_configured_url() -> None:
    files = spool_files(120)
    result = invoke(["replay", "--database", "sqlite:///other.db", *map(str, files)],
                    env={"TAGWRITER_DATABASE__URL": "sqlite:///from-env.db"})
    assert result.exit_code == 0, result.output
    assert len(db_rows("other.db")) == 120
    assert not Path("from-env.db").exists() and not Path("tagwriter.db").exists()


def test_database_option_with_a_password_is_refused_with_exit_2() -> None:
    files = spool_files(50)
    result = invoke(["replay", "--database", "postgresql://writer:s3cret@127.0.0.1:5432/plant", *map(str, files)])
    assert result.exit_code == 2, result.output
    assert "the URL contains a password" in result.stderr
    assert all(f.exists() for f in files) and not Path("tagwriter.db").exists()


def test_quarantine_files_replayed_move_to_the_quarantine_replayed_folder() -> None:
    with sqlite3.connect("tagwriter.db") as conn:  # values below 50 only, then fixed
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL "
                     "CHECK (value < 50), quality INTEGER, PRIMARY KEY (ts, tag_name)) WITHOUT ROWID")
    files = spool_files(200)
    assert invoke(["replay", *map(str, files)]).exit_code == 1
    qfiles = sorted(Path("backup/quarantine").glob("quarantine-*.csv"))
    assert qfiles
    with sqlite3.connect("tagwriter.db") as conn:
        conn.execute("DROP TABLE tag_values")
    result = invoke(["replay", "--from-quarantine", "backup/quarantine"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("backup/quarantine/replayed").iterdir()) == [q.name for q in qfiles]
    assert sorted(p.name for p in Path("backup/replayed").iterdir()) == [f.name for f in files]  # spool files only
    assert "moved to backup/quarantine/replayed/" in result.stdout


# -- the database the files were spooled for (.target) ------------------------------------------


def record_target(target: str) -> None:
    """What `tagwriter run` leaves in the spool folder: the database its files are for."""
    Path("backup/.target").write_text(target + "\n", encoding="utf-8")


def test_replay_goes_to_the_recorded_postgresql_target_by_default() -> None:
    """Before: 800 rows went into a new ./tagwriter.db, exit 0. Now: into the recorded PostgreSQL database."""
    from tagwriter.sinks.postgresql import PostgresSink
    from tests.pg_util import fresh_database

    with fresh_database("tw_replay") as db:
        PostgresSink(host=db.host, port=db.port, dbname=db.name, user=db.user).create_table()
        files = spool_files(800)
        record_target(f"postgresql://{db.user}@{db.host}:{db.port}/{db.name} table tag_values")
        result = invoke(["replay", "backup"])
        assert result.exit_code == 0, result.output
        assert db.count() == 800
        assert "recorded in backup/.target" in result.stdout
        assert not Path("tagwriter.db").exists() and not any(f.exists() for f in files)


def test_a_configured_or_given_database_other_than_the_recorded_one_is_refused_with_exit_2() -> None:
    """Before: exit 0 and 300 rows in the other database. Now: exit 2 naming both, nothing written or moved."""
    files = spool_files(300)
    record_target(f"sqlite:///{Path('plant.db').resolve()} table tag_values")
    for args, env in ((["--database", "sqlite:///scratch.db"], {}),
                      ([], {"TAGWRITER_DATABASE__URL": "sqlite:///scratch.db"})):
        result = invoke(["replay", *args, "backup"], env=env)
        assert result.exit_code == 2, result.output
        assert "spooled for sqlite:///" in result.stderr and "plant.db" in result.stderr
        assert "scratch.db" in result.stderr and "--ignore-target" in result.stderr
        assert not Path("scratch.db").exists() and all(f.exists() for f in files)
    result = invoke(["replay", "--database", "sqlite:///scratch.db", "--ignore-target", "backup"])
    assert result.exit_code == 0, result.output
    assert len(db_rows("scratch.db")) == 300 and not Path("plant.db").exists()


def test_the_recorded_target_is_used_when_nothing_is_configured_and_matches_a_relative_path() -> None:
    spool_files(100)
    record_target("sqlite:///plant.db table tag_values")  # as an earlier version recorded it: relative
    assert invoke(["replay", "--database", "sqlite:///plant.db", "backup"]).exit_code == 0
    assert len(db_rows("plant.db")) == 100 and not Path("tagwriter.db").exists()


# -- the table ------------------------------------------------------------------------------------


def test_replay_into_a_postgresql_database_without_the_table_says_init_db() -> None:
    """Before: 'run again once the database is reachable'. Now: the table is missing, run init-db."""
    from tests.pg_util import fresh_database

    with fresh_database("tw_replay") as db:
        files = spool_files(100)
        result = invoke(["replay", "--database", db.url(), "backup"])
        assert result.exit_code == 1, result.output
        assert "table tag_values does not exist" in result.stderr
        assert "tagwriter init-db" in result.stderr and "reachable" not in result.stderr
        assert all(f.exists() for f in files)


def test_replay_creates_a_missing_sqlite_table_as_run_does() -> None:
    with sqlite3.connect("tagwriter.db") as conn:  # the file exists, the table does not
        conn.execute("CREATE TABLE other (x)")
    spool_files(100)
    result = invoke(["replay", "backup"])
    assert result.exit_code == 0, result.output
    assert len(db_rows()) == 100


def test_a_sqlite_table_without_the_key_is_refused_at_open_with_the_init_db_hint() -> None:
    """Before: two replays inserted 1,000 rows twice ('0 already in the table'). Now: refused, nothing written."""
    with sqlite3.connect("tagwriter.db") as conn:
        conn.execute("CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, quality INTEGER)")
    files = spool_files(1000)
    for _ in range(2):
        result = invoke(["replay", "backup"])
        assert result.exit_code == 1, result.output
        assert "no primary key or unique constraint on (tag_name, ts)" in result.stderr
        assert "the table needs PRIMARY KEY (tag, ts)" in result.stderr and "reachable" not in result.stderr
    assert db_rows() == [] and all(f.exists() for f in files)


# -- hints ----------------------------------------------------------------------------------------


def test_an_empty_folder_says_no_spool_files_not_a_refused_file() -> None:
    Path("empty").mkdir()
    result = invoke(["replay", "empty"])
    assert result.exit_code == 1, result.output
    assert "no tagwriter-*.csv files in empty" in result.stderr and "refused" not in result.stderr


def test_bad_lines_say_they_are_fixed_by_hand_where_and_replay_once_fixed() -> None:
    files = spool_files(10)
    with files[0].open("a") as f:
        f.write("bad,line\n")
    assert invoke(["replay", "backup"]).exit_code == 1
    result = invoke(["replay", "--from-quarantine", "backup/quarantine"])
    assert result.exit_code == 1, result.output
    [kept] = Path("backup/quarantine").glob("quarantine-*.csv")  # the one left in the folder
    hint = " ".join(result.stderr.split())
    assert f"corrected by hand: in {kept}" in hint and "BAD_LINE" in hint
    assert "after fixing the cause" not in hint
    lines = kept.read_text().splitlines()
    assert lines[1].startswith(",,,,BAD_LINE,")
    kept.write_text(f"{lines[0]}\nfixed.tag,2024-05-01T12:00:00.000000Z,1.5,192{lines[1][3:]}\n")
    result = invoke(["replay", "--from-quarantine", str(kept)])
    assert result.exit_code == 0, result.output
    assert ("fixed.tag", "2024-05-01T12:00:00.000000Z", 1.5, 192) in db_rows()

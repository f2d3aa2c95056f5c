"""`tagwriter run` as a real process: rows land in SQLite, SIGTERM and a second SIGINT stop it as documented."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from procs import free_port, metric, run_env, start_run, summary
from waits import wait_until

#: A small simulation so the tests do not take the CPU others need: 2 groups x 10 tags every 0.1 s.
SMALL = {"TAGWRITER_SOURCE__GROUPS": "2", "TAGWRITER_SOURCE__TAGS_PER_GROUP": "10", "TAGWRITER_SOURCE__INTERVAL": "0.1"}


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1.0) as conn:
            return int(conn.execute("SELECT count(*) FROM tag_values").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def locked_database(db: Path) -> sqlite3.Connection:
    """The table, and a connection holding an exclusive lock on it: every write of the process hangs."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute('CREATE TABLE tag_values (tag_name TEXT NOT NULL, ts TEXT NOT NULL, value REAL, '
                     'quality INTEGER, PRIMARY KEY (ts, tag_name)) WITHOUT ROWID')
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    return lock


def test_run_duration_3_writes_rows_to_sqlite(tmp_path: Path) -> None:
    proc = start_run(tmp_path, "--duration", "3", env=run_env())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    counts = summary(out)
    # The default simulation: 10 groups x 100 tags every second, for 3 s.
    assert 2500 <= counts["submitted"] <= 4000, out
    assert counts["written"] == counts["submitted"] == rows(tmp_path / "tagwriter.db")
    with sqlite3.connect(tmp_path / "tagwriter.db") as conn:
        tags = conn.execute("SELECT count(DISTINCT tag_name) FROM tag_values").fetchone()[0]
    assert tags == 1000
    assert "duration of 3s reached" in out


def test_sigterm_stops_gracefully_with_summary_and_exit_0(tmp_path: Path) -> None:
    proc = start_run(tmp_path, env=run_env(**SMALL, TAGWRITER_WRITER__FLUSH_INTERVAL="0.1"))
    try:
        wait_until(lambda: rows(tmp_path / "tagwriter.db") >= 40, "rows in tagwriter.db", 30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped after" in out and "SIGTERM received" in out
    counts = summary(out)
    assert counts["pending"] == 0 and counts["spooled"] == 0
    assert counts["written"] == counts["submitted"] == rows(tmp_path / "tagwriter.db")
    assert "Traceback" not in err


def test_stdin_source_through_a_pipe(tmp_path: Path) -> None:
    lines = [json.dumps({"tag": f"t{i % 7}", "ts": 1_700_000_000 + i, "value": i}) for i in range(5000)]
    lines[99] = "not json"
    proc = start_run(tmp_path, "--source", "jsonl", "--input", "-", env=run_env(), stdin=subprocess.PIPE)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=60)
    assert proc.returncode == 3, err  # one malformed line: finished, but the input was bad
    assert summary(out)["written"] == 4999 == rows(tmp_path / "tagwriter.db")
    assert "stdin:100: not JSON" in err


@pytest.mark.parametrize("durability", ["memory", "disk"])
def test_second_sigint_spools_what_is_pending_at_once(tmp_path: Path, durability: str) -> None:
    """A write hangs on a locked database; SIGINT waits (shutdown_timeout 60 s), a second SIGINT ends it now:
    in memory what is pending is spooled; with the disk queue it stays queued for the next run."""
    db = tmp_path / "tagwriter.db"
    lock = locked_database(db)  # every write of the process now waits for call_timeout
    port = free_port()
    environ = run_env(**SMALL, TAGWRITER_DATABASE__CALL_TIMEOUT="120", TAGWRITER_WRITER__SHUTDOWN_TIMEOUT="60",
                  TAGWRITER_WRITER__FLUSH_INTERVAL="0.1", TAGWRITER_BUFFER__DURABILITY=durability)
    proc = start_run(tmp_path, "--metrics-port", str(port), env=environ)
    try:
        wait_until(lambda: (metric(port, "inflight") or 0) > 0, "a batch in flight on the locked database", 30)
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: metric(port, "state") == "stopping", "the first SIGINT to start the stop", 10)
        assert proc.poll() is None, "the first SIGINT should wait for the hung write (60 s allowed)"
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - second
    finally:
        proc.kill()
        lock.rollback()
        lock.close()
    assert proc.returncode == 0, err
    assert took < 10, f"the second SIGINT took {took:.1f}s to end the run"
    counts = summary(out)
    assert counts["written"] == 0
    if durability == "memory":
        assert "second interrupt: spooling what is pending now" in out + err
        assert counts["pending"] == 0
    else:
        assert "what is pending stays in the queue" in out + err
        assert counts["pending"] == counts["submitted"] > 0  # every value is still queued on disk
        return
    assert counts["spooled"] == counts["submitted"] > 0
    spooled_lines = sum(len(p.read_text().splitlines()) - 1 for p in (tmp_path / "backup").glob("*.csv"))
    assert spooled_lines == counts["spooled"]

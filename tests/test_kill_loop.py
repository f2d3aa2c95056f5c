"""kill -9 loops (issue 13): `tagwriter run --input FILE` killed at random moments loses no value.

The loop itself is tests/kill_loop.py (which also runs the long ones from
the command line); here: 60 kills into SQLite, and kill -9 during a
PostgreSQL outage through the fault proxy. Each prints its report (kills,
values recovered at start, duplicates the runs counted).

After the outage, the spool files the runs left are replayed with
`tagwriter replay backup` before the table is compared: a run of a file ends
at end of input before auto replay gets to them (kill_loop.replay_left), and
the report says how many there were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_loop import Report, Settings, describe, postgresql_loop, sqlite_loop

#: About 75 s and 25 s here; a loaded machine starts each run slower, hence the room.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: The input lasts far more than the kills: ~2,000 values are written per killed run (batch size 1).
SQLITE = Settings(values=400_000, kills=60, seed=13)
#: 4 kills with the database there, 8 while it refuses connections, 4 after it is back.
OUTAGE = Settings(values=60_000, kills=16, seed=29, batch_size=50)
OUTAGE_KILLS = range(4, 12)


def check(report: Report) -> None:
    """Exactly the N values in the table, nothing left queued or spooled; prints the report (and each run)."""
    print("\n" + "\n".join(describe(run) for run in report.runs))
    print(report.text())
    assert report.missing == 0 and report.extra == 0 and report.wrong_values == 0, report.text()
    assert report.queue_records == 0 and report.spool_files == 0, report.text()
    last = report.runs[-1]
    assert not last.killed and last.exit_code == 0 and last.counts is not None
    assert last.counts["pending"] == 0


def test_kill_9_loop_into_sqlite_loses_nothing(tmp_path: Path) -> None:
    report = sqlite_loop(tmp_path, SQLITE)
    check(report)
    assert report.kills == SQLITE.kills
    assert report.kills_before_done() >= 50, "the input ran out before 50 kills: raise SQLITE.values"
    assert report.kills_during_startup > 0 and report.kills - report.kills_during_startup > 0
    assert report.recovered > 0  # killed runs left values queued, and later runs wrote them


def test_kill_9_during_a_postgresql_outage_loses_nothing(tmp_path: Path) -> None:
    from faultproxy import FaultProxy
    from pg_util import fresh_database

    with fresh_database("tw_kill") as db, FaultProxy((db.host, db.port)) as proxy:
        report = postgresql_loop(tmp_path, OUTAGE, db, proxy=proxy, outage=OUTAGE_KILLS)
    check(report)
    assert report.kills == OUTAGE.kills
    in_outage = report.runs_between_kills(OUTAGE_KILLS)
    assert sum(r.killed for r in in_outage) == len(OUTAGE_KILLS)
    assert any(r.outage for r in in_outage), "no run noticed the outage"
    assert sum(r.spooled for r in in_outage) > 0  # the values went to the spool (and the queue)
    assert not any(r.outage for r in report.runs[-3:])

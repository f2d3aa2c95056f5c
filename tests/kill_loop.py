"""The kill -9 loop (issue 13): `tagwriter run --input FILE` killed at random moments, restarted, until done.

    python tests/kill_loop.py --kills 1000 --seed 7 --target sqlite [--verbose]
    python tests/kill_loop.py --kills 100 --target postgresql --outage 60 --batch-size 50

A jsonl file of N known values (distinct (tag, ts), value = its line index)
is written through the same command again and again: each run is sent
SIGKILL at a seeded random moment (a quarter during start-up, the rest in
the first `--window` seconds after it), then started again; after `--kills` kills the
runs are left alone, and the loop ends when a run exits by itself at end of
input with nothing left queued. Then the table must hold exactly the N keys
with their values (none missing, none extra) and the queue no record. With
`--outage K` (PostgreSQL) the runs reach the database through the fault
proxy, which refuses connections for K kills. The report gives kills, runs,
values recovered at start, the duplicates the runs counted, and the time
taken. tests/test_kill_loop.py runs short loops in CI; this script runs the
long ones.

The runs are slowed (writer.batch_size 1) and the file source is held back
by a small queue cap (buffer.max_disk_bytes), so that the input lasts many
kills and every kill falls in the middle of the file; `--queue-cap 0` queues
the whole file in the first run instead (then the kills hit the recovery of
a large queue).

Duplicates are the runs' own counts: the summary of a run that ended by
itself, and for a killed run its metrics read a moment before the kill (a
run killed in start-up: its last status line), so the total is a lower
bound. Recovered values come from each run's start-up log line.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import SUMMARY_KEYS, free_port, metrics, run_env, start_run

from tagwriter.models import parse_ts, to_epoch_us

BASE_TS = 1_700_000_000
TAGS = 100
READY = "tagwriter.sources.files: reading "  # start-up is over: the queue is open, the writer and the source run
RECOVERED = re.compile(r"(\d+) values were queued and not written when the last run ended")
RESUMED = re.compile(r"resuming .* after line (\d+) \(byte")
OUTAGE_MODE = "outage mode, spooling"
STATUS_DUPLICATES = re.compile(r"\| written \d+ dup (\d+) ")
# The summary without its "(adds up)" check: a killed run has none, and a run may end with values still queued.
SUMMARY = re.compile(r"submitted (\d+) = written (\d+) \+ duplicates (\d+) \+ spooled (\d+) \+ "
                     r"quarantined (\d+) \+ dropped (\d+) \+ pending (\d+)  \((adds up|DOES NOT ADD UP)\)")
QUEUE_CAP = 256 * 1024  # bytes: a few thousand values queued at most
READY_TIMEOUT = 60.0  # seconds a run may take to start up
RUN_TIMEOUT = 3600.0  # seconds a run that is not killed may take to end by itself (the last writes the rest)


def key(i: int) -> tuple[str, int]:
    """The (tag, ts in epoch µs) of value `i`."""
    return f"k{i % TAGS:03d}", (BASE_TS + i // TAGS) * 1_000_000


def write_input(path: Path, n: int) -> Path:
    """N jsonl lines, line i holding value i under `key(i)`."""
    with path.open("w") as f:
        for i in range(n):
            tag, ts_us = key(i)
            f.write(json.dumps({"tag": tag, "ts": ts_us // 1_000_000, "value": i}) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class KillPlan:
    """When to kill a run: `delay` seconds after it started, or after its start-up (`after_ready`)."""

    delay: float
    after_ready: bool


@dataclass(frozen=True, slots=True)
class Schedule:
    """Seeded kill moments: a share during start-up (from the spawn), the rest while the run writes."""

    seed: int
    startup_share: float = 0.25
    startup: tuple[float, float] = (0.05, 0.6)  # seconds after the spawn
    running: tuple[float, float] = (0.0, 0.4)  # seconds after start-up

    def plans(self) -> Iterator[KillPlan]:
        rng = random.Random(self.seed)
        while True:
            if rng.random() < self.startup_share:
                yield KillPlan(rng.uniform(*self.startup), after_ready=False)
            else:
                yield KillPlan(rng.uniform(*self.running), after_ready=True)


@dataclass(slots=True)
class Run:
    """One start of the command: how it ended and what it said."""

    index: int
    killed: bool
    exit_code: int | None
    seconds: float
    started_up: bool
    recovered: int  # values the run found queued at start
    resumed_line: int | None  # the input line it resumed after (None: from the start)
    duplicates: int  # counted by the run (a killed run: its metrics just before the kill)
    spooled: int  # likewise
    outage: bool  # the run went into outage mode (the database unreachable)
    counts: dict[str, int] | None  # the summary of a run that ended by itself
    stderr_tail: str = ""


def describe(run: Run) -> str:
    """One line per run, for a log of the loop."""
    end = "killed" if run.killed else f"exit {run.exit_code}"
    phase = "running" if run.started_up else "start-up"
    resumed = "start" if run.resumed_line is None else f"line {run.resumed_line}"
    counts = "" if run.counts is None else " " + " ".join(f"{k} {v}" for k, v in run.counts.items())
    outage = ", in outage mode" if run.outage else ""
    return (f"run {run.index}: {end} in {phase} after {run.seconds:.2f}s{outage}; recovered {run.recovered}, "
            f"resumed after {resumed}, duplicates {run.duplicates}, spooled {run.spooled}{counts}")


@dataclass(slots=True)
class Report:
    values: int
    target: str
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0
    missing: int = -1
    extra: int = -1
    wrong_values: int = -1
    queue_records: int = -1
    spool_files: int = -1
    notes: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(r.killed for r in self.runs)

    @property
    def kills_during_startup(self) -> int:
        return sum(r.killed and not r.started_up for r in self.runs)

    def runs_between_kills(self, kills: range) -> list[Run]:
        """The runs started while the kills so far were in `kills`."""
        out, done = [], 0
        for run in self.runs:
            if done in kills:
                out.append(run)
            done += run.killed
        return out

    def kills_before_done(self) -> int:
        """Kills of runs before the first one that found nothing left to do (every line read, none queued)."""
        kills = 0
        for run in self.runs:
            if run.resumed_line == self.values and run.recovered == 0:
                break
            kills += run.killed
        return kills

    @property
    def ended_with_backlog(self) -> int:
        return sum(1 for r in self.runs if r.counts is not None and r.counts["pending"] > 0)

    @property
    def recovered(self) -> int:
        return sum(r.recovered for r in self.runs)

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self.runs)

    @property
    def lossless(self) -> bool:
        return (self.missing, self.extra, self.wrong_values, self.queue_records) == (0, 0, 0, 0)

    def text(self) -> str:
        ended = [r for r in self.runs if not r.killed]
        lines = [
            f"kill loop, {self.target}: {self.values} values, {len(self.runs)} runs, {self.kills} kills "
            f"({self.kills_during_startup} during start-up, {self.kills_before_done()} before the input was "
            f"done), {len(ended)} runs ended by themselves "
            f"({self.ended_with_backlog} of them at end of input with values still queued), {self.seconds:.1f}s",
            f"recovered at start: {self.recovered} values in total "
            f"(max {max((r.recovered for r in self.runs), default=0)} in one run)",
            f"duplicates counted by the runs: {self.duplicates} (at least: a killed run's metrics before the kill)",
            f"table: missing {self.missing}, extra {self.extra}, wrong values {self.wrong_values}; "
            f"queue records left {self.queue_records}; spool files left {self.spool_files}",
        ]
        lines += self.notes
        lines.append("RESULT: " + ("OK, nothing lost, nothing extra" if self.lossless else "FAILED"))
        return "\n".join(lines)


class _Output:
    """Reads a run's stderr as it comes (so a kill can wait for start-up to end); keeps every line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)
            if READY in line:
                self.ready.set()

    def wait_ready(self, proc: subprocess.Popen[str], timeout: float) -> bool:
        """Wait until start-up is over or the run has ended (True), at most `timeout` seconds (False)."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.01):
            if proc.poll() is not None:
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def join(self) -> str:
        self._thread.join(10.0)
        return "".join(self.lines)


def run_once(cwd: Path, args: list[str], env: dict[str, str], plan: KillPlan | None, index: int) -> Run:
    """Start the command (metrics on a free port); SIGKILL it as `plan` says (None: let it end by itself)."""
    started = time.monotonic()
    port = free_port()  # a new one each run: a port kept for long may be taken meanwhile
    proc = start_run(cwd, *args, "--metrics-port", str(port), env=env)
    output = _Output(proc)
    figures: dict[str, Any] | None = None
    try:
        if plan is not None:
            if plan.after_ready and not output.wait_ready(proc, READY_TIMEOUT):
                raise RuntimeError(f"run {index} did not start up in {READY_TIMEOUT:g}s")
            # The kill moment: chosen at random on purpose, not a wait for a condition.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(plan.delay)
        killed = plan is not None and proc.poll() is None
        if killed:
            figures = _figures(port) if output.ready.is_set() else None  # what it counted, a moment before
            proc.kill()
        proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = output.join()
    assert proc.stdout is not None
    out = proc.stdout.read()
    seconds = time.monotonic() - started
    return _run_of(index, killed, proc.returncode, seconds, out, err, output.ready.is_set(), figures)


def _figures(port: int) -> dict[str, Any] | None:
    """The run's metrics; None if it does not answer whole (it may be ending just now)."""
    try:
        return metrics(port)
    except (http.client.HTTPException, ValueError):
        return None


def _run_of(
    index: int, killed: bool, code: int, seconds: float, out: str, err: str, ready: bool,
    figures: dict[str, Any] | None,
) -> Run:
    recovered = RECOVERED.search(err)
    resumed = RESUMED.search(err)
    match = None if killed else SUMMARY.search(out)
    counts = dict(zip(SUMMARY_KEYS, map(int, match.groups()[:7]), strict=True)) if match else None
    statuses = STATUS_DUPLICATES.findall(err)
    if counts is not None:
        duplicates, spooled = counts["duplicates"], counts["spooled"]
    elif figures is not None:
        duplicates, spooled = int(figures["duplicates"]), int(figures["spooled"])
    else:
        duplicates, spooled = int(statuses[-1]) if statuses else 0, 0
    return Run(index, killed, None if killed else code, seconds, ready,
               int(recovered.group(1)) if recovered else 0, int(resumed.group(1)) if resumed else None,
               duplicates, spooled, OUTAGE_MODE in err, counts,
               stderr_tail="".join(err.splitlines(keepends=True)[-15:]))


def kill_loop(
    cwd: Path, args: list[str], env: dict[str, str], *, kills: int, schedule: Schedule,
    max_runs: int | None = None, min_kills: int = 0, between: Callable[[int], None] | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Run, kill (at most `kills` times), restart, until a run ends by itself with nothing left queued.

    A run that ends by itself at end of input while values stay queued is
    started again too (it is not the end: those values are not written yet),
    and so is every run until `min_kills` kills are done. `between(kills so
    far)` is called before each start (a test turns an outage on or off
    there), `on_run(run)` after each run. Raises RuntimeError for a run that
    ends by itself with an exit status other than 0, or after `max_runs` runs.
    """
    runs: list[Run] = []
    plans = schedule.plans()
    limit = max_runs if max_runs is not None else 2 * kills + 100
    while len(runs) < limit:
        done = sum(r.killed for r in runs)
        if between is not None:
            between(done)
        run = run_once(cwd, args, env, next(plans) if done < kills else None, len(runs))
        runs.append(run)
        if on_run is not None:
            on_run(run)
        if run.killed:
            continue
        if run.exit_code != 0:
            raise RuntimeError(f"run {run.index} ended with exit status {run.exit_code}:\n{run.stderr_tail}")
        if run.counts is not None and run.counts["pending"] == 0 and done >= min_kills:
            return runs
    raise RuntimeError(f"no run ended with nothing left queued in {limit} runs")


# -- checking the result ------------------------------------------------------------


def compare(got: dict[tuple[str, int], float], n: int) -> tuple[int, int, int]:
    """(missing, extra, wrong values) of the table's key -> value against the N values written."""
    expected = {key(i): float(i) for i in range(n)}
    missing = len(expected.keys() - got.keys())
    extra = len(got.keys() - expected.keys())
    wrong = sum(1 for k, v in got.items() if k in expected and expected[k] != v)
    return missing, extra, wrong


def sqlite_table(db: Path) -> dict[tuple[str, int], float]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {(tag, parse_ts(ts)): value for tag, ts, value in
                conn.execute("SELECT tag_name, ts, value FROM tag_values")}


def postgresql_table(db: Any) -> dict[tuple[str, int], float]:
    """The table of `db` (a tests/pg_util.py PgDatabase), key -> value."""
    with db.connect() as conn:
        return {(tag, to_epoch_us(ts)): value for tag, ts, value in
                conn.execute("SELECT tag_name, ts, value FROM tag_values")}


def queue_records(queue_dir: Path) -> int:
    """Records still in the durable queue (opened read-only); 0 when there is no queue file."""
    path = queue_dir / "queue.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])


def spool_files(backup_dir: Path) -> int:
    """Backup files not yet replayed (completed or partial)."""
    if not backup_dir.exists():
        return 0
    return sum(1 for p in backup_dir.iterdir() if p.name.endswith((".csv", ".csv.partial")))


def finish(report: Report, cwd: Path, table: dict[tuple[str, int], float]) -> Report:
    report.missing, report.extra, report.wrong_values = compare(table, report.values)
    report.queue_records = queue_records(cwd / "queue")
    report.spool_files = spool_files(cwd / "backup")
    return report


# -- the loops -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """What a loop runs: N values, at most `kills` kills, the seed, and how the runs are slowed."""

    values: int
    kills: int
    seed: int = 1
    batch_size: int = 1  # writer.batch_size: a small batch slows the run, so that the input lasts many kills
    queue_cap: int = QUEUE_CAP  # buffer.max_disk_bytes: the file source waits for the writer (0: no cap)
    window: float = 0.4  # seconds after start-up in which a run is killed (the rest: during start-up)

    def schedule(self) -> Schedule:
        return Schedule(self.seed, running=(0.0, self.window))

    def env(self, **extra: str) -> dict[str, str]:
        """The runs' environment; status lines every 0.1 s (a killed run's last counts)."""
        return run_env(TAGWRITER_WRITER__BATCH_SIZE=str(self.batch_size), TAGWRITER_METRICS__LOG_INTERVAL="0.1",
                       TAGWRITER_BUFFER__MAX_DISK_BYTES=str(self.queue_cap), **extra)


def command(url: str) -> list[str]:
    """The one command every run is: the same each time."""
    return ["--input", "in.jsonl", "--no-panel", "--database", url]


def sqlite_loop(cwd: Path, s: Settings, *, on_run: Callable[[Run], None] | None = None) -> Report:
    write_input(cwd / "in.jsonl", s.values)
    report = Report(s.values, "sqlite")
    started = time.monotonic()
    report.runs = kill_loop(cwd, command(f"sqlite:///{cwd / 'kill.db'}"), s.env(), kills=s.kills,
                            schedule=s.schedule(), on_run=on_run)
    report.seconds = time.monotonic() - started
    return finish(report, cwd, sqlite_table(cwd / "kill.db"))


def postgresql_loop(
    cwd: Path, s: Settings, db: Any, *, proxy: Any = None, outage: range = range(0),
    on_run: Callable[[Run], None] | None = None,
) -> Report:
    """The loop into PostgreSQL database `db` (a tests/pg_util.py PgDatabase), the table made by `init-db`.

    With `proxy` (a tests/faultproxy.py FaultProxy to the server) the runs
    reach the database through it, and while the kills so far are in `outage`
    it refuses connections: those runs spool. Spool files the runs leave are
    then replayed with `tagwriter replay` (see `replay_left`).
    """
    write_input(cwd / "in.jsonl", s.values)
    subprocess.run([sys.executable, "-m", "tagwriter", "init-db", "--database", db.url()],
                   cwd=cwd, env=run_env(), check=True, capture_output=True, timeout=60)
    url = db.url(port=proxy.port) if proxy is not None else db.url()

    def between(kills_so_far: int) -> None:
        if proxy is None:
            return
        if kills_so_far in outage:
            proxy.refuse()
        else:
            proxy.pass_through()

    # A refused connection fails at once: the run is in outage mode (spooling) within a second.
    env = s.env(TAGWRITER_WRITER__RETRY_DELAYS="0.1", TAGWRITER_DATABASE__CONNECT_TIMEOUT="2")
    report = Report(s.values, "postgresql" + (f", outage during kills {outage.start}-{outage.stop - 1}"
                                              if outage else ""))
    started = time.monotonic()
    report.runs = kill_loop(cwd, command(url), env, kills=s.kills, schedule=s.schedule(), between=between,
                            min_kills=s.kills if outage else 0, on_run=on_run)
    report.notes.extend(replay_left(cwd, env))
    report.seconds = time.monotonic() - started
    return finish(report, cwd, postgresql_table(db))


def replay_left(cwd: Path, env: dict[str, str]) -> list[str]:
    """Replay the spool files the runs left (`tagwriter replay backup`); a note of what was done.

    Auto replay drains the spool only while a run goes on, between live batches;
    a run of a file ends at end of input, before it gets there (see the report).
    """
    files = spool_files(cwd / "backup")
    if not files:
        return ["spool: empty at the end (auto replay drained it)"]
    done = subprocess.run([sys.executable, "-m", "tagwriter", "replay", "backup"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"tagwriter replay backup: exit status {done.returncode}\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1:] or [""]
    return [f"spool: {files} files left by the runs (auto replay did not finish them), "
            f"then `tagwriter replay backup`: {last[0]}"]


# -- the command line ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs to send at most (default 1000)")
    parser.add_argument("--values", type=int, default=0,
                        help="values in the input (default: 2,500 per kill, enough to last the kills)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--target", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--outage", type=int, default=0, metavar="K",
                        help="postgresql: the database is unreachable (fault proxy) for K kills from the 5th")
    parser.add_argument("--batch-size", type=int, default=1, help="writer.batch_size of the runs (default 1: slow)")
    parser.add_argument("--queue-cap", type=int, default=QUEUE_CAP,
                        help=f"buffer.max_disk_bytes of the runs (default {QUEUE_CAP}: the file is read as it "
                             "is written, every kill is mid-file; 0: no cap, the file is queued at once)")
    parser.add_argument("--window", type=float, default=0.4,
                        help="kill a run within this many seconds after its start-up (default 0.4)")
    parser.add_argument("--verbose", action="store_true", help="print a line per run")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temporary one, kept)")
    a = parser.parse_args(argv)
    s = Settings(a.values or 2500 * a.kills, a.kills, a.seed, a.batch_size, a.queue_cap, a.window)
    cwd = a.dir or Path(tempfile.mkdtemp(prefix="kill-loop-"))
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"kill loop in {cwd}: {s}", flush=True)
    on_run = (lambda run: print(describe(run), flush=True)) if a.verbose else None
    report = sqlite_loop(cwd, s, on_run=on_run) if a.target == "sqlite" else _postgresql_main(cwd, s, a.outage, on_run)
    print(report.text())
    return 0 if report.lossless else 1


def _postgresql_main(cwd: Path, s: Settings, outage: int, on_run: Callable[[Run], None] | None) -> Report:
    from faultproxy import FaultProxy
    from pg_util import fresh_database

    with fresh_database("tw_kill") as db:
        if not outage:
            return postgresql_loop(cwd, s, db, on_run=on_run)
        with FaultProxy((db.host, db.port)) as proxy:
            return postgresql_loop(cwd, s, db, proxy=proxy, outage=range(5, 5 + outage), on_run=on_run)


if __name__ == "__main__":
    sys.exit(main())

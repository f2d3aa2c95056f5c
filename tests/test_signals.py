"""Signals and the exit status of `tagwriter run`, as a user meets them: real processes, real SQLite files.

SIGHUP reloads (a closed terminal sends it too), SIGTERM stops gracefully
whenever it comes (during start-up, while stdin is idle, while a stdin feed
waits for room), and the exit status tells a clean run from one that
dropped values or read bad input. The subprocess tests set everything in a
tagwriter.toml in the run's folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from procs import free_port, metric, run_env, start_run, summary
from test_pipeline import make_config
from test_run_subprocess import locked_database, rows
from waits import wait_until

from tagwriter.cli.signals import SignalRequests, install_early, release_early
from tagwriter.config import Config, WriterConfig
from tagwriter.models import TagValue
from tagwriter.pipeline import Pipeline
from tagwriter.service import ExitStatus, Problem, Verdict

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and terminals")

F_SETPIPE_SZ = 1031  # Linux: make a pipe hold the whole input


def spooled_rows(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) - 1 for p in folder.glob("*.csv"))


def write_config(folder: Path, text: str) -> None:
    (folder / "tagwriter.toml").write_text(text)


def jsonl_lines(n: int) -> list[bytes]:
    return [json.dumps({"tag": f"t{i % 7}", "ts": 1_700_000_000 + i, "value": i}).encode() + b"\n"
            for i in range(n)]


class Settled:
    """A predicate: `read()` is above `above` and has not changed for `quiet` seconds (a fill that stopped)."""

    def __init__(self, read: Callable[[], int | None], *, above: int, quiet: float = 0.3) -> None:
        self.read, self.above, self.quiet = read, above, quiet
        self.last: tuple[int | None, float] = (None, time.monotonic())

    def __call__(self) -> bool:
        value, now = self.read(), time.monotonic()
        if value != self.last[0]:
            self.last = (value, now)
            return False
        return value is not None and value > self.above and now - self.last[1] >= self.quiet


@pytest.fixture
def proc_guard() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- SIGHUP: reload ----------------------------------------------------------------------


HELD = """
[source]
groups = 2
tags_per_group = 10
interval = 0.1
[writer]
batch_size = 10000
flush_interval = {flush}
[metrics]
port = {port}
[logging]
file = "tagwriter.log"
"""


def test_sighup_reloads_the_config_and_loses_nothing(tmp_path: Path, proc_guard: list) -> None:
    """Values held in the buffer at SIGHUP survive it; the new flush interval applies live; a bad config is refused."""
    port = free_port()
    write_config(tmp_path, HELD.format(flush=3600, port=port))
    proc = start_run(tmp_path, "--no-panel", env=run_env())
    proc_guard.append(proc)
    wait_until(lambda: (metric(port, "buffer_size") or 0) >= 100, "values held in the buffer", 30)
    assert rows(tmp_path / "tagwriter.db") == 0  # an hour's flush interval: nothing written yet

    # logrotate moves the file away, then the operator changes the config and reloads.
    (tmp_path / "tagwriter.log").rename(tmp_path / "tagwriter.log.1")
    moved_table = HELD.replace("[metrics]", '[database]\ntable = "other"\n[metrics]')
    write_config(tmp_path, moved_table.format(flush=0.1, port=port))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: rows(tmp_path / "tagwriter.db") > 0, "the new flush interval to write the held values", 30)
    log_text = (tmp_path / "tagwriter.log").read_text()  # reopened under its name
    assert "reload: applied writer.flush_interval 3600.0 -> 0.1" in log_text
    assert "reload: changed, but applied only after a restart: database.table" in log_text

    write_config(tmp_path, HELD.format(flush=0.1, port=port).replace("batch_size = 10000", "batch_size = 0"))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "running on with the old one" in (tmp_path / "tagwriter.log").read_text(),
               "the invalid config to be reported", 30)
    assert proc.poll() is None
    assert "writer.batch_size" in (tmp_path / "tagwriter.log").read_text()

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    counts = summary(out)
    assert counts["written"] == counts["submitted"] == rows(tmp_path / "tagwriter.db") > 0


def test_reloaded_batch_size_applies_from_the_next_batch(tmp_path: Path) -> None:
    """In process: the writer, waiting for a batch of 500 (flush interval one hour), writes 7 once told 7."""
    with Pipeline(make_config(tmp_path, writer={"batch_size": 500, "flush_interval": 3600.0})) as pipeline:
        pipeline.submit([TagValue(f"t{i}", 1_700_000_000_000_000 + i, 1.0, 192) for i in range(7)])
        assert pipeline.snapshot().written == 0
        pipeline.apply_writer_settings(WriterConfig(batch_size=7, flush_interval=3600.0))
        wait_until(lambda: pipeline.snapshot().written == 7, "a batch of the new size", 10)


def terminal_child_setup() -> None:
    """In the child: its stdin (the pty) becomes the controlling terminal of its new session."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_a_closed_terminal_loses_nothing(tmp_path: Path, proc_guard: list) -> None:
    """The panel's terminal closes mid-run: SIGHUP and EIO on every write; the run goes on, then stops cleanly."""
    port = free_port()
    write_config(tmp_path, HELD.format(flush=3600, port=port))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagwriter", "run"], cwd=tmp_path, env=run_env(TERM="xterm"),
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=terminal_child_setup,
        text=True,
    )
    proc_guard.append(proc)
    os.close(slave)
    shown = bytearray()
    reader = threading.Thread(target=_read_until_closed, args=(master, shown), daemon=True)
    reader.start()
    wait_until(lambda: (metric(port, "buffer_size") or 0) >= 100, "values held in the buffer", 30)
    wait_until(lambda: b"buffer" in shown, "the panel on the terminal", 30)
    held = metric(port, "buffer_size")

    os.close(master)  # the terminal window closes
    log_file = tmp_path / "tagwriter.log"
    wait_until(lambda: "the terminal is gone" in log_file.read_text(), "the lost terminal to be noticed", 30)
    wait_until(lambda: "SIGHUP received" in log_file.read_text(), "the hang-up to be taken as a reload", 30)
    assert proc.poll() is None, "a closed terminal must not end the run"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stopped = next(line for line in log_file.read_text().splitlines() if "stopped: submitted" in line)
    counts = summary(stopped + "  (adds up)")
    assert counts["submitted"] >= held
    assert counts["written"] + counts["spooled"] == counts["submitted"]
    assert rows(tmp_path / "tagwriter.db") == counts["written"]
    assert spooled_rows(tmp_path / "backup") == counts["spooled"]


def _read_until_closed(fd: int, into: bytearray) -> None:
    """Read what the child shows on its terminal (so it never blocks on a full pty) until the fd closes."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        into.extend(data)


# -- SIGTERM -----------------------------------------------------------------------------


def test_sigterm_during_start_up_is_a_graceful_stop(tmp_path: Path, proc_guard: list) -> None:
    """SIGTERM while the process reads its config (a FIFO holds it there): exit 0 with a summary, not a kill."""
    fifo = tmp_path / "held.toml"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagwriter", "--config", str(fifo), "run", "--no-panel"], cwd=tmp_path,
        env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    proc_guard.append(proc)
    writer = wait_until(lambda: _open_for_writing(fifo), "the process to open its config", 30)
    proc.send_signal(signal.SIGTERM)
    os.write(writer, b"[source]\ngroups = 1\n")
    os.close(writer)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "SIGTERM received" in out
    assert summary(out)["submitted"] == 0


def _open_for_writing(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_sigterm_with_stdin_open_and_idle_exits_cleanly(tmp_path: Path, proc_guard: list) -> None:
    """Lines typed on a terminal, which then stays open and idle for over a second; SIGTERM must not abort."""
    write_config(tmp_path, "[writer]\nflush_interval = 0.05\n")
    master, slave = pty.openpty()
    try:
        proc = start_run(tmp_path, "--source", "jsonl", "--input", "-", env=run_env(), stdin=slave)
        proc_guard.append(proc)
        for line in jsonl_lines(10):
            os.write(master, line)
        wait_until(lambda: rows(tmp_path / "tagwriter.db") == 10, "the lines in the table", 30)
        idle_since = time.monotonic()
        wait_until(lambda: time.monotonic() - idle_since > 1.2, "stdin idle for over a second", 5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert "Fatal Python error" not in err
    assert proc.returncode == 0, (proc.returncode, err)
    assert summary(out)["written"] == 10


def test_sigterm_while_a_stdin_feed_waits_for_room_keeps_every_line_read(tmp_path: Path, proc_guard: list) -> None:
    """A hung database fills the buffer; the feed waits for room holding a chunk; SIGTERM: every line read is kept."""
    lock = locked_database(tmp_path / "tagwriter.db")
    port = free_port()
    write_config(tmp_path, f"""
[buffer]
capacity = 1000
durability = "memory"  # memory: what stop cannot write is spooled (the disk queue keeps it queued instead)
[writer]
batch_size = 500
flush_interval = 0.05
shutdown_timeout = 1
[database]
call_timeout = 120
[metrics]
port = {port}
""")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 1024 * 1024)
    data = b"".join(jsonl_lines(5000))
    assert os.write(write_end, data) == len(data)  # all of it waits in the pipe
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tagwriter", "run", "--source", "jsonl", "--input", "-", "--no-panel"],
            cwd=tmp_path, env=run_env(), stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        proc_guard.append(proc)
        wait_until(Settled(lambda: metric(port, "buffer_size"), above=500), "a full buffer, the feed waiting", 30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        os.set_blocking(read_end, False)
        left = b""
        while True:
            try:
                chunk = os.read(read_end, 1024 * 1024)
            except BlockingIOError:
                break
            if not chunk:
                break
            left += chunk
    finally:
        os.close(read_end)
        os.close(write_end)
        lock.rollback()
        lock.close()
    lines_read = 5000 - left.count(b"\n")
    assert proc.returncode == 0, err
    counts = summary(out)
    assert counts["pending"] == 0 and counts["dropped"] == 0
    assert counts["submitted"] == lines_read, f"{lines_read - counts['submitted']} lines read off stdin were lost"
    assert counts["written"] + counts["spooled"] == lines_read
    assert spooled_rows(tmp_path / "backup") == counts["spooled"]
    assert rows(tmp_path / "tagwriter.db") == counts["written"]


# -- exit status -------------------------------------------------------------------------


def test_malformed_input_lines_give_exit_status_3(tmp_path: Path) -> None:
    lines = jsonl_lines(3) + [b"garbage\n"] * 10
    (tmp_path / "in.jsonl").write_bytes(b"".join(lines))
    proc = start_run(tmp_path, "-i", "in.jsonl", env=run_env())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert summary(out)["written"] == 3
    assert "10 input lines were malformed (exit status 3)" in err


def test_values_dropped_by_the_overflow_policy_give_exit_status_3(tmp_path: Path) -> None:
    write_config(tmp_path, """
[source]
groups = 1
tags_per_group = 1000
interval = 0.2
[buffer]
capacity = 200
overflow_policy = "drop-oldest"
durability = "memory"  # the in-memory ring overflows at capacity; the disk queue only at max_disk_bytes
[writer]
batch_size = 200
""")
    proc = start_run(tmp_path, "--duration", "0.5", env=run_env())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    counts = summary(out)
    assert counts["dropped"] > 0 and counts["pending"] == 0
    assert "values were dropped by the overflow policy" in err


def test_exit_status_is_data_in_one_place() -> None:
    snap = Pipeline(Config()).snapshot()
    clean = Verdict("end of input", 1.0, snap, True, ())
    assert clean.exit_code is ExitStatus.OK == 0
    short = Verdict("end of input", 1.0, snap, True, (), (Problem("3 input lines were malformed"),))
    assert short.exit_code is ExitStatus.SHORTFALL == 3
    failed = Verdict("end of input", 1.0, snap, True, (Problem("lost"),), (Problem("bad"),))
    assert failed.exit_code is ExitStatus.FAILED == 1
    assert sorted(ExitStatus) == [0, 1, 2, 3]


# -- the requests ------------------------------------------------------------------------


def test_sighup_asks_for_a_reload_not_a_stop() -> None:
    requests = SignalRequests()
    requests.handle(signal.SIGHUP, None)
    assert requests.reload.is_set() and not requests.stop.is_set()
    requests.handle(signal.SIGTERM, None)
    assert requests.stop.is_set() and requests.reason == "SIGTERM" and not requests.hurry.is_set()


def test_a_command_other_than_run_gets_an_early_signal_as_if_nothing_had_caught_it() -> None:
    old = signal.getsignal(signal.SIGINT)
    install_early()
    try:
        signal.raise_signal(signal.SIGINT)  # recorded, not raised
        with pytest.raises(KeyboardInterrupt):
            release_early()
    finally:
        signal.signal(signal.SIGINT, old)
    assert signal.getsignal(signal.SIGINT) is old

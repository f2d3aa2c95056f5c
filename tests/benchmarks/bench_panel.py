"""Benchmark: what the live panel costs in CPU, `tagwriter run` on a terminal against `--no-panel`.

Not collected by pytest. Run:  python tests/benchmarks/bench_panel.py [--rounds 5] [--seconds 20]

Each round runs `tagwriter run` twice in a pseudo-terminal (120 x 40, as a
user's window): once with the panel, once with `--no-panel`, in alternating
order, each from a fresh folder with the default simulated 1,000 values/s
into SQLite and the default disk queue. The CPU of the whole process (every
thread: `/proc/PID/task/*/schedstat`, nanoseconds) is read over `--seconds`
of steady running, after `--warmup` seconds for imports and start-up, and
reported as percent of one core. The figure is the ratio of the medians,
panel / no panel, in the same run (the issue's target: near 1.5x, from 2.3x).

`--tree DIR` runs the `tagwriter` package found in DIR instead (a copy of an
older tree, for before/after figures in one sitting).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of `pid` so far, in seconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def drain(fd: int, shown: list[int]) -> None:
    """Read the terminal so the child never blocks on a full pty; count what it drew."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        shown[0] += len(data)


def one_run(*, panel: bool, seconds: float, warmup: float, tree: str | None) -> tuple[float, int]:
    """Percent of a core over `seconds` of steady running, and the bytes drawn on the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGWRITER_")}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES"):
        env.pop(name, None)
    env["TERM"] = "xterm-256color"
    if tree:
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, "-m", "tagwriter", "run", "--duration", str(warmup + seconds + 2),
                "--database", f"sqlite:///{folder}/bench.db"] + ([] if panel else ["--no-panel"])
        proc = subprocess.Popen(args, cwd=folder, env=env, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
        os.close(slave)
        shown = [0]
        reader = threading.Thread(target=drain, args=(master, shown), daemon=True)
        reader.start()
        try:
            time.sleep(warmup)  # a benchmark's fixed schedule, not a synchronisation
            c0, t0, b0 = cpu_seconds(proc.pid), time.monotonic(), shown[0]
            time.sleep(seconds)
            c1, t1, b1 = cpu_seconds(proc.pid), time.monotonic(), shown[0]
            if proc.wait(timeout=60) != 0:
                raise SystemExit(f"tagwriter run exited {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
            os.close(master)
    return 100.0 * (c1 - c0) / (t1 - t0), b1 - b0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds of each run")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--tree", help="a folder holding the tagwriter package to run instead")
    a = parser.parse_args()
    figures: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for panel in ((True, False) if r % 2 == 0 else (False, True)):
            pct, drawn = one_run(panel=panel, seconds=a.seconds, warmup=a.warmup, tree=a.tree)
            figures[panel].append(pct)
            print(f"round {r + 1} {'panel   ' if panel else 'no panel'}  {pct:5.2f} % of a core"
                  f"  ({drawn / a.seconds:,.0f} bytes/s to the terminal)", flush=True)
    with_panel, without = statistics.median(figures[True]), statistics.median(figures[False])
    print(f"median: panel {with_panel:.2f} %, no panel {without:.2f} %, ratio {with_panel / without:.2f}x")


if __name__ == "__main__":
    main()

"""Helpers for tests that run tagwriter as a user does: a process, its summary, its endpoint."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

SUMMARY = re.compile(r"submitted (\d+) = written (\d+) \+ duplicates (\d+) \+ spooled (\d+) \+ "
                     r"quarantined (\d+) \+ dropped (\d+) \+ pending (\d+)  \(adds up\)")
SUMMARY_KEYS = ("submitted", "written", "duplicates", "spooled", "quarantined", "dropped", "pending")


def run_env(**extra: str) -> dict[str, str]:
    """This process's environment without TAGWRITER_* or forced terminal settings, plus `extra`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TAGWRITER_")}
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        base.pop(name, None)
    return {**base, **extra}


def summary(output: str) -> dict[str, int]:
    """The counters of the final summary line ("submitted N = written N + ... (adds up)")."""
    m = SUMMARY.search(output)
    assert m, output
    return dict(zip(SUMMARY_KEYS, map(int, m.groups()), strict=True))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[str, Any] | None:
    """A running process's JSON metrics, read at one instant; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/buffer/metrics", timeout=1) as r:
            return dict(json.load(r))
    except OSError:
        return None


def metric(port: int, name: str) -> Any:
    """One figure of a running process's JSON metrics; None while it does not answer."""
    figures = metrics(port)
    return None if figures is None else figures[name]


def start_run(cwd: Path, *args: str, env: dict[str, str], stdin: int | None = None) -> subprocess.Popen[str]:
    """`tagwriter run ARGS` as a user starts it, in `cwd`, output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "tagwriter", "run", *args], cwd=cwd, env=env, stdin=stdin,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


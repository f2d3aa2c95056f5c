"""Console output that outlives its terminal: a closed terminal or pipe silences output, never the run.

A `tagwriter run` whose terminal window closes, whose ssh session drops, or
whose stdout pipe's reader goes away gets EIO or EPIPE on every write. The
panel, the log lines on the console and the final summary all write through
`stdout_console()`, whose first failed write points the descriptor at
/dev/null, so no later write anywhere in the process raises.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)


class SurvivingFile(io.RawIOBase):
    """A descriptor to write to that outlives its terminal (or its pipe's reader).

    Once a write fails (EIO: the terminal closed; EPIPE: the reader went
    away), the descriptor and the standard streams on the same file are
    pointed at /dev/null, so later writes from any part of the process
    succeed and go nowhere; `lost` keeps the error. Never closes `fd`.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.lost: OSError | None = None

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.lost is None and os.isatty(self._fd)

    def write(self, data: ReadableBuffer) -> int:
        size = memoryview(data).nbytes
        try:
            return os.write(self._fd, data)
        except BlockingIOError:  # a full non-blocking descriptor: BufferedWriter waits and retries
            raise
        except OSError as exc:
            if self.lost is None:
                self.lost = exc
                _to_devnull(self._fd)
                # Logged from another thread: this write may be a log record's own output, under its locks.
                threading.Thread(target=log.warning, name="tagwriter-terminal-gone", daemon=True, args=(
                    "the terminal is gone (%s): nothing more is shown there; the run goes on (SIGTERM stops it)",
                    exc.strerror or exc)).start()
            return size


def _to_devnull(fd: int) -> None:
    """Point `fd`, and stdout/stderr when they are the same file, at /dev/null."""
    try:
        gone = os.fstat(fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for target in {fd, 1, 2}:
            try:
                if target == fd or os.path.samestat(os.fstat(target), gone):
                    os.dup2(devnull, target)
            except OSError:
                pass
    finally:
        os.close(devnull)


def stdout_console() -> Console:
    """The console on stdout, through a `SurvivingFile` when stdout has a descriptor (not under a test harness)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return Console(highlight=False)
    sys.stdout.flush()
    stream = io.TextIOWrapper(io.BufferedWriter(SurvivingFile(fd)), encoding=sys.stdout.encoding,
                              errors="replace", write_through=True)
    return Console(file=stream, highlight=False)

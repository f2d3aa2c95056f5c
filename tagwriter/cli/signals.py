"""What signals ask a run for, recorded as Events from the first moment of the process.

    SIGINT, SIGTERM   stop gracefully; a second one: hurry (spool what is pending now)
    SIGHUP            reload the config (a closed terminal, `systemctl reload`)

The entry point (`tagwriter.cli.main`) installs the handlers before the app
is imported or anything is read, so a signal during start-up is kept, not
fatal; `tagwriter run` honours it, and every other command gets the default
behaviour back (`release_early`). Standard library only: this module is
imported before anything heavy.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: SIGHUP is POSIX only; on Windows there is no reload signal.
RELOAD_SIGNALS = tuple(s for s in (getattr(signal, "SIGHUP", None),) if s is not None)
HANDLED = (*STOP_SIGNALS, *RELOAD_SIGNALS)


class SignalRequests:
    """Events the handlers set: `stop` first, `hurry` on a repeat, `reload` on SIGHUP. Thread-safe."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self.reload = threading.Event()
        self.reason = ""  # the name of the signal that asked to stop
        self.first_signal: int | None = None  # for `release_early`: re-delivered under the old handlers
        self._old: dict[int, Any] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.first_signal is None:
            self.first_signal = signum
        if signum in RELOAD_SIGNALS:
            self.reload.set()
            return
        if self.stop.is_set():
            self.hurry.set()
            return
        self.reason = signal.Signals(signum).name
        self.stop.set()

    def install(self) -> bool:
        """Handle SIGINT, SIGTERM and SIGHUP from now on; False (nothing done) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        old = {s: signal.signal(s, self.handle) for s in HANDLED}
        if self._old is None:
            self._old = old
        return True

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        old, self._old = self._old, None
        for s, handler in (old or {}).items():
            signal.signal(s, handler)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals while inside (kept if already installed); the old handlers come back after."""
        if not self.install():
            yield
            return
        try:
            yield
        finally:
            self.uninstall()


_early: SignalRequests | None = None


def install_early() -> None:
    """Record signals from now on, for the command that runs next (the entry point calls this first)."""
    global _early
    requests = SignalRequests()
    if requests.install():
        _early = requests


def take_early() -> SignalRequests | None:
    """The requests `install_early` has been recording (once; None if it was not called)."""
    global _early
    requests, _early = _early, None
    return requests


def release_early() -> None:
    """For a command that does not handle signals: the default handlers back, and a signal that came meanwhile.

    A SIGINT then raises KeyboardInterrupt, a SIGTERM or SIGHUP ends the
    process, just as if the handlers had never been there.
    """
    requests = take_early()
    if requests is None:
        return
    requests.uninstall()
    if requests.first_signal is not None:
        signal.raise_signal(requests.first_signal)

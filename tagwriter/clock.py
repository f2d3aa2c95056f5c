"""Time, injectable: the writer, the probe and the metrics ask a `Clock`.

Tests pass a fake whose `wait()` advances time instead of sleeping, so retry
schedules and deadlines are asserted exactly without real sleeps.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `event`; True if it is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


SYSTEM_CLOCK = SystemClock()

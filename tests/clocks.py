"""A manual clock for tests: time moves only when the test calls `advance()`.

`ManualClock` implements `tagwriter.clock.Clock`. Its `wait(event, timeout)`
blocks the calling thread (a writer's retry, an outage probe) until the test
advances the clock past the deadline or the event is set, so retry schedules
and deadlines are asserted exactly and nothing sleeps for real. Every wait is
recorded (thread name, timeout), and `waiting()` shows who is parked now.

A real-time guard (`max_real_wait`, default 30 s) makes a forgotten `advance()`
fail loudly instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class Waiter:
    thread: str
    timeout: float
    deadline: float
    event: threading.Event


class ManualClock:
    """Clock whose `monotonic()` and `time()` move only on `advance()`. Thread-safe."""

    POLL = 0.005  # real seconds between checks of the event a waiter waits on

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0, max_real_wait: float = 30.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._cond = threading.Condition()
        self._waiters: list[Waiter] = []
        self.waits: list[Waiter] = []  # every wait ever started, in order
        self.max_real_wait = max_real_wait

    # -- Clock ---------------------------------------------------------------

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def time(self) -> float:
        with self._cond:
            return self._now + self._wall_offset

    def wait(self, event: threading.Event, timeout: float) -> bool:
        real_deadline = time.monotonic() + self.max_real_wait
        with self._cond:
            me = Waiter(threading.current_thread().name, timeout, self._now + max(0.0, timeout), event)
            self.waits.append(me)
            self._waiters.append(me)
            self._cond.notify_all()
            try:
                while True:
                    if event.is_set():
                        return True
                    if self._now >= me.deadline:
                        return False
                    if time.monotonic() > real_deadline:
                        raise RuntimeError(
                            f"ManualClock: {me.thread} waited {self.max_real_wait}s real time; "
                            "the test never advanced the clock"
                        )
                    self._cond.wait(self.POLL)
            finally:
                self._waiters.remove(me)
                self._cond.notify_all()

    # -- driving it ------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every waiter whose deadline passed."""
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def waiting(self, thread: str | None = None) -> list[Waiter]:
        """Waits still blocked now (of threads whose name starts with `thread`)."""
        with self._cond:
            return self._blocked(thread)

    def _blocked(self, thread: str | None) -> list[Waiter]:
        # A waiter whose deadline passed or whose event is set is about to return.
        return [
            w for w in self._waiters
            if (thread is None or w.thread.startswith(thread))
            and w.deadline > self._now and not w.event.is_set()
        ]

    def wait_for_waiter(self, thread: str | None = None, timeout: float = 10.0) -> Waiter:
        """Block (real time, bounded) until some thread is parked in `wait()`; return it."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._blocked(thread)
                if found:
                    return found[0]
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no thread {thread or ''} started waiting on the clock in {timeout}s")
                self._cond.wait(min(remaining, self.POLL))

    def advance_waiter(self, thread: str | None = None, timeout: float = 10.0) -> float:
        """Wait for a parked waiter, advance exactly to its deadline; returns its timeout."""
        waiter = self.wait_for_waiter(thread, timeout)
        with self._cond:
            self._now = max(self._now, waiter.deadline)
            self._cond.notify_all()
        return waiter.timeout



class StepClock:
    """A clock that stands where the test puts it (`now`) and moves only by the timeouts it is asked to wait."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self._wall + self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.now += max(0.0, timeout)
        return event.is_set()

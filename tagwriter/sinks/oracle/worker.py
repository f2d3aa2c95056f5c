"""`CallWorker`: one long-lived thread for the calls the driver cannot bound, each with a deadline.

python-oracledb's thin `connect()` blocks in a socket read with no timeout
against a listener that accepts and never answers (DESIGN.md), and nothing
can interrupt it from outside. Such a call runs on the worker while its
caller waits at most its timeout. The thread is made once and reused for
every call (no thread start per call, unlike `tagwriter.bounded.run_bounded`).
A call that overruns is left to finish on its own: its thread is abandoned
(it ends once that call returns, if ever; a daemon, so it never holds up the
exit) and the next call makes a fresh one. A call that arrives while the
worker runs another caller's call gets a one-off thread instead of waiting
its turn, so no caller's bound depends on another's call.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tagwriter.errors import TransientError

T = TypeVar("T")


class _Job(Generic[T]):
    """One call handed to a thread; `abandoned` once its caller stopped waiting."""

    __slots__ = ("abandoned", "done", "error", "fn", "lock", "on_late", "result")

    def __init__(self, fn: Callable[[], T], on_late: Callable[[T], None] | None) -> None:
        self.fn = fn
        self.on_late = on_late
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as exc:  # handed to the caller
            with self.lock:
                self.error = exc
                self.done.set()
            return
        with self.lock:
            self.result = result
            late = self.abandoned
            self.done.set()
        if late and self.on_late is not None:
            with contextlib.suppress(Exception):
                self.on_late(result)

    def abandon(self) -> bool:
        """Give up on the job; False if it finished meanwhile (then its outcome stands)."""
        with self.lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            return True


class _Thread:
    """A daemon thread and its inbox: runs jobs until None, or until a job it was abandoned in returns."""

    def __init__(self, name: str) -> None:
        self.inbox: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.inbox.get()
            if job is None:
                return
            job.run()
            if job.abandoned:  # its caller replaced this thread while the job ran
                return


class CallWorker:
    """Runs calls on one long-lived daemon thread, each bounded by its caller's timeout. Thread-safe.

    `started` counts worker threads made (1 while no call ever overran),
    `replaced` the ones abandoned to an overrunning call, `spares` the
    one-off threads made for calls that found the worker busy.
    """

    def __init__(self, name: str = "tagwriter-oracle-worker", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()  # guards _thread and _busy
        self._thread: _Thread | None = None
        self._busy = False
        self.started = 0
        self.replaced = 0
        self.spares = 0

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread now (None before the first call, after an overrun and after close)."""
        current = self._thread
        return current.thread if current is not None else None

    def run(self, fn: Callable[[], T], timeout: float, what: str, *,
            on_late: Callable[[T], None] | None = None, hint: str = "") -> T:
        """`fn()` on the worker: its result, its exception, or TransientError(TIMEOUT) after `timeout` s.

        The same signature as `run_bounded`. A result that arrives after the
        deadline is handed to `on_late` (to give back a connection nobody
        waits for); an error from `on_late` is ignored.
        """
        deadline = self._clock() + timeout
        job = _Job(fn, on_late)
        with self._lock:
            spare = self._busy
            if spare:
                worker = _Thread(f"{self.name}-spare")
                self.spares += 1
            else:
                if self._thread is None:
                    self._thread = _Thread(self.name)
                    self.started += 1
                worker = self._thread
                self._busy = True
            worker.inbox.put(job)
            if spare:
                worker.inbox.put(None)  # a spare ends after its one job
        try:
            if not job.done.wait(max(0.0, deadline - self._clock())) and job.abandon():
                if not spare:
                    with self._lock:
                        if self._thread is worker:
                            self._thread = None  # left to its call; the next call makes a fresh thread
                            self.replaced += 1
                raise TransientError(f"{what}: no answer within {timeout:g} s", code="TIMEOUT", hint=hint)
        finally:
            if not spare:
                with self._lock:
                    self._busy = False
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def close(self) -> None:
        """Let the worker thread end after what it runs now. Never waits; a later call makes a fresh one."""
        with self._lock:
            current, self._thread = self._thread, None
            if current is not None:
                current.inbox.put(None)

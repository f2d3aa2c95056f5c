"""`ConnectionPool`: a small bounded pool of driver connections of our own (see the package docstring).

No call waits without a bound: a connect that a caller waits for runs on the
`run` it was given (the sink's long-lived `CallWorker`; a thread per call by
default) for at most `connect_timeout`, a free connection is awaited at most
`wait_timeout`, every round trip on a connection is bounded by the
`call_timeout` set on it, and connections are closed in the background.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from tagwriter.bounded import close_bounded, run_bounded
from tagwriter.errors import TransientError
from tagwriter.sinks.oracle.errors import TIMEOUT_HINT, hint_for

T = TypeVar("T")

PING_INTERVAL = 60.0  # seconds idle before a pooled connection is pinged on reuse (driver default)
CLOSE_TIMEOUT = 2.0  # seconds close() waits for connections to log off


def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def close_in_background(conns: Sequence[Any], timeout: float = 0.0) -> bool:
    """Close connections in a daemon thread; wait up to `timeout`. True if all closed."""
    if not conns:
        return True

    def close_all() -> None:
        for conn in conns:
            close_quietly(conn)  # one failure must not keep the others open

    return close_bounded(close_all, timeout, "oracle-close")


class BoundedRun(Protocol):
    """How a call the driver cannot bound is run: `run_bounded`, or `CallWorker.run`."""

    def __call__(self, fn: Callable[[], T], timeout: float, what: str, *,
                 on_late: Callable[[T], None] | None = None, hint: str = "") -> T: ...


class _Attempt:
    """One connect in flight. `waiting` is False once nobody waits for it."""

    __slots__ = ("conn", "done", "error", "waiting")

    def __init__(self, waiting: bool) -> None:
        self.done = threading.Event()
        self.conn: Any = None
        self.error: BaseException | None = None
        self.waiting = waiting


class ConnectionPool:
    """A bounded pool of driver connections. Thread-safe; no call waits without a bound.

    `acquire` returns an idle connection (pinged first if it idled longer than
    `ping_interval`), or opens one (on `run`, at most `connect_timeout`), or
    waits for a release (at most `wait_timeout`); otherwise TransientError
    DPY-4005. Taking an idle connection starts no thread. Connections in use
    plus connects in flight never exceed `max_size`; a connect that answers
    after its caller gave up joins the pool.
    """

    def __init__(
        self, connect: Callable[[], Any], *, max_size: int = 5, wait_timeout: float = 5.0,
        connect_timeout: float = 5.0, call_timeout: float = 10.0, ping_interval: float = PING_INTERVAL,
        target: str = "the database", clock: Callable[[], float] = time.monotonic,
        run: BoundedRun = run_bounded,
    ) -> None:
        self._connect = connect
        self._run = run
        self.max_size = max_size
        self.wait_timeout = wait_timeout
        self.connect_timeout = connect_timeout
        self.call_timeout_ms = max(1, round(call_timeout * 1000))
        self.ping_interval = ping_interval
        self.target = target
        self._clock = clock
        self._cond = threading.Condition()
        self._idle: list[tuple[Any, float]] = []
        self._busy = 0
        self._pending = 0
        self._waiting = 0  # callers in _take's wait for a release (guarded by _cond)
        self._closed = False

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def opened(self) -> int:
        """Connections open now (idle + in use); approximate."""
        return self._busy + len(self._idle)

    @property
    def pending(self) -> int:
        """Connects in flight (some may be parked on a silent listener)."""
        return self._pending

    def acquire(self) -> Any:
        """A connection with `call_timeout` set; raises the driver's error or TransientError."""
        deadline = self._clock() + self.wait_timeout
        while True:
            conn, last_used, attempt = self._take(deadline)
            if attempt is not None:
                conn = self._open(attempt)
            elif self._clock() - last_used > self.ping_interval and not self._ping(conn):
                continue
            try:
                conn.call_timeout = self.call_timeout_ms
            except Exception:  # a dead connection refuses attribute writes
                self.release(conn, discard=True)
                continue
            return conn

    def _take(self, deadline: float) -> tuple[Any, float, _Attempt | None]:
        with self._cond:
            while True:
                if self._closed:
                    raise TransientError("the connection pool is closed", code="DPY-1002")
                if self._idle:
                    conn, last_used = self._idle.pop()
                    self._busy += 1
                    return conn, last_used, None
                if self._busy + self._pending < self.max_size:
                    self._pending += 1
                    return None, 0.0, _Attempt(waiting=True)
                remaining = deadline - self._clock()
                if remaining <= 0.0:
                    raise self._exhausted()
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _exhausted(self) -> TransientError:
        if self._pending and not self._busy:
            why = (f"{self._pending} connect(s) to {self.target} not answered "
                   "(a listener that accepts but never answers?)")
        else:
            why = f"all {self.max_size} connections busy ({self._pending} connecting)"
        return TransientError(
            f"no pooled connection within {self.wait_timeout:g} s: {why}", code="DPY-4005",
            hint=hint_for("DPY-4005", why),
        )

    def _start(self) -> None:
        """Start one connect nobody waits for in a daemon thread (call with the lock held)."""
        attempt = _Attempt(waiting=False)
        self._pending += 1
        threading.Thread(target=self._run_connect, args=(attempt,),
                         name="tagwriter-oracle-connect", daemon=True).start()

    def _run_connect(self, attempt: _Attempt) -> None:
        """One connect; the outcome goes to the attempt (or the pool, if nobody waits). Never raises."""
        conn: Any = None
        error: BaseException | None = None
        try:
            conn = self._connect()
        except BaseException as exc:  # handed to the waiting caller
            error = exc
        orphan = None
        with self._cond:
            self._pending -= 1
            if error is not None:
                attempt.error = error
            elif self._closed:
                orphan = conn
            elif attempt.waiting:
                attempt.conn = conn
                self._busy += 1
            else:
                # a connect that answered after its caller gave up joins the pool
                self._idle.append((conn, self._clock()))
            attempt.done.set()
            self._cond.notify_all()
        if orphan is not None:
            close_in_background([orphan])

    def _open(self, attempt: _Attempt) -> Any:
        """Run the caller's connect on `run` within connect_timeout; the connection or the error."""
        # _run_connect never raises: a TransientError here is run's TIMEOUT, settled below under the lock
        with contextlib.suppress(TransientError):
            self._run(lambda: self._run_connect(attempt), self.connect_timeout, f"connect to {self.target}")
        if not attempt.done.is_set():
            with self._cond:
                if not attempt.done.is_set():
                    attempt.waiting = False
                    raise TransientError(
                        f"connect to {self.target}: no answer within connect_timeout "
                        f"({self.connect_timeout:g} s) after the TCP connection was accepted",
                        code="DPY-4005", hint=TIMEOUT_HINT,
                    )
        if attempt.error is not None:
            raise attempt.error
        return attempt.conn

    def _ping(self, conn: Any) -> bool:
        """Ping a connection that idled (bounded by call_timeout); drop it if dead."""
        try:
            conn.call_timeout = self.call_timeout_ms
            conn.ping()
            return True
        except Exception:
            self.release(conn, discard=True)
            return False

    def connect_once(self) -> Any:
        """A new connection outside the pool (bounded by connect_timeout); the caller closes it."""
        return self._run(self._connect, self.connect_timeout, f"connect to {self.target}",
                         on_late=close_quietly, hint=TIMEOUT_HINT)

    def fill(self, n: int) -> None:
        """Open connections in the background until `n` are open (pool_min); never waits."""
        with self._cond:
            while not self._closed and self.opened + self._pending < min(n, self.max_size):
                self._start()

    def release(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or a dead connection) closes it instead."""
        if not discard:
            # no is_healthy (a bare DB-API connection), or it failed: kept, and the next use tells
            with contextlib.suppress(Exception):
                discard = not conn.is_healthy()
        with self._cond:
            self._busy = max(0, self._busy - 1)
            keep = not discard and not self._closed
            if keep:
                self._idle.append((conn, self._clock()))
            if self._waiting:  # the writer's release after each batch mostly finds nobody waiting
                self._cond.notify_all()
        if not keep:
            close_in_background([conn])

    def discard_idle(self) -> None:
        """Close every idle connection (after a connection-class error they share its fate)."""
        with self._cond:
            idle, self._idle = self._idle, []
        close_in_background([c for c, _ in idle])

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Close idle connections within `timeout`; busy ones close on release. Never raises."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        return close_in_background([c for c, _ in idle], timeout)

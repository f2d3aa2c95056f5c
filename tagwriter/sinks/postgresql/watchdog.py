"""`Watchdog`: ends a PostgreSQL call that overran its deadline by shutting its socket down.

This is not `tagwriter.bounded`: there the caller stops waiting and the call
runs on in a thread of its own. Here the call runs on the caller's thread and
must really end, so the connection is usable or known broken afterwards
(the writer's one connection cannot be left to a stray thread). A server that
accepted the connection and stopped answering never enforces its own
statement_timeout, and psycopg cannot be interrupted from outside except by
making its socket fail; one shared daemon thread does that at the deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from tagwriter.errors import TransientError
from tagwriter.sinks.postgresql.errors import error_text


class Watchdog:
    """Shuts down a connection's socket when a guarded call overruns its deadline.

    `statement_timeout` is enforced by the server, so it cannot end a call to a
    server that stopped answering; shutting the socket down makes psycopg's
    wait return with an error at once. One daemon thread, started on first
    use. Thread-safe: guards from several threads may be armed at once.
    """

    def __init__(self, name: str = "tagwriter-pg-watchdog") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, fd)
        self._fired: set[int] = set()
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_at = math.inf  # when the thread wakes up by itself next

    @contextlib.contextmanager
    def guard(self, conn: psycopg.Connection[Any], seconds: float, what: str) -> Iterator[None]:
        """Bound the block to `seconds`; raises TransientError(code="TIMEOUT") if it overran."""
        try:
            fd = conn.pgconn.socket
        except psycopg.Error as exc:
            raise TransientError(f"{what}: connection lost: {error_text(exc)}") from None
        token = next(self._tokens)
        now = time.monotonic()
        with self._cond:
            self._armed[token] = (now + seconds, fd)
            self._closed = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif now + seconds < self._wake_at:
                # Woken only if it would sleep past this deadline: calls in a row (the
                # writer's) arm later deadlines than the one it waits for, and cost no wake-up.
                self._cond.notify()
        try:
            yield
        except (psycopg.Error, OSError) as exc:
            if self._take_fired(token):
                raise TransientError(
                    f"{what}: no answer within {seconds:g} s (database.call_timeout); "
                    "connection closed", code="TIMEOUT",
                ) from exc
            raise
        finally:
            with self._cond:
                self._armed.pop(token, None)
                self._fired.discard(token)

    def _take_fired(self, token: int) -> bool:
        with self._cond:
            return token in self._fired

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for token, (deadline, fd) in list(self._armed.items()):
                    if deadline <= now:
                        # Under the lock: the guarded block cannot finish (and
                        # its connection be closed, freeing the fd) meanwhile.
                        del self._armed[token]
                        self._fired.add(token)
                        _shutdown_fd(fd)
                # An exited guard stays in _wake_at: waking for it costs one loop.
                self._wake_at = min((d for d, _ in self._armed.values()), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else max(0.0, self._wake_at - now))
            self._thread = None  # under the lock: the next guard starts a new thread
            self._wake_at = math.inf

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _shutdown_fd(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()

"""Bounded calls: run a call that may block (a driver connect, a DDL, a close) with a deadline.

Some drivers cannot be interrupted from outside (python-oracledb's thin mode
blocks in a socket read with no timeout during connect; a DDL may wait on a
lock). The caller must not wait longer than it was promised, so the call runs
on a daemon thread and the caller gives up at the deadline; the thread is
left to finish on its own, and what it returns late is handed to `on_late`.
`close_bounded` is the same for a close, which has nothing to return and
whose failure nobody can act on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tagwriter.errors import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_bounded(fn: Callable[[], T], timeout: float, what: str,
                *, on_late: Callable[[T], None] | None = None, hint: str = "") -> T:
    """Run `fn` in a daemon thread; its result, its exception, or TransientError(TIMEOUT).

    A call that finishes after the deadline is left alone, except that its
    result is handed to `on_late` (to close a connection nobody waits for).
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()
    abandoned = False

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        with lock:
            late = abandoned
            done.set()
        if late and on_late is not None and "result" in box:
            with contextlib.suppress(Exception):
                on_late(box["result"])

    thread = threading.Thread(target=target, name=f"tagwriter-{what.split(' ')[0]}", daemon=True)
    thread.start()
    if not done.wait(max(0.0, timeout)):
        with lock:
            if not done.is_set():
                abandoned = True
                raise TransientError(f"{what}: no answer within {timeout:g} s", code="TIMEOUT", hint=hint)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def close_bounded(close: Callable[[], object], timeout: float = 2.0, what: str = "close") -> bool:
    """Call `close` in a daemon thread and wait up to `timeout`; True if it finished in time.

    An error from `close` is logged, not raised: the resource is given up either way.
    """
    def target() -> None:
        try:
            close()
        except Exception as exc:  # nobody can act on a failed close
            log.debug("%s failed: %r", what, exc)

    thread = threading.Thread(target=target, name=f"tagwriter-{what.split(' ')[0]}", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    return not thread.is_alive()

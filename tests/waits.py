"""The tests' one way to wait for something another thread or process does: a bounded poll.

    wait_until(lambda: p.writer.in_outage, "outage mode", 10)

A test never sleeps and then asserts; it waits for the condition it needs,
and a condition that never comes fails the test with what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_INTERVAL = 0.001
MAX_INTERVAL = 0.05


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    """Poll `predicate` (real time) until it returns a true value, and return that value.

    Raises AssertionError naming `what` after `timeout` seconds. The poll starts
    at 1 ms and doubles to 50 ms: a quick condition is seen at once, a slow one
    (an HTTP metric of a subprocess, a drain) is not asked hundreds of times a second.
    """
    deadline = time.monotonic() + timeout
    interval = FIRST_INTERVAL
    while not (result := predicate()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, MAX_INTERVAL)
    return result

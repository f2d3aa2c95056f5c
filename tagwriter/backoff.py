"""Backoff: one retry schedule and one interruptible retry helper, both on the injected clock.

`Backoff` is the schedule every retrying part uses (the writer's retries, the
outage probe, the spool drain, the replayer): the configured delays, then
doubling from the last of them up to a cap, each optionally shortened by
jitter so a fleet of gateways does not probe a recovering database in
lock-step. `retry` calls a function again after each delay of a schedule,
waiting with `clock.wait(stop, delay)` so that a stop interrupts the wait.
"""

from __future__ import annotations

import random as _random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from tagwriter.clock import Clock
from tagwriter.errors import TransientError

T = TypeVar("T")

MIN_DOUBLING = 0.01  # seconds doubling starts from when the last configured delay is 0 (no hot loop)


class Backoff:
    """The delays of one retry schedule; each `iter()` starts the schedule afresh.

    Yields `delays`, then (with a `cap`) doubling from the last of them, at
    most `cap`, forever; without a `cap` the schedule ends with `delays`.
    With `jitter` j each delay d is drawn from (d * (1 - j), d] using
    `random()` (in [0, 1)): never above its nominal value, so never above the
    cap; a `random` returning 0.0 gives the nominal schedule exactly.
    """

    __slots__ = ("cap", "delays", "jitter", "random")

    def __init__(
        self,
        delays: Sequence[float],
        *,
        cap: float | None = None,
        jitter: float = 0.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")
        if cap is not None and not delays:
            raise ValueError("a doubling schedule needs a first delay")
        self.delays = tuple(float(d) for d in delays)
        self.cap = cap
        self.jitter = jitter
        self.random = random

    def __iter__(self) -> Iterator[float]:
        return (self._jittered(d) for d in self.nominal())

    def nominal(self) -> Iterator[float]:
        """The delays without jitter."""
        yield from self.delays
        if self.cap is None:
            return
        delay = max(self.delays[-1], MIN_DOUBLING)
        while True:
            delay = min(delay * 2.0, self.cap)
            yield delay

    def _jittered(self, delay: float) -> float:
        if not self.jitter:
            return delay
        return delay * (1.0 - self.jitter * self.random())


def retry(
    call: Callable[[], T],
    delays: Iterable[float],
    *,
    clock: Clock,
    stop: threading.Event,
    deadline: float | None = None,
    retry_on: tuple[type[Exception], ...] = (TransientError,),
    on_failure: Callable[[Exception, int, float | None], None] | None = None,
) -> T:
    """`call()`, called again after each of `delays` while it raises one of `retry_on`.

    Gives up by re-raising the last error when the delays run out, `stop` is
    set (before or during a wait), or the next wait would end past `deadline`
    (a `clock.monotonic()` time). Other errors pass through at once.
    `on_failure(error, n, delay)` runs after the n-th failure (from 1) with
    the wait before the next attempt, or None when giving up.
    """
    schedule = iter(delays)
    failures = 0
    while True:
        try:
            return call()
        except retry_on as exc:
            failures += 1
            delay = next(schedule, None)
            if delay is not None and (
                stop.is_set() or (deadline is not None and clock.monotonic() + delay > deadline)
            ):
                delay = None
            if on_failure is not None:
                on_failure(exc, failures, delay)
            if delay is None or clock.wait(stop, delay):
                raise

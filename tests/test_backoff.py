"""The retry schedule (`Backoff`) and the interruptible retry helper (`retry`).

Schedules are plain iterators, checked exactly; jitter draws from an injected
random source, so its bounds are checked exactly too. `retry` runs on a
thread against the `ManualClock`: every wait is the clock's, so the waits are
asserted as numbers and nothing sleeps.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable

import pytest
from clocks import ManualClock

from tagwriter.backoff import MIN_DOUBLING, Backoff, retry
from tagwriter.errors import FatalError, TransientError


def first(schedule: Backoff, n: int) -> list[float]:
    return list(itertools.islice(schedule, n))


# -- the schedule --------------------------------------------------------------------


def test_without_a_cap_the_schedule_is_the_configured_delays_exactly() -> None:
    assert list(Backoff([1.0, 2.0, 4.0])) == [1.0, 2.0, 4.0]
    assert list(Backoff([])) == []


def test_with_a_cap_the_delays_then_double_from_the_last_up_to_the_cap() -> None:
    assert first(Backoff([1.0], cap=4.0), 6) == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert first(Backoff([0.5, 3.0], cap=30.0), 7) == [0.5, 3.0, 6.0, 12.0, 24.0, 30.0, 30.0]
    assert first(Backoff([60.0], cap=30.0), 3) == [60.0, 30.0, 30.0]  # a configured delay stays as configured


def test_a_zero_delay_doubles_from_a_floor_never_a_hot_loop() -> None:
    assert first(Backoff([0.0], cap=1.0), 3) == [0.0, 2 * MIN_DOUBLING, 4 * MIN_DOUBLING]


def test_each_iteration_starts_the_schedule_afresh() -> None:
    schedule = Backoff([1.0], cap=8.0)
    assert first(schedule, 4) == [1.0, 2.0, 4.0, 8.0]
    assert first(schedule, 2) == [1.0, 2.0]


def test_a_doubling_schedule_needs_a_first_delay_and_jitter_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="first delay"):
        Backoff([], cap=1.0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff([1.0], jitter=1.5)


# -- jitter ----------------------------------------------------------------------------


def test_jitter_keeps_each_delay_within_its_bounds_and_never_above_the_cap() -> None:
    schedule = Backoff([1.0], cap=30.0, jitter=0.2, random=random.Random(11).random)
    nominal = first(schedule.nominal(), 200)
    drawn = first(schedule, 200)
    for d, n in zip(drawn, nominal, strict=True):
        assert 0.8 * n < d <= n <= 30.0
    assert len({round(d, 9) for d in drawn[10:]}) > 100  # at the cap the delays still spread


def test_jitter_bounds_are_exact_at_the_ends_of_the_random_source() -> None:
    assert first(Backoff([1.0], cap=4.0, jitter=0.2, random=lambda: 0.0), 4) == [1.0, 2.0, 4.0, 4.0]
    top = 1.0 - 2**-53  # the largest value random() returns
    assert first(Backoff([1.0], cap=4.0, jitter=0.2, random=lambda: top), 3) == pytest.approx([0.8, 1.6, 3.2])


def test_two_gateways_do_not_probe_in_lock_step() -> None:
    """Two probes that started together drift apart: their n-th attempts are at different times."""
    a = itertools.accumulate(first(Backoff([1.0], cap=30.0, jitter=0.2, random=random.Random(1).random), 20))
    b = itertools.accumulate(first(Backoff([1.0], cap=30.0, jitter=0.2, random=random.Random(2).random), 20))
    gaps = [abs(x - y) for x, y in zip(a, b, strict=True)]
    assert gaps[-1] > 1.0  # after 20 attempts they are seconds apart


# -- retry -------------------------------------------------------------------------------


class Flaky:
    """Raises `errors` in turn, then returns "ok"; records the clock time of each call."""

    def __init__(self, clock: ManualClock, *errors: Exception) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.calls: list[float] = []

    def __call__(self) -> str:
        self.calls.append(self.clock.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, name="retrier", daemon=True)
    t.start()
    return t, out


def test_retry_waits_each_delay_on_the_clock_then_returns() -> None:
    clock = ManualClock()
    call = Flaky(clock, TransientError("down"), TransientError("down"), TransientError("down"))
    seen: list[tuple[int, float | None]] = []
    t, out = in_thread(lambda: retry(call, [1.0, 2.0, 4.0], clock=clock, stop=threading.Event(),
                                     on_failure=lambda e, n, d: seen.append((n, d))))
    assert [clock.advance_waiter("retrier") for _ in range(3)] == [1.0, 2.0, 4.0]
    t.join(10)
    assert out == ["ok"]
    assert [c - call.calls[0] for c in call.calls] == [0.0, 1.0, 3.0, 7.0]
    assert seen == [(1, 1.0), (2, 2.0), (3, 4.0)]


def test_retry_gives_up_with_the_last_error_when_the_delays_run_out() -> None:
    clock = ManualClock()
    last = TransientError("still down")
    call = Flaky(clock, TransientError("down"), last)
    seen: list[tuple[int, float | None]] = []
    t, out = in_thread(lambda: retry(call, [1.0], clock=clock, stop=threading.Event(),
                                     on_failure=lambda e, n, d: seen.append((n, d))))
    assert clock.advance_waiter("retrier") == 1.0
    t.join(10)
    assert out == [last] and seen == [(1, 1.0), (2, None)]


def test_other_errors_pass_through_without_a_retry() -> None:
    clock = ManualClock()
    fatal = FatalError("table missing")
    call = Flaky(clock, fatal)
    with pytest.raises(FatalError):
        retry(call, [1.0, 2.0], clock=clock, stop=threading.Event())
    assert len(call.calls) == 1 and clock.waits == []


def test_stop_interrupts_the_wait_and_a_set_stop_never_waits() -> None:
    clock = ManualClock()
    stop = threading.Event()
    call = Flaky(clock, TransientError("down"), TransientError("down"))
    t, out = in_thread(lambda: retry(call, [5.0, 5.0], clock=clock, stop=stop))
    assert clock.wait_for_waiter("retrier").timeout == 5.0
    t0 = clock.monotonic()
    stop.set()
    t.join(10)
    assert isinstance(out[0], TransientError) and clock.monotonic() == t0 and len(call.calls) == 1
    # already set: the first failure gives up at once, no wait at all
    call2 = Flaky(clock, TransientError("down"))
    seen: list[float | None] = []
    with pytest.raises(TransientError):
        retry(call2, [5.0], clock=clock, stop=stop, on_failure=lambda e, n, d: seen.append(d))
    assert seen == [None] and len(clock.waits) == 1


def test_retry_gives_up_when_the_next_wait_would_pass_the_deadline() -> None:
    clock = ManualClock()
    call = Flaky(clock, TransientError("down"), TransientError("down"), TransientError("down"))
    deadline = clock.monotonic() + 3.5
    t, out = in_thread(lambda: retry(call, [1.0, 2.0, 4.0], clock=clock, stop=threading.Event(),
                                     deadline=deadline))
    assert [clock.advance_waiter("retrier") for _ in range(2)] == [1.0, 2.0]  # ends at 3.0: within
    t.join(10)
    assert isinstance(out[0], TransientError)  # 3.0 + 4.0 would pass 3.5: given up without waiting
    assert len(call.calls) == 3 and [w.timeout for w in clock.waits] == [1.0, 2.0]

"""CallWorker (tagwriter/sinks/oracle/worker.py): one long-lived thread for calls the driver cannot bound.

Real threads, no driver: a call is reused on the same thread, an overrun is
abandoned within its bound and the worker replaced, a late result reaches
`on_late`, a call that finds the worker busy does not wait for it, and close
lets the thread end. Blocking calls block on Events the test releases.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from waits import wait_until

from tagwriter.errors import TransientError
from tagwriter.sinks.oracle import CallWorker

SLACK = 2.0


@pytest.fixture
def worker() -> Iterator[CallWorker]:
    w = CallWorker("test-worker")
    yield w
    w.close()


def here() -> threading.Thread:
    return threading.current_thread()


def test_calls_reuse_one_long_lived_thread(worker: CallWorker) -> None:
    threads = {worker.run(here, 1.0, "call") for _ in range(50)}
    assert len(threads) == 1
    (thread,) = threads
    assert thread is not threading.current_thread() and thread.name == "test-worker" and thread.daemon
    assert thread is worker.thread and thread.is_alive()
    assert (worker.started, worker.replaced, worker.spares) == (1, 0, 0)


def test_the_result_and_the_error_reach_the_caller(worker: CallWorker) -> None:
    assert worker.run(lambda: 42, 1.0, "answer") == 42

    def fail() -> None:
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        worker.run(fail, 1.0, "fail")
    assert worker.run(here, 1.0, "after") is worker.thread
    assert worker.started == 1  # an error is not an overrun: the thread is kept


def test_an_overrun_is_abandoned_within_its_bound_and_the_worker_replaced(worker: CallWorker) -> None:
    first = worker.run(here, 1.0, "warm up")
    release = threading.Event()
    late: list[str] = []

    def stuck() -> str:
        release.wait(30.0)
        return "late result"

    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        worker.run(stuck, 0.2, "connect to db:1521", on_late=late.append, hint="is it silent?")
    took = time.monotonic() - started
    assert 0.2 <= took < 0.2 + SLACK
    assert info.value.code == "TIMEOUT" and "connect to db:1521: no answer within 0.2 s" in str(info.value)
    assert info.value.hint == "is it silent?"
    assert (worker.started, worker.replaced) == (1, 1) and worker.thread is None
    # the next call gets a fresh thread at once, not the stuck one
    second = worker.run(here, 1.0, "next")
    assert second is not first and second.is_alive() and worker.started == 2
    assert first.is_alive()  # still in its call
    release.set()
    wait_until(lambda: late == ["late result"], "the late result to reach on_late", 5.0)
    wait_until(lambda: not first.is_alive(), "the abandoned thread to end after its call", 5.0)
    assert worker.run(here, 1.0, "again") is second


def test_a_late_error_is_not_handed_to_on_late(worker: CallWorker) -> None:
    release = threading.Event()
    late: list[object] = []

    def stuck_then_fail() -> None:
        release.wait(30.0)
        raise OSError("reset")

    thread = worker.run(here, 1.0, "warm up")
    with pytest.raises(TransientError):
        worker.run(stuck_then_fail, 0.05, "call", on_late=late.append)
    release.set()
    wait_until(lambda: not thread.is_alive(), "the abandoned thread to end", 5.0)
    assert late == []


def test_a_call_that_finds_the_worker_busy_does_not_wait_for_it(worker: CallWorker) -> None:
    release = threading.Event()
    entered = threading.Event()

    def busy() -> threading.Thread:
        entered.set()
        release.wait(30.0)
        return here()

    results: list[threading.Thread] = []
    other = threading.Thread(target=lambda: results.append(worker.run(busy, 10.0, "slow")))
    other.start()
    try:
        assert entered.wait(5.0)
        started = time.monotonic()
        spare = worker.run(here, 1.0, "quick")
        assert time.monotonic() - started < SLACK
        assert spare.name == "test-worker-spare" and spare is not worker.thread
        assert worker.spares == 1
    finally:
        release.set()
        other.join(5.0)
    assert results == [worker.thread]
    wait_until(lambda: not spare.is_alive(), "the spare to end after its one call", 5.0)
    assert worker.run(here, 1.0, "then") is results[0] and worker.started == 1


def test_close_lets_the_thread_end_and_a_later_call_starts_a_new_one(worker: CallWorker) -> None:
    first = worker.run(here, 1.0, "call")
    worker.close()
    wait_until(lambda: not first.is_alive(), "the closed worker to end", 5.0)
    assert worker.thread is None
    second = worker.run(here, 1.0, "after close")
    assert second is not first and second.is_alive() and worker.started == 2

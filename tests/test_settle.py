"""`Settlement` (the watermark over settled positions) and `Receipt` (what a submit hands back to wait on)."""

from __future__ import annotations

import logging
import threading

import pytest
from waits import wait_until

from tagwriter.settle import SETTLED, Receipt, Settlement


def test_the_watermark_moves_only_over_a_contiguous_prefix() -> None:
    s = Settlement()
    s.settle(10, 20)
    s.settle(30, 40)
    assert s.mark == 0  # 0 .. 9 are not settled: nothing past them counts
    s.settle(0, 10)
    assert s.mark == 20  # up to the next hole
    s.settle(20, 30)
    assert s.mark == 40  # the hole filled: the range settled ahead joins


def test_overlapping_repeated_and_empty_ranges_do_not_move_the_watermark_wrongly() -> None:
    s = Settlement(100)
    s.settle(50, 90)  # wholly below the watermark: nothing
    s.settle(120, 120)  # empty
    s.settle(130, 110)  # backwards
    assert s.mark == 100
    s.settle(110, 120)
    s.settle(110, 115)  # the same start, shorter: keeps the longer end
    s.settle(90, 105)  # straddles the watermark
    assert s.mark == 105
    s.settle(105, 110)
    assert s.mark == 120  # joined with the longer of the two ranges settled ahead at 110


def test_a_range_that_ends_inside_one_settled_ahead_joins_it() -> None:
    s = Settlement()
    s.settle(10, 20)
    s.settle(0, 15)  # 0 .. 19 are all settled now
    assert s.mark == 20


def test_ranges_settled_in_any_order_end_at_the_total() -> None:
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    s = Settlement()
    marks = []
    for k in order:
        s.settle(10 * k, 10 * k + 10)
        marks.append(s.mark)
    assert marks == [0, 0, 0, 10, 10, 30, 30, 40, 40, 100]


def test_advance_settles_everything_below_a_mark() -> None:
    s = Settlement(5)
    s.advance(50)
    assert s.mark == 50
    s.advance(20)  # never backwards
    assert s.mark == 50


def test_callbacks_run_in_the_order_of_their_ends_then_of_registration() -> None:
    s = Settlement()
    ran: list[str] = []
    s.call_when(30, lambda: ran.append("30a"))
    s.call_when(10, lambda: ran.append("10"))
    s.call_when(30, lambda: ran.append("30b"))
    s.call_when(20, lambda: ran.append("20"))
    s.settle(0, 15)
    assert ran == ["10"]
    s.settle(15, 40)
    assert ran == ["10", "20", "30a", "30b"]
    s.call_when(40, lambda: ran.append("now"))  # settled already: at once, here
    assert ran[-1] == "now"


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    s = Settlement()
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("an ack that cannot be sent")

    s.call_when(5, lambda: ran.append(1))
    s.call_when(5, broken)
    s.call_when(5, lambda: ran.append(3))
    with caplog.at_level(logging.ERROR, logger="tagwriter.settle"):
        s.settle(0, 5)  # the thread that settles is not broken by it
    assert ran == [1, 3]
    assert "a settle callback failed" in caplog.text and "an ack that cannot be sent" in caplog.text
    assert s.mark == 5


def test_callbacks_run_on_the_thread_that_moves_the_watermark() -> None:
    s = Settlement()
    threads: list[str] = []
    s.call_when(10, lambda: threads.append(threading.current_thread().name))
    t = threading.Thread(target=s.settle, args=(0, 10), name="the-settler")
    t.start()
    t.join(5)
    assert threads == ["the-settler"]


def test_wait_times_out_false_and_returns_true_once_settled() -> None:
    s = Settlement()
    assert s.wait(0) is True  # nothing below 0 to wait for
    assert s.wait(10, timeout=0.05) is False
    s.settle(0, 4)
    assert s.wait(10, timeout=0.01) is False  # partly settled is not settled
    t = threading.Timer(0.05, s.settle, args=(4, 10))
    t.start()
    try:
        assert s.wait(10, timeout=10) is True
    finally:
        t.join()


def test_wait_without_a_timeout_returns_once_another_thread_settles() -> None:
    s = Settlement()
    done = threading.Event()

    def waiter() -> None:
        s.wait(3)
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not done.wait(0.02)
    s.settle(0, 3)
    wait_until(done.is_set, "the waiter to return")
    t.join(5)


def test_a_receipt_is_truthy_when_every_value_was_taken_and_settles_with_its_end() -> None:
    s = Settlement()
    taken, partly = Receipt(True, s, 10), Receipt(False, s, 20)
    assert taken and not partly
    assert not taken.settled and not partly.settled
    assert taken.wait(0.01) is False
    seen: list[str] = []
    taken.on_settled(lambda: seen.append("taken"))
    partly.on_settled(lambda: seen.append("partly"))
    s.settle(0, 10)
    assert taken.settled and not partly.settled and seen == ["taken"]
    s.settle(10, 20)
    assert partly.settled and partly.wait(0) and seen == ["taken", "partly"]
    assert "settled=True" in repr(partly) and "accepted=False" in repr(partly)


def test_a_receipt_without_a_settlement_is_settled_at_once() -> None:
    seen: list[int] = []
    SETTLED.on_settled(lambda: seen.append(1))
    assert SETTLED and SETTLED.settled and SETTLED.wait(0) and seen == [1]
    assert Receipt(False).settled  # values dropped or not queued: nothing to wait for

"""RingBuffer: bounded FIFO, one lock per group, drain, overflow policies, thread safety."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from clocks import ManualClock
from waits import wait_until

from tagwriter.buffer import Batch, OverflowPolicy, RingBuffer
from tagwriter.models import TagValue
from tagwriter.spool import Spool
from tagwriter.spoolformat import SpoolLine, read_spool


def rows(start: int, n: int, tag: str = "t") -> list[TagValue]:
    """n rows with distinct timestamps start..start+n-1 (µs) and value == index."""
    return [TagValue(tag, i, float(i), 192) for i in range(start, start + n)]


def contents(buf: RingBuffer) -> list[TagValue]:
    return buf.drain(buf.capacity + 1).rows


# -- basics --------------------------------------------------------------------


def test_capacity_must_be_positive_and_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RingBuffer(0)
    with pytest.raises(ValueError):
        RingBuffer(10, "drop-newest")
    assert RingBuffer(10, "spill").policy is OverflowPolicy.SPILL
    assert RingBuffer().capacity == 100_000
    assert RingBuffer().policy is OverflowPolicy.DROP_OLDEST


def test_len_tracks_puts_and_drains() -> None:
    buf = RingBuffer(100)
    assert len(buf) == 0
    buf.put_many(rows(0, 30))
    buf.put_many(rows(30, 20))
    assert len(buf) == 50
    buf.drain(15)
    assert len(buf) == 35
    assert buf.put_many([]).accepted == 0
    assert len(buf) == 35


def test_drain_is_fifo_and_bounded_by_max_n() -> None:
    buf = RingBuffer(100)
    buf.put_many(rows(0, 4), t_submit=1.0)
    buf.put_many(rows(4, 3), t_submit=2.0)
    first = buf.drain(5)
    assert [r.ts_us for r in first.rows] == [0, 1, 2, 3, 4]
    # marks carry the submit time of each group, split where the batch splits it
    assert first.marks == [(1.0, 4), (2.0, 1)]
    assert first.oldest_submit() == 1.0
    rest = buf.drain(100)
    assert [r.ts_us for r in rest.rows] == [5, 6]
    assert rest.marks == [(2.0, 2)]
    assert len(buf) == 0


def test_drain_on_empty_returns_at_once() -> None:
    buf = RingBuffer(10)
    started = time.monotonic()
    batch = buf.drain(500)
    assert isinstance(batch, Batch) and len(batch) == 0 and batch.oldest_submit() is None
    assert time.monotonic() - started < 1.0  # a bound, not a benchmark: it must not block


class CountingLock:
    """A Lock that counts successful acquisitions (Condition works over it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.acquired += 1
        return ok

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def counting(buf: RingBuffer) -> CountingLock:
    lock = CountingLock()
    buf._mutex = lock  # type: ignore[assignment]
    buf._not_empty = threading.Condition(lock)  # type: ignore[arg-type]
    buf._not_full = threading.Condition(lock)  # type: ignore[arg-type]
    return lock


@pytest.mark.parametrize("policy", list(OverflowPolicy))
@pytest.mark.parametrize("group", [1, 100, 5000])
def test_put_many_takes_the_lock_once_per_group(policy: OverflowPolicy, group: int) -> None:
    buf = RingBuffer(20_000, policy)
    lock = counting(buf)
    for g in range(3):
        buf.put_many(rows(g * group, group))
    assert lock.acquired == 3
    assert len(buf) == 3 * group


# -- wait_ready (the writer's trigger) ---------------------------------------


def test_wait_ready_returns_when_batch_size_pending_or_oldest_is_old() -> None:
    clock = ManualClock()
    buf = RingBuffer(100, clock=clock)
    buf.put_many(rows(0, 10))
    assert buf.wait_ready(batch_size=10, max_age=1.0, timeout=60.0) == 10  # full batch: at once

    buf2 = RingBuffer(100, clock=clock)
    buf2.put_many(rows(0, 3))
    clock.advance(0.4)
    assert buf2.oldest_age() == pytest.approx(0.4)
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(buf2.wait_ready(10, 1.0, 60.0)))
    waiter.start()
    clock.advance(0.5)  # 0.9 s old: not due yet
    with buf2._not_empty:
        buf2._not_empty.notify_all()
    waiter.join(0.2)
    assert waiter.is_alive() and result == []
    clock.advance(0.1)  # 1.0 s old: due
    with buf2._not_empty:
        buf2._not_empty.notify_all()
    waiter.join(10)
    assert result == [3]


def test_wake_makes_wait_ready_return_early() -> None:
    clock = ManualClock()
    buf = RingBuffer(100, clock=clock)
    buf.put_many(rows(0, 2))
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(buf.wait_ready(10, 5.0, 60.0)))
    waiter.start()
    buf.wake()
    waiter.join(10)
    assert result == [2]
    assert clock.monotonic() == 1000.0  # no time had to pass


def test_batch_due_is_size_or_age_of_the_oldest() -> None:
    clock = ManualClock()
    buf = RingBuffer(100, clock=clock)
    assert not buf.batch_due(batch_size=5, max_age=1.0)  # empty: never due
    buf.put_many(rows(0, 3))
    clock.advance(0.5)
    buf.put_many(rows(3, 1))  # a newer value does not restart the oldest one's age
    assert not buf.batch_due(5, 1.0)
    clock.advance(0.5)
    assert buf.batch_due(5, 1.0)  # the oldest is 1.0 s old
    buf.drain(100)
    buf.put_many(rows(10, 5))
    assert buf.batch_due(5, 1.0)  # batch_size pending, at once


# -- wait_for_room (producers that must not overflow) --------------------------------


def parked(buf: RingBuffer) -> None:
    """Wait until a thread waits for room. A notify empties the waiters (CPython): a new entry is a new look."""
    wait_until(lambda: buf._not_full._waiters, what="a thread waiting for room")  # type: ignore[attr-defined]


def advance_and_poke(clock: ManualClock, buf: RingBuffer, seconds: float) -> None:
    """Move the clock and make threads waiting for room look at it again (the buffer's waits are real)."""
    clock.advance(seconds)
    with buf._not_full:
        buf._not_full.notify_all()


def waiting_for_room(buf: RingBuffer, n: int, timeout: float) -> tuple[threading.Thread, list[bool]]:
    """`buf.wait_for_room(n, timeout)` on a thread, parked once this returns; (the thread, its result when done)."""
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(buf.wait_for_room(n, timeout)))
    waiter.start()
    parked(buf)
    return waiter, result


def test_wait_for_room_is_true_at_once_when_the_rows_fit() -> None:
    buf = RingBuffer(10)
    buf.put_many(rows(0, 7))
    assert buf.wait_for_room(3, timeout=0.0)
    assert not buf.wait_for_room(4, timeout=0.0)
    assert buf.wait_for_room(1000, timeout=0.0) is False  # asks for at most the capacity: 10 do not fit
    buf.drain(10)
    assert buf.wait_for_room(1000, timeout=0.0)  # min(n, capacity) rows fit in an empty buffer


def test_wait_for_room_wakes_when_a_drain_makes_room() -> None:
    buf = RingBuffer(10)
    buf.put_many(rows(0, 10))
    waiter, result = waiting_for_room(buf, 4, 30.0)
    buf.drain(3)  # 3 free: not enough for 4
    parked(buf)  # it looked again and waits on
    assert result == []
    buf.drain(1)
    waiter.join(10)
    assert result == [True]


def test_wait_for_room_gives_up_at_its_deadline_on_the_injected_clock() -> None:
    clock = ManualClock()
    buf = RingBuffer(2, clock=clock)
    buf.put_many(rows(0, 2))
    waiter, result = waiting_for_room(buf, 1, 5.0)

    def poke(seconds: float) -> None:
        advance_and_poke(clock, buf, seconds)

    poke(4.9)
    parked(buf)  # it looked at the clock again and waits on
    assert result == []
    poke(0.1)
    waiter.join(10)
    assert result == [False]


def test_close_ends_wait_for_room_with_true() -> None:
    buf = RingBuffer(1)
    buf.put_many(rows(0, 1))
    waiter, result = waiting_for_room(buf, 1, 30.0)
    buf.close()
    waiter.join(10)
    assert result == [True]  # the put that follows refuses its rows: the caller spools them


# -- drop-oldest -----------------------------------------------------------------


def test_drop_oldest_evicts_exactly_the_oldest_values() -> None:
    buf = RingBuffer(10, "drop-oldest")
    assert buf.put_many(rows(0, 10)).dropped == 0
    result = buf.put_many(rows(10, 4))
    assert (result.accepted, result.dropped, result.evicted) == (4, 4, [])
    assert buf.overflowed == 4
    assert [r.ts_us for r in contents(buf)] == list(range(4, 14))


def test_drop_oldest_group_larger_than_buffer_keeps_its_newest() -> None:
    buf = RingBuffer(5, "drop-oldest")
    buf.put_many(rows(0, 2))
    result = buf.put_many(rows(2, 8))
    assert result.accepted == 5 and result.dropped == 5
    assert buf.overflowed == 5
    batch = buf.drain(100)
    assert [r.ts_us for r in batch.rows] == [5, 6, 7, 8, 9]
    assert sum(c for _, c in batch.marks) == 5  # marks still cover exactly the rows


def test_drop_oldest_counter_is_exact_over_many_overflows() -> None:
    buf = RingBuffer(100, "drop-oldest")
    submitted = dropped = drained = 0
    kept: list[int] = []
    for g in range(500):
        n = 1 + (g * 7) % 23
        res = buf.put_many(rows(submitted, n))
        submitted += n
        dropped += res.dropped
        if g % 50 == 0:
            batch = buf.drain(30)
            drained += len(batch)
            kept.extend(r.ts_us for r in batch.rows)
    rest = contents(buf)
    kept.extend(r.ts_us for r in rest)
    drained += len(rest)
    assert dropped == buf.overflowed
    assert submitted == drained + dropped
    assert kept == sorted(kept)  # FIFO: survivors come out in submit order
    assert rest[-1].ts_us == submitted - 1  # the newest value always survives


def test_drop_oldest_warning_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    buf = RingBuffer(10, "drop-oldest", warn_interval=10.0, clock=clock)
    buf.put_many(rows(0, 10))
    with caplog.at_level(logging.WARNING, logger="tagwriter.buffer"):
        for i in range(1000):
            buf.put_many(rows(10 + i, 1))
        first = [r for r in caplog.records if r.name == "tagwriter.buffer"]
        assert len(first) == 1
        assert buf.overflowed == 1000
        clock.advance(5.0)
        buf.put_many(rows(2000, 1))
        assert len([r for r in caplog.records if r.name == "tagwriter.buffer"]) == 1
        clock.advance(5.0)
        buf.put_many(rows(3000, 1))
    records = [r for r in caplog.records if r.name == "tagwriter.buffer"]
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert buf.warnings_logged == 2
    # the second warning reports the 1,001 values since the first, and the total
    assert "1001 values dropped" in records[1].getMessage()
    assert "1002 in total" in records[1].getMessage()


# -- spill -----------------------------------------------------------------------


def test_spill_hands_back_the_evicted_values_and_drops_none() -> None:
    buf = RingBuffer(10, "spill")
    buf.put_many(rows(0, 10))
    result = buf.put_many(rows(10, 3))
    assert result.dropped == 0 and result.accepted == 3
    assert [r.ts_us for r in result.evicted] == [0, 1, 2]
    assert buf.overflowed == 3


def test_spill_evicted_values_reach_the_spool_nothing_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "backup")
    buf = RingBuffer(50, "spill")
    submitted: list[TagValue] = []
    spilled = 0
    for g in range(40):
        group = [TagValue(f"g{g}.t{i}", 1_700_000_000_000_000 + g, g + i / 10, 192) for i in range(7)]
        submitted.extend(group)
        result = buf.put_many(group)
        assert result.dropped == 0
        spilled += spool.write_rows(result.evicted)
    spool.seal()
    in_buffer = contents(buf)
    assert spilled == buf.overflowed == len(submitted) - 50
    back = [item for f in spool.backup.files() for item in read_spool(f)]
    assert all(isinstance(item, SpoolLine) for item in back)
    from_spool = [item.row for item in back if isinstance(item, SpoolLine)]
    # spool (oldest) + buffer (newest) is exactly what was submitted, in order
    assert from_spool + in_buffer == submitted


# -- block -----------------------------------------------------------------------


def test_block_waits_for_room_made_by_a_drain() -> None:
    buf = RingBuffer(5, "block", block_timeout=30.0)
    buf.put_many(rows(0, 4))
    results: list[object] = []
    producer = threading.Thread(target=lambda: results.append(buf.put_many(rows(100, 3))))
    producer.start()
    # The producer appends one row (buffer full), then waits inside the lock's Condition:
    # once we see 5 rows, our drain can only get the lock while the producer waits.
    wait_until(lambda: len(buf) == 5, what="producer filled the buffer")
    drained = buf.drain(3)
    producer.join(10)
    assert not producer.is_alive()
    assert [r.ts_us for r in drained.rows] == [0, 1, 2]
    (result,) = results
    assert result.accepted == 3 and result.dropped == 0  # type: ignore[attr-defined]
    assert buf.blocked_puts == 1 and buf.overflowed == 0
    assert [r.ts_us for r in contents(buf)] == [3, 100, 101, 102]


def test_block_times_out_and_reports_the_drop(caplog: pytest.LogCaptureFixture) -> None:
    timeout = 0.2
    buf = RingBuffer(5, "block", block_timeout=timeout)
    buf.put_many(rows(0, 4))
    with caplog.at_level(logging.WARNING, logger="tagwriter.buffer"):
        started = time.monotonic()
        result = buf.put_many(rows(10, 3))
        elapsed = time.monotonic() - started
    assert (result.accepted, result.dropped) == (1, 2)
    assert buf.overflowed == 2 and buf.blocked_puts == 1
    assert timeout <= elapsed < 10.0  # waited its timeout, and is bounded
    assert [r.ts_us for r in contents(buf)] == [0, 1, 2, 3, 10]
    assert any("after waiting for room" in r.getMessage() for r in caplog.records)


def test_block_with_injected_clock_gives_up_only_at_the_deadline() -> None:
    clock = ManualClock()
    buf = RingBuffer(2, "block", block_timeout=5.0, clock=clock)
    buf.put_many(rows(0, 2))
    results: list[object] = []
    producer = threading.Thread(target=lambda: results.append(buf.put_many(rows(10, 1))))
    producer.start()

    def poke(seconds: float) -> None:
        advance_and_poke(clock, buf, seconds)

    poke(4.9)
    producer.join(0.2)
    assert producer.is_alive(), "gave up before its 5 s timeout"
    poke(0.1)
    producer.join(10)
    assert not producer.is_alive()
    (result,) = results
    assert (result.accepted, result.dropped) == (0, 1)  # type: ignore[attr-defined]


def test_block_timeout_zero_drops_at_once() -> None:
    buf = RingBuffer(3, "block", block_timeout=0.0)
    buf.put_many(rows(0, 3))
    result = buf.put_many(rows(3, 2))
    assert (result.accepted, result.dropped) == (0, 2)
    assert [r.ts_us for r in contents(buf)] == [0, 1, 2]


def blocked_put() -> tuple[RingBuffer, threading.Thread, list[object]]:
    """A full buffer of 2 (block policy, 30 s timeout on a clock that never moves) and a
    producer blocked putting rows 10-12: only room or close() can end its wait."""
    buf = RingBuffer(2, "block", block_timeout=30.0, clock=ManualClock())
    buf.put_many(rows(0, 2))
    results: list[object] = []
    producer = threading.Thread(target=lambda: results.append(buf.put_many(rows(10, 3))))
    producer.start()
    wait_until(lambda: buf.waiting == 3, what="put blocked with 3 rows waiting")
    return buf, producer, results


def test_waiting_counts_the_rows_of_a_blocked_put_until_they_are_in() -> None:
    buf, producer, _ = blocked_put()
    assert len(buf) == 2  # buffered + waiting = every row handed over
    buf.drain(1)
    wait_until(lambda: buf.waiting == 2, what="one waiting row taken in")
    assert len(buf) == 2
    buf.drain(2)
    producer.join(10)
    assert not producer.is_alive()
    assert buf.waiting == 0 and [r.ts_us for r in contents(buf)] == [11, 12]


def test_close_wakes_a_blocked_put_which_refuses_its_rows_and_later_puts_refuse_too() -> None:
    buf, producer, results = blocked_put()
    buf.close()
    producer.join(10)
    assert not producer.is_alive()
    (result,) = results
    assert result.accepted == 0 and result.dropped == 0  # type: ignore[attr-defined]
    assert [r.ts_us for r in result.refused] == [10, 11, 12]  # type: ignore[attr-defined]
    assert buf.waiting == 0 and buf.overflowed == 0
    for policy in ("drop-oldest", "spill", "block"):
        other = RingBuffer(5, policy)
        other.close()
        late = other.put_many(rows(20, 2))
        assert (late.accepted, len(late.refused), len(other)) == (0, 2, 0)
    assert [r.ts_us for r in contents(buf)] == [0, 1]  # drain still works after close


# -- threads ---------------------------------------------------------------------


def run_producers_and_drainer(
    buf: RingBuffer, producers: int, groups: int, group_size: int
) -> tuple[list[TagValue], int]:
    """Producers put tagged sequences; one drainer drains until all are done. Returns (drained, dropped)."""
    done = threading.Event()
    drained: list[TagValue] = []
    dropped = [0] * producers

    def produce(p: int) -> None:
        for g in range(groups):
            start = g * group_size
            res = buf.put_many([TagValue(f"p{p}", i, float(i)) for i in range(start, start + group_size)])
            dropped[p] += res.dropped

    def drain() -> None:
        while True:
            finished = done.is_set()
            batch = buf.drain(37)
            drained.extend(batch.rows)
            if finished and not batch.rows:
                return
            if not batch.rows:
                buf.wait_ready(1, 0.0, 0.01)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    drainer = threading.Thread(target=drain)
    drainer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    drainer.join(60)
    assert not drainer.is_alive() and not any(t.is_alive() for t in threads)
    return drained, sum(dropped)


def per_producer_in_order(drained: list[TagValue]) -> bool:
    last: dict[str, int] = {}
    for r in drained:
        if r.ts_us <= last.get(r.tag, -1):
            return False
        last[r.tag] = r.ts_us
    return True


def test_threads_no_overflow_totals_exact() -> None:
    buf = RingBuffer(1_000_000)
    drained, dropped = run_producers_and_drainer(buf, producers=4, groups=500, group_size=10)
    assert dropped == 0
    assert len(drained) == 4 * 500 * 10
    assert len(set(drained)) == len(drained)
    assert per_producer_in_order(drained)


def test_threads_drop_oldest_totals_exact() -> None:
    buf = RingBuffer(200, "drop-oldest")
    drained, dropped = run_producers_and_drainer(buf, producers=4, groups=500, group_size=10)
    assert dropped == buf.overflowed
    assert len(drained) + dropped == 4 * 500 * 10
    assert len(set(drained)) == len(drained)
    assert per_producer_in_order(drained)


def test_threads_block_loses_nothing_with_a_live_drainer() -> None:
    buf = RingBuffer(50, "block", block_timeout=30.0)
    drained, dropped = run_producers_and_drainer(buf, producers=3, groups=300, group_size=10)
    assert dropped == 0 and buf.overflowed == 0
    assert len(drained) == 3 * 300 * 10
    assert per_producer_in_order(drained)


@pytest.mark.parametrize("seed", range(20))
def test_drains_cut_chunks_anywhere_and_keep_order_positions_and_marks(seed: int) -> None:
    """Groups stay whole chunks in the buffer; a drain (or an eviction) may end inside one: what comes out,
    batch after batch, is exactly what went in, with contiguous positions and one mark per group piece."""
    import random

    rng = random.Random(seed)  # groups of at most 25 in a buffer of 60: a group never overflows by itself
    clock = ManualClock()
    buf = RingBuffer(60, "drop-oldest" if seed % 2 else "spill", clock=clock)
    sent: list[TagValue] = []
    out: list[TagValue] = []  # drained, evicted or spilled, in position order
    next_pos = 0
    for step in range(200):
        if rng.random() < 0.55:
            group = rows(len(sent), rng.randint(1, 25), tag=f"g{step}")
            sent.extend(group)
            clock.advance(0.001)
            result = buf.put_many(group)
            if result.popped[1] > result.popped[0]:  # evicted from the front: those positions come next
                assert result.popped[0] == next_pos
                evicted = result.evicted if result.evicted else sent[next_pos:result.popped[1]]
                out.extend(evicted)
                next_pos = result.popped[1]
            assert result.end == next_pos + len(buf)
        else:
            batch = buf.drain(rng.randint(1, 40))
            if not batch.rows:
                continue
            assert batch.start == next_pos and batch.end == next_pos + len(batch)
            assert sum(count for _, count in batch.marks) == len(batch)
            out.extend(batch.rows)
            next_pos = batch.end
    out.extend(contents(buf))
    assert out == sent

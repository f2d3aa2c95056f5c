"""`RingBuffer`: the bounded, thread-safe queue between producers and the writer.

Rows sit in one deque of *entries* (submit time, chunk), one per `put_many`:
each polling group stays one `models.Chunk` (columns, not an object per
value), and its submit time lets the writer measure per-value end-to-end
latency without storing a time per value. `drain` takes whole chunks (the
last one cut where the batch ends) and joins them column by column. One
mutex is shared by both Conditions (as in `queue.Queue`).

Every row taken gets a *position* (0, 1, 2, ... in the order taken): a batch
covers positions `start` .. `end - 1`, a put reports the position after its
last row (`PutResult.end`) and the range it pushed out (`PutResult.popped`).
Whoever settles rows (the writer once written or spooled, the pipeline once
spilled or dropped) calls `release(start, end)`, which moves the buffer's
`Settlement`: that is what a `Receipt` of `Pipeline.submit` waits on in memory.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from tagwriter.clock import SYSTEM_CLOCK, Clock
from tagwriter.models import Chunk, TagValue
from tagwriter.settle import Settlement

log = logging.getLogger(__name__)

#: The shortest flush interval for which a writer waiting on an empty buffer looks again after that interval
#: rather than asking to be woken by the first put (`RingBuffer.wait_ready`): shorter ones would wake it
#: often while nothing comes.
EMPTY_LOOK_MIN = 0.5


class OverflowPolicy(StrEnum):
    DROP_OLDEST = "drop-oldest"
    SPILL = "spill"
    BLOCK = "block"


@dataclass(slots=True)
class Batch:
    """Rows taken out of the buffer together, oldest first.

    `marks` holds `(t_submit, count)` pairs covering `rows` in order; the rows
    hold positions `start` .. `start + len(rows) - 1` (see the module docstring).
    """

    rows: Sequence[TagValue] = field(default_factory=lambda: Chunk([], [], [], []))  # a Chunk from a buffer
    marks: list[tuple[float, int]] = field(default_factory=list)
    start: int = 0

    @property
    def end(self) -> int:
        """The position after the batch's last row."""
        return self.start + len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def oldest_submit(self) -> float | None:
        return self.marks[0][0] if self.marks else None


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~4x more, on every submit
class PutResult:
    """What happened to the rows of one `put_many`.

    `evicted` are older rows pushed out to make room (returned only under the
    `spill` policy: the caller must spool them); `dropped` counts values lost
    (evicted under `drop-oldest`, timed out under `block`); `refused` are rows
    not taken because the buffer was closed (the caller must spool them).
    `end` is the position after the last row taken; `popped` the range of
    positions pushed out of the buffer (empty when none), to be released once
    those rows are settled (spooled, or counted as dropped).
    """

    accepted: int
    dropped: int = 0
    evicted: Sequence[TagValue] = field(default_factory=list)
    refused: Sequence[TagValue] = ()  # a tuple: no allocation per put on the normal path
    end: int = 0
    popped: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class _Entry:
    """The rows of one put, and when they were submitted (`clock.monotonic()`)."""

    t_submit: float
    chunk: Chunk


class Buffer(Protocol):
    """What the writer and the pipeline ask of a buffer: `RingBuffer` (memory) or `diskqueue.DiskQueue`."""

    policy: OverflowPolicy
    waiting: int
    settlement: Settlement

    @property
    def capacity(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def tail(self) -> int: ...
    def __len__(self) -> int: ...
    def put_many(
        self, rows: Sequence[TagValue], t_submit: float | None = None, *, cursor: tuple[str, str] | None = None
    ) -> PutResult: ...
    def wait_for_room(self, n: int, timeout: float) -> bool: ...
    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> int: ...
    def batch_due(self, batch_size: int, max_age: float) -> bool: ...
    def wake(self) -> None: ...
    def drain(self, max_n: int) -> Batch: ...
    def release(self, start: int, end: int) -> None: ...
    def close(self) -> None: ...
    def oldest_age(self) -> float: ...


class RingBuffer:
    """Bounded FIFO of `TagValue` rows with an overflow policy.

    Thread-safe. `len()` is approximate, like `queue.Queue.qsize()`.
    `close()` ends intake: a put blocked for room returns at once, and every
    later put refuses its rows (`PutResult.refused`); `drain` still works.
    """

    def __init__(
        self,
        capacity: int = 100_000,
        policy: OverflowPolicy | str = OverflowPolicy.DROP_OLDEST,
        *,
        block_timeout: float = 5.0,
        warn_interval: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
        start: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.policy = OverflowPolicy(policy)
        self.block_timeout = block_timeout
        self.warn_interval = warn_interval
        self._clock = clock
        self._entries: deque[_Entry] = deque()  # oldest first
        self._len = 0  # rows in _entries
        self._head = start  # position of the first row of _entries
        #: Settled positions of this buffer (see the module docstring); `release` moves it.
        self.settlement = Settlement(start)
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = threading.Condition(self._mutex)
        # Who waits, so that a put or a drain wakes nobody when nobody waits or needs waking (Condition.notify
        # costs a Python call even then): the writer (and the batch size that ends its wait), room waiters.
        self._writer_waits = False
        self._due_size = 1
        self._wake_on_first = True  # the waiting writer wants the first put into an empty buffer (see wait_ready)
        self._room_waiters = 0
        self._wake = False
        self._closed = False
        self.waiting = 0  # rows of puts blocked for room: submitted, not yet in the buffer
        self.overflowed = 0  # evicted or dropped values, ever
        self.blocked_puts = 0  # put_many calls that had to wait for room
        self._unwarned = 0
        self._last_warn = float("-inf")
        self.warnings_logged = 0

    def __len__(self) -> int:
        return self._len

    # -- producers ---------------------------------------------------------

    def put_many(
        self, rows: Sequence[TagValue], t_submit: float | None = None, *, cursor: tuple[str, str] | None = None
    ) -> PutResult:
        """Append the rows of one polling group under one lock acquisition.

        `cursor` is for a durable buffer (`DiskQueue`); in memory nothing resumes, and it is ignored.
        """
        n = len(rows)
        if n == 0:
            return PutResult(0, end=self._head + self._len)
        if t_submit is None:
            t_submit = self._clock.monotonic()
        chunk = Chunk.of(rows)
        with self._mutex:
            if self._closed:
                return PutResult(0, refused=chunk, end=self._head + self._len)
            if self._len + n <= self.capacity:  # room: every policy simply appends (the common case)
                self._entries.append(_Entry(t_submit, chunk))
                self._len += n
                self._wake_writer(n)
                return PutResult(n, end=self._head + self._len)
            if self.policy is OverflowPolicy.BLOCK:
                result = self._put_blocking(chunk, t_submit)
            else:
                result = self._put_evicting(chunk, t_submit)
            self._wake_writer(len(chunk))
        if result.dropped or result.evicted:
            self._warn_overflow(result.dropped + len(result.evicted))
        return result

    def _put_evicting(self, rows: Chunk, t_submit: float) -> PutResult:
        n = len(rows)
        excess = self._len + n - self.capacity
        evicted: Sequence[TagValue] = []
        popped_from = self._head
        if excess > 0:
            from_buffer = min(excess, self._len)
            evicted = self._pop_front(from_buffer)
            if excess > from_buffer:  # the group alone is larger than the buffer
                skip = excess - from_buffer
                evicted = Chunk.join([Chunk.of(evicted), rows[:skip]])
                rows = rows[skip:]
            self.overflowed += excess
        popped = (popped_from, self._head)
        self._append(rows, t_submit)
        end = self._head + self._len
        if self.policy is OverflowPolicy.SPILL:
            return PutResult(len(rows), 0, evicted, end=end, popped=popped)
        return PutResult(len(rows), len(evicted), end=end, popped=popped)

    def _put_blocking(self, rows: Chunk, t_submit: float) -> PutResult:
        """Wait for room up to `block_timeout`; rows still waiting count in `waiting`.

        `close()` ends the wait: rows not yet taken come back as `refused`.
        """
        deadline = self._clock.monotonic() + self.block_timeout
        accepted = 0
        waited = False
        try:
            while accepted < len(rows):
                room = self.capacity - self._len
                if room > 0:
                    take = rows if accepted == 0 and room >= len(rows) else rows[accepted : accepted + room]
                    self._append(take, t_submit)
                    accepted += len(take)
                    if waited:
                        self.waiting -= len(take)
                    self._wake_writer(len(take))
                    continue
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0.0 or self._closed:
                    break
                if not waited:
                    waited = True
                    self.waiting += len(rows) - accepted
                self._wait_room(remaining)
        finally:
            if waited:
                self.waiting -= len(rows) - accepted
        if waited:
            self.blocked_puts += 1
        end = self._head + self._len
        if self._closed and accepted < len(rows):
            return PutResult(accepted, refused=rows[accepted:], end=end)
        dropped = len(rows) - accepted
        self.overflowed += dropped
        return PutResult(accepted, dropped, end=end)

    def _wake_writer(self, added: int) -> None:
        """After `added` rows went in (under the mutex): wake a waiting writer if its batch just became due
        by size, or the buffer was empty (it then waits without a deadline)."""
        if self._writer_waits and (self._len >= self._due_size or (self._wake_on_first and self._len == added)):
            self._not_empty.notify()

    def _wait_room(self, timeout: float) -> None:
        self._room_waiters += 1
        try:
            self._not_full.wait(timeout)
        finally:
            self._room_waiters -= 1

    def _room_made(self) -> None:
        if self._room_waiters:
            self._not_full.notify_all()

    def _append(self, rows: Chunk, t_submit: float) -> None:
        if not rows:
            return
        self._entries.append(_Entry(t_submit, rows))
        self._len += len(rows)

    def _pop_front(self, n: int, marks: list[tuple[float, int]] | None = None) -> Chunk:
        """The `n` oldest rows out of the buffer, whole chunks joined and the last one cut (under the mutex);
        their `(t_submit, count)` marks appended to `marks`."""
        entries = self._entries
        taken: list[Chunk] = []
        left = n
        while left > 0:
            entry = entries[0]
            chunk = entry.chunk
            count = len(chunk)
            if count <= left:
                entries.popleft()
                taken.append(chunk)
            else:
                taken.append(chunk[:left])
                entry.chunk = chunk[left:]
                count = left
            if marks is not None:
                marks.append((entry.t_submit, count))
            left -= count
        self._head += n
        self._len -= n
        return Chunk.join(taken) if taken else Chunk([], [], [], [])

    def _warn_overflow(self, n: int) -> None:
        """Log overflow at most once per `warn_interval`, with the count since last time."""
        with self._mutex:
            self._unwarned += n
            now = self._clock.monotonic()
            if now - self._last_warn < self.warn_interval:
                return
            count, self._unwarned, self._last_warn = self._unwarned, 0, now
            self.warnings_logged += 1
            total = self.overflowed
        action = {
            OverflowPolicy.DROP_OLDEST: "dropped (oldest first)",
            OverflowPolicy.SPILL: "spilled to the spool",
            OverflowPolicy.BLOCK: "dropped after waiting for room",
        }[self.policy]
        log.warning(
            "buffer full (capacity %d): %d values %s since the last warning, %d in total",
            self.capacity, count, action, total,
        )

    def close(self) -> None:
        """End intake: wake blocked puts (they return their rows as refused); idempotent."""
        with self._mutex:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_for_room(self, n: int, timeout: float) -> bool:
        """Wait until `min(n, capacity)` rows fit or the buffer is closed (True); False on timeout."""
        need = min(n, self.capacity)
        clock = self._clock
        deadline = clock.monotonic() + timeout
        with self._mutex:
            while not self._closed and self.capacity - self._len < need:
                remaining = deadline - clock.monotonic()
                if remaining <= 0.0:
                    return False
                self._wait_room(remaining)
            return True

    # -- the writer --------------------------------------------------------

    def wait_ready(self, batch_size: int, max_age: float, timeout: float) -> int:
        """Block until a batch is due (see `batch_due`), `wake()` is called, or `timeout` passes.

        Returns the number of pending rows.

        On an empty buffer the writer looks again after `max_age` (when that
        is at least EMPTY_LOOK_MIN) instead of being woken by the first put: a
        row that came meanwhile is due `max_age` after its own submit, which
        the next look honours, and a steady stream costs one wake-up a batch
        instead of two (each costs ~0.1-0.4 ms of CPU on our VMs).
        """
        clock = self._clock
        deadline = clock.monotonic() + timeout
        with self._mutex:
            while True:
                if self._wake:
                    self._wake = False
                    return self._len
                now = clock.monotonic()
                due = self._due_in(batch_size, max_age, now)
                self._wake_on_first = due == math.inf and max_age < EMPTY_LOOK_MIN
                if due == math.inf and not self._wake_on_first:
                    due = max_age
                wait = min(due, deadline - now)
                if wait <= 0.0:
                    return self._len
                self._writer_waits, self._due_size = True, batch_size
                try:
                    self._not_empty.wait(None if wait == math.inf else wait)
                finally:
                    self._writer_waits = False

    def batch_due(self, batch_size: int, max_age: float) -> bool:
        """The batch rule: `batch_size` rows are pending, or the oldest has waited `max_age` seconds."""
        with self._mutex:
            return self._due_in(batch_size, max_age, self._clock.monotonic()) <= 0.0

    def _due_in(self, batch_size: int, max_age: float, now: float) -> float:
        """Seconds until a batch is due by `batch_due`'s rule (0 = now, inf when empty); under the mutex."""
        if self._len >= batch_size:
            return 0.0
        if not self._len:
            return math.inf
        return max_age - (now - self._entries[0].t_submit)

    def wake(self) -> None:
        """Make a pending or the next `wait_ready` return at once."""
        with self._mutex:
            self._wake = True
            self._not_empty.notify_all()

    def drain(self, max_n: int) -> Batch:
        """Take up to `max_n` rows, oldest first; never blocks on an empty buffer."""
        with self._mutex:
            n = min(max_n, self._len)
            if n == 0:
                return Batch()
            start = self._head
            marks: list[tuple[float, int]] = []
            batch = Batch(self._pop_front(n, marks), marks, start)
            self._room_made()
            return batch

    def evict(self, n: int) -> tuple[Chunk, int]:
        """Take up to `n` of the oldest rows out (not as a batch); returns them and the position of the first."""
        with self._mutex:
            first = self._head
            taken = self._pop_front(min(n, self._len))
            if taken:
                self._room_made()
            return taken, first

    def release(self, start: int, end: int) -> None:
        """Rows at positions `start` .. `end - 1` are settled (written, spooled, quarantined or dropped)."""
        self.settlement.settle(start, end)

    @property
    def tail(self) -> int:
        """The position the next row taken will get."""
        return self._head + self._len

    def oldest_age(self) -> float:
        """Seconds the oldest pending row has waited (0 when empty)."""
        with self._mutex:
            if not self._entries:
                return 0.0
            return max(0.0, self._clock.monotonic() - self._entries[0].t_submit)

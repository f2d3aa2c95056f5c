"""When values are *settled*, and the `Receipt` a submit hands back to wait for it.

Every value a pipeline takes gets a position (0, 1, 2, ... in the order taken).
A `Settlement` is told which ranges of positions have settled, in any order, and
keeps the *watermark*: the lowest position not yet settled. A `Receipt` covers
the positions of one submit and is done once the watermark passes its end.

What settled means depends on the buffer: with `buffer.durability = "disk"` a
value is settled once its group commit is fsynced (tagwriter.diskqueue); in
memory it is settled once it is written, spooled, quarantined or a counted drop
(tagwriter.buffer, tagwriter.pipeline). A source acknowledges upstream (a file
offset, an MQTT PUBACK, a JetStream ack) only when its receipt is done.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Settlement:
    """The watermark over settled positions, with waiters and callbacks. Thread-safe.

    Ranges may settle out of order (the writer settles a batch while a submit
    spills older rows); the watermark moves only over a contiguous prefix.
    Callbacks run on the thread whose `settle` moved the watermark past them,
    outside the lock: they must be quick and must not block (an ack send).
    """

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()  # (taken bare by `settle`, once per batch: a Condition's `with` costs more)
        self._cond = threading.Condition(self._lock)
        self._waiters = 0  # threads in `wait`: `settle` notifies only when there are some
        self._mark = start
        self._ahead: dict[int, int] = {}  # start -> end of ranges settled beyond the watermark
        self._callbacks: list[tuple[int, int, Callable[[], None]]] = []  # heap of (end, order, fn)
        self._order = itertools.count()

    @property
    def mark(self) -> int:
        """Every position below this has settled."""
        return self._mark

    def settle(self, start: int, end: int) -> None:
        """Positions `start` .. `end - 1` have settled."""
        if end <= start:
            return
        with self._lock:
            if end <= self._mark:
                return
            if start > self._mark:
                self._ahead[start] = max(end, self._ahead.get(start, end))
                return
            mark = end
            # Join every range settled ahead that now touches or overlaps the prefix.
            while self._ahead and (starts := [s for s in self._ahead if s <= mark]):
                for s in starts:
                    mark = max(mark, self._ahead.pop(s))
            self._mark = mark
            due = self._due_callbacks() if self._callbacks else []
            if self._waiters:
                self._cond.notify_all()
        if due:
            self._run(due)

    def advance(self, mark: int) -> None:
        """Everything below `mark` has settled (a queue that settles in order)."""
        self.settle(self._mark, mark)

    def wait(self, end: int, timeout: float | None = None) -> bool:
        """Wait until every position below `end` has settled; False on timeout."""
        with self._cond:
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: self._mark >= end, timeout)
            finally:
                self._waiters -= 1

    def call_when(self, end: int, fn: Callable[[], None]) -> None:
        """Call `fn` once every position below `end` has settled (at once, here, if it has)."""
        with self._cond:
            if self._mark < end:
                heapq.heappush(self._callbacks, (end, next(self._order), fn))
                return
        self._run([fn])

    def _due_callbacks(self) -> list[Callable[[], None]]:
        due = []
        while self._callbacks and self._callbacks[0][0] <= self._mark:
            due.append(heapq.heappop(self._callbacks)[2])
        return due

    @staticmethod
    def _run(callbacks: list[Callable[[], None]]) -> None:
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a source's ack must not break the thread that settles values
                log.exception("a settle callback failed")


class Receipt:
    """What `Pipeline.submit` hands back: whether every value was taken, and when they settle.

    True in a boolean context when every value was taken (`accepted`), as
    `submit` returned before receipts existed. `wait` and `on_settled` say when
    the values are settled: durable on disk, or written/spooled/quarantined
    (see the module docstring). A receipt of values that were dropped or not
    queued is settled at once.
    """

    __slots__ = ("_end", "_settlement", "accepted")

    def __init__(self, accepted: bool, settlement: Settlement | None = None, end: int = 0) -> None:
        self.accepted = accepted
        self._settlement = settlement
        self._end = end

    def __bool__(self) -> bool:
        return self.accepted

    def __repr__(self) -> str:
        return f"Receipt(accepted={self.accepted}, settled={self.settled})"

    @property
    def settled(self) -> bool:
        s = self._settlement
        return s is None or s.mark >= self._end

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the values are settled; False if `timeout` seconds pass first."""
        s = self._settlement
        return s is None or s.wait(self._end, timeout)

    def on_settled(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the values are settled: at once if they are, else on the thread that settles them.

        `fn` must be quick and must not block (it runs on the writer or the commit thread).
        """
        s = self._settlement
        if s is None:
            fn()
        else:
            s.call_when(self._end, fn)


SETTLED = Receipt(True)  # the receipt of a submit with nothing to wait for

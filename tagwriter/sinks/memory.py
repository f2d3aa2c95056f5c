"""An in-memory sink with fault injection, for tests and overflow-test.

It stores rows in a dict keyed by (tag, ts_us) like the tables' unique key,
or wraps a real sink (`MemorySink(inner=SqliteSink(...))`) and injects the
same faults in front of it. Faults: fail the next N writes, stay down until
told, reject rows matching a predicate, block writes until released, and a
fixed delay per write. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from tagwriter.errors import RowError, SinkError, TransientError
from tagwriter.models import TagValue
from tagwriter.sinks.base import Sink, WriteResult


class MemorySink:
    kind = "memory"

    def __init__(self, inner: Sink | None = None) -> None:
        self.inner = inner
        self.rows: dict[tuple[str, int], TagValue] = {}
        self._lock = threading.Lock()
        self._fail_next = 0
        self._fail_error: Callable[[], SinkError] = lambda: TransientError("injected failure", code="TEST-1")
        self._down: SinkError | None = None
        self._reject: Callable[[TagValue], bool] | None = None
        self._reject_code = ("TEST-ROW", "rejected by test predicate")
        self._gate = threading.Event()
        self._gate.set()
        self.blocked = threading.Event()  # set while a write waits at the gate
        self.delay = 0.0
        self.write_calls = 0
        self.probe_calls = 0
        self.commits = 0
        self.opened = False

    # -- fault controls ----------------------------------------------------

    def fail_times(self, n: int, error: Callable[[], SinkError] | None = None) -> None:
        """The next `n` writes raise `error()` (a TransientError by default)."""
        with self._lock:
            self._fail_next = n
            if error is not None:
                self._fail_error = error

    def go_down(self, error: SinkError | None = None) -> None:
        """Every open, write and probe fails until `come_up()`."""
        self._down = error or TransientError("database down (injected)", code="TEST-DOWN")

    def come_up(self) -> None:
        self._down = None

    def reject_if(self, predicate: Callable[[TagValue], bool] | None,
                  code: str = "TEST-ROW", message: str = "rejected by test predicate") -> None:
        """Rows matching `predicate` are rejected one by one; the rest commit."""
        self._reject = predicate
        self._reject_code = (code, message)

    def block(self) -> None:
        """Writes wait (holding their batch) until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # -- Sink --------------------------------------------------------------

    def describe(self) -> str:
        return f"memory ({self.inner.describe()})" if self.inner else "memory"

    def open(self) -> None:
        if self._down:
            raise self._down
        if self.inner:
            self.inner.open()
        self.opened = True

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        with self._lock:
            self.write_calls += 1
            fail = self._fail_next > 0
            if fail:
                self._fail_next -= 1
        if not self._gate.is_set():
            self.blocked.set()
            self._gate.wait()
            self.blocked.clear()
        if self.delay:
            time.sleep(self.delay)
        if self._down:
            raise self._down
        if fail:
            raise self._fail_error()
        rejected: list[RowError] = []
        keep: list[tuple[int, TagValue]] = []
        for i, row in enumerate(rows):
            if self._reject is not None and self._reject(row):
                rejected.append(RowError(i, *self._reject_code))
            else:
                keep.append((i, row))
        if self.inner is not None:
            result = self.inner.write_batch([row for _, row in keep])
            # map the inner sink's row indexes back to this batch's
            rejected += [RowError(keep[e.index][0], e.code, e.message) for e in result.rejected]
            rejected.sort(key=lambda e: e.index)
            written, duplicates = result.written, result.duplicates
        else:
            written = duplicates = 0
            with self._lock:
                for _, row in keep:
                    key = (row.tag, row.ts_us)
                    if key in self.rows:
                        duplicates += 1
                    else:
                        self.rows[key] = row
                        written += 1
        with self._lock:
            self.commits += 1
        return WriteResult(written, duplicates, rejected)

    def probe(self) -> None:
        with self._lock:
            self.probe_calls += 1
        if self._down:
            raise self._down
        if self.inner:
            self.inner.probe()

    def close(self) -> None:
        if self.inner:
            self.inner.close()

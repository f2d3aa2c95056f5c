"""The boundary between sources and the pipeline: what a source may ask of the place it hands values to.

Sources depend on this module, never on `tagwriter.pipeline`; `Pipeline`
implements `Intake` without importing any source.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from tagwriter.models import PollingData, TagValue
from tagwriter.settle import Receipt

#: (where, why, raw text) of one input that could not be taken, as kept in quarantine.
BadInput = tuple[str, str, str]


class Stoppable(Protocol):
    def stop(self, timeout: float) -> bool:
        """End within `timeout` seconds, handing over what is held; True if done in time."""
        ...


class Intake(Protocol):
    """Where a source hands its values. Thread-safe; `Pipeline` implements it."""

    @property
    def capacity(self) -> int:
        """How many values the buffer holds at most."""
        ...

    @property
    def running(self) -> bool:
        """True while values are accepted (`submit` raises PipelineStopped once not)."""
        ...

    def submit(self, data: PollingData | Iterable[TagValue], *, cursor: tuple[str, str] | None = None) -> Receipt:
        """Take one polling group (or rows); the receipt is false if some were dropped (counted) by the
        overflow policy, and says when the values are settled (`Receipt.on_settled`, `Receipt.wait`).

        `cursor` (key, position): with a disk queue, stored atomically with these values, so a source
        restarted after a crash resumes after the last durable position (`resume_point`).
        """
        ...

    def resume_point(self, key: str) -> str | None:
        """The last durable `cursor` position stored under `key`; None without one (or in memory)."""
        ...

    def wait_for_room(self, n: int, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Wait until `n` values (at most `capacity`) fit without overflow; False on `stop` or timeout."""
        ...

    def spool_rows(self, rows: Sequence[TagValue]) -> int:
        """Take rows straight into the spool, past the buffer (a source stopping while it holds them)."""
        ...

    def quarantine_input(self, bad: Sequence[BadInput]) -> int:
        """Count and keep inputs that could not be taken; returns how many were kept."""
        ...

    def attach(self, source: Stoppable) -> None:
        """Have `stop()` of the intake stop `source` first (so what it holds is handed over)."""
        ...

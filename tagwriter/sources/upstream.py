"""The upstream queue adapter: how an existing polling loop hands `PollingData` over.

    consumer = QueueConsumer(polls).start(pipeline)   # a thread submits what is put on `polls`
    polls.put(PollingData("line1", ts, {...}))
    polls.put(None)                                   # optional: the consumer ends after this

`pipeline.stop()` stops the consumer first, after it has submitted what is
still queued.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any, cast

from tagwriter.errors import PipelineStopped
from tagwriter.intake import Intake
from tagwriter.models import PollingData

log = logging.getLogger(__name__)

_END = object()  # put by stop(): everything queued before it is submitted first


class QueueConsumer:
    """Submits every `PollingData` put on an upstream `queue.Queue` until `None` or `stop()`."""

    def __init__(self, source: queue.Queue[PollingData | None]) -> None:
        self.source = source
        self.name = "queue"
        self._thread = threading.Thread(target=self._run, name="tagwriter-queue", daemon=True)
        self._intake: Intake | None = None
        self.consumed = 0
        self.rejected = 0  # items refused by submit (bad tag names), kept in quarantine

    def start(self, intake: Intake) -> QueueConsumer:
        """Start the consumer thread; `intake.stop()` will stop it first."""
        self._intake = intake
        intake.attach(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        intake = self._intake
        assert intake is not None
        while True:
            item: Any = self.source.get()  # woken by an item, None, or stop()'s end marker
            if item is None or item is _END:
                return
            try:
                intake.submit(item)
            except PipelineStopped:
                log.error("queue consumer: pipeline stopped with values still queued")
                return
            except (ValueError, TypeError) as exc:  # a bad item: keep it in quarantine, go on
                self.rejected += 1
                where = f"queue item {self.consumed + self.rejected}"
                log.error("%s: %s (kept in quarantine)", where, exc)
                intake.quarantine_input([(where, str(exc), repr(item))])
                continue
            self.consumed += 1

    def stop(self, timeout: float) -> bool:
        """Submit what is queued, then end; True if done within `timeout`."""
        if self._thread.is_alive():
            # The end marker goes behind what is queued, so that is submitted first.
            with contextlib.suppress(queue.Full):
                self.source.put(cast(PollingData, _END), timeout=max(0.0, timeout))
        if self._thread.ident is not None:
            self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

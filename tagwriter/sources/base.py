"""What the service sees of a source (`Source`, `SourceStatus`); what a source sees of the pipeline is
`tagwriter.intake.Intake`.

A plant source (MQTT, OPC UA, NATS JetStream, Modbus) acknowledges upstream
only when the values it submitted are settled: `intake.submit(...)` hands back
a `tagwriter.settle.Receipt`, and `receipt.on_settled(ack)` calls `ack` once
they are durable (disk queue) or written/spooled (memory). The callback runs on
a tagwriter thread and must not block: an asyncio client hands it to its loop
with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from tagwriter.intake import Intake


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """One look at a source, for the panel, `status` and `/metrics`. Counters count since start."""

    kind: str  # "mqtt", "opcua", ...
    endpoint: str = ""  # where it reads from, for people (no password)
    connected: bool = True
    messages: int = 0  # messages (or polls) received
    values: int = 0  # values submitted from them
    last_message_age: float | None = None  # seconds since the last message; None before the first
    acks_pending: int = 0  # messages received and not yet acknowledged upstream
    redeliveries: int = 0  # messages the upstream sent again (MQTT DUP, JetStream num_delivered > 1)
    reconnects: int = 0
    bad_messages: int = 0  # kept in quarantine with their raw payload and where they came from
    lag: int | None = None  # messages waiting upstream (JetStream num_pending); None where unknown
    detail: str = ""  # the last error or state change, for people


class Source(Protocol):
    """A producer of values. `run` blocks on the service's source thread until the input ends or `stop` is set."""

    name: str

    def run(self, intake: Intake, stop: threading.Event) -> None: ...


class ReportingSource(Source, Protocol):
    """A source that can say how it is doing (the plant sources do)."""

    def status(self) -> SourceStatus: ...

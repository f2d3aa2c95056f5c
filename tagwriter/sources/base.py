"""What the service sees of a source (`Source`); what a source sees of the pipeline is `tagwriter.intake.Intake`."""

from __future__ import annotations

import threading
from typing import Protocol

from tagwriter.intake import Intake


class Source(Protocol):
    """A producer of values. `run` blocks on the service's source thread until the input ends or `stop` is set."""

    name: str

    def run(self, intake: Intake, stop: threading.Event) -> None: ...

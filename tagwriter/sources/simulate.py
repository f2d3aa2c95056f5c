"""Simulated polling: groups of tags polled on an interval, like a real collector."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tagwriter.config import SourceConfig
from tagwriter.errors import PipelineStopped
from tagwriter.intake import Intake
from tagwriter.models import PollingData, to_epoch_us

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Simulator:
    """Produces `PollingData` for `groups` x `tags_per_group` tags every `interval`.

    Deterministic for a given `seed` (>= 0) and start time.
    """

    groups: int = 10
    tags_per_group: int = 100
    interval: float = 1.0
    value_shape: str = "sine"
    quality: int = 192
    bad_quality_pct: float = 0.0
    seed: int = -1

    @classmethod
    def from_config(cls, c: SourceConfig) -> Simulator:
        return cls(c.groups, c.tags_per_group, c.interval, c.value_shape, c.quality,
                   c.bad_quality_pct, c.seed)

    @property
    def rate(self) -> float:
        """Values per second this simulator offers."""
        return self.groups * self.tags_per_group / self.interval

    def tag_names(self) -> list[list[str]]:
        return [[f"plant.g{g:03d}.t{t:04d}" for t in range(self.tags_per_group)]
                for g in range(self.groups)]

    def polls(self, start: float, count: int | None = None) -> Iterator[PollingData]:
        """Polls in time order from epoch second `start`, one group after another.

        Each group is polled at `start + k * interval` (groups are staggered
        evenly within the interval); `count` polls in all (None = endless).
        """
        rng = random.Random(self.seed if self.seed >= 0 else None)
        names = self.tag_names()
        state = [[rng.uniform(0, 100) for _ in g] for g in names]
        produced = 0
        k = 0
        while count is None or produced < count:
            for g, tags in enumerate(names):
                if count is not None and produced >= count:
                    return
                ts = start + k * self.interval + g * self.interval / self.groups
                values = self._values(rng, tags, state[g], ts - start)  # time since start: --seed repeats
                quality = 0 if rng.random() * 100 < self.bad_quality_pct else self.quality
                # Round once so every value of the group shares one exact timestamp.
                yield PollingData(f"g{g:03d}", to_epoch_us(ts) / 1_000_000, values, quality)
                produced += 1
            k += 1

    def _values(self, rng: random.Random, tags: list[str], state: list[float], t: float) -> dict[str, float]:
        shape = self.value_shape
        if shape == "constant":
            return dict(zip(tags, state, strict=True))
        if shape == "random":
            return {t: rng.uniform(0, 100) for t in tags}
        if shape == "random-walk":
            for i in range(len(state)):
                state[i] += rng.gauss(0, 1)
            return dict(zip(tags, state, strict=True))
        phase = t / 60
        return {t: base + 10 * math.sin(phase + i) for i, (t, base) in enumerate(zip(tags, state, strict=True))}


def run_paced(
    sim: Simulator,
    submit: Callable[[PollingData], object],
    stop: threading.Event,
    *,
    duration: float | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Submit polls at their real times until `stop` is set or `duration` passes.

    Returns the number of polls submitted. Polls whose time has come are
    submitted at once (catch-up), so a slow submit does not shift the schedule.
    """
    start = clock()
    end = start + duration if duration is not None else math.inf
    n = 0
    for poll in sim.polls(start):
        assert isinstance(poll.ts, float)
        due = poll.ts
        if due >= end:
            break
        wait = due - clock()
        if wait > 0 and stop.wait(wait):
            break
        if stop.is_set():
            break
        submit(poll)
        n += 1
    return n


class SimulatedSource:
    """The simulator as a `Source`: polls in real time until stopped, or for `duration` seconds."""

    def __init__(self, sim: Simulator, *, duration: float | None = None) -> None:
        self.sim = sim
        self.duration = duration
        self.name = f"simulate ({sim.groups} groups x {sim.tags_per_group} tags every {sim.interval:g}s)"
        self.polls = 0

    def run(self, intake: Intake, stop: threading.Event) -> None:
        def submit(poll: PollingData) -> None:
            try:
                intake.submit(poll)
            except PipelineStopped:
                stop.set()

        sim = self.sim
        log.info("simulating %d groups x %d tags every %gs (%s values/s)",
                 sim.groups, sim.tags_per_group, sim.interval, f"{sim.rate:,.0f}")
        self.polls = run_paced(sim, submit, stop, duration=self.duration)

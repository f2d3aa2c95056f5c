"""`tagwriter load-test`: synthetic polling load through the real `Pipeline`, measured by its `Metrics`.

One *trial* runs the simulator (`sources.simulate`) paced in real time into a
fresh `Pipeline` for `warmup + duration` seconds. Every figure comes from the
pipeline's `Metrics` (snapshots and the cumulative end-to-end latency
histogram), as the live panel shows them; the warmup is excluded by taking
differences between a snapshot at the end of the warmup and one at the end of
the run. `find_max_rate` searches, within a time budget, for the highest rate
at which the thresholds still hold: from an unthrottled probe's throughput
(`run_probe`), confirmed by a paced trial at that rate, stepping down only if
it fails; or from a given start rate, doubling, then bisecting.

Shared by the CLI command, CI reports (`report_dict`, validated against
`report_schema.json`) and tests.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from tagwriter._version import __version__
from tagwriter.bounded import close_bounded, run_bounded
from tagwriter.config import Config, DatabaseConfig, parse_url
from tagwriter.errors import TagwriterError
from tagwriter.metrics import LATENCY_BOUNDS, LatencyHistogram, MetricsSnapshot
from tagwriter.pipeline import Pipeline
from tagwriter.redact import redact_tree, redact_url
from tagwriter.service import Service
from tagwriter.sinks import Sink, create_sink
from tagwriter.sinks.base import AdminSink
from tagwriter.sources.simulate import SimulatedSource, Simulator

log = logging.getLogger(__name__)

#: The reference plant: 10 groups x 100 tags polled every second = 1,000 values/s.
PRESETS: dict[str, tuple[int, int, float]] = {"plant": (10, 100, 1.0)}
#: Seconds between buffer-utilization samples; each wake-up costs ~0.15 ms of the CPU a trial counts.
SAMPLE_INTERVAL = 0.25
KEEP_UP_RATIO = 0.95  # a rate is *sustained* (for --rate max) only if this share of it was written
#: Values/s the unthrottled probe offers: far beyond any database, so the simulator submits as fast as it
#: can and the pipeline's own throughput is what gets measured.
PROBE_RATE = 10_000_000.0
PROBE_WARMUP = 0.5  # seconds the probe runs before measuring (the table created, the first batches in)
#: Seconds a trial measures before a full buffer may end it (`give_up_pct`): enough for its achieved rate
#: to guide the next trial.
GIVE_UP_AFTER = 1.0
MEMORY_METHOD = "ru_maxrss: peak resident set size of the whole process since it started (interpreter included)"
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")


# -- settings ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadShape:
    """The simulated plant: `groups` x `tags_per_group` tags polled every `interval` seconds."""

    groups: int
    tags_per_group: int
    interval: float

    @property
    def rate(self) -> float:
        return self.groups * self.tags_per_group / self.interval

    @classmethod
    def for_rate(cls, rate: float, groups: int | None = None, tags_per_group: int | None = None) -> LoadShape:
        """A shape offering `rate` values/s: 10 groups of 100 tags unless given, interval at most
        ~1 s (fewer tags per group for low rates, so a short run still sees many polls)."""
        if not rate > 0:
            raise ValueError("rate must be positive")
        g = groups or 10
        t = tags_per_group or 100
        if tags_per_group is None and g * t / rate > 1.0:
            t = max(1, round(rate / g))
        return cls(g, t, g * t / rate)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What a passing run must show. `min_throughput` None = not checked."""

    max_p99_latency_s: float = 2.0
    max_buffer_pct: float = 80.0
    min_throughput: float | None = None
    max_dropped: int = 0


@dataclass(frozen=True, slots=True)
class Violation:
    """One threshold not met: `option` names it, `actual` vs `limit` in `unit`."""

    option: str
    what: str
    actual: float
    limit: float
    unit: str
    above: bool  # True: the limit is a maximum

    @property
    def by(self) -> float:
        return self.actual - self.limit if self.above else self.limit - self.actual

    @property
    def message(self) -> str:
        rel = f", {100 * self.by / self.limit:.0f}%" if self.limit else ""
        word = "above" if self.above else "below"
        return (f"{self.option}: {self.what} {_fmt(self.actual, self.unit)} is {word} the limit "
                f"{_fmt(self.limit, self.unit)} by {_fmt(self.by, self.unit)}{rel}")

    def as_dict(self) -> dict[str, Any]:
        return {"option": self.option, "what": self.what, "actual": self.actual, "limit": self.limit,
                "unit": self.unit, "by": self.by, "message": self.message}


def _fmt(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x:.3g} s"
    if unit == "%":
        return f"{x:.1f}%"
    if unit == "values/s":
        return f"{x:,.0f} values/s"
    return f"{x:,.0f} {unit}".rstrip()


# -- one trial ----------------------------------------------------------------


@dataclass(slots=True)
class TrialResult:
    """The figures of one run. Window figures exclude the warmup; counts cover the whole run."""

    shape: LoadShape
    duration_s: float
    warmup_s: float
    window_s: float = 0.0
    submitted_per_s: float = 0.0
    achieved_per_s: float = 0.0
    latency_values: int = 0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0
    latency_p99_s: float = 0.0
    latency_max_s: float = 0.0
    latency_max_exact: bool = True
    buffer_capacity: int = 0
    buffer_max_pct: float = 0.0
    buffer_mean_pct: float = 0.0
    buffer_samples: int = 0
    batches: int = 0
    batch_size_avg: float = 0.0
    write_latency_avg_5m_s: float = 0.0
    write_latency_p99_5m_s: float = 0.0
    batches_failed: int = 0
    retries: int = 0
    cpu_s: float = 0.0
    cpu_s_per_1000_values: float = 0.0
    sampler_cpu_s: float = 0.0  # of cpu_s: the load test's own buffer sampler (not there in `tagwriter run`)
    peak_memory_bytes: int | None = None
    final: MetricsSnapshot | None = None
    stopped_cleanly: bool = True
    fatal_error: str = ""
    end_state: str = ""  # the writer's state at the end of the measured window (before stopping)
    end_error: str = ""

    @property
    def offered_per_s(self) -> float:
        return self.shape.rate

    @property
    def keeps_up(self) -> bool:
        return self.achieved_per_s >= KEEP_UP_RATIO * self.offered_per_s

    def figures(self) -> dict[str, Any]:
        """Every figure as plain JSON-able data."""
        f = self.final
        counts: dict[str, Any] = {}
        if f is not None:
            counts = {k: getattr(f, k) for k in (
                "submitted", "written", "duplicates", "spooled", "quarantined", "dropped", "pending")}
            counts["dropped_by_reason"] = dict(f.dropped_by_reason)
            counts["adds_up"] = f.submitted == f.accounted
        return {
            "offered_per_s": self.offered_per_s,
            "submitted_per_s": self.submitted_per_s,
            "achieved_per_s": self.achieved_per_s,
            "keeps_up": self.keeps_up,
            "window_s": self.window_s,
            "latency": {"values": self.latency_values, "p50_s": self.latency_p50_s, "p95_s": self.latency_p95_s,
                        "p99_s": self.latency_p99_s, "max_s": self.latency_max_s,
                        "max_exact": self.latency_max_exact},
            "buffer": {"capacity": self.buffer_capacity, "max_pct": self.buffer_max_pct,
                       "mean_pct": self.buffer_mean_pct, "samples": self.buffer_samples,
                       "sample_interval_s": SAMPLE_INTERVAL},
            "batches": {"written": self.batches, "size_avg": self.batch_size_avg,
                        "write_latency_avg_5m_s": self.write_latency_avg_5m_s,
                        "write_latency_p99_5m_s": self.write_latency_p99_5m_s,
                        "failed": self.batches_failed, "retries": self.retries},
            "counts": counts,
            "cpu": {"seconds": self.cpu_s, "seconds_per_1000_values": self.cpu_s_per_1000_values,
                    "sampler_seconds": self.sampler_cpu_s,
                    "method": "time.process_time (all threads: simulator, pipeline, driver)"},
            "memory": {"peak_bytes": self.peak_memory_bytes, "method": MEMORY_METHOD},
            "final_state": self.end_state or (f.state if f is not None else ""),
            "fatal_error": self.fatal_error,
            "stopped_cleanly": self.stopped_cleanly,
            "metrics": _finite(f.as_dict()) if f is not None else {},
        }


def histogram_since(now: LatencyHistogram, before: LatencyHistogram) -> LatencyHistogram:
    """The values recorded in `now` but not yet in `before` (a copy taken earlier).

    The maximum is exact when it was set after `before`; otherwise it is the
    upper bound of the highest bucket that grew (capped at the overall max).
    """
    diff = LatencyHistogram()
    diff.counts = [a - b for a, b in zip(now.counts, before.counts, strict=True)]
    diff.total = now.total - before.total
    diff.sum = now.sum - before.sum
    if now.max > before.max:
        diff.max = now.max
    else:
        top = max((i for i, c in enumerate(diff.counts) if c), default=None)
        diff.max = 0.0 if top is None else min(now.max, LATENCY_BOUNDS[top] if top < len(LATENCY_BOUNDS) else now.max)
    return diff


def peak_memory_bytes() -> int | None:
    """The process's peak RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (AttributeError, OSError):  # pragma: no cover - not on this platform
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Sampler:
    """Samples the buffer utilization (`pipeline.buffer_fill()`) every SAMPLE_INTERVAL seconds;
    sets `over` once a sample is above `give_up_pct` (None: never) after GIVE_UP_AFTER seconds.

    It also looks at `watch` (the trial's stop event) at each sample, and sets `ended` when that is
    set or `over` is: the trial waits on `ended` alone, with no wake-ups of its own.
    """

    def __init__(
        self, pipeline: Pipeline, give_up_pct: float | None = None, watch: threading.Event | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.give_up_pct = give_up_pct
        self.watch = watch
        self.stop = threading.Event()
        self.over = threading.Event()
        self.ended = threading.Event()
        self.samples: list[float] = []
        self.cpu_s = 0.0  # this thread's CPU time so far (its share of what the trial measures)
        self._thread = threading.Thread(target=self._run, name="tagwriter-loadtest-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        give_up_from = time.monotonic() + GIVE_UP_AFTER
        cpu0 = time.thread_time()
        while True:
            size, capacity = self.pipeline.buffer_fill()  # (not a whole snapshot: the sampler must cost ~nothing)
            pct = 100.0 * size / capacity if capacity else 0.0
            self.samples.append(pct)
            if self.give_up_pct is not None and pct > self.give_up_pct and time.monotonic() >= give_up_from:
                self.over.set()
            if self.over.is_set() or (self.watch is not None and self.watch.is_set()):
                self.ended.set()
            self.cpu_s = time.thread_time() - cpu0
            if self.stop.wait(SAMPLE_INTERVAL):
                return

    def finish(self) -> list[float]:
        self.stop.set()
        self._thread.join(2.0)
        return self.samples


def run_trial(
    config: Config, shape: LoadShape, *, duration: float, warmup: float,
    sink_factory: Callable[[], Sink] | None = None, stop: threading.Event | None = None,
    seed: int = 1, give_up_pct: float | None = None,
) -> TrialResult:
    """Run `shape` through a fresh Pipeline for `warmup + duration` s; measure the last `duration` s.

    `stop` (optional) ends the run early; so does a buffer fuller than
    `give_up_pct` after GIVE_UP_AFTER s of measuring (the trial has failed: the
    max search saves its budget). The pipeline is always stopped (within
    writer.shutdown_timeout) before this returns.
    """
    stop = stop or threading.Event()
    result = TrialResult(shape, duration, warmup, buffer_capacity=config.buffer.capacity)
    sink = sink_factory() if sink_factory is not None else None
    sim = Simulator(shape.groups, shape.tags_per_group, shape.interval, seed=seed)
    service = Service(config, SimulatedSource(sim, duration=warmup + duration + 1.0), sink=sink)
    pipeline = service.pipeline
    sampler = _Sampler(pipeline, give_up_pct, stop)
    service.start()
    try:
        t0 = time.monotonic()
        stop.wait(warmup)
        before = pipeline.snapshot()
        hist0 = pipeline.latency_histogram()
        cpu0, t_start = time.process_time(), time.monotonic()
        sampler.start()
        end = t0 + warmup + duration
        # One wait to the end: `stop` and a give-up reach it through the sampler (each wake-up costs CPU the
        # trial measures).
        while not (stop.is_set() or sampler.ended.is_set()) and (left := end - time.monotonic()) > 0:
            sampler.ended.wait(left)
        after = pipeline.snapshot()
        hist1 = pipeline.latency_histogram()
        cpu1, t_end = time.process_time(), time.monotonic()
        samples = sampler.finish()
        result.sampler_cpu_s = sampler.cpu_s
    finally:
        sampler.stop.set()
        result.stopped_cleanly = bool(service.stop())
    if service.source.error is not None:
        log.error("load-test source failed: %r", service.source.error)
    fatal = pipeline.fatal_error  # kept after a recovery
    result.fatal_error = str(fatal) if fatal is not None else ""
    result.final = pipeline.snapshot()
    _measure(result, before, after, histogram_since(hist1, hist0), samples, t_end - t_start, cpu1 - cpu0)
    result.latency_max_exact = result.latency_values == 0 or hist1.max > hist0.max
    return result


def run_probe(
    config: Config, *, duration: float, warmup: float = PROBE_WARMUP, groups: int | None = None,
    sink_factory: Callable[[], Sink] | None = None, stop: threading.Event | None = None,
) -> TrialResult:
    """The pipeline's throughput unthrottled: the simulator offers PROBE_RATE (it submits as fast as it
    can) and a full buffer blocks it (overflow policy `block`: nothing spilled), so the achieved
    rate is what the writer and database take with the source competing for the CPU. An upper
    bound of a paced rate: pacing costs wake-ups a free run does not.

    Its latency and buffer figures mean nothing (the buffer is full by design).
    """
    blocking = config.replace(buffer=dataclasses.replace(config.buffer, overflow_policy="block"))
    shape = LoadShape.for_rate(PROBE_RATE, groups, None)
    return run_trial(blocking, shape, duration=duration, warmup=warmup, sink_factory=sink_factory, stop=stop)


def _committed(s: MetricsSnapshot) -> int:
    return s.written + s.duplicates + s.quarantined


def _measure(
    r: TrialResult, before: MetricsSnapshot, after: MetricsSnapshot, latency: LatencyHistogram,
    samples: list[float], window: float, cpu: float,
) -> None:
    r.window_s = window
    r.end_state, r.end_error = after.state, after.last_error
    committed = _committed(after) - _committed(before)
    r.submitted_per_s = (after.submitted - before.submitted) / window if window > 0 else 0.0
    r.achieved_per_s = committed / window if window > 0 else 0.0
    r.latency_values = latency.total
    r.latency_p50_s = latency.percentile(50)
    r.latency_p95_s = latency.percentile(95)
    r.latency_p99_s = latency.percentile(99)
    r.latency_max_s = latency.max
    r.buffer_samples = len(samples)
    r.buffer_max_pct = max(samples, default=0.0)
    r.buffer_mean_pct = sum(samples) / len(samples) if samples else 0.0
    r.batches = after.batches_ok - before.batches_ok
    r.batch_size_avg = committed / r.batches if r.batches else 0.0
    r.write_latency_avg_5m_s = after.avg_write_latency_5m_s
    r.write_latency_p99_5m_s = after.p99_write_latency_5m_s
    final = r.final or after
    r.batches_failed = final.batches_failed
    r.retries = final.retries
    r.cpu_s = cpu
    r.cpu_s_per_1000_values = 1000.0 * cpu / committed if committed else 0.0
    r.peak_memory_bytes = peak_memory_bytes()


# -- thresholds ---------------------------------------------------------------


def violations(r: TrialResult, t: Thresholds, *, throughput: float | None = None) -> list[Violation]:
    """Each threshold `r` breaks. `throughput` replaces the achieved rate (the max search's result)."""
    out: list[Violation] = []
    if r.latency_p99_s > t.max_p99_latency_s:
        out.append(Violation("--max-p99-latency", "end-to-end latency p99", r.latency_p99_s,
                             t.max_p99_latency_s, "s", True))
    if r.buffer_max_pct > t.max_buffer_pct:
        out.append(Violation("--max-buffer-pct", "buffer utilization max", r.buffer_max_pct,
                             t.max_buffer_pct, "%", True))
    achieved = r.achieved_per_s if throughput is None else throughput
    if t.min_throughput is not None and achieved < t.min_throughput:
        what = "max sustained rate" if throughput is not None else "achieved throughput"
        out.append(Violation("--min-throughput", what, achieved, t.min_throughput, "values/s", False))
    dropped = r.final.dropped if r.final is not None else 0
    if dropped > t.max_dropped:
        out.append(Violation("--max-dropped", "values dropped", dropped, t.max_dropped, "values", True))
    return out


def problems(r: TrialResult) -> list[str]:
    """What went wrong besides thresholds: a database that took nothing, values not settled."""
    out: list[str] = []
    if r.fatal_error:
        out.append(f"the database refused writes: {r.fatal_error}")
    f = r.final
    if f is not None:
        if r.end_state in ("outage", "failed") or (f.submitted and not _committed(f)):
            state = r.end_state or f.state
            out.append(f"the database took no values or went away (state {state}: "
                       f"{r.end_error or f.last_error or 'no error'})")
        if f.submitted != f.accounted or f.pending:
            out.append(f"values unaccounted for: submitted {f.submitted}, accounted {f.accounted}, "
                       f"pending {f.pending}")
    if not r.stopped_cleanly:
        out.append("the pipeline did not stop cleanly (values could not be spooled)")
    return out


# -- the max-rate search ---------------------------------------------------------


@dataclass(slots=True)
class Search:
    """The --rate max search: every trial (rate, passed, why not) and the best sustained rate."""

    budget_s: float
    trials: list[tuple[TrialResult, list[str]]] = field(default_factory=list)
    best: TrialResult | None = None
    elapsed_s: float = 0.0
    probe: TrialResult | None = None  # the unthrottled probe, if the search started from one

    @property
    def max_rate(self) -> float:
        return self.best.offered_per_s if self.best is not None else 0.0

    @property
    def ceiling(self) -> float | None:
        """The probe's throughput, the highest rate the search tries; None without a probe (or if it wrote nothing)."""
        return self.probe.achieved_per_s if self.probe is not None and self.probe.achieved_per_s >= 1 else None

    @property
    def bounded(self) -> bool:
        """True if a higher rate failed or the probe bounds it: `max_rate` is the ceiling, not just a
        lower bound the budget allowed."""
        if self.best is not None and self.ceiling is not None:
            return True
        return any(why and t.offered_per_s > self.max_rate for t, why in self.trials)

    def as_dict(self) -> dict[str, Any]:
        probe = self.probe
        return {
            "budget_s": self.budget_s, "elapsed_s": self.elapsed_s, "max_sustained_per_s": self.max_rate,
            "bounded": self.bounded,
            "probe": None if probe is None else {
                "offered_per_s": probe.offered_per_s, "achieved_per_s": probe.achieved_per_s,
                "window_s": probe.window_s, "problems": problems(probe)},
            "criterion": (f"thresholds on latency, buffer and drops hold, no problem, and at least "
                          f"{KEEP_UP_RATIO:.0%} of the offered rate is written"),
            "trials": [{"offered_per_s": t.offered_per_s, "achieved_per_s": t.achieved_per_s,
                        "latency_p99_s": t.latency_p99_s, "buffer_max_pct": t.buffer_max_pct,
                        "passed": not why, "why_not": why} for t, why in self.trials],
        }


def trial_failures(r: TrialResult, t: Thresholds) -> list[str]:
    """Why `r` does not count as sustained (empty = it does); min_throughput is not a trial criterion."""
    why = [v.message for v in violations(r, dataclasses.replace(t, min_throughput=None))]
    why += problems(r)
    if not r.keeps_up:
        why.append(f"wrote {r.achieved_per_s:,.0f} of {r.offered_per_s:,.0f} values/s offered "
                   f"(below {KEEP_UP_RATIO:.0%})")
    return why


def find_max_rate(
    run: Callable[[float], TrialResult], thresholds: Thresholds, *, budget_s: float,
    start_rate: float = 1000.0, probe: Callable[[], TrialResult] | None = None, precision: float = 0.1,
    stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
) -> Search:
    """The highest rate whose trial passes, within `budget_s` seconds. `run(rate)` runs one trial.

    With `probe` (an unthrottled run, `run_probe`, counted in the budget): the
    first trial confirms the probe's throughput; nothing above it can pass, so a
    pass ends the search; a failure steps down (`_step_down`), then bisects.
    Without (or if the probe wrote nothing): double from `start_rate` while
    trials pass, then bisect between the last pass and the first failure. Either
    way until they are within `precision` (relative) or another trial would
    exceed the budget.
    """
    search = Search(budget_s)
    started = clock()
    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate (or the probe's ceiling)
    rate = start_rate
    if probe is not None:
        search.probe = probe()
        if search.ceiling is not None:
            rate = hi = search.ceiling
    trial_time = 0.0
    while not (stop and stop.is_set()):
        if search.trials and clock() - started + trial_time > budget_s:
            break
        t0 = clock()
        result = run(rate)
        trial_time = clock() - t0
        why = trial_failures(result, thresholds)
        search.trials.append((result, why))
        if not why:
            lo = rate
            if search.best is None or rate > search.best.offered_per_s:
                search.best = result
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            rate *= 2
        elif lo is None:
            rate = _step_down(rate, result, precision) if search.ceiling else rate / 2
            if rate < 1.0:
                break
        elif hi / lo - 1.0 <= precision:
            break
        else:
            rate = (lo + hi) / 2
    search.elapsed_s = clock() - started
    return search


def _step_down(rate: float, failed: TrialResult, precision: float) -> float:
    """The next rate below a failed one: `precision` lower, or lower still if the trial wrote much less
    (a rate it kept up with, by the KEEP_UP_RATIO rule), but at least half of it."""
    return max(rate / 2, min(rate * (1 - precision), failed.achieved_per_s * KEEP_UP_RATIO))


# -- environment and the report ------------------------------------------------


def database_version(db: DatabaseConfig, timeout: float = 10.0) -> str:
    """The server's version, asked on a connection of its own (bounded); 'unknown: ...' on error."""
    try:
        sink = create_sink(db)
    except TagwriterError as exc:
        return f"unknown: {exc}"
    if not isinstance(sink, AdminSink):
        return "unknown"
    try:
        return run_bounded(sink.server_version, timeout, "server version")
    except TagwriterError as exc:
        return f"unknown: {exc.message}"
    except Exception as exc:  # a driver error a sink did not classify
        return f"unknown: {exc!r}"
    finally:
        close_bounded(sink.close)


def environment(config: Config) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count() or 0,
        "tagwriter": __version__,
        "database_kind": parse_url(config.database.url).kind,
        "database_version": database_version(config.database),
        "database": redact_url(config.database.url),
        "table": config.database.table,
    }


def scratch_config(
    config: Config, workdir: Path, *, database: str | None = None, db_name: str = "load-test.db",
) -> tuple[Config, bool]:
    """`config` for a test run: spool and quarantine under `workdir`, no metrics endpoint; the database is `database`,
    else the configured one, else (still the built-in default) a temporary SQLite file.

    Returns the config and whether the database is the temporary file.
    """
    url = database or config.database.url
    temporary = database is None and config.database.url == DatabaseConfig().url
    if temporary:
        url = f"sqlite:///{workdir / db_name}"
    backup = dataclasses.replace(config.backup, directory=str(workdir / "backup"),
                                 quarantine_directory=str(workdir / "backup" / "quarantine"))
    # No HTTP endpoint: a production config's metrics.port may be taken by the running instance.
    metrics = dataclasses.replace(config.metrics, port=0)
    target = dataclasses.replace(config.database, url=url)
    return config.replace(database=target, backup=backup, metrics=metrics), temporary


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report_dict(
    *, config: Config, result: TrialResult, thresholds: Thresholds, mode: str,
    env: dict[str, Any], search: Search | None = None, temporary_database: bool = False,
) -> dict[str, Any]:
    """The full load-test report (see report_schema.json); every text in it redacted."""
    throughput = search.max_rate if search is not None else None
    broken = violations(result, thresholds, throughput=throughput)
    trouble = problems(result)
    if search is not None and search.best is None:
        lowest = min((t.offered_per_s for t, _ in search.trials), default=0.0)
        trouble.append(f"no rate passed: even the lowest rate tried ({lowest:,.0f} values/s) broke a threshold "
                       "or did not keep up" + ("; a longer --duration leaves time to step lower"
                                               if search.probe is not None else ""))
    shape = result.shape
    settings = {
        "mode": mode,
        "groups": shape.groups, "tags_per_group": shape.tags_per_group, "interval_s": shape.interval,
        "rate_per_s": shape.rate, "duration_s": result.duration_s, "warmup_s": result.warmup_s,
        "batch_size": config.writer.batch_size, "flush_interval_s": config.writer.flush_interval,
        "buffer_capacity": config.buffer.capacity, "overflow_policy": config.buffer.overflow_policy,
        "database": redact_url(config.database.url), "temporary_database": temporary_database,
        "thresholds": {"max_p99_latency_s": thresholds.max_p99_latency_s,
                       "max_buffer_pct": thresholds.max_buffer_pct,
                       "min_throughput_per_s": thresholds.min_throughput,
                       "max_dropped": thresholds.max_dropped},
    }
    return _finite(redact_tree({
        "command": "load-test",
        "schema_version": 1,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": not broken and not trouble,
        "settings": settings,
        "environment": env,
        "result": result.figures(),
        "violations": [v.as_dict() for v in broken],
        "problems": trouble,
        "search": search.as_dict() if search is not None else None,
    }))


# -- rendering ------------------------------------------------------------------


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) pairs: the same lines for the Rich table and the plain text."""
    r, s, e = report["result"], report["settings"], report["environment"]
    lat, buf, bat, c = r["latency"], r["buffer"], r["batches"], r["counts"]
    ms = _ms
    rows = [
        ("database", f"{e['database']} ({e['database_version']}"
                     + (", a temporary file)" if s["temporary_database"] else ")")),
        ("load", f"{s['groups']} groups x {s['tags_per_group']} tags every {s['interval_s']:.4g} s, "
                 f"{s['duration_s']:g} s after {s['warmup_s']:g} s warmup"),
        ("writer", f"batch size {s['batch_size']}, flush interval {s['flush_interval_s']:g} s, "
                   f"buffer {s['buffer_capacity']:,}"),
    ]
    if report["search"] is not None:
        srch = report["search"]
        at_least = "" if srch["bounded"] else "at least "
        probe = srch.get("probe")
        probed = f"unthrottled probe {probe['achieved_per_s']:,.0f} values/s, " if probe else ""
        rows.append(("max sustained rate", f"{at_least}{srch['max_sustained_per_s']:,.0f} values/s "
                                           f"({probed}{_trials(len(srch['trials']))} in {srch['elapsed_s']:.0f} s"
                                           + ("" if srch["bounded"] else
                                              "; no failing rate within the budget: raise --duration or "
                                              "--start-rate") + ")"))
    rows += [
        ("offered", f"{r['offered_per_s']:,.0f} values/s (submitted {r['submitted_per_s']:,.0f}/s)"),
        ("achieved", f"{r['achieved_per_s']:,.0f} values/s written"),
        ("end-to-end latency", f"p50 {ms(lat['p50_s'])}  p95 {ms(lat['p95_s'])}  p99 {ms(lat['p99_s'])}  "
                               f"max {ms(lat['max_s'])}  ({lat['values']:,} values)"),
        ("buffer", f"max {buf['max_pct']:.1f}%  mean {buf['mean_pct']:.1f}% of {buf['capacity']:,} "
                   f"({buf['samples']} samples)"),
        ("batches", f"{bat['written']:,} written, avg {bat['size_avg']:,.0f} rows, write latency avg "
                    f"{ms(bat['write_latency_avg_5m_s'])} p99 {ms(bat['write_latency_p99_5m_s'])}"),
        ("failures", f"{bat['failed']} failed batches, {bat['retries']} retries"),
    ]
    if c:
        rows.append(("values", f"submitted {c['submitted']:,} = written {c['written']:,} + duplicates "
                               f"{c['duplicates']:,} + spooled {c['spooled']:,} + quarantined {c['quarantined']:,}"
                               f" + dropped {c['dropped']:,} + pending {c['pending']:,}"
                               f" ({'adds up' if c['adds_up'] else 'DOES NOT ADD UP'})"))
    cpu = r["cpu"]["seconds_per_1000_values"]
    line = f"{cpu * 1000:.1f} ms per 1,000 values (process, all threads"
    sampler = r["cpu"].get("sampler_seconds")
    if sampler and r["cpu"]["seconds"]:
        line += f"; {cpu * 1000 * sampler / r['cpu']['seconds']:.1f} of them the load test's own buffer sampler"
    rows.append(("cpu", line + ")"))
    peak = r["memory"]["peak_bytes"]
    rows.append(("peak memory", f"{peak / 2**20:,.0f} MiB (process peak RSS, ru_maxrss)" if peak else "unknown"))
    return rows


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1000.0
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The pass/fail lines: one per violated threshold or problem."""
    lines = [f"FAIL {v['message']}" for v in report["violations"]]
    lines += [f"FAIL {p}" for p in report["problems"]]
    if not lines:
        lines = ["PASS every threshold holds"]
    return lines


def render_table(report: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in summary_rows(report):
        table.add_row(name, value)
    return table


def render_text(report: dict[str, Any], title: str) -> str:
    rows = summary_rows(report)
    width = max(len(n) for n, _ in rows)
    return "\n".join([title, *(f"{n.ljust(width)}  {v}" for n, v in rows)])

"""`tagwriter overflow-test`: prove the buffer's overflow policy on the real Pipeline.

The writer is stalled with `MemorySink.block()` in front of the real sink (a
temporary SQLite file by default), so it holds one batch in flight while the
buffer fills. Values carry their submit sequence number (as the value, and in
the timestamp), so after the sink is released and the pipeline stopped, the
survivors read back from the table (SQLite) or from the rows the sink
committed show exactly which values were evicted:

- drop-oldest: exactly the oldest were evicted (FIFO), the overflow counter
  is exact, the warning was logged and rate-limited, the 1 h overflow rate;
- spill: no value lost: the evicted (oldest) values are in the spool, read back;
- block: producers waited; past the timeout the drop count is exactly the
  timed-out values, and a producer released within the timeout loses nothing.

`--sustained SECONDS` offers a rate just above a throttled sink's capacity
and checks the metrics' 1 h overflow rate against `max_overflow_pct`.
Every figure comes from the pipeline's `Metrics` and `RingBuffer` counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from tagwriter.buffer import OverflowPolicy, RingBuffer
from tagwriter.config import Config, parse_url
from tagwriter.errors import InputError, PipelineStopped
from tagwriter.loadtest import LoadShape, environment
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import TagValue, format_ts
from tagwriter.pipeline import Pipeline
from tagwriter.redact import redact_tree, redact_url
from tagwriter.service import Service
from tagwriter.sinks import Sink, create_sink
from tagwriter.sinks.base import WriteResult
from tagwriter.sinks.memory import MemorySink
from tagwriter.sources.simulate import SimulatedSource, Simulator
from tagwriter.spoolformat import SpoolLine, read_spool

log = logging.getLogger(__name__)

TAG_PREFIX = "overflow.t"
TAGS = 100
STALL_WAIT = 10.0  # seconds to wait for the writer to reach the stalled sink
FLUSH_TIMEOUT = 120.0  # seconds to write everything after the release


@dataclass(frozen=True, slots=True)
class OverflowSettings:
    """What to test. `block_timeout` None = buffer.block_timeout of the config."""

    policy: str = "drop-oldest"
    capacity: int = 100_000
    overfill_pct: float = 10.0
    group_size: int = 1000
    block_timeout: float | None = None
    sustained_s: float | None = None
    max_overflow_pct: float = 1.0
    sink_rate: float = 10_000.0
    overload_pct: float = 10.0

    @property
    def overfill(self) -> int:
        return max(1, math.ceil(self.capacity * self.overfill_pct / 100.0))


@dataclass(slots=True)
class Check:
    """One verified property: `ok`, a one-line `detail`, and the compared figures."""

    name: str
    ok: bool
    detail: str
    expected: Any = None
    actual: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "expected": _jsonable(self.expected), "actual": _jsonable(self.actual)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (set, frozenset, range)):
        return summarize(sorted(x))
    return x


@dataclass(slots=True)
class OverflowResult:
    settings: OverflowSettings
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    sustained: dict[str, Any] | None = None
    final: MetricsSnapshot | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


# -- helpers ------------------------------------------------------------------


def sequence_rows(start: int, n: int, base_us: int) -> list[TagValue]:
    """Rows numbered start..start+n-1: the number is the value and the timestamp's offset in µs."""
    return [TagValue(f"{TAG_PREFIX}{seq % TAGS:03d}", base_us + seq, float(seq), 192)
            for seq in range(start, start + n)]


def summarize(seqs: Sequence[int], limit: int = 4) -> str:
    """Sorted numbers as ranges: '500..1,499, 2,000' (at most `limit` ranges shown)."""
    ranges: list[tuple[int, int]] = []
    for s in seqs:
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    parts = [f"{a:,}" if a == b else f"{a:,}..{b:,}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more ranges)")
    return ", ".join(parts) if parts else "none"


class _Recorder:
    """Wraps the real sink; remembers the sequence numbers of the rows it committed, in order."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.committed: list[int] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        self.inner.open()

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        result = self.inner.write_batch(rows)
        rejected = {e.index for e in result.rejected}
        with self._lock:
            self.committed.extend(int(r.value or 0) for i, r in enumerate(rows)
                                  if i not in rejected and r.tag.startswith(TAG_PREFIX))
        return result

    def probe(self) -> None:
        self.inner.probe()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()


class _WarningCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "buffer full" in record.getMessage():
            self.records.append(record)


@contextlib.contextmanager
def capture_overflow_warnings() -> Iterator[_WarningCapture]:
    """Collect the buffer's overflow warnings (enabling WARNING on its logger if it was higher)."""
    logger = logging.getLogger("tagwriter.buffer")
    handler = _WarningCapture()
    old_level = logger.level
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _read_table(config: Config, base_us: int, count: int) -> set[int] | None:
    """Sequence numbers stored in the SQLite table for this run; None for other databases."""
    url = parse_url(config.database.url)
    if url.kind != "sqlite":
        return None
    d = config.database
    sql = (f'SELECT "{d.value_column}" FROM "{d.table}" WHERE "{d.tag_column}" LIKE ? '
           f'AND "{d.ts_column}" >= ? AND "{d.ts_column}" <= ?')
    conn = sqlite3.connect(url.path, timeout=d.call_timeout)
    try:
        rows = conn.execute(sql, (TAG_PREFIX + "%", format_ts(base_us), format_ts(base_us + count))).fetchall()
    finally:
        conn.close()
    return {int(v) for (v,) in rows if v is not None}


def _read_spool(pipeline: Pipeline) -> tuple[list[int], list[str]]:
    """Sequence numbers in the spool files (and bad lines, which should not exist)."""
    seqs: list[int] = []
    bad: list[str] = []
    for path in pipeline.spool_files():
        for item in read_spool(path):
            if isinstance(item, SpoolLine):
                if item.row.tag.startswith(TAG_PREFIX) and item.row.value is not None:
                    seqs.append(int(item.row.value))
            elif isinstance(item, InputError):
                bad.append(str(item))
    return seqs, bad


def config_under_test(config: Config, s: OverflowSettings) -> Config:
    """The config under test: capacity and policy from `s`, spool kept (no automatic replay)."""
    buffer = dataclasses.replace(
        config.buffer, capacity=s.capacity, overflow_policy=s.policy,
        block_timeout=s.block_timeout if s.block_timeout is not None else config.buffer.block_timeout)
    writer = dataclasses.replace(config.writer, batch_size=min(config.writer.batch_size, s.capacity),
                                 retry_delays=[])
    backup = dataclasses.replace(config.backup, auto_replay=False)
    return config.replace(buffer=buffer, writer=writer, backup=backup)


# -- the stalled-writer test -------------------------------------------------------


class _Run:
    """One pipeline with a stalled sink, and what was submitted to it."""

    def __init__(self, config: Config, s: OverflowSettings, sink: Sink, buffer_class: type[RingBuffer]) -> None:
        self.config = config
        self.s = s
        self.recorder = _Recorder(sink)
        self.gate = MemorySink(inner=self.recorder)
        self.buffer = buffer_class(s.capacity, s.policy, block_timeout=config.buffer.block_timeout)
        self.pipeline = Pipeline(config, sink=self.gate, buffer=self.buffer)
        self.base_us = int(time.time() * 1_000_000)
        self.next_seq = 0

    def submit(self, n: int) -> tuple[bool, float, range]:
        """Submit the next `n` values as one group: (all taken, seconds the call took, their numbers)."""
        seqs = range(self.next_seq, self.next_seq + n)
        rows = sequence_rows(self.next_seq, n, self.base_us)
        self.next_seq += n
        started = time.monotonic()
        taken = bool(self.pipeline.submit(rows))
        return taken, time.monotonic() - started, seqs

    def submit_groups(self, n: int) -> list[tuple[bool, float, range]]:
        out = []
        while n > 0:
            k = min(self.s.group_size, n)
            out.append(self.submit(k))
            n -= k
        return out


def run_overflow_test(
    config: Config, settings: OverflowSettings, *,
    sink_factory: Callable[[], Sink] | None = None, buffer_class: type[RingBuffer] = RingBuffer,
) -> OverflowResult:
    """Run the stalled-writer test for `settings.policy` (and the sustained variant if asked).

    `sink_factory` makes the real sink (default: from config.database);
    `buffer_class` lets a test inject a deliberately wrong buffer.
    """
    policy = OverflowPolicy(settings.policy)
    cfg = config_under_test(config, settings)
    result = OverflowResult(settings)
    make_sink = sink_factory or (lambda: create_sink(cfg.database))
    run = _Run(cfg, settings, make_sink(), buffer_class)
    with capture_overflow_warnings() as warnings:
        _stalled(run, policy, result, warnings)
    if settings.sustained_s:
        result.sustained = _sustained(cfg, settings, make_sink(), buffer_class, result)
    return result


def _stall(run: _Run, result: OverflowResult) -> tuple[int, int] | None:
    """Block the sink, start, and let the writer take one batch into the stalled write.

    Returns (values held in flight, values left in the buffer), or None if the stall failed.
    """
    run.gate.block()
    run.pipeline.start()
    batch = run.config.writer.batch_size
    run.submit(batch)
    stalled = run.gate.blocked.wait(STALL_WAIT)
    held, left = run.pipeline.snapshot().inflight, len(run.buffer)
    result.checks.append(Check(
        "writer stalled", stalled and held > 0,
        f"the writer holds {held:,} values in a blocked write; {left:,} left in the buffer" if stalled
        else f"the writer did not reach the sink within {STALL_WAIT:g} s", expected=batch, actual=held))
    return (held, left) if stalled else None


def _stalled(run: _Run, policy: OverflowPolicy, result: OverflowResult, warnings: _WarningCapture) -> None:
    s = run.s
    pipeline = run.pipeline
    try:
        stall = _stall(run, result)
        if stall is None:
            return
        held, left = stall
        queue_order = list(range(held, held + left))  # what the buffer holds now, oldest first
        started = time.monotonic()
        if policy is OverflowPolicy.BLOCK:
            expected_lost, overflowing, blocked = _block_phase(run, result, queue_order)
        else:
            fill = s.capacity - left + s.overfill
            queued, overflowing = left, 0
            for _, _, seqs in run.submit_groups(fill):
                overflowing += queued + len(seqs) > s.capacity
                queued = min(s.capacity, queued + len(seqs))
                queue_order.extend(seqs)
            expected_lost = queue_order[: max(0, len(queue_order) - s.capacity)]
            blocked = []
        elapsed = time.monotonic() - started
        during = pipeline.snapshot()
        run.gate.release()
        flushed = pipeline.flush(FLUSH_TIMEOUT)
    finally:
        run.gate.release()
        stopped = pipeline.stop()
    final = result.final = pipeline.snapshot()
    submitted = run.next_seq
    committed = run.recorder.committed
    table = _read_table(run.config, run.base_us, submitted)
    survivors = table if table is not None else set(committed)
    spooled, bad = _read_spool(pipeline)
    lost = sorted(set(range(submitted)) - survivors - set(spooled))
    expected = sorted(expected_lost)
    n_over = len(expected)
    result.figures = {
        "policy": str(policy), "capacity": s.capacity, "overfill": s.overfill, "submitted": submitted,
        "held_in_flight": held, "expected_evicted": n_over, "buffer_overflowed": run.buffer.overflowed,
        "dropped": final.dropped, "dropped_by_reason": dict(final.dropped_by_reason), "spooled": final.spooled,
        "written": final.written, "survivors": len(survivors), "survivors_read_from":
            "table" if table is not None else "rows the sink committed",
        "overflow_1h": during.overflow_1h, "overflow_rate_1h_pct": during.overflow_rate_1h_pct,
        "overflowing_submits": overflowing, "warnings_logged": len(warnings.records),
        "warn_interval_s": run.buffer.warn_interval, "overfill_seconds": elapsed,
        "blocked_puts": run.buffer.blocked_puts, "block_waits_s": blocked,
        "block_timeout_s": run.config.buffer.block_timeout,
    }
    c = result.checks.append
    if table is not None:
        c(Check("table matches the sink's commits", table == set(committed),
                f"{len(table):,} values in the table, {len(set(committed)):,} committed by the sink",
                expected=len(committed), actual=len(table)))
    if policy is OverflowPolicy.SPILL:
        c(Check("no value lost (evicted values are in the spool)", not lost and final.dropped == 0 and not bad,
                f"{len(spooled):,} values read back from the spool; lost: {summarize(lost)}; dropped "
                f"{final.dropped}" + (f"; {len(bad)} bad spool lines" if bad else ""),
                expected=0, actual=len(lost) + final.dropped))
        c(Check("FIFO: the spool holds exactly the oldest values", sorted(spooled) == expected,
                f"spooled {summarize(sorted(spooled))}; the oldest were {summarize(expected)}",
                expected=summarize(expected), actual=summarize(sorted(spooled))))
        c(Check("spill counter exact", final.spooled == n_over == run.buffer.overflowed,
                f"spooled {final.spooled:,}, buffer overflowed {run.buffer.overflowed:,}, expected {n_over:,}",
                expected=n_over, actual=final.spooled))
    else:
        what = "oldest" if policy is OverflowPolicy.DROP_OLDEST else "timed-out"
        name = ("FIFO: exactly the oldest values evicted" if policy is OverflowPolicy.DROP_OLDEST
                else "exactly the timed-out values dropped")
        c(Check(name, lost == expected,
                f"missing {summarize(lost)}; expected the {what} {summarize(expected)}",
                expected=summarize(expected), actual=summarize(lost)))
        reason = "overflow" if policy is OverflowPolicy.DROP_OLDEST else "block_timeout"
        counted = final.dropped_by_reason.get(reason, 0)
        c(Check("overflow counter exact", counted == n_over == run.buffer.overflowed == len(lost),
                f"dropped ({reason}) {counted:,}, buffer overflowed {run.buffer.overflowed:,}, "
                f"values missing {len(lost):,}, expected {n_over:,}", expected=n_over, actual=counted))
    c(_warning_check(warnings, overflowing, elapsed, run.buffer.warn_interval))
    rate = 100.0 * n_over / during.submitted if during.submitted else 0.0
    c(Check("overflow rate (1 h) counts every overflowed value",
            math.isclose(during.overflow_rate_1h_pct, rate, rel_tol=1e-9, abs_tol=1e-9),
            f"{during.overflow_rate_1h_pct:.3f}% of {during.submitted:,} submitted (expected {rate:.3f}%)",
            expected=rate, actual=during.overflow_rate_1h_pct))
    if policy is not OverflowPolicy.SPILL:
        in_order = committed == sorted(committed)
        c(Check("survivors written in submit order", in_order,
                "the sink committed the survivors oldest first" if in_order
                else "the sink committed values out of submit order", expected=True, actual=in_order))
    adds_up = final.submitted == final.accounted and final.pending == 0
    c(Check("every value accounted for", adds_up and flushed and stopped,
            f"submitted {final.submitted:,} = written {final.written:,} + duplicates {final.duplicates:,} + spooled "
            f"{final.spooled:,} + quarantined {final.quarantined:,} + dropped {final.dropped:,} + pending "
            f"{final.pending:,}" + ("" if flushed else "; the flush after the release did not finish"),
            expected=final.submitted, actual=final.accounted))


def _block_phase(run: _Run, result: OverflowResult, queue_order: list[int]) -> tuple[list[int], int, list[float]]:
    """block: fill, time out twice (drops), then a producer released within the timeout loses nothing."""
    s = run.s
    timeout = run.config.buffer.block_timeout
    for _, _, seqs in run.submit_groups(s.capacity - len(queue_order)):
        queue_order.extend(seqs)
    half = math.ceil(s.overfill / 2)
    timed_out: list[int] = []
    waits: list[float] = []
    outcomes = []
    for n in (half, s.overfill - half):
        if n <= 0:
            continue
        taken, took, seqs = run.submit(n)
        outcomes.append(taken)
        waits.append(took)
        timed_out.extend(seqs)
    result.checks.append(Check(
        "block: producers waited the timeout, then their values were dropped",
        all(not t for t in outcomes) and all(w >= timeout - 0.01 for w in waits),
        f"{len(waits)} submits into the full buffer waited {', '.join(f'{w:.2f} s' for w in waits)} "
        f"(block_timeout {timeout:g} s) and returned {'False' if not any(outcomes) else outcomes}",
        expected=timeout, actual=min(waits, default=0.0)))
    # A producer that gets room within the timeout: release the sink halfway through its wait.
    box: dict[str, Any] = {}
    done = threading.Event()

    def produce() -> None:
        try:
            box["outcome"] = run.submit(min(s.group_size, s.capacity))
        except PipelineStopped as exc:
            box["error"] = exc
        done.set()

    blocked_before = run.buffer.blocked_puts
    producer = threading.Thread(target=produce, name="tagwriter-overflow-producer", daemon=True)
    producer.start()
    finished_early = done.wait(timeout / 2)
    run.gate.release()
    done.wait(timeout + STALL_WAIT)
    taken, took, _ = box.get("outcome", (False, 0.0, range(0)))
    result.checks.append(Check(
        "block: a producer given room within the timeout loses nothing",
        not finished_early and taken and run.buffer.blocked_puts == blocked_before + 1,
        f"the submit waited {took:.2f} s (sink released after {timeout / 2:.2f} s) and returned {taken}"
        + ("; it did not wait at all" if finished_early else ""), expected=True, actual=taken))
    return timed_out, len(waits), waits


def _warning_check(warnings: _WarningCapture, overflowing: int, elapsed: float, interval: float) -> Check:
    n = len(warnings.records)
    allowed = 1 + math.floor(elapsed / interval) if interval > 0 else overflowing
    limited = n <= allowed and (overflowing <= 1 or n < overflowing or interval <= 0)
    first = warnings.records[0].getMessage() if warnings.records else ""
    return Check(
        "overflow warning logged, rate-limited", n >= 1 and limited,
        f"{n} warning(s) for {overflowing} overflowing submits in {elapsed:.2f} s "
        f"(at most one per {interval:g} s)" + (f": {first}" if first else ""),
        expected=f"1..{allowed}", actual=n)


# -- the sustained variant -----------------------------------------------------------


def _sustained(config: Config, s: OverflowSettings, sink: Sink, buffer_class: type[RingBuffer],
               result: OverflowResult) -> dict[str, Any]:
    """Offer `overload_pct` above a sink throttled to `sink_rate` for `sustained_s`; check the 1 h rate."""
    assert s.sustained_s is not None
    gate = MemorySink(inner=sink)
    gate.delay = config.writer.batch_size / s.sink_rate
    buffer = buffer_class(s.capacity, s.policy, block_timeout=config.buffer.block_timeout)
    offered = s.sink_rate * (1 + s.overload_pct / 100.0)
    shape = LoadShape.for_rate(offered)
    sim = Simulator(shape.groups, shape.tags_per_group, shape.interval, seed=2)
    service = Service(config, SimulatedSource(sim, duration=s.sustained_s), sink=gate, buffer=buffer)
    service.start()
    try:
        started = time.monotonic()
        service.wait_source(s.sustained_s + 5.0)
        elapsed = time.monotonic() - started
        snap = service.pipeline.snapshot()
    finally:
        gate.delay = 0.0  # drain what is left at full speed
        service.stop()
    committed = snap.written + snap.duplicates + snap.quarantined
    sink_rate = committed / elapsed if elapsed > 0 else 0.0
    excess = max(0.0, offered - s.sink_rate)
    fill_s = s.capacity / excess if excess else math.inf
    ok = snap.overflow_rate_1h_pct <= s.max_overflow_pct
    result.checks.append(Check(
        "sustained: overflow rate (1 h) within --max-overflow-pct", ok,
        f"{snap.overflow_rate_1h_pct:.2f}% ({snap.overflow_1h:,} of {snap.submitted:,} values) with "
        f"{offered:,.0f} values/s offered to a sink taking {sink_rate:,.0f}/s for {elapsed:.1f} s; limit "
        f"{s.max_overflow_pct:g}%", expected=s.max_overflow_pct, actual=snap.overflow_rate_1h_pct))
    return {
        "seconds": elapsed, "offered_per_s": offered, "sink_rate_set_per_s": s.sink_rate,
        "sink_rate_measured_per_s": sink_rate, "submitted": snap.submitted, "overflow_1h": snap.overflow_1h,
        "overflow_rate_1h_pct": snap.overflow_rate_1h_pct, "max_overflow_pct": s.max_overflow_pct,
        "buffer_fills_after_s": fill_s if math.isfinite(fill_s) else None, "ok": ok,
    }


# -- the report ------------------------------------------------------------------


def report_dict(config: Config, r: OverflowResult, env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full overflow-test report (see report_schema.json); every text in it redacted."""
    s = r.settings
    return redact_tree({
        "command": "overflow-test",
        "schema_version": 1,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": r.ok,
        "settings": {"policy": s.policy, "capacity": s.capacity, "overfill_pct": s.overfill_pct,
                     "overfill": s.overfill, "group_size": s.group_size,
                     "block_timeout_s": s.block_timeout if s.block_timeout is not None else config.buffer.block_timeout,
                     "batch_size": min(config.writer.batch_size, s.capacity),
                     "sustained_s": s.sustained_s, "max_overflow_pct": s.max_overflow_pct,
                     "sink_rate_per_s": s.sink_rate, "overload_pct": s.overload_pct,
                     "database": redact_url(config.database.url)},
        "environment": env if env is not None else environment(config),
        "checks": [c.as_dict() for c in r.checks],
        "figures": {k: _jsonable(v) for k, v in r.figures.items()},
        "sustained": {k: _jsonable(v) for k, v in r.sustained.items()} if r.sustained else None,
        "metrics": {k: _jsonable(v) for k, v in r.final.as_dict().items()} if r.final else {},
    })


MARKS = {True: "✓", False: "✗"}


def render_table(report: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", width=1)
    table.add_column("check")
    table.add_column("result")
    for c in report["checks"]:
        style = "green" if c["ok"] else "red"
        table.add_row(f"[{style}]{MARKS[c['ok']]}[/]", c["name"], c["detail"])
    return table


def render_text(report: dict[str, Any], title: str) -> str:
    lines = [title]
    lines += [f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in report["checks"]]
    return "\n".join(lines)


def failed(report: dict[str, Any]) -> Iterable[str]:
    return (f"FAIL {c['name']}: {c['detail']}" for c in report["checks"] if not c["ok"])

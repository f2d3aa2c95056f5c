"""The status panel `tagwriter run` and `tagwriter status` show.

`render_panel` is a pure function of a `MetricsSnapshot`: the Live loop only
calls it, and tests render it into a fixed-width capture console.

Each row is a label and a line of text wrapped under itself, in a box of
fixed width (`PANEL_WIDTH`, less on a narrower terminal): the box keeps its
size while the figures change, and no table is measured for every frame (a
frame costs a third of what the grid it replaced did; see
tests/benchmarks/bench_panel.py). Figures that change every frame sit in
fixed-width fields. The fill bar is drawn with shapes (█ filled, ░ empty), so
it reads right without colour (`NO_COLOR`, a copied screen). A figure with
nothing behind it (a latency with no sample in its window) shows "–", never 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from tagwriter.metrics import RATE_WINDOW, MetricsSnapshot

STATE_STYLES = {
    "starting": "cyan",
    "writing": "green",
    "retrying": "yellow",
    "outage": "bold red",
    "failed": "bold red",
    "stopping": "yellow",
    "stopped": "dim",
}
STALE_STATES = frozenset({"retrying", "outage", "failed"})  # nothing commits: the latencies are old news
PANEL_WIDTH = 100
LABEL_WIDTH = 15
BAR_WIDTH = 30
FILL, HALF, EMPTY = "█", "▌", "░"
NO_FIGURE = "–"
LABEL_STYLE = Style(bold=True)


class Row:
    """A label and its text; the text wraps under itself (a hanging indent) to the width it is given."""

    __slots__ = ("body", "label")

    def __init__(self, label: str, body: Text) -> None:
        self.label = label
        self.body = body

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        width = max(1, options.max_width - LABEL_WIDTH)
        for i, line in enumerate(self.body.wrap(console, width)):
            yield Segment(f"{self.label if i == 0 else '':<{LABEL_WIDTH}}", LABEL_STYLE)
            yield from line.render(console)
            yield Segment.line()


def render_panel(snapshot: MetricsSnapshot, *, target: str = "") -> RenderableType:
    """The panel for one snapshot; `target` (database or URL) goes in the title."""
    s = snapshot
    title = "tagwriter" + (f" → {target}" if target else "")
    rows = [Row("state", _state(s))]
    if s.last_error:
        rows.append(Row("last error", Text(_shorten(s.last_error, 160), style="red")))
    rows.append(Row("buffer", _buffer(s)))
    if s.durability == "disk":
        rows.append(Row("queue", _queue(s)))
    if s.source:
        rows.append(Row("source", _source(s.source)))
    rows += [
        Row("rate", Text(f"in {_rate(s.rate_in_per_s)}   out {_rate(s.rate_out_per_s)}   ({RATE_WINDOW:g} s)")),
        Row("write latency", _write_latency(s)),
        Row("end-to-end", _end_to_end(s)),
        Row("rows", _rows(s)),
        Row("batches", _batches(s)),
        Row("overflow", _overflow(s)),
        Row("backup", _backup(s)),
    ]
    replayed = _replayed(s.extra)
    if replayed is not None:
        rows.append(Row("replayed", replayed))
    backlog = _backlog(s)
    if backlog:
        rows.append(Row("backlog", Text(backlog)))
    if s.bad_input or s.bad_input_lost:
        rows.append(Row("bad input", _bad_input(s)))
    rows.append(Row("uptime", Text(_duration(s.uptime_s))))
    return Panel(Group(*rows), title=title, title_align="left", box=box.ROUNDED, width=PANEL_WIDTH, expand=True)


def _state(s: MetricsSnapshot) -> Text:
    text = Text(s.state, style=STATE_STYLES.get(s.state, ""))
    text.append(f" for {_duration(s.state_age_s)}", style="dim")
    return text


def _buffer(s: MetricsSnapshot) -> Text:
    pct = s.buffer_utilization_pct
    style = "red" if pct >= 80 else "yellow" if pct >= 50 else "green"
    halves = round(min(1.0, max(0.0, pct / 100.0)) * BAR_WIDTH * 2)
    full, half = divmod(halves, 2)
    text = Text(FILL * full + HALF * half, style=style)
    text.append(EMPTY * (BAR_WIDTH - full - half), style="dim")
    capacity = f"{s.buffer_capacity:,}"
    text.append(f"   {s.buffer_size:>{len(capacity)},} / {capacity} ({pct:5.1f}%)")
    if s.inflight:
        text.append(f", {s.inflight:,} in flight", style="dim")
    return text


def _queue(s: MetricsSnapshot) -> Text:
    """The disk queue: what is on disk, how old, how long a group commit takes, what came back at start."""
    cap = f" of {_bytes(s.queue_max_bytes)}" if s.queue_max_bytes else ""
    text = Text(f"{s.queue_values:,} values, {_bytes(s.queue_bytes)}{cap} on disk")
    if s.queue_values:
        text.append(f", oldest {_duration(s.queue_oldest_age_s)}")
    if s.queue_fsync_p99_s is not None:
        text.append(f"   fsync p99 {_ms(s.queue_fsync_p99_s)}", style="dim")
    if s.queue_recovered:
        text.append(f"   recovered {s.queue_recovered:,} at start", style="yellow")
    if s.queue_disk_full:
        text.append("   DISK FULL: not durable", style="bold red")
    return text


def _source(src: dict[str, Any]) -> Text:
    """A plant source: connected or not, what came in, what waits for its acknowledgement upstream."""
    up = src.get("connected", True)
    text = Text(f"{src.get('kind', '')} {src.get('endpoint', '')} ")
    text.append("connected" if up else "DISCONNECTED", style="green" if up else "bold red")
    age = src.get("last_message_age")
    text.append(f"   {src.get('messages', 0):,} messages"
                + (f", last {_duration(age)} ago" if age is not None else ", none yet"))
    text.append(f"   acks pending {src.get('acks_pending', 0):,}   redelivered {src.get('redeliveries', 0):,}   "
                f"reconnects {src.get('reconnects', 0):,}", style="dim")
    if src.get("bad_messages"):
        text.append(f"   bad {src['bad_messages']:,} (quarantined)", style="yellow")
    return text


def _write_latency(s: MetricsSnapshot) -> Text:
    """Average and p99 of the batch writes; "–" when no batch committed in the window, and the last commit's age."""
    some = s.write_latency_samples_5m > 0
    text = Text(f"avg {_ms(s.avg_write_latency_5m_s) if some else NO_FIGURE:>9}   "
                f"p99 {_ms(s.p99_write_latency_5m_s) if some else NO_FIGURE:>9}   (5 min)   ")
    stale = s.state in STALE_STATES
    if s.last_commit_age_s is None:
        text.append("no commit yet", style="yellow" if stale else "dim")
    else:
        text.append(f"last commit {_duration(s.last_commit_age_s)} ago", style="bold yellow" if stale else "dim")
    return text


def _end_to_end(s: MetricsSnapshot) -> Text:
    some = s.latency_samples_5m > 0
    return Text(f"p50 {_ms(s.latency_p50_s) if some else NO_FIGURE:>9}   "
                f"p99 {_ms(s.latency_p99_s) if some else NO_FIGURE:>9}   (submit to commit, 5 min)")


def _rows(s: MetricsSnapshot) -> Text:
    text = Text(
        f"written {s.written:,}   duplicate {s.duplicates:,}   spooled {s.spooled:,}   "
        f"quarantined {s.quarantined:,}   "
    )
    text.append(f"dropped {s.dropped:,}", style="bold red" if s.dropped else "")
    return text


def _batches(s: MetricsSnapshot) -> Text:
    """Batches written, and what went wrong: failed writes, retries, outages since start."""
    text = Text(f"ok {s.batches_ok:,}")
    for name, n in (("failed", s.batches_failed), ("retries", s.retries), ("outages", s.outages)):
        text.append(f"   {name} {n:,}", style="yellow" if n else "")
    return text


def _overflow(s: MetricsSnapshot) -> Text:
    """The buffer's overflow (dropped or spilled) over the last hour, as README's overflow-test checks it."""
    return Text(f"{s.overflow_1h:,} values in 1 h, {s.overflow_rate_1h_pct:.2f}% of submitted",
                style="bold red" if s.overflow_1h else "")


def _backup(s: MetricsSnapshot) -> Text:
    """Spool files and bytes, of the cap, and the room left on the folder's disk."""
    text = Text(f"{s.backup_files:,} files, {_bytes(s.backup_bytes)}")
    if s.spool_max_bytes:
        text.append(f" of {_bytes(s.spool_max_bytes)}")
    if s.spool_disk_free_bytes is not None:
        text.append(f"   disk free {_bytes(s.spool_disk_free_bytes)}", style="dim")
    if s.spool_full:
        text.append("   FULL", style="bold red")
    return text


def _replayed(extra: dict[str, Any]) -> Text | None:
    """Spool rows the automatic recovery wrote back since start (counted apart from `rows`); None if none."""
    written, duplicates = extra.get("replayed", 0), extra.get("replay_duplicates", 0)
    quarantined = extra.get("replay_quarantined", 0)
    if not (written or duplicates or quarantined):
        return None
    return Text(f"written {written:,}   duplicate {duplicates:,}   quarantined {quarantined:,}   "
                f"files done {extra.get('replayed_files', 0):,}")


def _backlog(s: MetricsSnapshot) -> str:
    if not (s.backlog_rows or s.backlog_files or s.drain_rate_per_s):
        return ""
    parts = [f"{s.backlog_rows:,} rows in {s.backlog_files} files"]
    if s.drain_rate_per_s:
        parts.append(f"draining {_num(s.drain_rate_per_s)}/s")
    if s.drain_eta_s:
        parts.append(f"eta {_duration(s.drain_eta_s)}")
    return ", ".join(parts)


def _bad_input(s: MetricsSnapshot) -> Text:
    text = Text(f"{s.bad_input:,} lines quarantined")
    if s.bad_input_lost:
        text.append(f", {s.bad_input_lost:,} NOT kept (the quarantine write failed)", style="bold red")
    return text


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _rate(x: float) -> str:
    """Values per second in a fixed-width field (up to 999,999/s)."""
    return f"{_num(x):>7}/s"


def _ms(seconds: float) -> str:
    ms = seconds * 1000.0
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _duration(seconds: float) -> str:
    total = int(seconds)
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s" if m else f"{seconds:.1f}s"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""The status panel `tagwriter run` and `tagwriter status` show.

`render_panel` is a pure function of a `MetricsSnapshot`: the Live loop only
calls it, and tests render it into a fixed-width capture console.
"""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tagwriter.metrics import MetricsSnapshot

STATE_STYLES = {
    "starting": "cyan",
    "writing": "green",
    "retrying": "yellow",
    "outage": "bold red",
    "failed": "bold red",
    "stopping": "yellow",
    "stopped": "dim",
}
BAR_WIDTH = 30


def render_panel(snapshot: MetricsSnapshot, *, target: str = "") -> RenderableType:
    """The panel for one snapshot; `target` (database or URL) goes in the title."""
    s = snapshot
    title = "tagwriter" + (f" → {target}" if target else "")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("state", _state(s))
    grid.add_row("buffer", _buffer(s))
    grid.add_row("rate", f"in {_num(s.rate_in_per_s)}/s   out {_num(s.rate_out_per_s)}/s")
    grid.add_row(
        "write latency", f"avg {_ms(s.avg_write_latency_5m_s)}   p99 {_ms(s.p99_write_latency_5m_s)}   (5 min)"
    )
    grid.add_row("end-to-end", f"p99 {_ms(s.latency_p99_s)}   (submit to commit, 5 min)")
    grid.add_row("rows", _rows(s))
    grid.add_row("backup", f"{s.backup_files} files, {_bytes(s.backup_bytes)}" + ("  FULL" if s.spool_full else ""))
    backlog = _backlog(s)
    if backlog:
        grid.add_row("backlog", backlog)
    if s.bad_input:
        grid.add_row("bad input", f"{s.bad_input:,} lines quarantined")
    grid.add_row("uptime", _duration(s.uptime_s))
    return Panel(grid, title=title, title_align="left", box=box.ROUNDED, expand=False)


def _state(s: MetricsSnapshot) -> Text:
    text = Text(s.state, style=STATE_STYLES.get(s.state, ""))
    if s.last_error:
        text.append("   last error: ", style="dim")
        text.append(_shorten(s.last_error, 160), style="red")
    return text


def _buffer(s: MetricsSnapshot) -> RenderableType:
    pct = s.buffer_utilization_pct
    style = "red" if pct >= 80 else "yellow" if pct >= 50 else "green"
    bar = ProgressBar(total=max(s.buffer_capacity, 1), completed=s.buffer_size, width=BAR_WIDTH,
                      complete_style=style, finished_style=style)
    label = Text(f" {s.buffer_size:,} / {s.buffer_capacity:,} ({pct:.1f}%)")
    if s.inflight:
        label.append(f", {s.inflight:,} in flight", style="dim")
    row = Table.grid(padding=0)
    row.add_column(width=BAR_WIDTH, no_wrap=True)
    row.add_column()
    row.add_row(bar, label)
    return row


def _rows(s: MetricsSnapshot) -> Text:
    text = Text(
        f"written {s.written:,}   duplicate {s.duplicates:,}   spooled {s.spooled:,}   "
        f"quarantined {s.quarantined:,}   "
    )
    text.append(f"dropped {s.dropped:,}", style="bold red" if s.dropped else "")
    return text


def _backlog(s: MetricsSnapshot) -> str:
    if not (s.backlog_rows or s.backlog_files or s.drain_rate_per_s):
        return ""
    parts = [f"{s.backlog_rows:,} rows in {s.backlog_files} files"]
    if s.drain_rate_per_s:
        parts.append(f"draining {_num(s.drain_rate_per_s)}/s")
    if s.drain_eta_s:
        parts.append(f"eta {_duration(s.drain_eta_s)}")
    return ", ".join(parts)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _ms(seconds: float) -> str:
    ms = seconds * 1000.0
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
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

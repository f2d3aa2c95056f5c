"""`tagwriter status`: the live panel of a running instance, read from its metrics endpoint."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from tagwriter.cli.common import boundary, fail, load_config

if TYPE_CHECKING:
    from tagwriter.cli.status_client import EndpointUnreachable, RemoteStatus


@boundary
def status(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", metavar="URL",
                     help="The instance's endpoint, e.g. http://127.0.0.1:9108 [from metrics.host and metrics.port]."),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C instead of printing once.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=3600, help="--watch: seconds between refreshes.")
    ] = 2.0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=60, help="Seconds each HTTP request may take.")
    ] = 2.0,
) -> None:
    """Show a running instance's status panel, read from its HTTP metrics endpoint.

    Exit 0 if it is writing normally; 1 if the endpoint is unreachable or the
    instance is unhealthy (outage, retrying, failed, starting, stopping, or
    the buffer above metrics.health_max_buffer_pct); 2 if no URL is known.

    Example: tagwriter status --url http://127.0.0.1:9108 --watch
    """
    # Imported here: prometheus_client costs ~60 ms, which other commands should not pay.
    from tagwriter.cli.status_client import EndpointUnreachable, fetch_status, normalize_url

    target = normalize_url(url) if url else _configured_url(ctx)
    first = fetch_status(target, timeout)  # unreachable: one line on stderr, exit 1 (boundary)
    console = Console(highlight=False)
    if watch:
        last = _watch(console, first, target, interval, timeout)
    else:
        console.print(_view(first))
        last = first
    if isinstance(last, EndpointUnreachable):
        raise fail(str(last), last.hint)
    if not last.healthy:
        raise fail(f"{target}: unhealthy: {last.reason}")


def _configured_url(ctx: typer.Context) -> str:
    m = load_config(ctx).metrics
    if m.port == 0:
        raise fail("no metrics endpoint configured (metrics.port = 0)",
                   "pass --url http://HOST:PORT, or set metrics.port in the config", code=2)
    host = "127.0.0.1" if m.host in ("", "0.0.0.0") else "::1" if m.host == "::" else m.host
    return f"http://[{host}]:{m.port}" if ":" in host else f"http://{host}:{m.port}"


def _view(remote: RemoteStatus, *, with_health: bool = False) -> RenderableType:
    """The panel; `with_health` adds the health line (--watch: no error line until exit)."""
    from tagwriter.ui.panel import render_panel  # the same panel `tagwriter run` shows

    panel = render_panel(remote.snapshot, target=remote.url)
    if not with_health:
        return panel
    health = Text(f"healthy: {remote.reason}", style="green") if remote.healthy else Text(
        f"unhealthy: {remote.reason}", style="bold red")
    return Group(panel, health)


def _watch(
    console: Console, first: RemoteStatus, target: str, interval: float, timeout: float
) -> RemoteStatus | EndpointUnreachable:
    """Refresh in place until Ctrl-C; the last result (a failed read is shown and retried)."""
    from tagwriter.cli.status_client import EndpointUnreachable, fetch_status

    last: RemoteStatus | EndpointUnreachable = first
    with Live(_view(first, with_health=True), console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    last = fetch_status(target, timeout)
                    live.update(_view(last, with_health=True), refresh=True)
                except EndpointUnreachable as exc:
                    last = exc
                    live.update(Text(f"{exc} (retrying every {interval:g}s; Ctrl-C to quit)", style="bold red"),
                                refresh=True)
        except KeyboardInterrupt:
            pass
    return last

"""`tagwriter jetstream setup|status`: the stream edge gateways publish to and the writers' durable consumer."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tagwriter.cli.common import boundary, fail, load_config
from tagwriter.config import Config

if TYPE_CHECKING:  # the library loads when a command runs: asyncio and the NATS modules cost ~50 ms
    from tagwriter.streamadmin import StreamStatus

jetstream_app = typer.Typer(
    help="Set up and look at the JetStream stream between edge gateways and the writer fleet.\n\n"
    "Example: tagwriter jetstream setup --stream PLANT --subjects 'plant.>' && tagwriter jetstream status",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ServersOption = Annotated[
    str | None, typer.Option("--servers", metavar="URLS", help="NATS servers, comma-separated (jetstream.servers).")
]
StreamOption = Annotated[str | None, typer.Option("--stream", help="The stream (jetstream.stream).")]
TimeoutOption = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds each JetStream request may take.")]


def _config(ctx: typer.Context, servers: str | None, stream: str | None) -> Config:
    return load_config(ctx, {"jetstream.servers": servers, "jetstream.stream": stream})


@jetstream_app.command("setup")
@boundary
def setup_command(
    ctx: typer.Context,
    servers: ServersOption = None,
    stream: StreamOption = None,
    subjects: Annotated[
        str | None, typer.Option("--subjects", help="Subjects the stream takes, comma-separated (default: "
                                 "jetstream.subject's first token + '.>', else STREAM.>).")
    ] = None,
    retention: Annotated[
        str, typer.Option("--retention", help="workqueue: a message goes once it is acknowledged (a writer fleet); "
                          "limits: kept until max-age or max-bytes (other readers can replay).")
    ] = "workqueue",
    replicas: Annotated[
        int, typer.Option("--replicas", min=0, max=5, help="Copies of each message (0: 3 in a cluster of 3 or "
                          "more, else 1).")
    ] = 0,
    max_bytes: Annotated[
        str, typer.Option("--max-bytes", help="Size cap; when full, publishes are refused (discard new), the edges "
                          "keep their values. e.g. 10GiB, or none.")
    ] = "10GiB",
    max_age: Annotated[
        str | None, typer.Option("--max-age", help="Oldest message kept, e.g. 7d; none = no limit (default: none "
                                 "for workqueue, 7d for limits).")
    ] = None,
    duplicate_window: Annotated[
        str, typer.Option("--duplicate-window", help="How long JetStream remembers message ids (a retried batch is "
                          "stored once), e.g. 2m.")
    ] = "2m",
    no_consumer: Annotated[
        bool, typer.Option("--no-consumer", help="Only the stream; not the writers' durable consumer.")
    ] = False,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the stream and consumer configs as JSON; touch nothing.")
    ] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Create the stream and the writers' durable consumer, or check existing ones against these settings.

    The consumer is the [jetstream] section's (durable, subject as its filter,
    ack_wait, max_ack_pending, max_deliver): the one `tagwriter run --source
    jetstream` uses. An existing stream or consumer is never changed: each
    difference is listed and the exit status is 1.

    Example: tagwriter jetstream setup --stream PLANT --subjects 'plant.>' --replicas 3 --max-bytes 50GiB
    """
    from tagwriter.sources.jetstream import wanted_consumer
    from tagwriter.streamadmin import (
        RETENTIONS,
        StreamSettings,
        default_subjects,
        parse_duration,
        parse_size,
        session_from_settings,
        setup,
        stream_config,
    )

    config = _config(ctx, servers, stream)
    js = config.jetstream
    if retention not in RETENTIONS:
        raise fail(f"--retention {retention}: must be one of {', '.join(RETENTIONS)}", code=2)
    chosen = tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else ()
    settings = StreamSettings(
        js.stream, chosen or default_subjects(js.stream, js.subject), retention=retention, replicas=replicas,
        max_bytes=parse_size(max_bytes), max_age=None if max_age is None else parse_duration(max_age),
        duplicate_window=parse_duration(duplicate_window),
    )
    consumer = None if no_consumer else js
    if print_only:
        out: dict[str, Any] = {"stream": stream_config(settings, settings.replicas or 1)}
        if consumer is not None:
            out["consumer"] = wanted_consumer(consumer)
        typer.echo(json.dumps(out, indent=2))
        return
    session = session_from_settings(js, call_timeout=timeout)
    try:
        report = setup(session, settings, consumer)
    finally:
        session.close()
    console = Console(highlight=False)
    for ok, line in report.lines:
        console.print(f"[green]✓[/] {escape(line)}" if ok else f"[red]✗[/] {escape(line)}")
    if report.problems:
        raise fail("tagwriter never changes an existing stream or consumer (edges and writers rely on them)",
                   hint="pass settings that match, or change it yourself (`nats stream edit`, "
                        "`nats consumer edit`) and run setup again")


@jetstream_app.command("status")
@boundary
def status_command(
    ctx: typer.Context,
    servers: ServersOption = None,
    stream: StreamOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON (for scripts).")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Show the stream's state and, per consumer, its lag: pending (not yet delivered), ack pending, redelivered.

    A writer fleet on one durable is healthy when `pending` stays low; `ack
    pending` are values the writers hold (not yet written); `redelivered`
    counts messages JetStream handed out again (a writer died or was slow).

    Example: tagwriter jetstream status --stream PLANT --json
    """
    from tagwriter.streamadmin import cluster_size, session_from_settings, stream_status

    config = _config(ctx, servers, stream)
    session = session_from_settings(config.jetstream, call_timeout=timeout)
    try:
        state = stream_status(session, config.jetstream.stream)
        size = cluster_size(session.server_info)
    finally:
        session.close()
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(state), indent=2))
        return
    Console(highlight=False).print(render_status(state, size))


def render_status(s: StreamStatus, cluster: int = 1) -> Table:
    """The stream and its consumers as one Rich table (a pure function of the state)."""
    from tagwriter.streamadmin import size_text

    age = "none" if s.oldest_age_s is None else f"{s.oldest_age_s:,.1f} s"
    title = (f"stream {s.name} ({', '.join(s.subjects)}): {s.retention}, {s.storage}, replicas {s.replicas}"
             f"{f' on a cluster of {cluster}' if cluster > 1 else ''}\n{s.messages:,} messages, "
             f"{size_text(s.bytes)} of {size_text(s.max_bytes)}, oldest {age}, seq {s.first_seq:,}..{s.last_seq:,}")
    if s.leader:
        title += f"\nleader {s.leader}; replicas {', '.join(_peer(p) for p in s.peers) or 'none'}"
    table = Table(title=title, title_justify="left", caption="pending: not yet delivered (the lag); acks pending: "
                  "held by writers, not yet written", caption_justify="left")
    for column in ("consumer", "filter", "pending", "acks pending", "redelivered", "pulls waiting", "ack floor"):
        table.add_column(column, justify="left" if column in ("consumer", "filter") else "right")
    for c in s.consumers:
        table.add_row(c.name, c.filter_subject or "all", f"{c.pending:,}", f"{c.ack_pending:,}",
                      f"{c.redelivered:,}", f"{c.waiting:,}", f"{c.ack_floor_seq:,}")
    if not s.consumers:
        table.add_row("(none)", "", "", "", "", "", "")
    return table


def _peer(p: dict[str, Any]) -> str:
    state = " offline" if p["offline"] else "" if p["current"] else " behind"
    lag = f" lag {p['lag']}" if p["lag"] else ""
    return f"{p['name']}{state}{lag}"

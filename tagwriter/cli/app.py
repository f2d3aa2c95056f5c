"""The Typer app: global options and the command list (each command in its own file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tagwriter.cli.common import GlobalOptions
from tagwriter.cli.version import version

app = typer.Typer(
    name="tagwriter",
    help="Store-and-forward writer for industrial tag data (SQLite, Oracle, PostgreSQL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


@app.callback()
def common(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="TAGWRITER_CONFIG",
                     help="Config file (default: ./tagwriter.toml if present, else built-in defaults)."),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR (overrides logging.level).")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Also log to this rotating file (overrides logging.file).")
    ] = None,
) -> None:
    """Store-and-forward writer for industrial tag data."""
    ctx.obj = GlobalOptions(config, log_level, log_file)


app.command("version")(version)

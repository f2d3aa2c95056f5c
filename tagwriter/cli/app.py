"""The Typer app: global options and the command list (each command in its own file)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tagwriter._version import __version__
from tagwriter.cli.common import GlobalOptions, GlobalOptionsGroup
from tagwriter.cli.config_cmd import config_app
from tagwriter.cli.init_db import init_db
from tagwriter.cli.jetstream import jetstream_app
from tagwriter.cli.load_test import load_test
from tagwriter.cli.overflow_test import overflow_test
from tagwriter.cli.replay import replay
from tagwriter.cli.run import run
from tagwriter.cli.signals import release_early
from tagwriter.cli.status import status
from tagwriter.cli.test_connection import test_connection
from tagwriter.cli.version import version

app = typer.Typer(
    name="tagwriter",
    help="Store-and-forward writer for industrial tag data (SQLite, Oracle, PostgreSQL).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    cls=GlobalOptionsGroup,  # --config/--log-level/--log-file/--log-format also after the command
)


class LogFormat(StrEnum):
    """The `--log-format` choices (tagwriter.logs.LOG_FORMATS)."""

    text = "text"
    json = "json"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tagwriter {__version__}")
        raise typer.Exit()


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
    log_format: Annotated[
        LogFormat | None, typer.Option("--log-format", help="text, or json: one JSON object per line for log "
                                       "shippers, console and file (overrides logging.format).")
    ] = None,
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, expose_value=True,
                           help="Print the tagwriter version and exit.")
    ] = False,
) -> None:
    """Store-and-forward writer for industrial tag data."""
    if ctx.invoked_subcommand != "run":  # only `run` handles signals; the others get the defaults back
        release_early()
    ctx.obj = GlobalOptions(config, log_level, log_file, log_format.value if log_format else None)


app.command("run")(run)
app.add_typer(config_app, name="config")
app.add_typer(jetstream_app, name="jetstream")
app.command("version")(version)
app.command("init-db")(init_db)
app.command("test-connection")(test_connection)
app.command("status")(status)
app.command("replay")(replay)
app.command("replay-backups", hidden=True)(replay)
app.command("load-test")(load_test)
app.command("overflow-test")(overflow_test)

"""Plumbing every command shares: global options, config loading, errors at the boundary."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from tagwriter import config as config_mod
from tagwriter.config import Config, ConfigValueError, DatabaseURL, parse_url
from tagwriter.errors import ConfigError, TagwriterError
from tagwriter.logs import configure_logging
from tagwriter.redact import redact, redact_tree

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(slots=True)
class GlobalOptions:
    """What the app callback parsed: `--config`, `--log-level`, `--log-file`, `--log-format`."""

    config_path: Path | None = None
    log_level: str | None = None
    log_file: Path | None = None
    log_format: str | None = None


#: The app's global options that take a value; they may also follow the command.
GLOBAL_VALUE_OPTIONS = ("--config", "-c", "--log-level", "--log-file", "--log-format")


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with global options given after the command moved to the front.

    `tagwriter run --config x.toml` then means `tagwriter --config x.toml run`.
    Stops at `--`. No command may define an option of the same name.
    """
    joined = tuple(f"{o}=" for o in GLOBAL_VALUE_OPTIONS if o.startswith("--"))
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in GLOBAL_VALUE_OPTIONS and i + 1 < len(args):
            front.extend(args[i:i + 2])
            i += 2
            continue
        (front if arg.startswith(joined) else rest).append(arg)
        i += 1
    return front + rest


class GlobalOptionsGroup(TyperGroup):
    """The root command group: accepts the global options before or after the command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


def global_options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


#: Options whose parameter name is not the config key's (`--input` sets source.path).
FLAG_PARAMS = {"source.kind": "source", "source.path": "input_path", "database.url": "database"}


def load_config(
    ctx: typer.Context, overrides: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
) -> Config:
    """The effective config for a command: file < env < global flags < `overrides`.

    `overrides` are the command's flags by config key. A bad flag value is a
    usage error (exit 2) naming the flag; a bad value from the file or the
    environment names the file:line or the variable (exit 1, by `boundary`).
    """
    opts = global_options(ctx)
    merged: dict[str, Any] = {}
    origins = {"logging.level": "--log-level", "logging.file": "--log-file", "logging.format": "--log-format"}
    if opts.log_level:
        merged["logging.level"] = opts.log_level.upper()
    if opts.log_file:
        merged["logging.file"] = str(opts.log_file)
    if opts.log_format:
        merged["logging.format"] = opts.log_format
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            origins.setdefault(key, flag_name(ctx, key))
    try:
        return config_mod.load(opts.config_path, overrides=merged, origins=origins, warn=warn, defaults=defaults)
    except ConfigValueError as exc:
        if exc.origin == "flag":
            raise fail(str(exc), exc.hint, code=2) from None
        raise


def flag_name(ctx: typer.Context, key: str) -> str:
    """The command-line option that sets config `key` (`writer.batch_size` -> `--batch-size`)."""
    section, _, name = key.partition(".")
    wanted = (FLAG_PARAMS.get(key), name, f"{section}_{name}")
    for param in ctx.command.params:
        if param.name in wanted:
            longs = [o for o in param.opts if o.startswith("--")]
            return (longs or list(param.opts) or [key])[0]
    return f"option for {key}"


def setup_logging(config: Config, *, console: bool = True) -> None:
    lc = config.logging
    configure_logging(lc.level, lc.file or None, max_bytes=lc.max_bytes,
                      backup_count=lc.backup_count, console=console, fmt=lc.format)


def fail(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    """Print one clear error line (and a hint) to stderr, redacted; return the Exit to raise."""
    # Messages quote config text such as `[writr]`: escape it so Rich markup cannot eat it.
    err_console.print(f"[bold red]error:[/] {escape(redact(message))}", markup=True, highlight=False)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(redact(hint))}", markup=True, highlight=False)
    return typer.Exit(code=code)


def warn(message: str) -> None:
    """Print one warning line to stderr (before logging is set up: a stray environment variable)."""
    err_console.print(f"[yellow]warning:[/] {escape(redact(message))}", markup=True, highlight=False)


def boundary(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a domain error raised by a command into one line on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except TagwriterError as exc:
            raise fail(str(exc), exc.hint) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(code=130) from None

    return wrapper


DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", metavar="URL",
                 help="sqlite:///PATH, oracle://USER@HOST:PORT/SERVICE or postgresql://USER@HOST:PORT/DB "
                      "(overrides database.url; no password: use TAGWRITER_DATABASE_PASSWORD)."),
]
"""The `--database URL` option of the commands that talk to the configured database."""

BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="Values per database transaction (writer.batch_size).")
]
FlushIntervalOption = Annotated[
    float | None,
    typer.Option("--flush-interval", help="Seconds a value may wait for its batch (writer.flush_interval)."),
]


def database_option(url: str | None) -> str | None:
    """Check a `--database URL` option: parsable, and no password (argv is readable by any user)."""
    if url is None:
        return None
    try:
        parsed = parse_url_safely(url)
    except ConfigError as exc:  # a bad flag value is a usage error
        raise fail(str(exc), exc.hint, code=2) from None
    if parsed.password:
        raise fail(
            "--database: the URL contains a password; passwords are never taken from the command line",
            hint="drop it from the URL and set TAGWRITER_DATABASE_PASSWORD (or database.password in the config file)",
            code=2,
        )
    return url


def parse_url_safely(url: str) -> DatabaseURL:
    """`parse_url`, turning its error into one about the option."""
    try:
        return parse_url(url)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("database.url", "--database", 1), hint=exc.hint) from None


def write_json_report(report: Mapping[str, Any], path: Path, console: Console) -> None:
    """Write a command's report as JSON (for CI artifacts), every string redacted; a clear error if it cannot."""
    try:
        path.write_text(json.dumps(redact_tree(report), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise fail(f"--json {path}: cannot write: {exc.strerror}") from None
    console.print(f"report written to {path}", markup=False, highlight=False)

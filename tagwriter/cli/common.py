"""Plumbing every command shares: global options, config loading, errors at the boundary."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tagwriter import config as config_mod
from tagwriter.config import Config, DatabaseURL, parse_url
from tagwriter.errors import ConfigError, TagwriterError
from tagwriter.logs import configure_logging

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(slots=True)
class GlobalOptions:
    """What the app callback parsed: `--config`, `--log-level`, `--log-file`."""

    config_path: Path | None = None
    log_level: str | None = None
    log_file: Path | None = None


def global_options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def load_config(ctx: typer.Context, overrides: Mapping[str, Any] | None = None) -> Config:
    """The effective config for a command: file < env < global flags < `overrides`."""
    opts = global_options(ctx)
    merged: dict[str, Any] = {}
    if opts.log_level:
        merged["logging.level"] = opts.log_level.upper()
    if opts.log_file:
        merged["logging.file"] = str(opts.log_file)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_mod.load(opts.config_path, overrides=merged)


def setup_logging(config: Config, *, console: bool = True) -> None:
    lc = config.logging
    configure_logging(lc.level, lc.file or None, max_bytes=lc.max_bytes,
                      backup_count=lc.backup_count, console=console)


def fail(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    """Print one clear error line (and a hint) to stderr; return the Exit to raise."""
    # Messages quote config text such as `[writr]`: escape it so Rich markup cannot eat it.
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}", markup=True, highlight=False)
    return typer.Exit(code=code)


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


def database_option(url: str | None) -> str | None:
    """Check a `--database URL` option: parsable, and no password (argv is readable by any user)."""
    if url is not None and parse_url_safely(url).password:
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
    """Write a command's report as JSON (for CI artifacts); a clear error if it cannot."""
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise fail(f"--json {path}: cannot write: {exc.strerror}") from None
    console.print(f"report written to {path}", markup=False, highlight=False)

"""`tagwriter config init|show|validate`: write, print and check the configuration."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tagwriter import config as config_mod
from tagwriter.cli.common import boundary, fail, global_options, load_config
from tagwriter.config import Config
from tagwriter.service import check_folders

config_app = typer.Typer(
    help="Write, print and check the configuration file (tagwriter.toml).\n\n"
    "Example: tagwriter config init && tagwriter config validate",
    no_args_is_help=True,
    rich_markup_mode=None,
)

HEADER = """\
# tagwriter configuration, written by `tagwriter config init`.
# Precedence: command-line flags > environment TAGWRITER_<SECTION>__<KEY>
# (e.g. TAGWRITER_WRITER__BATCH_SIZE=1000) > this file > built-in defaults.
# Keep the database password out of this file: set TAGWRITER_DATABASE_PASSWORD.
# Check it with: tagwriter config validate
"""

PathArg = Annotated[
    Path | None,
    typer.Argument(metavar="PATH", help="Config file (default: --config, else ./tagwriter.toml if present)."),
]


@config_app.command("init")
@boundary
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the file.")] = config_mod.DEFAULT_PATH,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a complete, commented config file with every key at its default.

    Example: tagwriter config init /etc/tagwriter/tagwriter.toml
    """
    text = commented_toml(Config())
    try:
        with open(path, "w" if force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise fail(f"{path}: already exists; not overwritten", hint="add --force to replace it") from None
    except OSError as exc:
        raise fail(f"{path}: cannot write: {exc.strerror}") from None
    config_mod.load(path, env={})  # what we wrote must load back
    typer.echo(f"wrote {path}: every key at its default; edit it, then run: tagwriter config validate {path}")


@config_app.command("show")
@boundary
def show(ctx: typer.Context, path: PathArg = None) -> None:
    """Print the effective config (file < environment < flags) as TOML, secrets redacted.

    Example: tagwriter --config examples/postgresql.toml config show
    """
    config = _load(ctx, path)
    typer.echo(f"# effective config: {_origin(ctx, path)}")
    typer.echo(config.dumps(redact=True), nl=False)


@config_app.command("validate")
@boundary
def validate(ctx: typer.Context, path: PathArg = None) -> None:
    """Check a config file with the environment applied, and that its folders take files; exit 0 if valid, else 1.

    Example: tagwriter config validate examples/oracle.toml
    """
    config = _load(ctx, path)
    check_folders(config)  # a folder that takes no files is found now, not at the first outage
    db = config_mod.redact_url(config.database.url)
    typer.echo(f"ok: {_origin(ctx, path)} is valid (database {db}, source {config.source.kind})")


def _load(ctx: typer.Context, path: Path | None) -> Config:
    if path is not None:
        global_options(ctx).config_path = path
    return load_config(ctx)


def _origin(ctx: typer.Context, path: Path | None) -> str:
    """Where the effective config came from, in words."""
    chosen = path or global_options(ctx).config_path
    if chosen is None and config_mod.DEFAULT_PATH.is_file():
        chosen = config_mod.DEFAULT_PATH
    parts = [str(chosen) if chosen is not None else "built-in defaults"]
    env = sorted(config_mod.env_settings(os.environ, warn=lambda _message: None))
    if env:
        parts.append("environment " + ", ".join(env))
    return " + ".join(parts)


def commented_toml(config: Config) -> str:
    """The whole tree as TOML (values by tomli-w, via `toml_value`), each key under a comment saying what it is.

    Secrets are written empty: they belong in the environment.
    """
    out = [HEADER]
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        out.append(f"\n[{section.name}]\n")
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f.metadata.get("secret"):
                value = ""
            out.append(f"# {f.metadata.get('help', '')}{_allowed(f.metadata)}\n")
            out.append(f"{f.name} = {config_mod.toml_value(value)}\n")
    return "".join(out)


def _allowed(meta: Any) -> str:
    if meta.get("choices"):
        return f" [{' | '.join(meta['choices'])}]"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f" [{lo:g}..{hi:g}]"
    if lo is not None:
        return f" [>= {lo:g}]"
    return ""

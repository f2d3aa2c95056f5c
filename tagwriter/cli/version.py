"""`tagwriter version`."""

from __future__ import annotations

import importlib.metadata
import platform

import typer

from tagwriter._version import __version__


def version(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Python and driver versions."),
) -> None:
    """Print the tagwriter version.

    Example: tagwriter version --verbose
    """
    typer.echo(f"tagwriter {__version__}")
    if verbose:
        typer.echo(f"python {platform.python_version()}")
        for dist in ("oracledb", "psycopg", "typer", "rich"):
            typer.echo(f"{dist} {_dist_version(dist)}")


def _dist_version(dist: str) -> str:
    """The installed version of a distribution, or `not installed`."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"

"""`tagwriter version`."""

from __future__ import annotations

import platform

import typer

from tagwriter import __version__


def version(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Python and driver versions."),
) -> None:
    """Print the tagwriter version.

    Example: tagwriter version --verbose
    """
    typer.echo(f"tagwriter {__version__}")
    if verbose:
        import oracledb
        import rich

        typer.echo(f"python {platform.python_version()}")
        typer.echo(f"oracledb {oracledb.__version__}")
        typer.echo(f"typer {typer.__version__}")
        typer.echo(f"rich {getattr(rich, '__version__', 'unknown')}")

"""The `tagwriter` command line: one Typer app, one file per command."""

from __future__ import annotations


def main() -> None:
    from tagwriter.cli.app import app

    app()

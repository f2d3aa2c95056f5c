"""The `tagwriter` command line: one Typer app, one file per command."""

from __future__ import annotations


def main() -> None:
    from tagwriter.cli.signals import install_early

    # Before the app is imported (a few hundred ms) or anything is read: a
    # SIGTERM during start-up is then a graceful stop of `run`, not a kill.
    install_early()
    from tagwriter.cli.app import app

    app()

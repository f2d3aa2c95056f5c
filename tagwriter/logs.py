"""Logging set-up: module loggers everywhere, configured once here."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(
    level: str = "INFO",
    file: str | Path | None = None,
    *,
    max_bytes: int = 10 * 1024**2,
    backup_count: int = 5,
    console: bool = True,
    console_handler: logging.Handler | None = None,
) -> None:
    """Log to the console (stderr, or `console_handler`) and, if `file`, a rotating file.

    Replaces handlers an earlier call installed, so it may be called again.
    """
    root = logging.getLogger("tagwriter")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if getattr(handler, "_tagwriter", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    if console:
        handlers.append(console_handler or logging.StreamHandler())
    if file:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._tagwriter = True  # type: ignore[attr-defined]
        root.addHandler(handler)

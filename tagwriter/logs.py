"""Logging set-up: module loggers everywhere, configured once here; every line redacted (tagwriter.redact)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from tagwriter.errors import ConfigError
from tagwriter.redact import redact

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """A Formatter whose whole line, traceback included, passes `redact`: a driver's message or a
    connect string in a log argument cannot write a password to the console or the file."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(
    level: str = "INFO",
    file: str | Path | None = None,
    *,
    max_bytes: int = 10 * 1024**2,
    backup_count: int = 5,
    console: bool = True,
    console_handler: logging.Handler | None = None,
) -> None:
    """Log to the console (stderr, or `console_handler`) and, if `file`, a rotating file; both redacted.

    Replaces handlers an earlier call installed, so it may be called again.
    Raises ConfigError (and changes nothing) if the file cannot be opened.
    """
    handlers: list[logging.Handler] = []
    if file:
        handlers.append(_file_handler(file, max_bytes, backup_count))
    if console:
        handlers.insert(0, console_handler or logging.StreamHandler())
    root = logging.getLogger("tagwriter")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if getattr(handler, "_tagwriter", False):
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        handler.setFormatter(RedactingFormatter(FORMAT))
        handler._tagwriter = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _file_handler(file: str | Path, max_bytes: int, backup_count: int) -> logging.Handler:
    """A rotating file handler; ConfigError naming `logging.file` if the file cannot be opened."""
    try:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backup_count,
                                                    encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError | NotADirectoryError):
            why = f"{why}: a part of the path is a file, not a folder"
        raise ConfigError(f"logging.file = {str(file)!r}: cannot open: {why}",
                          hint="give a file path in a writable folder (--log-file or logging.file)") from None


def reopen_log_files() -> int:
    """Reopen every file the tagwriter log writes to by its name (logrotate moved it); returns how many.

    A file that cannot be opened keeps its old stream, and the error is logged.
    """
    reopened = 0
    for handler in logging.getLogger("tagwriter").handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            stream = handler._open()
        except OSError as exc:
            logging.getLogger(__name__).error("cannot reopen the log file %s: %s", handler.baseFilename, exc)
            continue
        handler.acquire()
        try:
            old, handler.stream = handler.stream, stream
        finally:
            handler.release()
        if old is not None:
            old.close()
        reopened += 1
    return reopened

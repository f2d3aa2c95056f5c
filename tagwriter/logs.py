"""Logging set-up: module loggers everywhere, configured once here; every line redacted (tagwriter.redact).

Two formats: `text` for people, `json` (one object per line) for log shippers.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path

from tagwriter.errors import ConfigError
from tagwriter.redact import redact

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class RedactingFormatter(logging.Formatter):
    """A Formatter whose whole line, traceback included, passes `redact`: a driver's message or a
    connect string in a log argument cannot write a password to the console or the file."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (journald, Vector, Fluent Bit, Promtail).

    Keys: time (ISO-8601 UTC), level, logger, thread, message, and exception
    (the traceback text) or stack when the record has one. Each text is
    redacted before it is encoded, as the text format's whole line is, so a
    JSON escape cannot hide a password from `redact`.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": redact(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False)


def make_formatter(fmt: str) -> logging.Formatter:
    """The redacting formatter of a log format ("text" or "json"); ValueError for another name."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: not one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter() if fmt == "json" else RedactingFormatter(FORMAT)


LIBRARY_LOGGERS = ("asyncua", "pymodbus", "nats", "paho")


def configure_logging(
    level: str = "INFO",
    file: str | Path | None = None,
    *,
    max_bytes: int = 10 * 1024**2,
    backup_count: int = 5,
    console: bool = True,
    console_handler: logging.Handler | None = None,
    fmt: str = "text",
) -> None:
    """Log to the console (stderr, or `console_handler`) and, if `file`, a rotating file; both redacted.

    `fmt` is "text" or "json" (`logging.format`).
    Replaces handlers an earlier call installed, so it may be called again.
    Raises ConfigError (and changes nothing) if the file cannot be opened.
    """
    formatter = make_formatter(fmt)
    handlers: list[logging.Handler] = []
    if file:
        handlers.append(_file_handler(file, max_bytes, backup_count))
    if console:
        handlers.insert(0, console_handler or logging.StreamHandler())
    root = logging.getLogger("tagwriter")
    root.setLevel(level.upper())
    for name in (None, *LIBRARY_LOGGERS):
        logger = root if name is None else logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, "_tagwriter", False):
                logger.removeHandler(handler)
                if name is None:
                    handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._tagwriter = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # The plant sources' client libraries log on their own loggers: through the same (redacting) handlers,
    # warnings and up only (their debug output can hold a password), and not again through the root logger.
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, root.level))
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)


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

"""The database a spool folder's files are meant for: its `.target` file.

`run` records it as it starts on the folder (`SpoolDrain.check_target`);
the automatic drain leaves another database's files alone, and `replay`
goes to the recorded database by default. A target is `sink.describe()`
(never a password), a relative SQLite path made absolute.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError
from tagwriter.redact import REDACTED
from tagwriter.sinks.base import Sink

TARGET_FILE = ".target"
_SQLITE = "sqlite:///"
_TABLE = " table "


def sink_target(sink: Sink) -> str:
    """The target `sink` writes to; test wrappers (`.inner`) are seen through."""
    while getattr(sink, "inner", None) is not None:
        sink = sink.inner  # type: ignore[attr-defined]
    return canonical(sink.describe())


def canonical(target: str) -> str:
    """`target` with a relative SQLite path made absolute (from the current folder)."""
    if target.startswith(_SQLITE):
        path, sep, table = target[len(_SQLITE):].rpartition(_TABLE)
        if sep and not os.path.isabs(path):
            return f"{_SQLITE}{os.path.abspath(path)}{_TABLE}{table}"
    return target


def read_target(directory: Path | str) -> str:
    """The target recorded in `directory` ('' when none is, or it cannot be read)."""
    try:
        text = (Path(directory) / TARGET_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return canonical(text) if text else ""


def record_target(directory: Path | str, target: str) -> None:
    """Record `target` in `directory` (written aside, then renamed). Raises OSError."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / TARGET_FILE
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(target + "\n", encoding="utf-8")
    tmp.replace(marker)


def target_database(target: str, base: DatabaseConfig) -> DatabaseConfig | None:
    """`base` pointed at the database `target` names (its password, columns and timeouts kept).

    None when the target does not say enough to connect (an Oracle connect
    string shown redacted, or a text tagwriter did not write).
    """
    where, sep, table = target.rpartition(_TABLE)
    if not sep or not table:
        return None
    if where.startswith("oracle "):  # "oracle USER@DSN"
        user, at, dsn = where.removeprefix("oracle ").partition("@")
        if not at or not user or not dsn or REDACTED in dsn:
            return None
        return dataclasses.replace(base, url=f"oracle://{user}@", user=user, dsn=dsn, table=table)
    try:
        parse_url(where)
    except ConfigError:
        return None
    return dataclasses.replace(base, url=where, user="", dsn="", table=table)  # the URL names the user

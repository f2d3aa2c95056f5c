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


class TargetMismatch(ConfigError):
    """The files were spooled for another database than the one chosen (the CLI exits 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayDatabase:
    """Where a replay goes, and a line for the operator when it is the recorded target."""

    database: DatabaseConfig
    note: str = ""


def replay_database(
    configured: DatabaseConfig, paths: list[Path], *, chosen: str = "", given_as_flag: bool = False,
    ignore_target: bool = False,
) -> ReplayDatabase:
    """The database to replay `paths` into: the one their spool folder records, unless one is chosen.

    `chosen` says where `configured` was chosen ('' = the built-in default).
    Raises TargetMismatch when folders record different databases, or the
    chosen database differs from the recorded one (unless `ignore_target`).
    """
    from tagwriter.sinks import create_sink  # the drivers load only when a replay needs them

    recorded: dict[str, list[Path]] = {}
    for folder in dict.fromkeys(p.parent for p in paths):
        # a replayed/ or quarantine/ folder holds files of the spool folder above it
        for where in (folder, folder.parent):
            if target := read_target(where):
                recorded.setdefault(target, []).append(where / TARGET_FILE)
                break
    if not recorded or (ignore_target and chosen):
        return ReplayDatabase(configured)
    if len(recorded) > 1:
        names = "; ".join(f"{t} ({', '.join(map(str, marks))})" for t, marks in recorded.items())
        raise TargetMismatch(f"the files were spooled for different databases: {names}",
                             hint="replay the files of one spool folder at a time")
    [(target, marks)] = recorded.items()
    current = sink_target(create_sink(configured))
    if current == target:
        return ReplayDatabase(configured)
    if chosen:
        raise TargetMismatch(
            f"the files were spooled for {target} ({marks[0]}), not for {current} ({chosen})",
            hint=f"leave out {'--database' if given_as_flag else 'the database setting'} to replay into {target}, "
                 f"or add --ignore-target to replay into {current} anyway")
    db = target_database(target, configured)
    if db is None:
        raise TargetMismatch(f"the files were spooled for {target} ({marks[0]}), which names no database URL",
                             hint="give it with --database URL")
    return ReplayDatabase(db, f"replaying into {target} (recorded in {marks[0]})")

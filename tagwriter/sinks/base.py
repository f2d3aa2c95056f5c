"""The `Sink` protocol every database implements, and what a write returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tagwriter.config import DatabaseConfig
from tagwriter.errors import RowError
from tagwriter.models import TagValue


@dataclass(slots=True)
class WriteResult:
    """The outcome of one committed batch.

    written + duplicates + len(rejected) == rows given. `rejected` rows were not
    stored; the writer quarantines them.
    """

    written: int
    duplicates: int = 0
    rejected: list[RowError] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """What one column of the tagwriter table must look like in a given database.

    `nullable` None accepts either; `matches` gets the type as the database reports it.
    """

    name: str
    want: str
    matches: Callable[[str], bool]
    nullable: bool | None


def table_differences(
    info: TableInfo, rules: Sequence[ColumnRule], key: tuple[str, str], *, fold: Callable[[str], str] = str.lower
) -> list[str]:
    """How `info` differs from `rules` and the (tag, ts) `key`; [] = writable as tagwriter expects.

    `fold` normalises identifiers for comparison (Oracle folds to upper case, SQLite
    compares without case, PostgreSQL keeps them as they are).
    """
    found = {fold(c.name): c for c in info.columns}
    diffs: list[str] = []
    for rule in rules:
        col = found.get(fold(rule.name))
        if col is None:
            diffs.append(f"column {rule.name} is missing (expected {rule.want})")
            continue
        if not rule.matches(col.type):
            diffs.append(f"column {rule.name} is {col.type or 'untyped'}, expected {rule.want}")
        if rule.nullable is not None and col.nullable != rule.nullable:
            diffs.append(f"column {rule.name} is {'nullable' if col.nullable else 'NOT NULL'}, "
                         f"expected {'nullable' if rule.nullable else 'NOT NULL'}")
    have = [fold(k) for k in info.key]
    if not have:
        diffs.append(f"no primary key or unique constraint on ({key[0]}, {key[1]}): "
                     "duplicates would not be detected and replay would not be idempotent")
    elif set(have) != {fold(key[0]), fold(key[1])}:
        diffs.append(f"the key is ({', '.join(info.key)}), expected ({key[0]}, {key[1]})")
    return diffs


@runtime_checkable
class Sink(Protocol):
    """A database tagwriter writes to.

    `write_batch` and `open` are called from the writer thread only; `probe`
    may be called from another thread and must use its own connection.
    Every method raises TransientError or FatalError (never a driver error)
    and returns within the configured timeouts.
    """

    kind: str

    def open(self) -> None:
        """Connect (and create the table where the sink does that)."""
        ...

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        """Insert the rows in one transaction and commit."""
        ...

    def probe(self) -> None:
        """Check that the database answers and the table is usable."""
        ...

    def close(self) -> None:
        """Release connections; never raises."""
        ...

    def describe(self) -> str:
        """The target for logs and the panel, without secrets."""
        ...


@dataclass(frozen=True, slots=True)
class TableSpec:
    """The table's name and column names, validated as SQL identifiers by config."""

    table: str = "tag_values"
    tag: str = "tag_name"
    ts: str = "ts"
    value: str = "value"
    quality: str = "quality"

    @classmethod
    def from_config(cls, c: DatabaseConfig) -> TableSpec:
        return cls(c.table, c.tag_column, c.ts_column, c.value_column, c.quality_column)

    @property
    def columns(self) -> tuple[str, str, str, str]:
        return (self.tag, self.ts, self.value, self.quality)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """A column as the database reports it (type name in the database's words)."""

    name: str
    type: str
    nullable: bool


@dataclass(frozen=True, slots=True)
class TableInfo:
    """An existing table: its columns, and the columns of its primary/unique key in order."""

    columns: list[ColumnInfo]
    key: list[str]


@runtime_checkable
class AdminSink(Sink, Protocol):
    """What `init-db` and `test-connection` need beyond writing. Every real sink has it.

    Each method opens what it needs, raises TransientError/FatalError, and is
    bounded by the configured timeouts.
    """

    spec: TableSpec  # the table's name and column names

    def reach(self) -> str:
        """Reach the server (TCP connect for a network database, the file's folder
        for SQLite) without logging in; returns what was reached."""
        ...

    def login(self) -> None:
        """Open a session (log in) and close it."""
        ...

    def server_version(self) -> str:
        ...

    def ddl(self, *, read_index: bool = False, partition_by_day: bool = False) -> list[str]:
        """The CREATE statements of DESIGN.md's table for this database."""
        ...

    def create_table(self, *, read_index: bool = False, partition_by_day: bool = False) -> None:
        """Run `ddl()`. Idempotent: objects that exist are kept (init-db relies on it to
        add only the read index to an existing table)."""
        ...

    def inspect_table(self) -> TableInfo | None:
        """The table as it exists, or None if it does not."""
        ...

    def table_differences(self, info: TableInfo) -> list[str]:
        """How `info` differs from the expected table ([] = it matches)."""
        ...

    def try_insert(self) -> None:
        """Insert a probe row and roll it back (proves the insert privilege)."""
        ...

    def ping(self) -> None:
        """One round trip to the server."""
        ...

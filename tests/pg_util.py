"""The real PostgreSQL on 127.0.0.1:5432 for tests: a fresh database per test, dropped after.

`fresh_database()` skips the calling test (with the reason) when no server
answers. Override the server with `TAGWRITER_TEST_PG_ADMIN` (a libpq
conninfo string for a user allowed to CREATE DATABASE).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")

ADMIN_DSN = os.environ.get(
    "TAGWRITER_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
)


@dataclass
class PgDatabase:
    """A throwaway database: its name, where the server is, and who owns it."""

    name: str
    host: str
    port: int
    user: str
    extra_roles: list[str] = field(default_factory=list)

    def url(self, *, host: str | None = None, port: int | None = None, user: str | None = None) -> str:
        """A tagwriter database.url for it (no password: the test server trusts loopback)."""
        return (f"postgresql://{user or self.user}@{host or self.host}:{port or self.port}/{self.name}")

    def connect(self, **kwargs: Any) -> Any:
        """A direct psycopg connection (autocommit) for assertions and setup."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=self.name,
                               connect_timeout=3, **kwargs)

    def rows(self, table: str = "tag_values") -> list[tuple[Any, ...]]:
        """Every row of `table` as (tag_name, ts, value, quality), ordered."""
        with self.connect() as conn:
            return conn.execute(
                f'SELECT tag_name, ts, value, quality FROM "{table}" ORDER BY tag_name, ts'
            ).fetchall()

    def count(self, table: str = "tag_values") -> int:
        with self.connect() as conn:
            row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            return int(row[0]) if row else 0


def _admin() -> Any:
    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable ({ADMIN_DSN}): {' '.join(str(exc).split())[:160]}")


@contextlib.contextmanager
def fresh_database(prefix: str = "tw_test") -> Iterator[PgDatabase]:
    """Create an empty database, yield it, drop it (and roles made for it) afterwards."""
    admin = _admin()
    info = admin.info
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    host = "127.0.0.1" if info.host.startswith("/") else info.host  # the fault proxy needs TCP
    db = PgDatabase(name, host, info.port, info.user)
    try:
        yield db
    finally:
        with contextlib.suppress(psycopg.Error):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for role in db.extra_roles:
            with contextlib.suppress(psycopg.Error):
                admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


def create_role(db: PgDatabase, *, login: bool = True) -> str:
    """A new role (dropped with the database), with CONNECT and TEMPORARY on `db` only."""
    name = f"tw_role_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{name}" {"LOGIN" if login else "NOLOGIN"}')
    db.extra_roles.append(name)
    with db.connect() as conn:
        conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db.name}" TO "{name}"')
    return name

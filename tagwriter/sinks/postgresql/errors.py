"""PostgreSQL errors: SQLSTATE classes into transient / fatal / row errors, with hints for the operator."""

from __future__ import annotations

from tagwriter.errors import FatalError, SinkError, TransientError

ROW_ERROR_CLASSES = ("22", "23")
_TRANSIENT_CODES = frozenset({"57P01", "57P02", "57P03", "57P05", "57014", "55P03", "55006"})
_TRANSIENT_CLASSES = ("08", "40", "53", "58", "HV")
_FATAL_HINTS = {
    "42P01": "run tagwriter init-db to create the table, or fix database.table",
    "42703": "the table lacks a configured column: fix database.*_column or run tagwriter init-db",
    "42P10": "the table needs PRIMARY KEY (tag_name, ts): see tagwriter init-db",
    "42501": "grant SELECT, INSERT on the table (and CONNECT on the database) to the user",
    "28P01": "check the password (TAGWRITER_DATABASE_PASSWORD)",
    "28000": "check database.user and the server's pg_hba.conf",
    "3D000": "create the database, or fix the database name in database.url",
    "3F000": "create the schema, or fix the search_path",
    "25006": "the server is read-only (a standby?): point database.url at the primary",
    "57P04": "the database was dropped: create it, or fix database.url",
}
_FATAL_CLASSES = ("28", "3D", "3F", "42", "0A", "25", "2B", "2F", "P0")
# Connection failures carry no SQLSTATE: recognise the server's FATAL messages.
_CONNECT_FATAL = (
    (("authentication failed",), "28P01"),
    (("no password supplied",), "28P01"),
    (("no pg_hba.conf entry",), "28000"),
    (('role "', "does not exist"), "28000"),
    (('database "', "does not exist"), "3D000"),
    (("permission denied for database",), "42501"),
)


def is_row_error(exc: BaseException) -> bool:
    """True for errors one row causes: data exceptions and constraint violations."""
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(ROW_ERROR_CLASSES)


def classify(exc: BaseException, where: str) -> SinkError:
    """Map a psycopg (or socket) error to TransientError (retry) or FatalError (configuration)."""
    state = getattr(exc, "sqlstate", None) or ""
    text = error_text(exc)
    if state:
        if state in _TRANSIENT_CODES or state.startswith(_TRANSIENT_CLASSES):
            return TransientError(f"{where}: {text}", code=state)
        if state in _FATAL_HINTS or state.startswith(_FATAL_CLASSES):
            return FatalError(f"{where}: {text}", code=state, hint=_FATAL_HINTS.get(state, ""))
        return TransientError(f"{where}: {text}", code=state)
    low = text.lower()
    for needles, code in _CONNECT_FATAL:
        if all(n in low for n in needles):
            return FatalError(f"{where}: {text}", code=code, hint=_FATAL_HINTS[code])
    # Refused, reset, timed out, "the database system is starting up", "too
    # many clients", a closed connection: all worth retrying.
    return TransientError(f"{where}: {text}", code=type(exc).__name__)


def error_text(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(exc)
    return " ".join(text.split())  # libpq messages span lines

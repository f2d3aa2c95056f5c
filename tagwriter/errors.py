"""Domain exceptions, and the classes a driver error falls into.

Every sink translates its driver's errors into one of these so the writer can
decide: `TransientError` -> retry, then outage mode; `FatalError` -> stop
retrying, spool, tell the operator; a row error -> quarantine that row only;
a duplicate key -> already written.
"""

from __future__ import annotations

from dataclasses import dataclass

from tagwriter.redact import redact


class TagwriterError(Exception):
    """Base of all tagwriter errors; its message is meant for the operator.

    Message and hint are redacted when the error is made (tagwriter.redact): whatever text a
    driver or a config value put in them, no known password leaves the process through one.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "", code: str = "") -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.code = code
        if hint:
            self.hint = redact(hint)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class ConfigError(TagwriterError):
    """Invalid configuration; the message names the key path or file:line."""


class SinkError(TagwriterError):
    """A database call failed as a whole (not one row)."""


class TransientError(SinkError):
    """The database is unreachable, restarting or timed out: retry later."""


class FatalError(SinkError):
    """Retrying will not help (missing table, bad password, privileges)."""


class LoginRefusedError(FatalError):
    """The database refused the login itself (wrong password, locked or expired account).

    Not even probed again: every failed login counts against the account's
    limit (Oracle's DEFAULT profile locks it after 10, for everyone using it).
    """


class PipelineStopped(TagwriterError):
    """`submit` after `stop()`: the value was not taken."""


class SpoolError(TagwriterError):
    """A spool (backup) or quarantine file could not be written."""


class SpoolFullError(SpoolError):
    """The spool folder reached its configured size cap."""


class InputError(TagwriterError):
    """A malformed input line or backup row; `location` is file:line."""

    def __init__(self, location: str, reason: str, raw: str = "") -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True, slots=True)
class RowError:
    """One row of a batch that the database rejected.

    `index` is the row's position in the batch given to `Sink.write_batch`.
    """

    index: int
    code: str
    message: str

    def __post_init__(self) -> None:
        # The driver's message lands in a quarantine file and the log: redacted like any error text.
        object.__setattr__(self, "message", redact(self.message))

"""Redaction: the one step every text leaving the process passes (logs, stderr, metrics, reports).

The process registers the secrets it knows (`register`, `register_database`) when a config is
validated or a sink is built; `redact(text)` replaces each of them, and any password written in
URL (`user:pw@`), connect-string (`user/pw@`) or `password=` syntax, by `***`. Thread-safe.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from tagwriter.config import DatabaseConfig

REDACTED = "***"
#: Shorter strings occur in ordinary text (and are no password worth the name); their URL and
#: connect-string syntax is still redacted.
MIN_SECRET_LENGTH = 4

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()  # longest first, so a secret holding another is replaced whole

# `scheme://user:password@host`: the user info ends at the last '@' of the token (a password may hold '@').
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*@")
# Oracle `user/password@host...`, the user at the start of a word (not inside a path).
_DSN_USERINFO = re.compile(r"(?<![\w/.:$#-])([A-Za-z][\w$#.]*/)[^\s/@'\"]+@")
# `password=...` (query parameters, libpq conninfo, KEY=VALUE): any key naming a password.
_PARAM = re.compile(r"(?i)(\b\w*(?:password|passwd|pwd)\w*\s*=\s*)(\"[^\"]*\"|'[^']*'|[^\s&;#'\"]*)")
# The same in a URL's query only (a URL value may hold spaces the free-text rule would stop at).
SECRET_PARAM = re.compile(r"([?&;][^=&;#]*(?:password|passwd|pwd)[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def register(*secrets: str) -> None:
    """Have `redact` hide these strings (and their percent-encoded forms) for the life of the process.

    Never forgotten: after a config reload the old password may still sit in a queued message.
    Strings shorter than MIN_SECRET_LENGTH are ignored.
    """
    global _secrets
    found = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
    found |= {quote(s, safe="") for s in found}
    with _lock:
        if not found <= set(_secrets):
            _secrets = tuple(sorted(set(_secrets) | found, key=len, reverse=True))


def register_database(config: DatabaseConfig) -> None:
    """Register every secret of a `[database]` section: passwords, and those written in the URL or dsn."""
    register(config.password, config.wallet_password, *url_passwords(config.url), *dsn_passwords(config.dsn))


def redact(text: str) -> str:
    """`text` with every registered secret, and every password in URL / dsn / `password=` syntax, as `***`."""
    if not text:
        return text
    for secret in _secrets:  # one read of the tuple: a concurrent register() swaps it whole
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "@" in text:
        text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
        text = _DSN_USERINFO.sub(rf"\1{REDACTED}@", text)
    if "=" in text:
        text = _PARAM.sub(_redact_param, text)
    return text


def redact_tree(value: Any) -> Any:
    """A copy of JSON-like data (dicts, lists, tuples) with `redact` applied to every string in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_tree(v) for v in value)
    return value


def _redact_param(m: re.Match[str]) -> str:
    value = m.group(2)
    quote_char = value[:1] if value[:1] in ("\"", "'") else ""
    # Unquoted, the value ends where the sentence goes on: "password = ***: must be a string".
    tail = "" if quote_char else value[len(value.rstrip(":,.)]")):]
    core = value[:len(value) - len(tail)].strip("\"'")
    if core in ("", REDACTED):
        return m.group(0)
    return f"{m.group(1)}{quote_char}{REDACTED}{quote_char}{tail}"


# -- one config value, parsed exactly (a password may hold '@', '/' or ':') --------------------


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`: in the user info and in query parameters.

    The user info ends at the last '@' (a password may hold '@', '/' or ':').
    """
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL at all (a typo?): still hide what looks like user:password@
        scheme, rest = "", url
    if scheme.lower() != "sqlite":  # a file path may hold ':' and '@'
        userinfo, at, hostpart = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostpart}"
    return SECRET_PARAM.sub(rf"\1{REDACTED}", f"{scheme}{sep}{rest}")


def redact_dsn(dsn: str) -> str:
    """An Oracle connect string with the password of `user/password@...` and password parameters as `***`."""
    if "://" in dsn:
        return redact_url(dsn)
    userinfo, at, rest = dsn.rpartition("@")
    if at and "/" in userinfo:
        dsn = f"{userinfo.partition('/')[0]}/{REDACTED}@{rest}"
    return SECRET_PARAM.sub(rf"\1{REDACTED}", dsn)


def url_passwords(url: str) -> list[str]:
    """The passwords written in a database URL: the user info's and password query parameters'."""
    scheme, sep, rest = url.partition("://")
    found = _param_values(url)
    if sep and scheme.lower() != "sqlite":
        userinfo, at, _ = rest.rpartition("@")
        if at and ":" in userinfo:
            password = userinfo.partition(":")[2]
            found += [password, unquote(password)]
    return found


def dsn_passwords(dsn: str) -> list[str]:
    """The passwords written in an Oracle connect string (`user/password@...`, password parameters)."""
    if "://" in dsn:
        return url_passwords(dsn)
    found = _param_values(dsn)
    userinfo, at, _ = dsn.rpartition("@")
    if at and "/" in userinfo:
        found.append(userinfo.partition("/")[2].strip('"'))
    return found


def _param_values(text: str) -> list[str]:
    values = [m.group(0).partition("=")[2] for m in SECRET_PARAM.finditer(text)]
    return values + [unquote(v) for v in values]


"""Oracle error codes, their classification (transient / fatal / login refused) and the operator hints.

Classified by the driver's `full_code`, never `isrecoverable` (False for
connect failures); unknown codes are transient, so nothing is lost while an
operator looks.
"""

from __future__ import annotations

import re
import socket

from tagwriter.errors import FatalError, LoginRefusedError, SinkError, TransientError

#: Connection-class errors: the database is unreachable, restarting, overloaded
#: or timed out. Retry, then outage mode. Lost-session ORA codes (03113, 03114,
#: 03135, 01089, 12537, ...) reach us as DPY-4011; both spellings are listed.
TRANSIENT_CODES = frozenset({
    "DPY-1001", "DPY-1002", "DPY-4005", "DPY-4011", "DPY-4024", "DPY-4033",
    "DPY-6000", "DPY-6001", "DPY-6003", "DPY-6005",
    "DPI-1067", "DPI-1080",
    "ORA-00018", "ORA-00020", "ORA-00028", "ORA-00054", "ORA-00060", "ORA-00257",
    "ORA-00376", "ORA-00603", "ORA-01012", "ORA-01013", "ORA-01033", "ORA-01034",
    "ORA-01089", "ORA-01090", "ORA-01092", "ORA-01115", "ORA-01652", "ORA-01653",
    "ORA-01654", "ORA-01688", "ORA-02396", "ORA-03113", "ORA-03114", "ORA-03135",
    "ORA-12153", "ORA-12170", "ORA-12500", "ORA-12505", "ORA-12514", "ORA-12516",
    "ORA-12519", "ORA-12520", "ORA-12521", "ORA-12526", "ORA-12527", "ORA-12528",
    "ORA-12537", "ORA-12541", "ORA-12543", "ORA-12547", "ORA-12560", "ORA-12570",
    "ORA-12571", "ORA-12757", "ORA-24457", "ORA-25408", "ORA-30006",
    "TIMEOUT",
})

#: Configuration errors: retrying cannot fix them (missing table, bad
#: password, privileges, unknown TNS alias, missing client libraries).
# The login itself refused: retrying counts against FAILED_LOGIN_ATTEMPTS (account lockout).
LOGIN_REFUSED_CODES = frozenset({"ORA-01017", "ORA-28000", "ORA-28001", "ORA-01045"})

FATAL_CODES = frozenset({
    "ORA-00904", "ORA-00913", "ORA-00942", "ORA-00947", "ORA-00955", "ORA-01005",
    "ORA-01017", "ORA-01031", "ORA-01045", "ORA-01502", "ORA-01950", "ORA-12154",
    "ORA-28000", "ORA-28001", "ORA-39726",
    "DPY-4000", "DPY-4001", "DPY-4017", "DPY-4018", "DPY-4026", "DPY-4027",
    "DPY-6002", "DPY-6006", "DPY-6008",
    "DPI-1047", "DPI-1072",
})

DUPLICATE_CODE = "ORA-00001"

TIMEOUT_HINT = "host reachable? a listener that accepts but never answers, or an overloaded database"


def error_code(exc: BaseException) -> str:
    """The driver's `full_code` (DPY-6005, ORA-00942, ...) of an exception, or ''."""
    err = exc.args[0] if exc.args else None
    return str(getattr(err, "full_code", "") or "")


def error_text(exc_or_err: object) -> str:
    """The driver message on one line: no help URL, no connection id, no leading code."""
    err = exc_or_err
    if isinstance(exc_or_err, BaseException) and exc_or_err.args:
        err = exc_or_err.args[0]
    message = getattr(err, "message", None)
    text = message if isinstance(message, str) else str(exc_or_err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Help: ")]
    text = " / ".join(lines)
    text = re.sub(r"\s*\(CONNECTION_ID=[^)]*\)", "", text)
    return re.sub(r"^[A-Z]{2,4}-\d{4,5}:\s*", "", text)


def is_transient_code(code: str) -> bool:
    return code in TRANSIENT_CODES or code.startswith("DPY-6")


def is_fatal_code(code: str) -> bool:
    return code in FATAL_CODES or code.startswith(("DPY-2", "DPY-3"))


def hint_for(code: str, text: str, target: str = "the database", table: str = "the table") -> str:
    """A fix for the operator, right for this error (code plus message)."""
    low = text.lower()
    if code == "DPY-6005":
        if "refused" in low:
            return f"no listener at {target}: check host, port, firewall"
        if "timed out" in low:
            return f"no TCP answer from {target} within connect_timeout: host reachable? firewall dropping packets?"
        if "name or service not known" in low or "name resolution" in low or "nodename" in low:
            return "the host name does not resolve: check the host in database.url / database.dsn"
        if "ssl" in low or "certificate" in low:
            return "TLS handshake failed: check the tcps port, wallet_location and the server certificate"
        if "dpy-4011" in low or "reset" in low or "closed the connection" in low:
            return (f"something at {target} accepted the connection and closed it: is it an Oracle "
                    "listener, and is the protocol right (tcp vs tcps)?")
        return f"cannot connect to {target}: check host, port, firewall"
    if code in ("DPY-6001", "ORA-12514"):
        return (f"listener up but service name unknown at {target}: check the service name "
                "(lsnrctl services), or the database is still starting")
    if code in ("DPY-6003", "ORA-12505"):
        return f"listener up but SID unknown at {target}: check the SID, or use a service name"
    if code in ("DPY-6000", "ORA-12516", "ORA-12519", "ORA-12520", "ORA-12528"):
        return "the listener refused the connection: database starting, restricted, or out of processes"
    if code == "ORA-12541":
        return f"no listener at {target}: check host, port, firewall"
    if code == "ORA-12170":
        return f"connect to {target} timed out: host reachable? firewall?"
    if code == "ORA-01017":
        return "user or password wrong: check database.user and TAGWRITER_DATABASE_PASSWORD (or database.password)"
    if code == "ORA-28000":
        return "the account is locked: ALTER USER ... ACCOUNT UNLOCK"
    if code == "ORA-28001":
        return "the password has expired: set a new one (ALTER USER ... IDENTIFIED BY ...)"
    if code == "ORA-01045":
        return "the user lacks CREATE SESSION: GRANT CREATE SESSION TO <user>"
    if code == "ORA-00942":
        return (f"table {table} missing or not visible to this user: run `tagwriter init-db` "
                "(or have a DBA run `tagwriter init-db --print`) and GRANT INSERT, SELECT on it")
    if code == "ORA-01031":
        return f"insufficient privileges: GRANT INSERT, SELECT ON {table} TO <user> (CREATE TABLE for init-db)"
    if code == "ORA-01950":
        return "no quota on the tablespace: ALTER USER <user> QUOTA 10G ON <tablespace>"
    if code == "ORA-00904":
        return "a column does not exist: compare database.*_column with the table (tagwriter test-connection)"
    if code == "ORA-01502":
        return f"an index of {table} is UNUSABLE (after a failed direct path load?): ALTER INDEX ... REBUILD"
    if code in ("DPY-4000", "ORA-12154"):
        return "TNS alias not found: check database.dsn and tnsnames.ora in database.config_dir"
    if code == "DPY-4027":
        return "set database.config_dir to the folder of tnsnames.ora"
    if code == "DPI-1047":
        return ("Oracle Client libraries not found: install Instant Client and set database.lib_dir, "
                "or thick_mode = false")
    if code == "DPY-4005":
        if "busy" in low:
            return "all pooled connections are busy: raise database.pool_max or look for slow calls"
        return TIMEOUT_HINT
    if code in ("DPY-4024", "DPI-1067", "TIMEOUT"):
        return TIMEOUT_HINT + "; raise database.call_timeout if calls are just slow"
    if code in ("DPY-4011", "ORA-03113", "ORA-03114", "ORA-03135", "DPY-1001"):
        return ("the database or network closed the connection: database restarting, or a firewall "
                "dropping idle sessions (add expire_time to the DSN)")
    if code in ("ORA-01033", "ORA-01034", "ORA-01089", "ORA-01090"):
        return "the database is starting up or shutting down: wait, or ask the DBA"
    if code == "ORA-25408":
        return "the call could not be replayed safely after a failover: it is retried"
    if code == "ORA-00257":
        return "archiver stuck: the DBA must free archive log space"
    if code in ("ORA-01652", "ORA-01653", "ORA-01654", "ORA-01688"):
        return "tablespace full: the DBA must add space"
    return ""


def classify(exc: BaseException, where: str, *, target: str = "the database", table: str = "the table") -> SinkError:
    """Map a driver exception to TransientError (retry) or FatalError (configuration).

    Classified by `full_code`; unknown codes are transient (the data is spooled
    and the database probed, so nothing is lost while an operator looks).
    """
    if isinstance(exc, SinkError):
        return type(exc)(f"{where}: {exc.message}", code=exc.code, hint=exc.hint)
    code = error_code(exc)
    if not code and isinstance(exc, OSError):
        # The driver lets some socket errors through unwrapped (a DNS failure is a bare
        # socket.gaierror): a network problem, so transient, with the socket hints.
        host, _, port = target.rpartition(":")
        failure = socket_error(exc, host or target, int(port) if port.isdigit() else 0, 0.0)
        return TransientError(f"{where}: {failure.message}", code=failure.code, hint=failure.hint)
    text = error_text(exc)  # redacted with the rest of the message by TagwriterError (the driver echoes the dsn)
    hint = hint_for(code, text, target, table)
    message = f"{where}: {text}"
    if not code:
        # not a driver error: a bug or a bad value; retrying will not help
        return FatalError(message, code=type(exc).__name__, hint=hint)
    if code in LOGIN_REFUSED_CODES:
        return LoginRefusedError(message, code=code, hint=hint)
    if is_fatal_code(code):
        return FatalError(message, code=code, hint=hint)
    return TransientError(message, code=code, hint=hint)


def socket_error(exc: OSError, host: str, port: int, timeout: float) -> TransientError:
    target = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return TransientError(f"cannot resolve {host}: {exc}", code="EAI_NONAME",
                              hint="the host name does not resolve: check the host in database.url / database.dsn")
    if isinstance(exc, TimeoutError):
        return TransientError(f"TCP connect to {target}: no answer within {timeout:g} s", code="ETIMEDOUT",
                              hint=f"no TCP answer from {target}: host reachable? firewall dropping packets?")
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(f"TCP connect to {target}: connection refused", code="ECONNREFUSED",
                              hint=f"no listener at {target}: check host, port, firewall")
    name = getattr(exc, "strerror", None) or str(exc)
    return TransientError(f"TCP connect to {target}: {name}", code="ENETUNREACH" if exc.errno == 101 else "EIO",
                          hint=f"cannot reach {target}: check the network route and firewall")

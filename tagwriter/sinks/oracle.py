"""Oracle Database through python-oracledb (thin mode by default, thick optional).

Inserts are `executemany(..., batcherrors=True)` with the bind types set
(`DB_TYPE_TIMESTAMP` keeps microseconds, `DB_TYPE_BINARY_DOUBLE` keeps NaN),
timestamps bound as naive UTC, then an explicit commit. Per-row errors come
back from `getbatcherrors()`: ORA-00001 is a duplicate (already written), any
other row error is a rejected row for quarantine. Whole-call errors are
classified by `full_code` (never `isrecoverable`, which is False for connect
failures) into TransientError or FatalError with a hint for the operator.

Connections come from `ConnectionPool`, a small bounded pool of our own, not
`oracledb.create_pool`: measured with 26.1 against a listener that accepts and
never answers, the driver pool's background thread wedges for good (every
acquire times out with DPY-4005 even after the listener is gone), `close()`
never returns, and since that thread is not a daemon the process can never
exit. Our pool opens each connection with `oracledb.connect` in a daemon
thread joined with `connect_timeout` (the driver's connect has no overall
timeout: `tcp_connect_timeout` only covers the TCP handshake), waits at most
`pool_wait_timeout` for a free connection (DPY-4005, as the driver's TIMEDWAIT
pool does), sets `call_timeout` on every acquired connection, and pings a
connection that sat idle longer than `ping_interval` before reuse (the
driver's default of 60 s). At most `pool_max` connects can be in flight, so a
silent listener costs at most that many parked threads, which end when the
peer closes. Every public call additionally runs in a worker thread joined
with a deadline derived from those timeouts, so nothing here can hang the
writer, `stop()` or a command.

`insert_mode = "direct_path"` uses `Connection.direct_path_load` (thin mode
only; rows are committed by the load; no per-row errors). Duplicates are
taken out first (within the batch, and against keys already in the table for
the batch's time range) and counted as duplicates; if the load still fails on
data, the batch is written again the conventional way so that row errors are
reported per row. See README "Oracle" for when it helps and its limits.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import oracledb

from tagwriter.bounded import run_bounded
from tagwriter.config import DatabaseConfig, parse_url, redact_dsn
from tagwriter.errors import ConfigError, FatalError, LoginRefusedError, RowError, SinkError, TransientError
from tagwriter.models import TagValue
from tagwriter.sinks.base import ColumnInfo, ColumnRule, TableInfo, TableSpec, WriteResult, table_differences

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The driver module the sink talks to; tests swap in a fake (tests/oracle_fake.py).
DRIVER: Any = oracledb

PING_INTERVAL = 60.0  # seconds idle before a pooled connection is pinged on reuse (driver default)
CLOSE_TIMEOUT = 2.0  # seconds close() waits for connections to log off
PROBE_TAG = "__tagwriter_probe__"
_EPOCH = datetime(1970, 1, 1)

# -- error classification ----------------------------------------------------

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


def classify(exc: BaseException, where: str, *, target: str = "the database", table: str = "the table",
             secrets: Sequence[str] = ()) -> SinkError:
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
        failure = _socket_error(exc, host or target, int(port) if port.isdigit() else 0, 0.0)
        return TransientError(f"{where}: {failure.message}", code=failure.code, hint=failure.hint)
    text = redact(error_text(exc), secrets)
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


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


# -- bounded calls -------------------------------------------------------------


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def close_in_background(conns: Sequence[Any], timeout: float = 0.0) -> bool:
    """Close connections in a daemon thread; wait up to `timeout`. True if all closed."""
    if not conns:
        return True
    def close_all() -> None:
        for conn in conns:
            _close_quietly(conn)

    closer = threading.Thread(target=close_all, name="tagwriter-oracle-close", daemon=True)
    closer.start()
    if timeout > 0:
        closer.join(timeout)
    return not closer.is_alive()


# -- the pool ------------------------------------------------------------------


class _Attempt:
    """One connect in flight. `waiting` is False once nobody waits for it."""

    __slots__ = ("conn", "done", "error", "waiting")

    def __init__(self, waiting: bool) -> None:
        self.done = threading.Event()
        self.conn: Any = None
        self.error: BaseException | None = None
        self.waiting = waiting


class ConnectionPool:
    """A bounded pool of driver connections. Thread-safe; no call waits without a bound.

    `acquire` returns an idle connection (pinged first if it idled longer than
    `ping_interval`), or opens one (at most `connect_timeout`), or waits for a
    release (at most `wait_timeout`); otherwise TransientError DPY-4005.
    Connections in use plus connects in flight never exceed `max_size`.
    """

    def __init__(
        self, connect: Callable[[], Any], *, max_size: int = 5, wait_timeout: float = 5.0,
        connect_timeout: float = 5.0, call_timeout: float = 10.0, ping_interval: float = PING_INTERVAL,
        target: str = "the database", clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self.max_size = max_size
        self.wait_timeout = wait_timeout
        self.connect_timeout = connect_timeout
        self.call_timeout_ms = max(1, round(call_timeout * 1000))
        self.ping_interval = ping_interval
        self.target = target
        self._clock = clock
        self._cond = threading.Condition()
        self._idle: list[tuple[Any, float]] = []
        self._busy = 0
        self._pending = 0
        self._closed = False

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def opened(self) -> int:
        """Connections open now (idle + in use); approximate."""
        return self._busy + len(self._idle)

    @property
    def pending(self) -> int:
        """Connects in flight (some may be parked on a silent listener)."""
        return self._pending

    def acquire(self) -> Any:
        """A connection with `call_timeout` set; raises the driver's error or TransientError."""
        deadline = self._clock() + self.wait_timeout
        while True:
            conn, last_used, attempt = self._take(deadline)
            if attempt is not None:
                conn = self._await(attempt)
            elif self._clock() - last_used > self.ping_interval and not self._ping(conn):
                continue
            try:
                conn.call_timeout = self.call_timeout_ms
            except Exception:  # a dead connection refuses attribute writes
                self.release(conn, discard=True)
                continue
            return conn

    def _take(self, deadline: float) -> tuple[Any, float, _Attempt | None]:
        with self._cond:
            while True:
                if self._closed:
                    raise TransientError("the connection pool is closed", code="DPY-1002")
                if self._idle:
                    conn, last_used = self._idle.pop()
                    self._busy += 1
                    return conn, last_used, None
                if self._busy + self._pending < self.max_size:
                    return None, 0.0, self._start(waiting=True)
                remaining = deadline - self._clock()
                if remaining <= 0.0:
                    raise self._exhausted()
                self._cond.wait(remaining)

    def _exhausted(self) -> TransientError:
        if self._pending and not self._busy:
            why = (f"{self._pending} connect(s) to {self.target} not answered "
                   "(a listener that accepts but never answers?)")
        else:
            why = f"all {self.max_size} connections busy ({self._pending} connecting)"
        return TransientError(
            f"no pooled connection within {self.wait_timeout:g} s: {why}", code="DPY-4005",
            hint=hint_for("DPY-4005", why),
        )

    def _start(self, waiting: bool) -> _Attempt:
        """Start one connect in a daemon thread (call with the lock held)."""
        attempt = _Attempt(waiting)
        self._pending += 1
        threading.Thread(target=self._run_connect, args=(attempt,),
                         name="tagwriter-oracle-connect", daemon=True).start()
        return attempt

    def _run_connect(self, attempt: _Attempt) -> None:
        conn: Any = None
        error: BaseException | None = None
        try:
            conn = self._connect()
        except BaseException as exc:  # handed to the waiting caller
            error = exc
        orphan = None
        with self._cond:
            self._pending -= 1
            if error is not None:
                attempt.error = error
            elif self._closed:
                orphan = conn
            elif attempt.waiting:
                attempt.conn = conn
                self._busy += 1
            else:
                # a connect that answered after its caller gave up joins the pool
                self._idle.append((conn, self._clock()))
            attempt.done.set()
            self._cond.notify_all()
        if orphan is not None:
            close_in_background([orphan])

    def _await(self, attempt: _Attempt) -> Any:
        if not attempt.done.wait(self.connect_timeout):
            with self._cond:
                if not attempt.done.is_set():
                    attempt.waiting = False
                    raise TransientError(
                        f"connect to {self.target}: no answer within connect_timeout "
                        f"({self.connect_timeout:g} s) after the TCP connection was accepted",
                        code="DPY-4005", hint=TIMEOUT_HINT,
                    )
        if attempt.error is not None:
            raise attempt.error
        return attempt.conn

    def _ping(self, conn: Any) -> bool:
        """Ping a connection that idled (bounded by call_timeout); drop it if dead."""
        try:
            conn.call_timeout = self.call_timeout_ms
            conn.ping()
            return True
        except Exception:
            self.release(conn, discard=True)
            return False

    def connect_once(self) -> Any:
        """A new connection outside the pool (bounded by connect_timeout); the caller closes it."""
        return run_bounded(self._connect, self.connect_timeout, f"connect to {self.target}",
                           on_late=_close_quietly, hint=TIMEOUT_HINT)

    def fill(self, n: int) -> None:
        """Open connections in the background until `n` are open (pool_min); never waits."""
        with self._cond:
            while not self._closed and self.opened + self._pending < min(n, self.max_size):
                self._start(waiting=False)

    def release(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or a dead connection) closes it instead."""
        if not discard:
            healthy = getattr(conn, "is_healthy", None)
            with contextlib.suppress(Exception):
                discard = callable(healthy) and not healthy()
        with self._cond:
            self._busy = max(0, self._busy - 1)
            keep = not discard and not self._closed
            if keep:
                self._idle.append((conn, self._clock()))
            self._cond.notify_all()
        if not keep:
            close_in_background([conn])

    def discard_idle(self) -> None:
        """Close every idle connection (after a connection-class error they share its fate)."""
        with self._cond:
            idle, self._idle = self._idle, []
        close_in_background([c for c, _ in idle])

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Close idle connections within `timeout`; busy ones close on release. Never raises."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        return close_in_background([c for c, _ in idle], timeout)


# -- the sink ------------------------------------------------------------------

_thick_lock = threading.Lock()
_thick_ready: set[int] = set()


def _init_thick(driver: Any, lib_dir: str, config_dir: str) -> None:
    """Switch the driver to thick mode once per process (per driver module)."""
    with _thick_lock:
        if id(driver) in _thick_ready:
            return
        driver.init_oracle_client(lib_dir=lib_dir or None, config_dir=config_dir or None)
        _thick_ready.add(id(driver))


def _ora_name(name: str) -> str:
    """An identifier as Oracle stores an unquoted one: upper case (config validated it)."""
    return name.upper()


class OracleSink:
    """An Oracle table. `write_batch` from one thread; `probe` and the admin calls from any."""

    kind = "oracle"

    def __init__(
        self, *, user: str, password: str, dsn: str, spec: TableSpec | None = None,
        config_dir: str = "", wallet_location: str = "", wallet_password: str = "",
        thick_mode: bool = False, lib_dir: str = "", pool_min: int = 2, pool_max: int = 5,
        pool_wait_timeout: float = 5.0, connect_timeout: float = 5.0, call_timeout: float = 10.0,
        insert_mode: str = "conventional", ping_interval: float = PING_INTERVAL, driver: Any = None,
    ) -> None:
        if insert_mode not in ("conventional", "direct_path"):
            raise ConfigError(f"database.insert_mode = {insert_mode!r}: must be conventional or direct_path")
        if insert_mode == "direct_path" and thick_mode:
            raise ConfigError("database.insert_mode = direct_path: python-oracledb supports it in thin mode only",
                              hint="set database.thick_mode = false, or insert_mode = conventional")
        self.driver = driver if driver is not None else DRIVER
        self.user = user
        self._password = password
        self._wallet_password = wallet_password
        self.dsn = dsn
        self.spec = spec = spec or TableSpec()
        self.config_dir = config_dir
        self.wallet_location = wallet_location
        self.thick_mode = thick_mode
        self.lib_dir = lib_dir
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.pool_wait_timeout = pool_wait_timeout
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.insert_mode = insert_mode
        self.ping_interval = ping_interval
        self.table = _ora_name(spec.table)
        self.columns = tuple(_ora_name(c) for c in spec.columns)
        self.addresses = self._addresses()
        self.target = ", ".join(f"{h}:{p}" for h, p, _ in self.addresses) or dsn
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._schema = ""
        c_tag, c_ts, c_val, c_q = self.columns
        self._insert = (
            f'INSERT INTO "{self.table}" ("{c_tag}", "{c_ts}", "{c_val}", "{c_q}") VALUES (:1, :2, :3, :4)'
        )
        self._check = f'SELECT 1 FROM "{self.table}" WHERE 1 = 0'

    @classmethod
    def from_config(cls, config: DatabaseConfig, *, driver: Any = None) -> OracleSink:
        """Build from `[database]`: the URL's user/host/port/service, or user + dsn (Easy Connect or alias)."""
        url = parse_url(config.url)
        user = config.user or url.user
        password = config.password or url.password
        dsn = config.dsn
        if not dsn:
            if not url.host or not url.name:
                raise ConfigError(
                    "database.url: oracle needs a host and a service name, e.g. oracle://scott@dbhost:1521/orclpdb",
                    hint="or set database.dsn to an Easy Connect string or a TNS alias",
                )
            dsn = f"{url.host}:{url.port or 1521}/{url.name}"
        if not user:
            raise ConfigError("database.user: oracle needs a user (in the URL, oracle://USER@..., or database.user)")
        return cls(
            user=user, password=password, dsn=dsn, spec=TableSpec.from_config(config),
            config_dir=config.config_dir, wallet_location=config.wallet_location,
            wallet_password=config.wallet_password, thick_mode=config.thick_mode, lib_dir=config.lib_dir,
            pool_min=config.pool_min, pool_max=config.pool_max, pool_wait_timeout=config.pool_wait_timeout,
            connect_timeout=config.connect_timeout, call_timeout=config.call_timeout,
            insert_mode=config.insert_mode, driver=driver,
        )

    def describe(self) -> str:
        return redact(f"oracle {self.user}@{redact_dsn(self.dsn)} table {self.table}", self._secrets)

    @property
    def _secrets(self) -> tuple[str, str]:
        return (self._password, self._wallet_password)

    def _addresses(self) -> list[tuple[str, int, str]]:
        """(host, port, protocol) of each address the DSN names; [] if it cannot be parsed."""
        try:
            params = oracledb.ConnectParams(config_dir=self.config_dir or None)
            params.parse_connect_string(self.dsn)
        except Exception:
            return []
        hosts, ports, protocols = params.host, params.port, params.protocol
        if not isinstance(hosts, list):
            hosts, ports, protocols = [hosts], [ports], [protocols]
        return [(str(h), int(p), str(pr or "tcp")) for h, p, pr in zip(hosts, ports, protocols, strict=False) if h]

    # -- plumbing ----------------------------------------------------------

    def _classify(self, exc: BaseException, where: str) -> SinkError:
        return classify(exc, where, target=self.target, table=self.table, secrets=self._secrets)

    def _connect(self) -> Any:
        """One new driver connection (blocking; callers bound it)."""
        params: dict[str, Any] = {"user": self.user, "password": self._password, "dsn": self.dsn}
        if not self.thick_mode:
            params["tcp_connect_timeout"] = self.connect_timeout
            if self.config_dir:
                params["config_dir"] = self.config_dir
            if self.wallet_location:
                params["wallet_location"] = self.wallet_location
            if self._wallet_password:
                params["wallet_password"] = self._wallet_password
        return self.driver.connect(**params)

    def _get_pool(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                if self.thick_mode:
                    try:
                        _init_thick(self.driver, self.lib_dir, self.config_dir)
                    except Exception as exc:
                        raise self._classify(exc, "thick mode (init_oracle_client)") from None
                self._pool = ConnectionPool(
                    self._connect, max_size=self.pool_max, wait_timeout=self.pool_wait_timeout,
                    connect_timeout=self.connect_timeout, call_timeout=self.call_timeout,
                    ping_interval=self.ping_interval, target=self.target,
                )
            return self._pool

    def _deadline(self, calls: int) -> float:
        """A bound for one operation: acquire + connect + `calls` round trips, plus slack."""
        return self.pool_wait_timeout + self.connect_timeout + calls * self.call_timeout + 1.0

    def _with_connection(self, what: str, fn: Callable[[Any], T], *, calls: int = 2) -> T:
        """Run `fn(conn)` on a pooled connection within a deadline; errors classified."""

        def work() -> T:
            pool = self._get_pool()
            try:
                conn = pool.acquire()
            except Exception as exc:
                raise self._classify(exc, what) from None
            try:
                result = fn(conn)
            except Exception as exc:
                error = self._classify(exc, what)
                self._settle(pool, conn, error)
                raise error from None
            pool.release(conn)
            return result

        try:
            return run_bounded(work, self._deadline(calls), what, hint=TIMEOUT_HINT)
        except SinkError:
            raise
        except Exception as exc:  # never let a driver error escape
            raise self._classify(exc, what) from None

    def _settle(self, pool: ConnectionPool, conn: Any, error: SinkError) -> None:
        """After a failed call: drop a broken connection (and its idle siblings), else roll back."""
        if isinstance(error, TransientError):
            pool.release(conn, discard=True)
            pool.discard_idle()
            return
        try:
            conn.rollback()
        except Exception:
            pool.release(conn, discard=True)
            return
        pool.release(conn)

    # -- Sink ----------------------------------------------------------------

    def open(self) -> None:
        """Check that a session can be opened and the table is there; warm up pool_min connections."""

        def check(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(self._check)
            if self.insert_mode == "direct_path" and not self._schema:
                self._schema = self._current_schema(conn)

        self._with_connection(f"open {self.table}", check)
        self._get_pool().fill(self.pool_min)

    def write_batch(self, rows: Sequence[TagValue]) -> WriteResult:
        if not rows:
            return WriteResult(0)
        if self.insert_mode == "direct_path":
            return self._with_connection(f"write to {self.table}", lambda c: self._direct_path(c, rows), calls=4)
        return self._with_connection(f"write to {self.table}", lambda c: self._insert_rows(c, rows))

    def _insert_rows(self, conn: Any, rows: Sequence[TagValue]) -> WriteResult:
        """executemany with batch errors, then commit; row errors map back by offset."""
        d = self.driver
        with contextlib.closing(conn.cursor()) as cur:
            cur.setinputsizes(None, d.DB_TYPE_TIMESTAMP, d.DB_TYPE_BINARY_DOUBLE, None)
            cur.executemany(self._insert, bind_rows(rows), batcherrors=True)
            errors = cur.getbatcherrors()
        duplicates = 0
        rejected: list[RowError] = []
        for err in errors:
            code = str(getattr(err, "full_code", "") or "")
            if code == DUPLICATE_CODE:
                duplicates += 1
            elif is_transient_code(code) or is_fatal_code(code):
                # not about this row (an unusable index, a lost session): the batch fails whole
                raise _BatchError(err)
            else:
                rejected.append(RowError(int(err.offset), code or "ORA-?",
                                         redact(error_text(err), self._secrets)))
        conn.commit()
        rejected.sort(key=lambda e: e.index)
        return WriteResult(len(rows) - duplicates - len(rejected), duplicates, rejected)

    def _direct_path(self, conn: Any, rows: Sequence[TagValue]) -> WriteResult:
        """Direct path load of the rows not already stored; row errors fall back to executemany."""
        if not self._schema:
            self._schema = self._current_schema(conn)
        fresh, duplicates = self._without_stored(conn, rows)
        if not fresh:
            return WriteResult(0, duplicates)
        data = bind_rows([rows[i] for i in fresh])
        try:
            conn.direct_path_load(schema_name=self._schema, table_name=self.table,
                                  column_names=list(self.columns), data=data)
        except Exception as exc:
            code = error_code(exc)
            if not code or is_transient_code(code) or is_fatal_code(code):
                raise
            # a data error fails the whole load: write this batch the conventional way,
            # which reports the offending rows one by one
            log.warning("direct path load failed (%s %s); writing the batch conventionally",
                        code, error_text(exc))
            with contextlib.suppress(Exception):
                conn.rollback()
            result = self._insert_rows(conn, [rows[i] for i in fresh])
            return WriteResult(
                result.written, result.duplicates + duplicates,
                [RowError(fresh[e.index], e.code, e.message) for e in result.rejected],
            )
        return WriteResult(len(fresh), duplicates)

    def _without_stored(self, conn: Any, rows: Sequence[TagValue]) -> tuple[list[int], int]:
        """Indexes of rows whose key is neither earlier in the batch nor in the table."""
        lo = min(r.ts_us for r in rows)
        hi = max(r.ts_us for r in rows)
        c_tag, c_ts = self.columns[0], self.columns[1]
        with contextlib.closing(conn.cursor()) as cur:
            cur.setinputsizes(self.driver.DB_TYPE_TIMESTAMP, self.driver.DB_TYPE_TIMESTAMP)
            cur.execute(
                f'SELECT "{c_tag}", "{c_ts}" FROM "{self.table}" WHERE "{c_ts}" BETWEEN :1 AND :2',
                [naive_utc(lo), naive_utc(hi)],
            )
            seen = {(tag, to_us(ts)) for tag, ts in cur.fetchall()}
        fresh: list[int] = []
        for i, row in enumerate(rows):
            key = (row.tag, row.ts_us)
            if key not in seen:
                seen.add(key)
                fresh.append(i)
        return fresh, len(rows) - len(fresh)

    def _current_schema(self, conn: Any) -> str:
        with contextlib.closing(conn.cursor()) as cur:
            cur.execute("SELECT SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') FROM dual")
            row = cur.fetchone()
        return str(row[0]) if row else self.user.upper()

    def probe(self) -> None:
        """A pooled connection (not the writer's) answers and the table is there."""

        def check(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(self._check)

        self._with_connection(f"probe {self.table}", check)

    def close(self) -> None:
        """Close the pool within CLOSE_TIMEOUT; never raises."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(CLOSE_TIMEOUT)

    # -- AdminSink -----------------------------------------------------------

    def reach(self) -> str:
        """TCP connect to each address of the DSN (no login); 'host:port' of the first that accepts."""
        if not self.addresses:
            try:
                params = oracledb.ConnectParams(config_dir=self.config_dir or None)
                params.parse_connect_string(self.dsn)
            except Exception as exc:
                raise self._classify(exc, f"resolve {self.dsn}") from None
            raise FatalError(f"resolve {self.dsn}: no host and port in it", code="DPY-4017",
                             hint="check database.dsn")
        failure: TransientError | None = None
        for host, port, protocol in self.addresses:
            try:
                with socket.create_connection((host, port), timeout=self.connect_timeout):
                    return f"{host}:{port} ({protocol})"
            except OSError as exc:
                failure = _socket_error(exc, host, port, self.connect_timeout)
        assert failure is not None
        raise failure

    def login(self) -> None:
        """Open a session (user, password, service) outside the pool and close it."""
        pool = self._get_pool()
        try:
            conn = pool.connect_once()
        except SinkError:
            raise
        except Exception as exc:
            raise self._classify(exc, f"log in as {self.user}") from None
        close_in_background([conn], CLOSE_TIMEOUT)

    def server_version(self) -> str:
        def version(conn: Any) -> str:
            return f"Oracle Database {conn.version}"

        return self._with_connection("server version", version, calls=0)

    def ddl(self, *, read_index: bool = False, partition_by_day: bool = False) -> list[str]:
        """CREATE TABLE with PRIMARY KEY (tag, ts); optional daily interval partitions on ts.

        The key already serves "one tag over a time range", so `read_index`
        adds no index here (a comment in the DDL says so).
        """
        t = self.table
        c_tag, c_ts, c_val, c_q = self.columns
        pk = f'CONSTRAINT "{t}_PK" ' if len(t) + 3 <= 30 else ""
        using = " USING INDEX LOCAL" if partition_by_day else ""
        stmt = (
            f'CREATE TABLE "{t}" (\n'
            f'    "{c_tag}" VARCHAR2(128) NOT NULL,\n'
            f'    "{c_ts}" TIMESTAMP(6) NOT NULL,\n'
            f'    "{c_val}" BINARY_DOUBLE,\n'
            f'    "{c_q}" NUMBER(5),\n'
            f'    {pk}PRIMARY KEY ("{c_tag}", "{c_ts}"){using}\n'
            f')'
        )
        if partition_by_day:
            stmt += (
                f'\nPARTITION BY RANGE ("{c_ts}") INTERVAL (NUMTODSINTERVAL(1, \'DAY\'))\n'
                f'(PARTITION "P_START" VALUES LESS THAN (TIMESTAMP \'2000-01-01 00:00:00\'))'
            )
        stmts = [stmt]
        if read_index:
            stmts.append(f'-- no read index: PRIMARY KEY ("{c_tag}", "{c_ts}") already serves one-tag time-range reads')
        return stmts

    def create_table(self, *, read_index: bool = False, partition_by_day: bool = False) -> None:
        """Run `ddl()`; objects that exist already (ORA-00955) are kept."""

        def create(conn: Any) -> None:
            with contextlib.closing(conn.cursor()) as cur:
                for stmt in self.ddl(read_index=read_index, partition_by_day=partition_by_day):
                    if stmt.startswith("--"):
                        continue
                    try:
                        cur.execute(stmt)
                    except Exception as exc:
                        if error_code(exc) != "ORA-00955":
                            raise

        self._with_connection(f"create table {self.table}", create, calls=3)

    def inspect_table(self) -> TableInfo | None:
        """The table in the current schema as ALL_TAB_COLUMNS / ALL_CONSTRAINTS describe it."""

        def inspect(conn: Any) -> TableInfo | None:
            with contextlib.closing(conn.cursor()) as cur:
                cur.execute(_COLUMNS_SQL, [self.table])
                cols = [
                    ColumnInfo(str(name), _type_name(dtype, length, precision, scale), nullable == "Y")
                    for name, dtype, length, precision, scale, nullable in cur.fetchall()
                ]
                if not cols:
                    return None
                cur.execute(_KEYS_SQL, [self.table, self.table])
                keys: dict[tuple[str, str], list[str]] = {}
                for kind, name, column in cur.fetchall():
                    keys.setdefault((str(kind), str(name)), []).append(str(column))
            return TableInfo(cols, _pick_key(keys, {self.columns[0], self.columns[1]}))

        return self._with_connection(f"inspect {self.table}", inspect, calls=3)

    def table_differences(self, info: TableInfo) -> list[str]:
        """How `info` differs from DESIGN.md's Oracle table ([] = writable as tagwriter expects)."""
        c_tag, c_ts, c_val, c_q = self.columns
        rules = [
            ColumnRule(c_tag, "VARCHAR2(128)", lambda t: _is_text_128(t.upper()), False),
            ColumnRule(c_ts, "TIMESTAMP(6)", lambda t: _is_timestamp_6(t.upper()), False),
            ColumnRule(c_val, "BINARY_DOUBLE", lambda t: t.upper() == "BINARY_DOUBLE", True),
            ColumnRule(c_q, "NUMBER(5)", lambda t: _is_integer_5(t.upper()), True),
        ]
        return table_differences(info, rules, (c_tag, c_ts), fold=str.upper)

    def try_insert(self) -> None:
        """Insert a probe row and roll it back (proves the INSERT privilege and the column types)."""

        def insert(conn: Any) -> None:
            row = TagValue(PROBE_TAG, round(time.time() * 1_000_000), 0.0, 0)
            with contextlib.closing(conn.cursor()) as cur:
                cur.setinputsizes(None, self.driver.DB_TYPE_TIMESTAMP, self.driver.DB_TYPE_BINARY_DOUBLE, None)
                try:
                    cur.execute(self._insert, bind_rows([row])[0])
                finally:
                    conn.rollback()

        self._with_connection(f"insert into {self.table}", insert, calls=2)

    def ping(self) -> None:
        self._with_connection("ping", lambda conn: conn.ping(), calls=1)


class _BatchError(Exception):
    """A batch error that is not about its row; carries the driver error object."""

    def __init__(self, err: Any) -> None:
        super().__init__(err)


# -- binding and reading back ----------------------------------------------------


def naive_utc(ts_us: int) -> datetime:
    """Naive UTC datetime (the driver ignores tzinfo) with microseconds."""
    return _EPOCH + timedelta(microseconds=ts_us)


def to_us(ts: datetime) -> int:
    """Epoch microseconds of a naive UTC datetime read back from TIMESTAMP."""
    delta = ts.replace(tzinfo=None) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def bind_rows(rows: Sequence[TagValue]) -> list[tuple[object, ...]]:
    """Bind tuples; one datetime per distinct ts (a polling group shares one)."""
    out: list[tuple[object, ...]] = []
    last_us: int | None = None
    last_dt = _EPOCH
    for tag, ts_us, value, quality in rows:
        if ts_us != last_us:
            last_us, last_dt = ts_us, naive_utc(ts_us)
        out.append((tag, last_dt, value, quality))
    return out


def _socket_error(exc: OSError, host: str, port: int, timeout: float) -> TransientError:
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


_COLUMNS_SQL = (
    "SELECT column_name, data_type, char_length, data_precision, data_scale, nullable "
    "FROM all_tab_columns WHERE owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND table_name = :1 "
    "ORDER BY column_id"
)

_KEYS_SQL = (
    "SELECT c.constraint_type, c.constraint_name, cc.column_name "
    "FROM all_constraints c JOIN all_cons_columns cc "
    "ON cc.owner = c.owner AND cc.constraint_name = c.constraint_name "
    "WHERE c.owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND c.table_name = :1 "
    "AND c.constraint_type IN ('P', 'U') AND c.status = 'ENABLED' "
    "UNION ALL "
    "SELECT 'I', i.index_name, ic.column_name "
    "FROM all_indexes i JOIN all_ind_columns ic ON ic.index_owner = i.owner AND ic.index_name = i.index_name "
    "WHERE i.table_owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND i.table_name = :2 "
    "AND i.uniqueness = 'UNIQUE' "
    "ORDER BY 1, 2"
)


def _pick_key(keys: dict[tuple[str, str], list[str]], wanted: set[str]) -> list[str]:
    """The primary key; else a unique constraint or index on exactly the wanted columns; else []."""
    for kind in ("P", "U", "I"):
        for (k, _), cols in sorted(keys.items()):
            if k == kind and (kind == "P" or set(cols) == wanted):
                return cols
    return []


def _type_name(dtype: str, length: Any, precision: Any, scale: Any) -> str:
    dtype = str(dtype)
    if dtype in ("VARCHAR2", "NVARCHAR2", "CHAR", "NCHAR") and length:
        return f"{dtype}({int(length)})"
    if dtype == "NUMBER":
        if precision is None:
            return "NUMBER" if scale is None else f"NUMBER(*,{int(scale)})"
        return f"NUMBER({int(precision)})" if not scale else f"NUMBER({int(precision)},{int(scale)})"
    if dtype == "FLOAT" and precision is not None:
        return f"FLOAT({int(precision)})"
    return dtype


def _is_text_128(t: str) -> bool:
    m = re.fullmatch(r"N?VARCHAR2\((\d+)\)", t)
    return bool(m) and int(m.group(1)) >= 128  # type: ignore[union-attr]


def _is_timestamp_6(t: str) -> bool:
    m = re.fullmatch(r"TIMESTAMP\((\d)\)", t)
    return bool(m) and int(m.group(1)) >= 6  # type: ignore[union-attr]


def _is_integer_5(t: str) -> bool:
    if t in ("NUMBER", "NUMBER(*,0)", "INTEGER"):
        return True
    m = re.fullmatch(r"NUMBER\((\d+)\)", t)
    return bool(m) and int(m.group(1)) >= 5  # type: ignore[union-attr]


__all__ = ["ConnectionPool", "OracleSink", "classify", "hint_for"]

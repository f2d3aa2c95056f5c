"""The systemd notification protocol (sd_notify(3)), without libsystemd: one datagram per message.

    notifier = Notifier.from_environment()    # NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
    notifier.ready()                          # Type=notify: the unit is started
    if notifier.watchdog_due():
        notifier.watchdog(live, why)          # WATCHDOG=1 only while live

Outside systemd (no NOTIFY_SOCKET) every call does nothing. A message is
`KEY=value` lines sent as one datagram to the AF_UNIX socket NOTIFY_SOCKET
names (a leading '@' is Linux's abstract namespace). Sending never raises: a
lost notification must not stop the writer; the first failure is logged.
For one caller thread.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from tagwriter.redact import redact

log = logging.getLogger(__name__)


class Notifier:
    """Tells systemd the service's state: READY, RELOADING, STOPPING, STATUS, and watchdog pings.

    `address` is NOTIFY_SOCKET's value (None: not under systemd, every call a
    no-op). `watchdog_usec` is WATCHDOG_USEC (None: no watchdog); pings are
    due every half of it, as sd_watchdog_enabled(3) advises.
    """

    def __init__(
        self, address: str | None, watchdog_usec: int | None = None, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = _socket_address(address)
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec and self.address is not None else None
        self._clock = clock
        self._next_beat = clock()
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd's variables describe; a watchdog meant for another process is ignored."""
        usec = _positive_int(environ.get("WATCHDOG_USEC"))
        pid = _positive_int(environ.get("WATCHDOG_PID"))
        if pid is not None and pid != os.getpid():
            usec = None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message of `KEY=value` lines; True if it was sent (False too when not under systemd)."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s (no more warnings of this)", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """The service runs (Type=notify's start is complete); also the end of a reload."""
        return self.notify(READY=1, **_status(status))

    def reloading(self) -> bool:
        """A reload begins; `ready()` ends it. MONOTONIC_USEC lets Type=notify-reload match it to the request."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "") -> bool:
        """The service begins to stop (systemd then stops expecting watchdog pings)."""
        return self.notify(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line status `systemctl status` shows."""
        return self.notify(STATUS=_one_line(text))

    def watchdog_due(self) -> bool:
        """True when the watchdog wants a ping (every half of WATCHDOG_USEC); False without a watchdog."""
        return self.watchdog_interval is not None and self._clock() >= self._next_beat

    def watchdog(self, live: bool, why: str = "") -> bool:
        """One watchdog period: WATCHDOG=1 if `live`; else no ping, and `why` as the STATUS.

        Withheld pings let WatchdogSec= run out: systemd then aborts and restarts the service.
        """
        self._next_beat = self._clock() + (self.watchdog_interval or 0.0)
        if live:
            return self.notify(WATCHDOG=1)
        return self.status(f"not live: {why}")


def _socket_address(value: str | None) -> str | None:
    """NOTIFY_SOCKET as `sendto` takes it: a path, or '@name' as '\\0name'; None if not a unix socket."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%s: not a unix socket path or abstract name; not notifying systemd", value)
    return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None


def _status(text: str) -> dict[str, str]:
    return {"STATUS": _one_line(text)} if text else {}


def _one_line(text: str) -> str:
    """A STATUS value, redacted: a newline would start a field of its own."""
    return " ".join(redact(text).split())

"""The client of a running instance's metrics endpoint, for `tagwriter status`.

`fetch_status` reads the JSON snapshot and the health check; every request is
bounded by a timeout, and anything that is not a tagwriter endpoint answering
is `EndpointUnreachable` with a hint.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, fields

from tagwriter.endpoint import HEALTH_PATH, JSON_PATH
from tagwriter.errors import TagwriterError
from tagwriter.metrics import MetricsSnapshot


class EndpointUnreachable(TagwriterError):
    """The metrics endpoint did not answer, or did not answer like tagwriter."""


@dataclass(frozen=True, slots=True)
class RemoteStatus:
    """What a running instance's endpoint reported: its snapshot and its health."""

    url: str
    snapshot: MetricsSnapshot
    healthy: bool
    reason: str


UNREACHABLE_HINT = "is `tagwriter run` running with metrics.port set (or --metrics-port)? else pass --url http://HOST:PORT"


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/` -> `http://host:port`."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def fetch_status(url: str, timeout: float = 2.0) -> RemoteStatus:
    """Read a running instance's snapshot and health; raises EndpointUnreachable.

    Every request is bounded by `timeout` seconds.
    """
    base = normalize_url(url)
    status, body = _http_get(base + JSON_PATH, timeout, base)
    if status != 200:
        raise EndpointUnreachable(f"{base}{JSON_PATH} answered HTTP {status}: not a tagwriter metrics endpoint",
                                  hint=UNREACHABLE_HINT)
    snapshot = snapshot_from_json(body, base + JSON_PATH)
    status, body = _http_get(base + HEALTH_PATH, timeout, base)
    if status not in (200, 503):
        raise EndpointUnreachable(f"{base}{HEALTH_PATH} answered HTTP {status}: not a tagwriter metrics endpoint",
                                  hint=UNREACHABLE_HINT)
    text = body.decode("utf-8", "replace").strip()
    reason = text.split(": ", 1)[1] if ": " in text else text
    return RemoteStatus(base, snapshot, status == 200, reason)


def snapshot_from_json(body: bytes, where: str) -> MetricsSnapshot:
    """Rebuild a MetricsSnapshot from the JSON; fields it does not know are ignored."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise EndpointUnreachable(f"{where}: the answer is not a JSON object", hint=UNREACHABLE_HINT)
    known = {f.name for f in fields(MetricsSnapshot)}
    try:
        return MetricsSnapshot(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise EndpointUnreachable(f"{where}: not a tagwriter snapshot ({exc})", hint=UNREACHABLE_HINT) from None


def _http_get(url: str, timeout: float, base: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            why = f"no answer within {timeout:g}s"
        else:
            why = str(getattr(reason, "strerror", None) or reason)
        raise EndpointUnreachable(f"cannot reach {base}: {why}", hint=UNREACHABLE_HINT) from None
    except TimeoutError:
        why = f"no answer within {timeout:g}s"
        raise EndpointUnreachable(f"cannot reach {base}: {why}", hint=UNREACHABLE_HINT) from None
    except (OSError, ValueError) as exc:  # reset connection, malformed URL
        raise EndpointUnreachable(f"cannot reach {base}: {exc}", hint=UNREACHABLE_HINT) from None

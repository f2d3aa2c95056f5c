"""A canary password planted through every channel never leaves the process in clear.

Each scenario plants unique canary strings (config file, URL, environment, Oracle dsn, the
`--database` flag), runs every command as a user does (a subprocess with `--log-file`) and greps
stdout, stderr, every log file, every JSON report, every HTTP answer of `run`'s endpoint and every
file under the temporary folder (but the config file that holds the canaries) for them.

Sinks: a real SQLite file; the real PostgreSQL on 127.0.0.1:5432 (trust auth: any password is
accepted); Oracle on a loopback port nobody listens on (no Oracle server can run here), so the
real python-oracledb driver fails and its error texts, which echo the connect string, are on
every path. `overflow-test` waits 10 s for a writer that never reaches an Oracle sink, so it
runs in one Oracle scenario only (the dsn one, whose text the driver echoes).
"""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from procs import free_port, run_env
from waits import wait_until

from tagwriter.errors import FatalError, RowError
from tagwriter.logs import configure_logging
from tagwriter.metrics import Metrics
from tagwriter.redact import redact, register

ENDPOINT_PATHS = ("/api/buffer/metrics", "/metrics", "/healthz", "/livez", "/readyz")
RUN_SECONDS = 30.0  # a bound: the run is stopped (SIGTERM) once its endpoint and `status` were read
COMMAND_TIMEOUT = 40.0


def canary(channel: str) -> str:
    """A string found nowhere else: the password planted through `channel`."""
    return f"Canary{channel.title()}{uuid.uuid4().hex[:12]}"


@dataclass
class Scenario:
    """What one scenario planted: config text, environment, and canary -> the channel it came by."""

    config: str
    env: dict[str, str] = field(default_factory=dict)
    canaries: dict[str, str] = field(default_factory=dict)
    overflow_test: bool = True

    def plant(self, channel: str) -> str:
        secret = canary(channel)
        self.canaries[secret] = channel
        return secret


@dataclass
class Outputs:
    """Every text a scenario's commands produced, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes) -> None:
        self.texts[where] = text.decode("utf-8", "replace") if isinstance(text, bytes) else text

    def hits(self, canaries: dict[str, str]) -> dict[str, int]:
        """'<where>: <channel>' -> how often that channel's canary shows there."""
        found: dict[str, int] = {}
        for where, text in self.texts.items():
            for secret, channel in canaries.items():
                if n := text.count(secret):
                    found[f"{where}: {channel}"] = n
        return found


def _config(url: str, extra: str = "") -> str:
    return ('[database]\n'
            f'url = "{url}"\n'
            'connect_timeout = 1.0\npool_wait_timeout = 1.0\ncall_timeout = 2.0\n'
            f'{extra}'
            '[writer]\nretry_delays = [0.1]\nflush_interval = 0.2\nprobe_interval = 0.2\n'
            '[source]\ngroups = 2\ntags_per_group = 10\ninterval = 0.2\n')


def sqlite_file() -> Scenario:
    """database.password in the file, the wallet password in the environment (SQLite uses neither)."""
    s = Scenario("")
    s.config = _config("sqlite:///tags.db", f'password = "{s.plant("file")}"\n')
    s.env["TAGWRITER_DATABASE_WALLET_PASSWORD"] = s.plant("env")
    return s


def postgresql_url(db: str) -> Scenario:
    s = Scenario("")
    s.config = _config(f"postgresql://postgres:{s.plant('url')}@127.0.0.1:5432/{db}")
    s.env["TAGWRITER_DATABASE_WALLET_PASSWORD"] = s.plant("env")
    return s


def postgresql_env(db: str) -> Scenario:
    s = Scenario(_config(f"postgresql://postgres@127.0.0.1:5432/{db}"))
    s.env["TAGWRITER_DATABASE_PASSWORD"] = s.plant("env")
    return s


def oracle_dsn(port: int) -> Scenario:
    """The issue's case: `database.dsn = "user/password@host:port/service"`, and a password in the file."""
    s = Scenario("")
    s.config = _config(f"oracle://scott@127.0.0.1:{port}/orcl",
                       f'dsn = "scott/{s.plant("dsn")}@127.0.0.1:{port}/orcl"\n'
                       f'password = "{s.plant("file")}"\nwallet_password = "{s.plant("wallet")}"\n')
    return s


def oracle_url(port: int) -> Scenario:
    s = Scenario("", overflow_test=False)
    s.config = _config(f"oracle://scott:{s.plant('url')}@127.0.0.1:{port}/orcl")
    return s


def oracle_env(port: int) -> Scenario:
    s = Scenario(_config("sqlite:///unused.db"), overflow_test=False)
    s.env["TAGWRITER_DATABASE__URL"] = f"oracle://scott@127.0.0.1:{port}/orcl"
    s.env["TAGWRITER_DATABASE_PASSWORD"] = s.plant("env")
    return s


@pytest.fixture(scope="module")
def pg_name() -> Iterator[str]:
    from pg_util import fresh_database

    with fresh_database("tw_canary") as db:
        yield db.name


def _start(cwd: Path, name: str, args: list[str], env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "tagwriter", "--config", "tagwriter.toml", "--log-file", f"logs/{name}.log", *args]
    return name, subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _collect(out: Outputs, name: str, proc: subprocess.Popen[bytes]) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        out.add(f"{name} timed out", "")
    out.add(f"{name} stdout", stdout)
    out.add(f"{name} stderr", stderr)


def _get(port: int, path: str) -> bytes | None:
    """The body of GET `path` (also of an error status); None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return bytes(r.read())
    except urllib.error.HTTPError as exc:
        return bytes(exc.read())
    except OSError:
        return None


def _scrape(port: int, oracle: bool) -> dict[str, bytes] | None:
    """Every endpoint path once the run answers (and, against Oracle, once it has an error to tell)."""
    first = _get(port, ENDPOINT_PATHS[0])
    if first is None or (oracle and b'"last_error": ""' in first.replace(b'":"', b'": "')):
        return None
    return {path: _get(port, path) or b"" for path in ENDPOINT_PATHS}


def run_every_command(tmp: Path, s: Scenario, *, oracle: bool) -> Outputs:
    """Every command once, against the scenario's config; what each wrote anywhere."""
    (tmp / "tagwriter.toml").write_text(s.config, encoding="utf-8")
    (tmp / "logs").mkdir()
    env = run_env(COLUMNS="200", **s.env)
    port = free_port()
    out = Outputs()
    overflow = ["overflow-test", "--capacity", "1000", "--group-size", "100", "--json", "overflow-test.json"]
    others = []
    if s.overflow_test and oracle:  # at once: it waits 10 s for a writer that never reaches the sink
        others.append(_start(tmp, "overflow-test", overflow, env))
    # Before the rest, alone: they expect the table.
    _collect(out, *_start(tmp, "init-db", ["init-db", "--timeout", "5"], env))
    if s.overflow_test and not oracle:
        others.append(_start(tmp, "overflow-test", overflow, env))
    run = _start(tmp, "run", ["run", "--duration", str(RUN_SECONDS), "--metrics-port", str(port), "--no-panel"], env)
    others += [
        _start(tmp, "config-validate", ["config", "validate"], env),
        _start(tmp, "config-show", ["config", "show"], env),
        _start(tmp, "test-connection", ["test-connection", "--timeout", "5", "--pings", "1"], env),
        _start(tmp, "test-connection-json", ["test-connection", "--json", "--timeout", "5", "--pings", "1"], env),
        _start(tmp, "load-test", ["load-test", "--rate", "200", "--groups", "2", "--tags", "10", "--duration", "1",
                                  "--warmup", "0", "--json", "load-test.json"], env),
    ]
    scraped = wait_until(lambda: _scrape(port, oracle) if run[1].poll() is None else {"ended": b""},
                         "run's endpoint (and its last_error against Oracle)", 20)
    assert "ended" not in scraped, "the run ended before its endpoint could be read"
    for path, body in scraped.items():
        out.add(f"GET {path}", body)
    _collect(out, *_start(tmp, "status", ["status", "--url", f"http://127.0.0.1:{port}"], env))
    run[1].send_signal(signal.SIGTERM)
    for name, proc in [run, *others]:
        _collect(out, name, proc)
    replay = _start(tmp, "replay", ["replay", "backup"], env)
    _collect(out, *replay)
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name != "tagwriter.toml":
            out.add(str(path.relative_to(tmp)), path.read_bytes())
    return out


def assert_no_canary(out: Outputs, s: Scenario) -> None:
    hits = out.hits(s.canaries)
    assert not hits, f"{sum(hits.values())} canary hit(s):\n" + "\n".join(f"  {w}: {n}" for w, n in hits.items())
    assert out.texts["run stderr"] or out.texts["run stdout"], "run printed nothing: did it run at all?"


def test_sqlite_never_shows_a_password(tmp_path: Path) -> None:
    s = sqlite_file()
    assert_no_canary(run_every_command(tmp_path, s, oracle=False), s)


@pytest.mark.parametrize("channel", ["url", "env"])
def test_postgresql_never_shows_a_password(channel: str, pg_name: str, tmp_path: Path) -> None:
    s = postgresql_url(pg_name) if channel == "url" else postgresql_env(pg_name)
    out = run_every_command(tmp_path, s, oracle=False)
    assert_no_canary(out, s)
    assert "written" in out.texts["run stdout"] + out.texts["run stderr"]


@pytest.mark.parametrize("channel", ["dsn", "url", "env"])
def test_oracle_errors_never_show_a_password(channel: str, tmp_path: Path) -> None:
    port = free_port()
    s = {"dsn": oracle_dsn, "url": oracle_url, "env": oracle_env}[channel](port)
    out = run_every_command(tmp_path, s, oracle=True)
    assert_no_canary(out, s)
    assert '"last_error": ""' not in out.texts["GET /api/buffer/metrics"].replace('":"', '": "')


DATABASE_COMMANDS = (
    ["run", "--duration", "1"], ["test-connection"], ["init-db"], ["replay", "backup"],
    ["load-test", "--duration", "1", "--warmup", "0"], ["overflow-test", "--capacity", "100"],
)


def test_a_password_in_the_database_flag_is_refused_and_never_echoed(tmp_path: Path) -> None:
    port = free_port()
    secret = canary("flag")
    urls = {"postgresql": f"postgresql://postgres:{secret}@127.0.0.1:5432/db",
            "oracle": f"oracle://scott:{secret}@127.0.0.1:{port}/orcl"}
    (tmp_path / "tagwriter.toml").write_text(_config("sqlite:///tags.db"), encoding="utf-8")
    (tmp_path / "logs").mkdir()
    env = run_env(COLUMNS="200")
    procs = [_start(tmp_path, f"{cmd[0]}-{kind}", [*cmd, "--database", url], env)
             for kind, url in urls.items() for cmd in DATABASE_COMMANDS]
    out = Outputs()
    for name, proc in procs:
        _collect(out, name, proc)
        assert proc.returncode == 2, (name, out.texts[f"{name} stderr"])
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            out.add(str(path.relative_to(tmp_path)), path.read_bytes())
    hits = out.hits({secret: "flag"})
    assert not hits, hits


# -- the one step itself, in-process ---------------------------------------------------------


def test_redact_hides_registered_secrets_and_any_password_syntax() -> None:
    secret = canary("unit") + "@/:x"
    register(secret)
    text = redact(f"a {secret} b {quote(secret, safe='')} c")
    assert secret not in text and quote(secret, safe="") not in text and text == "a *** b *** c"
    assert redact("to oracle://scott:t1g3r@db:1521/x") == "to oracle://scott:***@db:1521/x"
    assert redact('cannot parse connect string "scott/t1g3r@db:1521/x"') == \
        'cannot parse connect string "scott/***@db:1521/x"'
    assert redact("host=db password=t1g3r user=u") == "host=db password=*** user=u"
    assert redact("c.toml:2: database.password = ***: must be a string") == \
        "c.toml:2: database.password = ***: must be a string"
    assert redact("backup/quarantine/x.csv written, see http://127.0.0.1:9108/healthz") == \
        "backup/quarantine/x.csv written, see http://127.0.0.1:9108/healthz"


def test_every_exit_in_the_library_passes_the_step() -> None:
    """Errors, quarantined row messages, metrics' last_error and every log handler."""
    secret = canary("lib")
    register(secret)
    error = FatalError(f"open: bad dsn scott/{secret}@db", hint=f"not {secret}")
    assert secret not in str(error) + error.hint
    assert secret not in RowError(0, "ORA-1", f"row {secret}").message
    metrics = Metrics()
    metrics.record_fatal(f"driver said {secret}")
    assert secret not in metrics.snapshot().last_error
    stream = io.StringIO()
    configure_logging("INFO", console_handler=logging.StreamHandler(stream))
    try:
        raise RuntimeError(secret)
    except RuntimeError:
        logging.getLogger("tagwriter.test").exception("connect %s failed", secret)
    assert "connect *** failed" in stream.getvalue() and secret not in stream.getvalue()

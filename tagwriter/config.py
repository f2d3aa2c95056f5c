"""The typed configuration tree: defaults < `tagwriter.toml` < `TAGWRITER_<SECTION>__<KEY>` env < CLI flags.

Each section is a dataclass; a field's `metadata` says what values are allowed,
so loading, validation and error messages come from one description. Errors
name the key path (`writer.batch_size = 0: must be between 1 and 10000`) or the
file and line of a TOML syntax error.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import tomli_w

from tagwriter.errors import ConfigError
from tagwriter.redact import REDACTED, redact_dsn, redact_url, register_database
from tagwriter.redact import redact as redact_text
from tagwriter.redact import register as register_secrets

ENV_PREFIX = "TAGWRITER_"
# Between section and key: `TAGWRITER_WRITER__BATCH_SIZE`. Kubernetes service links (`TAGWRITER_PORT`,
# `TAGWRITER_METRICS_SERVICE_HOST`, ...) and unrelated names like `TAGWRITER_HOME` never hold it.
ENV_SEPARATOR = "__"
ENV_SCHEME = "TAGWRITER_<SECTION>__<KEY>"
# The documented password variables keep their names; no service link can be named so (links end
# in _PORT, _HOST, _PROTO, _ADDR or a port number).
ENV_ALIASES = {
    "TAGWRITER_DATABASE_PASSWORD": ("database", "password"),
    "TAGWRITER_DATABASE_WALLET_PASSWORD": ("database", "wallet_password"),
    "TAGWRITER_MQTT_PASSWORD": ("mqtt", "password"),
    "TAGWRITER_OPCUA_PASSWORD": ("opcua", "password"),
    "TAGWRITER_OPCUA_PRIVATE_KEY_PASSWORD": ("opcua", "private_key_password"),
    "TAGWRITER_JETSTREAM_PASSWORD": ("jetstream", "password"),
}
# Environment variables that are not config keys (the CLI reads them itself; tests read TAGWRITER_TEST_*).
ENV_NOT_CONFIG = frozenset({"TAGWRITER_CONFIG"})
ENV_NOT_CONFIG_PREFIX = ENV_PREFIX + "TEST_"
SERVICE_LINK = re.compile(r"^(?:tcp|udp|sctp)://", re.IGNORECASE)
DEFAULT_PATH = Path("tagwriter.toml")
IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_$#]{0,127}$")

log = logging.getLogger(__name__)


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field: its default, one line of help, and validation rules."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


#: What `source.kind` may be: simulated polls, a file, or a plant source whose section has its settings.
SOURCE_KINDS = ("simulate", "jsonl", "csv", "mqtt", "sparkplug", "opcua", "jetstream", "modbus")


@dataclass(slots=True)
class SourceConfig:
    kind: str = _opt("simulate", "where values come from (plant sources: their own section)", choices=SOURCE_KINDS)
    path: str = _opt("-", "input file for jsonl/csv; '-' is standard input")
    groups: int = _opt(10, "simulate: polling groups", min=1, max=100_000)
    tags_per_group: int = _opt(100, "simulate: tags in each group", min=1, max=100_000)
    interval: float = _opt(1.0, "simulate: seconds between polls of a group", min=0.001, max=86_400)
    value_shape: str = _opt(
        "sine", "simulate: how values move", choices=("sine", "random-walk", "random", "constant")
    )
    quality: int = _opt(192, "simulate: quality code of good values", min=0, max=65_535)
    bad_quality_pct: float = _opt(0.0, "simulate: percent of polls with bad quality (0)", min=0, max=100)
    seed: int = _opt(-1, "simulate: random seed; -1 = different every run", min=-1)


@dataclass(slots=True)
class BufferConfig:
    capacity: int = _opt(100_000, "values held in memory at most", min=1, max=50_000_000)
    overflow_policy: str = _opt(
        "spill", "when full: spill (the oldest to the spool), drop-oldest or block",
        choices=("drop-oldest", "spill", "block"),
    )
    block_timeout: float = _opt(5.0, "block: seconds a submit waits for room", min=0, max=3600)
    durability: str = _opt(
        "memory", "memory, or disk: values are fsynced to a queue before they count as taken "
        "(the default of `tagwriter run`)", choices=("memory", "disk"),
    )
    directory: str = _opt("queue", "disk: folder of the durable queue")
    fsync_interval: float = _opt(
        0.05, "disk: seconds between group commits (fsync); 0 = always: each submit waits for its own",
        min=0, max=10,
    )
    max_disk_bytes: int = _opt(
        1024**3, "disk: size cap of the queue in bytes (0 = none); the overflow policy applies there", min=0,
    )


@dataclass(slots=True)
class WriterConfig:
    batch_size: int = _opt(500, "values per database transaction at most", min=1, max=10_000)
    flush_interval: float = _opt(1.0, "seconds a value may wait for its batch to fill", min=0.001, max=3600)
    retry_delays: list[float] = _opt(
        [1.0, 2.0, 4.0], "seconds between retries of a failed batch", min=0, max=3600
    )
    probe_interval: float = _opt(1.0, "outage: first seconds between database probes", min=0.01, max=3600)
    probe_max_interval: float = _opt(30.0, "outage: probe backoff cap in seconds", min=0.01, max=3600)
    shutdown_timeout: float = _opt(10.0, "seconds stop() may flush before spooling the rest", min=0, max=3600)


@dataclass(slots=True)
class DatabaseConfig:
    url: str = _opt("sqlite:///tagwriter.db", "sqlite:///PATH, oracle://USER@HOST:PORT/SERVICE, postgresql://USER@HOST:PORT/DB")
    table: str = _opt("tag_values", "table name", identifier=True)
    tag_column: str = _opt("tag_name", "column of the tag name", identifier=True)
    ts_column: str = _opt("ts", "column of the timestamp", identifier=True)
    value_column: str = _opt("value", "column of the value", identifier=True)
    quality_column: str = _opt("quality", "column of the quality code", identifier=True)
    user: str = _opt("", "user name (overrides the URL's)")
    password: str = _opt("", "password; prefer env TAGWRITER_DATABASE_PASSWORD", secret=True)
    dsn: str = _opt("", "Oracle: Easy Connect string or TNS alias (instead of the URL's host/service)")
    config_dir: str = _opt("", "Oracle: folder of tnsnames.ora / sqlnet.ora")
    wallet_location: str = _opt("", "Oracle: folder of the wallet (ewallet.pem)")
    wallet_password: str = _opt("", "Oracle: wallet password", secret=True)
    thick_mode: bool = _opt(False, "Oracle: use Oracle Client libraries (thick mode)")
    lib_dir: str = _opt("", "Oracle thick mode: Instant Client folder")
    pool_min: int = _opt(2, "connection pool minimum", min=0, max=1000)
    pool_max: int = _opt(5, "connection pool maximum", min=1, max=1000)
    pool_wait_timeout: float = _opt(5.0, "seconds to wait for a pooled connection", min=0.01, max=3600)
    connect_timeout: float = _opt(5.0, "seconds to establish a connection", min=0.01, max=3600)
    call_timeout: float = _opt(10.0, "seconds any one database call may take", min=0.01, max=3600)
    insert_mode: str = _opt(
        "conventional", "Oracle: conventional or direct_path", choices=("conventional", "direct_path")
    )


@dataclass(slots=True)
class BackupConfig:
    directory: str = _opt("backup", "folder of spool (backup) CSV files")
    quarantine_directory: str = _opt("backup/quarantine", "folder of rejected rows and bad lines")
    roll_rows: int = _opt(100_000, "rows per spool file before it rolls", min=1, max=100_000_000)
    roll_seconds: float = _opt(60.0, "seconds per spool file before it rolls", min=0.1, max=86_400)
    max_bytes: int = _opt(10 * 1024**3, "spool folder size cap in bytes (0 = none)", min=0)
    auto_replay: bool = _opt(True, "drain the spool into the database after an outage")
    replay_rate: float = _opt(0.0, "auto replay: values/s at most (0 = adaptive)", min=0)


@dataclass(slots=True)
class MetricsConfig:
    port: int = _opt(0, "HTTP metrics port (0 = off)", min=0, max=65_535)
    host: str = _opt("127.0.0.1", "HTTP metrics bind address")
    log_interval: float = _opt(10.0, "seconds between status log lines without the panel", min=0.1, max=86_400)
    health_max_buffer_pct: float = _opt(80.0, "healthz fails above this buffer fill", min=0, max=100)


@dataclass(slots=True)
class LoggingConfig:
    level: str = _opt("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    file: str = _opt("", "rotating log file ('' = console only)")
    format: str = _opt("text", "log line format: text, or json (one object per line, for log shippers)",
                       choices=("text", "json"))
    max_bytes: int = _opt(10 * 1024**2, "log file size before it rotates", min=1024)
    backup_count: int = _opt(5, "rotated log files kept", min=0, max=1000)


# [mqtt]: the mqtt source (tagwriter/sources/mqtt.py)
@dataclass(slots=True)
class MqttConfig:
    host: str = _opt("127.0.0.1", "broker host name or address")
    port: int = _opt(1883, "broker port (8883 is usual with TLS)", min=1, max=65_535)
    topics: list[str] = _opt(["tagwriter/#"], "topic filters to subscribe to (QoS 1)")
    client_id: str = _opt("", "client id; keep it stable for a persistent session ('' = tagwriter-<host name>)")
    protocol: str = _opt("v5", "MQTT version", choices=("v5", "v311"))
    persistent_session: bool = _opt(True, "keep the session (and messages sent while away) across disconnects")
    session_expiry: int = _opt(86_400, "v5: seconds the broker keeps the session after a disconnect",
                               min=0, max=4_294_967_295)
    keepalive: int = _opt(30, "seconds between keep-alive pings", min=5, max=65_535)
    connect_timeout: float = _opt(5.0, "seconds to establish a connection", min=0.1, max=3600)
    receive_maximum: int = _opt(1000, "messages received and not yet acknowledged at most", min=1, max=65_535)
    username: str = _opt("", "user name ('' = anonymous)")
    password: str = _opt("", "password; prefer env TAGWRITER_MQTT_PASSWORD", secret=True)
    tls: bool = _opt(False, "connect with TLS")
    ca_file: str = _opt("", "TLS: CA certificates (PEM) ('' = the system's)")
    cert_file: str = _opt("", "TLS: client certificate (PEM), for brokers that ask for one")
    key_file: str = _opt("", "TLS: the client certificate's private key (PEM)")
    tls_insecure: bool = _opt(False, "TLS: do not check the broker's host name (testing only)")
    reconnect_min_delay: float = _opt(1.0, "first seconds between reconnect attempts", min=0.01, max=3600)
    reconnect_max_delay: float = _opt(30.0, "reconnect backoff cap in seconds", min=0.01, max=3600)
    stop_timeout: float = _opt(10.0, "seconds a stop keeps the session for the last acks", min=0, max=3600)
    tag: str = _opt("{topic}", "tag name template: {topic}, {topic_dots}, {1}..{n} (topic levels), {-1} (last)")
    tag_path: str = _opt("", "payload path of the tag name ('' = use the template)")
    key_separator: str = _opt("/", "object of tag -> value: member tag = tag + separator + key")
    value_path: str = _opt("value", "payload path of the value ('' = the whole payload)")
    ts_path: str = _opt("ts", "payload path of the timestamp ('' = receive time)")
    ts_unit: str = _opt("s", "unit of numeric timestamps", choices=("s", "ms", "us"))
    quality_path: str = _opt("quality", "payload path of the quality code ('' = always 192)")


# [sparkplug]: the sparkplug source (tagwriter/sources/sparkplug.py)
@dataclass(slots=True)
class SparkplugConfig:
    groups: list[str] = _opt([], "Sparkplug group ids to subscribe to; [] = every group (spBv1.0/#)")
    separator: str = _opt("/", "joins group, edge node, device and metric into the tag name", choices=("/", "."))
    include_group: bool = _opt(True, "tag names start with the group id")
    exclude_metrics: list[str] = _opt(
        ["bdSeq", "Node Control/*"], "metric names (fnmatch patterns) never written"
    )
    store_transient: bool = _opt(False, "write metrics flagged is_transient (the spec: not for historians)")
    mark_death: bool = _opt(True, "NDEATH/DDEATH: write each metric's last value again with quality 0")
    rebirth: bool = _opt(True, "request a rebirth (NCMD) on a seq gap, an unknown alias or an unborn node")
    reorder_timeout: float = _opt(2.0, "seconds a missing seq may arrive late before a rebirth is requested",
                                  min=0, max=600)
    rebirth_holdoff: float = _opt(5.0, "seconds at least between two rebirth requests to one edge node",
                                  min=0, max=3600)


MODBUS_MAX_READ_REGISTERS = 125  # the Modbus application protocol: function codes 3 and 4
MODBUS_MAX_READ_BITS = 2000  # function codes 1 and 2


# [modbus]: the modbus source (tagwriter/sources/modbus.py)
@dataclass(slots=True)
class ModbusConfig:
    host: str = _opt("127.0.0.1", "Modbus TCP server or gateway")
    port: int = _opt(502, "Modbus TCP port", min=1, max=65_535)
    timeout: float = _opt(1.0, "seconds a connect or one request may take", min=0.01, max=60)
    poll_interval: float = _opt(1.0, "seconds between polls of a register without its own interval",
                                min=0.001, max=86_400)
    max_registers: int = _opt(MODBUS_MAX_READ_REGISTERS, "registers one request reads at most", min=1,
                              max=MODBUS_MAX_READ_REGISTERS)
    max_bits: int = _opt(MODBUS_MAX_READ_BITS, "coils or discrete inputs one request reads at most", min=1,
                         max=MODBUS_MAX_READ_BITS)
    max_gap: int = _opt(0, "unmapped registers one request may read across to join two ranges", min=0,
                        max=MODBUS_MAX_READ_REGISTERS - 1)
    on_error: str = _opt("bad", "values of a failed request: bad (value empty, quality 0) or skip",
                         choices=("bad", "skip"))
    reconnect_delay: float = _opt(0.5, "first seconds between reconnect attempts", min=0.01, max=3600)
    reconnect_max_delay: float = _opt(30.0, "reconnect backoff cap in seconds", min=0.01, max=3600)
    registers: list[dict[str, Any]] = _opt([], "the register map: one [[modbus.registers]] table per tag")


# [jetstream]: the jetstream source (tagwriter/sources/jetstream.py)
@dataclass(slots=True)
class JetStreamConfig:
    servers: str = _opt("nats://127.0.0.1:4222", "NATS server URLs, comma-separated (nats:// or tls://)")
    stream: str = _opt("tagwriter", "the stream to read (it must exist)")
    subject: str = _opt("", "create: the consumer's filter subject ('' = every subject of the stream)")
    durable: str = _opt("tagwriter", "durable consumer name; writers with the same one share the messages")
    consumer: str = _opt(
        "create", "create: make the consumer if missing (an existing one must match these settings); "
        "bind: use an existing consumer as it is", choices=("create", "bind"),
    )
    fetch_batch: int = _opt(0, "messages per fetch; 0 = writer.batch_size", min=0, max=10_000)
    fetch_timeout: float = _opt(1.0, "seconds a fetch waits to fill its batch", min=0.01, max=60)
    ack_wait: float = _opt(30.0, "create: seconds before JetStream redelivers an unacknowledged message",
                           min=1, max=86_400)
    max_ack_pending: int = _opt(
        10_000, "create: messages delivered and not yet acknowledged, for all writers on the consumer",
        min=1, max=10_000_000,
    )
    max_deliver: int = _opt(-1, "create: deliveries of a message at most; -1 = no limit (none dropped)", min=-1)
    user: str = _opt("", "user name")
    password: str = _opt("", "password; prefer env TAGWRITER_JETSTREAM__PASSWORD", secret=True)
    token: str = _opt("", "authentication token (instead of user and password)", secret=True)
    tls_ca_file: str = _opt("", "TLS: CA certificates (PEM) to verify the server ('' = the system's)")
    tls_cert_file: str = _opt("", "TLS: client certificate (PEM), for servers that verify clients")
    tls_key_file: str = _opt("", "TLS: the client certificate's private key (PEM)")
    tls_hostname: str = _opt("", "TLS: the server name to verify ('' = the URL's host)")
    connect_timeout: float = _opt(5.0, "seconds to establish a connection", min=0.1, max=3600)
    reconnect_wait: float = _opt(2.0, "seconds between reconnect attempts", min=0.01, max=3600)


# [opcua]: the opcua source (tagwriter/sources/opcua.py)
@dataclass(slots=True)
class OpcUaConfig:
    url: str = _opt("opc.tcp://127.0.0.1:4840", "server endpoint: opc.tcp://HOST:PORT[/PATH]")
    nodes: list[str] = _opt([], "node ids to subscribe to, e.g. [\"ns=2;s=Line1.Temp\", \"nsu=urn:plc;i=7\"]")
    browse_paths: list[str] = _opt(
        [], "subscribe every numeric Variable under these paths from the Root folder, e.g. [\"Objects/Plant\"]"
    )
    tag_names: str = _opt(
        "browse-path", "a node's tag name: browse-path (Plant.Line1.Temp), display-name or node-id",
        choices=("browse-path", "display-name", "node-id"),
    )
    tag_prefix: str = _opt("", "put before every tag name taken from the server (not before [opcua.tags] names)")
    tags: dict[str, str] = _opt({}, "[opcua.tags]: node id = tag name; wins over tag_names")
    timestamp: str = _opt(
        "source", "the row's time: source or server timestamp (the other, then the receive time, when absent)",
        choices=("source", "server"),
    )
    publishing_interval: float = _opt(0.5, "seconds between the server's notification messages", min=0.01, max=3600)
    sampling_interval: float = _opt(
        0.0, "seconds between the server's samples of a node (0 = as fast as it can, -1 = publishing interval)",
        min=-1, max=3600,
    )
    queue_size: int = _opt(100, "values the server queues per node between messages (it drops the oldest beyond)",
                           min=1, max=100_000)
    trigger: str = _opt(
        "status-value", "what counts as a change: status, status-value or status-value-timestamp",
        choices=("status", "status-value", "status-value-timestamp"),
    )
    deadband: str = _opt("none", "drop changes smaller than deadband_value: none, absolute, or percent of EURange",
                         choices=("none", "absolute", "percent"))
    deadband_value: float = _opt(0.0, "the deadband: in the value's unit (absolute) or 0-100 (percent)", min=0)
    security_mode: str = _opt("None", "None, Sign or SignAndEncrypt", choices=("None", "Sign", "SignAndEncrypt"))
    security_policy: str = _opt(
        "None", "None, Basic256Sha256, Aes128Sha256RsaOaep or Aes256Sha256RsaPss",
        choices=("None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"),
    )
    certificate: str = _opt("", "Sign/SignAndEncrypt: the client's certificate file (DER or PEM)")
    private_key: str = _opt("", "Sign/SignAndEncrypt: the certificate's private key file (PEM or DER)")
    private_key_password: str = _opt("", "password of the private key file, if it has one", secret=True)
    server_certificate: str = _opt("", "the server's certificate file ('' = the one its endpoint offers)")
    application_uri: str = _opt("urn:tagwriter:opcua", "the client's application URI (the certificate's URI SAN)")
    username: str = _opt("", "user name ('' = anonymous)")
    password: str = _opt("", "password; prefer env TAGWRITER_OPCUA_PASSWORD", secret=True)
    timeout: float = _opt(5.0, "seconds any one request may take", min=0.1, max=600)
    health_interval: float = _opt(1.0, "seconds between checks that the session is alive", min=0.1, max=600)
    reconnect_min_delay: float = _opt(1.0, "first seconds between reconnect attempts", min=0.01, max=3600)
    reconnect_max_delay: float = _opt(30.0, "reconnect backoff cap in seconds", min=0.01, max=3600)
    max_unsettled: int = _opt(10_000, "values received and not yet settled at most: publishing pauses beyond",
                              min=10, max=10_000_000)


@dataclass(slots=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)
    modbus: ModbusConfig = field(default_factory=ModbusConfig)
    jetstream: JetStreamConfig = field(default_factory=JetStreamConfig)
    opcua: OpcUaConfig = field(default_factory=OpcUaConfig)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    def to_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """The tree as plain TOML-able data; secrets replaced by `***` when set."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            values: dict[str, Any] = {}
            for f in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                if redact and f.metadata.get("secret") and value:
                    value = REDACTED
                if redact:
                    value = redact_value(f.name, value)
                    if isinstance(value, str):  # a known secret copied into any other key
                        value = redact_text(value)
                values[f.name] = value
            out[section.name] = values
        return out

    def dumps(self, *, redact: bool = True) -> str:
        return tomli_w.dumps(self.to_dict(redact=redact))


# -- loading ---------------------------------------------------------------


def load(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Config:
    """The effective config: defaults, then the file, then env, then `overrides`.

    `path=None` reads `./tagwriter.toml` if present. `overrides` maps dotted key
    paths (`writer.batch_size`) to values, as the CLI flags give them;
    `origins` names where each came from (`--batch-size`) for error messages.
    Environment names are read as `env_settings` says; `warn` (default: the
    log) hears about the ones that look meant as config but are not.
    `defaults` (dotted key paths) are a command's own defaults: below the
    file, the environment and the flags (`tagwriter run` queues on disk).
    Raises ConfigError naming the file:line or key path; a bad value raises
    ConfigValueError, which also says where the value came from.
    """
    if path is None:
        path = DEFAULT_PATH if DEFAULT_PATH.is_file() else None
    text = _read_text(Path(path)) if path is not None else ""
    raw: dict[str, Any] = _parse_toml(Path(path), text) if path is not None else {}
    origin = str(path) if path is not None else "defaults"
    tree = _tree_from_mapping(raw, origin, text)
    for dotted, value in (defaults or {}).items():
        section, _, key = dotted.partition(".")
        if key not in tree[section]:
            _set(tree, section, key, value, f"default of the command for {dotted}", origin_kind="default")
    env = os.environ if env is None else env
    for name, (section, key) in env_settings(env, warn).items():
        _apply_env(tree, name, section, key, env[name])
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            where = (origins or {}).get(dotted, f"option for {dotted}")
            _set(tree, section, key, value, where, origin_kind="flag")
    config = Config(**{name: cls(**tree[name]) for name, cls in _sections().items()})
    validate(config)
    return config


def read_toml(path: Path) -> dict[str, Any]:
    return _parse_toml(path, _read_text(path))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file", hint="tagwriter config init writes one") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - line_start + 1})",
            hint="save the file as UTF-8",
        ) from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        # tomllib says "at end of document" instead of a line when the file ends too early.
        line = m.group(1) if m else str(text.count("\n") + (not text.endswith("\n")))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)) if m else str(exc)
        raise ConfigError(f"{path}:{line}: TOML syntax error: {msg}") from None


def _sections() -> dict[str, type]:
    return {f.name: _section_type(f.name) for f in dataclasses.fields(Config)}


def _section_type(name: str) -> type:
    hints = typing.get_type_hints(Config)
    return typing.cast(type, hints[name])


def _fields(section: str) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(_section_type(section))}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _tree_from_mapping(raw: Mapping[str, Any], origin: str, text: str = "") -> dict[str, dict[str, Any]]:
    sections = _sections()
    tree: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(
                f"{origin}: unknown section [{section}]{_did_you_mean(section, list(sections))}",
                hint=f"sections are {', '.join(sections)}",
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: {section} must be a table [{section}], not a value")
        for key, value in values.items():
            line = _line_of(text, section, key)
            _set(tree, section, key, value, f"{origin}:{line}" if line else origin, origin_kind="file")
    return tree


def _line_of(text: str, section: str, key: str) -> int | None:
    """The line of `key = ...` under `[section]` in TOML text, if it is written that simple way."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_-]+)\s*\]", stripped)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"^(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=", stripped):
            return number
    return None


class ConfigValueError(ConfigError):
    """A bad value of one key; `key` is its path, `origin` "file", "env" or "flag"."""

    def __init__(self, message: str, *, hint: str = "", key: str = "", origin: str = "") -> None:
        super().__init__(message, hint=hint)
        self.key = key
        self.origin = origin


def _coerce_from(where: str, origin_kind: str, path: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """`_coerce`, with an error that says where the value came from."""
    try:
        return _coerce(path, f, value)
    except ConfigError as exc:
        raise ConfigValueError(f"{where}: {exc.message}", hint=exc.hint, key=path, origin=origin_kind) from None


def _set(
    tree: dict[str, dict[str, Any]], section: str, key: str, value: Any, origin: str, *, origin_kind: str = "file"
) -> None:
    if section not in tree:
        raise ConfigError(f"{origin}: unknown section {section!r}{_did_you_mean(section, list(tree))}")
    fields = _fields(section)
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown key {section}.{key}{_did_you_mean(key, list(fields))}",
            hint=f"keys of [{section}]: {', '.join(fields)}",
        )
    tree[section][key] = _coerce_from(origin, origin_kind, f"{section}.{key}", fields[key], value)


def env_name(section: str, key: str) -> str:
    """The environment variable of config key `section.key`: `TAGWRITER_WRITER__BATCH_SIZE`."""
    return f"{ENV_PREFIX}{section.upper()}{ENV_SEPARATOR}{key.upper()}"


def env_settings(env: Mapping[str, str], warn: Callable[[str], None] | None = None) -> dict[str, tuple[str, str]]:
    """The variables of `env` that set config keys: name -> (section, key), in the order to apply them.

    `TAGWRITER_<SECTION>__<KEY>` (after the password aliases, so it wins over them). Any other
    `TAGWRITER_*` name is never config and never an error; `warn` (default: the log) is told once
    per load about a `__` name that is no key, and about a key named in the old `TAGWRITER_SECTION_KEY` way.
    """
    say = warn or (lambda message: log.warning("%s", message))
    keys = {env_name(s, k): (s, k) for s in _sections() for k in _fields(s)}
    found = {name: ENV_ALIASES[name] for name in ENV_ALIASES if name in env}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in ENV_ALIASES or name in ENV_NOT_CONFIG \
                or name.startswith(ENV_NOT_CONFIG_PREFIX):
            continue
        if name.upper() in keys:
            found[name] = keys[name.upper()]
        elif ENV_SEPARATOR in name[len(ENV_PREFIX):]:
            say(f"environment {name}: not a config key{_did_you_mean_env(name, list(keys))}; ignored")
        elif (old := _old_scheme_key(name)) and not SERVICE_LINK.match(env[name]):
            say(f"environment {name}: ignored: config variables are named {ENV_SCHEME} now; "
                f"set {env_name(*old)} for {old[0]}.{old[1]}")
    return found


def _did_you_mean_env(name: str, names: list[str]) -> str:
    # Compared without the prefix they all share, which would make any two names look close.
    rest = [n[len(ENV_PREFIX):] for n in names]
    close = difflib.get_close_matches(name[len(ENV_PREFIX):].upper(), rest, n=1, cutoff=0.6)
    return f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else f" (names are {ENV_SCHEME})"


def _old_scheme_key(name: str) -> tuple[str, str] | None:
    """(section, key) if `name` names a key the old single-underscore way (`TAGWRITER_WRITER_BATCH_SIZE`)."""
    rest = name[len(ENV_PREFIX):].lower()
    for section in _sections():
        key = rest.removeprefix(section + "_")
        if key != rest and key in _fields(section):
            return section, key
    return None


def _apply_env(tree: dict[str, dict[str, Any]], name: str, section: str, key: str, text: str) -> None:
    f = _fields(section)[key]
    parsed = _parse_env(f, text, name)
    tree[section][key] = _coerce_from(f"environment {name}", "env", f"{section}.{key}", f, parsed)


#: The kinds a config field can be, by its annotation. Tables (a map of names, a list of tables such as
#: `[[modbus.registers]]`) are written in the file only; their own module checks what is inside.
_KINDS: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "list[float]": list,
    "list[str]": "strings", "dict[str, str]": "table", "list[dict[str, Any]]": "tables",
}


def _field_type(f: dataclasses.Field[Any]) -> Any:
    return _KINDS[str(f.type)]


def _parse_env(f: dataclasses.Field[Any], text: str, name: str) -> Any:
    kind = _field_type(f)
    shown = REDACTED if f.metadata.get("secret") else repr(redact_value(f.name, text))
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"environment {name} = {shown}: must be true or false")
    if kind in ("table", "tables"):
        raise ConfigError(f"environment {name}: a table is set in the config file, not the environment")
    if kind == "strings":
        return [p.strip() for p in text.split(",") if p.strip()]
    if kind is list:
        parts = [p for p in re.split(r"[,\s]+", text.strip().strip("[]")) if p]
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"environment {name} = {shown}: must be numbers separated by commas") from None
    if kind in (int, float):
        try:
            return kind(text.replace("_", ""))
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"environment {name} = {shown}: must be {what}") from None
    return text


def _coerce(path: str, f: dataclasses.Field[Any], value: Any) -> Any:
    kind = _field_type(f)
    shown = _show(f, value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {shown}: must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {shown}: must be an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path} = {shown}: must be a number")
        value = float(value)
    elif kind == "strings":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path} = {shown}: must be a list of strings, e.g. [\"a\", \"b\"]")
        value = list(value)
    elif kind == "table":
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{path}: must be a table of strings ([{path}] with name = \"text\" lines)")
        return dict(value)
    elif kind == "tables":
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{path}: must be a list of tables ([[{path}]] in TOML)")
        return [dict(v) for v in value]
    elif kind is list:
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{path} = {shown}: must be a list of numbers, e.g. [1.0, 2.0, 4.0]")
        value = [float(v) for v in value]
    elif not isinstance(value, str):
        raise ConfigError(f"{path} = {shown}: must be a string")
    _check_rules(path, f, value)
    return value


def _show(f: dataclasses.Field[Any], value: Any) -> str:
    if f.metadata.get("secret"):
        return REDACTED
    value = redact_value(f.name, value)
    try:
        return toml_value(value) if _tomlable(value) else repr(value)
    except (TypeError, ValueError):  # e.g. a list holding a value TOML cannot express
        return repr(value)


def toml_value(value: Any) -> str:
    """A value as TOML on one line (tomli-w spreads arrays over several)."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: `tags = { "ns=2;i=7" = "line1.temp" }`
        keys = (k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k) for k in value)
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in zip(keys, value.values(), strict=True)) + "}"
    return tomli_w.dumps({"v": value})[4:].strip()


def _tomlable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, list)) and not isinstance(value, types.NoneType)


def _check_rules(path: str, f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    shown = _show(f, value)
    for v in value if isinstance(value, list) else [value]:
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise ConfigError(f"{path} = {shown}: must be between {lo:g} and {hi:g}")
        if lo is not None and v < lo:
            raise ConfigError(f"{path} = {shown}: must be at least {lo:g}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{path} = {shown}: must be one of {', '.join(choices)}{_did_you_mean(str(value), list(choices))}"
        )
    if meta.get("identifier") and not IDENTIFIER.match(value):
        raise ConfigError(
            f"{path} = {shown}: not a valid SQL identifier",
            hint="a letter, then letters, digits or _ $ #, at most 128 characters",
        )


def validate(config: Config) -> None:
    """Check invariants between keys; raises ConfigError. Registers the database secrets for redaction."""
    w, b, d = config.writer, config.buffer, config.database
    register_database(d)
    register_secrets(*(
        getattr(getattr(config, s.name), f.name) for s in dataclasses.fields(config)
        for f in dataclasses.fields(getattr(config, s.name)) if f.metadata.get("secret")
    ))
    if w.batch_size > b.capacity:
        raise ConfigError(
            f"writer.batch_size = {w.batch_size}: must not exceed buffer.capacity = {b.capacity}"
        )
    if w.probe_interval > w.probe_max_interval:
        raise ConfigError(
            f"writer.probe_interval = {w.probe_interval:g}: must not exceed "
            f"writer.probe_max_interval = {w.probe_max_interval:g}"
        )
    if d.pool_min > d.pool_max:
        raise ConfigError(f"database.pool_min = {d.pool_min}: must not exceed database.pool_max = {d.pool_max}")
    names = [d.tag_column, d.ts_column, d.value_column, d.quality_column]
    if len({n.lower() for n in names}) != 4:
        raise ConfigError(f"database columns {', '.join(names)}: must be four different names")
    parse_url(d.url)
    _validate_source(config)


def _validate_source(config: Config) -> None:
    """The checks of the chosen plant source's own section (topic filters, the register map)."""
    kind = config.source.kind
    if kind in ("mqtt", "sparkplug"):
        from tagwriter.sources.mqtt import check_topic_filters  # the sources import this module

        if kind == "mqtt":
            check_topic_filters(config.mqtt.topics)
    elif kind == "modbus":
        from tagwriter.sources.modbus import check_section

        check_section(config.modbus)
    elif kind == "opcua":
        from tagwriter.sources.opcua import check_config

        check_config(config.opcua)
    elif kind == "jetstream":
        from tagwriter.sources.jetstream import check_settings

        check_settings(config.jetstream)


# -- database URLs -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed `database.url`: `kind` is sqlite, oracle, postgresql or jetstream."""

    kind: str
    path: str = ""  # sqlite: the file
    user: str = ""
    password: str = ""
    host: str = ""  # jetstream: of the first server
    port: int | None = None
    name: str = ""  # oracle: service name; postgresql: database; jetstream: stream
    servers: tuple[str, ...] = ()  # jetstream: every server as nats://HOST:PORT (or tls://)
    subject: str = ""  # jetstream: the subject batches are published on


SCHEMES = {"sqlite": "sqlite", "oracle": "oracle", "postgresql": "postgresql", "postgres": "postgresql",
           "nats": "jetstream", "tls": "jetstream"}
NATS_PORT = 4222
NATS_URL_SHAPE = "nats://HOST:PORT[,HOST:PORT...]/STREAM[/SUBJECT] (tls:// for TLS)"
_NATS_NAME = re.compile(r"^[^\s.*>/\\]+$")  # a stream name: no spaces, '.', wildcards or slashes
_NATS_SUBJECT = re.compile(r"^[^\s.*>]+(?:\.[^\s.*>]+)*$")  # tokens, no wildcards: a subject to publish on


def parse_url(url: str) -> DatabaseURL:
    """Parse a database URL; raises ConfigError for an unknown scheme or shape.

    `SCHEME://[USER[:PASSWORD]@]HOST[:PORT][/NAME][?QUERY]`: the user part ends at
    the LAST '@', and everything after the first ':' of it is the password, so a
    password may hold '@', '/' or ':' without percent-encoding. Errors show the
    URL redacted.
    """
    scheme, sep, rest = url.partition("://")
    kind = SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise ConfigError(
            f"database.url = {redact_url(url)!r}: unknown database kind",
            hint="use sqlite:///PATH, oracle://USER@HOST:PORT/SERVICE, postgresql://USER@HOST:PORT/DB "
                 f"or {NATS_URL_SHAPE}",
        )
    if kind == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigError("database.url: sqlite needs a file, e.g. sqlite:///tagwriter.db")
        return DatabaseURL("sqlite", path=path)
    userinfo, _, hostpart = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    if kind == "jetstream":
        return _parse_nats_url(url, scheme.lower(), unquote(user), unquote(password), hostpart)
    # Only the part after the user info goes to urlsplit: it holds no secret.
    parts = urlsplit(f"{scheme}://{hostpart}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"database.url = {redact_url(url)!r}: bad port") from None
    return DatabaseURL(
        kind,
        user=unquote(user),
        password=unquote(password),
        host=parts.hostname or "",
        port=port,
        name=parts.path.lstrip("/"),
    )


def _parse_nats_url(url: str, scheme: str, user: str, password: str, hostpart: str) -> DatabaseURL:
    """A JetStream sink's URL (NATS_URL_SHAPE); SUBJECT defaults to STREAM.batches."""
    hosts, _, path = hostpart.partition("/")
    stream, _, subject = path.strip("/").partition("/")
    shown = redact_url(url)
    servers: list[tuple[str, int]] = []
    for host in filter(None, (h.strip() for h in hosts.split(","))):
        parts = urlsplit(f"{scheme}://{host}")
        try:
            port = parts.port or NATS_PORT
        except ValueError:
            raise ConfigError(f"database.url = {shown!r}: bad port in {host!r}") from None
        if not parts.hostname or parts.path or parts.query:
            raise ConfigError(f"database.url = {shown!r}: {host!r} is not HOST[:PORT]", hint=NATS_URL_SHAPE)
        servers.append((f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname, port))  # IPv6
    if not servers:
        raise ConfigError(f"database.url = {shown!r}: names no NATS server", hint=NATS_URL_SHAPE)
    if not _NATS_NAME.match(stream):
        raise ConfigError(f"database.url = {shown!r}: the stream name {stream!r} must be a name without spaces, "
                          "'.', '*', '>' or slashes", hint=NATS_URL_SHAPE)
    subject = subject or f"{stream}.batches"
    if not _NATS_SUBJECT.match(subject):
        raise ConfigError(f"database.url = {shown!r}: {subject!r} is not a subject to publish on "
                          "(tokens separated by '.', no spaces or wildcards)", hint=NATS_URL_SHAPE)
    return DatabaseURL("jetstream", user=user, password=password, host=servers[0][0], port=servers[0][1],
                       name=stream, servers=tuple(f"{scheme}://{h}:{p}" for h, p in servers), subject=subject)


def redact_value(key: str, value: Any) -> Any:
    """`value` of config key `key` (`url`, `dsn`, ...) with any password in it redacted."""
    if not isinstance(value, str):
        return value
    if key == "url":
        return redact_url(value)
    if key == "dsn":
        return redact_dsn(value)
    return value


# -- documentation -------------------------------------------------------------


def describe() -> list[tuple[str, str, str]]:
    """(key path, default as TOML, help) for every key: the reference in README."""
    rows = []
    for section in _sections():
        for f in _fields(section).values():
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{f.name}", toml_value(default), f.metadata["help"]))
    return rows

"""Sinks: one module per database behind the `Sink` protocol."""

from __future__ import annotations

from tagwriter.config import DatabaseConfig, parse_url
from tagwriter.errors import ConfigError
from tagwriter.sinks.base import Sink, WriteResult

__all__ = ["Sink", "WriteResult", "create_sink"]


def create_sink(config: DatabaseConfig) -> Sink:
    """The sink for `config.url`'s kind; raises ConfigError for an unavailable kind."""
    kind = parse_url(config.url).kind
    if kind == "sqlite":
        from tagwriter.sinks.sqlite import SqliteSink

        return SqliteSink.from_config(config)
    if kind == "oracle":
        try:
            from tagwriter.sinks.oracle import OracleSink
        except ImportError as exc:  # pragma: no cover - until the Oracle sink lands
            raise ConfigError(f"database.url: the oracle sink is not available: {exc}") from None
        return OracleSink.from_config(config)
    if kind == "postgresql":
        try:
            from tagwriter.sinks.postgresql import PostgresSink
        except ImportError as exc:
            raise ConfigError(
                f"database.url: the postgresql sink needs psycopg: {exc}",
                hint="pip install 'psycopg[binary]' (or, from a tagwriter checkout, pip install '.[postgres]')",
            ) from None
        return PostgresSink.from_config(config)
    if kind == "jetstream":
        from tagwriter.sinks.jetstream import JetStreamSink  # ConfigError naming the extra without nats-py

        return JetStreamSink.from_config(config)
    raise ConfigError(f"database.url: no sink for {kind}")  # pragma: no cover

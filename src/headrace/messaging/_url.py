"""Broker URLs: ``open_broker("sqlite:///jobs.db")`` picks and configures the adapter.

=================================  ==================================================
``memory://`` / ``memory://name``  :class:`MemoryBroker`, private / shared by name
``sqlite:///jobs.db``              :class:`SqliteBroker` on ``jobs.db`` (relative path)
``sqlite:////var/lib/jobs.db``     absolute path (four slashes, as in SQLAlchemy)
``redis://[:password@]host/db``    Redis Streams (imported only when asked for)
``amqp://user:pw@host/vhost``       RabbitMQ quorum queues (``amqps://`` too; imported
                                   only when asked for)
``postgresql://user@host/dbname``  PostgreSQL (``postgres://`` too; imported only when
                                   asked for)
``nats://[user:password@]host``    NATS JetStream (imported only when asked for)
=================================  ==================================================

Query parameters set adapter options (``sqlite:///jobs.db?max_deliveries=10&lease=30``);
keyword arguments to :func:`open_broker` override them. Redis and PostgreSQL URLs go to
their adapters unchanged, since redis-py and libpq read their own parameters from them
(the adapters take out the ones they know: ``?prefix=jobs_&lease=60``). Passwords in URLs
never appear in error messages or reprs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from .._errors import ConfigurationError, redact
from ._broker import Broker

__all__ = ["open_broker"]


def _int_or_none(text: str) -> int | None:
    if text.lower() in ("none", "off", "0", ""):
        return None
    return int(text)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _flag(text: str, name: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} takes 1/0, true/false, yes/no or on/off")


_MEMORY_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "max_deliveries": _int_or_none,
    "lease": _seconds,
}
_SQLITE_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "max_deliveries": _int_or_none,
    "lease": _seconds,
    "poll_interval": _seconds,
    "busy_timeout": _seconds,
    "synchronous": str,
    "inline": lambda text: _flag(text, "inline"),
}


def _query_options(
    url: str, query: str, allowed: Mapping[str, Callable[[str], Any]]
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, text in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        convert = allowed.get(name)
        if convert is None:
            raise ConfigurationError(
                f"unknown option {name!r} in broker URL {redact(url)!r}; "
                f"known: {', '.join(sorted(allowed))}",
                code="invalid_broker_url",
            )
        try:
            options[name] = convert(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"option {name}={text!r} in broker URL {redact(url)!r} is not valid: {exc}",
                code="invalid_broker_url",
            ) from exc
    return options


def open_broker(url: str, **options: Any) -> Broker:
    """Return a (not yet connected) broker for ``url``; see the module doc for schemes.

    Keyword ``options`` go to the adapter's constructor and override the URL's query
    parameters (``open_broker("sqlite:///jobs.db", clock=clock)``). Raises
    :class:`~headrace.ConfigurationError` (code ``invalid_broker_url``) for an unknown
    scheme, a missing path or an unknown or malformed option. Connecting happens in
    ``await broker.connect()`` (or ``async with broker``), so this call does no I/O.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"broker URL must be a string, got {type(url).__name__}", code="invalid_broker_url"
        )
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ConfigurationError(
            f"broker URL {redact(url)!r} has no scheme; use memory://, sqlite:///path.db, "
            "redis://host, postgresql://host/dbname, nats://host or amqp://host",
            code="invalid_broker_url",
        )
    if scheme == "memory":
        from .brokers.memory import MemoryBroker

        parts = urlsplit(url)
        name = unquote(parts.netloc + parts.path) or None
        merged = {**_query_options(url, parts.query, _MEMORY_OPTIONS), **options}
        return MemoryBroker(name, **merged)
    if scheme == "sqlite":
        from .brokers.sqlite import SqliteBroker

        path, _, query = rest.partition("?")
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"broker URL {redact(url)!r} names no file; use sqlite:///relative.db or "
                "sqlite:////absolute/path.db",
                code="invalid_broker_url",
            )
        merged = {**_query_options(url, query, _SQLITE_OPTIONS), **options}
        return SqliteBroker(unquote(path[1:]), **merged)
    if scheme in ("redis", "rediss", "unix"):
        # Imported by name: the Redis adapter pulls in redis-py, which only Redis users need.
        redis_module = importlib.import_module(".brokers.redis", __package__)
        return cast(Broker, redis_module.RedisBroker(url, **options))
    if scheme in ("amqp", "amqps"):
        # Imported by name: the RabbitMQ adapter pulls in aio-pika.
        rabbitmq_module = importlib.import_module(".brokers.rabbitmq", __package__)
        return cast(Broker, rabbitmq_module.RabbitMQBroker(url, **options))
    if scheme in ("postgres", "postgresql"):
        # Imported by name: the PostgreSQL adapter pulls in psycopg.
        postgres_module = importlib.import_module(".brokers.postgres", __package__)
        return cast(Broker, postgres_module.PostgresBroker(url, **options))
    if scheme == "nats":
        # Imported by name: the NATS adapter pulls in nats-py.
        nats_module = importlib.import_module(".brokers.nats", __package__)
        return cast(Broker, nats_module.NatsBroker(url, **options))
    raise ConfigurationError(
        f"unknown broker URL scheme {scheme!r} in {redact(url)!r}; "
        "supported: memory://, sqlite:///path.db, redis://, postgresql:// (or postgres://), "
        "nats://, amqp:// (or amqps://)",
        code="invalid_broker_url",
    )

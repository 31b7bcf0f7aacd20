"""Broker options given in the URL's query (``?prefetch=200``), split off before
aio-pika sees the URL (it reads its own parameters, ``heartbeat``, ``name``... from it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ...._errors import ConfigurationError, redact
from .._options import int_or_none, take_options

__all__ = ["split_url"]


# Options that may be given in the URL's query; aio-pika reads the rest of it.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "prefetch": int,
    "lease": float,
    "max_deliveries": int_or_none,
    "settle_timeout": float,
}


def split_url(url: str) -> tuple[str, dict[str, Any]]:
    """Remove our options from the URL's query; return the URL for aio-pika and them.

    Refuses a URL that is not ``amqp://`` or ``amqps://`` (the password, if any, never
    appears in the message)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"broker URL {redact(url)!r} is not an AMQP URL; use amqp://user:password@host/vhost "
            "or amqps://",
            code="invalid_broker_url",
        )
    rest, ours, _ = take_options(url, _URL_OPTIONS, redact)
    return rest, ours

"""Broker options given in the URL's query (``?prefetch=200``), split off before
aio-pika sees the URL (it reads its own parameters, ``heartbeat``, ``name``... from it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...._errors import ConfigurationError, redact

__all__ = ["split_url"]


def _int_or_none(text: str) -> int | None:
    if text.lower() in ("none", "off", ""):
        return None
    return int(text)


# Options that may be given in the URL's query; aio-pika reads the rest of it.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "prefetch": int,
    "lease": float,
    "max_deliveries": _int_or_none,
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
    if not parts.query:
        return url, {}
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            theirs.append((name, text))
            continue
        try:
            ours[name] = convert(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"option {name}={text!r} in broker URL {redact(url)!r} is not valid: {exc}",
                code="invalid_broker_url",
            ) from exc
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours

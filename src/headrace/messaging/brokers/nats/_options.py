"""Broker options in a NATS URL's query, keeping credentials out of text, and names.

nats-py reads user, password and token from the URL itself; the broker's own options
(``?prefix=jobs&lease=60``) are taken out of the query first. A NATS URL carries a
password (``nats://user:password@host``) or a bare token (``nats://s3cret@host``):
:class:`Scrubber` removes both from any text, which :func:`headrace.redact` alone
cannot do for the token form (it has no colon).

Topics become one subject token and part of a stream name, which allow neither ``.``,
``*``, ``>``, whitespace nor path separators: :func:`encode_topic` keeps ASCII letters
and digits and writes every other byte as ``_XX`` (hex), so distinct topics never
share a name; long names end in a hash instead.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from ...._errors import ConfigurationError
from .._options import SecretScrubber, cap_or_none, seconds, take_options

__all__ = ["Scrubber", "encode_topic", "split_options"]


URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "durable": str,
    "lease": seconds,
    "max_lease": seconds,
    "max_deliveries": cap_or_none,
    "max_ack_pending": int,
    "replicas": int,
    "storage": str,
    "request_timeout": seconds,
    "promote_interval": seconds,
}

# Encoded topics longer than this end in a hash of the topic (stream names stay short).
_MAX_ENCODED = 96
_KEPT = re.compile(rb"[A-Za-z0-9]")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_name(value: object, option: str) -> str:
    """``value`` if it can be part of a stream, consumer and subject name."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigurationError(
            f"NatsBroker({option}={value!r}) must be a non-empty string of ASCII letters, "
            "digits, '_' and '-'",
            code="invalid_configuration",
        )
    return value


def encode_topic(topic: str) -> str:
    """``topic`` as one subject token and stream-name part (letters, digits, ``_XX``)."""
    raw = topic.encode()
    encoded = "".join(chr(byte) if _KEPT.match(bytes([byte])) else f"_{byte:02X}" for byte in raw)
    if len(encoded) > _MAX_ENCODED:
        digest = hashlib.sha256(raw).hexdigest()[:24]
        # The cut never splits an escape: a hash of the whole topic follows it anyway.
        encoded = f"{encoded[:64]}_H{digest}"
    return encoded


class Scrubber(SecretScrubber):
    """Removes the URL's password or token from text (a callable; cheap to keep)."""

    __slots__ = ()

    def __init__(self, *urls: str) -> None:
        found: list[str] = []
        for url in urls:
            try:
                parts = urlsplit(url)
            except ValueError:
                continue
            if parts.password:
                found += [parts.password, unquote(parts.password)]
            elif parts.username and "@" in parts.netloc:
                # nats://token@host: the user part is the token itself.
                found += [parts.username, unquote(parts.username)]
        super().__init__(found)


def _shown(url: str) -> str:
    return Scrubber(url)(url)


def split_options(url: str) -> tuple[str, dict[str, Any]]:
    """Remove the broker's options from ``url``'s query; return the URL for nats-py and them."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("nats", "tls", "ws", "wss"):
        raise ConfigurationError(
            f"broker URL {_shown(url)!r} is not a NATS URL "
            "(nats://[user:password@]host:4222, nats://token@host, tls://...)",
            code="invalid_broker_url",
        )
    if not parts.hostname:
        raise ConfigurationError(
            f"broker URL {_shown(url)!r} names no host", code="invalid_broker_url"
        )
    rest, ours, unknown = take_options(url, URL_OPTIONS, _shown)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(sorted(unknown))} in broker URL {_shown(url)!r}; "
            f"known: {', '.join(sorted(URL_OPTIONS))} (pass nats-py's own options as keywords)",
            code="invalid_broker_url",
        )
    return rest, ours

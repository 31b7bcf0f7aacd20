"""Broker options given in the URL's query (``?group=g``), and the default consumer name."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...._errors import ConfigurationError, redact

# Options that may be given in the URL's query (?group=g&consumer=c); redis-py reads
# the rest of the query itself.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "group": str,
    "consumer": str,
    "prefix": str,
    "max_deliveries": lambda text: None if text.lower() in ("none", "off", "") else int(text),
    "lease": float,
    "trim_acked": lambda text: text.lower() in ("1", "true", "yes", "on"),
    "reclaim_interval": float,
    "max_lease": float,
}


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _split_url(url: str) -> tuple[str, dict[str, Any]]:
    """Remove our options from the URL's query; return the URL for redis-py and them."""
    parts = urlsplit(url)
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

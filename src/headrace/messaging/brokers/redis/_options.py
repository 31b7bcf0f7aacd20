"""Broker options given in the URL's query (``?group=g``), and the default consumer name."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from ...._errors import redact
from .._options import int_or_none, take_options

# Options that may be given in the URL's query (?group=g&consumer=c); redis-py reads
# the rest of the query itself.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "group": str,
    "consumer": str,
    "prefix": str,
    "max_deliveries": int_or_none,
    "lease": float,
    "trim_acked": lambda text: text.lower() in ("1", "true", "yes", "on"),
    "reclaim_interval": float,
    "max_lease": float,
}


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _split_url(url: str) -> tuple[str, dict[str, Any]]:
    """Remove our options from the URL's query; return the URL for redis-py and them."""
    rest, ours, _ = take_options(url, _URL_OPTIONS, redact)
    return rest, ours

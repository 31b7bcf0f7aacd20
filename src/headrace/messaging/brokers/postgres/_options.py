"""Broker options in a PostgreSQL URL's query, and keeping passwords out of text.

libpq refuses query parameters it does not know, so ours (``?prefix=jobs_&lease=60``)
are taken out of the URL before it reaches psycopg. A ``key=value`` conninfo string
(``"host=db dbname=jobs"``) carries no broker options.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from .._options import SecretScrubber, cap_or_none, seconds, seconds_or_none, take_options

__all__ = ["Scrubber", "split_options"]


URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str,
    "prefix": str,
    "max_deliveries": cap_or_none,
    "lease": seconds,
    "poll_interval": seconds,
    "command_timeout": seconds_or_none,
}

# password=... in a conninfo string or a URL query (quoted values may hold spaces).
_PASSWORD_SETTING = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.I)


def is_url(conninfo: str) -> bool:
    return conninfo.startswith(("postgres://", "postgresql://"))


def split_options(conninfo: str) -> tuple[str, dict[str, Any]]:
    """Remove the broker's options from a URL's query; return the URL for libpq and them."""
    if not is_url(conninfo):
        return conninfo, {}
    rest, ours, _ = take_options(conninfo, URL_OPTIONS, lambda url: Scrubber(url)(url))
    return rest, ours


class Scrubber(SecretScrubber):
    """Removes the password of one conninfo from any text (messages, reprs).

    Covers the URL form (``user:secret@``), ``password=`` settings in a conninfo
    string or a URL query, and the password itself wherever a driver message quotes
    it (when it is long enough not to match ordinary words).
    """

    __slots__ = ()

    def __init__(self, conninfo: str, password: str | None = None) -> None:
        found: set[str] = set()
        if password:
            found.add(password)
        for match in _PASSWORD_SETTING.finditer(conninfo):
            value = match.group(2).strip("'")
            if value:
                found.add(value)
        if is_url(conninfo):
            netloc = urlsplit(conninfo).netloc
            userinfo, at, _ = netloc.rpartition("@")
            if at and ":" in userinfo:
                secret = userinfo.partition(":")[2]
                found.update((secret, unquote(secret)))
        super().__init__(found, min_length=4)

    def _redacted(self, text: str) -> str:
        return _PASSWORD_SETTING.sub(r"\1***", super()._redacted(text))

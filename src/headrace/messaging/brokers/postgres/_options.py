"""Broker options in a PostgreSQL URL's query, and keeping passwords out of text.

libpq refuses query parameters it does not know, so ours (``?prefix=jobs_&lease=60``)
are taken out of the URL before it reaches psycopg. A ``key=value`` conninfo string
(``"host=db dbname=jobs"``) carries no broker options.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ...._errors import ConfigurationError, redact

__all__ = ["Scrubber", "split_options"]


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _seconds_or_none(text: str) -> float | None:
    if text.lower() in ("none", "off", ""):
        return None
    return _seconds(text)


def _max_deliveries(text: str) -> int | None:
    if text.lower() in ("none", "off", "0", ""):
        return None
    return int(text)


URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str,
    "prefix": str,
    "max_deliveries": _max_deliveries,
    "lease": _seconds,
    "poll_interval": _seconds,
    "command_timeout": _seconds_or_none,
}

# password=... in a conninfo string or a URL query (quoted values may hold spaces).
_PASSWORD_SETTING = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.I)


def is_url(conninfo: str) -> bool:
    return conninfo.startswith(("postgres://", "postgresql://"))


def split_options(conninfo: str) -> tuple[str, dict[str, Any]]:
    """Remove the broker's options from a URL's query; return the URL for libpq and them."""
    if not is_url(conninfo):
        return conninfo, {}
    parts = urlsplit(conninfo)
    if not parts.query:
        return conninfo, {}
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        convert = URL_OPTIONS.get(name)
        if convert is None:
            theirs.append((name, text))
            continue
        try:
            ours[name] = convert(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"option {name}={text!r} in broker URL {Scrubber(conninfo)(conninfo)!r} is "
                f"not valid: {exc}",
                code="invalid_broker_url",
            ) from None
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


class Scrubber:
    """Removes the password of one conninfo from any text (messages, reprs).

    Covers the URL form (``user:secret@``), ``password=`` settings in a conninfo
    string or a URL query, and the password itself wherever a driver message quotes
    it (when it is long enough not to match ordinary words).
    """

    __slots__ = ("_secrets",)

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
        self._secrets = sorted((s for s in found if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _PASSWORD_SETTING.sub(r"\1***", redact(text))
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

"""What the URL-configured adapters share about their options and their secrets.

A server adapter (Redis, PostgreSQL, NATS, RabbitMQ) takes a URL whose query carries
both the driver's parameters and the broker's own (``?prefix=jobs_&lease=60``):
:func:`take_options` takes out and converts the broker's, :func:`merge_url_options`
lets the URL's value win over a keyword left at its default, and the converters read
the values. :class:`SecretScrubber` removes an adapter's secrets from text; each
adapter decides what its secrets are (a URL's password, a NATS token, a conninfo
``password=`` setting).

Setup and error paths only; nothing here imports a broker client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..._errors import ConfigurationError, redact

__all__ = [
    "SecretScrubber",
    "cap_or_none",
    "check_url_type",
    "int_or_none",
    "merge_url_options",
    "seconds",
    "seconds_or_none",
    "take_options",
]

# Query values that turn an optional setting off.
_NONE_WORDS = ("none", "off", "")


def seconds(text: str) -> float:
    """A finite number of seconds (``inf`` and ``nan`` are refused here, with the URL)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def seconds_or_none(text: str) -> float | None:
    """:func:`seconds`, or ``None`` for ``none``, ``off`` or an empty value."""
    if text.lower() in _NONE_WORDS:
        return None
    return seconds(text)


def int_or_none(text: str) -> int | None:
    """An integer, or ``None`` for ``none``, ``off`` or an empty value."""
    if text.lower() in _NONE_WORDS:
        return None
    return int(text)


def cap_or_none(text: str) -> int | None:
    """A cap such as ``max_deliveries``: :func:`int_or_none` that also reads ``0`` as
    "no cap"."""
    if text.lower() in (*_NONE_WORDS, "0"):
        return None
    return int(text)


def check_url_type(url: object, where: str) -> str:
    """``url`` if it is a string; ``where`` names the argument (``"RedisBroker(url=...)"``)."""
    if not isinstance(url, str):
        raise ConfigurationError(
            f"{where} must be a string, got {type(url).__name__}", code="invalid_broker_url"
        )
    return url


def take_options(
    url: str, known: Mapping[str, Callable[[str], Any]], shown: Callable[[str], str]
) -> tuple[str, dict[str, Any], list[str]]:
    """Take the options named in ``known`` out of ``url``'s query, each converted by its
    function; return the URL without them, them, and the names left in the query.

    A URL without a query comes back unchanged. A value its converter refuses
    (``ValueError``) raises :class:`~headrace.ConfigurationError` (code
    ``invalid_broker_url``) naming the option and ``shown(url)``, the URL with its
    secrets removed.
    """
    parts = urlsplit(url)
    if not parts.query:
        return url, {}, []
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        convert = known.get(name)
        if convert is None:
            theirs.append((name, text))
            continue
        try:
            ours[name] = convert(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"option {name}={text!r} in broker URL {shown(url)!r} is not valid: {exc}",
                code="invalid_broker_url",
            ) from exc
    rest = urlunsplit(parts._replace(query=urlencode(theirs)))
    return rest, ours, [name for name, _ in theirs]


def merge_url_options(
    from_url: Mapping[str, Any], defaults: Mapping[str, Any] | None, **given: Any
) -> dict[str, Any]:
    """The constructor's keyword arguments ``given``, where each one left at its default
    (``defaults``: the constructor's ``__kwdefaults__``) yields to the URL's value."""
    defaults = defaults or {}
    return {
        name: from_url[name] if name in from_url and value == defaults.get(name) else value
        for name, value in given.items()
    }


class SecretScrubber:
    """Removes known secrets from text, after :func:`headrace.redact` (a callable).

    Cheap to keep and to call; for messages, reprs and logs, never a hot path. Longer
    secrets go first, so that one containing another is removed whole.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str], *, min_length: int = 1) -> None:
        # Secrets shorter than min_length would also match ordinary words.
        self._secrets = sorted(
            {secret for secret in secrets if len(secret) >= min_length}, key=len, reverse=True
        )

    def _redacted(self, text: str) -> str:
        """``text`` before the known secrets are replaced (adapters add their patterns)."""
        return str(redact(text))

    def __call__(self, text: str) -> str:
        text = self._redacted(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

"""Broker adapters, one module each, and the argument checks they share.

* :mod:`.memory` — :class:`~.memory.MemoryBroker`, the in-process reference adapter.
* :mod:`.sqlite` — :class:`~.sqlite.SqliteBroker`, the embedded default (a WAL file).
* :mod:`.redis` — Redis Streams with consumer groups.
* :mod:`.postgres` — :class:`~.postgres.PostgresBroker`, one PostgreSQL table with
  leases in its rows, ``SKIP LOCKED`` claims and ``LISTEN``/``NOTIFY`` wake-ups.
* :mod:`.nats` — :class:`~.nats.NatsBroker`, a JetStream work-queue stream per topic
  with one durable pull consumer (a hand-back costs an attempt there).
* :mod:`.rabbitmq` — :class:`~.rabbitmq.RabbitMQBroker`, RabbitMQ quorum queues with a
  prefetch window and leases kept by the client.

Nothing here imports a broker client: adapters are imported on their own (or through
:func:`headrace.messaging.open_broker`), so ``import headrace.messaging`` stays cheap.

The helpers below validate the arguments of the :class:`~headrace.messaging.Broker`
operations the same way in every adapter, so a bad call fails with the same
:class:`~headrace.ConfigurationError` (code ``invalid_configuration``) or
:class:`~headrace.InvalidMessage` whichever broker is behind it. What else the
adapters share lives in two private modules: ``_options`` (a URL's broker options,
scrubbing secrets) and ``_base`` (lifecycle, the error choke point).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ..._errors import BrokerError, ConfigurationError, InvalidMessage
from .._broker import OutgoingMessage

__all__ = [
    "check_dead_letters_limit",
    "check_error_record",
    "check_fetch_arguments",
    "check_lease",
    "check_nack_delay",
    "check_outgoing",
    "check_topic",
    "max_deliveries_record",
]


def check_topic(topic: object) -> str:
    """Return ``topic`` if it is a non-empty string, else raise ``ConfigurationError``."""
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError(
            f"topic must be a non-empty string, got {topic!r}", code="invalid_topic"
        )
    return topic


def check_lease(lease: object, *, where: str = "lease") -> float:
    """Return ``lease`` (seconds) if it is a finite number > 0."""
    if (
        isinstance(lease, bool)
        or not isinstance(lease, int | float)
        or not math.isfinite(lease)
        or lease <= 0
    ):
        raise ConfigurationError(
            f"{where}={lease!r} must be a finite number of seconds > 0", code="invalid_lease"
        )
    return float(lease)


def check_max_deliveries(value: object, *, broker: str) -> int | None:
    """Return ``max_deliveries`` if it is ``None`` or an int >= 1 (``broker`` names the
    adapter in the message)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(
            f"{broker}(max_deliveries={value!r}) must be an integer >= 1 or None",
            code="invalid_max_deliveries",
        )
    return value


def check_fetch_arguments(max_messages: object, timeout: object, lease: object) -> None:
    """Validate ``fetch(max_messages, timeout=, lease=)``; ``timeout`` may be ``inf``."""
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
        raise ConfigurationError(
            f"fetch(max_messages={max_messages!r}) must be an integer >= 1",
            code="invalid_fetch",
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ConfigurationError(
            f"fetch(timeout={timeout!r}) must be a number of seconds >= 0",
            code="invalid_fetch",
        )
    check_lease(lease, where="fetch(lease)")


def check_nack_delay(delay: object) -> float:
    """Return ``nack(delay=)`` (seconds) if it is a finite number >= 0."""
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not math.isfinite(delay)
        or delay < 0
    ):
        raise ConfigurationError(
            f"nack(delay={delay!r}) must be finite seconds >= 0", code="invalid_nack"
        )
    return float(delay)


def check_dead_letters_limit(limit: object) -> int:
    """Return ``dead_letters(limit=)`` if it is an integer >= 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(
            f"dead_letters(limit={limit!r}) must be an integer >= 1", code="invalid_limit"
        )
    return limit


def check_outgoing(topic: str, messages: Sequence[OutgoingMessage]) -> list[OutgoingMessage]:
    """Check the messages of ``publish(topic, messages)``: bytes bodies, str headers."""
    checked: list[OutgoingMessage] = []
    for index, message in enumerate(messages):
        if not isinstance(message, OutgoingMessage):
            raise ConfigurationError(
                f"publish({topic!r}) item {index} is {type(message).__name__}, "
                "expected OutgoingMessage",
                code="invalid_publish",
            )
        if not isinstance(message.body, bytes):
            raise InvalidMessage(
                f"publish({topic!r}) item {index}: body is {type(message.body).__name__}, "
                "expected bytes (encode text or JSON before publishing)",
                code="invalid_body",
            )
        for name, value in message.headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidMessage(
                    f"publish({topic!r}) item {index}: header {name!r}={value!r} "
                    "must map str to str",
                    code="invalid_headers",
                )
        if message.key is not None and not isinstance(message.key, str):
            raise InvalidMessage(
                f"publish({topic!r}) item {index}: key {message.key!r} must be a str or None",
                code="invalid_key",
            )
        delay = message.delay
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ConfigurationError(
                f"publish({topic!r}) item {index}: delay={delay!r} must be finite seconds >= 0",
                code="invalid_publish",
            )
        checked.append(message)
    return checked


def check_error_record(error: Mapping[str, Any]) -> bytes:
    """Return the JSON encoding of a dead-letter error record; refuse what JSON cannot hold.

    Brokers store the record as JSON so that it reads back the same everywhere (and no
    pickle ever crosses a process); ``HeadraceError.to_dict()`` always fits.
    """
    if not isinstance(error, Mapping):
        raise ConfigurationError(
            f"dead_letter(error=...) must be a mapping, got {type(error).__name__}",
            code="invalid_error_record",
        )
    try:
        return msgspec.json.encode(dict(error))
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigurationError(
            f"dead_letter(error=...) is not JSON-safe: {exc}; pass HeadraceError.to_dict()",
            code="invalid_error_record",
        ) from exc


def max_deliveries_record(
    topic: str, message_id: str, deliveries: int, max_deliveries: int
) -> dict[str, Any]:
    """The error record a broker stores when it dead-letters a message on its own."""
    return BrokerError(
        f"message {message_id} of topic {topic!r} was delivered {deliveries} times without "
        f"being acked (max_deliveries={max_deliveries}); dead-lettered by the broker",
        code="max_deliveries_exceeded",
        context={
            "topic": topic,
            "message_id": message_id,
            "deliveries": deliveries,
            "max_deliveries": max_deliveries,
        },
    ).to_dict(include_traceback=False)

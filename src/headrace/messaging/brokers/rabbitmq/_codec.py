"""AMQP messages to and from :class:`~headrace.messaging.Message`, and delivery receipts.

What headrace keeps in a message's AMQP properties:

* ``message_id``: the message's id (a random hex string given at publish; copies made
  for a hand-back, a delayed retry, a dead letter or a replay keep it);
* user headers as they are (strings), so that other AMQP clients read them too;
* ``x-headrace-key``: the idempotency key, if any;
* ``x-headrace-attempts``: attempts this message had before this copy was published
  (a delayed retry republishes the message, and a fresh copy starts with RabbitMQ's
  delivery count at 0); the attempt of a delivery is that plus the quorum queue's
  ``x-delivery-count`` plus one;
* on dead letters, ``x-headrace-error`` (the JSON error record) and
  ``x-headrace-dead-lettered-at`` (Unix time in seconds, as text).

Server-made headers (``x-delivery-count``, ``x-death``, ``x-first-death-*``,
``x-last-death-*``) and ours never show up in :attr:`Message.headers`. Nothing is
pickled: bodies are bytes, the error record is JSON.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from pamqp.commands import Basic

from ..._broker import DeadLetter, Message

if TYPE_CHECKING:
    from ._consumer import _Consumer

__all__ = [
    "ATTEMPTS_HEADER",
    "DEAD_AT_HEADER",
    "ERROR_HEADER",
    "KEY_HEADER",
    "_Delivery",
    "copy_properties",
    "dead_letter_of",
    "message_of",
    "new_properties",
]

ATTEMPTS_HEADER = "x-headrace-attempts"
KEY_HEADER = "x-headrace-key"
ERROR_HEADER = "x-headrace-error"
DEAD_AT_HEADER = "x-headrace-dead-lettered-at"
_DELIVERY_COUNT = "x-delivery-count"
_HIDDEN_PREFIXES = ("x-headrace-", "x-first-death-", "x-last-death-")
_HIDDEN = frozenset({_DELIVERY_COUNT, "x-death"})

# The states of a delivery (see _Delivery).
LIVE = 0
SETTLING = 1
SETTLED = 2


class _Delivery:
    """The receipt of one delivery: which consumer (channel) got it under which tag.

    ``state`` is ``LIVE`` while the message is buffered or leased, ``SETTLING`` while a
    hand-back, delayed nack or dead-lettering copies it elsewhere before acking it (no
    other operation may touch it then), ``SETTLED`` once an ack or nack for its tag was
    written. A delivery whose consumer's channel is gone is stale: RabbitMQ already put
    the message back, and its tag means nothing on any other channel.
    ``lease_until`` is ``inf`` while the message sits in the consumer's buffer.
    """

    __slots__ = ("consumer", "lease_until", "properties", "state", "tag")

    def __init__(self, consumer: _Consumer, tag: int, properties: Basic.Properties) -> None:
        self.consumer = consumer
        self.tag = tag
        self.properties = properties
        self.state = LIVE
        self.lease_until = math.inf

    @property
    def live(self) -> bool:
        """Still held by this delivery: not settled, and its channel still open."""
        return self.state == LIVE and self.consumer.alive


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _count(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def new_properties(
    message_id: str,
    headers: Mapping[str, str],
    key: str | None,
    *,
    attempts: int = 0,
) -> Basic.Properties:
    """Properties of a newly published message: persistent, with our headers."""
    table: dict[str, Any] = dict(headers)
    if key is not None:
        table[KEY_HEADER] = key
    if attempts:
        table[ATTEMPTS_HEADER] = attempts
    return Basic.Properties(
        delivery_mode=2, message_id=message_id, headers=table if table else None
    )


def copy_properties(
    properties: Basic.Properties, *, attempts: int, extra: Mapping[str, Any] | None = None
) -> Basic.Properties:
    """The properties of a delivered message for a copy of it (a hand-back, a delayed
    retry, a dead letter): the same, less the server's headers, with ``attempts`` and
    ``extra`` headers set."""
    table: dict[str, Any] = {
        # pamqp reads a byte array as bytes but writes only bytearray.
        name: bytearray(value) if isinstance(value, bytes) else value
        for name, value in (properties.headers or {}).items()
        if name not in _HIDDEN
        and not name.startswith(("x-first-death-", "x-last-death-"))
        and name not in (ATTEMPTS_HEADER, ERROR_HEADER, DEAD_AT_HEADER)
    }
    if attempts:
        table[ATTEMPTS_HEADER] = attempts
    if extra:
        table.update(extra)
    return Basic.Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=table or None,
        delivery_mode=2,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        message_type=properties.message_type,
        app_id=properties.app_id,
    )


def message_of(
    topic: str, body: bytes, properties: Basic.Properties, receipt: _Delivery | None
) -> Message:
    """The :class:`Message` for one delivery (or one dead letter read back)."""
    raw = properties.headers
    message_id = properties.message_id or f"amqp-{uuid.uuid4().hex}"
    if not raw:
        return Message(id=message_id, topic=topic, body=body, receipt=receipt)
    if len(raw) == 1 and _DELIVERY_COUNT in raw:
        # The common delivery: no headers of its own, on a quorum queue.
        return Message(
            id=message_id,
            topic=topic,
            body=body,
            attempt=_count(raw[_DELIVERY_COUNT]) + 1,
            receipt=receipt,
        )
    attempt = _count(raw.get(_DELIVERY_COUNT)) + _count(raw.get(ATTEMPTS_HEADER)) + 1
    key = raw.get(KEY_HEADER)
    headers = {
        _text(name): _text(value)
        for name, value in raw.items()
        if name not in _HIDDEN and not name.startswith(_HIDDEN_PREFIXES)
    }
    return Message(
        id=message_id,
        topic=topic,
        body=body,
        headers=headers,
        attempt=attempt,
        key=None if key is None else _text(key),
        receipt=receipt,
    )


def dead_letter_properties(
    properties: Basic.Properties, attempt: int, record: bytes
) -> Basic.Properties:
    """Properties of the dead-letter copy of a delivery: its error record and when."""
    return copy_properties(
        properties,
        attempts=attempt - 1,
        extra={ERROR_HEADER: record.decode(), DEAD_AT_HEADER: repr(time.time())},
    )


def _server_record(
    topic: str, message_id: str, raw: Mapping[str, Any]
) -> tuple[dict[str, Any], float]:
    """An error record for a message RabbitMQ dead-lettered itself (a delivery limit, a
    policy), from its ``x-death`` header."""
    deaths = raw.get("x-death")
    death: Mapping[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
    reason = _text(death.get("reason", "unknown"))
    when = death.get("time")
    at = when.timestamp() if isinstance(when, _dt.datetime) else time.time()
    record = {
        "code": f"rabbitmq_{reason}",
        "message": (
            f"message {message_id} of topic {topic!r} was dead-lettered by RabbitMQ "
            f"(reason {reason!r}, queue {_text(death.get('queue', '?'))!r})"
        ),
        "type": "BrokerError",
        "context": {"topic": topic, "message_id": message_id, "reason": reason},
    }
    return record, at


def dead_letter_of(topic: str, body: bytes, properties: Basic.Properties) -> DeadLetter:
    """A message read back from a dead-letter queue, with its error record."""
    message = message_of(topic, body, properties, None)
    raw = properties.headers or {}
    encoded = raw.get(ERROR_HEADER)
    if encoded is None:
        record, at = _server_record(topic, message.id, raw)
        return DeadLetter(message=message, error=record, dead_lettered_at=at)
    try:
        record = msgspec.json.decode(_text(encoded))
    except msgspec.DecodeError:
        record = {"code": "unreadable_error_record", "raw": _text(encoded)}
    try:
        at = float(_text(raw.get(DEAD_AT_HEADER, "nan")))
    except ValueError:
        at = math.nan
    return DeadLetter(message=message, error=record, dead_lettered_at=at)

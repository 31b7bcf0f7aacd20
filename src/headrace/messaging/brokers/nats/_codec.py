"""JetStream messages to and from :class:`~headrace.messaging.Message`; receipts.

A message with neither key nor headers is published as its bare body, with no NATS
headers at all (the common case, and the cheapest to parse). Otherwise these headers
carry what a :class:`~headrace.messaging.Message` needs:

* ``Hr-Key``: the key; ``Hr-Headers``: the user's headers as a JSON object (user
  header names may be anything, NATS header names may not);
* ``Hr-Id``: the message id when the stored copy is not the first one (a delayed
  retry or a replay moves the message; its id stays). Without it the id is the stream
  sequence of the message, which the ack subject carries;
* ``Hr-Attempts``: deliveries that happened before this copy was stored (a delayed
  nack moves the message, so JetStream's count starts again);
* ``Hr-Due``: on the delayed subject, when the message is due (Unix ms);
* ``Hr-Error``, ``Hr-Attempt``, ``Hr-Dead-At``: on a dead letter, the JSON error
  record, the attempt that failed and when (Unix ms).

Headers of messages published by other NATS clients come through as headers, minus
the ``Nats-*`` ones the server sets.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import msgspec

from ..._broker import DeadLetter, Message, OutgoingMessage

KEY = "Hr-Key"
HEADERS = "Hr-Headers"
ID = "Hr-Id"
ATTEMPTS = "Hr-Attempts"
DUE = "Hr-Due"
ERROR = "Hr-Error"
ATTEMPT = "Hr-Attempt"
DEAD_AT = "Hr-Dead-At"
STATUS = "Status"

json_encode = msgspec.json.Encoder().encode
_headers_decoder = msgspec.json.Decoder(dict[str, str])

ACK = b"+ACK"
NAK = b"-NAK"
IN_PROGRESS = b"+WPI"


class Receipt:
    """One delivery: its ack subject, JetStream's delivery count, the stream sequence,
    and until when (the broker's clock) this delivery surely still holds the message."""

    __slots__ = ("deliveries", "expires_at", "reply", "sequence")

    def __init__(self, reply: str, deliveries: int, sequence: int, expires_at: float) -> None:
        self.reply = reply
        self.deliveries = deliveries
        self.sequence = sequence
        self.expires_at = expires_at


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


pub_ack_decoder = msgspec.json.Decoder(PubAck)


def ack_tokens(reply: str) -> tuple[int, int]:
    """(delivery count, stream sequence) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``
    (9 tokens), or the newer form with domain and account hash in front (12 or more).
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


def outgoing_headers(message: OutgoingMessage) -> dict[str, str] | None:
    """The NATS headers of a message to publish (``None``: none needed)."""
    if message.key is None and not message.headers:
        return None
    headers: dict[str, str] = {}
    if message.key is not None:
        headers[KEY] = message.key
    if message.headers:
        headers[HEADERS] = json_encode(dict(message.headers)).decode()
    return headers


def carried_headers(message: Message) -> dict[str, str]:
    """The headers that carry ``message``'s id, key and headers to a new copy."""
    headers = {ID: message.id}
    if message.key is not None:
        headers[KEY] = message.key
    if message.headers:
        headers[HEADERS] = json_encode(message.headers).decode()
    return headers


def decode(
    topic: str,
    body: bytes,
    headers: Mapping[str, str],
    sequence: int,
    deliveries: int,
    receipt: Receipt | None,
) -> Message:
    """The :class:`Message` of a stored message that has NATS headers."""
    message_id = str(sequence)
    key: str | None = None
    user: dict[str, str] = {}
    base = 0
    for name, value in headers.items():
        if name == HEADERS:
            user.update(_headers_decoder.decode(value))
        elif name == KEY:
            key = value
        elif name == ID:
            message_id = value
        elif name == ATTEMPTS:
            base = int(value)
        elif name.startswith(("Hr-", "Nats-")) or name == STATUS:
            continue
        else:
            user[name] = value
    return Message(
        id=message_id,
        topic=topic,
        body=body,
        headers=user,
        attempt=base + deliveries,
        key=key,
        receipt=receipt,
    )


def parse_header_block(raw: bytes) -> dict[str, str]:
    """Headers from a raw ``NATS/1.0\\r\\nName: value\\r\\n...`` block (UTF-8)."""
    headers: dict[str, str] = {}
    lines = raw.decode("utf-8", "replace").split("\r\n")
    for line in lines[1:]:
        name, separator, value = line.partition(":")
        if separator and name:
            headers[name.strip()] = value.strip()
    return headers


def dead_letter_of(topic: str, stored: Mapping[str, Any]) -> DeadLetter:
    """The :class:`DeadLetter` of a ``STREAM.MSG.GET`` reply's ``message``."""
    raw_headers = stored.get("hdrs")
    headers = parse_header_block(base64.b64decode(raw_headers)) if raw_headers else {}
    data = stored.get("data")
    body = base64.b64decode(data) if data else b""
    error: dict[str, Any] = msgspec.json.decode(headers.pop(ERROR, "{}"))
    attempt = int(headers.pop(ATTEMPT, "1"))
    when = int(headers.pop(DEAD_AT, "0")) / 1000
    headers.pop(ATTEMPTS, None)
    message = decode(topic, body, headers, int(stored.get("seq", 0)), attempt, None)
    return DeadLetter(message, error, when)

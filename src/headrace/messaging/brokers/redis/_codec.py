"""Stream entries to and from messages: field names, receipts, the msgpack the scripts read.

Entry fields are listed in :mod:`._scripts`' docstring (short names keep the stream small).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import msgspec

from ..._broker import DeadLetter, Message

_json_encode = msgspec.json.Encoder().encode
_headers_decoder = msgspec.json.Decoder(dict[str, str])


class _Receipt(NamedTuple):
    """Which delivery a message is: the stream entry and Redis's delivery counter."""

    entry_id: bytes
    deliveries: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_DELAYED_PUBLISH = (
    "local t = redis.call('TIME') "
    "return redis.call('ZADD', KEYS[1], "
    "t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1]), ARGV[2])"
)


def _pack_fields(fields: Sequence[bytes]) -> bytes:
    """Pack byte strings as a msgpack array the way Redis's Lua ``cmsgpack`` reads it.

    Redis's ``cmsgpack`` predates msgpack's ``bin`` types, so every field goes as a
    ``str`` holding the raw bytes (Lua strings are byte strings; nothing is decoded).
    """
    parts = [_msgpack_header(len(fields), 0x90, 0xDC, 0xDD, short=16)]
    for field in fields:
        parts.append(_msgpack_header(len(field), 0xA0, 0xDA, 0xDB, short=32, byte=0xD9))
        parts.append(field)
    return b"".join(parts)


def _msgpack_header(
    size: int, fix: int, head16: int, head32: int, *, short: int, byte: int | None = None
) -> bytes:
    if size < short:
        return bytes([fix | size])
    if byte is not None and size < 0x100:
        return bytes([byte, size])
    if size < 0x10000:
        return bytes([head16]) + size.to_bytes(2, "big")
    return bytes([head32]) + size.to_bytes(4, "big")


def _pairs(flat: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of a flat ``[name, value, ...]`` field list."""
    values = iter(flat)
    return zip(values, values, strict=True)


def _message(
    topic: str, entry: bytes, deliveries: int, fields: Iterable[tuple[bytes, bytes]]
) -> Message:
    """The :class:`Message` of one stream entry and its delivery count."""
    message_id = entry.decode()
    body = b""
    key: str | None = None
    headers: dict[str, str] = {}
    base = 0
    for name, value in fields:
        if name == b"b":
            body = value
        elif name == b"k":
            key = value.decode()
        elif name == b"h":
            headers.update(_headers_decoder.decode(value))
        elif name == b"i":
            message_id = value.decode()
        elif name == b"a":
            base = int(value)
        else:
            # An entry added by some other producer: its extra fields become headers.
            headers[name.decode(errors="replace")] = value.decode(errors="replace")
    return Message(
        id=message_id,
        topic=topic,
        body=body,
        headers=headers,
        attempt=base + deliveries,
        key=key,
        receipt=_Receipt(entry, deliveries),
    )


def _dead_letter_of(topic: str, entry: Any) -> DeadLetter:
    """The :class:`DeadLetter` of one entry of a dead-letter stream (as redis-py parses it)."""
    entry_id, fields = entry[0], entry[1]
    error: dict[str, Any] = {}
    attempt = 1
    when = 0.0
    kept: list[tuple[bytes, bytes]] = []
    for name, value in fields.items():
        if name == b"e":
            error = msgspec.json.decode(value)
        elif name == b"n":
            attempt = int(value)
        elif name == b"t":
            when = int(value) / 1000
        else:
            kept.append((name, value))
    message = _message(topic, entry_id, attempt, kept)
    message.receipt = None
    return DeadLetter(message, error, when)

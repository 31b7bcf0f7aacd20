"""RedisBroker: the Broker operations on Redis Streams (see the package docstring).

Publish, the fetch path (a plain ``XREADGROUP`` while messages flow, otherwise one
script round trip that also promotes due retries, re-delivers hand-backs, reclaims
expired leases and trims acked entries), and settling: ack, nack, hand-back, lease
extension, dead letters and their replay.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis.exceptions as redis_errors

from ...._cancel import shielded
from ...._errors import BrokerError, ConfigurationError
from ..._broker import DeadLetter, Message, OutgoingMessage, TopicStats
from .. import (
    check_dead_letters_limit,
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_nack_delay,
    check_outgoing,
    check_topic,
    max_deliveries_record,
)
from ._codec import (
    _DELAYED_PUBLISH,
    _dead_letter_of,
    _json_encode,
    _message,
    _pack_fields,
    _pairs,
    _Receipt,
    _text,
)
from ._connection import _CLEANUP_TIMEOUT, _RedisConnection, _TopicState

__all__ = ["RedisBroker"]

# Publishes are pipelined in chunks of this many commands.
_PUBLISH_CHUNK = 1000


class _Step(NamedTuple):
    messages: list[Message]
    # Milliseconds until the earliest delayed retry (None: none waiting).
    due_in: float | None
    last_delivered: str
    signal_last: str


class RedisBroker(_RedisConnection):
    """A :class:`~headrace.messaging.Broker` on Redis Streams with one consumer group.

    ``url`` is a redis-py URL (``redis://[:password@]host:6379/0``, ``rediss://``,
    ``unix://``) whose query may also set this class's options (``?group=billing``);
    keyword arguments win over the URL. ``group`` names the consumer group (default
    ``"headrace"``); ``consumer`` names this consumer within it: give each worker
    process a stable, unique name (its pod name) so that it re-reads its own unacked
    messages at once after a crash; the default is unique per process
    (host-pid-random). Never give one name to two live processes: each would re-read
    the other's messages. ``prefix`` (default ``"headrace:"``) is prepended to topic
    names to make keys. ``lease`` (default 30 s) is the default of ``fetch(lease=...)``;
    ``max_lease`` (default: ``lease``) is the longest lease a fetch or ``extend_lease``
    may ask for and must be the same for every consumer of a stream (it is the reclaim
    threshold, see the package doc); fetches with exactly ``max_lease`` are the cheapest.
    ``max_deliveries`` (default 20, ``None`` for no cap) dead-letters a message
    delivered that many times without an ack (set it above the worker's
    ``max_attempts``); ``trim_acked`` (default true) trims acked entries off the stream;
    ``reclaim_interval`` (default 0.25 s) is how often a fetching consumer looks for
    expired leases. ``client`` lets you pass your own ``redis.asyncio.Redis`` (made with
    ``decode_responses=False``; :meth:`close` leaves it open); other keyword arguments
    go to ``redis.asyncio.from_url``. ``clock`` is read only to pace reclaims and
    ``fetch`` timeouts.

    Measured here (``benchmarks/worker_redis.py``, 50k messages, no-op handling): the
    ``fetch`` + ``ack`` loop ran at 0.99x a hand-written ``XREADGROUP COUNT 100`` +
    ``XACK`` loop and 16x a FastStream stream subscriber.

    Safe to share between the tasks of one event loop (fetch, ack and publish may run
    concurrently); one instance per process and consumer name.

    Example::

        async with RedisBroker("redis://localhost:6379/0", consumer="worker-1") as broker:
            await broker.publish("jobs", [OutgoingMessage(b"hello")])
            for message in await broker.fetch("jobs", 100, timeout=5.0, lease=30.0):
                ...
                await broker.ack([message])
    """

    # -- publish ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Add ``messages`` to the end of ``topic``'s stream; return their ids in order.

        One pipelined ``XADD`` per message (chunks of 1000); a message with ``delay`` goes
        to the delay set instead (due by Redis server time) with an id of its own
        (``d-<hex>``).
        """
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        if not self._connected:
            await self.connect()
        keys = self._state(topic).keys
        ids: list[str] = []
        with self._translated("publish", topic):
            for start in range(0, len(outgoing), _PUBLISH_CHUNK):
                pipe = self._client.pipeline(transaction=False)
                given: list[str | None] = []
                for message in outgoing[start : start + _PUBLISH_CHUNK]:
                    fields: list[bytes | str] = ["b", message.body]
                    if message.key is not None:
                        fields += ["k", message.key]
                    if message.headers:
                        fields += ["h", _json_encode(dict(message.headers))]
                    if message.delay > 0:
                        message_id = f"d-{secrets.token_hex(8)}"
                        fields += ["i", message_id]
                        packed = _pack_fields(
                            [f if isinstance(f, bytes) else f.encode() for f in fields]
                        )
                        pipe.eval(
                            _DELAYED_PUBLISH,
                            1,
                            keys.delayed,
                            math.ceil(message.delay * 1000),
                            packed,
                        )
                        given.append(message_id)
                    else:
                        pipe.execute_command("XADD", keys.stream, "*", *fields)
                        given.append(None)
                results = await pipe.execute()
                ids.extend(
                    known if known is not None else _text(result)
                    for known, result in zip(given, results, strict=True)
                )
        return ids

    # -- fetch -----------------------------------------------------------------------

    async def fetch(
        self,
        topic: str,
        max_messages: int,
        *,
        timeout: float,
        lease: float | None = None,
    ) -> list[Message]:
        """Lease up to ``max_messages`` messages of ``topic``, waiting up to ``timeout``
        seconds for the first; each is reclaimable by others ``lease`` seconds from now
        (default: the broker's ``lease``; at most ``max_lease``).

        Order of what comes back: this consumer's own pending entries left by an earlier
        process of the same name, then handed-back messages, then expired leases of any
        consumer (every ``reclaim_interval``), then new entries. Cancel-safe: if the
        caller is cancelled while the server already leased a batch, the batch is
        handed back before the cancellation propagates, so nothing waits for a lease.
        """
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        self._check_lease_bound(float(lease), "fetch(lease)")
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        await self._ensure_group(topic, state)
        clock = self._clock
        deadline = clock.now() + timeout
        while True:
            try:
                step = await self._step_cancel_safe(topic, state, max_messages, float(lease))
            except BrokerError:
                # close() pulled the connection from under this fetch: say so.
                self._check_open("fetch")
                raise
            if step.messages:
                return step.messages
            now = clock.now()
            if now >= deadline:
                return []
            wait = min(deadline - now, max(0.0, state.next_reclaim - now))
            if step.due_in is not None:
                wait = min(wait, step.due_in / 1000)
            await self._wait_for_news(topic, state, step, wait)

    async def _step_cancel_safe(
        self, topic: str, state: _TopicState, limit: int, lease: float
    ) -> _Step:
        inner = asyncio.ensure_future(self._step(topic, state, limit, lease))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The script may already have leased a batch that the caller will never see:
            # give it back now rather than after a lease expiry.
            await shielded(self._hand_back_result(inner), timeout=_CLEANUP_TIMEOUT)
            raise

    async def _hand_back_result(self, inner: asyncio.Future[_Step]) -> None:
        try:
            step = await inner
        except Exception:
            return
        if step.messages:
            try:
                await self._return(step.messages, mode="h", delay=0.0)
            except Exception:
                # Redis is gone or the broker closed: the batch comes back when its lease
                # expires. Raising here would replace the cancellation being delivered.
                return

    async def _step(self, topic: str, state: _TopicState, limit: int, lease: float) -> _Step:
        now = self._clock.now()
        reclaim = now >= state.next_reclaim
        if reclaim:
            state.next_reclaim = now + self._reclaim_interval
        elif (
            not state.housekeeping
            and not state.own_cursor
            and lease >= self._max_lease
            and state.group_ready
        ):
            # While messages flow, a plain XREADGROUP is all a fetch needs: the
            # housekeeping runs every reclaim_interval, and whenever this read finds
            # nothing (the full script also says what to wait for).
            messages = await self._read_new(topic, state, limit)
            if messages:
                return _Step(messages, None, "", "")
        state.housekeeping = False
        keys = state.keys
        args: list[Any] = [
            self._group,
            self._consumer,
            limit,
            state.own_cursor,
            "1" if reclaim else "0",
            math.ceil(self._max_lease * 1000),
            state.claim_cursor,
            # Due retries moved per fetch; Lua's unpack() takes at most ~8000 values.
            min(1000, max(100, limit)),
            math.ceil(lease * 1000),
            "1" if reclaim and self._trim_acked else "0",
        ]
        script_keys = [keys.stream, keys.delayed, keys.returned, keys.signal]
        with self._translated("fetch", topic):
            try:
                reply = await self._fetch_script(keys=script_keys, args=args)
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted under us (and its group with it): start over.
                state.group_ready = False
                await self._ensure_group(topic, state)
                reply = await self._fetch_script(keys=script_keys, args=args)
        state.own_cursor = _text(reply[0])
        state.claim_cursor = _text(reply[1])
        messages = [
            _message(topic, reply[index], reply[index + 1], _pairs(reply[index + 2]))
            for index in range(5, len(reply), 3)
        ]
        due_in = None if reply[2] == -1 else float(reply[2])
        return _Step(
            await self._over_the_cap(topic, messages), due_in, _text(reply[3]), _text(reply[4])
        )

    async def _read_new(self, topic: str, state: _TopicState, limit: int) -> list[Message]:
        """``XREADGROUP ... >``: new entries only, leased for ``max_lease``."""
        stream = state.keys.stream
        with self._translated("fetch", topic):
            try:
                reply = await self._client.xreadgroup(
                    self._group, self._consumer, {stream: ">"}, count=limit
                )
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                state.group_ready = False
                await self._ensure_group(topic, state)
                return []
        if not reply:
            return []
        # RESP3 gives {stream: [entries]}, RESP2 [[stream, entries]].
        raw: Any = reply
        entries: list[tuple[bytes, dict[bytes, bytes]]] = (
            next(iter(raw.values()))[0] if isinstance(raw, dict) else raw[0][1]
        )
        if any(len(fields) != 1 or b"b" not in fields for _, fields in entries):
            return await self._over_the_cap(
                topic,
                [
                    _message(topic, entry_id, 1, fields.items())
                    for entry_id, fields in entries
                    if fields
                ],
            )
        # The common entry: a body and nothing else, on its first delivery.
        return [
            Message(
                id=entry_id.decode(), topic=topic, body=fields[b"b"], receipt=_Receipt(entry_id, 1)
            )
            for entry_id, fields in entries
        ]

    async def _over_the_cap(self, topic: str, messages: list[Message]) -> list[Message]:
        """Dead-letter the messages delivered more than ``max_deliveries`` times."""
        cap = self._max_deliveries
        if cap is None or all(message.attempt <= cap for message in messages):
            return messages
        kept: list[Message] = []
        for message in messages:
            if message.attempt > cap:
                record = max_deliveries_record(topic, message.id, message.attempt - 1, cap)
                await self._dead_letter(message, _json_encode(record))
            else:
                kept.append(message)
        return kept

    async def _wait_for_news(
        self, topic: str, state: _TopicState, step: _Step, seconds: float
    ) -> None:
        """Wait up to ``seconds`` for a new entry or a hand-back signal on ``topic``
        (at most half the connections' read timeout: the fetch loop then waits again).

        A plain ``XREAD`` (not ``XREADGROUP``) claims nothing, so cancelling it, or
        closing the broker under it, can never strand a message in a pending list.
        """
        # Whatever ends the wait (a signal, a due retry, the reclaim time), the next
        # fetch looks everywhere.
        state.housekeeping = True
        if self._read_timeout is not None:
            # redis-py would take a longer block for a dead connection (TimeoutError,
            # and the fetch fails): block for at most half the read timeout; the
            # caller's fetch loop re-plans and waits again.
            seconds = min(seconds, self._read_timeout / 2)
        if seconds > 0:
            block_ms = max(1, math.ceil(seconds * 1000))
            streams: dict[Any, Any] = {
                state.keys.stream: step.last_delivered or "0-0",
                state.keys.signal: step.signal_last,
            }
            reader = asyncio.ensure_future(self._client.xread(streams, count=1, block=block_ms))
            closed = asyncio.get_running_loop().create_future()
            self._close_waiters.add(closed)
            try:
                await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._close_waiters.discard(closed)
                if not reader.done():
                    reader.cancel()
                    # Let the read end here so that no task outlives the fetch.
                    await asyncio.wait({reader})
            if not reader.cancelled() and not self._closed:
                error = reader.exception()
                if error is not None:
                    with self._translated("fetch", topic):
                        raise error
        self._check_open("fetch")

    # -- settle ----------------------------------------------------------------------

    @staticmethod
    def _by_topic(messages: Sequence[Message]) -> dict[str, list[Message]]:
        groups: dict[str, list[Message]] = {}
        for message in messages:
            if not isinstance(message.receipt, _Receipt):
                raise ConfigurationError(
                    f"message {message.id!r} of topic {message.topic!r} was not fetched "
                    "from a RedisBroker (it has no stream receipt)",
                    code="invalid_message_receipt",
                )
            groups.setdefault(message.topic, []).append(message)
        return groups

    async def ack(self, messages: Sequence[Message]) -> None:
        """Mark handled messages done: one ``XACK`` per topic of the batch.

        They are never delivered again, and leave the stream with the next trim (see the
        package doc). Acking a message whose lease expired and that was delivered again
        elsewhere is harmless: it counts as handled, the other delivery's ack, nack or
        hand-back then does nothing.
        """
        self._check_open("ack")
        groups = self._by_topic(messages)
        if not groups:
            return
        with self._translated("ack"):
            if len(groups) == 1:
                [(topic, batch)] = groups.items()
                stream = self._state(topic).keys.stream
                entry_ids = [message.receipt.entry_id for message in batch]
                await self._repeatable(lambda: self._client.xack(stream, self._group, *entry_ids))
                return
            await self._repeatable(lambda: self._ack_pipelined(groups))

    async def _ack_pipelined(self, groups: dict[str, list[Message]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for topic, batch in groups.items():
            stream = self._state(topic).keys.stream
            entry_ids = [message.receipt.entry_id for message in batch]
            pipe.execute_command("XACK", stream, self._group, *entry_ids)
        await pipe.execute()

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds; counts an attempt.

        ``delay=0`` re-delivers at once in stream order; ``delay>0`` moves the message
        to the delay set atomically and back to the end of the stream when due.
        Messages no longer held by this delivery are left alone.
        """
        self._check_open("nack")
        check_nack_delay(delay)
        await self._return(messages, mode="n", delay=float(delay))

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, without counting an attempt."""
        self._check_open("hand_back")
        await self._return(messages, mode="h", delay=0.0)

    async def _return(self, messages: Sequence[Message], *, mode: str, delay: float) -> None:
        delay_ms = math.ceil(delay * 1000)
        horizon_ms = math.ceil(self._max_lease * 1000)
        for topic, batch in self._by_topic(messages).items():
            state = self._state(topic)
            state.housekeeping = True
            keys = state.keys
            args: list[Any] = [self._group, self._consumer, mode, delay_ms, horizon_ms]
            for message in batch:
                args += [message.receipt.entry_id, message.receipt.deliveries]
            script_keys = [keys.stream, keys.delayed, keys.returned, keys.signal]
            with self._translated("hand_back" if mode == "h" else "nack", topic):
                await self._repeatable(
                    functools.partial(self._return_script, keys=script_keys, args=args)
                )

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Make messages still held by this delivery reclaimable only ``lease`` seconds
        from now (at most ``max_lease``); counts no delivery."""
        self._check_open("extend_lease")
        self._check_lease_bound(check_lease(lease, where="extend_lease(lease)"), "extend_lease")
        for topic, batch in self._by_topic(messages).items():
            args: list[Any] = [
                self._group,
                self._consumer,
                math.ceil(lease * 1000),
                math.ceil(self._max_lease * 1000),
            ]
            for message in batch:
                args += [message.receipt.entry_id, message.receipt.deliveries]
            script_keys = [self._state(topic).keys.stream]
            with self._translated("extend_lease", topic):
                await self._repeatable(
                    functools.partial(self._extend_script, keys=script_keys, args=args)
                )

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` to its topic's dead-letter stream with ``error``, atomically.

        A message no longer held by this delivery (acked, or delivered again) is not
        stored."""
        self._check_open("dead_letter")
        encoded = check_error_record(error)
        self._by_topic([message])
        await self._dead_letter(message, encoded)

    async def _dead_letter(self, message: Message, encoded: bytes) -> None:
        keys = self._state(message.topic).keys
        receipt: _Receipt = message.receipt
        args: list[Any] = [
            self._group,
            self._consumer,
            receipt.entry_id,
            receipt.deliveries,
            message.attempt,
            encoded,
        ]
        with self._translated("dead_letter", message.topic):
            await self._repeatable(
                functools.partial(
                    self._dead_letter_script, keys=[keys.stream, keys.dead], args=args
                )
            )

    # -- dead letters ----------------------------------------------------------------

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first.

        ``dead_lettered_at`` is the Redis server's Unix time in seconds."""
        self._check_open("dead_letters")
        check_topic(topic)
        check_dead_letters_limit(limit)
        keys = self._state(topic).keys
        with self._translated("dead_letters", topic):
            entries = await self._client.xrevrange(keys.dead, "+", "-", count=limit)
        return [_dead_letter_of(topic, entry) for entry in entries or ()]

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages.

        ``in_flight`` is the group's pending entries, less those handed back: it also
        counts deliveries whose lease expired and that the next fetch reclaims (Redis
        keeps no expiry to compare with; the idle time is per entry). ``ready`` is the
        group's lag (entries not yet delivered) plus the handed-back ones; when Redis
        cannot tell the lag (deletions in the stream), the undelivered entries are
        counted by reading their ids."""
        self._check_open("topic_stats")
        check_topic(topic)
        keys = self._state(topic).keys
        with self._translated("topic_stats", topic):
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(keys.stream)
            pipe.zcard(keys.delayed)
            pipe.zcard(keys.returned)
            pipe.xlen(keys.dead)
            exists, delayed, returned, dead = await pipe.execute()
            pending = 0
            lag: int | None = 0
            last_delivered = "0-0"
            if exists:
                groups = await self._client.xinfo_groups(keys.stream)
                for group in groups:
                    name = group["name"]
                    if (name.decode() if isinstance(name, bytes) else name) == self._group:
                        pending = int(group["pending"])
                        lag = None if group.get("lag") is None else int(group["lag"])
                        raw = group["last-delivered-id"]
                        last_delivered = raw.decode() if isinstance(raw, bytes) else raw
                        break
                else:  # no group yet: nothing was delivered
                    lag = await self._client.xlen(keys.stream)
            if lag is None:
                lag = 0
                start = "(" + last_delivered
                while entries := await self._client.xrange(keys.stream, start, "+", count=10_000):
                    lag += len(entries)
                    raw_id = entries[-1][0]
                    start = "(" + (raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
        handed_back = min(int(returned), pending)
        return TopicStats(
            topic,
            ready=lag + handed_back,
            delayed=int(delayed),
            in_flight=pending - handed_back,
            dead_letters=int(dead),
        )

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Add dead letters of ``topic`` back to its stream as new messages (attempt 1,
        same id, body, key and headers): all of them, or those whose message id is in
        ``ids``; return how many. Each moves atomically (no loss, no double replay)."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        wanted = None if ids is None else set(ids)
        keys = self._state(topic).keys
        replayed = 0
        start = "-"
        with self._translated("replay_dead_letters", topic):
            while True:
                entries = await self._client.xrange(keys.dead, start, "+", count=500)
                if not entries:
                    return replayed
                chosen = [
                    _text(entry[0])
                    for entry in entries
                    if wanted is None or _dead_letter_of(topic, entry).message.id in wanted
                ]
                if chosen:
                    replayed += int(
                        await self._replay_script(keys=[keys.stream, keys.dead], args=chosen)
                    )
                start = "(" + _text(entries[-1][0])

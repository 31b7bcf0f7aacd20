"""NatsBroker: the Broker operations on JetStream (see the package docstring).

Publish (pipelined, every message confirmed by JetStream), the fetch path (pull
requests on the topic's durable consumer, with delayed messages promoted on the way),
and settling: ack, nack, hand-back, lease extension, dead letters and their replay.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

import nats.errors as nats_errors
from nats.aio.msg import Msg

from ...._errors import BrokerConnectionError, BrokerError, ConfigurationError
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
from . import _codec as codec
from ._codec import Receipt
from ._connection import _NatsConnection
from ._state import _Pull, _TopicState

__all__ = ["NatsBroker"]

# Seconds before a message's arrival that its AckWait may have started (the server
# starts it when it sends the message): a lease is never taken to last longer.
_DELIVERY_MARGIN = 0.05
# Delayed messages promoted per round trip.
_PROMOTE_BATCH = 256
# JetStream API error code: stream not found.
_STREAM_NOT_FOUND = 10059


class NatsBroker(_NatsConnection):
    """A :class:`~headrace.messaging.Broker` on NATS JetStream, one stream per topic.

    ``url`` is a NATS URL (``nats://[user:password@]host:4222``, ``nats://token@host``,
    ``tls://...``) whose query may also set this class's options (``?prefix=billing``);
    keyword arguments win over the URL, and unknown keywords go to ``nats.connect``
    (``tls=``, ``user_credentials=``, ``servers=[...]`` for a cluster). ``prefix``
    (default ``"headrace"``) starts every stream and subject name, ``durable``
    (default ``"headrace"``) names the consumers. ``lease`` (default 30 s) is the
    default of ``fetch(lease=...)``; ``max_lease`` (default: ``lease``) is the
    consumers' AckWait, the longest lease a fetch or ``extend_lease`` may ask for:
    keep it the same on every consumer of a topic (the last one to start sets it);
    fetches with exactly ``max_lease`` are the cheapest (see the package doc).
    ``max_deliveries`` (default 20, ``None``: no cap) dead-letters a message delivered
    that many times without an ack (set it above the worker's ``max_attempts``);
    ``max_ack_pending`` (default 20,000) caps the messages leased at once across all
    consumers of a topic; ``replicas`` and ``storage`` (``"file"``/``"memory"``)
    configure new streams; ``request_timeout`` (default 5 s) bounds every request;
    ``promote_interval`` (default 0.25 s) is how often a fetching consumer moves due
    delayed messages to the topic. ``clock`` paces fetch timeouts and leases.

    Measured here (``benchmarks/worker_nats.py``, 50k messages, no-op handler, NATS
    2.9): the :class:`~headrace.messaging.Worker` at concurrency 16 ran at 2.3x a
    hand-written nats-py pull ``fetch(100)`` + ``ack()`` loop and 3.1x a FastStream
    subscriber with its defaults; ``publish`` stores ~54k msgs/s, each confirmed.

    Safe to share between the tasks of one event loop (fetch, ack and publish may run
    concurrently); several processes may consume one topic.

    Example::

        async with NatsBroker("nats://localhost:4222") as broker:
            await broker.publish("jobs", [OutgoingMessage(b"hello")])
            for message in await broker.fetch("jobs", 100, timeout=5.0, lease=30.0):
                ...
                await broker.ack([message])
    """

    # -- publish ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Store ``messages`` in ``topic``'s stream; return their ids once JetStream
        confirmed every one (pipelined: one round trip per 2000 messages).

        The id is the message's stream sequence. A message with ``delay`` goes to the
        topic's delayed subject, and to the topic once due (see the package doc).
        A message larger than the server's ``max_payload`` (headers included) raises
        :class:`~headrace.InvalidMessage` (code ``message_too_large``) before
        anything is sent: NATS would close the connection over it.
        """
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        due_base = self._now_ms()
        for message in outgoing:
            headers = codec.outgoing_headers(message)
            subject = state.subject
            if message.delay > 0:
                headers = headers or {}
                headers[codec.DUE] = str(due_base + math.ceil(message.delay * 1000))
                subject = state.delayed_subject
            self._check_size(topic, message.body, headers)
            items.append((subject, message.body, headers))
        await self._ensure(state)
        try:
            sequences = await self._publish_many(topic, items)
        except BrokerConnectionError as exc:
            if not isinstance(exc.__cause__, nats_errors.NoRespondersError):
                raise
            # No stream took the subject: it was deleted behind our back. Make it
            # again and publish once more (nothing was stored by the first try).
            state.ensured = None
            await self._ensure(state)
            sequences = await self._publish_many(topic, items)
        return [str(sequence) for sequence in sequences]

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
        seconds for the first; each is delivered again ``lease`` seconds from now
        unless settled (default: the broker's ``lease``; at most ``max_lease``).

        One ``no_wait`` pull request for the batch; on an empty topic, long-polling
        requests for one message (so that nothing is leased beyond what the caller
        takes) in slices of ``promote_interval``, moving due delayed messages between
        them. Cancel-safe: messages delivered for a cancelled fetch are kept and the
        next fetch of the topic returns them first, as the same attempt.
        """
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        self._check_lease_bound(float(lease), "fetch(lease)")
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        await self._ensure(state)
        clock = self._clock
        deadline = clock.now() + timeout
        first = True
        while True:
            self._check_open("fetch")
            got = self._take(state, max_messages)
            if not got:
                now = clock.now()
                if now >= state.next_promote:
                    state.next_promote = now + self._promote_interval
                    await self._promote(state)
                remaining = deadline - clock.now()
                if first or remaining <= 0:
                    await self._pull(state, max_messages, None)
                else:
                    await self._pull(state, 1, min(remaining, self._promote_interval))
                first = False
                got = self._take(state, max_messages)
            messages = await self._deliver(state, got, float(lease))
            if messages:
                return messages
            if clock.now() >= deadline:
                return []

    def _take(self, state: _TopicState, limit: int) -> list[tuple[Msg, float]]:
        """Up to ``limit`` delivered messages of the topic, each with the time from
        which JetStream surely counts its AckWait (a little before it arrived)."""
        arrived = state.arrived
        if not arrived:
            return []
        taken: list[tuple[Msg, float]] = []
        oldest = self._clock.now() - self._max_lease + _DELIVERY_MARGIN
        while arrived and len(taken) < limit:
            msg, at = arrived.popleft()
            # Past its AckWait the server delivers it again (perhaps elsewhere).
            if at > oldest:
                taken.append((msg, at - _DELIVERY_MARGIN))
        return taken

    async def _pull(
        self, state: _TopicState, batch: int, expires: float | None, *, delayed: bool = False
    ) -> None:
        """Send one pull request and wait until it ended or brought ``batch`` messages:
        ``no_wait`` (``expires`` None) or a long poll. Its messages land in the topic's
        ``arrived`` queue, also those that come after this returned."""
        client = self._nc
        token = self._token()
        pull = _Pull(state, batch, delayed=delayed)
        self._pulls[token] = pull
        if expires is None:
            payload = b'{"batch":%d,"no_wait":true}' % batch
            wait = self._request_timeout
        else:
            payload = b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
            wait = expires + self._request_timeout
        consumer = state.delayed_consumer if delayed else self._durable
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{state.stream}.{consumer}"
        state.pulls.add(pull)
        try:
            with self._translated("fetch", state.topic):
                await client.publish(subject, payload, reply=token)
                try:
                    async with asyncio.timeout(wait):
                        await pull.done
                except TimeoutError:
                    # JetStream ignores a pull request for a consumer that does not
                    # exist: check the stream and consumer again on the next fetch.
                    state.ensured = None
                    raise BrokerConnectionError(
                        f"nats fetch({state.topic!r}): no answer to a pull request in "
                        f"{wait:.1f} s on {self._scrub(self._url)} (server away, or the "
                        "stream or consumer deleted: the next fetch makes them again)",
                        context={"topic": state.topic},
                    ) from None
        finally:
            state.pulls.discard(pull)
            # A request that got its whole batch gets no status: forget it now. A late
            # status finds no request and is dropped; late messages route by subject.
            self._pulls.pop(token, None)
        self._check_open("fetch")
        if pull.status == "409":
            raise BrokerError(
                f"nats fetch({state.topic!r}): the pull request was refused (409); "
                "is the consumer deleted or max_waiting exceeded?",
                context={"topic": state.topic},
            )

    async def _deliver(
        self, state: _TopicState, got: list[tuple[Msg, float]], lease: float
    ) -> list[Message]:
        """Messages from pulled ones: attempts, max_deliveries, the lease applied."""
        if not got:
            return []
        topic = state.topic
        max_lease = self._max_lease
        short = lease < max_lease
        now = self._clock.now()
        cap = self._max_deliveries
        messages: list[Message] = []
        over: list[Message] = []
        try:
            for msg, sent_at in got:
                reply = msg.reply
                deliveries, sequence = codec.ack_tokens(reply)
                expires_at = now + lease if short else sent_at + max_lease
                receipt = Receipt(reply, deliveries, sequence, expires_at)
                headers = msg.headers
                if headers:
                    message = codec.decode(topic, msg.data, headers, sequence, deliveries, receipt)
                else:
                    message = Message(
                        id=str(sequence),
                        topic=topic,
                        body=msg.data,
                        attempt=deliveries,
                        receipt=receipt,
                    )
                if cap is not None and message.attempt > cap:
                    over.append(message)
                else:
                    messages.append(message)
        except BaseException:
            state.arrived.extendleft(reversed([(msg, at + _DELIVERY_MARGIN) for msg, at in got]))
            raise
        if short and messages:
            # A lease shorter than AckWait: a nak delayed by the lease makes JetStream
            # deliver it again then, unless acked first (crash-safe, no timer here).
            payload = b'-NAK {"delay":%d}' % int(lease * 1e9)
            publish = self._nc.publish
            with self._translated("fetch", topic):
                for message in messages:
                    await publish(message.receipt.reply, payload)
        for message in over:
            assert self._max_deliveries is not None
            record = max_deliveries_record(
                topic, message.id, message.attempt - 1, self._max_deliveries
            )
            await self._dead_letter(message, codec.json_encode(record))
        return messages

    async def _promote(self, state: _TopicState) -> None:
        """Move due delayed messages to the topic; hold the others back until due.

        A delayed message not yet due is nak'd with the time left, so the delayed
        consumer offers it again exactly when due: a round trip here only ever brings
        new or due messages.
        """
        client = self._nc
        if not state.delayed_arrived:
            await self._pull(state, _PROMOTE_BATCH, None, delayed=True)
        got = list(state.delayed_arrived)
        state.delayed_arrived.clear()
        if not got:
            return
        now_ms = self._now_ms()
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        replies: list[str] = []
        with self._translated("promote", state.topic):
            for msg in got:
                headers = dict(msg.headers or {})
                due = int(headers.pop(codec.DUE, "0"))
                if due > now_ms:
                    delay = b'-NAK {"delay":%d}' % ((due - now_ms) * 1_000_000)
                    await client.publish(msg.reply, delay)
                    continue
                for name in [name for name in headers if name.startswith("Nats-")]:
                    del headers[name]
                if codec.ID not in headers:
                    headers[codec.ID] = str(codec.ack_tokens(msg.reply)[1])
                items.append((state.subject, msg.data, headers))
                replies.append(msg.reply)
        if items:
            await self._publish_many(state.topic, items, "promote")
            await self._settle(state.topic, replies, codec.ACK, "promote")

    # -- settle ----------------------------------------------------------------------

    @staticmethod
    def _by_topic(messages: Sequence[Message]) -> dict[str, list[Message]]:
        groups: dict[str, list[Message]] = {}
        for message in messages:
            if not isinstance(message.receipt, Receipt):
                raise ConfigurationError(
                    f"message {message.id!r} of topic {message.topic!r} was not fetched "
                    "from a NatsBroker (it has no JetStream receipt)",
                    code="invalid_message_receipt",
                )
            groups.setdefault(message.topic, []).append(message)
        return groups

    def _held(self, messages: list[Message]) -> list[Message]:
        """Those of ``messages`` whose delivery surely still holds them (a nak or an
        extension sent for an older delivery would act on the current one)."""
        now = self._clock.now()
        return [message for message in messages if message.receipt.expires_at > now]

    async def ack(self, messages: Sequence[Message]) -> None:
        """Mark handled messages done; returns once JetStream has applied every ack.

        One ack per message, the last of each topic sent as a request (a "double ack"):
        JetStream applies a consumer's acks in order, so its answer confirms the
        batch, and nothing is left to lose when the connection closes. Acking a
        message delivered again elsewhere meanwhile counts it as handled.
        """
        self._check_open("ack")
        for topic, batch in self._by_topic(messages).items():
            await self._settle(topic, [m.receipt.reply for m in batch], codec.ACK, "ack")
            for message in batch:
                message.receipt.expires_at = -math.inf

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds; counts an attempt.

        ``delay=0`` is a JetStream nak (delivered again at once). ``delay>0`` moves
        the message to the topic's delayed subject (publish, confirmed, then ack),
        where it waits without holding a slot of the consumer's ``max_ack_pending``.
        Messages no longer held by this delivery are left alone.
        """
        self._check_open("nack")
        check_nack_delay(delay)
        for topic, batch in self._by_topic(messages).items():
            held = self._held(batch)
            if not held:
                continue
            if delay == 0:
                await self._settle(topic, [m.receipt.reply for m in held], codec.NAK, "nack")
            else:
                state = self._state(topic)
                due = str(self._now_ms() + math.ceil(delay * 1000))
                items: list[tuple[str, bytes, dict[str, str] | None]] = []
                for message in held:
                    headers = codec.carried_headers(message)
                    headers[codec.ATTEMPTS] = str(message.attempt)
                    headers[codec.DUE] = due
                    items.append((state.delayed_subject, message.body, headers))
                await self._publish_many(topic, items, "nack")
                await self._settle(topic, [m.receipt.reply for m in held], codec.ACK, "nack")
            for message in held:
                message.receipt.expires_at = -math.inf

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once (a nak: JetStream counts it as
        a delivery, so the next one is the next attempt)."""
        self._check_open("hand_back")
        for topic, batch in self._by_topic(messages).items():
            held = self._held(batch)
            await self._settle(topic, [m.receipt.reply for m in held], codec.NAK, "hand_back")
            for message in held:
                message.receipt.expires_at = -math.inf

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Keep messages still held by this delivery for ``lease`` seconds from now (at
        most ``max_lease``): ``in_progress`` (``+WPI``) for a full AckWait, a delayed
        nak for less; counts no delivery."""
        self._check_open("extend_lease")
        lease = self._check_lease_bound(
            check_lease(lease, where="extend_lease(lease)"), "extend_lease"
        )
        if lease >= self._max_lease:
            payload = codec.IN_PROGRESS
        else:
            payload = b'-NAK {"delay":%d}' % int(lease * 1e9)
        for topic, batch in self._by_topic(messages).items():
            held = self._held(batch)
            until = self._clock.now() + lease
            await self._settle(topic, [m.receipt.reply for m in held], payload, "extend_lease")
            for message in held:
                message.receipt.expires_at = until

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Store ``message`` in its topic's dead-letter stream with ``error``, then ack
        it (confirmed, in that order: a crash in between leaves a duplicate, never a
        loss)."""
        self._check_open("dead_letter")
        encoded = check_error_record(error)
        self._by_topic([message])
        await self._dead_letter(message, encoded)

    async def _dead_letter(self, message: Message, encoded: bytes) -> None:
        state = self._state(message.topic)
        headers = codec.carried_headers(message)
        headers[codec.ERROR] = encoded.decode()
        headers[codec.ATTEMPT] = str(message.attempt)
        headers[codec.DEAD_AT] = str(self._now_ms())
        body = message.body
        if len(body) + len(headers[codec.ERROR]) + 512 > self._max_payload:
            # Keep the message; shorten the record (its traceback) to fit.
            room = max(256, self._max_payload - len(body) - 1024)
            headers[codec.ERROR] = codec.json_encode(
                {**_decoded(encoded), "traceback": "(cut to fit max_payload)"}
            ).decode()[:room]
        await self._publish_many(
            message.topic, [(state.dead_subject, body, headers)], "dead_letter"
        )
        await self._settle(message.topic, [message.receipt.reply], codec.ACK, "dead_letter")
        message.receipt.expires_at = -math.inf

    # -- dead letters ----------------------------------------------------------------

    async def _stream_state(self, stream: str, topic: str) -> dict[str, Any] | None:
        with self._translated("stream info", topic):
            reply = await self._api(f"STREAM.INFO.{stream}")
        error = reply.get("error")
        if error is not None:
            if error.get("err_code") == _STREAM_NOT_FOUND or error.get("code") == 404:
                return None
            raise BrokerError(
                f"nats stream info({topic!r}): {error.get('description', error)}",
                context={"topic": topic, "error": error},
            )
        state: dict[str, Any] = reply["state"]
        return state

    async def _get_dead(self, state: _TopicState, sequences: Sequence[int]) -> list[Any]:
        with self._translated("dead_letters", state.topic):
            return list(
                await asyncio.gather(
                    *(
                        self._api(f"STREAM.MSG.GET.{state.dead_stream}", {"seq": sequence})
                        for sequence in sequences
                    )
                )
            )

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first
        (``dead_lettered_at``: Unix time in seconds, by the clock of the process that
        dead-lettered it)."""
        self._check_open("dead_letters")
        check_topic(topic)
        check_dead_letters_limit(limit)
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        info = await self._stream_state(state.dead_stream, topic)
        letters: list[DeadLetter] = []
        if info is None or not info.get("messages"):
            return letters
        first, sequence = int(info["first_seq"]), int(info["last_seq"])
        while len(letters) < limit and sequence >= first:
            low = max(first, sequence - (limit - len(letters)) + 1)
            chunk = list(range(sequence, low - 1, -1))
            for reply in await self._get_dead(state, chunk):
                if "message" in reply and len(letters) < limit:
                    letters.append(codec.dead_letter_of(topic, reply["message"]))
            sequence = low - 1
        return letters

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters of ``topic`` again as new messages (attempt 1, same id,
        body, key and headers): all of them, or those whose message id is in ``ids``;
        return how many. Each is confirmed in the topic before it leaves the
        dead-letter stream (a crash in between replays it twice, never loses it)."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        wanted = None if ids is None else set(ids)
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        info = await self._stream_state(state.dead_stream, topic)
        if info is None or not info.get("messages"):
            return 0
        await self._ensure(state)
        replayed = 0
        sequence, last = int(info["first_seq"]), int(info["last_seq"])
        while sequence <= last:
            chunk = list(range(sequence, min(last, sequence + 255) + 1))
            items: list[tuple[str, bytes, dict[str, str] | None]] = []
            chosen: list[int] = []
            for stored_seq, reply in zip(chunk, await self._get_dead(state, chunk), strict=True):
                if "message" not in reply:
                    continue
                letter = codec.dead_letter_of(topic, reply["message"])
                if wanted is not None and letter.message.id not in wanted:
                    continue
                items.append(
                    (state.subject, letter.message.body, codec.carried_headers(letter.message))
                )
                chosen.append(stored_seq)
            if items:
                await self._publish_many(topic, items, "replay_dead_letters")
                with self._translated("replay_dead_letters", topic):
                    await asyncio.gather(
                        *(
                            self._api(f"STREAM.MSG.DELETE.{state.dead_stream}", {"seq": s})
                            for s in chosen
                        )
                    )
                replayed += len(items)
            sequence = chunk[-1] + 1
        return replayed

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages.

        ``ready`` is the consumer's undelivered messages; ``in_flight`` its ack-pending
        ones, which include deliveries whose lease expired or that were nak'd and wait
        to be delivered again (JetStream does not tell them apart); ``delayed`` counts
        the delayed subject (publish delays and delayed nacks)."""
        self._check_open("topic_stats")
        check_topic(topic)
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        main, dead = await asyncio.gather(
            self._stream_state(state.stream, topic),
            self._stream_state(state.dead_stream, topic),
        )
        dead_count = int(dead.get("messages", 0)) if dead else 0
        if main is None:
            return TopicStats(topic, 0, 0, 0, dead_count)
        with self._translated("topic_stats", topic):
            consumer, delayed = await asyncio.gather(
                self._api(f"CONSUMER.INFO.{state.stream}.{self._durable}"),
                self._api(f"CONSUMER.INFO.{state.stream}.{state.delayed_consumer}"),
            )
        if "error" in consumer or "error" in delayed:
            raise BrokerError(
                f"nats topic_stats({topic!r}): consumers missing on stream {state.stream!r}",
                context={"topic": topic},
            )
        return TopicStats(
            topic,
            ready=int(consumer.get("num_pending", 0)),
            delayed=int(delayed.get("num_pending", 0)) + int(delayed.get("num_ack_pending", 0)),
            in_flight=int(consumer.get("num_ack_pending", 0)),
            dead_letters=dead_count,
        )


def _decoded(encoded: bytes) -> dict[str, Any]:
    import msgspec

    value = msgspec.json.decode(encoded)
    return value if isinstance(value, dict) else {"error": value}

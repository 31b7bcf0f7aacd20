"""The Redis Streams broker: consumer groups, leases by idle time, scripts for atomicity.

Use :class:`RedisBroker` when several machines share one queue and a Redis (>= 6.2; 7
here) is at hand; use :class:`~headrace.messaging.SqliteBroker` on one machine and
:class:`~headrace.messaging.MemoryBroker` in tests. This is the only module that imports
redis-py; ``open_broker("redis://...")`` imports it on demand.

How the contract maps onto Redis (keys for topic ``jobs`` with the default prefix):

* ``headrace:jobs`` is the stream; one consumer group (``group``, default
  ``"headrace"``) makes it a work queue: each entry goes to one consumer of the group.
  ``publish`` is pipelined ``XADD``. While messages flow, ``fetch`` is a plain
  ``XREADGROUP ... COUNT max_messages``; on a consumer's first fetch, every
  ``reclaim_interval``, after it returned messages itself, and whenever a read finds
  nothing, it runs one script instead that also moves due delayed retries into the
  stream, re-delivers handed-back messages and reclaims expired leases
  (``XAUTOCLAIM``) in the same round trip.
* A lease is the idle time of a pending entry. Every consumer reclaims with the same
  ``XAUTOCLAIM`` min-idle-time, ``max_lease`` (default: the broker's ``lease``, 30 s);
  a delivery leased for a shorter ``lease`` gets its delivery time moved
  ``max_lease - lease`` into the past (``XCLAIM ... TIME ... JUSTID``, which counts no
  delivery), so it is reclaimable exactly ``lease`` seconds after the fetch, whatever
  lease the reclaimer asked for. ``extend_lease`` does the same from now. Fetching with
  ``lease == max_lease`` skips that ``XCLAIM`` (measured: a third of the server's work
  per batch). Expired leases are looked for every ``reclaim_interval`` (default
  0.25 s) by every fetching consumer.
* On its first fetch of a topic, a consumer re-reads its *own* pending entries (id
  ``0``): with a stable ``consumer`` name (a pod or host name), whatever the previous
  process of that name fetched and did not ack comes back at once after a crash. The
  default name is unique per process; then a crashed process's messages come back by
  ``XAUTOCLAIM`` once their lease expires.
* ``attempt`` comes from Redis's delivery counter (``XPENDING``), so crashes count;
  ``max_deliveries`` (default 20, ``None``: no cap) dead-letters a message delivered
  more often than that without an ack, with a ``max_deliveries_exceeded`` error record.
* ``ack`` is one ``XACK`` per topic and batch (pipelined when a batch spans topics),
  exactly what a hand-written loop sends. Acked entries leave the stream by the
  fetch's periodic housekeeping: ``XTRIM MINID`` up to the oldest entry still pending
  or undelivered, which frees whole stream nodes instead of deleting entry by entry
  (``XDEL`` cost the server more than ``XREADGROUP`` per batch). ``trim_acked=False``
  keeps them (trim the stream yourself then).
* ``hand_back`` leaves the entry pending, lowers its delivery counter by one
  (``XCLAIM ... RETRYCOUNT``) and lists it in the sorted set ``headrace:jobs:returned``;
  a consumer claims it, in stream order and as the same attempt, on its next fetch if
  it was waiting (a small signal stream, ``:signal``, wakes it) or within
  ``reclaim_interval`` if it is busy. ``nack(delay=0)`` does the same but counts the
  attempt.
* ``nack(delay>0)``: Redis 7 has no delayed redelivery, so a script moves the entry out
  of the stream (``XACK`` + ``XDEL``) into the sorted set ``:delayed`` in one step; a
  fetch moves it back to the end of the stream when it is due (Redis server time).
* ``dead_letter`` moves the entry to the stream ``:dead`` with the JSON error record,
  atomically; ``replay_dead_letters`` adds them back as fresh messages (same id).
* Lost connections (a restart, a dropped or idle-timed-out connection): redis-py
  reconnects on the next command. Acks and the other settle commands, all safe to
  repeat, are sent once more over a fresh connection when theirs turns out dead; a
  fetch or publish that fails raises :class:`~headrace.BrokerConnectionError` for its
  caller to retry (the worker backs off 0.1 s, 0.2 s, ... up to 5 s). Whatever the
  server leased for a fetch whose reply was lost, or kept for an ack that failed,
  is delivered again when its lease expires: late, never lost. A restarted server's
  empty script cache is refilled by redis-py (``NOSCRIPT``). An idle fetch blocks for
  at most half of redis-py's socket timeout per read, so a quiet topic is not taken
  for a dead connection. R4 (``tests/messaging/test_reliability_reconnect.py``)
  checks all of it with a real worker process.

Standalone Redis or a Sentinel-managed primary (pass ``client=``); not Redis Cluster.
One consumer group per stream: a delayed retry or a replay re-adds the entry, which a
second group would see as a new message. Every operation that checks ownership does
so against the delivery it was given: a nack, hand-back, dead-letter or lease extension
of a message whose lease expired and that was delivered again does nothing. Driver
errors become :class:`~headrace.BrokerConnectionError` (connection lost, timeouts) or
:class:`~headrace.BrokerError`; the URL's password never appears in them or in reprs.

The package splits the adapter by concept:

* ``_broker``: :class:`RedisBroker`, the :class:`~headrace.messaging.Broker` operations
  (publish; the fetch path with its housekeeping round trip; ack, nack, hand-back, lease
  extension and dead letters);
* ``_connection``: what the operations share: configuration, the client and its
  scripts, per-topic keys and state, the redis-py error choke point, connect and close;
* ``_options``: broker options given in the URL's query, the default consumer name;
* ``_codec``: stream entries to and from :class:`~headrace.messaging.Message`;
* ``_scripts``: the Lua scripts that make multi-key changes atomic.
"""

from ._broker import RedisBroker

__all__ = ["RedisBroker"]

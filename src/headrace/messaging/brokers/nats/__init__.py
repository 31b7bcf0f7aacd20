"""The NATS JetStream broker: a work-queue stream per topic, pull consumers, nak leases.

Use :class:`NatsBroker` when your services already talk NATS (2.9 or later, JetStream
on); use :class:`~headrace.messaging.brokers.redis.RedisBroker` or the PostgreSQL
adapter when one of those is at hand, :class:`~headrace.messaging.SqliteBroker` on one
machine. This is the only module that imports nats-py; ``open_broker("nats://...")``
imports it on demand.

How the contract maps onto JetStream (names for topic ``jobs``, default prefix and
durable name ``headrace``):

* **One stream per topic**, ``headrace-jobs``, with ``WorkQueue`` retention and two
  subjects: ``headrace.jobs`` (the topic) and ``headrace.jobs.delayed``; dead letters
  have a stream of their own, ``headrace-jobs-dead`` (``Limits`` retention). Why not
  one stream for every topic: a stream per topic gives each topic its own limits,
  storage and replicas, lets ``topic_stats`` and a purge touch one topic only, keeps
  a slow topic's file from growing under a fast one's, and an acked message leaves
  its stream at once (``WorkQueue``), which a shared stream would only allow with one
  consumer per subject anyway. The cost is two streams per topic, which matters in a
  cluster with thousands of topics (each stream is a Raft group); use fewer, broader
  topics there. Topic names are encoded into one subject token (letters and digits
  kept, other bytes ``_XX``), so any topic string works.
* **One durable pull consumer per topic** (``headrace``, filter ``headrace.jobs``,
  explicit acks, ``MaxDeliver`` unlimited) shared by every process: each message
  goes to one of them. ``fetch`` sends one ``no_wait`` pull request for the batch;
  on an empty topic it long-polls for *one* message at a time (so a long poll never
  leases more than the caller takes), in slices of ``promote_interval`` (0.25 s).
  All pull requests answer to one wildcard inbox subscription; delivered messages
  wait in a per-topic queue the next fetch takes from, so a cancelled fetch leaves
  nothing leased for an AckWait: the next fetch returns its messages as the same
  attempt. Publishing is pipelined: every message carries a reply subject and the
  JetStream acks are awaited per window of 2000 (one round trip, not one per message).
* **Leases.** JetStream's AckWait is per consumer, and a second consumer on a
  work-queue subject is not allowed, so a per-fetch ``lease`` cannot be an AckWait of
  its own. The consumer's AckWait is ``max_lease`` (default: ``lease``, 30 s), the
  longest lease anyone may ask for, and the worker's default: a fetch with that
  lease costs nothing extra. A shorter lease is a nak delayed by the lease, sent
  right after the fetch: JetStream then delivers the message again after ``lease``
  unless it was acked first; it holds after a crash too (no client-side timer).
  ``extend_lease`` sends ``in_progress`` (``+WPI``, a fresh full AckWait) or, for
  less, a delayed nak again. A delivery JetStream may already have handed to someone
  else (its lease passed, by this process's clock) is left alone by ``nack``,
  ``hand_back`` and ``extend_lease``: measured on 2.9, a nak sent for an older
  delivery re-delivers the current one.
* **Attempts** are JetStream's delivery count (``num_delivered`` in the ack
  subject), which every redelivery raises: a nak, an AckWait expiry, and the
  messages a process held when it died or lost its connection (they come back after
  the full AckWait). So a hand-back is never free: ``capabilities`` says
  ``handback_costs_attempt=True``. ``MaxDeliver`` would only stop delivering a
  message and leave it in the stream, so it stays unlimited; instead a fetch
  dead-letters a message whose attempt passed ``max_deliveries`` (default 20) with a
  ``max_deliveries_exceeded`` record.
* **Acks** go one per message (JetStream has no batch ack); the last one of a batch
  is sent as a request. JetStream applies a consumer's acks in order, so its reply
  confirms the whole batch: when ``ack`` returns, the acks took effect and cannot be
  lost on close. A lost reply raises :class:`~headrace.BrokerConnectionError`, and
  acking again is harmless. ``close`` drains the connection (what was sent reaches
  the server) and naks what was delivered to this process but never returned by a
  fetch.
* **Delays.** NATS 2.9 has no scheduled messages, so ``publish(delay=...)`` and
  ``nack(delay>0)`` store the message on the delayed subject with its due time; a
  second consumer there (``headrace-delayed``) is read by fetching processes every
  ``promote_interval``, which move due messages to the topic (publish, confirmed,
  then ack) and nak the others with the time they have left, so JetStream offers
  each again exactly when due. Waiting retries so hold no slot of the main
  consumer's ``max_ack_pending`` (a nak with delay would), and ``topic_stats`` can
  count them. A moved message keeps its id (``Hr-Id``) and attempt count
  (``Hr-Attempts``).
* **Dead letters** are published to the dead-letter stream with the JSON error record
  in a header (confirmed), then acked; ``dead_letters`` reads the newest by sequence,
  ``replay_dead_letters`` publishes them to the topic (attempt 1, same id) and then
  deletes them.
* **Message size.** The server's ``max_payload`` (1 MiB by default) bounds body and
  headers together, and NATS closes the connection over a bigger message: publish
  refuses it first with :class:`~headrace.InvalidMessage` (``message_too_large``);
  ``capabilities.max_message_bytes`` tells the limit.
* **Connections.** nats-py reconnects by itself, for ever, every 0.5 s; meanwhile
  operations fail with :class:`~headrace.BrokerConnectionError` after
  ``request_timeout`` and the worker retries them. Pull requests do not survive a
  reconnect (the server drops requests whose inbox lost interest): waiting fetches
  are woken to send new ones. Driver errors are translated at one choke point; the
  URL's password or token never appears in errors, logs or reprs.

The package splits the adapter by concept:

* ``_broker``: :class:`NatsBroker`, the :class:`~headrace.messaging.Broker`
  operations;
* ``_connection``: configuration, the connection and its inbox routing, streams and
  consumers, pipelined publishing, connect and close;
* ``_state``: what the broker remembers per topic, and the pull requests in flight;
* ``_translate``: the choke point where nats-py errors become headrace errors;
* ``_options``: options in the URL's query, credential scrubbing, topic names;
* ``_codec``: JetStream messages (headers, ack subjects) to and from
  :class:`~headrace.messaging.Message`.
"""

from ._broker import NatsBroker

__all__ = ["NatsBroker"]

"""The RabbitMQ broker: quorum queues, a prefetching consumer per topic, local leases.

Use :class:`RabbitMQBroker` when RabbitMQ is the message bus already at hand; use
:class:`~headrace.messaging.brokers.redis.RedisBroker` or
:class:`~headrace.messaging.brokers.postgres.PostgresBroker` when those are, and
:class:`~headrace.messaging.SqliteBroker` on one machine. This is the only module that
imports aio-pika; ``open_broker("amqp://...")`` imports it on demand. Measured against
RabbitMQ 3.10 here.

How the contract maps onto RabbitMQ (queues for topic ``jobs``, default prefix):

* **Quorum queues.** ``headrace.jobs`` is a durable quorum queue: a classic queue
  keeps no delivery count (only a ``redelivered`` flag), so a crash loop could not be
  counted; a quorum queue counts every return of a delivery (a channel closed by a
  crash, a requeue) in ``x-delivery-count``. ``attempt`` is that count plus one, plus
  the attempts a message had before it was last republished (header
  ``x-headrace-attempts``: delayed retries and hand-backs republish it). Messages are
  published persistent, through the default exchange, with publisher confirms: all of
  a batch in flight at once, ``publish`` returns when RabbitMQ confirmed them all.
* **Fetch = a consumer with a prefetch window, not ``basic.get``.** The first fetch of
  a topic opens a channel with ``basic.qos(prefetch)`` (default 200) and
  ``basic.consume``; RabbitMQ pushes deliveries into a local buffer and ``fetch``
  takes up to ``max_messages`` from it, waiting up to ``timeout`` for the first.
  ``basic.get`` costs a round trip per message. The price: up to ``prefetch``
  messages wait in this process's buffer, unseen by other consumers (lower
  ``prefetch`` for slow handlers), and one broker leases at most ``prefetch``
  messages of a topic at a time (a fetch beyond that waits for acks; the worker holds
  100 by default). A requeued delivery may come back to the same process. A fetch
  with a timeout under 0.25 s that finds the buffer empty asks whether the queue has
  ready messages and, if so, waits up to 0.25 s for them (``timeout=0`` on a new
  consumer would otherwise miss everything still on its way).
* **Leases are local.** RabbitMQ holds an unacked delivery until its channel closes
  (or its ``consumer_timeout``, 30 minutes by default, closes the channel). A crashed
  or disconnected process therefore gives its messages back at once, better than any
  lease; a live process that overruns ``lease`` requeues the delivery itself
  (``basic.nack`` with requeue, counted as an attempt), and ``extend_lease`` pushes
  that back. Handlers longer than the server's ``consumer_timeout`` need it raised.
* **Acks** are delivery-tag frames on the consumer's channel: one ``basic.ack`` with
  ``multiple=True`` for the longest run of outstanding tags at the front that the
  batch settles (what a hand-written consumer sends), a frame per other tag. Delivery
  tags die with their channel: after a lost connection, RabbitMQ has already put the
  messages back, and an ack, nack or hand-back of them does nothing.
* **Hand-back is free: a confirmed copy, then an ack.** On RabbitMQ 3.10 a requeue
  (``basic.nack``/``basic.reject`` with requeue, or a closed channel) raises a quorum
  queue's delivery count, and puts the message at the back of the queue anyway
  (measured, ``tests/messaging/test_rabbitmq.py``). So ``hand_back`` publishes the
  message again with its attempt count, waits for the confirm, and acks the delivery:
  same id, same attempt, at the back. ``nack(delay=0)`` is the plain requeue, which
  counts the attempt as it should. ``close`` hands back what is buffered and was
  never fetched the same way, after waiting (up to 1 s) until the consumer is quiet:
  a quorum queue refills the prefetch window as acks arrive, and a refill that races
  the cancel stays on the channel unseen and returns with a delivery counted
  (measured: a worker stopped mid-run charged 33-58 of 258 returned messages an
  attempt without that wait, none with it).
* **Delays without plugins.** ``nack(delay)`` and ``publish`` with ``delay`` send a
  confirmed copy to a classic delay queue ``headrace.jobs.delay.<ms>`` with that TTL
  (``x-message-ttl``), which dead-letters to ``headrace.jobs`` when it runs out. One
  queue per delay, so no message waits behind a longer one (per-message TTLs only
  expire at the head of a queue); delays go up to a grid with 8 steps per doubling
  (at most 9 % late, never early) so that jittered retries share a few queues. A delay
  queue deletes itself after twice its TTL plus a minute without a declaration
  (``x-expires``); a publish re-declares it before that could strand a message.
* **Dead letters** go to the classic queue ``headrace.jobs.dead`` as a confirmed copy
  with the JSON error record in a header, then the delivery is acked (not atomic: a
  crash in between leaves the message in both places, never in neither).
  ``max_deliveries`` (default 20) is checked when a fetch takes a message from the
  buffer. The topic's queue also names the dead-letter queue as its dead-letter
  target, so what RabbitMQ dead-letters by itself (RabbitMQ 4's default delivery limit
  of 20, a policy) lands there too, with a record made from ``x-death``. Queues cannot
  be read without taking: ``dead_letters`` and ``replay_dead_letters`` take every
  dead letter on a channel of their own and close it, which puts back what they did
  not ack in its old place.
* **Lost connections:** a waiting fetch raises
  :class:`~headrace.BrokerConnectionError` at once (the channel's close wakes it); the
  next operation connects again and the next fetch starts a new consumer. The worker
  retries with backoff. Queue arguments are fixed at declaration: declare nothing
  named like these queues yourself with other arguments.

The reliability scenarios of ``tests/messaging/test_reliability.py``, run here with
an ``amqp://`` case (5 trials each): R2 SIGTERM under load, 0 lost and 0
handled-but-unacked, stopped in 0.13-0.57 s; R3 ``kill -9``, 0 lost, redeliveries
within the window, 0 duplicate effects with the transactional store; R5, 10k fuzzed
payloads all dead-lettered; R7, every message confirmed or reported failed.

Measured here (``benchmarks/worker_rabbitmq.py``, B7: 50k messages on a quorum queue,
no-op handler, 5 interleaved rounds on a busy 2-core machine, RabbitMQ 3.10): the
:class:`~headrace.messaging.Worker` on this broker at concurrency 16 ran at 1.41x a
hand-written aio-pika loop (prefetch 100, ``ack(multiple=True)`` every 50) and 4.3x a
FastStream subscriber with defaults (18.0k vs 12.0k and 4.2k msgs/s); at concurrency
100 1.36x / 3.7x; with this broker's window cut to the loop's 100, 1.08x; a bare
``fetch(100)`` + ``ack`` loop 1.00x. Both sides are CPU-bound in aiormq's frame
parsing (profiled: ``get_frame`` and pamqp's unmarshalling lead; the adapter's own
functions are not in the top 20).

Driver errors become :class:`~headrace.BrokerConnectionError` (connection problems)
or :class:`~headrace.BrokerError` (a refused declaration, an unconfirmed publish); the
URL's password never appears in them or in reprs. Bodies are bytes and error records
JSON; nothing is pickled.

The package splits the adapter by concept:

* ``_broker``: :class:`RabbitMQBroker`, the :class:`~headrace.messaging.Broker`
  operations;
* ``_connection``: options, the connection and its channels, declarations, settling
  frames, the lease keeper, the error choke point, connect and close;
* ``_consumer``: a topic's consumer and its buffer; the local lease heap;
* ``_options``: options in the URL's query;
* ``_codec``: AMQP properties to and from :class:`~headrace.messaging.Message`, the
  delivery receipt.
"""

from ._broker import RabbitMQBroker

__all__ = ["RabbitMQBroker"]

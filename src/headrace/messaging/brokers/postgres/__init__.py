"""The PostgreSQL broker: one table, leases in its rows, SKIP LOCKED claims, LISTEN/NOTIFY.

Use :class:`PostgresBroker` when several machines share one queue and PostgreSQL is
already at hand (the queue then lives beside, and is backed up with, the data); use
:class:`~headrace.messaging.SqliteBroker` on one machine and
:class:`~headrace.messaging.MemoryBroker` in tests. This is the only module that
imports psycopg; ``open_broker("postgresql://...")`` imports it on demand.

How the contract maps onto PostgreSQL (tables for the default prefix ``headrace_``):

* ``headrace_messages`` holds one row per message, ``headrace_dead_letters`` the dead
  letters with their JSON error records. They are created on first connect if missing.
* A message is deliverable when ``ready_at <= now()`` and its lease has ended
  (``lease_until <= now()``). A **claim** is one statement: ``SELECT ... ORDER BY
  ready_at, id LIMIT n FOR UPDATE SKIP LOCKED`` (concurrent claims skip each other's
  rows instead of waiting) feeding an ``UPDATE`` that writes the lease (expiry and a
  random token for this delivery) and counts an attempt if the previous lease
  expired. Leases run on the server's clock, so consumers whose clocks disagree still
  agree on expiry. An expired lease needs no reaper: the row is simply deliverable
  again. The lease columns are in no index, so a claim's new row version stays on its
  page (a HOT update; the table leaves half of each page free for it).
* **Acks** are one ``DELETE ... WHERE id = ANY(...)``. An ack rides in the statement
  of the next claim when one waits for the connection or starts within a loop tick
  (the worker acks a batch as it fetches the next one): one round trip and one commit
  for both, where a hand-written lease loop pays two.
* ``nack``, ``hand_back`` and ``extend_lease`` act only on rows whose token is still
  the message's: a stale delivery cannot free or extend someone else's lease.
  ``hand_back`` keeps the message's place in the order and its attempt number;
  ``nack(delay)`` moves ``ready_at`` and counts the attempt.
* **Waiting:** publishes, nacks, hand-backs and replays ``NOTIFY`` the tables'
  channel with the topic as payload; each broker ``LISTEN``\\ s on a connection of its
  own and wakes the fetches waiting for that topic, in any process. An idle fetch
  otherwise sleeps until the next delayed message or lease expiry is due (one indexed
  read after an empty claim), or ``poll_interval`` if the listen connection was lost.
* ``max_deliveries`` (default 20) dead-letters, in the claim's transaction, a message
  that would be delivered more often than that, with a ``max_deliveries_exceeded``
  error record.
* **Cancellation:** a claim runs in a task of its own; a fetch cancelled meanwhile
  waits for it and hands its messages back before the cancellation propagates.
* **Lost connections** (a restart, ``pg_terminate_backend``, a proxy's idle timeout):
  the failing operation raises :class:`~headrace.BrokerConnectionError` and the next
  one connects afresh. Acks and the settle statements, safe to repeat, are sent once
  more over a fresh connection when theirs turns out dead. A claim whose reply was lost
  leaves its messages leased until the lease expires: late, never lost.

Everything runs on one *work* connection in autocommit mode, one statement at a time
(every statement is a single statement: no ``BEGIN``/``COMMIT`` round trips), and
one *listen* connection. The work connection turns bitmap scans off for its session:
on a table the planner has no statistics for (never analysed: just created, or
autovacuum off) it otherwise sorts the whole topic for every claim instead of walking
the ready index (35 ms instead of 3 ms per claim of 100 on 10k messages). Acked rows
leave dead tuples behind, as in any PostgreSQL queue: keep autovacuum on for the table.

Measured here (``benchmarks/worker_postgres.py``, B7: 50k messages, no-op handler,
5 interleaved rounds on a busy 2-core machine): the
:class:`~headrace.messaging.Worker` on this broker at concurrency 16 ran at 1.50x a
hand-written psycopg lease + batch delete loop and 1.15x a ``SKIP LOCKED``
delete-in-transaction loop (33.8k vs 21.6k and 29.6k msgs/s), nearly every ack riding
on the next claim (499 of 500 batches). Half-empty pages (``fillfactor`` 50) made it
1.4x faster than full ones (claims could not update rows in place). A bare
``fetch`` + ``ack`` loop that awaits each ack before the next fetch gets no claim to
ride on and runs at the lease loop's speed (1.03x).

Bodies are ``bytea``, headers and error records ``json``; nothing is pickled. Driver
errors become :class:`~headrace.BrokerConnectionError` (connection problems) or
:class:`~headrace.BrokerError`; the password never appears in them or in reprs.

The package splits the adapter by concept:

* ``_broker``: :class:`PostgresBroker`, the :class:`~headrace.messaging.Broker`
  operations;
* ``_connection``: options, the two connections, waiting for notifications, the
  psycopg error choke point, connect;
* ``_options``: options in the URL's query; keeping passwords out of text;
* ``_sql``: the tables and every statement.
"""

from ._broker import PostgresBroker

__all__ = ["PostgresBroker"]

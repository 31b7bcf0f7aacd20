"""The embedded default broker: a SQLite file in WAL mode, shared by local processes.

Why SQLite: zero setup, durable, and several worker processes on one machine can share
one file safely (``BEGIN IMMEDIATE`` serialises the claims; WAL lets readers run during
a write). Why these choices:

* **One row per message; the lease lives in columns no index covers.** A message is
  deliverable when ``ready_at <= now`` (index ``(topic, ready_at)``, which also serves
  delayed retries) and it holds no live lease (``lease_until`` in the past). A claim
  writes only ``lease_until``/``lease_token``, so it rewrites rows but never moves index
  entries (measured: about a third of the cost of moving ``ready_at``); a hand-back
  clears the lease and the message is back at its place in the order. An expired
  lease needs no reaper: the row is simply deliverable again, and the claim that takes
  it (still carrying the old token) counts one more attempt. Leased rows sit at the
  head of the index until acked, so a claim steps over at most the in-flight messages.
  "No lease" is stored as same-size sentinels rather than NULLs, so a claimed row does
  not grow and split its page.
* **Wall-clock time** (``time.time()``, injectable): leases are compared across
  processes, which do not share a monotonic clock.
* **Two connections: the loop's, and a dedicated thread's.** Fetches and acks first
  try the loop's own connection, which never waits for a lock (busy timeout 0) and
  never checkpoints: when the write lock is free, a claim of 100 commits in well under
  a millisecond with no thread hop. Running it on the thread instead cost more than the
  SQL: the hop, and GIL hand-offs that stall the thread for up to the interpreter's 5 ms
  switch interval while the loop runs handlers (B4, ``benchmarks/worker.py``: 0.67x ->
  1.1x the hand-written loop). When the lock is busy (another process, our own thread),
  the operation goes to the thread, which waits ``busy_timeout``; so do publishes,
  nacks, dead letters, and checkpoints (asked for by the loop's side when the WAL passes
  ~4 MiB), and everything when ``inline=False``.
* **Waiting:** an idle ``fetch`` sleeps until the earliest of its timeout, the next
  delayed message or lease expiry (one indexed read), a publish in this process (an
  in-process wake-up), or ``poll_interval`` (publishes by other processes).
* **Batches:** publish is one transaction with ``executemany``; ack is one
  ``DELETE ... WHERE id IN (...)``. An ack rides in the transaction of the next claim
  when one is queued or starts within a loop tick (the worker acks a batch as it
  fetches the next: one commit and one thread hop for both); otherwise the acks that
  arrived while the thread was busy commit together (group commit). A claim is one
  ``SELECT`` and one ``UPDATE ... WHERE id IN (...)`` in a ``BEGIN IMMEDIATE``,
  preceded by a lock-free readiness read unless the previous claim filled its batch.

Bodies are stored as BLOBs, headers as JSON; nothing is pickled.

The package splits the adapter by concept:

* ``_broker``: :class:`SqliteBroker`, the :class:`~headrace.messaging.Broker`
  operations (publish; the fetch path: claims, their cancellation, the idle wait;
  acks riding on claims or committed together; nack, hand-back, lease extension,
  dead letters);
* ``_connection``: what the operations share: options, the broker's thread and the
  event loop's own connection (the inline path, and the checkpoints it leaves to
  the thread), the sqlite3 error choke point, connect and close;
* ``_wakeups``: the fetches waiting in this process, by file, for a local publish;
* ``_store``: the schema and every statement (synchronous: one connection, used by
  one thread at a time).
"""

from ._broker import SqliteBroker

__all__ = ["SqliteBroker"]

"""The PostgreSQL broker's tables and every statement it sends, rendered once per broker.

Names come from the broker's ``schema`` and ``prefix`` (``headrace_messages`` and
``headrace_dead_letters`` by default) and are quoted as identifiers; each statement
is rendered to bytes once, so that psycopg prepares it on the server after a few runs
and the hot path builds no SQL. Every statement is a single statement: under
autocommit each one is its own transaction, with no round trip for ``BEGIN`` or
``COMMIT``.

Times are the server's (``now()``, the start of the statement's transaction), so
that consumers on machines whose clocks disagree still agree on when a lease
expires. "No lease" is ``lease_token = 0`` and ``lease_until = '-infinity'`` rather
than NULLs, so a claim is one comparison and a lease never makes the row change shape.
"""

from __future__ import annotations

import hashlib

from psycopg import sql

__all__ = ["Statements", "channel_name"]

# Bytes PostgreSQL allows in an identifier (NAMEDATALEN - 1); longer channel names are
# refused by pg_notify().
_MAX_IDENTIFIER = 63

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {messages} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
    topic text NOT NULL,
    body bytea NOT NULL,
    headers json,                       -- NULL when empty
    key text,
    ready_at timestamptz NOT NULL,      -- deliverable from (server time)
    attempt integer NOT NULL DEFAULT 1, -- attempt number of the next or current delivery
    lease_token bigint NOT NULL DEFAULT 0,                  -- current delivery (0: none)
    lease_until timestamptz NOT NULL DEFAULT '-infinity',   -- lease expiry (-infinity: none)
    published_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = {fillfactor});
CREATE INDEX IF NOT EXISTS {ready_index} ON {messages} (topic, ready_at, id);
CREATE TABLE IF NOT EXISTS {dead_letters} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL,
    topic text NOT NULL,
    body bytea NOT NULL,
    headers json,
    key text,
    attempt integer NOT NULL,
    error json NOT NULL,                -- the error record (HeadraceError.to_dict())
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {dead_index} ON {dead_letters} (topic, seq);
"""

# A notification's payload is the topic, or '' (wake every waiter) when the topic is
# too long for one (pg_notify takes fewer than 8000 bytes).
_PAYLOAD = "CASE WHEN octet_length({topic}) < 8000 THEN {topic} ELSE '' END"

# Deliverable: ready and not under a live lease. Leased rows stay at the head of the
# ready index until acked; a claim steps over at most the messages in flight.
_CLAIM = """
WITH acked AS (
    DELETE FROM {messages} WHERE id = ANY(%(acked)s::int8[])
), picked AS (
    SELECT id FROM {messages}
    WHERE topic = %(topic)s AND ready_at <= now() AND lease_until <= now()
      AND id <> ALL(%(acked)s::int8[])
    ORDER BY ready_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {messages} AS m
    SET lease_until = now() + %(lease)s * interval '1 second',
        lease_token = %(token)s,
        attempt = m.attempt + (m.lease_token <> 0)::int
    FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.body, m.headers, m.key, m.attempt, m.ready_at
)
SELECT id, body, headers, key, attempt FROM claimed ORDER BY ready_at, id
"""

# Seconds until the topic's first message becomes deliverable (NULL: none stored).
# The first free message in the index is due at its ready_at, and no message after it
# can be due earlier; leased ones before it are due when their lease ends.
_NEXT_DUE = """
WITH free AS (
    SELECT ready_at FROM {messages}
    WHERE topic = %(topic)s AND lease_token = 0
    ORDER BY ready_at, id LIMIT 1
)
SELECT extract(epoch FROM least(
    (SELECT ready_at FROM free),
    (SELECT min(greatest(ready_at, lease_until)) FROM {messages}
     WHERE topic = %(topic)s AND lease_token <> 0
       AND ready_at <= coalesce((SELECT ready_at FROM free), 'infinity'))
) - now())::float8
"""

_DELETE = "DELETE FROM {messages} WHERE id = ANY(%(ids)s::int8[])"

_PUBLISH = """
WITH added AS (
    INSERT INTO {messages} (topic, body, headers, key, ready_at)
    SELECT %(topic)s, body, headers::json, key, now() + delay * interval '1 second'
    FROM unnest(%(bodies)s::bytea[], %(headers)s::text[], %(keys)s::text[],
                %(delays)s::float8[]) WITH ORDINALITY AS given(body, headers, key, delay, n)
    ORDER BY n
    RETURNING id
)
SELECT array(SELECT id FROM added ORDER BY id), pg_notify(%(channel)s, {payload})
"""

# End deliveries still current (their token matches): a hand-back keeps the message's
# place in the order and its attempt number; a nack moves it to now + delay and counts
# the attempt. Waiting consumers of the topics hear of it.
_RELEASE = """
WITH released AS (
    UPDATE {messages} AS m
    SET ready_at = {ready_at}, lease_until = '-infinity', lease_token = 0,
        attempt = m.attempt + {cost}
    FROM unnest(%(ids)s::int8[], %(tokens)s::int8[]) AS given(id, token)
    WHERE m.id = given.id AND m.lease_token = given.token
    RETURNING m.topic
)
SELECT pg_notify(%(channel)s, {payload}) FROM (SELECT DISTINCT topic FROM released) AS t
"""

_EXTEND = """
UPDATE {messages} AS m SET lease_until = now() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::int8[], %(tokens)s::int8[]) AS given(id, token)
WHERE m.id = given.id AND m.lease_token = given.token
"""

_DEAD_LETTER = """
WITH moved AS (
    DELETE FROM {messages} WHERE id = %(id)s RETURNING id, topic, body, headers, key
)
INSERT INTO {dead_letters} (message_id, topic, body, headers, key, attempt, error)
SELECT id::text, topic, body, headers, key, %(attempt)s, %(error)s::json FROM moved
"""

# Messages a claim found past max_deliveries (the claim leased them to itself, so no
# one else can take them meanwhile): attempt counts the delivery that did not happen.
_BURY = """
WITH moved AS (
    DELETE FROM {messages} AS m
    USING unnest(%(ids)s::int8[], %(errors)s::text[]) AS given(id, error)
    WHERE m.id = given.id AND m.lease_token = %(token)s
    RETURNING m.id, m.topic, m.body, m.headers, m.key, m.attempt, given.error
)
INSERT INTO {dead_letters} (message_id, topic, body, headers, key, attempt, error)
SELECT id::text, topic, body, headers, key, attempt - 1, error::json FROM moved
"""

_DEAD_LETTERS = """
SELECT message_id, body, headers, key, attempt, error,
       extract(epoch FROM dead_lettered_at)::float8
FROM {dead_letters} WHERE topic = %(topic)s ORDER BY seq DESC LIMIT %(limit)s
"""

_REPLAY = """
WITH chosen AS (
    DELETE FROM {dead_letters}
    WHERE topic = %(topic)s
      AND (%(ids)s::text[] IS NULL OR message_id = ANY(%(ids)s::text[]))
    RETURNING seq, body, headers, key
), added AS (
    INSERT INTO {messages} (topic, body, headers, key, ready_at)
    SELECT %(topic)s, body, headers, key, now() FROM chosen ORDER BY seq
    RETURNING id
)
SELECT count(*), CASE WHEN count(*) > 0 THEN pg_notify(%(channel)s, {payload}) END
FROM added
"""

_TOPIC_STATS = """
SELECT count(*) FILTER (WHERE lease_until <= now() AND ready_at <= now()),
       count(*) FILTER (WHERE lease_until <= now() AND ready_at > now()),
       count(*) FILTER (WHERE lease_until > now()),
       (SELECT count(*) FROM {dead_letters} WHERE topic = %(topic)s)
FROM {messages} WHERE topic = %(topic)s
"""

_TABLES_EXIST = "SELECT to_regclass(%(messages)s) IS NOT NULL AND to_regclass(%(dead)s) IS NOT NULL"


def channel_name(schema: str | None, prefix: str) -> str:
    """The LISTEN/NOTIFY channel of one set of tables (hashed if it would be too long)."""
    name = f"{schema}.{prefix}messages" if schema else f"{prefix}messages"
    if len(name.encode()) <= _MAX_IDENTIFIER:
        return name
    return "headrace_" + hashlib.sha256(name.encode()).hexdigest()[:40]


class Statements:
    """The statements of one broker, as bytes ready to send (see the module doc)."""

    def __init__(self, schema: str | None, prefix: str, *, fillfactor: int) -> None:
        def table(name: str) -> sql.Identifier:
            if schema:
                return sql.Identifier(schema, prefix + name)
            return sql.Identifier(prefix + name)

        messages = table("messages")
        dead_letters = table("dead_letters")
        self.channel = channel_name(schema, prefix)
        self.messages_name = messages.as_string(None)
        self.dead_letters_name = dead_letters.as_string(None)
        names = {
            "messages": messages,
            "dead_letters": dead_letters,
            "ready_index": sql.Identifier(prefix + "messages_ready"),
            "dead_index": sql.Identifier(prefix + "dead_letters_topic"),
            "fillfactor": sql.Literal(fillfactor),
        }

        def render(text: str, **extra: sql.Composable) -> bytes:
            return sql.SQL(text).format(**names, **extra).as_bytes(None)

        self.schema = [
            render(statement + ";") for statement in _SCHEMA.split(";") if statement.strip()
        ]
        self.create_schema = (
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)).as_bytes(None)
            if schema
            else None
        )
        self.tables_exist = _TABLES_EXIST.encode()
        self.listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)).as_bytes(None)
        self.claim = render(_CLAIM)
        self.next_due = render(_NEXT_DUE)
        self.delete = render(_DELETE)
        self.publish = render(_PUBLISH, payload=sql.SQL(_PAYLOAD.format(topic="%(topic)s")))
        topic_payload = sql.SQL(_PAYLOAD.format(topic="topic"))
        self.hand_back = render(
            _RELEASE,
            ready_at=sql.SQL("m.ready_at"),
            cost=sql.SQL("0"),
            payload=topic_payload,
        )
        self.nack = render(
            _RELEASE,
            ready_at=sql.SQL("now() + %(delay)s * interval '1 second'"),
            cost=sql.SQL("1"),
            payload=topic_payload,
        )
        self.extend = render(_EXTEND)
        self.dead_letter = render(_DEAD_LETTER)
        self.bury = render(_BURY)
        self.dead_letters = render(_DEAD_LETTERS)
        self.replay = render(_REPLAY, payload=sql.SQL(_PAYLOAD.format(topic="%(topic)s")))
        self.topic_stats = render(_TOPIC_STATS)

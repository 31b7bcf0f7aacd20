"""The broker cases every conformance test runs against.

A *case* builds brokers for one test: ``broker_case.make(**options)`` returns a new,
not yet connected broker; every broker one test makes shares one fresh, isolated store
(the same ``memory://`` name, the same SQLite file, the same Redis key prefix), so a
test can play two consumers or a restart. Options every case accepts: ``max_deliveries``.

Brokers use their default clock, which reads the running loop's time: virtual time
on the virtual-clock loop, real time under ``real_time``. To add an adapter: write a
``_<name>_case(request)`` function returning the maker, and add one line to
``BROKER_CASES`` (``real_time=True`` when the adapter does real network I/O and must
not run on the virtual clock).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from headrace import default_clock
from headrace.messaging import Broker, MemoryBroker, SqliteBroker

BrokerMaker = Callable[..., Broker]

_names = itertools.count()


def _memory_case(request: pytest.FixtureRequest) -> BrokerMaker:
    name = f"conformance-{next(_names)}"

    def make(**options: Any) -> Broker:
        return MemoryBroker(name, **options)

    return make


def _sqlite_case(request: pytest.FixtureRequest, inline: bool = True) -> BrokerMaker:
    path = request.getfixturevalue("tmp_path") / "broker.db"

    def make(**options: Any) -> Broker:
        # "Wall" time from the loop, so leases and delays follow the virtual clock.
        options.setdefault("time", default_clock().now)
        options.setdefault("poll_interval", 0.05)
        options.setdefault("inline", inline)
        return SqliteBroker(path, **options)

    return make


def _sqlite_thread_case(request: pytest.FixtureRequest) -> BrokerMaker:
    """Every statement on the broker's thread (the path taken when the file is busy)."""
    return _sqlite_case(request, inline=False)


def _redis_case(request: pytest.FixtureRequest) -> BrokerMaker:
    # Imported here: redis-py is an optional dependency of the Redis adapter only.
    import uuid

    import redis

    from headrace.messaging.brokers.redis import RedisBroker

    url = request.getfixturevalue("redis_url")
    # A unique key prefix per test: other runs may share the database.
    prefix = f"conformance-{uuid.uuid4().hex}:"

    def cleanup() -> None:
        with redis.Redis.from_url(url) as client:
            for key in client.scan_iter(match=prefix + "*"):
                client.delete(key)

    request.addfinalizer(cleanup)

    def make(**options: Any) -> Broker:
        return RedisBroker(url, prefix=prefix, **options)

    return make


def _postgres_case(request: pytest.FixtureRequest) -> BrokerMaker:
    # Imported here: psycopg is an optional dependency of the PostgreSQL adapter only.
    import uuid

    import psycopg

    from headrace.messaging.brokers.postgres import PostgresBroker

    url = request.getfixturevalue("postgres_url")
    # Tables of their own per test: other runs may share the database.
    prefix = f"hr_conformance_{uuid.uuid4().hex[:12]}_"

    def cleanup() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {prefix}messages, {prefix}dead_letters")

    request.addfinalizer(cleanup)

    def make(**options: Any) -> Broker:
        return PostgresBroker(url, prefix=prefix, **options)

    return make


def _nats_case(request: pytest.FixtureRequest) -> BrokerMaker:
    # Imported here: nats-py is an optional dependency of the NATS adapter only.
    import uuid

    from headrace.messaging.brokers.nats import NatsBroker

    from ._nats import delete_nats_streams

    url = request.getfixturevalue("nats_url")
    # Streams of their own per test (the prefix starts every stream and subject name).
    prefix = f"conformance-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: delete_nats_streams(url, prefix))

    def make(**options: Any) -> Broker:
        return NatsBroker(url, prefix=prefix, **options)

    return make


def _sqlite_wall_case(request: pytest.FixtureRequest) -> BrokerMaker:
    # As in production: leases on time.time(), waiting on the loop's monotonic clock.
    path = request.getfixturevalue("tmp_path") / "broker.db"

    def make(**options: Any) -> Broker:
        options.setdefault("poll_interval", 0.05)
        return SqliteBroker(path, **options)

    return make


def _rabbitmq_case(request: pytest.FixtureRequest) -> BrokerMaker:
    # Imported here: aio-pika is an optional dependency of the RabbitMQ adapter only.
    import uuid

    from headrace.messaging.brokers.rabbitmq import RabbitMQBroker

    from ._rabbitmq import delete_queues

    url = request.getfixturevalue("amqp_url")
    # Queues of their own per test; the finalizer deletes every queue a broker declared.
    prefix = f"conformance-{uuid.uuid4().hex[:12]}."
    made: list[RabbitMQBroker] = []
    request.addfinalizer(
        lambda: delete_queues(url, {name for broker in made for name in broker.declared_queues})
    )

    def make(**options: Any) -> Broker:
        broker = RabbitMQBroker(url, prefix=prefix, **options)
        made.append(broker)
        return broker

    return make


@dataclass(frozen=True)
class CaseSpec:
    build: Callable[[pytest.FixtureRequest], BrokerMaker]
    real_time: bool = False


BROKER_CASES: dict[str, CaseSpec] = {
    "memory": CaseSpec(_memory_case),
    "sqlite": CaseSpec(_sqlite_case),
    "sqlite-thread": CaseSpec(_sqlite_thread_case),
    "sqlite-wall": CaseSpec(_sqlite_wall_case, real_time=True),
    "redis": CaseSpec(_redis_case, real_time=True),
    "postgres": CaseSpec(_postgres_case, real_time=True),
    "rabbitmq": CaseSpec(_rabbitmq_case, real_time=True),
    "nats": CaseSpec(_nats_case, real_time=True),
}


@dataclass(frozen=True)
class BrokerCase:
    """One adapter under test: ``make(**options)`` builds brokers on this test's store."""

    name: str
    make: BrokerMaker
    real_time: bool

    @asynccontextmanager
    async def open(self, **options: Any) -> AsyncIterator[Broker]:
        """A new connected broker on this test's store, closed on exit."""
        broker = self.make(**options)
        await broker.connect()
        try:
            yield broker
        finally:
            await broker.close()


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.real_time] if spec.real_time else [], id=name)
        for name, spec in BROKER_CASES.items()
    ]
)
def broker_case(request: pytest.FixtureRequest) -> BrokerCase:
    """Each registered adapter in turn, on a fresh isolated store."""
    spec = BROKER_CASES[request.param]
    return BrokerCase(request.param, spec.build(request), spec.real_time)

"""Messaging: messages, the broker contract, brokers and broker URLs.

``open_broker(url)`` turns ``memory://``, ``sqlite:///path.db`` or ``redis://...`` into
a :class:`Broker`; :class:`MemoryBroker` and :class:`SqliteBroker` can also be built
directly. Broker clients (redis-py...) are imported only when their URL is opened.
"""

from ._broker import Broker as Broker
from ._broker import BrokerCapabilities as BrokerCapabilities
from ._broker import DeadLetter as DeadLetter
from ._broker import Message as Message
from ._broker import OutgoingMessage as OutgoingMessage
from ._broker import TopicStats as TopicStats
from ._idempotency import IdempotencyStore as IdempotencyStore
from ._idempotency import IdempotentTransaction as IdempotentTransaction
from ._idempotency import MemoryIdempotencyStore as MemoryIdempotencyStore
from ._idempotency import RedisIdempotencyStore as RedisIdempotencyStore
from ._idempotency import SqliteIdempotencyStore as SqliteIdempotencyStore
from ._producer import Producer as Producer
from ._producer import ProducerCloseError as ProducerCloseError
from ._producer import ProducerReport as ProducerReport
from ._producer import PublishFailure as PublishFailure
from ._url import open_broker as open_broker
from ._worker import Worker as Worker
from ._worker import WorkerStatistics as WorkerStatistics
from .brokers.memory import MemoryBroker as MemoryBroker
from .brokers.sqlite import SqliteBroker as SqliteBroker

__all__ = [
    "Broker",
    "BrokerCapabilities",
    "DeadLetter",
    "IdempotencyStore",
    "IdempotentTransaction",
    "MemoryBroker",
    "MemoryIdempotencyStore",
    "Message",
    "OutgoingMessage",
    "Producer",
    "ProducerCloseError",
    "ProducerReport",
    "PublishFailure",
    "RedisIdempotencyStore",
    "SqliteBroker",
    "SqliteIdempotencyStore",
    "TopicStats",
    "Worker",
    "WorkerStatistics",
    "open_broker",
]

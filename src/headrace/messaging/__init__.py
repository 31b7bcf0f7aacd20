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
from ._url import open_broker as open_broker
from .brokers.memory import MemoryBroker as MemoryBroker
from .brokers.sqlite import SqliteBroker as SqliteBroker

__all__ = [
    "Broker",
    "BrokerCapabilities",
    "DeadLetter",
    "MemoryBroker",
    "Message",
    "OutgoingMessage",
    "SqliteBroker",
    "open_broker",
]

"""open_broker: broker URLs to adapters, options from the query, clear errors."""

from __future__ import annotations

import pytest

from headrace import ConfigurationError
from headrace.messaging import Broker, MemoryBroker, open_broker


def test_memory_url_shares_a_named_store() -> None:
    """memory://name opens a MemoryBroker; the same name is the same store."""
    broker = open_broker("memory://jobs-url-test?max_deliveries=5&lease=2.5")
    assert isinstance(broker, MemoryBroker)
    assert isinstance(broker, Broker)
    assert broker.max_deliveries == 5
    assert repr(broker) == "MemoryBroker(name='jobs-url-test', open)"


async def test_memory_url_name_shares_messages() -> None:
    """Two brokers opened on memory://same see the same messages; memory:// is private."""
    from headrace.messaging import OutgoingMessage

    producer = open_broker("memory://shared-url-test")
    consumer = open_broker("memory://shared-url-test")
    private = open_broker("memory://")
    await producer.publish("t", [OutgoingMessage(b"x")])
    assert await private.fetch("t", 1, timeout=0, lease=1.0) == []
    [message] = await consumer.fetch("t", 1, timeout=0, lease=1.0)
    assert message.body == b"x"


def test_keyword_options_override_the_query() -> None:
    """Keyword options win over URL query parameters."""
    broker = open_broker("memory://x?max_deliveries=5", max_deliveries=None)
    assert isinstance(broker, MemoryBroker)
    assert broker.max_deliveries is None


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("nope://host", "unknown broker URL scheme 'nope'"),
        ("jobs.db", "has no scheme"),
        ("memory://x?colour=red", "unknown option 'colour'"),
        ("memory://x?max_deliveries=many", "max_deliveries='many'"),
        ("memory://x?lease=inf", "lease='inf'"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, match: str) -> None:
    """Unknown schemes and options, and malformed values, raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match=match) as info:
        open_broker(url)
    assert info.value.code == "invalid_broker_url"


def test_passwords_never_reach_error_messages() -> None:
    """A password in a bad URL is redacted from the error message."""
    with pytest.raises(ConfigurationError) as info:
        open_broker("amqq://user:hunter2@host/")
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


def test_non_string_url() -> None:
    """A URL that is not a string is a ConfigurationError naming the type."""
    with pytest.raises(ConfigurationError, match="int"):
        open_broker(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "3"])
@pytest.mark.parametrize("scheme", ["memory://checks", "sqlite:///checks.db", "redis://x"])
def test_every_adapter_refuses_a_bad_max_deliveries(scheme: str, value: object) -> None:
    """One shared check: every broker names itself and the value, with one code."""
    from headrace.messaging import MemoryBroker, SqliteBroker
    from headrace.messaging.brokers.redis import RedisBroker

    build = {
        "memory://checks": lambda: MemoryBroker(max_deliveries=value),  # type: ignore[arg-type]
        "sqlite:///checks.db": lambda: SqliteBroker("checks.db", max_deliveries=value),  # type: ignore[arg-type]
        "redis://x": lambda: RedisBroker("redis://127.0.0.1:1/0", max_deliveries=value),  # type: ignore[arg-type]
    }[scheme]
    with pytest.raises(ConfigurationError, match=r"max_deliveries=") as caught:
        build()
    assert caught.value.code == "invalid_max_deliveries"

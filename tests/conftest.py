"""Test configuration: async tests on a virtual clock with a leak check; service URLs."""

from __future__ import annotations

import os

import pytest

from headrace.testing import require_service

pytest_plugins = ["headrace.testing.pytest_plugin"]


@pytest.fixture
def redis_url() -> str:
    """A Redis URL on this machine (database 15, flushed by the tests that use it)."""
    require_service("redis", "127.0.0.1", 6379)
    return os.environ.get("HEADRACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def postgres_url() -> str:
    require_service("postgresql", "127.0.0.1", 5432)
    return os.environ.get("HEADRACE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def nats_url() -> str:
    require_service("nats", "127.0.0.1", 4222)
    return os.environ.get("HEADRACE_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture
def amqp_url() -> str:
    require_service("rabbitmq", "127.0.0.1", 5672)
    return os.environ.get("HEADRACE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

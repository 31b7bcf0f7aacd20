"""The service requirement: skip on a user's machine, fail under CI's flag."""

from __future__ import annotations

import socket

import pytest

from headrace.testing import require_service, service_available


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_missing_service_skips_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HEADRACE_REQUIRE_SERVICES a down service skips the test, saying why."""
    monkeypatch.delenv("HEADRACE_REQUIRE_SERVICES", raising=False)
    port = _closed_port()
    with pytest.raises(pytest.skip.Exception, match=f"not reachable at 127.0.0.1:{port}"):
        require_service("redis", "127.0.0.1", port)


def test_missing_service_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HEADRACE_REQUIRE_SERVICES=1 a down service is a failure, never a skip."""
    monkeypatch.setenv("HEADRACE_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="HEADRACE_REQUIRE_SERVICES=1"):
        require_service("redis", "127.0.0.1", _closed_port())


def test_service_available_sees_a_listening_socket() -> None:
    """A listening socket counts as available; a closed port does not."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert service_available("127.0.0.1", server.getsockname()[1])
    assert not service_available("127.0.0.1", _closed_port(), timeout=0.2)

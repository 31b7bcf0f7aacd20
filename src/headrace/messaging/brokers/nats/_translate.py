"""The choke point where nats-py errors become headrace errors.

Every call into nats-py runs inside ``with broker._translated(operation, topic):``;
the most specific mapped error wins (a timeout or a lost connection is a transient
:class:`~headrace.BrokerConnectionError`), the original is chained, and the message
and context name the operation, the topic and the URL with its password or token
scrubbed.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import nats.errors as nats_errors
import nats.js.errors as js_errors

from ...._errors import BrokerConnectionError, BrokerError, translate_errors
from ._options import Scrubber

_ERRORS = {
    nats_errors.TimeoutError: BrokerConnectionError,
    nats_errors.ConnectionClosedError: BrokerConnectionError,
    nats_errors.NoServersError: BrokerConnectionError,
    nats_errors.StaleConnectionError: BrokerConnectionError,
    nats_errors.ConnectionReconnectingError: BrokerConnectionError,
    nats_errors.OutboundBufferLimitError: BrokerConnectionError,
    nats_errors.NoRespondersError: BrokerConnectionError,
    js_errors.ServiceUnavailableError: BrokerConnectionError,
    TimeoutError: BrokerConnectionError,
    OSError: BrokerConnectionError,
    nats_errors.Error: BrokerError,
}


class _Translated:
    """The choke point where nats-py errors become headrace errors (a context manager)."""

    __slots__ = ("operation", "scrub", "topic", "where_url")

    def __init__(self, scrub: Scrubber, url: str, operation: str, topic: str | None) -> None:
        self.scrub = scrub
        self.where_url = url
        self.operation = operation
        self.topic = topic

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        url = self.scrub(self.where_url)
        context: dict[str, Any] = {"url": url, "operation": self.operation}
        where = f"nats {self.operation}"
        if self.topic is not None:
            context["topic"] = self.topic
            where += f"({self.topic!r})"
        with translate_errors(
            _ERRORS,
            message=lambda error: (
                f"{where} failed on {url}: {type(error).__name__}: {self.scrub(str(error))}"
            ),
            context=context,
        ):
            raise exc.with_traceback(traceback)

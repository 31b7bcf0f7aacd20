"""What the adapters share about their lifecycle, and the error choke point's shape.

:class:`BrokerLifecycle` gives every adapter the same ``closed`` and
``max_deliveries`` properties, ``async with`` and the :class:`~headrace.ClosedResourceError`
of an operation on a closed broker. :class:`ServerBroker` adds what the adapters that
connect to a server share: ``from_url`` and the ``ResourceWarning`` of a broker left
connected and unclosed. :class:`Translated` is the context manager at which a driver's
exceptions become headrace errors; each adapter subclasses it with its error map, its
name and how a driver message loses its secrets.

Nothing here imports a broker client, and nothing here adds a call to the per-message
or per-batch paths: a subclass's ``_check_open`` and ``_translated`` cost what they
did when each adapter wrote them out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from ..._errors import ClosedResourceError, ExceptionMapping, redact, translate_errors

__all__ = ["BrokerLifecycle", "ScrubbedTranslated", "ServerBroker", "Translated"]


class BrokerLifecycle:
    """The state every adapter keeps the same way (a base class; not thread-safe).

    Subclasses set ``_closed`` and ``_max_deliveries`` in their constructor and
    implement ``connect`` and ``close``.
    """

    _closed: bool
    _max_deliveries: int | None

    @property
    def max_deliveries(self) -> int | None:
        return self._max_deliveries

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise ClosedResourceError(
                f"{operation}() on a closed {self!r}", context={"operation": operation}
            )


class ServerBroker(BrokerLifecycle):
    """:class:`BrokerLifecycle` for an adapter configured by a URL that connects to a
    server: ``from_url``, and a ``ResourceWarning`` for a broker garbage-collected while
    connected and not closed. Subclasses also set ``_connected``."""

    _connected: bool

    if TYPE_CHECKING:
        # Every server adapter takes the URL first (what from_url relies on).
        def __init__(self, url: str, /, **options: Any) -> None: ...

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """The broker for ``url``; keyword ``options`` win over the URL's query."""
        return cls(url, **options)

    def __del__(self) -> None:
        # getattr: __init__ may have failed before setting the attributes.
        if getattr(self, "_connected", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {self!r}: call await broker.close() (or use async with)",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


class Translated:
    """The choke point where a driver's errors become headrace errors (a context manager).

    ``with broker._translated(operation, topic):`` around every driver call: the most
    specific mapped error wins (see :func:`~headrace.translate_errors`), the original is
    chained, and the message and context name the broker, the operation, the topic and
    ``shown`` (the URL without its password). A subclass sets ``errors`` and ``system``
    and may override :meth:`describe`. A class rather than a generator: it is entered
    per batch, and does nothing at all unless the block raises.
    """

    __slots__ = ("operation", "shown", "topic")

    errors: ClassVar[ExceptionMapping]
    # Names the broker in messages: "redis publish('jobs') failed on ...".
    system: ClassVar[str]

    def __init__(self, shown: str, operation: str, topic: str | None) -> None:
        self.shown = shown
        self.operation = operation
        self.topic = topic

    def describe(self, error: BaseException) -> str:
        """The driver's message for ours, without secrets."""
        return str(redact(str(error)))

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Returns None, never true: an error is translated or passed on, never swallowed.
        if exc is None or not isinstance(exc, Exception):
            return
        shown = self.shown
        context: dict[str, Any] = {"url": shown, "operation": self.operation}
        where = f"{self.system} {self.operation}"
        if self.topic is not None:
            context["topic"] = self.topic
            where += f"({self.topic!r})"
        with translate_errors(
            self.errors,
            message=lambda error: (
                f"{where} failed on {shown}: {type(error).__name__}: {self.describe(error)}"
            ),
            context=context,
        ):
            raise exc.with_traceback(traceback)


class ScrubbedTranslated(Translated):
    """:class:`Translated` for an adapter whose secrets :func:`~headrace.redact` alone
    does not find (a NATS token, a conninfo ``password=``): ``scrub`` removes them from
    the driver's message."""

    __slots__ = ("scrub",)

    def __init__(
        self, scrub: Callable[[str], str], shown: str, operation: str, topic: str | None
    ) -> None:
        self.scrub = scrub
        self.shown = shown
        self.operation = operation
        self.topic = topic

    def describe(self, error: BaseException) -> str:
        return self.scrub(str(error))

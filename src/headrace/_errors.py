"""Structured errors: what went wrong, when, where, and how to look it up.

Every error headrace raises on purpose is a :class:`HeadraceError`. It carries two
messages (``message`` for logs and operators, ``public_message`` that is safe to show
to an end user), a stable machine-readable ``code``, a unique ``error_id`` to
cross-reference a user report with the logs, an aware-UTC ``timestamp``, a
``context`` mapping, a ``transient`` hint (retrying may help) and a ``kind``:
``"expected"`` for failures the program anticipates (a timeout, a full queue) and
``"bug"`` for exceptions nobody anticipated, which :func:`error_boundary` turns into
:class:`InternalError` at a module boundary with the original kept as ``__cause__``.

The tree::

    Exception
    ├── WouldBlock                      (not a HeadraceError: raised on hot paths)
    ├── EndOfChannel                    (not a HeadraceError: normal end of iteration)
    └── HeadraceError
        ├── InternalError               kind="bug": an unexpected exception crossed a boundary
        ├── ConfigurationError(ValueError)
        ├── DeadlineExceeded(TimeoutError)
        ├── ClosedResourceError         use of a channel/broker/limiter after close()
        ├── RateLimitExceeded           the wait for tokens would pass the caller's deadline
        ├── SupervisorError             a supervisor gave up restarting a child
        ├── PipelineError               a pipeline stage failed (stage and item in context)
        ├── MessagingError
        │   ├── BrokerError
        │   │   └── BrokerConnectionError(ConnectionError)
        │   ├── InvalidMessage          undecodable, oversized or of the wrong schema
        │   └── PublishError            a message the producer could not get confirmed
        └── HttpError
            ├── HttpStatusError         the server answered with an error status
            └── HttpTransportError(ConnectionError)

``CancelledError`` is never wrapped: cancellation is control flow, not an error.
Driver exceptions are translated at one choke point, :func:`translate_errors`, which
picks the most specific mapped headrace error and chains the original.
"""

from __future__ import annotations

import datetime as _dt
import re
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

__all__ = [
    "BrokerConnectionError",
    "BrokerError",
    "ClosedResourceError",
    "ConfigurationError",
    "DeadlineExceeded",
    "EndOfChannel",
    "ErrorKind",
    "HeadraceError",
    "HttpError",
    "HttpStatusError",
    "HttpTransportError",
    "InternalError",
    "InvalidMessage",
    "MessagingError",
    "PipelineError",
    "PublishError",
    "RateLimitExceeded",
    "SupervisorError",
    "WouldBlock",
    "error_boundary",
    "redact",
    "translate_errors",
]

ErrorKind = Literal["bug", "expected"]

_E = TypeVar("_E", bound="HeadraceError")

# Context keys whose values are never written to logs, dicts or reprs.
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|auth|credential|cookie", re.I)
# user:password@ inside URLs (amqp://guest:guest@host, redis://:pw@host).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)


def redact(value: Any) -> Any:
    """Return ``value`` with secrets removed, for logs, reprs and ``to_dict()``.

    Strings lose the password part of any URL they contain; mappings lose the values of
    keys that look like secrets (``password``, ``token``, ``api_key``...); sequences are
    redacted item by item. Everything else is returned as it is.
    """
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    if isinstance(value, Mapping):
        return {
            str(key): "***" if _SECRET_KEY.search(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _json_safe(value: Any) -> Any:
    """Turn ``value`` into something ``json.dumps`` accepts, falling back to ``repr``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item) for item in value]
    if isinstance(value, bytes):
        return value[:256].decode("utf-8", "backslashreplace")
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return repr(value)


class HeadraceError(Exception):
    """Base of every error headrace raises on purpose.

    ``message`` is for operators and logs; ``public_message`` is what an end user may
    see (it never contains internals or secrets). ``code`` is stable across releases,
    ``error_id`` is unique per instance. Safe to share between tasks once raised (it is
    not mutated after construction, except by the exception machinery itself).

    Subclasses set the class attributes ``default_code``, ``default_public_message``,
    ``default_transient`` and ``http_status``.
    """

    default_code: ClassVar[str] = "headrace_error"
    default_public_message: ClassVar[str] = "The request could not be completed."
    default_transient: ClassVar[bool] = False
    default_kind: ClassVar[ErrorKind] = "expected"
    http_status: ClassVar[int] = 500

    message: str
    public_message: str
    code: str
    error_id: str
    timestamp: _dt.datetime
    context: Mapping[str, Any]
    transient: bool
    kind: ErrorKind

    def __init__(
        self,
        message: str,
        *,
        public_message: str | None = None,
        code: str | None = None,
        context: Mapping[str, Any] | None = None,
        transient: bool | None = None,
        kind: ErrorKind | None = None,
        error_id: str | None = None,
        timestamp: _dt.datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.public_message = (
            public_message if public_message is not None else self.default_public_message
        )
        self.code = code if code is not None else self.default_code
        self.context = MappingProxyType(dict(context) if context is not None else {})
        self.transient = transient if transient is not None else self.default_transient
        self.kind = kind if kind is not None else self.default_kind
        self.error_id = error_id if error_id is not None else uuid.uuid4().hex
        self.timestamp = timestamp if timestamp is not None else _dt.datetime.now(_dt.UTC)

    def __str__(self) -> str:
        return f"{redact(self.message)} [code={self.code} error_id={self.error_id}]"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({redact(self.message)!r}, code={self.code!r}, "
            f"error_id={self.error_id!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments need an explicit reduce so that errors can
        # come back from a process-pool stage; the contents are plain data, never code.
        return (
            _rebuild_error,
            (
                type(self),
                self.message,
                {
                    "public_message": self.public_message,
                    "code": self.code,
                    "context": dict(self.context),
                    "transient": self.transient,
                    "kind": self.kind,
                    "error_id": self.error_id,
                    "timestamp": self.timestamp,
                },
            ),
        )

    @classmethod
    def wrap(
        cls: type[_E],
        exc: BaseException,
        message: str | None = None,
        *,
        code: str | None = None,
        context: Mapping[str, Any] | None = None,
        public_message: str | None = None,
        transient: bool | None = None,
        kind: ErrorKind | None = None,
    ) -> _E:
        """Wrap a lower-level ``exc`` at a module boundary, keeping it as ``__cause__``.

        The returned error's traceback starts where ``exc`` was raised, so the stack is
        not lost when the caller does ``raise HeadraceError.wrap(exc) from exc``.
        ``CancelledError`` (and other ``BaseException`` control flow) is refused:
        cancellation must propagate untouched.
        """
        if not isinstance(exc, Exception):
            raise TypeError(
                f"refusing to wrap {type(exc).__name__}: cancellation and interpreter exits "
                "must propagate unchanged"
            )
        if transient is None and isinstance(exc, HeadraceError):
            transient = exc.transient
        wrapped = cls(
            message if message is not None else f"{type(exc).__name__}: {exc}",
            code=code,
            context=context,
            public_message=public_message,
            transient=transient,
            kind=kind,
        )
        wrapped.__cause__ = exc
        return wrapped.with_traceback(exc.__traceback__)

    def to_dict(self, *, include_traceback: bool = True) -> dict[str, Any]:
        """Return a JSON-safe description, with the formatted traceback and cause chain.

        Secrets in ``message`` and ``context`` are redacted. Meant for logs and
        dead-letter records, not for end users (use :meth:`to_problem_details`).
        """
        result: dict[str, Any] = {
            "type": f"{type(self).__module__}.{type(self).__qualname__}",
            "code": self.code,
            "error_id": self.error_id,
            "timestamp": self.timestamp.isoformat(),
            "kind": self.kind,
            "transient": self.transient,
            "message": redact(self.message),
            "public_message": self.public_message,
            "context": _json_safe(redact(dict(self.context))),
        }
        if include_traceback:
            result["traceback"] = redact("".join(traceback.format_exception(self)))
        cause = self.__cause__ or (None if self.__suppress_context__ else self.__context__)
        if isinstance(cause, HeadraceError):
            result["cause"] = cause.to_dict(include_traceback=False)
        elif cause is not None:
            result["cause"] = {
                "type": f"{type(cause).__module__}.{type(cause).__qualname__}",
                "message": redact(str(cause)),
            }
        return result

    def to_problem_details(self, *, type_base: str = "urn:headrace:error:") -> dict[str, Any]:
        """Return an RFC 9457 problem-details object that is safe to send to a client.

        Only the public message, the code, the error id and the timestamp leave the
        process; the internal message, the context and the traceback do not.
        """
        return {
            "type": f"{type_base}{self.code}",
            "title": self.code.replace("_", " ").capitalize(),
            "status": self.http_status,
            "detail": self.public_message,
            "instance": f"urn:uuid:{uuid.UUID(hex=self.error_id)}"
            if len(self.error_id) == 32
            else self.error_id,
            "code": self.code,
            "error_id": self.error_id,
            "timestamp": self.timestamp.isoformat(),
        }


def _rebuild_error(cls: type[HeadraceError], message: str, kwargs: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    HeadraceError.__init__(error, message, **kwargs)
    return error


class InternalError(HeadraceError):
    """An exception nobody anticipated crossed a headrace boundary (``kind="bug"``)."""

    default_code = "internal_error"
    default_public_message = "An internal error occurred."
    default_kind = "bug"


class ConfigurationError(HeadraceError, ValueError):
    """A constructor or method was given arguments that cannot work."""

    default_code = "invalid_configuration"
    default_public_message = "The service is misconfigured."


class DeadlineExceeded(HeadraceError, TimeoutError):
    """A :func:`~headrace.deadline` expired; ``cause`` says why it was set, ``elapsed`` how long
    it ran."""

    default_code = "deadline_exceeded"
    default_public_message = "The operation took too long."
    default_transient = True
    http_status = 504

    @property
    def cause(self) -> str | None:
        """The reason given to ``deadline(..., cause=...)``, if any."""
        value = self.context.get("cause")
        return None if value is None else str(value)

    @property
    def elapsed(self) -> float:
        """Seconds between entering the deadline scope and its expiry."""
        return float(self.context.get("elapsed", 0.0))

    @property
    def timeout(self) -> float:
        """The timeout the scope was given, in seconds."""
        return float(self.context.get("timeout", 0.0))


class ClosedResourceError(HeadraceError):
    """A channel, broker, limiter or producer was used after it was closed."""

    default_code = "closed_resource"
    default_public_message = "The service is shutting down."
    default_transient = True
    http_status = 503


class RateLimitExceeded(HeadraceError):
    """Tokens could not be had within the caller's timeout; nothing was consumed."""

    default_code = "rate_limited"
    default_public_message = "Too many requests; try again later."
    default_transient = True
    http_status = 429


class SupervisorError(HeadraceError):
    """A supervisor stopped restarting children and gave up; see ``context``."""

    default_code = "supervisor_gave_up"


class PipelineError(HeadraceError):
    """A pipeline stage failed: ``context`` names the ``stage`` and the ``item``.

    The stage function's own exception is ``__cause__`` (a :class:`DeadlineExceeded`
    for a per-item timeout); ``transient`` and ``kind`` are copied from it when it is
    a headrace error, and ``kind="bug"`` otherwise (an exception nobody anticipated
    escaped the stage function). Raised by every sink of a :class:`~headrace.Pipeline`.
    """

    default_code = "pipeline_stage_failed"
    default_public_message = "A batch job step failed."

    @property
    def stage(self) -> str:
        """The name of the stage that failed."""
        return str(self.context.get("stage"))


class MessagingError(HeadraceError):
    """Base of errors from brokers, workers and producers."""

    default_code = "messaging_error"


class BrokerError(MessagingError):
    """The broker refused or failed an operation."""

    default_code = "broker_error"


class BrokerConnectionError(BrokerError, ConnectionError):
    """The connection to the broker failed or was lost; retrying may help."""

    default_code = "broker_unavailable"
    default_public_message = "The message broker is unavailable."
    default_transient = True
    http_status = 503


class InvalidMessage(MessagingError):
    """A message could not be decoded, was too large, or did not fit the schema."""

    default_code = "invalid_message"
    default_public_message = "The message was malformed."
    http_status = 400


class PublishError(MessagingError):
    """A published message was not confirmed by the broker."""

    default_code = "publish_failed"
    default_transient = True


class HttpError(HeadraceError):
    """Base of errors from :mod:`headrace.http`."""

    default_code = "http_error"
    http_status = 502


class HttpStatusError(HttpError):
    """The server answered with an error status (``context["status"]``)."""

    default_code = "http_status"


class HttpTransportError(HttpError, ConnectionError):
    """The request failed below HTTP: connect, TLS, reset, or a timeout."""

    default_code = "http_transport"
    default_transient = True


class WouldBlock(Exception):
    """A ``*_nowait`` operation could not complete without waiting.

    Deliberately not a :class:`HeadraceError`: it is raised on hot paths where a
    uuid and a timestamp per raise would cost more than the operation itself.
    """


class EndOfChannel(Exception):
    """The channel was closed by its sender and every buffered item has been received."""


ExceptionMapping = Mapping[type[BaseException], type[HeadraceError]]


def _most_specific(exc: BaseException, mapping: ExceptionMapping) -> type[HeadraceError] | None:
    # Walk the raised type's MRO so that a subclass mapping wins over its base's.
    for klass in type(exc).__mro__:
        target = mapping.get(klass)
        if target is not None:
            return target
    return None


@contextmanager
def translate_errors(
    mapping: ExceptionMapping,
    *,
    message: str | Callable[[BaseException], str] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Translate driver exceptions raised in the block into headrace errors.

    ``mapping`` maps driver exception types to headrace error types; the most specific
    match (by the raised exception's MRO) wins and the original becomes ``__cause__``.
    Headrace errors and unmapped exceptions pass through unchanged, and so does
    cancellation. Use it at the one place where an adapter calls its driver::

        with translate_errors({redis.ConnectionError: BrokerConnectionError},
                              context={"url": url}):
            await client.xack(...)
    """
    try:
        yield
    except HeadraceError:
        raise
    except Exception as exc:
        target = _most_specific(exc, mapping)
        if target is None:
            raise
        text = message(exc) if callable(message) else message
        raise target.wrap(exc, text, context=context) from exc


@contextmanager
def error_boundary(
    where: str,
    *,
    mapping: ExceptionMapping | None = None,
    context: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Mark a module boundary: nothing but a :class:`HeadraceError` leaves this block.

    Mapped driver exceptions become their headrace error (see
    :func:`translate_errors`); any other ``Exception`` becomes an
    :class:`InternalError` with ``kind="bug"`` and the original as cause.
    ``CancelledError``, ``KeyboardInterrupt`` and ``SystemExit`` pass untouched.
    """
    full_context = {"where": where, **(context or {})}
    try:
        with translate_errors(mapping or {}, context=full_context):
            yield
    except HeadraceError:
        raise
    except Exception as exc:
        raise InternalError.wrap(
            exc, f"unexpected {type(exc).__name__} in {where}: {exc}", context=full_context
        ) from exc

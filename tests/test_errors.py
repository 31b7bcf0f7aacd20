"""Structured errors: fields, wrapping, serialisation, translation, boundaries."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pickle

import pytest

from headrace import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    DeadlineExceeded,
    HeadraceError,
    InternalError,
    error_boundary,
    redact,
    translate_errors,
)


class DriverError(Exception):
    """Stands in for a driver's base exception."""


class DriverConnectionError(DriverError):
    """Stands in for a driver's connection exception."""


def test_fields_have_defaults_from_the_class() -> None:
    """A bare error gets its class's code, public message, kind and a fresh id and time."""
    before = dt.datetime.now(dt.UTC)
    error = BrokerConnectionError("redis at 10.0.0.1 refused")
    assert error.code == "broker_unavailable"
    assert error.public_message == "The message broker is unavailable."
    assert error.transient is True
    assert error.kind == "expected"
    assert len(error.error_id) == 32
    assert error.timestamp.tzinfo is dt.UTC
    assert before <= error.timestamp <= dt.datetime.now(dt.UTC)
    assert dict(error.context) == {}


def test_error_ids_are_unique() -> None:
    """Every instance has its own error id for log cross-reference."""
    ids = {HeadraceError("x").error_id for _ in range(1000)}
    assert len(ids) == 1000


def test_stdlib_bases_match_the_meaning() -> None:
    """Leaves subclass the stdlib exception of the same meaning."""
    assert issubclass(DeadlineExceeded, TimeoutError)
    assert issubclass(BrokerConnectionError, ConnectionError)
    assert issubclass(ConfigurationError, ValueError)


def test_context_is_read_only() -> None:
    """The context mapping cannot be changed after construction."""
    error = HeadraceError("x", context={"order": 7})
    with pytest.raises(TypeError):
        error.context["order"] = 8  # type: ignore[index]


def test_wrap_keeps_cause_and_stack() -> None:
    """wrap() chains the original and starts the traceback where it was raised."""
    try:
        raise DriverError("socket closed")
    except DriverError as exc:
        wrapped = BrokerError.wrap(exc, "publish failed", context={"topic": "orders"})
    assert wrapped.__cause__ is not None
    assert isinstance(wrapped.__cause__, DriverError)
    assert wrapped.message == "publish failed"
    assert wrapped.context["topic"] == "orders"
    assert wrapped.__traceback__ is wrapped.__cause__.__traceback__


def test_wrap_inherits_transient_from_a_headrace_cause() -> None:
    """Wrapping a transient headrace error keeps the hint unless told otherwise."""
    inner = BrokerConnectionError("down")
    assert HeadraceError.wrap(inner).transient is True
    assert HeadraceError.wrap(inner, transient=False).transient is False


def test_wrap_refuses_cancellation() -> None:
    """CancelledError is control flow and is never wrapped."""
    with pytest.raises(TypeError, match="CancelledError"):
        HeadraceError.wrap(asyncio.CancelledError())


def test_to_dict_is_json_safe_with_traceback_and_cause() -> None:
    """to_dict() serialises to JSON with the traceback, the cause and no secrets."""
    try:
        try:
            raise DriverError("auth failed for amqp://app:hunter2@mq:5672/")
        except DriverError as exc:
            raise BrokerError.wrap(
                exc, context={"url": "amqp://app:hunter2@mq/", "password": "hunter2", "n": 3}
            ) from exc
    except BrokerError as error:
        record = error.to_dict()
    text = json.dumps(record)
    assert "hunter2" not in text
    assert record["code"] == "broker_error"
    assert record["context"] == {"url": "amqp://app:***@mq/", "password": "***", "n": 3}
    assert "DriverError" in record["traceback"]
    assert record["cause"]["type"].endswith("DriverError")
    assert record["kind"] == "expected"


def test_problem_details_leaks_nothing_internal() -> None:
    """The RFC 9457 export carries the public message, code and id, never internals."""
    error = DeadlineExceeded("db query 42 on shard-7 too slow", context={"sql": "SELECT 1"})
    problem = error.to_problem_details()
    assert problem["status"] == 504
    assert problem["type"] == "urn:headrace:error:deadline_exceeded"
    assert problem["detail"] == "The operation took too long."
    assert problem["instance"].startswith("urn:uuid:")
    assert problem["error_id"] == error.error_id
    assert "shard-7" not in json.dumps(problem)
    assert "SELECT" not in json.dumps(problem)


def test_str_and_repr_redact_url_passwords() -> None:
    """Secrets in messages never reach str() or repr()."""
    error = BrokerConnectionError("cannot reach redis://:s3cret@cache:6379/0")
    assert "s3cret" not in str(error)
    assert "s3cret" not in repr(error)
    assert error.error_id in str(error)


def test_round_trips_through_pickle_for_process_pools() -> None:
    """Errors survive the trip back from a process-pool stage with their identity."""
    error = DeadlineExceeded("slow", context={"timeout": 1.0})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is DeadlineExceeded
    assert (copy.error_id, copy.code, copy.timestamp, dict(copy.context)) == (
        error.error_id,
        error.code,
        error.timestamp,
        dict(error.context),
    )


def test_translate_errors_picks_the_most_specific_mapping() -> None:
    """A subclass mapping wins over its base's, and the original is the cause."""
    mapping = {DriverError: BrokerError, DriverConnectionError: BrokerConnectionError}
    with pytest.raises(BrokerConnectionError) as caught, translate_errors(mapping):
        raise DriverConnectionError("reset")
    assert isinstance(caught.value.__cause__, DriverConnectionError)
    with pytest.raises(BrokerError) as caught_base, translate_errors(mapping):
        raise DriverError("odd reply")
    assert type(caught_base.value) is BrokerError


def test_translate_errors_passes_unmapped_and_headrace_errors() -> None:
    """Unmapped exceptions and headrace errors pass through unchanged."""
    with pytest.raises(KeyError), translate_errors({DriverError: BrokerError}):
        raise KeyError("k")
    original = ConfigurationError("bad")
    with pytest.raises(ConfigurationError) as caught, translate_errors({ValueError: BrokerError}):
        raise original
    assert caught.value is original


def test_error_boundary_turns_the_unexpected_into_a_bug() -> None:
    """An unexpected exception crossing a boundary becomes kind='bug' with its cause."""
    with pytest.raises(InternalError) as caught, error_boundary("orders.handle"):
        {}["missing"]
    assert caught.value.kind == "bug"
    assert caught.value.context["where"] == "orders.handle"
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.public_message == "An internal error occurred."


async def test_error_boundary_lets_cancellation_through() -> None:
    """CancelledError crosses a boundary untouched."""
    with pytest.raises(asyncio.CancelledError), error_boundary("x"):
        raise asyncio.CancelledError


def test_redact_handles_nested_structures() -> None:
    """redact() walks mappings and sequences."""
    assert redact({"db": {"api_key": "k", "hosts": ["postgresql://u:p@h/db"]}}) == {
        "db": {"api_key": "***", "hosts": ["postgresql://u:***@h/db"]}
    }

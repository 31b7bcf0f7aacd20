"""What a :class:`~headrace.http.Fetcher` counts, and the snapshot it hands out.

The counters are plain ``int`` and ``dict`` attributes of the fetcher itself, bumped
where things happen (``self._attempts += 1``): on the per-request path a counters
object would cost an attribute lookup per bump, and a method per count a call.
:class:`StatisticsMixin` declares them, starts them at zero and builds the frozen
:class:`~headrace.http.FetcherStatistics`; :func:`count` bumps one key of the two
dicts (the hot path inlines it).
"""

from __future__ import annotations

from typing import Any

from ._models import FetcherStatistics
from ._transport import CountingConnector

__all__ = ["StatisticsMixin", "count"]


def count(counts: dict[Any, int], key: Any) -> None:
    """``counts[key] += 1``, starting at 0 (about twice as fast as a ``Counter``'s)."""
    try:
        counts[key] += 1
    except KeyError:
        counts[key] = 1


class StatisticsMixin:
    """The counters of a :class:`~headrace.http.Fetcher` (one of its base classes)."""

    _requests: int
    _attempts: int
    _retries: int
    _responses: int
    _discarded: int
    _bytes: int
    _in_flight: int
    _waiting: int
    _errors: dict[str, int]
    _statuses: dict[int, int]
    # Set by Fetcher.open(); it counts the connections opened and reused.
    _connector: CountingConnector | None

    def _init_statistics(self) -> None:
        self._requests = 0
        self._attempts = 0
        self._retries = 0
        self._responses = 0
        self._discarded = 0
        self._bytes = 0
        self._in_flight = 0
        self._waiting = 0
        # Plain dicts, not Counters: ``counter[key] += 1`` on a Counter cost about twice
        # a dict's on every request (see count).
        self._errors = {}
        self._statuses = {}

    def statistics(self) -> FetcherStatistics:
        """A snapshot of the counters (see :class:`FetcherStatistics`)."""
        connector = self._connector
        return FetcherStatistics(
            requests=self._requests,
            attempts=self._attempts,
            retries=self._retries,
            responses=self._responses,
            connections_opened=connector.opened if connector is not None else 0,
            connections_reused=connector.reused if connector is not None else 0,
            connections_discarded=self._discarded,
            bytes_received=self._bytes,
            errors=dict(self._errors),
            statuses=dict(self._statuses),
            in_flight=self._in_flight,
            waiting_for_slot=self._waiting,
        )

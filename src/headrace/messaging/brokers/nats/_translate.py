"""The choke point where nats-py errors become headrace errors.

Every call into nats-py runs inside ``with broker._translated(operation, topic):``;
the most specific mapped error wins (a timeout or a lost connection is a transient
:class:`~headrace.BrokerConnectionError`), the original is chained, and the message
and context name the operation, the topic and the URL with its password or token
scrubbed.
"""

from __future__ import annotations

import nats.errors as nats_errors
import nats.js.errors as js_errors

from ...._errors import BrokerConnectionError, BrokerError
from .._base import ScrubbedTranslated

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


class _Translated(ScrubbedTranslated):
    """The choke point where nats-py errors become headrace errors (a context manager);
    its ``scrub`` is the broker's :class:`~._options.Scrubber` (a NATS token has no
    colon: :func:`~headrace.redact` alone would miss it)."""

    __slots__ = ()
    errors = _ERRORS
    system = "nats"

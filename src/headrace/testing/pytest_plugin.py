"""pytest plugin: ``async def`` tests on a virtual clock, each checked for task leaks.

Enable with ``pytest_plugins = ["headrace.testing.pytest_plugin"]`` in a conftest.

* An ``async def`` test runs on a fresh :class:`~headrace.testing.VirtualClock` loop;
  mark it ``@pytest.mark.real_time`` to run on a normal loop (real I/O, brokers).
* The ``clock`` fixture is the clock the test runs on (virtual unless ``real_time``).
* Every async test fails if it leaves tasks alive or the loop logged an unhandled error.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from .._clock import Clock, MonotonicClock, VirtualClock
from . import run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_time: run this async test on a real-time event loop (real I/O)"
    )


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> Clock:
    """The clock the test's event loop runs on."""
    if request.node.get_closest_marker("real_time") is not None:
        return MonotonicClock()
    return VirtualClock()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    chosen = kwargs.get("clock")
    if not isinstance(chosen, VirtualClock | MonotonicClock):
        real = pyfuncitem.get_closest_marker("real_time") is not None
        chosen = MonotonicClock() if real else VirtualClock()
    run(lambda: function(**kwargs), clock=chosen)
    return True

"""A supervised child: what it receives (:class:`ChildContext`) and what is kept of it."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from .._clock import Clock, TimerHandle
from .._errors import HeadraceError, redact
from .._heartbeat import Heartbeat

__all__ = [
    "ChildContext",
    "ChildFunction",
    "ChildStatistics",
    "RestartType",
    "Strategy",
    "SupervisorStatistics",
]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]


class ChildContext:
    """What a supervised child receives: its heartbeat and what the last run left.

    ``name`` of the child, ``incarnation`` (1 for the first run, 2 after the first
    restart...), ``resume_details`` (the details of the previous incarnation's last
    beat that carried any: a checkpoint to resume from; ``None`` at first),
    ``previous_error`` (why the previous incarnation ended, if it failed) and
    ``heartbeat`` (the child's :class:`~headrace.Heartbeat`, watched by the supervisor
    when the child has a ``heartbeat_timeout``). Beat with :meth:`beat` per unit of
    work, or :meth:`tick` on every loop iteration.
    """

    __slots__ = ("heartbeat", "incarnation", "name", "previous_error", "resume_details")

    def __init__(
        self,
        name: str,
        heartbeat: Heartbeat,
        incarnation: int,
        resume_details: Any = None,
        previous_error: BaseException | None = None,
    ) -> None:
        self.name = name
        self.heartbeat = heartbeat
        self.incarnation = incarnation
        self.resume_details = resume_details
        self.previous_error = previous_error

    def beat(self, details: Any = None) -> None:
        """Tell the supervisor this child is alive; ``details`` is the new checkpoint."""
        self.heartbeat.beat(details)

    def tick(self, details: Any = None) -> bool:
        """Beat if the heartbeat interval has passed since the last beat (cheap)."""
        return self.heartbeat.tick(details)

    def __repr__(self) -> str:
        return f"ChildContext(name={self.name!r}, incarnation={self.incarnation})"


ChildFunction = Callable[[ChildContext], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class _Spec:
    fn: ChildFunction
    name: str
    restart: RestartType
    heartbeat_timeout: float | None
    heartbeat_interval: float | None
    shutdown_timeout: float


class _ChildState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    RESTARTING = "restarting"  # waiting for its backoff delay
    STOPPED = "stopped"


class _Child:
    __slots__ = (
        "details",
        "errors",
        "heartbeat",
        "incarnation",
        "restart_timer",
        "restarts",
        "spec",
        "started_at",
        "state",
        "task",
        "watchdog",
    )

    def __init__(self, spec: _Spec, clock: Clock) -> None:
        self.spec = spec
        self.task: asyncio.Task[object] | None = None
        self.heartbeat = Heartbeat(spec.heartbeat_interval, clock=clock)
        self.incarnation = 0
        self.restarts = 0
        self.errors: deque[BaseException] = deque(maxlen=3)
        self.details: Any = None
        self.started_at = 0.0
        self.state = _ChildState.STOPPED
        self.watchdog: TimerHandle | None = None
        self.restart_timer: TimerHandle | None = None


@dataclass(frozen=True, slots=True)
class ChildStatistics:
    """One child: its state (running, stopping, restarting, stopped), incarnation,
    restarts so far, time of its last beat and a redacted repr of its last error."""

    name: str
    state: str
    incarnation: int
    restarts: int
    last_beat: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """A supervisor's state, total restarts and its children in start order."""

    state: str
    restarts: int
    children: tuple[ChildStatistics, ...]


def _describe(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, HeadraceError) else str(exc)
    return redact(f"{type(exc).__name__}: {text}") if text else type(exc).__name__


def _retrieve(task: asyncio.Task[Any]) -> None:
    # The supervisor reports child errors itself; mark them retrieved for asyncio.
    if not task.cancelled():
        task.exception()


async def _call(fn: ChildFunction, context: ChildContext) -> object:
    return await fn(context)


async def _wait_task(task: asyncio.Task[Any], timeout: float, clock: Clock) -> bool:
    """Wait until ``task`` is done or ``timeout`` seconds pass; return whether it is done."""
    if task.done():
        return True
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(_: object = None) -> None:
        if not done.done():
            done.set_result(None)

    task.add_done_callback(finish)
    timer = clock.call_at(clock.now() + timeout, finish)
    try:
        await done
    finally:
        timer.cancel()
        task.remove_done_callback(finish)
    return task.done()

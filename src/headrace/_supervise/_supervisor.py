"""The :class:`Supervisor`: one manager task deciding restarts; timers for the rest."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from types import TracebackType
from typing import Any

from .._clock import Clock, default_clock
from .._errors import ClosedResourceError, ConfigurationError, DeadlineExceeded, SupervisorError
from .._heartbeat import Heartbeat
from .._retry import Retry
from ._child import (
    ChildContext,
    ChildFunction,
    ChildStatistics,
    RestartType,
    Strategy,
    SupervisorStatistics,
    _call,
    _Child,
    _ChildState,
    _describe,
    _retrieve,
    _Spec,
    _wait_task,
)

__all__ = ["Supervisor"]

logger = logging.getLogger("headrace.supervise")

# A watchdog timer may fire a hair before the deadline it was set for (timer
# resolution); within this margin the child counts as silent rather than re-arming.
_EPSILON = 1e-6


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


class Supervisor:
    """Keeps child tasks alive: restarts them per strategy, gives up past a limit.

    ``strategy`` is ``"one_for_one"`` (default), ``"one_for_all"`` or
    ``"rest_for_one"``. More than ``max_restarts`` restarts (default 1) within
    ``within`` seconds (default 5, OTP's defaults; a restart stops counting once it
    is ``within`` seconds old) make it stop all children and raise
    :class:`~headrace.SupervisorError`. ``backoff`` (a :class:`~headrace.Retry`;
    default ``None``: restart at once, as OTP does) delays the n-th restart within the
    window by ``backoff.backoff(n)`` seconds, jitter included.

    Children are added with :meth:`add` before or while it runs; each child function
    takes a :class:`ChildContext`. The ``async with`` block is the supervisor's
    lifetime: leaving it shuts every child down (reverse start order, each with its
    grace period); ``await sup.wait()`` inside it waits until no child is left (only
    transient and temporary children ever finish). When it gives up, the block is
    cancelled and ``SupervisorError`` raised from it. A supervisor nests: add
    ``inner.run`` as a child of another. Use it inside one event loop; the methods are
    not thread-safe. Reads time only through ``clock``::

        async def poller(ctx: ChildContext) -> None:
            offset = ctx.resume_details or 0
            while True:
                offset = await poll_once(offset)
                ctx.beat(offset)

        async with Supervisor(max_restarts=3, within=60) as sup:
            sup.add(poller, name="poller", heartbeat_timeout=10)
            await sup.wait()

    Use a ``TaskGroup`` when a crash should end the group; use a supervisor when the
    work must go on.
    """

    def __init__(
        self,
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 1,
        within: float = 5.0,
        backoff: Retry | None = None,
        name: str = "supervisor",
        clock: Clock | None = None,
    ) -> None:
        if strategy not in ("one_for_one", "one_for_all", "rest_for_one"):
            raise ConfigurationError(
                f"Supervisor(strategy={strategy!r}) must be one_for_one, one_for_all "
                "or rest_for_one"
            )
        if not (isinstance(max_restarts, int) and max_restarts >= 0):
            raise ConfigurationError(f"Supervisor(max_restarts={max_restarts!r}) must be >= 0")
        if not (isinstance(within, int | float) and within > 0):
            raise ConfigurationError(f"Supervisor(within={within!r}) must be > 0 seconds")
        if backoff is not None and not isinstance(backoff, Retry):
            raise ConfigurationError(f"Supervisor(backoff={backoff!r}) must be a Retry or None")
        self.strategy: Strategy = strategy
        self.max_restarts = max_restarts
        self.within = float(within)
        self.backoff = backoff
        self.name = name
        self._clock = clock or default_clock()
        self._specs: list[_Spec] = []
        self._state = _State.NEW
        self._children: list[_Child] = []
        self._restart_times: deque[float] = deque()
        self._total_restarts = 0
        self._events: deque[tuple[Any, ...]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._manager: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._owner_waiting = 0
        self._owner_cancelled = False
        self._exiting = False
        self._failure: SupervisorError | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._stragglers: list[asyncio.Task[object]] = []

    # -- configuration ---------------------------------------------------------------

    def add(
        self,
        fn: ChildFunction,
        *,
        name: str,
        restart: RestartType = "permanent",
        heartbeat_timeout: float | None = None,
        heartbeat_interval: float | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        """Add a child; it starts now if the supervisor runs, else when it starts.

        ``fn(context)`` is the child's coroutine function. ``heartbeat_timeout``
        (seconds, default ``None``: not watched) is the longest silence allowed
        between beats (counted from the start of each incarnation too);
        ``heartbeat_interval`` is the period :meth:`ChildContext.tick` beats at
        (default half the timeout). ``shutdown_timeout`` is the grace, in seconds,
        the child gets to finish after it is cancelled before the supervisor moves on.
        """
        if not callable(fn):
            raise ConfigurationError(f"Supervisor.add(fn={fn!r}) must be a callable")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"Supervisor.add(name={name!r}) must be a non-empty str")
        if any(spec.name == name for spec in self._specs):
            raise ConfigurationError(
                f"Supervisor.add(name={name!r}): supervisor {self.name!r} has one already"
            )
        if restart not in ("permanent", "transient", "temporary"):
            raise ConfigurationError(
                f"Supervisor.add(restart={restart!r}) must be permanent, transient or temporary"
            )
        for label, value in (
            ("heartbeat_timeout", heartbeat_timeout),
            ("heartbeat_interval", heartbeat_interval),
        ):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigurationError(f"Supervisor.add({label}={value!r}) must be > 0 seconds")
        if not (isinstance(shutdown_timeout, int | float) and shutdown_timeout >= 0):
            raise ConfigurationError(
                f"Supervisor.add(shutdown_timeout={shutdown_timeout!r}) must be >= 0 seconds"
            )
        if self._state is _State.STOPPING:
            raise ClosedResourceError(f"Supervisor.add({name!r}): {self.name!r} is shutting down")
        if heartbeat_interval is None and heartbeat_timeout is not None:
            heartbeat_interval = heartbeat_timeout / 2
        spec = _Spec(fn, name, restart, heartbeat_timeout, heartbeat_interval, shutdown_timeout)
        self._specs.append(spec)
        if self._state is _State.RUNNING:
            child = _Child(spec, self._clock)
            self._children.append(child)
            self._start(child)

    # -- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        if self._state in (_State.RUNNING, _State.STOPPING):
            raise ClosedResourceError(f"supervisor {self.name!r} is already running")
        owner = asyncio.current_task()
        if owner is None:
            raise RuntimeError("Supervisor must be entered inside a task")
        self._owner = owner
        self._owner_waiting = 0
        self._owner_cancelled = False
        self._exiting = False
        self._failure = None
        self._restart_times.clear()
        self._events.clear()
        self._stragglers = []
        # A restarted supervisor starts from its specs, as an OTP supervisor does.
        self._children = [_Child(spec, self._clock) for spec in self._specs]
        self._state = _State.RUNNING
        self._manager = asyncio.get_running_loop().create_task(
            self._manage(), name=f"supervisor {self.name}"
        )
        for child in list(self._children):
            self._start(child)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._exiting = True
        self._post(("stop",))
        manager = self._manager
        assert manager is not None
        assert self._owner is not None
        cancelled_meanwhile = False
        # Hold back cancellations until every child is down (as TaskGroup does): a
        # supervisor that returned with children still running would leak them.
        while not manager.done():
            try:
                await asyncio.shield(manager)
            except asyncio.CancelledError:
                cancelled_meanwhile = True
            except BaseException:
                break
        manager_error = None if manager.cancelled() else manager.exception()
        if manager_error is not None:
            raise manager_error
        pending_cancels = self._owner.cancelling()
        if self._owner_cancelled:
            self._owner_cancelled = False
            pending_cancels = self._owner.uncancel()
        failure = self._failure
        if failure is not None:
            if pending_cancels > 0:
                return False  # cancelled from outside too: cancellation wins
            if exc is failure:
                return False
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                return False  # the block's own error is the more direct story
            raise failure from failure.__cause__
        if cancelled_meanwhile and exc is None:
            raise asyncio.CancelledError()
        return False

    async def wait(self) -> None:
        """Wait until no child is left (running or about to restart).

        Raises :class:`~headrace.SupervisorError` if the supervisor gave up.
        """
        if self._state is _State.NEW:
            raise ClosedResourceError(f"wait() on supervisor {self.name!r} before it started")
        is_owner = asyncio.current_task() is self._owner
        while True:
            if self._failure is not None:
                raise self._failure
            if self._state is _State.CLOSED or not self._children:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            if is_owner:
                self._owner_waiting += 1
            try:
                await waiter
            finally:
                if is_owner:
                    self._owner_waiting -= 1
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def run(self, context: ChildContext | None = None) -> None:
        """Run until no child is left; stop the children when cancelled.

        Takes an optional :class:`ChildContext`, so that ``parent.add(inner.run,
        name="inner")`` nests one supervisor under another: when the inner one gives
        up, its ``SupervisorError`` is a crash the parent handles, and the restarted
        inner supervisor starts from its specs with a fresh restart history. Give the
        parent's ``add()`` a ``shutdown_timeout`` that covers the inner shutdown, and
        no ``heartbeat_timeout`` (a supervisor does not beat for its children).
        """
        async with self:
            await self.wait()

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the state and the children."""
        return SupervisorStatistics(
            state=self._state.value,
            restarts=self._total_restarts,
            children=tuple(
                ChildStatistics(
                    name=child.spec.name,
                    state=child.state.value,
                    incarnation=child.incarnation,
                    restarts=child.restarts,
                    last_beat=child.heartbeat.last_beat,
                    last_error=_describe(child.errors[-1]) if child.errors else None,
                )
                for child in self._children
            ),
        )

    def __repr__(self) -> str:
        return (
            f"Supervisor(name={self.name!r}, strategy={self.strategy!r}, "
            f"state={self._state.value!r}, children={len(self._children)})"
        )

    # -- the manager -----------------------------------------------------------------

    def _post(self, event: tuple[Any, ...]) -> None:
        self._events.append(event)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _notify_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _manage(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._state is _State.RUNNING:
                if not self._events:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
                event = self._events.popleft()
                kind = event[0]
                if kind == "stop":
                    break
                if kind == "exit":
                    await self._on_exit(event[1], event[2])
                elif kind == "stalled":
                    await self._on_stalled(event[1], event[2])
                elif kind == "start":
                    for child in event[1]:
                        if child.state is _ChildState.RESTARTING and child in self._children:
                            child.restart_timer = None
                            self._start(child)
                if not self._children:
                    self._notify_waiters()
        finally:
            self._state = _State.STOPPING
            await self._shutdown()
            self._state = _State.CLOSED
            self._notify_waiters()

    def _start(self, child: _Child) -> None:
        spec = child.spec
        now = self._clock.now()
        child.details = child.heartbeat.details
        child.heartbeat.close()
        child.heartbeat = Heartbeat(
            spec.heartbeat_interval, clock=self._clock, details=child.details
        )
        child.incarnation += 1
        context = ChildContext(
            spec.name,
            child.heartbeat,
            child.incarnation,
            resume_details=child.details,
            previous_error=child.errors[-1] if child.errors else None,
        )
        task = asyncio.get_running_loop().create_task(
            _call(spec.fn, context), name=f"{self.name}/{spec.name}#{child.incarnation}"
        )
        task.add_done_callback(_retrieve)
        task.add_done_callback(lambda done: self._post(("exit", child, done)))
        child.task = task
        child.started_at = now
        child.state = _ChildState.RUNNING
        if spec.heartbeat_timeout is not None:
            self._arm_watchdog(child, task, now + spec.heartbeat_timeout)

    def _arm_watchdog(self, child: _Child, task: asyncio.Task[object], when: float) -> None:
        child.watchdog = self._clock.call_at(when, lambda: self._check_heartbeat(child, task))

    def _check_heartbeat(self, child: _Child, task: asyncio.Task[object]) -> None:
        child.watchdog = None
        timeout = child.spec.heartbeat_timeout
        if child.task is not task or task.done() or timeout is None:
            return
        last = child.heartbeat.last_beat
        reference = child.started_at if last is None or last < child.started_at else last
        due = reference + timeout
        if self._clock.now() >= due - _EPSILON:
            self._post(("stalled", child, task))
        else:
            self._arm_watchdog(child, task, due)

    async def _on_exit(self, child: _Child, task: asyncio.Task[object]) -> None:
        if child.task is not task:
            return  # stopped on purpose; already handled
        child.task = None
        self._disarm(child)
        if task.cancelled():
            error: BaseException | None = asyncio.CancelledError(
                f"child {child.spec.name!r} was cancelled, not by its supervisor"
            )
        else:
            error = task.exception()
        await self._ended(child, error)

    async def _on_stalled(self, child: _Child, task: asyncio.Task[object]) -> None:
        if child.task is not task:
            return
        timeout = child.spec.heartbeat_timeout
        silent_since = child.heartbeat.last_beat
        await self._stop(child)
        error = DeadlineExceeded(
            f"child {child.spec.name!r} of supervisor {self.name!r} sent no heartbeat "
            f"for {timeout} s",
            code="heartbeat_timeout",
            context={"child": child.spec.name, "timeout": timeout, "last_beat": silent_since},
        )
        await self._ended(child, error)

    async def _ended(self, child: _Child, error: BaseException | None) -> None:
        spec = child.spec
        child.state = _ChildState.STOPPED
        if error is not None:
            child.errors.append(error)
            logger.warning(
                "supervisor %r: child %r (incarnation %d) failed: %s",
                self.name,
                spec.name,
                child.incarnation,
                _describe(error),
                exc_info=error if isinstance(error, Exception) else None,
            )
        if spec.restart == "temporary" or (spec.restart == "transient" and error is None):
            self._children.remove(child)
            return
        now = self._clock.now()
        while self._restart_times and self._restart_times[0] <= now - self.within:
            self._restart_times.popleft()
        self._restart_times.append(now)
        if len(self._restart_times) > self.max_restarts:
            self._give_up(child)
            return
        child.restarts += 1
        self._total_restarts += 1
        targets = [child]
        if self.strategy != "one_for_one":
            index = self._children.index(child)
            others = (
                [other for other in self._children if other is not child]
                if self.strategy == "one_for_all"
                else self._children[index + 1 :]
            )
            for other in reversed(others):
                await self._stop(other)
                if other.spec.restart == "temporary":
                    self._children.remove(other)
            targets = [c for c in self._children if c is child or c in others]
        delay = self.backoff.backoff(len(self._restart_times)) if self.backoff else 0.0
        for target in targets:
            target.state = _ChildState.RESTARTING
        if delay <= 0:
            for target in targets:
                self._start(target)
            return
        handle = self._clock.call_at(now + delay, lambda: self._post(("start", targets)))
        for target in targets:
            target.restart_timer = handle
        logger.info("supervisor %r: restarting %r in %.3g s", self.name, spec.name, delay)

    def _give_up(self, child: _Child) -> None:
        errors = list(child.errors)
        message = (
            f"supervisor {self.name!r} gave up: child {child.spec.name!r} ended "
            f"{len(self._restart_times)} times within {self.within:g} s "
            f"(max_restarts={self.max_restarts}); last errors: "
            + ("; ".join(_describe(error) for error in errors) or "none (it returned)")
        )
        failure = SupervisorError(
            message,
            context={
                "supervisor": self.name,
                "child": child.spec.name,
                "max_restarts": self.max_restarts,
                "within": self.within,
                "errors": [_describe(error) for error in errors],
            },
        )
        if errors:
            failure.__cause__ = errors[-1]
        self._failure = failure
        self._state = _State.STOPPING
        logger.error("%s", message)
        owner = self._owner
        if (
            owner is not None
            and not self._exiting
            and self._owner_waiting == 0
            and not owner.done()
        ):
            # Interrupt the block so that __aexit__ can raise the failure.
            self._owner_cancelled = True
            owner.cancel(msg=f"supervisor {self.name!r} gave up")
        self._notify_waiters()

    def _disarm(self, child: _Child) -> None:
        if child.watchdog is not None:
            child.watchdog.cancel()
            child.watchdog = None
        if child.restart_timer is not None:
            child.restart_timer.cancel()
            child.restart_timer = None

    async def _stop(self, child: _Child) -> None:
        """Cancel one child and wait up to its grace period for it to end."""
        self._disarm(child)
        task = child.task
        child.task = None
        if task is None or task.done():
            child.state = _ChildState.STOPPED
            return
        child.state = _ChildState.STOPPING
        task.cancel(msg=f"stopped by supervisor {self.name!r}")
        if not await _wait_task(task, child.spec.shutdown_timeout, self._clock):
            logger.warning(
                "supervisor %r: child %r still running %s s after cancellation; "
                "moving on, it will be awaited last",
                self.name,
                child.spec.name,
                child.spec.shutdown_timeout,
            )
            self._stragglers.append(task)
        child.state = _ChildState.STOPPED

    async def _shutdown(self) -> None:
        for child in reversed(list(self._children)):
            await self._stop(child)
        stragglers = [task for task in self._stragglers if not task.done()]
        if stragglers:
            # No task may outlive its supervisor, however long it ignores cancellation.
            await asyncio.wait(stragglers)
        self._stragglers = []

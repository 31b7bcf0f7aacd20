"""Compensation: undo the finished steps of a multi-step call when a later step fails.

The seed's problem: a handler calls api1, then api2; api2 fails or the handler is
cancelled (shutdown, a timeout), so api1 must be rolled back. Run in the cancelled task,
the rollback is cancelled too ("context canceled") and the message floods the
dead-letter queue. :class:`Compensation` runs the registered undos in another task
under :func:`~headrace.shielded`, with their own deadline, so they finish even while
the handler is being cancelled, and the cancellation still arrives afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from ._cancel import deadline, shielded
from ._clock import Clock, default_clock
from ._errors import ConfigurationError, DeadlineExceeded, HeadraceError

__all__ = ["Compensation", "CompensationError"]

logger = logging.getLogger("headrace.compensation")

Undo = Callable[[], Awaitable[object]]


class CompensationError(HeadraceError):
    """A step failed and at least one undo failed or ran out of time too.

    The state is now inconsistent and needs a person or a repair job, so this error is
    not transient: a worker dead-letters it at once instead of retrying. ``context``
    names the failed undos; ``__cause__`` is the step's original error.
    """

    default_code = "compensation_failed"
    default_public_message = "The operation failed and could not be fully undone."


class Compensation:
    """Register an undo after each finished step; on failure or cancellation, undo all.

    Use as ``async with``. When the block exits with an exception, including
    ``CancelledError`` from a shutdown or a :func:`~headrace.deadline`, the undos run
    in reverse order of registration, each under its own deadline of ``step_timeout``
    seconds (default: ``timeout``) and all of them within ``timeout`` seconds (default
    10), in a separate task that the cancellation cannot reach. A failing undo does
    not stop the others. Then the original exception continues, except that a
    step's ordinary exception becomes :class:`CompensationError` if any undo failed
    (cancellation always stays cancellation; failed undos are then logged and listed
    in :attr:`failures`). A block that exits normally discards its undos.

    One ``Compensation`` per operation; not shared between tasks::

        async with Compensation(timeout=5) as comp:
            booking = await api1.book(order)
            comp.on_rollback(lambda: api1.cancel(booking))
            await api2.charge(order)        # fails or is cancelled -> api1.cancel runs
    """

    __slots__ = ("_clock", "_entered", "_undos", "failures", "name", "step_timeout", "timeout")

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        step_timeout: float | None = None,
        name: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError(f"Compensation(timeout={timeout!r}) must be > 0 seconds")
        if step_timeout is not None and not step_timeout > 0:
            raise ConfigurationError(
                f"Compensation(step_timeout={step_timeout!r}) must be > 0 seconds"
            )
        self.timeout = timeout
        self.step_timeout = step_timeout if step_timeout is not None else timeout
        self.name = name
        self._clock = clock or default_clock()
        self._undos: list[tuple[str, Undo]] = []
        self._entered = False
        self.failures: list[tuple[str, BaseException]] = []

    def on_rollback(self, undo: Undo, *, name: str | None = None) -> None:
        """Register ``undo`` (an async callable taking no arguments) for the last step."""
        if not callable(undo):
            raise ConfigurationError(f"Compensation.on_rollback({undo!r}) needs a callable")
        label = name or getattr(undo, "__qualname__", None) or repr(undo)
        self._undos.append((label, undo))

    @property
    def pending(self) -> int:
        """How many undos are registered (and would run on failure)."""
        return len(self._undos)

    async def __aenter__(self) -> Compensation:
        if self._entered:
            raise ConfigurationError("a Compensation can be entered only once")
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._undos.clear()
            return
        await self.rollback()
        if self.failures and isinstance(exc, Exception):
            names = [label for label, _ in self.failures]
            raise CompensationError(
                f"{self.name or 'operation'} failed ({type(exc).__name__}: {exc}) and "
                f"{len(names)} undo(s) failed too: {', '.join(names)}",
                context={
                    "operation": self.name,
                    "failed_undos": names,
                    "errors": [repr(error) for _, error in self.failures],
                },
            ) from exc

    async def rollback(self) -> None:
        """Run the registered undos now (newest first), shielded; each runs once."""
        undos, self._undos = self._undos, []
        if not undos:
            return
        try:
            await shielded(
                self._run(list(reversed(undos))),
                timeout=self.timeout,
                cause=f"rollback of {self.name or 'operation'}",
                clock=self._clock,
            )
        except DeadlineExceeded:
            pass  # the undos that did not finish are already in self.failures

    async def _run(self, undos: list[tuple[str, Undo]]) -> None:
        for index, (label, undo) in enumerate(undos):
            try:
                async with deadline(self.step_timeout, cause=f"undo {label}", clock=self._clock):
                    await undo()
            except asyncio.CancelledError:
                # Our overall deadline fired: the remaining undos did not run either.
                self.failures.extend(
                    (name, TimeoutError(f"rollback deadline of {self.timeout} s exceeded"))
                    for name, _ in undos[index:]
                )
                logger.error(
                    "rollback of %s ran out of time (%s s); undos not finished: %s",
                    self.name or "operation",
                    self.timeout,
                    ", ".join(name for name, _ in undos[index:]),
                )
                raise
            except Exception as error:
                self.failures.append((label, error))
                logger.error("undo %s of %s failed: %r", label, self.name or "operation", error)

"""Supervisors: restart children that crash or stop beating, give up past a limit.

The steward/ward of *Concurrency in Go* §5.6 crossed with Erlang/OTP's supervisor:

* **strategies** — ``one_for_one`` restarts the child that ended; ``one_for_all``
  stops every other child (reverse start order) and restarts them all; ``rest_for_one``
  stops and restarts the children started after it.
* **restart types** — ``permanent`` children are always restarted, ``transient`` ones
  only after an error, ``temporary`` ones never (and are dropped when a strategy
  stops them).
* **restart intensity** — at most ``max_restarts`` restarts within ``within`` seconds
  (OTP's default: 1 in 5 s); the next crash makes the supervisor stop every child and
  fail upward with a :class:`~headrace.SupervisorError` naming the child and its last
  errors. ``backoff`` (a :class:`~headrace.Retry`) spaces restarts out.
* **heartbeat watchdog** — a child added with ``heartbeat_timeout`` must beat through
  its :class:`ChildContext` at least that often; if it goes silent it is cancelled and
  restarted exactly ``heartbeat_timeout`` seconds after its last beat (plus backoff,
  and plus whatever its cleanup takes: a new incarnation never runs beside the old).
  The details of its last beat are handed to the next incarnation
  (:attr:`ChildContext.resume_details`), so work resumes from a checkpoint, as
  Temporal's activity heartbeats do.
* **shutdown** — in reverse start order; each child is cancelled and given
  ``shutdown_timeout`` seconds of grace to finish its cleanup before the supervisor
  moves on to the next (a child that ignores cancellation longer is still awaited at
  the very end, so no task outlives the supervisor).

Every child function takes one argument, its :class:`ChildContext`. A single manager
task owns the decisions; watchdogs and restart delays are loop timers, not tasks.
"""

from ._child import ChildContext as ChildContext
from ._child import ChildFunction as ChildFunction
from ._child import ChildStatistics as ChildStatistics
from ._child import RestartType as RestartType
from ._child import Strategy as Strategy
from ._child import SupervisorStatistics as SupervisorStatistics
from ._supervisor import Supervisor as Supervisor

__all__ = [
    "ChildContext",
    "ChildFunction",
    "ChildStatistics",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorStatistics",
]

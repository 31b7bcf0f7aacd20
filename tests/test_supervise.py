"""Supervisor: restarts at exact times, strategies, intensity, watchdog, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace import (
    ClosedResourceError,
    ConfigurationError,
    DeadlineExceeded,
    Retry,
    SupervisorError,
)
from headrace._clock import Clock
from headrace._supervise import ChildContext, Supervisor
from headrace.testing import VirtualClock, run

Events = list[tuple[str, str, float]]
ChildFunction = Callable[[ChildContext], Awaitable[object]]


def recorder(
    events: Events,
    clock: Clock,
    name: str,
    *,
    crash_after: list[float] | None = None,
    cleanup: float = 0.0,
) -> ChildFunction:
    """A child that logs start/stop; incarnation n crashes after ``crash_after[n-1]`` s
    (runs until cancelled when the list is exhausted); cleanup takes ``cleanup`` s."""

    async def child(ctx: ChildContext) -> None:
        events.append(("start", name, clock.now()))
        try:
            plan = crash_after or []
            if ctx.incarnation <= len(plan):
                await clock.sleep(plan[ctx.incarnation - 1])
                events.append(("crash", name, clock.now()))
                raise RuntimeError(f"{name} crash {ctx.incarnation}")
            await clock.sleep(3600)
        except asyncio.CancelledError:
            events.append(("cancelled", name, clock.now()))
            if cleanup:
                await clock.sleep(cleanup)
            events.append(("stopped", name, clock.now()))
            raise

    return child


async def test_one_for_one_restarts_only_the_crashed_child(clock: Clock) -> None:
    """A crash restarts that child at the crash time; its sibling keeps running."""
    events: Events = []
    async with Supervisor(clock=clock) as sup:
        sup.add(recorder(events, clock, "a"), name="a")
        sup.add(recorder(events, clock, "b", crash_after=[1.5]), name="b")
        await clock.sleep(4.0)
        statistics = sup.statistics()
    assert events[:4] == [
        ("start", "a", 0.0),
        ("start", "b", 0.0),
        ("crash", "b", 1.5),
        ("start", "b", 1.5),
    ]
    assert [(c.name, c.incarnation, c.restarts) for c in statistics.children] == [
        ("a", 1, 0),
        ("b", 2, 1),
    ]
    assert statistics.children[1].last_error == "RuntimeError: b crash 1"
    assert statistics.restarts == 1


async def test_intensity_escalates_on_the_crash_past_max_restarts(clock: Clock) -> None:
    """With max_restarts=2 in 10 s, crashes 1 and 2 restart; crash 3 gives up, at once."""
    events: Events = []
    with pytest.raises(SupervisorError) as caught:
        async with Supervisor(max_restarts=2, within=10, clock=clock, name="root") as sup:
            sup.add(recorder(events, clock, "w", crash_after=[1, 1, 1, 1]), name="w")
            await clock.sleep(100)
    assert clock.now() == 3.0
    assert [event for event in events if event[0] == "start"] == [
        ("start", "w", 0.0),
        ("start", "w", 1.0),
        ("start", "w", 2.0),
    ]
    error = caught.value
    assert "supervisor 'root' gave up: child 'w' ended 3 times within 10 s" in error.message
    assert "RuntimeError: w crash 3" in error.message
    assert error.code == "supervisor_gave_up"
    assert error.context["child"] == "w"
    assert error.context["errors"] == [
        "RuntimeError: w crash 1",
        "RuntimeError: w crash 2",
        "RuntimeError: w crash 3",
    ]
    assert isinstance(error.__cause__, RuntimeError)


async def test_zero_max_restarts_gives_up_on_the_first_crash(clock: Clock) -> None:
    """max_restarts=0 means the first crash is already one too many."""
    events: Events = []
    with pytest.raises(SupervisorError, match="ended 1 times"):
        async with Supervisor(max_restarts=0, clock=clock) as sup:
            sup.add(recorder(events, clock, "w", crash_after=[0.5]), name="w")
            await sup.wait()
    assert clock.now() == 0.5


async def test_restarts_older_than_the_window_stop_counting(clock: Clock) -> None:
    """OTP default (1 restart in 5 s): a crash every 5 s is restarted forever."""
    events: Events = []
    async with Supervisor(clock=clock) as sup:
        sup.add(recorder(events, clock, "w", crash_after=[5.0] * 5), name="w")
        await clock.sleep(24.0)
        assert sup.statistics().restarts == 4
    assert [at for kind, _, at in events if kind == "start"] == [0.0, 5.0, 10.0, 15.0, 20.0]


async def test_silent_child_restarted_at_exactly_heartbeat_timeout(clock: Clock) -> None:
    """A child that stops beating is cancelled and restarted heartbeat_timeout after its
    last beat, and the restarted child receives the details of that beat."""
    starts: list[tuple[int, object, float]] = []
    cancelled: list[float] = []

    async def worker(ctx: ChildContext) -> None:
        starts.append((ctx.incarnation, ctx.resume_details, clock.now()))
        offset = ctx.resume_details or 0
        try:
            for _ in range(3):
                await clock.sleep(0.5)
                offset += 1
                ctx.beat(offset)
            await clock.sleep(3600)  # hangs without beating
        except asyncio.CancelledError:
            cancelled.append(clock.now())
            raise

    async with Supervisor(max_restarts=5, within=60, clock=clock) as sup:
        sup.add(worker, name="worker", heartbeat_timeout=2.0)
        await clock.sleep(7.5)
        child = sup.statistics().children[0]
    assert cancelled == [3.5, 7.0, 7.5]  # two watchdog kills, then the shutdown
    assert starts == [(1, None, 0.0), (2, 3, 3.5), (3, 6, 7.0)]
    assert child.last_error is not None
    assert child.last_error.startswith("DeadlineExceeded: child 'worker'")


async def test_silent_child_restart_adds_the_backoff(clock: Clock) -> None:
    """With a backoff, the restart comes backoff seconds after the watchdog fired."""
    starts: list[float] = []

    async def hangs(ctx: ChildContext) -> None:
        starts.append(clock.now())
        await clock.sleep(3600)

    backoff = Retry(initial_delay=0.5, multiplier=2.0, jitter="none")
    async with Supervisor(max_restarts=5, within=60, backoff=backoff, clock=clock) as sup:
        sup.add(hangs, name="hangs", heartbeat_timeout=1.0)
        await clock.sleep(5.0)
    # silent from 0 → cancelled at 1.0, restart +0.5; silent → 2.5, restart +1.0 ...
    assert starts == [0.0, 1.5, 3.5]


async def test_backoffs_of_two_children_run_side_by_side(clock: Clock) -> None:
    """While one child waits out its backoff, another child's crash is handled at once,
    each restart at its own crash time plus backoff(restarts in the window)."""
    events: Events = []
    backoff = Retry(initial_delay=0.5, multiplier=2.0, jitter="none")
    async with Supervisor(max_restarts=5, within=60, backoff=backoff, clock=clock) as sup:
        sup.add(recorder(events, clock, "a", crash_after=[1.0]), name="a")
        sup.add(recorder(events, clock, "b", crash_after=[1.25]), name="b")
        await clock.sleep(3.0)
        states = [child.state for child in sup.statistics().children]
    assert [event for event in events if event[0] in ("crash", "start")][2:] == [
        ("crash", "a", 1.0),
        ("crash", "b", 1.25),
        ("start", "a", 1.5),  # 1.0 + backoff(1) = 0.5
        ("start", "b", 2.25),  # 1.25 + backoff(2) = 1.0
    ]
    assert states == ["running", "running"]


async def test_child_that_never_beats_is_timed_from_its_start(clock: Clock) -> None:
    """A child that never beats counts as silent from the moment it started."""
    starts: list[float] = []

    async def never_beats(ctx: ChildContext) -> None:
        starts.append(clock.now())
        await clock.sleep(3600)

    async with Supervisor(max_restarts=10, within=100, clock=clock) as sup:
        sup.add(never_beats, name="mute", heartbeat_timeout=0.75)
        await clock.sleep(2.0)
    assert starts == [0.0, 0.75, 1.5]


async def test_tick_from_a_busy_loop_keeps_the_child_alive(clock: Clock) -> None:
    """A child that calls ctx.tick() in its loop is never restarted by the watchdog."""
    starts: list[float] = []

    async def busy(ctx: ChildContext) -> None:
        starts.append(clock.now())
        while True:
            ctx.tick()  # beats at most every 0.5 s (half the timeout): 0, 0.6, 1.2...
            await clock.sleep(0.3)

    async with Supervisor(clock=clock) as sup:
        sup.add(busy, name="busy", heartbeat_timeout=1.0)
        await clock.sleep(10.0)
        assert sup.statistics().children[0].last_beat == pytest.approx(9.6)
    assert starts == [0.0]


async def test_one_for_all_sequence(clock: Clock) -> None:
    """one_for_all stops c then a (reverse order), then starts a, b, c at the crash time."""
    events: Events = []
    async with Supervisor(strategy="one_for_all", clock=clock) as sup:
        sup.add(recorder(events, clock, "a"), name="a")
        sup.add(recorder(events, clock, "b", crash_after=[1.0]), name="b")
        sup.add(recorder(events, clock, "c"), name="c")
        await clock.sleep(2.0)
        crash_handling = list(events[3:])
    assert crash_handling == [
        ("crash", "b", 1.0),
        ("cancelled", "c", 1.0),
        ("stopped", "c", 1.0),
        ("cancelled", "a", 1.0),
        ("stopped", "a", 1.0),
        ("start", "a", 1.0),
        ("start", "b", 1.0),
        ("start", "c", 1.0),
    ]


async def test_rest_for_one_restarts_the_children_started_after(clock: Clock) -> None:
    """rest_for_one: a crash of b restarts b and c, never a."""
    events: Events = []
    async with Supervisor(strategy="rest_for_one", clock=clock) as sup:
        sup.add(recorder(events, clock, "a"), name="a")
        sup.add(recorder(events, clock, "b", crash_after=[1.0]), name="b")
        sup.add(recorder(events, clock, "c"), name="c")
        await clock.sleep(2.0)
        crash_handling = list(events[3:])
        incarnations = [child.incarnation for child in sup.statistics().children]
    assert crash_handling == [
        ("crash", "b", 1.0),
        ("cancelled", "c", 1.0),
        ("stopped", "c", 1.0),
        ("start", "b", 1.0),
        ("start", "c", 1.0),
    ]
    assert incarnations == [1, 2, 2]


async def test_transient_and_temporary_children(clock: Clock) -> None:
    """transient: restarted after an error only; temporary: never; wait() ends when
    no child is left."""
    runs: dict[str, int] = {"transient": 0, "temporary": 0}

    async def transient(ctx: ChildContext) -> None:
        runs["transient"] += 1
        await clock.sleep(1.0)
        if ctx.incarnation == 1:
            raise ConnectionError("flaky")

    async def temporary(ctx: ChildContext) -> None:
        runs["temporary"] += 1
        await clock.sleep(0.5)
        raise ValueError("not restarted")

    async with Supervisor(max_restarts=3, clock=clock) as sup:
        sup.add(transient, name="transient", restart="transient")
        sup.add(temporary, name="temporary", restart="temporary")
        await sup.wait()
        assert sup.statistics().children == ()
    assert runs == {"transient": 2, "temporary": 1}
    assert clock.now() == 2.0


async def test_permanent_child_that_returns_is_restarted(clock: Clock) -> None:
    """A permanent child is restarted even after returning normally (and it counts)."""
    starts: list[float] = []

    async def returns(ctx: ChildContext) -> None:
        starts.append(clock.now())
        await clock.sleep(1.0)

    with pytest.raises(SupervisorError, match="none \\(it returned\\)"):
        async with Supervisor(max_restarts=2, within=10, clock=clock) as sup:
            sup.add(returns, name="returns")
            await sup.wait()
    assert starts == [0.0, 1.0, 2.0]
    assert clock.now() == 3.0


async def test_shutdown_in_reverse_order_with_grace(clock: Clock) -> None:
    """Shutdown stops c, b, a in turn; b overruns its 1 s grace, so a is stopped then,
    and b is still awaited before the block ends."""
    events: Events = []
    async with Supervisor(clock=clock) as sup:
        sup.add(recorder(events, clock, "a", cleanup=0.25), name="a")
        sup.add(recorder(events, clock, "b", cleanup=3.0), name="b", shutdown_timeout=1.0)
        sup.add(recorder(events, clock, "c", cleanup=0.5), name="c")
        await clock.sleep(10.0)
    assert events[3:] == [
        ("cancelled", "c", 10.0),
        ("stopped", "c", 10.5),
        ("cancelled", "b", 10.5),
        ("cancelled", "a", 11.5),
        ("stopped", "a", 11.75),
        ("stopped", "b", 13.5),
    ]
    assert clock.now() == 13.5
    assert sup.statistics().state == "closed"


async def test_giving_up_cancels_the_block(clock: Clock) -> None:
    """When the supervisor gives up, the body is interrupted at that instant."""
    events: Events = []
    reached_end = False
    with pytest.raises(SupervisorError):
        async with Supervisor(max_restarts=0, clock=clock) as sup:
            sup.add(recorder(events, clock, "w", crash_after=[2.0]), name="w")
            sup.add(recorder(events, clock, "sibling"), name="sibling")
            await clock.sleep(60)
            reached_end = True
    assert not reached_end
    assert clock.now() == 2.0
    assert ("stopped", "sibling", 2.0) in events


async def test_outside_cancellation_stops_children_and_propagates(clock: Clock) -> None:
    """Cancelling the task that runs the supervisor stops every child, then re-raises."""
    events: Events = []

    async def owner() -> None:
        async with Supervisor(clock=clock) as sup:
            sup.add(recorder(events, clock, "a"), name="a")
            await sup.wait()

    task = asyncio.create_task(owner())
    await clock.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == [("start", "a", 0.0), ("cancelled", "a", 1.0), ("stopped", "a", 1.0)]


async def test_block_error_stops_children_and_propagates(clock: Clock) -> None:
    """An error raised in the block shuts the children down and is re-raised as it is."""
    events: Events = []
    with pytest.raises(KeyError):
        async with Supervisor(clock=clock) as sup:
            sup.add(recorder(events, clock, "a"), name="a")
            await clock.sleep(1.0)
            raise KeyError("block failed")
    assert events[-1] == ("stopped", "a", 1.0)


async def test_nested_supervisor_failure_is_a_crash_for_the_parent(clock: Clock) -> None:
    """An inner supervisor that gives up is restarted by its parent, with fresh state."""
    events: Events = []
    inner = Supervisor(max_restarts=0, clock=clock, name="inner")
    inner.add(recorder(events, clock, "leaf", crash_after=[1.0, 1.0]), name="leaf")
    async with Supervisor(max_restarts=3, within=60, clock=clock, name="outer") as outer:
        outer.add(inner.run, name="inner")
        await clock.sleep(2.5)
        assert outer.statistics().restarts == 2
    # the leaf's incarnation counter restarts with the inner supervisor: it crashes
    # after 1 s each time
    assert [at for kind, _, at in events if kind == "crash"] == [1.0, 2.0]
    assert events[-1] == ("stopped", "leaf", 2.5)


async def test_add_while_running_starts_the_child(clock: Clock) -> None:
    """A child added to a running supervisor starts at once and is shut down with it."""
    events: Events = []
    async with Supervisor(clock=clock) as sup:
        await clock.sleep(1.0)
        sup.add(recorder(events, clock, "late"), name="late")
        await clock.sleep(1.0)
    assert events == [
        ("start", "late", 1.0),
        ("cancelled", "late", 2.0),
        ("stopped", "late", 2.0),
    ]


async def test_supervisor_can_run_again_after_closing(clock: Clock) -> None:
    """A closed supervisor can be entered again; it starts its children afresh."""
    events: Events = []
    sup = Supervisor(clock=clock)
    sup.add(recorder(events, clock, "a"), name="a")
    for _ in range(2):
        async with sup:
            await clock.sleep(1.0)
    assert [event for event in events if event[0] == "start"] == [
        ("start", "a", 0.0),
        ("start", "a", 1.0),
    ]


async def test_wait_before_start_and_add_during_shutdown_are_refused(clock: Clock) -> None:
    """wait() before the supervisor runs is a ClosedResourceError, as is add() while it
    shuts down."""
    sup = Supervisor(clock=clock)
    with pytest.raises(ClosedResourceError, match="before it started"):
        await sup.wait()
    refused: list[BaseException] = []

    async def adds_on_shutdown(ctx: ChildContext) -> None:
        try:
            await clock.sleep(3600)
        except asyncio.CancelledError:
            try:
                sup.add(adds_on_shutdown, name="another")
            except ClosedResourceError as exc:
                refused.append(exc)
            raise

    async with sup:
        sup.add(adds_on_shutdown, name="first")
        await clock.sleep(1.0)
    assert len(refused) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "all_for_none"}, "strategy='all_for_none'"),
        ({"max_restarts": -1}, "max_restarts=-1"),
        ({"within": 0}, "within=0"),
        ({"backoff": 1.0}, "backoff=1.0"),
    ],
)
def test_bad_supervisor_configuration(kwargs: dict[str, object], match: str) -> None:
    """Invalid supervisor settings raise ConfigurationError naming the input."""
    with pytest.raises(ConfigurationError, match=match):
        Supervisor(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name=''"),
        ({"name": "x", "restart": "sometimes"}, "restart='sometimes'"),
        ({"name": "x", "heartbeat_timeout": 0}, "heartbeat_timeout=0"),
        ({"name": "x", "shutdown_timeout": -1}, "shutdown_timeout=-1"),
        ({"name": "dup"}, "has one already"),
    ],
)
def test_bad_child_configuration(kwargs: dict[str, object], match: str) -> None:
    """Invalid child settings, or a duplicate name, raise ConfigurationError."""

    async def child(ctx: ChildContext) -> None:
        return None

    sup = Supervisor()
    sup.add(child, name="dup")
    with pytest.raises(ConfigurationError, match=match):
        sup.add(child, **kwargs)  # type: ignore[arg-type]


def test_heartbeat_timeout_error_is_a_deadline() -> None:
    """The error recorded for a silent child is a DeadlineExceeded (a TimeoutError)."""
    assert issubclass(DeadlineExceeded, TimeoutError)


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
    plans=st.lists(st.lists(st.integers(1, 20), max_size=4), min_size=1, max_size=3),
    cancel_at=st.integers(1, 60),
    max_restarts=st.integers(0, 4),
)
def test_cancelling_a_supervisor_at_any_time_stops_every_child(
    strategy: str, plans: list[list[int]], cancel_at: int, max_restarts: int
) -> None:
    """Whatever crashes happen and whenever the owner is cancelled, every incarnation
    that started has ended (crashed or stopped) and no task is left (``run`` checks).

    Crash delays are whole seconds and the cancellation comes at a half second.
    """
    clock = VirtualClock()
    events: Events = []

    async def main() -> str:
        async def owner() -> None:
            async with Supervisor(
                strategy=strategy,  # type: ignore[arg-type]
                max_restarts=max_restarts,
                within=10,
                clock=clock,
            ) as sup:
                for index, plan in enumerate(plans):
                    name = f"c{index}"
                    sup.add(
                        recorder(events, clock, name, crash_after=[float(s) for s in plan]),
                        name=name,
                    )
                await sup.wait()

        task = asyncio.create_task(owner())
        clock.call_at(cancel_at + 0.5, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except SupervisorError:
            return "gave up"
        return "finished"

    outcome = run(main, clock=clock)
    assert outcome in ("cancelled", "gave up")
    starts = sum(1 for kind, _, _ in events if kind == "start")
    ends = sum(1 for kind, _, _ in events if kind in ("crash", "stopped"))
    assert starts == ends
    if outcome == "cancelled":
        assert clock.now() == cancel_at + 0.5


@pytest.mark.real_time
async def test_watchdog_on_the_real_clock() -> None:
    """On a real loop, a silent child is restarted after its heartbeat timeout (tolerant:
    timeout 50 ms; the restart must come after it and well before 1 s)."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    restarted = asyncio.Event()

    async def hangs(ctx: ChildContext) -> None:
        starts.append(loop.time())
        if ctx.incarnation == 2:
            restarted.set()
        ctx.beat()
        await asyncio.sleep(3600)

    async with Supervisor() as sup:
        sup.add(hangs, name="hangs", heartbeat_timeout=0.05)
        await asyncio.wait_for(restarted.wait(), timeout=5.0)
    assert 0.05 <= starts[1] - starts[0] < 1.0

"""A steward (Supervisor) keeping a flaky poller alive, resuming from its checkpoint.

    python examples/steward.py [--duration 3] [--seed 7]

The poller reads a feed in pages from an offset and beats after every page with the
offset it reached (its checkpoint). It is flaky on purpose: now and then a page fails
with ``ConnectionError`` (the poller crashes), and now and then the poller hangs
forever without raising (a lost wake-up, a stuck socket). The supervisor restarts it
after a crash, and after ``heartbeat_timeout`` seconds of silence when it hangs; every
new incarnation starts from ``ctx.resume_details``, the offset of the last beat, so
nothing is skipped (a page may be read twice: at-least-once).

The script runs for ``--duration`` seconds, shuts the steward down, checks that every
item up to the last offset was processed, and prints the timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time

from headrace import ChildContext, Retry, Supervisor

PAGE = 10


async def main(duration: float, seed: int) -> None:
    rng = random.Random(seed)
    processed: set[int] = set()
    started = time.monotonic()
    timeline: list[str] = []

    def note(message: str) -> None:
        line = f"{time.monotonic() - started:6.3f}s  {message}"
        timeline.append(line)
        print(line)

    async def poller(ctx: ChildContext) -> None:
        offset = ctx.resume_details or 0
        why = f" (after {type(ctx.previous_error).__name__})" if ctx.previous_error else ""
        note(f"poller #{ctx.incarnation} starts at offset {offset}{why}")
        while True:
            await asyncio.sleep(0.02)  # the round trip of one page
            roll = rng.random()
            if roll < 0.03:
                note(f"poller #{ctx.incarnation} hangs at offset {offset}")
                await asyncio.Event().wait()  # never set: only the watchdog can help
            if roll < 0.08:
                raise ConnectionError(f"feed reset at offset {offset}")
            processed.update(range(offset, offset + PAGE))
            offset += PAGE
            ctx.beat(offset)  # alive, and this is where to resume

    steward = Supervisor(
        max_restarts=10,
        within=1.0,
        backoff=Retry(initial_delay=0.01, max_delay=0.1, jitter="full"),
        name="steward",
    )
    steward.add(poller, name="poller", heartbeat_timeout=0.25)
    async with steward:
        await asyncio.sleep(duration)
        statistics = steward.statistics()
    child = statistics.children[0]
    last_offset = max(processed) + 1 if processed else 0
    missing = set(range(last_offset)) - processed
    note(
        f"steward stopped: {statistics.restarts} restarts, poller incarnation "
        f"{child.incarnation}, last error {child.last_error!r}"
    )
    note(f"processed items 0..{last_offset - 1}, missing: {sorted(missing)[:5] or 'none'}")
    assert not missing, "a restarted poller must resume from its checkpoint"
    assert statistics.restarts > 0, "the poller is flaky: the steward should have had work"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a steward keeping a flaky poller alive")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds to run")
    parser.add_argument("--seed", type=int, default=7)
    arguments = parser.parse_args()
    # The supervisor logs each crash with its traceback; one line each is enough here.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("headrace.supervise").setLevel(logging.ERROR)
    asyncio.run(main(arguments.duration, arguments.seed))

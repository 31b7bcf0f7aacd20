"""Re-send failed events from a SQLite table to an HTTP endpoint: a headrace batch job.

The situation (from the batch-pipeline talk in ../shared/seeds): a downstream service
was down for an hour, and the events it rejected sit in a ``failed_events`` table.
Once it is back, re-send them: fast (many requests in flight), politely (a rate
limit the service can take), patiently (retry 503s with backoff), and without losing
anything (events the service rejects for good go to a ``dead_letters`` table). Sent
events are marked in batches. Ctrl-C stops cleanly: in-flight requests are cancelled,
no task is left behind, and what was marked sent stays marked; events sent but not yet
marked are sent again by the next run (at-least-once, so the receiver should
deduplicate by event id).

To be self-contained it creates the database and starts the "service" itself, on
127.0.0.1 with a free port; the service answers 503 to a random tenth of requests
and 400 to events whose payload is malformed. Finishes in a few seconds::

    python examples/batch_resend.py [--events 2000] [--rate 1000] [--db PATH] [--no-progress]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from headrace import FailedItem, HttpStatusError, Pipeline, Retry, TokenBucket

# -- the database ---------------------------------------------------------------------


def create_database(path: Path, events: int, seed: int = 7) -> None:
    """A ``failed_events`` table with ``events`` rows, 1 in 50 with a broken payload."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as db:
        # WAL: the job's reader and its writers (mark sent, dead letters) never block
        # each other.
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(
            """
            DROP TABLE IF EXISTS failed_events;
            DROP TABLE IF EXISTS dead_letters;
            CREATE TABLE failed_events (
                id INTEGER PRIMARY KEY, payload TEXT NOT NULL, sent_at REAL
            );
            CREATE TABLE dead_letters (
                event_id INTEGER PRIMARY KEY, stage TEXT, error TEXT
            );
            """
        )
        rows = []
        for event_id in range(1, events + 1):
            body: Any = {"order": event_id, "amount": rng.randint(1, 500)}
            payload = json.dumps(body) if rng.random() > 0.02 else "{not json"
            rows.append((event_id, payload))
        db.executemany("INSERT INTO failed_events (id, payload) VALUES (?, ?)", rows)


def unsent_events(path: Path, page: int = 500) -> Iterator[tuple[int, str]]:
    """Stream the events not yet sent, in id order, a page at a time (keyset
    pagination: no read transaction stays open while the job runs)."""
    db = sqlite3.connect(path)
    try:
        last_id = 0
        while True:
            rows = db.execute(
                "SELECT id, payload FROM failed_events WHERE sent_at IS NULL AND id > ? "
                "ORDER BY id LIMIT ?",
                (last_id, page),
            ).fetchall()
            if not rows:
                return
            yield from rows
            last_id = rows[-1][0]
    finally:
        db.close()


def count_unsent(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(
            db.execute("SELECT count(*) FROM failed_events WHERE sent_at IS NULL").fetchone()[0]
        )


def mark_sent(path: Path, event_ids: list[int]) -> int:
    """Mark a batch as sent in one transaction (runs in a worker thread)."""
    with sqlite3.connect(path) as db:
        db.executemany(
            "UPDATE failed_events SET sent_at = julianday('now') WHERE id = ?",
            [(event_id,) for event_id in event_ids],
        )
    return len(event_ids)


def record_dead_letter(path: Path, failed: FailedItem) -> None:
    event_id, _payload = failed.item
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT OR REPLACE INTO dead_letters (event_id, stage, error) VALUES (?, ?, ?)",
            (event_id, failed.stage, f"{type(failed.error).__name__}: {failed.error}"),
        )


# -- the downstream service --------------------------------------------------------------


async def start_service(seed: int = 11) -> tuple[web.AppRunner, str, dict[str, int]]:
    """A local endpoint that is flaky (503) and strict (400 on bad JSON)."""
    rng = random.Random(seed)
    counts = {"received": 0, "accepted": 0, "unavailable": 0, "rejected": 0}

    async def receive(request: web.Request) -> web.Response:
        counts["received"] += 1
        await asyncio.sleep(rng.random() * 0.01)  # a little service time
        if rng.random() < 0.10:
            counts["unavailable"] += 1
            return web.Response(status=503, text="try again")
        try:
            text = await request.text()
        except ConnectionResetError:  # the client went away (Ctrl-C): nothing to answer
            return web.Response(status=499)
        try:
            json.loads(text)
        except ValueError:
            counts["rejected"] += 1
            return web.Response(status=400, text="malformed payload")
        counts["accepted"] += 1
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/events", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/events", counts


# -- the job ------------------------------------------------------------------------------


async def resend(path: Path, url: str, *, rate: float, progress: bool) -> dict[str, Any]:
    total = count_unsent(path)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:

        async def send(event: tuple[int, str]) -> int:
            event_id, payload = event
            async with session.post(
                url, data=payload, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()  # always read, so the connection is reused
                if response.status >= 400:
                    # 5xx may pass next time (retried); 4xx will not (dead-lettered).
                    raise HttpStatusError(
                        f"POST {url} -> {response.status} for event {event_id}",
                        context={"status": response.status, "event_id": event_id},
                        transient=response.status >= 500,
                    )
            return event_id

        def dead_letter(failed: FailedItem) -> None:
            record_dead_letter(path, failed)

        def mark(event_ids: list[int]) -> int:
            return mark_sent(path, event_ids)

        pipeline = (
            Pipeline(unsent_events(path))
            .rate_limit(TokenBucket(rate, 50), name="rate limit")
            .map(
                send,
                workers=32,
                ordered=False,
                timeout=2.0,
                retry=Retry(max_attempts=5, initial_delay=0.05, max_delay=1.0),
                on_error=dead_letter,
                name="send",
            )
            .batch(200, max_wait=0.5)
            .map(mark, name="mark sent")  # sync: runs in a thread, off the loop
        )
        stats = await pipeline.run(progress=progress, total=None)
    send_stats = stats.stage("send")
    return {
        "events": total,
        "sent": send_stats.items_out,
        "dead_lettered": send_stats.errors,
        "retries": send_stats.retries,
        "elapsed_s": round(stats.elapsed, 2),
    }


async def main(args: argparse.Namespace) -> None:
    path = Path(args.db)
    create_database(path, args.events)
    runner, url, counts = await start_service()
    try:
        summary = await resend(path, url, rate=args.rate, progress=not args.no_progress)
    finally:
        await runner.cleanup()
    with sqlite3.connect(path) as db:
        left = db.execute("SELECT count(*) FROM failed_events WHERE sent_at IS NULL").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    summary.update(service=counts, unsent_rows=left, dead_letter_rows=dead)
    print(json.dumps(summary, indent=2))
    # Every event is either marked sent or dead-lettered: nothing lost.
    assert left == dead, (left, dead)
    assert summary["sent"] + summary["dead_lettered"] == summary["events"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--db", default=str(Path(tempfile.gettempdir()) / "headrace_resend.db"))
    parser.add_argument("--no-progress", action="store_true")
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        # asyncio.run cancelled the job: the pipeline cancelled and awaited every
        # stage, the service was shut down, and rows already marked stay marked.
        print("interrupted; run again to send the rest")
        sys.exit(130)

"""The ``headrace`` command: run a worker or a pipeline, publish, inspect queues and dead letters.

::

    headrace run examples/resend_app.py:pipeline --total 2000
    headrace worker examples/worker_app.py:worker --broker sqlite:///jobs.db
    headrace worker myapp.tasks:worker --exit-when-idle 5
    headrace publish orders '{"id": 1}' '{"id": 2}' --broker sqlite:///jobs.db
    echo '{"id": 3}' | headrace publish orders --stdin
    headrace dlq list orders --limit 20 [--json]
    headrace dlq replay orders [--id 17 --id 18]
    headrace stats orders emails [--json] [--watch 2]

The broker URL comes from ``--broker`` or the ``HEADRACE_BROKER_URL`` environment
variable. Exit status: 0 on success and on a worker's clean stop by signal, 1 when an
operation failed, 2 for a usage error; a pipeline stopped by a signal before its end
exits 128 + the signal's number (130 for Ctrl-C), since its job is not done.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, HeadraceError, redact

if TYPE_CHECKING:
    from .messaging import Broker

__all__ = ["load_pipeline", "load_worker", "main"]


def _broker_url(arguments: argparse.Namespace, *, required: bool = True) -> str | None:
    url: str | None = arguments.broker or os.environ.get("HEADRACE_BROKER_URL")
    if url is None and required:
        raise ConfigurationError(
            "no broker: pass --broker URL (e.g. sqlite:///jobs.db) or set HEADRACE_BROKER_URL"
        )
    return url


def _load_target(target: str, what: str, default_attribute: str) -> Any:
    """Import ``module.path:attribute`` or ``path/to/file.py:attribute``; the attribute."""
    location, _, attribute = target.partition(":")
    attribute = attribute or default_attribute
    if location.endswith(".py") or os.sep in location:
        path = Path(location).resolve()
        if not path.is_file():
            raise ConfigurationError(f"{what} target {target!r}: no file {str(path)!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"{what} target {target!r}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(location)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"{what} target {target!r}: module {module.__name__!r} has no {attribute!r}"
        ) from None


def load_worker(target: str) -> Any:
    """Import ``module.path:attribute`` or ``path/to/file.py:attribute`` (default
    attribute ``worker``); call it if it is a factory rather than a worker."""
    from .messaging._worker import Worker

    found = _load_target(target, "worker", "worker")
    if not isinstance(found, Worker) and callable(found):
        found = found()
    if not isinstance(found, Worker):
        raise ConfigurationError(
            f"worker target {target!r} is a {type(found).__name__}, not a headrace Worker"
        )
    return found


async def load_pipeline(target: str) -> Any:
    """Import ``module.path:attribute`` or ``path/to/file.py:attribute`` (default
    attribute ``pipeline``): a :class:`~headrace.Pipeline`, or a function that builds
    one (called without arguments; it may be async, e.g. to open a database first)."""
    from ._pipeline import Pipeline

    found = _load_target(target, "pipeline", "pipeline")
    if not isinstance(found, Pipeline) and callable(found):
        found = found()
        if asyncio.iscoroutine(found):
            found = await found
    if not isinstance(found, Pipeline):
        raise ConfigurationError(
            f"pipeline target {target!r} is a {type(found).__name__}, not a headrace Pipeline"
        )
    return found


async def _run_pipeline(arguments: argparse.Namespace) -> int:
    """Run a pipeline to its end with progress; SIGINT/SIGTERM cancel it (every stage
    stops, no task is left) and the command reports how far it got."""
    pipeline = await load_pipeline(arguments.target)
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(
        pipeline.run(progress=not arguments.no_progress, total=arguments.total),
        name="headrace run",
    )
    stopped_by: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        run.cancel()

    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, stop, signum)
    try:
        try:
            statistics = await run
        except asyncio.CancelledError:
            if not stopped_by:
                raise
            statistics = pipeline.statistics()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    for stage in statistics.stages:
        print(
            f"  {stage.name}: in {stage.items_in:,}  out {stage.items_out:,}  "
            f"errors {stage.errors:,}  retries {stage.retries:,}",
            file=sys.stderr,
        )
    rate = statistics.items_out / statistics.elapsed if statistics.elapsed > 0 else 0.0
    if stopped_by:
        name = stopped_by[0].name
        print(
            f"stopped by {name} after {statistics.items_out:,} item(s) in "
            f"{statistics.elapsed:.1f} s: the job did not finish",
            file=sys.stderr,
        )
        return 128 + int(stopped_by[0])
    print(
        f"done: {statistics.items_out:,} item(s) in {statistics.elapsed:.1f} s "
        f"({rate:,.0f}/s), {len(statistics.failures):,} skipped",
        file=sys.stderr,
    )
    return 0


async def _run_worker(arguments: argparse.Namespace) -> int:
    from .messaging._worker._progress import Progress

    worker = load_worker(arguments.target)
    url = _broker_url(arguments, required=False)
    if url is not None:
        worker.use_broker(url)
    if arguments.shutdown_timeout is not None:
        worker.shutdown_timeout = arguments.shutdown_timeout
    if arguments.no_progress:
        await worker.run(exit_when_idle=arguments.exit_when_idle)
        return 0
    live = None if not arguments.plain else False
    async with Progress(worker, live=live, interval=arguments.progress_interval):
        await worker.run(exit_when_idle=arguments.exit_when_idle)
    return 0


async def _publish(arguments: argparse.Namespace) -> int:
    from .messaging._producer import Producer

    url = _broker_url(arguments)
    assert url is not None
    headers = {}
    for item in arguments.header or []:
        name, separator, value = item.partition("=")
        if not separator:
            raise ConfigurationError(f"--header {item!r} must be name=value")
        headers[name] = value
    bodies: list[str] = list(arguments.body or [])
    if arguments.stdin:
        bodies.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
    if not bodies:
        raise ConfigurationError("nothing to publish: give BODY arguments or --stdin")
    producer = Producer(url)
    try:
        for _ in range(arguments.repeat):
            for body in bodies:
                await producer.publish(arguments.topic, body, key=arguments.key, headers=headers)
    finally:
        report = await producer.close(raise_on_failure=False)
    print(f"published {report.confirmed} message(s) to {arguments.topic!r}", file=sys.stderr)
    for failure in report.failures:
        print(f"failed: {failure.error}", file=sys.stderr)
    return 1 if report.failures else 0


@asynccontextmanager
async def _connected_broker(arguments: argparse.Namespace) -> AsyncIterator[Broker]:
    from .messaging._url import open_broker

    url = _broker_url(arguments)
    assert url is not None
    broker = open_broker(url)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


async def _dlq(arguments: argparse.Namespace) -> int:
    import msgspec

    async with _connected_broker(arguments) as broker:
        if arguments.dlq_command == "list":
            letters = await broker.dead_letters(arguments.topic, limit=arguments.limit)
            for letter in letters:
                error = letter.error
                if arguments.json:
                    record = {
                        "id": letter.message.id,
                        "topic": letter.message.topic,
                        "attempt": letter.message.attempt,
                        "key": letter.message.key,
                        "body": letter.message.body.decode("utf-8", "backslashreplace"),
                        "dead_lettered_at": letter.dead_lettered_at,
                        "error": dict(error),
                    }
                    print(msgspec.json.encode(record).decode())
                else:
                    print(
                        f"{letter.message.id}\tattempt {letter.message.attempt}\t"
                        f"{error.get('code')}\t{error.get('error_id')}\t"
                        f"{str(error.get('message', ''))[:120]}"
                    )
            print(f"{len(letters)} dead letter(s) in {arguments.topic!r}", file=sys.stderr)
        else:
            count = await broker.replay_dead_letters(arguments.topic, arguments.id or None)
            print(f"replayed {count} dead letter(s) to {arguments.topic!r}", file=sys.stderr)
    return 0


async def _stats(arguments: argparse.Namespace) -> int:
    import msgspec

    async with _connected_broker(arguments) as broker:
        while True:
            snapshot = [await broker.topic_stats(topic) for topic in arguments.topic]
            if arguments.json:
                for stats in snapshot:
                    record = {
                        "topic": stats.topic,
                        "ready": stats.ready,
                        "delayed": stats.delayed,
                        "in_flight": stats.in_flight,
                        "dead_letters": stats.dead_letters,
                    }
                    print(msgspec.json.encode(record).decode(), flush=True)
            else:
                width = max(5, *(len(topic) for topic in arguments.topic))
                print(
                    f"{'topic':<{width}}  {'ready':>10}  {'delayed':>10}  {'in flight':>10}  "
                    f"{'dead':>10}"
                )
                for stats in snapshot:
                    print(
                        f"{stats.topic:<{width}}  {stats.ready:>10,}  {stats.delayed:>10,}  "
                        f"{stats.in_flight:>10,}  {stats.dead_letters:>10,}",
                        flush=True,
                    )
            if arguments.watch is None:
                return 0
            await asyncio.sleep(arguments.watch)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headrace",
        description="Run pipelines and message workers, and inspect their queues.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run a Pipeline to its end, with progress (Ctrl-C stops it cleanly)"
    )
    run.add_argument("target", help="module:attribute or path/to/file.py:attribute")
    run.add_argument("--total", type=int, help="items expected at the end (for an ETA)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")

    worker = commands.add_parser("worker", help="run a Worker until SIGINT/SIGTERM")
    worker.add_argument("target", help="module:attribute or path/to/file.py:attribute")
    worker.add_argument("--broker", help="broker URL (overrides the worker's own)")
    worker.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="stop once the queues were empty and nothing was in flight this long",
    )
    worker.add_argument("--shutdown-timeout", type=float, metavar="SECONDS")
    worker.add_argument("--no-progress", action="store_true", help="no progress output")
    worker.add_argument("--plain", action="store_true", help="log lines, not a live display")
    worker.add_argument("--progress-interval", type=float, metavar="SECONDS")

    publish = commands.add_parser("publish", help="publish messages")
    publish.add_argument("topic")
    publish.add_argument("body", nargs="*", help="message bodies (text)")
    publish.add_argument("--stdin", action="store_true", help="one body per line of stdin")
    publish.add_argument("--key")
    publish.add_argument("--header", action="append", metavar="NAME=VALUE")
    publish.add_argument("--repeat", type=int, default=1, help="publish the bodies N times")
    publish.add_argument("--broker")

    dlq = commands.add_parser("dlq", help="inspect or replay dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_commands.add_parser("list", help="show the newest dead letters")
    listing.add_argument("topic")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--broker")
    replay = dlq_commands.add_parser("replay", help="publish dead letters again")
    replay.add_argument("topic")
    replay.add_argument("--id", action="append", help="only these message ids")
    replay.add_argument("--broker")

    stats = commands.add_parser(
        "stats", help="count ready, delayed, in-flight and dead-lettered messages per topic"
    )
    stats.add_argument("topic", nargs="+")
    stats.add_argument("--json", action="store_true", help="one JSON object per topic and line")
    stats.add_argument(
        "--watch", type=float, metavar="SECONDS", help="print again every SECONDS until Ctrl-C"
    )
    stats.add_argument("--broker")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``headrace`` command; returns the exit status."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    runner = {
        "run": _run_pipeline,
        "worker": _run_worker,
        "publish": _publish,
        "dlq": _dlq,
        "stats": _stats,
    }[arguments.command]
    try:
        return asyncio.run(runner(arguments))
    except HeadraceError as error:
        print(f"headrace: error: {redact(error.message)} [{error.code}]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A Ctrl-C outside the worker's own signal handling (e.g. while publishing).
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

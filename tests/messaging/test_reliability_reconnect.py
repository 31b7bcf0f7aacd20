"""R4 of BENCHMARKS.md: the broker restarts or the connection drops mid-run.

A real worker process (``_apps/reliability_worker.py``) consumes 5,000 messages
through :class:`~._apps.tcp_proxy.ChaosProxy`, which resets every proxied connection
three times under load (a dropped connection: whatever command was in flight fails,
its reply lost), then plays one outage of ``OUTAGE`` seconds, then resets everything
twice more; once the worker idles (in its blocking read) everything is cut twice
again and 500 more messages are published. The outage is one of:

* ``reset``: the machine's Redis behind the proxy, every new connection reset at
  once (a server being restarted, from the client's side);
* ``blackhole``: open connections stall and new ones are never answered (a hung
  server or a partition; short socket timeouts so that they time out meanwhile);
* ``restart``: a private redis-server of the test's own is really stopped and
  started again (append-only file, so Redis keeps what it acknowledged); the
  restarted server has no scripts (``NOSCRIPT``). The machine's Redis service is
  never restarted.

Then, counted from the outside as in ``test_reliability.py``: every message handled
at least once and acked (the group holds nothing pending, nothing undelivered); the
worker survived it and exits 0 on SIGTERM; duplicates within the in-flight window per
failure; and during the outage the worker retried its fetch with backoff (a handful
of attempts, each delay at least the one before, not a hot loop).

The SQLite analogue: another process holds the database's write lock for longer than
a fetch (and, in one case, longer than the broker's busy timeout); the worker keeps
going and loses nothing. PostgreSQL goes through the same proxy (``reset`` and
``blackhole``; the machine's server is never restarted), its work and LISTEN
connections cut alike; so do NATS JetStream and RabbitMQ (``reset``: on RabbitMQ
every cut returns the channel's unacked deliveries, so duplicates are expected there,
within the in-flight window per failure). Focused regressions for the Redis adapter's fixes follow.

Counts are printed (``pytest -s``) for the issue's closing note. Trial counts are
small for CI; set ``HEADRACE_RELIABILITY_TRIALS`` for more.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from headrace import BrokerConnectionError
from headrace.messaging import Broker, OutgoingMessage, open_broker
from headrace.testing import service_available

from ._apps.tcp_proxy import ChaosProxy

pytestmark = [pytest.mark.slow, pytest.mark.real_time]

APP = Path(__file__).parent / "_apps" / "reliability_worker.py"
TRIALS = int(os.environ.get("HEADRACE_RELIABILITY_TRIALS", "2"))
MESSAGES = 5_000
# Published once the worker idles after the chaos (its blocking reads cut twice).
EXTRA = 500
CONCURRENCY = 16
ACK_BATCH = 100
# Fetched-but-unacked at any instant: handlers, prefetched messages, an ack batch.
WINDOW = CONCURRENCY + max(0, ACK_BATCH - CONCURRENCY) + ACK_BATCH
# A short lease so that a delivery whose reply was lost comes back within the test.
LEASE = 3.0
OUTAGE = 1.5
CUTS_BEFORE, CUTS_AFTER = 3, 2
# The worker of every R4 scenario: 16 handlers of 20 ms, short leases, ready once
# 200 messages were handled (under load).
UNDER_LOAD = ("--concurrency", str(CONCURRENCY), "--work-ms", "20", "--lease", str(LEASE),
              "--ready-after", "200")  # fmt: skip
FETCH_FAILED = re.compile(r"fetch from 'load' failed .*; retrying in ([0-9.]+) s")


@dataclass
class Worker:
    """A worker subprocess whose stderr lines are timestamped as they arrive."""

    process: asyncio.subprocess.Process
    log: list[tuple[float, str]] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, url: str, effects: Path, *args: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(APP),
            "--broker",
            url,
            "--effects",
            str(effects),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        worker = cls(process)
        assert process.stdout is not None
        assert process.stderr is not None
        worker.readers = [
            asyncio.create_task(worker._read_stdout(process.stdout)),
            asyncio.create_task(worker._read_stderr(process.stderr)),
        ]
        return worker

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode().rstrip("\n")
            self.out.append(text)
            if text == "READY":
                self.ready.set()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log.append((time.time(), line.decode().rstrip("\n")))

    def stderr(self) -> str:
        return "\n".join(text for _, text in self.log)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        waiter = asyncio.ensure_future(self.ready.wait())
        exited = asyncio.ensure_future(self.process.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            waiter.cancel()
            exited.cancel()
            await asyncio.gather(waiter, exited, return_exceptions=True)
        assert self.ready.is_set(), f"worker never became ready: {self.stderr()[-3000:]}"

    async def stop(self, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
        """SIGTERM; wait for the exit code and the worker's final statistics."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.gather(*self.readers)
        stats: dict[str, Any] = {}
        for line in self.out:
            if line.startswith("STATS "):
                stats = json.loads(line[6:])
        return code, stats

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    def fetch_failures(self, start: float, end: float) -> list[float]:
        """The retry delays the worker logged for fetches that failed in [start, end]."""
        return [
            float(match.group(1))
            for at, text in self.log
            if start <= at <= end and (match := FETCH_FAILED.search(text))
        ]

    def count(self, needle: str) -> int:
        return sum(1 for _, text in self.log if needle in text)


def effects(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as connection:
        return [
            (row[0], row[1])
            for row in connection.execute("SELECT message_id, attempt FROM effects")
        ]


async def publish(url: str, count: int) -> list[str]:
    broker: Broker = open_broker(url)
    await broker.connect()
    try:
        ids: list[str] = []
        for start in range(0, count, 500):
            chunk = [OutgoingMessage(b"job %d" % i) for i in range(start, min(count, start + 500))]
            ids.extend(await broker.publish("load", chunk))
        return ids
    finally:
        await broker.close()


async def stored(url: str) -> int:
    """Messages of 'load' not yet settled as the broker counts them, read directly."""
    broker: Broker = open_broker(url)
    await broker.connect()
    try:
        return (await broker.topic_stats("load")).stored
    finally:
        await broker.close()


async def leftovers(url: str) -> tuple[int, int]:
    """(deliverable now, dead letters) on a broker: what a fresh consumer would get."""
    broker: Broker = open_broker(url)
    await broker.connect()
    try:
        found = 0
        while batch := await broker.fetch("load", 1000, timeout=0, lease=LEASE):
            found += len(batch)
        return found, len(await broker.dead_letters("load", limit=100_000))
    finally:
        await broker.close()


@dataclass
class Chaos:
    """What :func:`play_chaos` did: the outage's span, the connections cut while the
    worker idled, the worker's exit code and final statistics, and the effects."""

    start: float
    end: float
    idle_cut: int
    code: int
    stats: dict[str, Any]
    rows: list[tuple[str, int]]

    def counted(self, ids: list[str]) -> tuple[Counter[str], set[str], int]:
        """(handled count per message id, lost ids, duplicate effects)."""
        counts = Counter(message_id for message_id, _ in self.rows)
        return counts, set(ids) - set(counts), sum(n - 1 for n in counts.values())


async def play_chaos(
    proxy: ChaosProxy,
    url: str,
    effects_path: Path,
    ids: list[str],
    *,
    outage: Any,
    settled: Any,
    publish_more: Any,
) -> tuple[Chaos, Worker]:
    """Run a worker on ``url`` (through ``proxy``) and play R4's script: cuts under
    load, ``await outage()`` (returns its (start, end)), more cuts, wait until every
    message in ``ids`` is handled and ``await settled()``; then cut the idle worker's
    connections twice, ``ids += await publish_more()``, wait again, SIGTERM."""
    worker = await Worker.start(url, effects_path, *UNDER_LOAD)

    async def settled_and_handled() -> bool:
        assert worker.process.returncode is None, worker.stderr()[-3000:]
        if not set(ids) <= {message_id for message_id, _ in effects(effects_path)}:
            return False
        return bool(await settled())

    try:
        await worker.wait_ready()
        for _ in range(CUTS_BEFORE):
            await asyncio.sleep(0.5)
            proxy.cut_all()
        await asyncio.sleep(0.5)
        start, end = await outage()
        for _ in range(CUTS_AFTER):
            await asyncio.sleep(0.5)
            proxy.cut_all()
        await wait_until(settled_and_handled, 60, "every message handled and acked")
        # Idle now: the worker waits for news. Cut that twice, then publish more.
        idle_cut = 0
        for _ in range(2):
            await asyncio.sleep(0.6)
            idle_cut += proxy.cut_all()
        ids += await publish_more()
        await wait_until(
            settled_and_handled,
            60,
            "the messages published after the idle cuts handled and acked",
        )
        code, stats = await worker.stop()
    finally:
        await worker.kill()
    return Chaos(start, end, idle_cut, code, stats, effects(effects_path)), worker


# -- Redis -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupState:
    pending: int
    undelivered: bool
    delayed: int
    returned: int

    @property
    def settled(self) -> bool:
        return not (self.pending or self.undelivered or self.delayed or self.returned)


@pytest.fixture
def redis_target(redis_url: str) -> Iterator[tuple[str, str]]:
    """(redis URL, fresh key prefix); the prefix's keys are deleted afterwards."""
    prefix = f"hr-r4-{uuid.uuid4().hex[:8]}:"
    yield redis_url, prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


async def group_state(redis_url: str, prefix: str) -> GroupState:
    stream = f"{prefix}load"
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        info = await client.xinfo_stream(stream)
        [group] = [g for g in await client.xinfo_groups(stream) if g["name"] == "headrace"]
        return GroupState(
            pending=int(group["pending"]),
            undelivered=group["last-delivered-id"] != info["last-generated-id"],
            delayed=int(await client.zcard(stream + ":delayed")),
            returned=int(await client.zcard(stream + ":returned")),
        )
    finally:
        await client.aclose()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of the test's own on a free port (never the machine's service),
    so that it can really be restarted. Every write is fsynced to its append-only file
    first (``appendfsync always``), so a restart keeps everything Redis acknowledged:
    what the test then measures is the client's recovery, not Redis's durability."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.process.wait)
        self.process = None

    async def restart(self, down: float) -> tuple[float, float]:
        """Stop (SIGTERM), stay down ``down`` seconds, start; the (start, end) of the
        outage in ``time.time()`` seconds, end being when it accepts again."""
        start = time.time()
        await self.stop()
        await asyncio.sleep(down)
        self.spawn()
        await self.wait_up()
        return start, time.time()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.spawn()
    deadline = time.monotonic() + 10
    while not service_available("127.0.0.1", server.port, timeout=0.1):
        assert time.monotonic() < deadline, "private redis-server did not start"
        time.sleep(0.02)
    yield server
    server.kill()


@dataclass(frozen=True)
class Target:
    """Where the worker's Redis lives: the admin URL (direct) and the key prefix."""

    mode: str
    url: str
    prefix: str
    port: int
    server: PrivateRedis | None = None

    @property
    def broker_url(self) -> str:
        return f"{self.url}?prefix={self.prefix}"


@pytest.fixture(params=["reset", "blackhole", "restart"])
def target(request: pytest.FixtureRequest) -> Target:
    """``reset``/``blackhole``: the machine's Redis behind a proxy that plays the
    outage; ``restart``: a private redis-server, really stopped and started again."""
    if request.param == "restart":
        server: PrivateRedis = request.getfixturevalue("private_redis")
        return Target("restart", server.url, "hr-r4:", server.port, server)
    url, prefix = request.getfixturevalue("redis_target")
    return Target(request.param, url, prefix, 6379)


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.timeout(150)
async def test_r4_redis_connection_drops_and_outage_lose_nothing(
    target: Target, tmp_path: Path, trial: int
) -> None:
    """R4 on Redis: connections cut mid-command, an outage (refused, hung, or a real
    restart), then cuts while the worker idles in a blocking read -> every message
    handled and acked, the worker alive (exit 0 on SIGTERM), duplicates within the
    in-flight window per failure, and the fetch retried with backoff meanwhile."""
    mode = target.mode
    ids = await publish(target.broker_url, MESSAGES)
    async with ChaosProxy("127.0.0.1", target.port) as proxy:
        proxied = re.sub(r"//[^/]+/", f"//127.0.0.1:{proxy.port}/", target.url)
        url = f"{proxied}?prefix={target.prefix}&lease={LEASE}"
        if mode == "blackhole":
            # Short socket timeouts, so that commands stalled by the hung server time
            # out within the outage (redis-py's default is 5 s).
            url += "&socket_timeout=1&socket_connect_timeout=1"

        async def outage() -> tuple[float, float]:
            if target.server is not None:
                return await target.server.restart(OUTAGE)
            return await proxy.outage(OUTAGE, mode)

        async def settled() -> bool:
            return (await group_state(target.url, target.prefix)).settled

        chaos, worker = await play_chaos(
            proxy,
            url,
            tmp_path / "effects.db",
            ids,
            outage=outage,
            settled=settled,
            publish_more=lambda: publish(target.broker_url, EXTRA),
        )
    assert chaos.code == 0, worker.stderr()[-3000:]
    counts, lost, duplicates = chaos.counted(ids)
    state = await group_state(target.url, target.prefix)
    left, dead = await leftovers(target.broker_url)
    delays = worker.fetch_failures(chaos.start, chaos.end)
    attempts = proxy.attempts_between(chaos.start, chaos.end)
    failures = CUTS_BEFORE + 1 + CUTS_AFTER
    print(
        f"\nR4 redis {mode} trial {trial}: published {len(ids)}, handled {len(counts)}, "
        f"lost {len(lost)}, duplicates {duplicates}, pending {state.pending}, left {left}, "
        f"dead {dead}; {CUTS_BEFORE}+{CUTS_AFTER} cuts under load, outage "
        f"{chaos.end - chaos.start:.2f} s ({mode}), 2 cuts while idle ({chaos.idle_cut} "
        f"connections); during the outage {len(delays)} failed fetches (retry delays "
        f"{delays}), {attempts} connection attempts; ack failures "
        f"{chaos.stats['ack_failures']}; stats {chaos.stats}"
    )
    assert not lost
    assert state.settled
    assert (left, dead) == (0, 0)
    assert duplicates <= failures * WINDOW
    assert chaos.idle_cut >= 2
    if target.server is not None:
        # The restarted server had no scripts: the worker's fetch loaded them again.
        async with redis.asyncio.Redis.from_url(target.url) as admin:
            errors = await admin.info("errorstats")
        assert errors["errorstat_NOSCRIPT"]["count"] >= 1
    assert chaos.stats["handled"] == len(chaos.rows)
    # The worker noticed the outage and retried with backoff: a few fetches, each
    # delay at least the one before (0.1, 0.2, 0.4, ... s), not a hot loop.
    assert 1 <= len(delays) <= 8
    assert delays == sorted(delays)
    assert attempts <= 40


# -- focused regressions: the Redis adapter across lost connections ---------------------


async def test_blocking_wait_longer_than_the_socket_timeout_is_not_an_error(
    redis_target: tuple[str, str],
) -> None:
    """An idle fetch waits in a blocking XREAD; a block longer than redis-py's socket
    timeout made the fetch fail with BrokerConnectionError (TimeoutError) although
    the server was fine. Now the wait is split; the fetch returns [] or the message."""
    from headrace.messaging.brokers.redis import RedisBroker

    redis_url, prefix = redis_target
    # reclaim_interval 10 s: nothing shortens the wait but the fetch's own timeout.
    async with RedisBroker(
        redis_url, prefix=prefix, reclaim_interval=10.0, socket_timeout=0.3
    ) as broker:
        assert await broker.fetch("idle", 10, timeout=1.0) == []

        async def publish_later() -> None:
            await asyncio.sleep(0.7)
            await broker.publish("idle", [OutgoingMessage(b"late")])

        later = asyncio.create_task(publish_later())
        [message] = await broker.fetch("idle", 10, timeout=5.0)
        await later
        assert message.body == b"late"
        await broker.ack([message])


async def test_a_restarted_redis_gets_the_scripts_again_and_loses_nothing(
    private_redis: PrivateRedis,
) -> None:
    """A real restart: operations fail while Redis is down (an ack too), the restarted
    server has forgotten the Lua scripts (NOSCRIPT) and the broker loads them again,
    and the unacked messages come back when their lease expires, as attempt 2."""
    from headrace.messaging.brokers.redis import RedisBroker

    async def server(call: Any) -> Any:
        # A new client each time: the test's own connections die with the server too.
        async with redis.asyncio.Redis.from_url(private_redis.url) as admin:
            return await call(admin)

    async with RedisBroker(private_redis.url, lease=1.0) as broker:
        await broker.publish("jobs", [OutgoingMessage(b"%d" % n) for n in range(10)])
        first = await broker.fetch("jobs", 4, timeout=1.0)
        sha = broker._fetch_script.sha
        assert await server(lambda admin: admin.script_exists(sha)) == [True]
        await private_redis.stop()
        with pytest.raises(BrokerConnectionError):
            await broker.ack(first)
        with pytest.raises(BrokerConnectionError):
            await broker.fetch("jobs", 4, timeout=0.5)
        private_redis.spawn()
        await private_redis.wait_up()
        assert await server(lambda admin: admin.script_exists(sha)) == [False]
        rest = await broker.fetch("jobs", 10, timeout=1.0)
        await broker.ack(rest)
        # The first four come back by the fetch script's reclaim once their lease ends.
        again = await broker.fetch("jobs", 10, timeout=3.0)
        await broker.ack(again)
        assert await server(lambda admin: admin.script_exists(sha)) == [True]
        errors = await server(lambda admin: admin.info("errorstats"))
    assert errors["errorstat_NOSCRIPT"]["count"] >= 1
    assert [m.body for m in first] == [b"0", b"1", b"2", b"3"]
    assert [m.body for m in rest] == [b"%d" % n for n in range(4, 10)]
    assert [(m.body, m.attempt) for m in again] == [(m.body, 2) for m in first]


async def test_connections_closed_while_idle_are_replaced_not_failed(
    private_redis: PrivateRedis,
) -> None:
    """Redis restarts while the broker idles: the next ack succeeds. redis-py 8.1.0's
    asyncio pool no longer replaces a connection the server closed while it sat idle
    (with RESP3 and its default maintenance notifications), so the first command on it
    failed with "Connection closed by server" although Redis was up: the ack failed
    and its messages would have been delivered again. Acks (and the other settle
    commands, safe to repeat) now go once more over a fresh connection."""
    from headrace.messaging.brokers.redis import RedisBroker

    async with RedisBroker(private_redis.url, lease=1.0) as broker:
        await broker.publish("jobs", [OutgoingMessage(b"%d" % n) for n in range(6)])
        first = await broker.fetch("jobs", 3, timeout=1.0)
        await private_redis.stop()
        private_redis.spawn()
        await private_redis.wait_up()
        # Let the loop see the old connection's end of file, as it would in service.
        await asyncio.sleep(0.1)
        await broker.ack(first)
        rest = await broker.fetch("jobs", 10, timeout=1.0)
        await broker.ack(rest)
        assert await broker.fetch("jobs", 10, timeout=1.5) == []
    assert [m.body for m in first + rest] == [b"%d" % n for n in range(6)]


# -- SQLite ------------------------------------------------------------------------------

# Another process takes the database's write lock and holds it.
LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN IMMEDIATE")
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""
LOCK = 2.5


def sqlite_left(path: Path) -> int:
    with sqlite3.connect(path, timeout=30) as connection:
        [(count,)] = connection.execute("SELECT count(*) FROM headrace_messages")
        return int(count)


@pytest.mark.parametrize("busy_timeout", [None, 0.5], ids=["waits", "fails"])
@pytest.mark.timeout(120)
async def test_r4_sqlite_file_locked_by_another_process_loses_nothing(
    tmp_path: Path, busy_timeout: float | None
) -> None:
    """The SQLite analogue of R4: another process holds the write lock for 2.5 s,
    longer than a fetch (1 s) -> with the default busy timeout (30 s) the worker's
    fetches and acks wait it out; with busy_timeout=0.5 they fail, and the worker
    retries with backoff. Either way it keeps going, and every message is handled
    and acked (none left in the file)."""
    path = tmp_path / "broker.db"
    url = f"sqlite:///{path}?lease={LEASE}"
    if busy_timeout is not None:
        url += f"&busy_timeout={busy_timeout}"
    ids = await publish(url, MESSAGES)
    effects_path = tmp_path / "effects.db"
    worker = await Worker.start(url, effects_path, *UNDER_LOAD)
    try:
        await worker.wait_ready()
        await asyncio.sleep(0.5)
        locker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOCKER, str(path), str(LOCK), stdout=asyncio.subprocess.PIPE
        )
        assert locker.stdout is not None
        assert await locker.stdout.readline() == b"LOCKED\n"
        start = time.time()
        assert await locker.wait() == 0
        end = time.time()
        handled_by_then = len(effects(effects_path))

        async def all_handled_and_acked() -> bool:
            assert worker.process.returncode is None, worker.stderr()[-3000:]
            if not set(ids) <= {message_id for message_id, _ in effects(effects_path)}:
                return False
            return sqlite_left(path) == 0

        await wait_until(all_handled_and_acked, 60, "every message handled and acked")
        code, stats = await worker.stop()
    finally:
        await worker.kill()
    assert code == 0, worker.stderr()[-3000:]
    rows = effects(effects_path)
    counts = Counter(message_id for message_id, _ in rows)
    lost = set(ids) - set(counts)
    duplicates = sum(n - 1 for n in counts.values())
    left, dead = await leftovers(url)
    delays = worker.fetch_failures(start, end + 0.5)
    print(
        f"\nR4 sqlite lock {end - start:.2f} s, busy_timeout "
        f"{busy_timeout or 'default (30 s)'}: published {len(ids)}, handled {len(counts)}, "
        f"lost {len(lost)}, duplicates {duplicates}, left {sqlite_left(path)}+{left}, "
        f"dead {dead}, handled by the lock's end {handled_by_then}; failed fetches "
        f"during the lock {len(delays)} (retry delays {delays}); ack failures "
        f"{stats['ack_failures']}; stats {stats}"
    )
    assert not lost
    assert (sqlite_left(path), left, dead) == (0, 0, 0)
    assert duplicates <= WINDOW
    if busy_timeout is None:
        assert delays == []
    else:
        assert 1 <= len(delays) <= 8
        assert delays == sorted(delays)


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def postgres_target(postgres_url: str) -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, fresh table prefix); the prefix's tables are dropped afterwards."""
    import psycopg

    prefix = f"hr_r4_{uuid.uuid4().hex[:8]}_"
    yield postgres_url, prefix
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {prefix}messages, {prefix}dead_letters")


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
@pytest.mark.timeout(150)
async def test_r4_postgres_connection_drops_and_outage_lose_nothing(
    postgres_target: tuple[str, str], tmp_path: Path, mode: str, trial: int
) -> None:
    """R4 on PostgreSQL, as on Redis: the work and LISTEN connections cut mid-statement,
    an outage (refused, or hung: statements then fail after command_timeout), cuts
    while the worker idles -> every message handled and acked, the worker alive (exit
    0 on SIGTERM), duplicates within the in-flight window per failure, and the worker
    noticed the outage and retried without a hot loop."""
    base, prefix = postgres_target
    direct = f"{base}?prefix={prefix}"
    ids = await publish(direct, MESSAGES)
    async with ChaosProxy("127.0.0.1", 5432) as proxy:
        assert "127.0.0.1:5432" in base, base
        url = base.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        url += f"?prefix={prefix}&lease={LEASE}&poll_interval=0.5"
        if mode == "blackhole":
            # Statements stalled by the hung server time out within the outage.
            url += "&command_timeout=1&connect_timeout=2"

        async def settled() -> bool:
            return await stored(direct) == 0

        chaos, worker = await play_chaos(
            proxy,
            url,
            tmp_path / "effects.db",
            ids,
            outage=lambda: proxy.outage(OUTAGE, mode),
            settled=settled,
            publish_more=lambda: publish(direct, EXTRA),
        )
    assert chaos.code == 0, worker.stderr()[-3000:]
    counts, lost, duplicates = chaos.counted(ids)
    left, dead = await leftovers(direct)
    # A statement stalled by the hung server fails up to command_timeout + the
    # connect_timeout of its retry (3 s) after the outage began, maybe after it ended.
    start, noticed_by = chaos.start, chaos.end + 3
    delays = worker.fetch_failures(start, noticed_by)
    attempts = proxy.attempts_between(start, chaos.end)
    failures = CUTS_BEFORE + 1 + CUTS_AFTER
    print(
        f"\nR4 postgres {mode} trial {trial}: published {len(ids)}, handled {len(counts)}, "
        f"lost {len(lost)}, duplicates {duplicates}, left {left}, dead {dead}; "
        f"{CUTS_BEFORE}+{CUTS_AFTER} cuts under load, outage {chaos.end - start:.2f} s "
        f"({mode}), 2 cuts while idle ({chaos.idle_cut} connections); during the outage "
        f"{len(delays)} failed fetches (retry delays {delays}), {attempts} connection "
        f"attempts; ack failures {chaos.stats['ack_failures']}; stats {chaos.stats}"
    )
    assert not lost
    assert (left, dead) == (0, 0)
    assert duplicates <= failures * WINDOW
    assert chaos.idle_cut >= 2
    assert chaos.stats["handled"] == len(chaos.rows)
    # The worker noticed the outage (the statement in flight then, a fetch or an ack,
    # failed), and retried without a hot loop. Unlike on Redis, the delays need not
    # grow: an ack that got through in between ends a fetch's run of failures.
    noticed = [
        text
        for at, text in worker.log
        if start <= at <= noticed_by and text.startswith(("fetch from", "ack of"))
    ]
    assert noticed
    assert len(delays) <= 8
    assert attempts <= 40


# -- NATS JetStream and RabbitMQ -------------------------------------------------------


@pytest.fixture(params=["nats", "rabbitmq"])
def server_target(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, int]]:
    """(URL of the machine's server, a fresh stream/queue prefix, its port); what the
    prefix created is deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    if request.param == "nats":
        from ._nats import delete_nats_streams

        url = request.getfixturevalue("nats_url")
        prefix = f"hr-r4-{suffix}"
        yield url, prefix, 4222
        delete_nats_streams(url, prefix)
        return
    from ._rabbitmq import delete_queues

    url = request.getfixturevalue("amqp_url")
    prefix = f"hr-r4-{suffix}."
    yield url, prefix, 5672
    delete_queues(url, [f"{prefix}load", f"{prefix}load.dead"])


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.timeout(150)
async def test_r4_nats_and_rabbitmq_connection_drops_lose_nothing(
    server_target: tuple[str, str, int], tmp_path: Path, trial: int
) -> None:
    """R4 on NATS JetStream and RabbitMQ, through the proxy: connections cut under load,
    a refused-connections outage, cuts while idle -> every message handled and acked,
    the worker alive (exit 0 on SIGTERM), nothing left, duplicates within the
    in-flight window per failure."""
    base, prefix, port = server_target
    scheme = base.split(":", 1)[0]
    separator = "&" if "?" in base else "?"
    direct = f"{base}{separator}prefix={prefix}&lease={LEASE}"
    if scheme == "nats":
        # Deliveries a lost connection held come back after AckWait (max_lease).
        direct += f"&max_lease={LEASE}"
    ids = await publish(direct, MESSAGES)
    async with ChaosProxy("127.0.0.1", port) as proxy:
        proxied = direct.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")
        assert proxied != direct, direct

        async def settled() -> bool:
            return await stored(direct) == 0

        chaos, worker = await play_chaos(
            proxy,
            proxied,
            tmp_path / "effects.db",
            ids,
            outage=lambda: proxy.outage(OUTAGE, "reset"),
            settled=settled,
            publish_more=lambda: publish(direct, EXTRA),
        )
    assert chaos.code == 0, worker.stderr()[-3000:]
    counts, lost, duplicates = chaos.counted(ids)
    left, dead = await leftovers(direct)
    failures = CUTS_BEFORE + 1 + CUTS_AFTER
    print(
        f"\nR4 {scheme} reset trial {trial}: published {len(ids)}, handled {len(counts)}, "
        f"lost {len(lost)}, duplicates {duplicates}, left {left}, dead {dead}; "
        f"{CUTS_BEFORE}+{CUTS_AFTER} cuts under load, outage {chaos.end - chaos.start:.2f} s, "
        f"2 cuts while idle ({chaos.idle_cut} connections); ack failures "
        f"{chaos.stats['ack_failures']}; stats {chaos.stats}"
    )
    assert not lost
    assert (left, dead) == (0, 0)
    assert duplicates <= failures * WINDOW
    assert chaos.idle_cut >= 2

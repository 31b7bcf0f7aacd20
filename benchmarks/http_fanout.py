"""B6: HTTP fan-out against a local keep-alive server that counts accepted connections.

N GETs of 2 KB bodies (default 5,000), concurrency 100. Each client runs in its own
subprocess (so its peak RSS is its own) against one server process (so the server does
not share the client's event loop), interleaved round by round:

* ``headrace fetch_all``: ``Fetcher(concurrency=100).fetch_all(urls)``, 100 workers.
* ``headrace fetch x500``: 500 tasks launched at once, each awaiting ``fetcher.fetch``.
* ``aiohttp+sem``: one ``ClientSession(TCPConnector(limit=100))``, ``Semaphore(100)``,
  500 tasks launched at once, ``await response.read()`` each.
* ``httpx+sem``: one ``httpx.AsyncClient()`` with its default limits (100 connections,
  20 kept alive), ``Semaphore(100)``, 500 tasks at once: what users write.
* ``client/request``: a new aiohttp ``ClientSession`` per request, ``Semaphore(100)``;
  fewer requests (``--naive-requests``, default 1,000) because each leaves a socket in
  TIME-WAIT and 5 rounds of 5,000 would exhaust ephemeral ports on a shared machine.

Columns: req/s (median over rounds), TCP connections the server accepted (max over
rounds), sockets in TIME-WAIT on the server's port after the run (``ss -tan state
time-wait``, delta; max over rounds), the client's peak RSS. Ratios: per-round
headrace / baseline req/s, median. Goals: connections <= concurrency, req/s >=
aiohttp+sem and >= httpx+sem.

    python benchmarks/http_fanout.py [--requests 5000] [--rounds 5] [--quick]
"""

# Our folder holds other benchmark scripts whose names may shadow modules; drop it from
# sys.path before importing aiohttp (this file was once named http.py and shadowed the
# standard library's ``http``).
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

BODY = b"x" * 2048
CONCURRENCY = 100
LAUNCH = 500

# -- the server (its own process) ---------------------------------------------------------


def serve() -> None:
    """Run the counting keep-alive server; print its ports as one JSON line."""
    from aiohttp import web

    counts = {"accepted": 0, "requests": 0}

    class CountingServer(web.Server):
        def connection_made(self, handler: Any, transport: Any) -> None:
            super().connection_made(handler, transport)
            counts["accepted"] += 1

    async def data(request: web.BaseRequest) -> web.Response:
        counts["requests"] += 1
        return web.Response(body=BODY)

    async def control(request: web.BaseRequest) -> web.Response:
        if request.path == "/reset":
            counts["accepted"] = counts["requests"] = 0
        return web.json_response(counts)

    async def main() -> None:
        data_runner = web.ServerRunner(CountingServer(data), shutdown_timeout=1)
        control_runner = web.ServerRunner(web.Server(control), shutdown_timeout=1)
        ports = []
        for runner in (data_runner, control_runner):
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
            await site.start()
            ports.append(runner.addresses[0][1])
        print(json.dumps({"data": ports[0], "control": ports[1]}), flush=True)
        # Run until the parent closes our stdin.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        await data_runner.cleanup()
        await control_runner.cleanup()

    asyncio.run(main())


# -- the clients (one process per trial) --------------------------------------------------


async def run_headrace_fetch_all(url: str, n: int) -> int:
    from headrace.http import Fetcher

    ok = 0
    async with Fetcher(concurrency=CONCURRENCY) as fetcher:
        async for result in fetcher.fetch_all(url for _ in range(n)):
            if result.ok and len(result.response.body) == len(BODY):  # type: ignore[union-attr]
                ok += 1
    return ok


async def _waves(n: int, one: Callable[[], Awaitable[bool]]) -> int:
    """Launch LAUNCH tasks at once, wave after wave, as the scenario prescribes."""
    ok = 0
    done = 0
    while done < n:
        size = min(LAUNCH, n - done)
        results = await asyncio.gather(*(one() for _ in range(size)), return_exceptions=True)
        ok += sum(1 for result in results if result is True)
        done += size
    return ok


async def run_headrace_fetch(url: str, n: int) -> int:
    from headrace.http import Fetcher

    async with Fetcher(concurrency=CONCURRENCY) as fetcher:

        async def one() -> bool:
            response = await fetcher.fetch(url)
            return len(response.body) == len(BODY)

        return await _waves(n, one)


async def run_aiohttp(url: str, n: int) -> int:
    import aiohttp

    semaphore = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> bool:
            async with semaphore, session.get(url) as response:
                return len(await response.read()) == len(BODY)

        return await _waves(n, one)


async def run_httpx(url: str, n: int) -> int:
    import httpx

    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient() as client:

        async def one() -> bool:
            async with semaphore:
                response = await client.get(url)
                return len(response.content) == len(BODY)

        return await _waves(n, one)


async def run_client_per_request(url: str, n: int) -> int:
    import aiohttp

    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one() -> bool:
        async with semaphore, aiohttp.ClientSession() as session, session.get(url) as response:
            return len(await response.read()) == len(BODY)

    return await _waves(n, one)


CLIENTS: dict[str, Callable[[str, int], Awaitable[int]]] = {
    "headrace fetch_all": run_headrace_fetch_all,
    "headrace fetch x500": run_headrace_fetch,
    "aiohttp+sem": run_aiohttp,
    "httpx+sem": run_httpx,
    "client/request": run_client_per_request,
}


def client(name: str, url: str, n: int) -> None:
    """Run one trial; print {ok, seconds, cpu_us (client CPU per request), rss_mb} as JSON."""
    # Import before the clock starts: import time is not what B6 measures.
    import aiohttp  # noqa: F401
    import httpx  # noqa: F401

    import headrace.http  # noqa: F401

    cpu_started = time.process_time()
    started = time.perf_counter()
    ok = asyncio.run(CLIENTS[name](url, n))
    seconds = time.perf_counter() - started
    cpu_us = (time.process_time() - cpu_started) / n * 1e6
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"ok": ok, "seconds": seconds, "cpu_us": cpu_us, "rss_mb": rss_mb}), flush=True
    )


# -- the orchestra -------------------------------------------------------------------------


def time_wait(port: int) -> int:
    """Sockets in TIME-WAIT to or from ``port`` (either side may have closed first)."""
    filter_ = f"( sport = :{port} or dport = :{port} )"
    output = subprocess.run(
        ["ss", "-Htan", "state", "time-wait", filter_], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in output.splitlines() if line.strip())


def control(port: int, path: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def trial(name: str, ports: dict[str, int], n: int) -> dict[str, float]:
    control(ports["control"], "/reset")
    before = time_wait(ports["data"])
    url = f"http://127.0.0.1:{ports['data']}/"
    output = subprocess.run(
        [sys.executable, __file__, "--client", name, "--url", url, "--n", str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    counts = control(ports["control"], "/stats")
    result["time_wait"] = max(0, time_wait(ports["data"]) - before)
    result["accepted"] = counts["accepted"]
    result["requests"] = n
    result["rps"] = result["ok"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--naive-requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 requests, 3 rounds")
    parser.add_argument("--only", nargs="*", default=None, help="client names to run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.client:
        client(args.client, args.url, args.n)
        return
    if args.quick:
        args.requests, args.naive_requests, args.rounds = 1000, 300, 3
    names = args.only or list(CLIENTS)

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for round_number in range(args.rounds):
            # Rotate the order so that no client always runs right after the same one.
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                n = args.naive_requests if name == "client/request" else args.requests
                rows[name].append(trial(name, ports, n))
                print(
                    f"round {round_number + 1}: {name:20s} {rows[name][-1]['rps']:8.0f} req/s "
                    f"accepted={rows[name][-1]['accepted']}",
                    file=sys.stderr,
                )
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)

    summary: dict[str, Any] = {
        "requests": args.requests,
        "naive_requests": args.naive_requests,
        "rounds": args.rounds,
        "concurrency": CONCURRENCY,
        "clients": {},
    }
    print(
        f"\nB6: GETs of 2 KB, concurrency {CONCURRENCY}, {LAUNCH} launched at once, "
        f"{args.rounds} interleaved rounds ({args.requests} requests; client/request: "
        f"{args.naive_requests})\n"
    )
    header = f"{'client':22s} {'req/s':>8s} {'CPU us/req':>11s} {'ok':>6s} {'conns accepted':>15s} {'TIME-WAIT':>10s} {'peak RSS MB':>12s}"
    print(header)
    print("-" * len(header))
    for name in names:
        trials = rows[name]
        entry = {
            "rps_median": statistics.median(t["rps"] for t in trials),
            "cpu_us_median": statistics.median(t["cpu_us"] for t in trials),
            "ok_min": min(t["ok"] for t in trials),
            "requests": trials[0]["requests"],
            "accepted_max": max(t["accepted"] for t in trials),
            "time_wait_max": max(t["time_wait"] for t in trials),
            "rss_mb_max": max(t["rss_mb"] for t in trials),
            "trials": trials,
        }
        summary["clients"][name] = entry
        print(
            f"{name:22s} {entry['rps_median']:8.0f} {entry['cpu_us_median']:11.1f} "
            f"{int(entry['ok_min']):>6d} "
            f"{int(entry['accepted_max']):>15d} {int(entry['time_wait_max']):>10d} "
            f"{entry['rss_mb_max']:>12.1f}"
        )
    ratios: dict[str, float] = {}
    cpu_ratios: dict[str, float] = {}
    for mine in ("headrace fetch_all", "headrace fetch x500"):
        for base in ("aiohttp+sem", "httpx+sem", "client/request"):
            if mine in rows and base in rows:
                per_round = [
                    a["rps"] / b["rps"] for a, b in zip(rows[mine], rows[base], strict=True)
                ]
                ratios[f"{mine} / {base}"] = statistics.median(per_round)
                cpu_rounds = [
                    a["cpu_us"] / b["cpu_us"] for a, b in zip(rows[mine], rows[base], strict=True)
                ]
                cpu_ratios[f"{mine} / {base}"] = statistics.median(cpu_rounds)
    if ratios:
        print(
            "\nmedian per-round ratios: req/s (higher is better), client CPU per request (lower is better)"
        )
        for key, value in ratios.items():
            print(f"  {key:45s} {value:6.2f}x   CPU {cpu_ratios[key]:5.2f}x")
    summary["ratios"] = ratios
    summary["cpu_ratios"] = cpu_ratios
    out = Path(_HERE) / "results" / "http_fanout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""The ``headrace`` command: worker, publish, dlq list/replay, errors, Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from headrace.cli import load_worker, main
from headrace.messaging import Message, SqliteBroker, Worker

APP = """
from headrace import InvalidMessage
from headrace.messaging import Message, Worker

worker = Worker("memory://unused", ack_interval=0.01)
seen = []

@worker.handler("jobs", concurrency=4)
async def handle(message: Message) -> None:
    if message.body.startswith(b"bad"):
        raise InvalidMessage(f"cannot read {message.body!r}")
    if message.body == b"slow":
        import asyncio
        await asyncio.sleep(60)
    seen.append(message.body)

def make_worker() -> Worker:
    return worker
"""


PLAIN = ["--plain", "--progress-interval", "0.1"]


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A worker module file (a unique name, since the CLI imports it by file)."""
    path = tmp_path / f"cli_app_{tmp_path.name}.py"
    path.write_text(textwrap.dedent(APP))
    return path


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def stored(url: str) -> list[Message]:
    async def go() -> list[Message]:
        async with SqliteBroker(url.removeprefix("sqlite:///")) as broker:
            return await broker.fetch("jobs", 1000, timeout=0, lease=60)

    return asyncio.run(go())


def test_publish_stores_the_bodies(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`headrace publish` stores each body (times --repeat) with key and headers."""
    options = ["--broker", url, "--key", "k", "--header", "h=v", "--repeat", "2"]
    code = main(["publish", "jobs", "a", "b", *options])
    assert code == 0
    assert "published 4 message(s)" in capsys.readouterr().err
    messages = stored(url)
    assert [m.body for m in messages] == [b"a", b"b", b"a", b"b"]
    assert {(m.key, m.headers["h"]) for m in messages} == {("k", "v")}


def test_worker_runs_until_idle_and_dlq_lists_and_replays(
    app: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`headrace worker` handles the queue and exits 0 when idle; `dlq list` shows the
    dead letter with its error id; `dlq replay` puts it back."""
    assert main(["publish", "jobs", "ok1", "bad1", "ok2", "--broker", url]) == 0
    code = main(["worker", f"{app}:worker", "--broker", url, "--exit-when-idle", "0.3", "--plain"])
    assert code == 0
    err = capsys.readouterr().err
    assert "done: handled 2" in err
    assert "dead-lettered 1" in err

    assert main(["dlq", "list", "jobs", "--broker", url, "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["body"] == "bad1"
    assert record["error"]["code"] == "invalid_message"
    assert len(record["error"]["error_id"]) == 32

    assert main(["dlq", "list", "jobs", "--broker", url]) == 0
    assert record["error"]["error_id"] in capsys.readouterr().out

    assert main(["dlq", "replay", "jobs", "--broker", url, "--id", record["id"]]) == 0
    assert "replayed 1" in capsys.readouterr().err
    assert [m.body for m in stored(url)] == [b"bad1"]


def test_load_worker_accepts_a_factory(app: Path) -> None:
    """A target naming a function that returns a Worker is called."""
    assert isinstance(load_worker(f"{app}:make_worker"), Worker)


def test_errors_exit_1_with_a_message(
    app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No broker, a missing file, or a non-worker target: exit 1 and say why."""
    monkeypatch.delenv("HEADRACE_BROKER_URL", raising=False)
    assert main(["publish", "jobs", "x"]) == 1
    assert "no broker" in capsys.readouterr().err
    assert main(["worker", f"{tmp_path / 'missing.py'}:worker"]) == 1
    assert "no file" in capsys.readouterr().err
    assert main(["worker", f"{app}:seen"]) == 1
    assert "not a headrace Worker" in capsys.readouterr().err
    assert main(["worker", f"{app}:worker", "--broker", "kafka://x"]) == 1
    assert "unknown broker URL scheme" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_cleanly(app: Path, url: str) -> None:
    """SIGINT to `headrace worker`: exit 0, the in-flight message handed back at once."""
    assert main(["publish", "jobs", "slow", "--broker", url]) == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "headrace.cli", "worker", f"{app}:worker", "--broker", url, *PLAIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if "in flight 1" in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-2000:]
    assert "handed back 1" in err
    [message] = stored(url)
    assert (message.body, message.attempt) == (b"slow", 1)


def test_stats_counts_each_topic(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`headrace stats` prints ready / delayed / in-flight / dead counts per topic, as a
    table or one JSON object per topic."""
    assert main(["publish", "jobs", "a", "b", "c", "--broker", url]) == 0
    assert main(["publish", "emails", "x", "--broker", url]) == 0

    async def lease_one() -> None:
        async with SqliteBroker(url.removeprefix("sqlite:///")) as broker:
            [message] = await broker.fetch("jobs", 1, timeout=0, lease=600)
            await broker.dead_letter(message, {"code": "bad"})
            await broker.fetch("jobs", 1, timeout=0, lease=600)  # stays leased

    asyncio.run(lease_one())
    capsys.readouterr()
    assert main(["stats", "jobs", "emails", "--broker", url, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records == [
        {"topic": "jobs", "ready": 1, "delayed": 0, "in_flight": 1, "dead_letters": 1},
        {"topic": "emails", "ready": 1, "delayed": 0, "in_flight": 0, "dead_letters": 0},
    ]
    assert main(["stats", "jobs", "--broker", url]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["topic", "ready", "delayed", "in", "flight", "dead"]
    assert row.split() == ["jobs", "1", "0", "1", "1"]


PIPELINE_APP = """
import asyncio
from headrace import Pipeline

pipeline = Pipeline(range(10)).map(lambda n: n * 2, name="double")

def make_pipeline() -> Pipeline:
    return Pipeline(range(5)).filter(lambda n: n % 2 == 0, name="even")

async def open_pipeline() -> Pipeline:
    await asyncio.sleep(0)  # e.g. open a database first
    return Pipeline(range(3))

def failing() -> Pipeline:
    def explode(n: int) -> int:
        if n == 2:
            raise ValueError("row 2 is broken")
        return n
    return Pipeline(range(5)).map(explode, name="explode")

not_a_pipeline = 42
"""


@pytest.fixture
def pipeline_app(tmp_path: Path) -> Path:
    path = tmp_path / f"cli_pipeline_{tmp_path.name}.py"
    path.write_text(textwrap.dedent(PIPELINE_APP))
    return path


@pytest.mark.parametrize(
    ("attribute", "items"),
    [("pipeline", 10), ("", 10), ("make_pipeline", 3), ("open_pipeline", 3)],
)
def test_run_drives_a_pipeline_to_its_end(
    pipeline_app: Path, attribute: str, items: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`headrace run` takes a Pipeline, or a sync or async function building one
    (default attribute `pipeline`), runs it to the end and reports each stage."""
    assert main(["run", f"{pipeline_app}:{attribute}", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"done: {items} item(s)" in err
    assert "source: in 0  out" in err


def test_run_reports_a_failed_pipeline_and_a_wrong_target(
    pipeline_app: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage failing (fail-fast) or a target that is no Pipeline: exit 1, say why."""
    assert main(["run", f"{pipeline_app}:failing", "--no-progress"]) == 1
    assert "row 2 is broken" in capsys.readouterr().err
    assert main(["run", f"{pipeline_app}:not_a_pipeline"]) == 1
    assert "is a int, not a headrace Pipeline" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_pipeline_cleanly_and_a_rerun_finishes(tmp_path: Path) -> None:
    """SIGINT to `headrace run` on the backfill example: exit 130 with how far it got,
    exactly that many rows written; a second run writes the rest and exits 0."""
    example = Path(__file__).resolve().parent.parent / "examples" / "backfill_app.py"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HEADRACE_EXAMPLE_DIR": str(tmp_path),
        "HEADRACE_BACKFILL_ROWS": "200000",
    }
    command = [sys.executable, "-m", "headrace.cli", "run", f"{example}:pipeline"]
    process = subprocess.Popen(
        [*command, "--total", "200000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    database = tmp_path / "backfill.db"

    def written() -> int:
        import sqlite3

        with sqlite3.connect(database, timeout=30) as db:
            return int(db.execute("SELECT count(search_key) FROM customers").fetchone()[0])

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if database.exists() and written() >= 1000:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("stopped by SIGINT")]
    reported = int(line.split(" after ")[1].split(" item")[0].replace(",", ""))
    assert 0 < reported < 200_000
    # A write already in its thread when the signal came may still commit: at least
    # what was reported is written, never less (the rerun skips it either way).
    assert written() >= reported
    rerun = subprocess.run(
        [*command, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert written() == 200_000

"""Backfill a derived column over a whole table: a pipeline app for ``headrace run``.

The situation (the batch-pipeline talk in ../shared/seeds): a new ``search_key``
column must be filled for every existing customer row. Each row needs a lookup
(here a short sleep stands in for a call to another service), done many at a time;
the results are written back in batches of 500, one transaction each. The job is
resumable: it only reads rows whose ``search_key`` is still NULL, so Ctrl-C (which
cancels every stage and leaves no task behind) and a second run finish the work;
rows written stay written, and nothing is filled twice.

Run it with the ``headrace`` command (live progress; Ctrl-C stops it, exit 130)::

    headrace run examples/backfill_app.py:pipeline --total 20000

or as a script (``python examples/backfill_app.py``), which does the same. The table
lives in ``$HEADRACE_EXAMPLE_DIR`` (default ``.headrace-demo/``) in
``backfill.db``; ``HEADRACE_BACKFILL_ROWS`` sets how many rows a new table gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from headrace import Pipeline, Retry

ROWS = int(os.environ.get("HEADRACE_BACKFILL_ROWS", "20000"))
PAGE = 1000


def database() -> Path:
    directory = Path(os.environ.get("HEADRACE_EXAMPLE_DIR", ".headrace-demo"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "backfill.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # the reader never blocks the writer
        db.execute(
            "CREATE TABLE IF NOT EXISTS customers ("
            "id INTEGER PRIMARY KEY, email TEXT NOT NULL, search_key TEXT)"
        )
        if db.execute("SELECT count(*) FROM customers").fetchone()[0] == 0:
            db.executemany(
                "INSERT INTO customers (id, email) VALUES (?, ?)",
                ((n, f"Customer.{n}@Example.COM") for n in range(1, ROWS + 1)),
            )
    return path


def _page(path: Path, after: int) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT id, email FROM customers WHERE search_key IS NULL AND id > ? "
            "ORDER BY id LIMIT ?",
            (after, PAGE),
        ).fetchall()


async def rows_to_fill(path: Path) -> AsyncIterator[tuple[int, str]]:
    """The rows still to fill, a page at a time, read in a thread (keyset pagination:
    no read transaction stays open while the job runs)."""
    after = 0
    while rows := await asyncio.to_thread(_page, path, after):
        for row in rows:
            yield row
        after = rows[-1][0]


async def search_key(row: tuple[int, str]) -> tuple[str, int]:
    """The derived value; the sleep stands in for a lookup in another service."""
    row_id, email = row
    await asyncio.sleep(0.002)
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:16], row_id


def write(path: Path, batch: list[tuple[str, int]]) -> list[int]:
    """Write one batch in one transaction (a sync stage: it runs in a thread); the
    ids written go on, one item each, so the progress counts rows."""
    with sqlite3.connect(path, timeout=30) as db:
        db.executemany("UPDATE customers SET search_key = ? WHERE id = ?", batch)
    return [row_id for _, row_id in batch]


def pipeline() -> Pipeline[int]:
    """The job, for ``headrace run examples/backfill_app.py:pipeline``."""
    path = database()
    return (
        Pipeline(rows_to_fill(path))
        .map(search_key, workers=64, ordered=False, name="lookup", retry=Retry(max_attempts=3))
        .batch(500, max_wait=0.5)
        .map(lambda batch: write(path, batch), name="write")
        .unbatch()
    )


if __name__ == "__main__":
    from headrace.cli import main

    sys.exit(main(["run", f"{__file__}:pipeline", *sys.argv[1:]]))

"""The batch-resend example runs end to end (real sockets, real SQLite, real time)."""

from __future__ import annotations

import argparse
import importlib.util
import sqlite3
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "batch_resend.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_resend_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real_time
async def test_batch_resend_sends_everything_or_dead_letters_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every event ends up marked sent or in dead_letters; 4xx never retried, 503s are."""
    example = load_example()
    db = tmp_path / "events.db"
    args = argparse.Namespace(events=300, rate=5000.0, db=str(db), no_progress=True)
    await example.main(args)
    with sqlite3.connect(db) as conn:
        sent = conn.execute("SELECT count(*) FROM failed_events WHERE sent_at IS NOT NULL")
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        sent_count = sent.fetchone()[0]
    assert sent_count + dead == 300
    assert dead > 0  # the seeded data has malformed payloads
    output = capsys.readouterr().out
    assert '"retries"' in output

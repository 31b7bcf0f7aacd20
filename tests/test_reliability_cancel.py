"""R1 in CI: randomized cancellations of pipelines, workers, hedges and supervisors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reliability_cancel.py"


def test_randomized_cancellations_leave_nothing_behind() -> None:
    """120 seeded trials: no leaked task, no loop error, no warning, no message lost."""
    spec = importlib.util.spec_from_file_location("reliability_cancel", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.run_trials(120, seed=20261123)
    assert sum(tally["trials"] for tally in counts.values()) == 120
    assert sum(tally.get("cancelled", 0) for tally in counts.values()) > 30
    problems = {
        name: {key: tally.get(key, 0) for key in ("leaks", "warnings", "lost")}
        for name, tally in counts.items()
    }
    assert all(value == 0 for tally in problems.values() for value in tally.values()), problems

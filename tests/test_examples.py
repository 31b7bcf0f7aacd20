"""Every script in examples/ runs to completion by itself (they are documentation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Arguments that make an example finish by itself in a few seconds.
ARGUMENTS: dict[str, list[str]] = {}


def _examples() -> list[Path]:
    return sorted(path for path in EXAMPLES.glob("*.py") if not path.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("script", _examples(), ids=lambda path: path.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The example exits 0 within its time limit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HEADRACE_EXAMPLE_DIR": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, str(script), *ARGUMENTS.get(script.name, [])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]

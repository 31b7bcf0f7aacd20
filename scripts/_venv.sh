# Sourced by the scripts: create .venv with Python >= 3.11 and install headrace[dev]
# into it, once per change of pyproject.toml (a stamp file remembers the last install).
VENV="${HEADRACE_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  PYTHON="${PYTHON:-python3}"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "headrace needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.headrace-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing headrace[dev] into $VENV ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import headrace, redis, aiohttp" \
    || { echo "installing headrace[dev] failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

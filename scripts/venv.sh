# Sourced by run_main.sh and run_tests.sh: create or reuse .venv and install requirements.txt and
# requirements-test.txt (the pins pyproject.toml reads). pip runs only when either file changed since
# the last install (their hash is kept in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
HAVE="$(cat "$ROOT/.venv/.requirements.sha256" 2>/dev/null || true)"
if [ "$WANT" != "$HAVE" ]; then
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$ROOT/.venv/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
  echo "$WANT" > "$ROOT/.venv/.requirements.sha256"
fi
export PATH="$ROOT/.venv/bin:$PATH"
cd "$ROOT"

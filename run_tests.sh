#!/usr/bin/env bash
# Set up .venv and run the tests: the fast set by default, everything with --all.
# Other arguments go to pytest, e.g. ./run_tests.sh tests/core -x
source "$(dirname "$0")/scripts/venv.sh"
MARK=(-m "not slow")
if [ "${1:-}" = "--all" ]; then MARK=(); shift; fi
set +e
python -m pytest -q "${MARK[@]}" "$@"
STATUS=$?
set -e
if [ "$STATUS" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): check the paths and -m expression you passed" >&2
  exit 0
fi
exit "$STATUS"

#!/usr/bin/env bash
# Set up .venv and run the tests: the fast set by default, everything with --all.
# Other arguments go to pytest, e.g. ./run_tests.sh tests/core -x
source "$(dirname "$0")/scripts/venv.sh"
MARK=(-m "not slow")
# Two workers (pytest-xdist), each test file on one of them: the fast set took 7.6 minutes on 2 cores
# (2026-11-30), past its 10-minute budget in one process. SD_JAX_TEST_WORKERS=0 runs in one process.
WORKERS=(-n "${SD_JAX_TEST_WORKERS:-2}" --dist loadfile)
if [ "${1:-}" = "--all" ]; then MARK=(); shift; fi
set +e
python -m pytest -q "${WORKERS[@]}" "${MARK[@]}" "$@"
STATUS=$?
set -e
if [ "$STATUS" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): check the paths and -m expression you passed" >&2
  exit 0
fi
exit "$STATUS"

#!/usr/bin/env bash
# Install (idempotent), lint with ruff, and run the whole test suite. Exit 5 from pytest (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# lint first (pyproject.toml [tool.ruff]: syntax errors, pyflakes, bugbear): a finding fails the run
ruff check .
set +e
# Two pytest-xdist workers (serially the tests keep 1.2 of 2 cores busy). --dist loadfile runs each module whole on
# one worker, as its module fixtures (one Ray instance or Serve app) expect; --no-loadscope-reorder keeps the order
# tests/conftest.py gives (longest modules first) instead of xdist's largest-count-first. `-n 0` runs serially.
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"

#!/usr/bin/env bash
# Install (idempotent), lint with ruff, and run the whole test suite. Exit 5 from pytest (no tests collected) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# lint first (pyproject.toml [tool.ruff]: syntax errors, pyflakes, bugbear): a finding fails the run
ruff check .
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"

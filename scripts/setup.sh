#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with torch pinned first (this CPU machine takes the
# local 2.13.0 wheel; an unpinned torch would pull a multi-GB CUDA build), then this package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Where PYTHONDONTWRITEBYTECODE is set (this image sets it), no process ever caches the bytecode of this checkout's
# modules: every Ray worker, Serve replica and CLI process compiled them again, ~1.4 CPU-s each. Compiled once here;
# Python checks each .pyc against its source's size and mtime, so an edited file never runs stale.
# The whole checkout but dot-folders (.venv, .git) and out/: no package list here to fall behind pyproject.toml's.
# Its top-level entries are named rather than `.` with an exclusion: compileall walks every folder it is given before
# it tests a name, and walking .venv's ~50,000 files took 14 of the step's 16 s.
find . -mindepth 1 -maxdepth 1 ! -name '.*' ! -name out -print0 | xargs -0 python -m compileall -q -j 0

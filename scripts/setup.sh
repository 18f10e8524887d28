#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with torch pinned first (this CPU machine takes the
# local 2.13.0 wheel; an unpinned torch would pull a multi-GB CUDA build), then this package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# --no-compile: pip would byte-compile every installed module (torch's thousands, most never imported), ~40 s of a
# fresh set-up on 2 cores; Python compiles what a process imports, once, on first import.
python -c "import torch" 2>/dev/null || python -m pip install -q --no-compile "torch==2.13.0"
python -m pip install -q --no-compile -e ".[dev]"

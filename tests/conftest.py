"""Shared fixtures: one tiny Klein model per test session, built into the cache once."""

from __future__ import annotations

import os

import pytest

# Quiet the libraries. OMP_NUM_THREADS stays unset: Ray then gives each task and actor as many OpenMP threads
# as CPUs it holds (two 1-CPU training workers share the 2 cores instead of spinning 4 threads on them).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
pytest_plugins = ["reliability"]  # the reliability ledger and its summary table (tests/reliability.py)


@pytest.fixture(scope="session")
def tiny_dir():
    """The tiny preset's diffusers folder (built on first use into KLEIN_CACHE, then reused)."""
    from klein.tiny import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from klein.model import load_pipeline

    return load_pipeline("tiny")

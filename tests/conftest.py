"""Shared fixtures: one tiny Klein model per test session, built into the cache once."""

from __future__ import annotations

import os

import pytest

# Keep CPU tests on the two cores we have and quiet the libraries.
os.environ.setdefault("OMP_NUM_THREADS", "2")
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

"""Shared fixtures: one tiny Klein model per test session, built into the cache once."""

from __future__ import annotations

import os
import sys

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


def pytest_sessionfinish(session, exitstatus):
    """Stop any Serve app and Ray instance a test left in this process, and keep the session's exit status."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    session.config._klein_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process without the interpreter's finalisation once pytest has reported.

    CI's run of 655 passing tests ended in a segmentation fault (exit 139) after pytest's summary line: at
    finalisation, threads that torch, Ray's core worker and grpc started are torn down in an order their C
    extensions do not survive every time. Every result is written by then (this hook runs last), so the
    process exits with pytest's own status instead of rolling that die.
    """
    status = getattr(config, "_klein_exitstatus", None)
    if status is None:  # pytest stopped before a session ran (usage error, --help): let it exit as usual
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

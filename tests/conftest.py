"""Shared fixtures: one tiny Klein model per test session, taken from tests/data (or built into the cache once)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Quiet the libraries. OMP_NUM_THREADS stays unset: Ray then gives each task and actor as many OpenMP threads
# as CPUs it holds (two 1-CPU training workers share the 2 cores instead of spinning 4 threads on them).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
pytest_plugins = ["reliability"]  # the reliability ledger and its summary table (tests/reliability.py)

# The tiny preset as klein.tiny.build_tiny_preset writes it (bit for bit: the build is seeded). Building it fits its
# VAE for 300 steps, ~150 CPU-seconds on one core, which every fresh CI run paid before its first tiny test.
# test_model.py checks that this copy is the current version, lands where klein.tiny looks, and loads.
SHIPPED_TINY = Path(__file__).parent / "data" / "tiny-klein-v5"


def tiny_cache_root() -> Path:
    """klein.tiny.default_cache_dir's rule, without importing torch at start-up (test_model.py compares the two)."""
    return Path(os.environ.get("KLEIN_CACHE", Path.home() / ".cache" / "klein-style"))


def seed_tiny_cache() -> None:
    """Put the shipped tiny preset where every process of the session looks for it (this one, Ray workers, CLI
    subprocesses and `ray job submit` jobs all call klein.tiny.tiny_preset_dir), unless a copy is already there.
    Copied into a temporary folder and renamed, as tiny_preset_dir builds: a concurrent session never sees half."""
    root = tiny_cache_root()
    target = root / SHIPPED_TINY.name
    if (target / "model_index.json").exists() or not SHIPPED_TINY.is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-copy-", dir=root))
    try:
        shutil.copytree(SHIPPED_TINY, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():  # lost a race to another session: theirs is the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pytest_sessionstart(session):
    seed_tiny_cache()


@pytest.fixture(scope="session")
def tiny_dir():
    """The tiny preset's diffusers folder in KLEIN_CACHE (the shipped copy; built there if the version moved on)."""
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

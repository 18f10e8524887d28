"""Shared fixtures: one tiny Klein model per test session, built into the cache once."""

from __future__ import annotations

import os
import sys

import pytest

# Quiet the libraries. OMP_NUM_THREADS stays unset in a serial run: Ray then gives each task and actor as many
# OpenMP threads as CPUs it holds (two 1-CPU training workers share the 2 cores instead of spinning 4 threads on them).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
pytest_plugins = ["reliability"]  # the reliability ledger and its summary table (tests/reliability.py)

# pytest-xdist (scripts/test.sh runs `-n 2`) sets these in each worker process before it imports this file.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if XDIST_WORKERS > 1:
    # Each worker owns its share of the cores. Every Ray instance a worker starts still declares the CPUs its tests
    # need (a 2-worker training job must be placed), and Ray would give a 2-CPU task 2 OpenMP threads and the
    # driver's torch one per core: with the other worker busy too, that is twice as many spinning threads as cores,
    # and OpenMP's barriers stall when a thread is descheduled. One share each: the worker, its Ray tasks and the
    # CLI subprocesses it starts inherit it (Ray sets OMP_NUM_THREADS only where it is unset).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS)))

# Under xdist's `--dist loadfile` each module runs whole on one worker (module fixtures start one Ray instance or
# Serve app per module), in the order collected. The long ones go first, longest first, so that the last module to
# start is a short one and neither worker idles while the other finishes a long module at the end. Names are
# ordered by the CPU seconds each module took (bench/results/suite-cpu-*.md); a module not listed keeps its place
# after them, so a stale list costs balance, never a test.
LONGEST_MODULES_FIRST = [
    "test_mini_quality.py",
    "test_submit.py",
    "test_train_job.py",
    "test_health.py",
    "test_klein_folder.py",
    "test_reliability_serve.py",
    "test_serve_http.py",
    "test_train_zero.py",
    "test_train_scaleout.py",
    "test_placement.py",
    "test_lora.py",
    "test_pools.py",
]


@pytest.fixture(scope="session")
def tiny_dir():
    """The tiny preset's diffusers folder (built on first use into KLEIN_CACHE, then reused)."""
    from klein.tiny import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    from klein.model import load_pipeline

    return load_pipeline("tiny")


def pytest_collection_modifyitems(session, config, items):
    """Under xdist, the long modules first (see LONGEST_MODULES_FIRST); a serial run keeps the file order."""
    if XDIST_WORKERS > 1:
        rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests keep their order


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

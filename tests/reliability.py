"""The reliability ledger: every fault, bad input, request and cross-tenant attempt the tests try, counted,
and one table printed at the end of the pytest run.

Tests feed it in two ways:

- `record(category, tried, ok)` from inside a test, for tests that try many things (a corpus, a load
  test): `ok` counts what ended as specified (a fault survived, an input refused with its specific error
  and storage unchanged, a request answered, a cross-tenant attempt refused);
- `@pytest.mark.reliability("faults")` on a test that injects one fault: it counts as tried when it runs
  and as survived when it passes.

The dataset corpus (tests/test_bad_inputs_dataset.py) is counted from its results without touching it:
each `error` case and each bad trigger is a bad input; each `accepted`/`warning` case is a
valid-but-unusual input. `note(text)` adds a line under the table (the load test's numbers).

Registered as a plugin by tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import hashlib
import os
import statistics
from pathlib import Path

import pytest

CATEGORIES: dict[str, tuple[str, str]] = {
    "faults": ("faults injected", "survived"),
    "bad_inputs": ("bad inputs tried", "rejected cleanly"),
    "unusual_inputs": ("valid-but-unusual inputs tried", "accepted as specified"),
    "requests": ("requests sent", "answered"),
    "cross_tenant": ("cross-tenant attempts", "refused"),
}

_LEDGER: dict[str, list[int]] = {name: [0, 0] for name in CATEGORIES}
_FAILURES: dict[str, list[str]] = {name: [] for name in CATEGORIES}
_NOTES: list[str] = []


def record(category: str, tried: int = 1, ok: int | bool | None = None, what: str | None = None) -> None:
    """Count `tried` attempts of `category`, `ok` of which ended as specified (default: all of them)."""
    if category not in _LEDGER:
        raise KeyError(f"unknown reliability category {category!r}; use one of {sorted(CATEGORIES)}")
    ok = tried if ok is None else int(ok)
    _LEDGER[category][0] += tried
    _LEDGER[category][1] += ok
    if ok < tried and what:
        _FAILURES[category].append(what)


def note(line: str) -> None:
    _NOTES.append(line)


def counts(category: str) -> tuple[int, int]:
    tried, ok = _LEDGER[category]
    return tried, ok


def storage_snapshot(root: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hash): equal snapshots mean nothing stored changed."""
    root = Path(root)
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return ordered[0] if q <= 0 else ordered[-1] if q >= 100 else cuts[int(q) - 1]


# -- pytest hooks ------------------------------------------------------------------------------------------
def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "reliability(category): the test injects one fault of this ledger category")


_COUNTED: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if item.nodeid not in _COUNTED:
            _count_item(item, report)
    return report


def _count_item(item, report) -> None:
    passed = report.when == "call" and report.passed
    marker = item.get_closest_marker("reliability")
    if marker is not None and not report.skipped:
        _COUNTED.add(item.nodeid)
        record(marker.args[0], 1, passed, item.nodeid)
        return
    if item.nodeid.split("::")[0].endswith("test_bad_inputs_dataset.py") and not report.skipped:
        name = item.originalname if hasattr(item, "originalname") else item.name
        params = getattr(getattr(item, "callspec", None), "params", {})
        if name == "test_bad_input_case" and "case" in params:
            _COUNTED.add(item.nodeid)
            category = "bad_inputs" if params["case"].expect == "error" else "unusual_inputs"
            record(category, 1, passed, item.nodeid)
        elif name == "test_bad_trigger":
            _COUNTED.add(item.nodeid)
            record("bad_inputs", 1, passed, item.nodeid)


def pytest_sessionfinish(session) -> None:
    """In a pytest-xdist worker, hand this process's ledger to the controller (xdist sends `workeroutput` with its
    "worker finished" message, after this hook): the tests ran here, the table is printed there."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["reliability"] = {"ledger": _LEDGER, "failures": _FAILURES, "notes": _NOTES}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without the plugin
def pytest_testnodedown(node, error) -> None:
    """In the xdist controller, add each finished worker's ledger to this one (empty: no test runs here)."""
    theirs = getattr(node, "workeroutput", {}).get("reliability")
    if not theirs:  # a worker that crashed sends nothing; xdist reports the crash itself
        return
    for name, (tried, ok) in theirs["ledger"].items():
        _LEDGER[name][0] += tried
        _LEDGER[name][1] += ok
    for name, whats in theirs["failures"].items():
        _FAILURES[name].extend(whats)
    _NOTES.extend(theirs["notes"])


def pytest_terminal_summary(terminalreporter) -> None:
    if not any(tried for tried, _ in _LEDGER.values()):
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "reliability summary")
    rows = [(f"{a} / {b}", *_LEDGER[name]) for name, (a, b) in CATEGORIES.items()]
    width = max(len(label) for label, _, _ in rows)
    write(f"{'':{width}}  {'tried':>7}  {'ok':>7}  verdict")
    for name, (label, tried, ok) in zip(CATEGORIES, rows):
        if tried == 0:
            verdict = "not run"
        elif ok == tried:
            verdict = "all " + CATEGORIES[name][1]
        else:
            verdict = f"{tried - ok} NOT {CATEGORIES[name][1]}"
        write(f"{label:{width}}  {tried:>7}  {ok:>7}  {verdict}")
    for name, failures in _FAILURES.items():
        for what in failures[:10]:
            write(f"  ! {name}: {what}")
    for line in _NOTES:
        write(line)


# -- fault injection inside Ray workers ------------------------------------------------------------------------
FAULT_PLAN_ENV = "KLEIN_TEST_FAULT_PLAN"


def install_fault_hooks() -> None:
    """A `worker_process_setup_hook` (runtime_env) for tests: lets a test kill a worker in the middle of a
    storage write, the way a crash or an OOM kill would, without any test hook in the code under test.

    `$KLEIN_TEST_FAULT_PLAN` names a JSON file the test writes: {"kill_during_write": <storage key>,
    "fired": <marker path>, "delay_s": <seconds>}. The first process that writes that key waits `delay_s`
    (a slow write), writes half of the bytes to the temporary file (flushed and fsynced, as a crash would
    leave them), creates the marker, and SIGKILLs itself.
    Without the plan file (or once the marker exists) writes go through untouched.
    """
    import json
    import signal

    plan_path = os.environ.get(FAULT_PLAN_ENV)
    if not plan_path:
        return
    from cluster.storage import Storage

    original = Storage._write_atomic

    def write_atomic(self, key, fill):
        try:
            plan = json.loads(Path(plan_path).read_text())
        except (OSError, ValueError):
            plan = {}
        if plan.get("kill_during_write") != key or os.path.exists(plan.get("fired", "/")):
            return original(self, key, fill)

        def half_then_die(out):
            import io
            import time

            time.sleep(float(plan.get("delay_s", 0)))  # a slow disk: the write is under way for a while
            whole = io.BytesIO()
            fill(whole)
            data = whole.getvalue()
            out.write(data[: len(data) // 2])
            raw = getattr(out, "_out", None)
            if raw is not None and hasattr(raw, "flush"):
                raw.flush()
                os.fsync(raw.fileno())
            Path(plan["fired"]).write_text(f"{os.getpid()} {key} {len(data) // 2}/{len(data)} bytes")
            os.kill(os.getpid(), signal.SIGKILL)

        return original(self, key, half_then_die)

    Storage._write_atomic = write_atomic

"""Where the test suite's CPU goes: wall time and CPU time of every test, the CPU of every process it starts
(Ray's raylet, workers and replicas, CLI subprocesses) included.

    .venv/bin/python scripts/suite_cpu.py [--out FILE] [pytest args...]
    .venv/bin/python scripts/suite_cpu.py --command 'CI=true bash .ci/run' [--out FILE]

`--command` measures what CI runs (set-up, lint and pytest) instead of a bare pytest: the plugin reaches that
pytest through PYTEST_ADDOPTS, and the report adds the whole command's wall and CPU.

Runs pytest as a child with this file as a plugin (it logs each test's start and end), samples the CPU time of the
child and all its descendants every 0.5 s (psutil; a process that ends keeps its last sample), and prints per test
and per module: wall seconds, CPU seconds, and the cores used. The total CPU divided by the machine's cores is the
floor no scheduling (pytest-xdist included) can go under; cutting that needs less work, not more parallelism.
Under pytest-xdist (`-n 2`) tests overlap, so a test's CPU includes the other worker's: read the whole command's
wall and CPU (`--command`), and the per-test wall times only.
CPU time hardly grows when other work shares the machine, so the figures hold on a busy machine too.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# Under pytest-xdist the controller logs each test when its worker reports it; a worker logging too would log it twice.
_LOG = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("SUITE_CPU_TEST_LOG")
_log_file = open(_LOG, "a", buffering=1) if _LOG else None  # noqa: SIM115 (a plugin's log, open for the whole run)


# -- the pytest plugin half (loaded in the child with `-p suite_cpu`) ---------------------------------------------
def pytest_runtest_logstart(nodeid, location):
    if _log_file:
        _log_file.write(f"start {time.time():.2f} {nodeid}\n")


def pytest_runtest_logfinish(nodeid, location):
    if _log_file:
        _log_file.write(f"end {time.time():.2f} {nodeid}\n")


# -- the sampler and the report ------------------------------------------------------------------------------------
def sample_tree(proc: subprocess.Popen, period_s: float = 0.5) -> list[tuple[float, float]]:
    """(time, cumulative CPU seconds of the child and every descendant) until the child exits."""
    root = psutil.Process(proc.pid)
    live: dict[tuple[int, float], float] = {}
    ended = 0.0
    series = []
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        seen = set()
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                live[key] = t.user + t.system
                seen.add(key)
            except psutil.Error:
                continue
        for key in [k for k in live if k not in seen]:
            ended += live.pop(key)
        series.append((time.time(), ended + sum(live.values())))
        time.sleep(period_s)
    return series


def per_test(series: list[tuple[float, float]], log_lines: list[str]) -> list[tuple[str, float, float]]:
    times = [t for t, _ in series]

    def cpu_at(t: float) -> float:
        i = min(max(bisect.bisect_left(times, t), 0), len(series) - 1)
        return series[i][1]

    starts, rows = {}, []
    for line in log_lines:
        kind, t, nodeid = line.split(" ", 2)
        nodeid = nodeid.strip()
        if kind == "start":
            starts[nodeid] = float(t)
        elif nodeid in starts:
            rows.append((nodeid, float(t) - starts[nodeid], cpu_at(float(t)) - cpu_at(starts[nodeid])))
    return rows


def report(rows: list[tuple[str, float, float]], cores: int, top: int = 25) -> str:
    wall, cpu = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines = [f"{len(rows)} tests: wall {wall:.0f} s, CPU {cpu:.0f} s -> floor on {cores} cores {cpu / cores:.0f} s", "",
             "| module | wall s | CPU s | cores |", "| --- | ---: | ---: | ---: |"]
    modules = collections.defaultdict(lambda: [0.0, 0.0])
    for nodeid, w, c in rows:
        m = modules[nodeid.split("::")[0]]
        m[0] += w
        m[1] += c
    for name, (w, c) in sorted(modules.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {name} | {w:.0f} | {c:.0f} | {c / max(w, 1e-9):.2f} |")
    lines += ["", "| test | wall s | CPU s |", "| --- | ---: | ---: |"]
    for nodeid, w, c in sorted(rows, key=lambda r: -r[2])[:top]:
        lines.append(f"| {nodeid} | {w:.0f} | {c:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--command", help="a shell command to measure instead of pytest, e.g. 'CI=true bash .ci/run'")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.NamedTemporaryFile("r", suffix=".log", delete=False) as log:
        log_path = log.name
    env = {**os.environ, "SUITE_CPU_TEST_LOG": log_path,
           "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
    if args.command:
        # the command's own pytest loads the plugin; the sampler follows every process the command starts
        env["PYTEST_ADDOPTS"] = " ".join(filter(None, ["-p suite_cpu", os.environ.get("PYTEST_ADDOPTS")]))
        proc = subprocess.Popen(["bash", "-c", args.command], cwd=REPO, env=env)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "suite_cpu", *pytest_args], cwd=REPO, env=env)
    series = sample_tree(proc)
    rc = proc.wait()
    text = report(per_test(series, Path(log_path).read_text().splitlines()), psutil.cpu_count() or 1)
    if args.command and series:
        text = (f"`{args.command}`: exit {rc}, wall {series[-1][0] - series[0][0]:.0f} s, CPU {series[-1][1]:.0f} s "
                f"(set-up, lint and collection included)\n\n{text}")
    os.unlink(log_path)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())

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

The report ends with the CPU by process kind: each sample's growth is credited to what the process was doing then
(Ray renames a worker after the task or actor it runs: `ray::IDLE` until then, `ray::TrainController.run`,
`ray::ServeReplica:<app>:Generator.__init__`, ...), so a worker's start-up, a Ray Train actor, a Serve replica's
constructor and its requests, Ray's daemons and pytest itself each get their line. Processes that leave the tree
(a `ray start` head's daemons and workers) are not seen.
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
# What a process is doing, from its command line (Ray workers retitle theirs): the first rule that matches names it.
RAY_TRAIN_ACTORS = ("TrainController", "PlacementGroupCleaner", "SynchronizationActor", "DatasetManager",
                    "_AutoscalingCoordinatorActor", "PreemptionWatcher")
RAY_WORKER_IDLE = "Ray worker idle (its start-up, imports of the next task's module)"
RAY_DAEMONS = ("raylet", "gcs_server", "log_monitor", "dashboard", "monitor.py", "runtime_env", "DashboardAgent",
               "RuntimeEnvAgent")


def process_kind(cmdline: list[str]) -> str:
    """A short label for what the process with this command line is doing (see the module doc)."""
    if not cmdline:
        return "unknown"
    title = cmdline[0]
    if title.startswith("ray::"):
        name = title.split()[0][len("ray::"):]
        if name == "IDLE":
            return RAY_WORKER_IDLE
        if name.startswith("SERVE_REPLICA::"):  # the replica's title while its constructor runs
            return f"Serve replica {name.split('#')[1]}.__init__"
        if name.startswith("ServeReplica:"):
            deployment = name.split(":")[2]
            return f"Serve replica {deployment.split('.')[0]}{'.__init__' if deployment.endswith('.__init__') else ''}"
        if name.startswith(("ServeController", "SERVE_PROXY_ACTOR", "ProxyActor")):
            return "Serve controller and proxies"
        if name.startswith("RayTrainWorker"):
            return "Ray Train worker"
        if name.startswith(RAY_TRAIN_ACTORS):
            return "Ray Train's own actors"
        if any(daemon in name for daemon in RAY_DAEMONS):
            return "Ray daemons"
        return f"ray::{name.split('.')[0]}"
    line = " ".join(cmdline)
    if "default_worker.py" in line:
        return RAY_WORKER_IDLE
    if any(daemon in line for daemon in RAY_DAEMONS):
        return "Ray daemons"
    # pytest and its xdist workers (execnet's bootstrap); not a CLI whose arguments merely name a pytest tmp_path
    if os.path.basename(title) == "pytest" or " -m pytest" in line or "exec(eval(sys.stdin" in line:
        return "pytest"
    if " -m " in line:
        return "python -m " + line.split(" -m ", 1)[1].split()[0]
    return os.path.basename(title)


def sample_tree(proc: subprocess.Popen, period_s: float = 0.5,
                by_kind: collections.Counter | None = None) -> list[tuple[float, float]]:
    """(time, cumulative CPU seconds of the child and every descendant) until the child exits. `by_kind`, if given,
    gets each process's CPU growth between samples under its `process_kind` at that sample."""
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
                cpu = t.user + t.system
                if by_kind is not None:
                    by_kind[process_kind(p.cmdline())] += cpu - live.get(key, 0.0)
                live[key] = cpu
                seen.add(key)
            except psutil.Error:
                continue
        for key in [k for k in live if k not in seen]:
            ended += live.pop(key)
        series.append((time.time(), ended + sum(live.values())))
        time.sleep(period_s)
    return series


def kinds_report(by_kind: collections.Counter, top: int = 25) -> str:
    total = sum(by_kind.values()) or 1.0
    lines = ["| process kind | CPU s | share |", "| --- | ---: | ---: |"]
    for kind, cpu in by_kind.most_common(top):
        lines.append(f"| {kind} | {cpu:.0f} | {100 * cpu / total:.0f} % |")
    return "\n".join(lines)


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
    by_kind: collections.Counter = collections.Counter()
    series = sample_tree(proc, by_kind=by_kind)
    rc = proc.wait()
    text = report(per_test(series, Path(log_path).read_text().splitlines()), psutil.cpu_count() or 1)
    text += "\n\n" + kinds_report(by_kind)
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

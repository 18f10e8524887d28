"""`klein-style submit` and the example sweep as a real Ray job on a private `ray start` head.

The head runs in its own session (process group) with its own temp dir and free ports, so neither
`ray.init()` elsewhere on this machine nor other engineers' clusters see it, and tearing it down ends only
its processes (by pid), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import jobs, pools
from cluster.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 240
SWEEP_TIMEOUT_S = 1500  # the example takes ~2 minutes on two idle cores; a shared, busy machine is slower


def _processes() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, pgid, start time)} of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])  # ppid, pgrp, starttime
    return table


def _head_processes(head_pid: int) -> dict[int, str]:
    """The head's processes: its process group (daemons) and every descendant (Ray puts workers in groups of
    their own, but they are children of the head's raylet). {pid: start time}, to never signal a reused pid."""
    table = _processes()
    found = {pid: st for pid, (_, pgid, st) in table.items() if pgid == head_pid}
    if head_pid in table:
        found[head_pid] = table[head_pid][2]
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, st) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = st
                frontier.append(pid)
    return found


def _signal_if_same(pids: dict[int, str], sig: int) -> list[int]:
    table, alive = _processes(), []
    for pid, started in pids.items():
        if pid in table and table[pid][2] == started:
            alive.append(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return alive


def _end_head(head: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it stops the daemons it started), then end, by pid, whatever of the
    head's processes is left. Never `ray stop`: that would stop every Ray cluster on this machine."""
    pids = _head_processes(head.pid)  # before anything exits: orphans lose their link to the head
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=5)  # Ray's graceful stop takes ~30 s; the pids below are ours: end them sooner
        except subprocess.TimeoutExpired:
            pass
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        alive = _signal_if_same(pids, sig)
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = _signal_if_same(pids, 0)
    if head.poll() is None:
        head.wait(timeout=30)


def _head_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        env.pop(key, None)  # join nothing else; the judge runs offline (deterministic)
    # as on a real head: Ray gives each task and actor as many OpenMP threads as CPUs it holds. A value from
    # the caller's shell (say 2) would give two concurrent 1-CPU tasks 4 spinning threads on 2 cores. Under
    # pytest-xdist the worker's own share (tests/conftest.py) stays: the other worker's tests hold the other cores.
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        env.pop("OMP_NUM_THREADS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    # a one-node head with 2 CPUs, set up as init_local_ray sets up a local node (cluster/pools.py): its render worker
    # stays warm between checkpoints, and nothing watches for a preemption no single node can have
    env.setdefault(pools.WORKERS_SOFT_LIMIT_ENV, str(pools.LOCAL_WORKERS_SOFT_LIMIT))
    for key, value in pools.LOCAL_NODE_ENV.items():
        env.setdefault(key, value)
    return env


@pytest.fixture(scope="module")
def ray_head(tiny_dir):
    """A private head advertising both pools (2 training slots, 1 inference GPU unit) with the job server."""
    temp_dir = tempfile.mkdtemp(prefix="ks", dir="/tmp")  # short: Ray's unix sockets live under it
    dashboard, gcs, client_port, agent_http = free_ports(4)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--object-store-memory=300000000",
           '--resources={"train_gpu": 2, "infer_gpu": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--port={gcs}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_http}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "wb") as log_file:
        head = subprocess.Popen(cmd, env=_head_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                client = jobs.client(address)
                client.list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the head's job server did not answer in {HEAD_START_TIMEOUT_S} s:\n"
                                       f"{log_path.read_text()[-4000:]}") from None
                time.sleep(2)
        yield address
    finally:
        _end_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *command: str, extra: tuple[str, ...] = (), timeout: float = SWEEP_TIMEOUT_S + 120):
    """`klein-style submit` as a user runs it; returns (exit code, output)."""
    argv = [str(VENV_BIN / "klein-style"), "submit", "--address", address, *extra, "--", *command]
    proc = subprocess.run(argv, cwd=REPO, env=_head_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def test_submit_reports_the_job_status_as_its_exit_code(ray_head):
    code, out = _submit(ray_head, "python", "-c", "import sys; print('about to fail'); sys.exit(3)", timeout=600)
    assert code == 3, out
    submission_id = out.split("job ", 1)[1].split()[0]
    assert "about to fail" in out and f"job {submission_id}: FAILED - " in out and "exit code 3" in out
    client = jobs.client(ray_head)
    assert client.get_job_status(submission_id) == "FAILED"

    # --no-wait returns at once with the id; the entrypoint joins the cluster the job runs in (RAY_ADDRESS),
    # which advertises both pools
    probe = "import json, ray; ray.init(); print('RESOURCES', json.dumps(ray.cluster_resources()))"
    code, out = _submit(ray_head, "python", "-c", probe, extra=("--no-wait",), timeout=600)
    assert code == 0, out
    submission_id = out.split("job ", 1)[1].split()[0]
    result = jobs.wait(client, submission_id, stream=None, timeout_s=600)
    assert (result.status, result.exit_code, result.timed_out) == ("SUCCEEDED", 0, False)
    resources = json.loads("".join(result.logs).split("RESOURCES ", 1)[1].splitlines()[0])
    assert resources["train_gpu"] == 2 and resources["infer_gpu"] == 1


def test_submit_imports_only_its_own_command():
    """`klein-style submit` is a thin client of the job server: the command line imports only the module of the
    command it runs (cli/main.py), so it starts without torch, diffusers, Ray Train or Serve; `--help` lists all."""
    probe = ("import sys\nfrom cli.main import build_parser, command_of\n"
             "argv = ['-v', 'submit', '--address', 'http://127.0.0.1:1', '--', 'python', '-c', 'print(1)']\n"
             "args = build_parser(command_of(argv)).parse_args(argv)\n"
             "print(args.command, args.func.__module__, sorted(m for m in ('torch', 'diffusers', 'ray.train', 'ray.serve') "
             "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["submit", "cluster.jobs", "[]"], run.stdout
    from cli.main import COMMAND_MODULES, build_parser

    listed = build_parser().format_help()
    assert all(command in listed for command in COMMAND_MODULES)


def test_submit_refuses_clearly_without_a_job_server():
    port = free_port()
    code, out = _submit(f"http://127.0.0.1:{port}", "python", "-c", "print(1)", timeout=120)
    assert code == jobs.EXIT_SUBMIT_ERROR
    assert f"no Ray job server at http://127.0.0.1:{port}" in out


def test_example_sweep_runs_as_a_ray_job_and_resumes(ray_head, tmp_path):
    """`klein-style submit --working-dir . -- klein-style sweep --example`: 4 Ray Train jobs, samples, tables."""
    from cluster.storage import Storage

    storage_dir = tmp_path / "storage"
    started = time.monotonic()
    code, out = _submit(ray_head, "klein-style", "sweep", "--example", "--storage", str(storage_dir),
                        extra=("--working-dir", ".", "--timeout", str(SWEEP_TIMEOUT_S)))
    first_run_s = time.monotonic() - started
    assert code == 0, out[-6000:]
    assert out.rstrip().splitlines()[-1].endswith(": SUCCEEDED")
    # the job joined the head (no private cluster) and trained 2 cells at a time (2 train_gpu ÷ 1 per job)
    assert "concurrency 2 = 2 train_gpu ÷ 1 GPU(s) per job" in out
    assert out.count("trained in") == 4

    storage = Storage.from_uri(storage_dir)
    report_dir = "sweeps/example/report"
    manifest = storage.read_json(f"{report_dir}/manifest.json")
    for name, sha in manifest["files"].items():
        storage.read_verified(f"{report_dir}/{name}", sha)
    report = json.loads(storage.read_bytes(f"{report_dir}/report.json"))
    assert report["finished"] == report["cells"] == 4 and not report["failed"]
    assert report["judge"] == ["offline"] and "base model's image" in report["content_check"]

    tables = report["tables"]
    # the seeds' table: both variants, wins adding up to the comparisons (2 boards × 2 prompts × 2 seeds, 1 pair each)
    seeds = {row[0]: row for row in tables["seeds_table"]["rows"]}
    assert set(seeds) == {"GEM+A", "B_r128"}
    assert sum(int(r[1]) for r in seeds.values()) == 8 and all(int(r[2]) == 8 for r in seeds.values())
    assert all(r[3].endswith("%") and r[7] for r in seeds.values())
    # the dataset-size matrix has two bands, each with the auto policy's pick and agree/disagree
    matrix = {row[0]: row for row in tables["size_matrix"]["rows"]}
    assert set(matrix) == {"1–3", "10–15"}
    assert matrix["1–3"][-2] == "B_r128" and matrix["10–15"][-2] == "GEM+A"
    assert all(row[-1] in ("agree", "disagree") for row in matrix.values())
    # per board × variant and the convergence table cover every cell; val loss comes from the job manifests
    assert {(r[0], r[3]) for r in tables["board_variant"]["rows"]} == {
        (b, v) for b in ("neon3", "ukiyo12") for v in ("GEM+A", "B_r128")}
    for row in tables["convergence"]["rows"]:
        assert row[3] == "30" and row[4].count("@") == 2 and int(row[5]) in (15, 30) and int(row[6]) in (15, 30)
    assert {r[0] for r in tables["best_step"]["rows"]} == {"neon3", "ukiyo12"}
    # every (checkpoint, prompt, seed) sample was scored: 4 cells × 2 checkpoints × 2 prompts × 2 seeds
    assert len(tables["samples"]["rows"]) == 32
    assert all(float(r[5]) > 0 and -1.0 <= float(r[6]) <= 1.0 and float(r[7]) > 0 for r in tables["samples"]["rows"])

    # Markdown, CSV and PNG outputs, printed at the end of the job's log too
    md = storage.read_bytes(f"{report_dir}/report.md").decode()
    for title in ("Seeds' table", "Dataset size × variant", "Per board × variant", "Convergence", "Best step per board"):
        assert title in md and title in out
    assert "| GEM+A |" in md and "auto vs winner" in md
    csv_header = storage.read_bytes(f"{report_dir}/seeds_table.csv").decode().splitlines()[0]
    assert csv_header.startswith("variant,wins,comparisons,win rate")
    from PIL import Image

    for png in ("contact_sheets/neon3.png", "contact_sheets/ukiyo12.png", "seeds_table.png", "size_matrix.png",
                "convergence.png", "curves.png", "win_rates.png"):
        with Image.open(storage.local_path(f"{report_dir}/{png}")) as image:
            assert image.width > 100 and image.height > 50
    # every cell's LoRA went through the real job runner, with the cell's variant
    cell_manifests = [json.loads(p.read_text()) for p in sorted((storage_dir / "sweeps/example/cells").glob("*/manifest.json"))]
    assert len(cell_manifests) == 4
    for cell in cell_manifests:
        lora = storage.read_json(cell["lora_manifest"])
        assert lora["id"] == cell["job_id"] and lora["decision"]["variant"] == cell["variant"]
        assert lora["metrics"]["steps"] == 30 and [v["step"] for v in lora["metrics"]["val_curve"]] == [15, 30]

    # A re-run (the README's form, `python -m evaluation.sweep FILE`) skips every finished cell and rebuilds the tables.
    code, again = _submit(ray_head, "python", "-m", "evaluation.sweep", "evaluation/sweeps/example.yaml", "--storage",
                          str(storage_dir), extra=("--working-dir", ".", "--timeout", str(SWEEP_TIMEOUT_S)))
    assert code == 0, again[-6000:]
    assert again.count("finished earlier, skipped") == 4 and "trained in" not in again
    report_again = json.loads(storage.read_bytes(f"{report_dir}/report.json"))
    assert report_again["tables"]["seeds_table"] == tables["seeds_table"]
    assert report_again["tables"]["size_matrix"] == tables["size_matrix"]
    print(f"example sweep through `klein-style submit`: {first_run_s:.0f} s")

"""A stopped driver (`ray job stop` = SIGTERM, Ctrl-C = SIGINT) leaves its jobs "stopped", not "training"."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.storage import Storage
from contracts import status_key
from train.job import run_training_job
from train.recipe import TrainConfig
from train.status import STOPPED, is_stopped, mark_running_jobs_stopped

REPO = Path(__file__).resolve().parents[1]

# A sweep's driver: cells train in threads (evaluation.sweep.run_sweep) under stop_jobs_on_signals (cmd_sweep);
# each thread holds its job's JobStatus as run_training_job does, and sits where fit() would block.
SWEEP_DRIVER = textwrap.dedent("""
    import sys, threading, time
    from cluster.storage import Storage
    from train.status import JobStatus, stop_jobs_on_signals

    storage = Storage.from_uri(sys.argv[1])

    def cell(job_id, started):
        status = JobStatus(storage, job_id, "default")
        with status.running():
            status.stage = "training"
            status("training", step=3, steps=10)
            started.release()
            time.sleep(120)

    with stop_jobs_on_signals():
        started = threading.Semaphore(0)
        for job_id in ("cell-a", "cell-b"):
            threading.Thread(target=cell, args=(job_id, started), daemon=True).start()
        started.acquire(); started.acquire()
        print("training", flush=True)
        time.sleep(120)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_sweep_driver_leaves_its_cells_stopped(tmp_path, sig):
    driver = subprocess.Popen([sys.executable, "-c", SWEEP_DRIVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert driver.stdout.readline().strip() == "training"
        driver.send_signal(sig)
        assert driver.wait(timeout=20) == -sig  # it still dies of the signal, as `ray job stop` expects
    finally:
        driver.kill()
    storage = Storage.from_uri(tmp_path)
    for job_id in ("cell-a", "cell-b"):
        status = storage.read_json(status_key(job_id))
        assert status["state"] == STOPPED and status["stage"] == "training", status
        assert signal.Signals(sig).name in status["error"] and "submit the same job id again" in status["error"]
        assert is_stopped(storage, job_id)  # what the job's Ray Train workers check before writing "training"


def test_an_interrupt_in_the_jobs_own_thread_ends_it_stopped(tmp_path):
    """Ctrl-C while run_training_job runs in the main thread (klein-style train) is a KeyboardInterrupt there."""
    calls = []

    def progress(info):
        calls.append(info["state"])
        if info["state"] == "preparing":
            assert mark_running_jobs_stopped("probe") == ["job-int"]  # the job is known to the signal handler
            raise KeyboardInterrupt

    cfg = TrainConfig(job_id="job-int", storage=str(tmp_path), use_gpu=False)
    with pytest.raises(KeyboardInterrupt):
        run_training_job(tmp_path / "no-refs", cfg, progress=progress)
    status = Storage.from_uri(tmp_path).read_json(status_key("job-int"))
    assert status["state"] == STOPPED and "KeyboardInterrupt" in status["error"], status
    assert mark_running_jobs_stopped("after") == []  # a finished job is no longer marked by later signals

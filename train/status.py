"""A job's status.json as its driver writes it, and what happens to it when the driver is stopped.

`ray job stop` sends the driver SIGTERM (and SIGKILL a few seconds later); Ctrl-C sends SIGINT. Python dies of
SIGTERM without running any `except` or `finally`, and a sweep trains its cells in threads that sit inside
Ray Train's `fit()`, where the signal never arrives. Without `stop_jobs_on_signals` every cell that was training
would keep saying "training" forever. With it, the signal handler (main thread) writes "stopped" for every job
this process is running, then lets the signal end the process as it would have.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from cluster.storage import Storage, StorageError
from contracts import status_key

STOPPED = "stopped"
# the job's states after its LoRA is delivered (manifest written): the contact sheet, then the health report
RENDERING_SAMPLES = "rendering samples"
CHECKING_HEALTH = "checking health"
AFTER_DELIVERY = (RENDERING_SAMPLES, CHECKING_HEALTH)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class JobStatus:
    """Writes `jobs/<job_id>/status.json` for one job (`status("caching", ...)`); `stage` is what the job is
    doing now, for the line a failed or stopped job leaves behind."""

    def __init__(self, storage: Storage, job_id: str, tenant: str, progress: Callable[[dict], None] | None = None):
        self.storage, self.job_id, self.tenant, self.progress = storage, job_id, tenant, progress
        self.stage = "preparing"

    def __call__(self, state: str, **extra) -> dict:
        info = {"state": state, "job_id": self.job_id, "tenant": self.tenant, "updated": time.time(), **extra}
        self.storage.write_json(status_key(self.job_id), info)
        if self.progress:
            self.progress(info)
        return info

    def stopped(self, reason: str) -> dict:
        return self(STOPPED, error=f"job {self.job_id} stopped while {self.stage}: {reason}; its checkpoints are kept: "
                                  f"submit the same job id again to resume", stage=self.stage)

    @contextmanager
    def running(self) -> Iterator["JobStatus"]:
        """While inside, a stop signal (stop_jobs_on_signals) marks this job stopped."""
        with _RUNNING_LOCK:
            _RUNNING[self.job_id] = self
        try:
            yield self
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(self.job_id, None)


_RUNNING: dict[str, JobStatus] = {}  # job id -> its status writer, while this process runs the job
_RUNNING_LOCK = threading.Lock()


def mark_running_jobs_stopped(reason: str) -> list[str]:
    """Write "stopped" (with `reason`) for every job this process is running; returns their ids."""
    with _RUNNING_LOCK:
        running = list(_RUNNING.values())
    for job in running:
        try:
            job.stopped(reason)
        except (StorageError, OSError):  # storage unreachable: the other jobs still get their line
            pass
    return sorted(job.job_id for job in running)


@contextmanager
def stop_jobs_on_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While inside: on SIGTERM or SIGINT, mark the running jobs stopped, then die of the signal with its default
    action (the exit status `ray job stop` and shells expect). The previous handlers come back on leaving. Only
    the main thread receives signals: called from another thread it changes nothing."""

    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        mark_running_jobs_stopped(f"the driver received {name} (`ray job stop` or Ctrl-C)")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def is_stopped(storage: Storage, job_id: str) -> bool:
    """Whether the job's driver marked it stopped (its workers, which Ray kills a moment later, must not write
    "training" over that)."""
    try:
        return storage.read_json(status_key(job_id)).get("state") == STOPPED
    except StorageError:
        return False

"""Start a local Ray node through `init_local_ray` whose first GCS or raylet hangs; print what happened as JSON.

Run by `tests/test_pools.py` in subprocesses of their own, beside the module's tests: Ray waits 30 s for the first
node, and in a subprocess that wait costs no pytest worker its core. The daemon Ray starts (`gcs_server` or
`raylet`) is a script that, the first time, becomes a `sleep` (a child that never execs the daemon, as in the two
flaky full runs seen) and writes its pid; the next time it execs the real daemon.

    python tests/raylet_hangs_once.py FOLDER {gcs_server,raylet}
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import psutil
import ray
import ray._private.services

from cluster import pools


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@ray.remote(num_cpus=0)
def _pid() -> int:
    return os.getpid()


# the module constant Ray reads when it starts each daemon
EXECUTABLES = {"gcs_server": "GCS_SERVER_EXECUTABLE", "raylet": "RAYLET_EXECUTABLE"}


def main(folder: Path, daemon: str) -> dict:
    hung_pid_file = folder / "hung.pid"
    script = folder / daemon
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{hung_pid_file}" ]; then echo $$ > "{hung_pid_file}"; exec sleep 600; fi\n'
        f'exec "{getattr(ray._private.services, EXECUTABLES[daemon])}" "$@"\n'
    )
    script.chmod(0o755)
    setattr(ray._private.services, EXECUTABLES[daemon], str(script))
    warnings = _Warnings()
    logging.getLogger(pools.__name__).addHandler(warnings)
    pools.init_local_ray(num_cpus=1, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    try:
        hung_pid = int(hung_pid_file.read_text())
        try:
            hung_pid_running = psutil.Process(hung_pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            hung_pid_running = False
        children = psutil.Process().children(recursive=True)
        return {
            "hung_pid": hung_pid,
            "hung_pid_running": hung_pid_running,
            "gcs_servers": sum(child.name() == "gcs_server" for child in children),
            "raylets": sum(child.name() == "raylet" for child in children),
            "warnings": warnings.messages,
            "task_ran_elsewhere": ray.get(_pid.remote()) != os.getpid(),
        }
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), sys.argv[2])), flush=True)

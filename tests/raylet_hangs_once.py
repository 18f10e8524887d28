"""Start a local Ray node through `init_local_ray` whose first raylet hangs, and print what happened as JSON.

Run by `tests/test_pools.py` in a subprocess of its own, beside the module's tests: Ray waits a fixed 30 s for the
first node, and in a subprocess that wait costs no pytest worker its core. The raylet Ray starts is a script that,
the first time, becomes a `sleep` (a child that never execs the raylet, as in the one flaky full run seen) and writes
its pid; the next time it execs the real raylet.

    python tests/raylet_hangs_once.py FOLDER
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


def main(folder: Path) -> dict:
    hung_pid_file = folder / "hung.pid"
    script = folder / "raylet"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{hung_pid_file}" ]; then echo $$ > "{hung_pid_file}"; exec sleep 600; fi\n'
        f'exec "{ray._private.services.RAYLET_EXECUTABLE}" "$@"\n'
    )
    script.chmod(0o755)
    ray._private.services.RAYLET_EXECUTABLE = str(script)  # read when Ray starts a raylet
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
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))), flush=True)

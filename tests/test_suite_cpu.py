"""scripts/suite_cpu.py: the suite's CPU map credits each process's CPU to what it was doing."""

from __future__ import annotations

import collections
import subprocess
import sys

from scripts.suite_cpu import process_kind, sample_tree


def test_ray_titles_are_grouped_by_what_the_process_runs():
    assert process_kind(["ray::IDLE"]) == "Ray worker idle (its start-up, imports of the next task's module)"
    assert process_kind(["ray::TrainController.run"]) == process_kind(["ray::PlacementGroupCleaner"]) == "Ray Train's own actors"
    assert process_kind(["ray::RayTrainWorker.run_train_fn"]) == "Ray Train worker"
    assert process_kind(["ray::SERVE_REPLICA::klein-style#Ingress#r6f5wnxq:ServeReplica:klein-style:Ingress.__init__"]) \
        == process_kind(["ray::ServeReplica:klein-style:Ingress.__init__"]) == "Serve replica Ingress.__init__"
    assert process_kind(["ray::ServeReplica:klein-style-rel:Generator.handle_request_with_rejection"]) == "Serve replica Generator"
    assert process_kind(["ray::render_column"]) == "ray::render_column"
    assert process_kind(["/venv/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py", "--x"]) == "Ray daemons"
    assert process_kind(["/venv/bin/python", "-m", "cli.main", "demo", "--out", "/tmp/pytest-of-root/p0/demo"]) == "python -m cli.main"
    assert process_kind(["/venv/bin/python", "-m", "pytest", "-q"]) == process_kind(["/venv/bin/pytest"]) == "pytest"
    assert process_kind(["/venv/bin/python", "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))"]) == "pytest"


def test_a_child_processes_cpu_is_credited_to_its_kind():
    by_kind = collections.Counter()
    child = subprocess.Popen([sys.executable, "-m", "timeit", "-n", "1", "-r", "1", "sum(range(20_000_000))"],
                             stdout=subprocess.DEVNULL)
    series = sample_tree(child, period_s=0.05, by_kind=by_kind)
    assert by_kind["python -m timeit"] >= 0.2, by_kind
    # every CPU second the series counted is credited to some kind (the last sample of each process)
    assert abs(sum(by_kind.values()) - series[-1][1]) < 1e-6, (by_kind, series[-1])

"""cluster/pools: names, builders, and the FIFO queue on a local one-node Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import ray

from cluster import pools

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

pytestmark = pytest.mark.timeout(240)


# --- names and node side --------------------------------------------------------------------------


def test_pool_names_are_the_agreed_ones():
    assert pools.TRAIN_RESOURCE == "train_gpu"
    assert pools.INFER_RESOURCE == "infer_gpu"
    assert pools.TRAIN_NODE_LABELS == {"pool": "train"}
    assert pools.INFER_NODE_LABELS == {"pool": "infer"}


def test_node_pool_resources_one_unit_per_gpu_and_a_spare_for_cpu_replicas():
    assert pools.node_pool_resources("train", 8) == {"train_gpu": 8}
    assert pools.node_pool_resources("infer", 1) == {"infer_gpu": 2}
    with pytest.raises(pools.PoolError, match="unknown pool"):
        pools.node_pool_resources("gpu", 1)


def test_local_cluster_resources_advertise_both_pools():
    assert pools.local_cluster_resources() == {"train_gpu": 1.0, "infer_gpu": 2.0}
    assert pools.local_cluster_resources(train_slots=2, infer_gpus=0) == {"train_gpu": 2.0, "infer_gpu": 1.0}
    with pytest.raises(pools.PoolError):
        pools.local_cluster_resources(train_slots=0)


# --- training side ---------------------------------------------------------------------------------


def test_train_scaling_config_asks_one_train_gpu_per_worker_plus_gpu_cpu_memory():
    config = pools.train_scaling_config(2, use_gpu=True, cpus_per_worker=4, memory_per_worker=8 << 30, use_labels=False)
    assert config.num_workers == 2
    assert config.use_gpu is True
    assert config.placement_strategy == "PACK"
    assert config.label_selector is None
    per_worker = {"CPU": 4.0, "GPU": 1.0, "train_gpu": 1.0, "memory": float(8 << 30)}
    assert config.resources_per_worker == per_worker
    # What Ray Train itself will put in each placement-group bundle (its private accessor).
    assert config._resources_per_worker_not_none == per_worker
    assert pools.train_job_bundles(2, use_gpu=True, cpus_per_worker=4, memory_per_worker=8 << 30) == [per_worker] * 2


def test_cpu_only_training_still_asks_for_the_pool_resource():
    config = pools.train_scaling_config(1, use_gpu=False, use_labels=False)
    assert config.resources_per_worker == {"CPU": 1.0, "train_gpu": 1.0}
    assert config._resources_per_worker_not_none == {"CPU": 1.0, "train_gpu": 1.0}


def test_labels_are_added_when_asked_or_when_the_cluster_says_so(monkeypatch):
    assert pools.train_scaling_config(1, True, use_labels=True).label_selector == {"pool": "train"}
    monkeypatch.setenv(pools.POOL_LABELS_ENV, "1")
    assert pools.train_scaling_config(1, True).label_selector == {"pool": "train"}
    assert pools.serve_actor_options(1, 2)["label_selector"] == {"pool": "infer"}
    monkeypatch.setenv(pools.POOL_LABELS_ENV, "0")
    assert pools.train_scaling_config(1, True).label_selector is None
    assert "label_selector" not in pools.serve_actor_options(1, 2)


def test_strict_pack_is_allowed_and_spread_is_not():
    assert pools.train_scaling_config(4, True, placement_strategy="STRICT_PACK").placement_strategy == "STRICT_PACK"
    with pytest.raises(pools.PoolError, match="not allowed"):
        pools.train_scaling_config(2, True, placement_strategy="SPREAD")
    with pytest.raises(pools.PoolError, match="at least one worker"):
        pools.train_scaling_config(0, True)
    with pytest.raises(pools.PoolError, match="cpus_per_worker"):
        pools.train_scaling_config(1, True, cpus_per_worker=0)


# --- inference side ---------------------------------------------------------------------------------


def test_serve_actor_options_gpu_and_cpu_replicas():
    gpu = pools.serve_actor_options(num_gpus=1, num_cpus=4, memory=16 << 30, use_labels=False)
    assert gpu == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"infer_gpu": 1.0}, "memory": 16 << 30}
    cpu = pools.serve_actor_options(num_gpus=0, num_cpus=1, use_labels=False)
    assert cpu["resources"] == {"infer_gpu": pools.INFER_CPU_REPLICA_SHARE}
    # A full node of GPU replicas still leaves room for CPU-only replicas (the spare unit).
    node = pools.node_pool_resources("infer", 1)["infer_gpu"]
    assert gpu["resources"]["infer_gpu"] + 100 * cpu["resources"]["infer_gpu"] <= node + 1e-9
    with pytest.raises(pools.PoolError):
        pools.serve_actor_options(num_gpus=-1, num_cpus=1)


def test_serve_accepts_the_options_it_is_given(monkeypatch):
    """Serve validates ray_actor_options when the deployment is declared; ours must pass."""
    from ray import serve

    monkeypatch.setenv(pools.POOL_LABELS_ENV, "1")

    @serve.deployment(ray_actor_options=pools.serve_actor_options(num_gpus=0.5, num_cpus=1))
    class Generator:
        def __call__(self):
            return "ok"

    options = Generator.ray_actor_options
    assert options["resources"] == {"infer_gpu": 0.5}
    assert options["label_selector"] == {"pool": "infer"}


def test_queued_train_loop_keeps_the_loop_signature():
    import inspect

    def with_config(config):
        return config

    def without_config():
        return None

    assert len(inspect.signature(pools.queued_train_loop(with_config, "j")).parameters) == 1
    assert len(inspect.signature(pools.queued_train_loop(without_config, "j")).parameters) == 0


# --- on a local Ray: the same code path as the cluster -------------------------------------------


@pytest.fixture(scope="module")
def raylet_hangs_once(tmp_path_factory):
    """`tests/raylet_hangs_once.py` started in the background, once with a first GCS and once with a first raylet that
    hangs (~25 and ~40 s, most of it Ray's wait), checked by the module's last tests."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {
        daemon: subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "raylet_hangs_once.py"), str(tmp_path_factory.mktemp(daemon)), daemon],
            env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # Ray's wait for the GCS's port file is 30 s unless set (the raylet's is fixed): 15 s is ample for a real GCS
        for daemon, extra_env in (("gcs_server", {"RAY_gcs_server_port_wait_time_s": "15"}), ("raylet", {}))
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def local_ray(raylet_hangs_once):  # starts it first, beside this node
    if ray.is_initialized():  # a module before us left Ray running in this process
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        # Workers import `cluster.pools` and this module's functions by reference.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
        mp.delenv(pools.POOL_LABELS_ENV, raising=False)  # a laptop's node has no pool label
        resources = pools.init_local_ray(num_cpus=2, log_to_driver=False)
        try:
            yield resources
        finally:
            ray.shutdown()


def test_init_local_ray_advertises_the_pools(local_ray):
    assert local_ray["train_gpu"] == 1.0
    assert local_ray["infer_gpu"] == 2.0
    assert local_ray["CPU"] == 2.0
    with pytest.raises(pools.PoolError, match="already initialised"):
        pools.init_local_ray()


@ray.remote(num_cpus=0)
def _worker_env(keys: list[str], meet_in: str | None = None, meet_n: int = 0) -> dict:
    """This worker's pid and environment; with `meet_in`, it first waits until `meet_n` tasks have arrived there,
    so that `meet_n` of them run at once, each in its own worker process (however slowly workers start)."""
    if meet_in:
        Path(meet_in, f"{os.getpid()}-{time.monotonic_ns()}").touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(meet_in)) < meet_n and time.monotonic() < deadline:
            time.sleep(0.05)
    return {"pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_local_node_keeps_its_warm_worker_and_runs_no_preemption_watcher(local_ray, tmp_path):
    """A warm worker (the render worker: torch and a pipeline loaded) outlives its idle second although the node runs
    more worker processes than CPUs, as a Ray Train job's actors make it do (cluster/pools.py:
    LOCAL_WORKERS_SOFT_LIMIT); and the node's workers see Ray Train's preemption watcher off."""
    env = ray.get(_worker_env.remote(["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]))
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # set for the node's processes, not the caller's
    # six zero-CPU tasks that meet before they return: six worker processes at once, more than the node's 2 CPUs,
    # all warm, then all idle
    pids = {b["pid"] for b in ray.get([_worker_env.remote([], str(tmp_path), 6) for _ in range(6)])}
    assert len(pids) == 6, pids
    time.sleep(3.0)  # Ray ends idle workers over its soft limit after 1 s idle (idle_worker_killing_time_threshold_ms)
    assert all(_alive(pid) for pid in pids), {pid: _alive(pid) for pid in pids}


def test_reservation_is_all_or_nothing(local_ray):
    with pools.train_job_reservation(1, use_gpu=False, timeout_s=30) as held:
        table = ray.util.placement_group_table(held)
        assert table["state"] == "CREATED"
        assert table["strategy"] == "PACK"
        # The only training slot is taken: a second job cannot get its reservation.
        with pytest.raises(pools.TrainPoolFullError, match="could not hold"):
            pools.reserve_train_job(1, use_gpu=False, timeout_s=2)
    # A two-worker job needs two slots at once; one free slot is not enough, and nothing is held.
    with pytest.raises(pools.TrainPoolFullError):
        pools.reserve_train_job(2, use_gpu=False, cpus_per_worker=0.5, timeout_s=2)
    assert ray.available_resources().get("train_gpu") == 1.0


def _command_line(process: psutil.Process) -> str:
    """A process's command line; empty for one that ended while we looked (a zombie has none to read)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_queue_is_first_come_first_served(local_ray):
    queue = pools.TrainQueue.remote(lease_s=60)
    for job in ["a", "b", "c"]:
        ray.get(queue.join.remote(job))
    # the queue's worker imports its own module only (cluster.train_queue), not torch and Ray Train as pools does
    workers = [p for p in psutil.Process().children(recursive=True) if "ray::TrainQueue" in _command_line(p)]
    assert len(workers) == 1 and "libtorch" not in Path(f"/proc/{workers[0].pid}/maps").read_text(), workers
    assert "libtorch" in Path("/proc/self/maps").read_text()  # the check sees torch where it is (this process)
    assert ray.get(queue.join.remote("b")) == 1  # joining twice keeps the place
    assert ray.get(queue.wait_turn.remote("a", 0.1)) is True
    assert ray.get(queue.wait_turn.remote("b", 0.1)) is False
    ray.get(queue.started.remote("a"))
    assert ray.get(queue.wait_turn.remote("b", 1)) is True
    ray.get(queue.leave.remote("b"))  # e.g. failed before its workers started
    assert ray.get(queue.wait_turn.remote("c", 1)) is True
    assert ray.get(queue.started_order.remote()) == ["a"]
    with pytest.raises(ray.exceptions.RayTaskError, match="not in the training queue"):
        ray.get(queue.wait_turn.remote("zzz", 0.1))
    ray.kill(queue)


def test_queue_drops_a_job_whose_driver_went_silent(local_ray):
    # a lease of 3 s: the live driver's heartbeat and the checks below are a few actor calls, seconds apart at worst
    queue = pools.TrainQueue.remote(lease_s=3.0)
    ray.get(queue.join.remote("dead-driver"))
    ray.get(queue.join.remote("live"))
    time.sleep(2.0)
    ray.get(queue.heartbeat.remote("live"))
    time.sleep(1.5)  # dead-driver: 3.5 s silent, past its lease; live: 1.5 s since its heartbeat
    assert ray.get(queue.wait_turn.remote("live", 1)) is True
    assert ray.get(queue.waiting.remote()) == ["live"]
    ray.kill(queue)


def _report_nothing(config):
    return None


def test_turn_times_out_with_a_clear_error(local_ray):
    queue = pools.train_queue()
    ray.get(queue.join.remote("ahead"))
    try:
        with pytest.raises(pools.TrainPoolFullError, match="without reaching its head"):
            with pools.train_pool_turn("behind", timeout_s=1, poll_s=0.5):
                pass
        assert ray.get(queue.waiting.remote()) == ["ahead"]  # 'behind' left on the way out
    finally:
        ray.get(queue.leave.remote("ahead"))


def test_cpu_training_job_runs_through_the_pool_on_a_laptop(local_ray, tmp_path):
    """A CPU-only TorchTrainer run takes the same path as on the GPU cluster: queue, train_gpu, PG."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    with pools.train_pool_turn("laptop-job", poll_s=1):
        trainer = TorchTrainer(
            pools.queued_train_loop(_report_nothing, "laptop-job"),
            train_loop_config={},
            scaling_config=pools.train_scaling_config(1, use_gpu=False),
            run_config=RunConfig(name="laptop-job", storage_path=str(tmp_path)),
        )
        result = trainer.fit()
    assert result.error is None
    assert "laptop-job" in ray.get(pools.train_queue().started_order.remote())
    # Train frees its placement group as the run ends; the release reaches the resource view asynchronously
    deadline = time.monotonic() + 15
    while ray.available_resources().get("train_gpu") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("train_gpu") == 1.0  # Train freed its placement group


def test_a_driver_that_lost_its_place_joins_again(local_ray):
    queue = pools.train_queue()
    ray.get(queue.join.remote("paused-driver"))
    ray.get(queue.leave.remote("paused-driver"))  # as if its lease had run out
    pools._wait_for_turn(queue, "paused-driver", timeout_s=5, poll_s=0.5)
    assert ray.get(queue.waiting.remote()) == ["paused-driver"]
    ray.get(queue.leave.remote("paused-driver"))


@pytest.mark.parametrize("daemon", ["gcs_server", "raylet"])
def test_a_local_node_that_did_not_start_is_ended_and_started_again(raylet_hangs_once, daemon):
    """The first node's GCS or raylet hung: its processes are gone, the second node runs tasks, and the warning says
    what happened (`cluster.pools.RAY_NODE_STARTUP_TIMEOUTS`)."""
    proc = raylet_hangs_once[daemon]
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    result = json.loads(output.split("RESULT ", 1)[1])
    assert not result["hung_pid_running"]
    assert result["gcs_servers"] == 1 and result["raylets"] == 1  # the first node's GCS was ended too
    [warning] = [message for message in result["warnings"] if "did not start" in message]
    assert f"sleep({result['hung_pid']})" in warning and "attempt 2 of 2" in warning
    assert result["task_ran_elsewhere"]

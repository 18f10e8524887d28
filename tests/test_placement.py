"""The pools on a simulated multi-node cluster with Ray's fake autoscaler (autoscaler v2).

One Ray cluster for the whole module, started like a real one from an autoscaling config:
- a CPU head (no GPU, no pool resource),
- `train_gpu` node type: min 0, max 2 nodes, each with one fake GPU and one `train_gpu`, label pool=train,
- `infer_gpu` node type: exactly 1 node, one fake GPU, `infer_gpu` per `node_pool_resources`, label pool=infer.
Nodes are real raylets started on this machine by the fake node provider; GPUs are logical.

(a) three one-GPU TorchTrainer jobs: the training pool grows to its max of two nodes, two jobs run,
    the third queues (first come, first served) and runs after one finishes; every worker is on a
    training node.
(b) Serve replicas (GPU and CPU-only) land only on the inference node.
(c) a pending reservation adds a training node, the inference pool is left alone, and idle
    training nodes are removed.

The module runs with KLEIN_POOL_LABELS=1, as the production configs do, so the label selectors
are exercised too. The cluster is torn down by process id (never `ray stop`, which would kill
every Ray process on the machine) and never writes /tmp/ray/ray_current_cluster, so Ray sessions
of other test runs on this machine are left alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

import ray
import ray._common.utils
import ray._private.services
import ray._private.utils
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import Cluster

from cluster import pools
from cluster.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
MiB = 1024 * 1024

TRAIN_NODE_TYPE = "train_gpu"
INFER_NODE_TYPE = "infer_gpu"
TRAIN_MAX_NODES = 2
RECORDER_NAME = "placement-recorder"
RECORDER_NAMESPACE = "klein-style-tests"
IDLE_TIMEOUT_S = 6

pytestmark = pytest.mark.timeout(300)


# --- the cluster -------------------------------------------------------------------------------------


def fake_autoscaling_config(gcs_address: str) -> dict:
    """A cluster-launcher config like ray_config.yaml, for Ray's fake multi-node provider.

    The provider is named through `external` because Ray's wheel does not ship the defaults file
    that `type: fake_multinode` loads.
    """
    object_store = 100 * MiB  # the fake provider passes this to each node's `ray start`
    return {
        "cluster_name": "klein-style-fake",
        "max_workers": TRAIN_MAX_NODES + 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
        },
        "auth": {},
        "cluster_synced_files": [],
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            TRAIN_NODE_TYPE: {
                "resources": {
                    "CPU": 2,
                    "GPU": 1,
                    **pools.node_pool_resources(pools.TRAIN_POOL, 1),
                    "object_store_memory": object_store,
                },
                "labels": pools.node_pool_labels(pools.TRAIN_POOL),
                "node_config": {},
                "min_workers": 0,
                "max_workers": TRAIN_MAX_NODES,
            },
            INFER_NODE_TYPE: {
                "resources": {
                    "CPU": 2,
                    "GPU": 1,
                    **pools.node_pool_resources(pools.INFER_POOL, 1),
                    "object_store_memory": object_store,
                },
                "labels": pools.node_pool_labels(pools.INFER_POOL),
                "node_config": {},
                "min_workers": 1,
                "max_workers": 1,
            },
        },
    }


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """Start the head (with the autoscaler's monitor) and connect; tear everything down after."""
    if ray.is_initialized():  # a module before us left Ray running in this process
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("fake-cluster")
    port = free_port()
    gcs_address = f"{ray._private.services.get_node_ip_address()}:{port}"
    config_path = tmp / "autoscaling.json"
    config_path.write_text(json.dumps(fake_autoscaling_config(gcs_address)))

    with pytest.MonkeyPatch.context() as mp:
        # Never point other sessions' `ray.init()` at this cluster, nor delete their address file.
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        # Workers import `cluster.pools` and this module's functions by reference.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
        mp.setenv(pools.POOL_LABELS_ENV, "1")
        mp.setenv("RAY_FAKE_CLUSTER", "1")
        mp.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        mp.setenv("RAY_enable_autoscaler_v2", "1")
        # Only the head's processes take the fake head's ids; worker nodes get theirs from the provider.
        with pytest.MonkeyPatch.context() as head_only:
            head_only.setenv("RAY_CLOUD_INSTANCE_ID", FAKE_HEAD_NODE_ID)
            head_only.setenv("RAY_OVERRIDE_NODE_ID_FOR_TESTING", FAKE_HEAD_NODE_ID)
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 1,
                    "include_dashboard": False,
                    "gcs_server_port": port,
                    "object_store_memory": 100 * MiB,
                    "autoscaling_config": str(config_path),
                },
            )
        monitor = cluster.head_node.all_processes["monitor"][0].process
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            wait_for_pools(lambda p: len(p[pools.INFER_POOL]) == 1, 90, "the inference node (min_workers=1)")
            yield cluster
        finally:
            # The fake worker nodes are children of the autoscaler's monitor: collect them by pid
            # before the head goes, then end exactly those.
            node_processes = psutil.Process(monitor.pid).children(recursive=True) if monitor.poll() is None else []
            ray.shutdown()
            cluster.shutdown()
            pools.end_processes(node_processes)


def nodes_by_pool() -> dict[str, list[str]]:
    """Alive node ids per pool label ('head' for the unlabelled head)."""
    by_pool: dict[str, list[str]] = {pools.TRAIN_POOL: [], pools.INFER_POOL: [], "head": []}
    for node in ray.nodes():
        if node["Alive"]:
            by_pool[node.get("Labels", {}).get(pools.POOL_LABEL_KEY, "head")].append(node["NodeID"])
    return by_pool


def wait_for_pools(predicate, timeout_s: float, what: str) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = nodes_by_pool()
        if predicate(current):
            return current
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; pools now: {nodes_by_pool()}")


# --- a recorder the workers and replicas report to ------------------------------------------------


@ray.remote(num_cpus=0)
class Recorder:
    def __init__(self):
        self._events: list[dict] = []

    def record(self, event: dict) -> None:
        self._events.append(event)

    def events(self) -> list[dict]:
        return list(self._events)

    def started_jobs(self) -> int:
        return len({e["job"] for e in self._events if e.get("what") == "start"})


@pytest.fixture
def recorder(fake_cluster):
    handle = Recorder.options(name=RECORDER_NAME, namespace=RECORDER_NAMESPACE).remote()
    yield handle
    ray.kill(handle)


def _recorder():
    return ray.get_actor(RECORDER_NAME, namespace=RECORDER_NAMESPACE)


# --- (b) Serve replicas only on the inference node -------------------------------------------------


def test_serve_replicas_land_only_on_the_inference_node(fake_cluster, recorder):
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options=pools.serve_actor_options(num_gpus=0.5, num_cpus=0.25))
    class Generator:
        def __init__(self):
            _recorder().record.remote({"deployment": "Generator", "node": ray.get_runtime_context().get_node_id()})

        def __call__(self) -> str:
            return ray.get_runtime_context().get_node_id()

    @serve.deployment(ray_actor_options=pools.serve_actor_options(num_gpus=0, num_cpus=0.25))
    class Ingress:
        def __init__(self, generator):
            self._generator = generator
            _recorder().record.remote({"deployment": "Ingress", "node": ray.get_runtime_context().get_node_id()})

        async def __call__(self) -> dict:
            return {"ingress": ray.get_runtime_context().get_node_id(), "generator": await self._generator.remote()}

    infer_node = nodes_by_pool()[pools.INFER_POOL][0]
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(Ingress.bind(Generator.bind()), name="placement", route_prefix=None)
        answers = [handle.remote().result(timeout_s=60) for _ in range(4)]
        replicas = ray.get(recorder.events.remote())
    finally:
        serve.shutdown()

    assert sorted(r["deployment"] for r in replicas) == ["Generator", "Generator", "Ingress"]
    assert {r["node"] for r in replicas} == {infer_node}, "a Serve replica landed outside the inference pool"
    assert {a["ingress"] for a in answers} | {a["generator"] for a in answers} == {infer_node}
    # Two half-GPU replicas took 1.0 infer_gpu and the CPU-only ingress its 0.01 sliver: the spare
    # unit the inference node advertises is what lets all three fit on one one-GPU node.
    assert nodes_by_pool()[pools.TRAIN_POOL] == [], "Serve demand started a training node"


# --- (a) three one-GPU training jobs: two run, one queues ------------------------------------------


JOB_HOLD_S = 4.0  # how long each job trains once the pool is known to be full
JOB_MAX_WAIT_S = 90.0


def train_loop_reporting_node(config):
    """One training worker: say where and when it ran, and hold its GPU for a while.

    A job keeps training until at least `hold_until_started` jobs have started (bounded), then
    `hold_s` more: job-1 is then certainly still running when job-2 starts, whatever the start-up
    latency of this machine, so the test shows two at once without depending on timing.
    """
    import ray.train

    recorder = _recorder()
    node = ray.get_runtime_context().get_node_id()
    rank = ray.train.get_context().get_world_rank()
    recorder.record.remote({"job": config["job"], "what": "start", "node": node, "rank": rank, "t": time.time()})
    deadline = time.monotonic() + JOB_MAX_WAIT_S
    while ray.get(recorder.started_jobs.remote()) < config["hold_until_started"] and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(config["hold_s"])
    recorder.record.remote({"job": config["job"], "what": "end", "node": node, "rank": rank, "t": time.time()})


def run_training_job(job_id: str, storage_path: str, errors: dict) -> None:
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        with pools.train_pool_turn(job_id, poll_s=2.0):
            trainer = TorchTrainer(
                pools.queued_train_loop(train_loop_reporting_node, job_id),
                train_loop_config={"job": job_id, "hold_until_started": TRAIN_MAX_NODES, "hold_s": JOB_HOLD_S},
                scaling_config=pools.train_scaling_config(num_workers=1, use_gpu=True),
                # The GPUs are logical: gloo instead of NCCL, and the loop never touches CUDA.
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name=job_id, storage_path=storage_path),
            )
            trainer.fit()
    except BaseException as e:  # reported to the test thread
        errors[job_id] = e


def test_three_one_gpu_jobs_two_run_one_queues_all_on_training_nodes(fake_cluster, recorder, tmp_path):
    jobs = ["job-1", "job-2", "job-3"]
    queue = pools.train_queue()
    for job in jobs:  # arrival order
        ray.get(queue.join.remote(job))

    errors: dict[str, BaseException] = {}
    threads = [threading.Thread(target=run_training_job, args=(job, str(tmp_path), errors)) for job in jobs]
    peak_train_nodes = 0
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        current = nodes_by_pool()
        peak_train_nodes = max(peak_train_nodes, len(current[pools.TRAIN_POOL]))
        assert len(current[pools.INFER_POOL]) == 1, "training demand changed the inference pool"
        time.sleep(0.5)
    assert not errors, f"training jobs failed: {errors}"

    events = ray.get(recorder.events.remote())
    runs = {
        job: {
            "node": next(e["node"] for e in events if e["job"] == job and e["what"] == "start"),
            "start": next(e["t"] for e in events if e["job"] == job and e["what"] == "start"),
            "end": next(e["t"] for e in events if e["job"] == job and e["what"] == "end"),
        }
        for job in {e["job"] for e in events}
    }
    assert sorted(runs) == jobs

    # Queue order: admitted first come, first served.
    assert ray.get(queue.started_order.remote())[-3:] == jobs

    # Every worker ran on a training node, and the pool grew to (and stopped at) its max.
    node_labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
    for job, run in runs.items():
        assert node_labels[run["node"]].get(pools.POOL_LABEL_KEY) == pools.TRAIN_POOL, f"{job} ran off the training pool"
    assert peak_train_nodes == TRAIN_MAX_NODES

    # Two ran at once; the third waited for one of them to finish, then ran.
    first, second, third = (runs[j] for j in jobs)
    assert first["start"] < second["start"] < first["end"], "job-1 and job-2 should have overlapped"
    assert third["start"] >= min(first["end"], second["end"]), "job-3 started while the pool was full"
    intervals = [(r["start"], r["end"]) for r in runs.values()]
    most_at_once = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert most_at_once == TRAIN_MAX_NODES


# --- (c) autoscaling: training demand grows the training pool only; idle nodes go -------------------


def test_training_demand_scales_only_the_training_pool_and_idle_nodes_are_removed(fake_cluster):
    # Start from an empty training pool (nodes left by earlier tests go once idle).
    before = wait_for_pools(lambda p: p[pools.TRAIN_POOL] == [], 60 + IDLE_TIMEOUT_S, "an empty training pool")
    infer_before = before[pools.INFER_POOL]

    # A pending one-GPU training reservation is demand only a training node can meet.
    reservation = pools.reserve_train_job(num_workers=1, use_gpu=True, timeout_s=90)
    try:
        grown = nodes_by_pool()
        assert len(grown[pools.TRAIN_POOL]) == 1, "one pending one-GPU job should add exactly one training node"
        assert grown[pools.INFER_POOL] == infer_before, "training demand touched the inference pool"
        assert grown["head"] == before["head"]
        placed_on = ray.util.placement_group_table(reservation)["bundles_to_node_id"][0]
        assert placed_on == grown[pools.TRAIN_POOL][0]
    finally:
        pools.release_train_job(reservation)

    # Idle training nodes go after the idle timeout; the inference node (min_workers=1) stays.
    after = wait_for_pools(lambda p: p[pools.TRAIN_POOL] == [], 60 + IDLE_TIMEOUT_S, "idle training nodes to be removed")
    assert after[pools.INFER_POOL] == infer_before

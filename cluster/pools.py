"""The two GPU pools, and the Ray options every other package builds from them.

A Klein Style cluster has three kinds of node:

- a CPU head: control plane only (GCS, Serve controller, Train controllers, job drivers);
  it advertises no GPU and no pool resource, so no GPU work can land on it;
- the training pool: nodes labelled ``pool=train`` that advertise ``train_gpu`` (one unit per GPU);
- the inference pool: nodes labelled ``pool=infer`` that advertise ``infer_gpu`` (one unit per GPU,
  plus one spare unit shared by CPU-only Serve replicas, see ``node_pool_resources``).

Isolation rests on the custom resources: a training worker asks for one ``train_gpu``, a Serve
replica asks for ``infer_gpu``, and a node only has the resource of its own pool, so no training
worker can land on an inference node and no Serve replica on a training node. This works the same
with autoscaler v1 and v2, on a laptop, on VMs (``ray_config.yaml``) and on KubeRay (``k8s/``).
On top of that, Ray 2.60 schedules by node label (``label_selector`` on tasks/actors, Serve
``ray_actor_options``, Train ``ScalingConfig`` and placement-group bundles) and autoscaler v2
scales for it. Every cluster config here labels its nodes ``pool=train|infer``; the builders add
the matching ``label_selector`` as a second guard when ``use_labels`` is true, or by default when
``KLEIN_POOL_LABELS=1`` is set (the cluster configs set it; a laptop's single node has no pool
label, so the default is off there).

How a training job reserves its resources (verified in the Ray 2.60 source,
``ray/train/v2/_internal/execution/worker_group/worker_group.py``): ``TorchTrainer.fit()`` starts a
controller actor (``num_cpus=0``, pinned to the driver's node) which creates ONE placement group per
run with ``bundles=[resources_per_worker] * num_workers``, ``strategy=placement_strategy`` and
``bundle_label_selector=label_selector``, and waits for it before creating any worker. A placement
group is atomic (all bundles or none), so each job holds all its GPUs, CPUs and memory at once or
nothing. If the group is not placed within ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) the
controller removes it and tries again; ``FailureConfig.controller_failure_limit`` defaults to -1,
so it retries for ever: a job waits for room instead of failing. Ray gives no first-come order
between waiting groups (the GCS retries pending groups by back-off time, and a small group can
overtake a large one), so ``train_pool_turn`` adds a FIFO queue in front: only the job at the head
of the queue has a placement group pending; it leaves the queue as soon as its workers run.
``train_job_bundles``/``reserve_train_job`` build the same bundles explicitly for work that is not
a TorchTrainer run but must hold training-pool resources (e.g. a cache pass on the training GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Literal

import psutil
import ray
import ray.train
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

# the queue actor lives in a module without torch (its worker imports only that module); its names stay here too
from cluster.train_queue import (  # noqa: F401  (re-exported: cluster.pools is where callers find the pool API)
    TRAIN_QUEUE_ACTOR_NAME,
    TRAIN_QUEUE_NAMESPACE,
    PoolError,
    TrainPoolFullError,
    TrainQueue,
)

logger = logging.getLogger(__name__)

# --- names ----------------------------------------------------------------------------------------

TRAIN_RESOURCE = "train_gpu"
INFER_RESOURCE = "infer_gpu"

POOL_LABEL_KEY = "pool"
TRAIN_POOL = "train"
INFER_POOL = "infer"
TRAIN_NODE_LABELS = {POOL_LABEL_KEY: TRAIN_POOL}
INFER_NODE_LABELS = {POOL_LABEL_KEY: INFER_POOL}

POOL_RESOURCES = {TRAIN_POOL: TRAIN_RESOURCE, INFER_POOL: INFER_RESOURCE}

# Set to "1" on clusters whose nodes carry `pool=` labels (ray_config.yaml and k8s/ do).
POOL_LABELS_ENV = "KLEIN_POOL_LABELS"

# A CPU-only Serve replica (ingress, style stage) still has to stay in the inference pool, so it
# takes a sliver of `infer_gpu`. Inference nodes advertise one spare unit above their GPU count for
# these slivers, so they never eat into the units that GPU replicas need (100 CPU replicas per node).
INFER_CPU_REPLICA_SHARE = 0.01
INFER_SPARE_UNITS = 1

DEFAULT_CPUS_PER_TRAIN_WORKER = 1.0
PlacementStrategy = Literal["PACK", "STRICT_PACK"]
_ALLOWED_TRAIN_STRATEGIES = ("PACK", "STRICT_PACK")

# --- node side: what a node of each pool advertises ----------------------------------------------


def node_pool_resources(pool: str, num_gpus: int) -> dict[str, float]:
    """The custom resources a node of `pool` with `num_gpus` GPUs advertises.

    Every cluster definition (ray_config.yaml, k8s/, the test clusters) must agree with this;
    tests/test_cluster_configs.py checks that they do.
    """
    if pool not in POOL_RESOURCES:
        raise PoolError(f"unknown pool {pool!r}: use {TRAIN_POOL!r} or {INFER_POOL!r}")
    if num_gpus < 0:
        raise PoolError(f"a node cannot have {num_gpus} GPUs")
    if pool == TRAIN_POOL:
        return {TRAIN_RESOURCE: num_gpus}
    return {INFER_RESOURCE: num_gpus + INFER_SPARE_UNITS}


def node_pool_labels(pool: str) -> dict[str, str]:
    """The Ray node labels of a node in `pool`."""
    if pool not in POOL_RESOURCES:
        raise PoolError(f"unknown pool {pool!r}: use {TRAIN_POOL!r} or {INFER_POOL!r}")
    return {POOL_LABEL_KEY: pool}


def local_cluster_resources(train_slots: int = 1, infer_gpus: int = 1) -> dict[str, float]:
    """Custom resources for a one-node dev cluster (`ray.init(resources=...)`).

    On a CPU-only machine a training job still asks for `train_gpu`, so placement takes the same
    code path as on the GPU cluster; `train_slots` is how many training workers may run at once.
    """
    if train_slots < 1:
        raise PoolError("a local cluster needs at least one training slot")
    return {
        TRAIN_RESOURCE: float(train_slots),
        **node_pool_resources(INFER_POOL, infer_gpus),
    }


# Ray ends a worker process that has been idle for a second once its node runs more worker processes than it has
# CPUs (Ray's `num_workers_soft_limit`, by default the CPU count). A Ray Train job's own actors alone (controller,
# placement-group cleaner, synchronization, dataset manager, the training workers) pass 2 or 4, so on a small local
# node the inference pool's render worker — torch, diffusers and the cached pipeline loaded, ~10 CPU-s — was ended
# between two checkpoints and started again for the next column: the example sweep started five. A local node
# keeps up to 16 worker processes (measured: the sweep's one render worker, 353 -> 318 CPU-s).
LOCAL_WORKERS_SOFT_LIMIT = 16
WORKERS_SOFT_LIMIT_ENV = "RAY_num_workers_soft_limit"
# A one-node local cluster has no node to be preempted: Ray Train's preemption watcher (an actor per run, ~2 CPU-s
# to start) has nothing to watch there.
LOCAL_NODE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# What Ray 2.60 raises when a new node's daemons do not come up within its waits (`ray/_private/node.py`): the GCS has
# not written its port file after 30 s (`RAY_gcs_server_port_wait_time_s`), or the raylet has not registered with the
# GCS after a fixed 30 s. Each seen once in ~17 full test runs, in a pytest worker that had started and stopped Ray
# instances before: the daemon never started (no log, no socket, no port file), and gRPC had warned at that fork
# that "other threads are currently calling into gRPC" (Ray forks its daemons with a `preexec_fn`). Ray leaves the
# half-started node's processes running and unowned: `ray.shutdown()` does not know them.
RAY_NODE_STARTUP_TIMEOUTS = ("The current node timed out during startup", "Timed out waiting for file")
LOCAL_RAY_START_ATTEMPTS = 2


def init_local_ray(
    num_cpus: int = 2,
    object_store_memory: int = 300 * 1024 * 1024,
    *,
    train_slots: int = 1,
    infer_gpus: int = 1,
    num_gpus: int | None = None,
    **init_kwargs: Any,
) -> dict[str, Any]:
    """Start a fresh local Ray instance that advertises both pool resources; no dashboard.

    `address="local"` makes sure we start our own instance rather than join whatever cluster a
    `ray start` on this machine left behind. Returns `ray.cluster_resources()`.

    Without the dashboard the State API is absent, so Ray Train's placement-group cleaner (which
    frees a run's placement group if its controller dies abruptly) only logs warnings; fine for a
    laptop, which is why the cluster configs keep the dashboard on the head.

    The node keeps its warm worker processes (`LOCAL_WORKERS_SOFT_LIMIT`) and runs no Ray Train preemption watcher
    (`LOCAL_NODE_ENV`); a `_system_config`, `RAY_num_workers_soft_limit` or watcher variable of the caller's wins.

    When Ray's node does not come up within Ray's own waits (`RAY_NODE_STARTUP_TIMEOUTS`), the processes it had started
    are ended and a fresh node is started once more, with a warning; a second failure is a `PoolError`.
    """
    if ray.is_initialized():
        raise PoolError("Ray is already initialised in this process; call ray.shutdown() first")
    init_kwargs.setdefault("address", "local")
    init_kwargs.setdefault("include_dashboard", False)
    system_config = dict(init_kwargs.pop("_system_config", None) or {})
    if WORKERS_SOFT_LIMIT_ENV not in os.environ:  # the caller's own RAY_num_workers_soft_limit wins
        system_config.setdefault("num_workers_soft_limit", max(num_cpus, LOCAL_WORKERS_SOFT_LIMIT))
    # The node's daemons and workers inherit the environment ray.init starts them with; the caller's value wins.
    node_env = {k: v for k, v in LOCAL_NODE_ENV.items() if k not in os.environ}
    os.environ.update(node_env)
    try:
        for attempt in range(1, LOCAL_RAY_START_ATTEMPTS + 1):
            children_before = {child.pid for child in psutil.Process().children(recursive=True)}
            try:
                ray.init(
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    object_store_memory=object_store_memory,
                    resources=local_cluster_resources(train_slots, infer_gpus),
                    _system_config=system_config,
                    **init_kwargs,
                )
                break
            except Exception as error:  # Ray raises a bare Exception or a RuntimeError for these
                if not any(timeout in str(error) for timeout in RAY_NODE_STARTUP_TIMEOUTS):
                    raise
                ended = _end_processes_started_since(children_before)
                if attempt == LOCAL_RAY_START_ATTEMPTS:
                    raise PoolError(
                        f"the local Ray node did not start in {attempt} attempts ({error}); its processes were ended "
                        f"({ended}). Check the machine's load and free memory, and the GCS's and raylet's logs in Ray's "
                        "session folder (by default /tmp/ray/session_latest/logs)."
                    ) from error
                logger.warning(
                    "the local Ray node did not start (%s); ended the %d processes it had started (%s) and starting "
                    "a fresh one (attempt %d of %d)", error, len(ended), ended, attempt + 1, LOCAL_RAY_START_ATTEMPTS,
                )
    finally:
        for key in node_env:
            os.environ.pop(key, None)
    return ray.cluster_resources()


def _end_processes_started_since(children_before: set[int]) -> list[str]:
    """Kill this process's descendants that were not among `children_before`: a half-started Ray node's daemons.

    A child stuck between fork and exec still has this process's command line, so it is found by being new, not by
    its name.
    """
    descendants = psutil.Process().children(recursive=True)
    return end_processes([child for child in descendants if child.pid not in children_before])


def end_processes(processes: list[psutil.Process]) -> list[str]:
    """SIGKILL `processes` (those already gone are skipped) and wait up to 10 s for them; "name(pid)" of each ended."""
    ended = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            ended.append(f"{process.name()}({process.pid})")
            process.kill()
    psutil.wait_procs(processes, timeout=10)
    return ended


# --- labels -----------------------------------------------------------------------------------------


def pool_labels_enabled() -> bool:
    """True when this cluster's nodes carry `pool=` labels (KLEIN_POOL_LABELS=1)."""
    return os.environ.get(POOL_LABELS_ENV, "0") == "1"


def pool_label_selector(pool: str) -> dict[str, str]:
    """The `label_selector` that keeps a task or actor on nodes of `pool`."""
    return node_pool_labels(pool)


def _use_labels(use_labels: bool | None) -> bool:
    return pool_labels_enabled() if use_labels is None else use_labels


# --- training side -----------------------------------------------------------------------------------


def train_worker_resources(
    use_gpu: bool,
    cpus_per_worker: float = DEFAULT_CPUS_PER_TRAIN_WORKER,
    memory_per_worker: int | None = None,
) -> dict[str, float]:
    """What one training worker holds: one `train_gpu`, its GPU (if any), CPUs and memory."""
    if cpus_per_worker <= 0:
        raise PoolError(f"cpus_per_worker must be positive, got {cpus_per_worker}")
    if memory_per_worker is not None and memory_per_worker <= 0:
        raise PoolError(f"memory_per_worker must be a positive byte count, got {memory_per_worker}")
    resources: dict[str, float] = {"CPU": float(cpus_per_worker), TRAIN_RESOURCE: 1.0}
    if use_gpu:
        resources["GPU"] = 1.0
    if memory_per_worker is not None:
        resources["memory"] = float(memory_per_worker)
    return resources


def _check_train_job(num_workers: int, placement_strategy: str) -> None:
    if not isinstance(num_workers, int) or num_workers < 1:
        raise PoolError(f"a training job needs at least one worker, got num_workers={num_workers!r}")
    if placement_strategy not in _ALLOWED_TRAIN_STRATEGIES:
        raise PoolError(
            f"placement_strategy {placement_strategy!r} is not allowed for training jobs: use PACK "
            "(fewest nodes, may span several) or STRICT_PACK (all workers on one node)"
        )


def train_scaling_config(
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float = DEFAULT_CPUS_PER_TRAIN_WORKER,
    memory_per_worker: int | None = None,
    *,
    placement_strategy: PlacementStrategy = "PACK",
    use_labels: bool | None = None,
) -> "ray.train.ScalingConfig":
    """The Ray Train `ScalingConfig` of a training job in the training pool.

    Each worker asks for `{"train_gpu": 1}` plus its GPU/CPU/memory; Train places all of them in one
    placement group (all or nothing) with `placement_strategy`.
    """
    import ray.train  # late: importing ray.train pulls in torch-side modules

    _check_train_job(num_workers, placement_strategy)
    return ray.train.ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=train_worker_resources(use_gpu, cpus_per_worker, memory_per_worker),
        placement_strategy=placement_strategy,
        label_selector=pool_label_selector(TRAIN_POOL) if _use_labels(use_labels) else None,
    )


def train_job_bundles(
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float = DEFAULT_CPUS_PER_TRAIN_WORKER,
    memory_per_worker: int | None = None,
) -> list[dict[str, float]]:
    """The placement-group bundles of a training job: one per worker, as Train itself builds them."""
    _check_train_job(num_workers, "PACK")
    bundle = train_worker_resources(use_gpu, cpus_per_worker, memory_per_worker)
    return [dict(bundle) for _ in range(num_workers)]


def reserve_train_job(
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float = DEFAULT_CPUS_PER_TRAIN_WORKER,
    memory_per_worker: int | None = None,
    *,
    strategy: PlacementStrategy = "PACK",
    name: str = "",
    timeout_s: float | None = None,
    use_labels: bool | None = None,
) -> PlacementGroup:
    """Reserve a whole training job in the training pool, all or nothing, and wait until it holds.

    Returns the ready placement group; run work in it with `bundle_scheduling(pg, i)` and free it
    with `release_train_job(pg)` (or use `train_job_reservation`). With `timeout_s` set, a
    reservation the pool cannot hold in time is removed and `TrainPoolFullError` raised.
    """
    _check_train_job(num_workers, strategy)
    bundles = train_job_bundles(num_workers, use_gpu, cpus_per_worker, memory_per_worker)
    selectors = [pool_label_selector(TRAIN_POOL) for _ in bundles] if _use_labels(use_labels) else None
    pg = placement_group(bundles=bundles, strategy=strategy, name=name, bundle_label_selector=selectors)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TrainPoolFullError(
            f"the training pool could not hold {num_workers} worker(s) of {bundles[0]} "
            f"within {timeout_s} s; the pool is full or has no node type that fits: wait, "
            "or raise the training pool's max_workers"
        )
    return pg


def release_train_job(pg: PlacementGroup) -> None:
    """Free a reservation made by `reserve_train_job`."""
    remove_placement_group(pg)


@contextlib.contextmanager
def train_job_reservation(num_workers: int, use_gpu: bool, **kwargs: Any) -> Iterator[PlacementGroup]:
    """`reserve_train_job` as a context manager: the reservation is freed on exit, even on error."""
    pg = reserve_train_job(num_workers, use_gpu, **kwargs)
    try:
        yield pg
    finally:
        release_train_job(pg)


def bundle_scheduling(pg: PlacementGroup, bundle_index: int = -1) -> PlacementGroupSchedulingStrategy:
    """Scheduling strategy that runs a task/actor inside bundle `bundle_index` of `pg`.

    Child tasks are captured too, so helper tasks of the job stay inside its reservation.
    """
    return PlacementGroupSchedulingStrategy(
        placement_group=pg,
        placement_group_bundle_index=bundle_index,
        placement_group_capture_child_tasks=True,
    )


# --- inference side ------------------------------------------------------------------------------


def serve_actor_options(
    num_gpus: float,
    num_cpus: float,
    *,
    memory: int | None = None,
    use_labels: bool | None = None,
) -> dict[str, Any]:
    """`ray_actor_options` for a Serve deployment in the inference pool.

    A GPU replica takes as many `infer_gpu` units as GPUs; a CPU-only replica takes a sliver
    (`INFER_CPU_REPLICA_SHARE`) so it is still kept off training nodes and the head.
    """
    if num_gpus < 0 or num_cpus < 0:
        raise PoolError(f"num_gpus and num_cpus must be >= 0, got {num_gpus} and {num_cpus}")
    pool_units = float(num_gpus) if num_gpus > 0 else INFER_CPU_REPLICA_SHARE
    options: dict[str, Any] = {
        "num_cpus": float(num_cpus),
        "num_gpus": float(num_gpus),
        "resources": {INFER_RESOURCE: pool_units},
    }
    if memory is not None:
        if memory <= 0:
            raise PoolError(f"memory must be a positive byte count, got {memory}")
        options["memory"] = int(memory)
    if _use_labels(use_labels):
        options["label_selector"] = pool_label_selector(INFER_POOL)
    return options


def cluster_has_gpus(resources: dict | None = None) -> bool:
    """Whether work should go to GPUs: the cluster's (a driver on a CPU head still has GPU workers) or this host's."""
    resources = resources if resources is not None else ray.cluster_resources()
    return resources.get("GPU", 0) > 0 or torch.cuda.is_available()


def infer_task_options(num_gpus: float, num_cpus: float, **kwargs: Any) -> dict[str, Any]:
    """`.options(...)` for a plain Ray task/actor that belongs to the inference pool (contact sheets)."""
    return serve_actor_options(num_gpus, num_cpus, **kwargs)


# --- FIFO order for training jobs --------------------------------------------------------------------


def train_queue() -> "ray.actor.ActorHandle":
    """The cluster's training queue actor, created on first use on the caller's node.

    It is detached (outlives any one driver) and pinned (soft) to the caller's node, normally the
    head, so that scaling the GPU pools down never kills it.
    """
    return TrainQueue.options(
        name=TRAIN_QUEUE_ACTOR_NAME,
        namespace=TRAIN_QUEUE_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True
        ),
    ).remote()


@contextlib.contextmanager
def train_pool_turn(
    job_id: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    heartbeat_s: float = 10.0,
) -> Iterator[str]:
    """Wait for `job_id`'s turn in the training pool's FIFO queue, then run the body.

    Use it around `trainer.fit()`, with the train loop wrapped by `queued_train_loop(loop, job_id)`
    so that the next job is let through as soon as this one's workers run (not when it ends):

        with train_pool_turn(job_id):
            TorchTrainer(queued_train_loop(loop, job_id), scaling_config=train_scaling_config(...)).fit()

    On exit (success, error, Ctrl-C) the job leaves the queue. `timeout_s` bounds the wait for the
    turn; past it `TrainPoolFullError` is raised.
    """
    queue = train_queue()
    position = ray.get(queue.join.remote(job_id))
    if position:
        logger.info("training job %s is number %d in the queue for the training pool", job_id, position + 1)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat_loop, args=(queue, job_id, heartbeat_s, stop), name=f"train-queue-{job_id}", daemon=True
    )
    beat.start()
    try:
        _wait_for_turn(queue, job_id, timeout_s, poll_s)
        yield job_id
    finally:
        stop.set()
        ray.get(queue.leave.remote(job_id))


def _heartbeat_loop(queue: Any, job_id: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            if not ray.get(queue.heartbeat.remote(job_id)):
                return  # started or left: nothing to keep alive
        except Exception:  # the driver is shutting down; the lease will expire on its own
            return


def _wait_for_turn(queue: Any, job_id: str, timeout_s: float | None, poll_s: float) -> None:
    # Poll in short calls rather than one long one, so Ctrl-C reaches the driver promptly.
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        chunk = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
        try:
            if ray.get(queue.wait_turn.remote(job_id, chunk)):
                return
        except PoolError:
            # The queue lost us: our lease ran out (driver paused) or the queue actor restarted.
            # Join again, at the back, rather than fail a job that is still wanted.
            logger.warning("training job %s lost its place in the queue; joining again at the back", job_id)
            ray.get(queue.join.remote(job_id))
        if deadline is not None and time.monotonic() >= deadline:
            raise TrainPoolFullError(
                f"training job {job_id!r} waited {timeout_s} s in the queue for the training pool "
                "without reaching its head; jobs ahead of it still hold or wait for the pool"
            )


def signal_train_job_started(job_id: str) -> None:
    """Tell the training queue that `job_id` holds its resources (called inside a worker).

    Looks the queue up rather than creating it: a job run without `train_pool_turn` has nothing to
    signal, and the queue must not be created on a training node.
    """
    try:
        queue = ray.get_actor(TRAIN_QUEUE_ACTOR_NAME, namespace=TRAIN_QUEUE_NAMESPACE)
    except ValueError:
        return
    ray.get(queue.started.remote(job_id))


def queued_train_loop(train_loop: Callable[..., Any], job_id: str) -> Callable[..., Any]:
    """Wrap a per-worker train loop so that rank 0 frees the queue's head when training starts.

    Keeps the loop's signature (with or without a `config` argument), as TorchTrainer inspects it.
    """
    takes_config = len(inspect.signature(train_loop).parameters) > 0

    def _signal_if_rank_zero() -> None:
        if ray.train.get_context().get_world_rank() == 0:
            signal_train_job_started(job_id)

    if takes_config:

        def queued_loop_with_config(config):
            _signal_if_rank_zero()
            return train_loop(config)

        return queued_loop_with_config

    def queued_loop():
        _signal_if_rank_zero()
        return train_loop()

    return queued_loop

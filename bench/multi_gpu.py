"""Training on several GPUs of one host through Ray Train: N concurrent one-GPU jobs, and one job on N GPUs.

Each job is a real `ray.train.torch.TorchTrainer` submitted the way `train.job` submits one: the product's
`cluster.pools.train_scaling_config` (one `train_gpu` + one GPU per worker, placement group per job), the
training queue (`train_pool_turn` around `fit`, `queued_train_loop` around the worker function), and a worker
that runs the product's training step, `train.step.Trainer` (setup with random weights of the chosen config
instead of a model folder; `step` as train.worker calls it: `make_batch` / `flow_matching_loss` / backward /
the loss averaged over the workers / clip / optimizer / scheduler, or ZeRO's engine).

Phases: (1) one job on one GPU; (2) N one-GPU jobs at once; (3) one job with N workers (data parallel, each
worker its own batch). DeepSpeed ZeRO phases run the loop's ZeRO path (`train.zero`: `deepspeed_config`,
`partition_for_zero3`, `ZeroEngine`) with adamw, no compile, gradient checkpointing, against `ddp_plain` (DDP with
the same settings): `zero2`, `zero3` on N GPUs; `zero3_cap` with every GPU capped at `--cap-gib` (a GPU smaller
than the bf16 model, which DDP cannot use: `ddp_cap` shows the OOM); `zero3_offload_cap`: one capped GPU, the
parameter shards in host memory. ZeRO-3 phases gather what `deepspeed_gather` says (auto: one transformer block
at a time, as the bench trains with gradient checkpointing); `zero3_linear` each LoRA'd Linear, and the `_module`
twins every module (DeepSpeed's own hooks, the baseline). Under ZeRO-3 the random model is made on the GPU and moved to host memory
before the cap is set and the model is sharded, as `train.loop` loads it from disk to host memory. Every worker reports where it runs (Ray node, CUDA_VISIBLE_DEVICES, torch device, GPU
uuid) and its steps/s over a timed window that all jobs of a phase enter together (a barrier actor).
Targets: (2) aggregate steps/s ≥ 0.9·N × (1); (3) samples/s ≥ 1.8 × (1) on 2 GPUs.
Section "multi_gpu" of bench/results/<gpu>-<date>.json; the placement table is printed.

    python bench/multi_gpu.py                       # all visible GPUs, Klein 9B config
    python bench/multi_gpu.py --cpu --config tiny   # the same code on CPU workers (gloo), to check the logic
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig
from ray.train.torch import TorchTrainer
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from _common import KLEIN9B, TINY, build_transformer, environment, log, print_table, save_section

from cluster.pools import init_local_ray, queued_train_loop, train_pool_turn, train_scaling_config
from train.cache import CachedItem, TrainingData
from train.loop import StepPlan, make_batch
from train.recipe import TrainConfig
from train.step import Trainer

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="N (default: every visible GPU)")
    p.add_argument("--config", choices=("klein9b", "tiny"), default="klein9b")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker")
    p.add_argument("--cpu", action="store_true", help="CPU workers (gloo): logic check only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--phases", default="single,concurrent,ddp",
                   help="of single, concurrent, ddp, ddp_bf16, and the ZeRO phases: " + ", ".join(ZERO_PHASES))
    p.add_argument("--cap-gib", type=float, default=16.0, help="per-GPU memory cap of the *_cap phases")
    p.add_argument("--zero-options", default="{}", help="JSON merged into DeepSpeed's zero_optimization (tuning trials)")
    p.add_argument("--section", default="multi_gpu")
    p.add_argument("--nccl-debug", action="store_true", help="NCCL_DEBUG=INFO in the workers (which transport)")
    return p.parse_args()


# -- the worker ---------------------------------------------------------------------------------------------
def bench_worker(config: dict) -> None:
    """One Ray Train worker: the product's training step on random weights, timed; reports its placement."""
    sys.path[:0] = [p for p in config["paths"] if p not in sys.path]

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    placement = {
        "job": config["job"], "rank": rank, "world_size": world, "local_rank": ctx.get_local_rank(),
        "node_id": ray.get_runtime_context().get_node_id()[:12], "hostname": socket.gethostname(), "pid": os.getpid(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        placement.update(gpu=props.name, gpu_uuid=str(getattr(props, "uuid", "?")), pci_bus_id=getattr(props, "pci_bus_id", None))
    print("PLACEMENT " + json.dumps(placement), flush=True)

    cfg = KLEIN9B if config["config"] == "klein9b" else TINY
    res, txt = (1024, 512) if config["config"] == "klein9b" else (128, 16)
    zero_stage = config.get("zero")

    def load_random_transformer(source="tiny", dtype=torch.float32, device="cpu", cache_dir=None):
        if torch.device(device).type == "cpu" and zero_stage == 3 and torch.cuda.is_available():
            return build_transformer(cfg, "cuda", dtype).to("cpu")  # random init on the GPU is minutes faster
        return build_transformer(cfg, device, dtype)

    plain = bool(zero_stage) or config.get("plain")  # adamw, no compile, checkpointing: ZeRO's settings
    no_compile = bool(config["no_compile"] or plain)
    tc = TrainConfig(model="random", steps=10_000, seed=0, compile=False if no_compile else None,
                     **(dict(optimizer="adamw", gradient_checkpointing=True, variant="custom", deepspeed_stage=zero_stage,
                             deepspeed_offload=bool(config.get("offload")), deepspeed_gather=config.get("gather", "auto"))
                        if plain else {}))

    def cap_memory(transformer) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if config.get("cap_gib"):  # a smaller GPU: allocations beyond the cap fail as out-of-memory
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(config["cap_gib"] * 2**30 / total, device)

    # the product's setup: LoRA, levers, ZeRO (with the phase's zero_options), optimizer, schedule, DDP
    trainer, _ = Trainer.setup(tc, device, world=world, zero_options=config.get("zero_options"), on_transformer=cap_memory,
                               load_transformer=load_random_transformer)
    accel, engine, optimizer, params = trainer.accel, trainer.zero, trainer.optimizer, trainer.params
    if engine is None and world > 1 and config.get("ddp_hook") == "bf16" and device.type == "cuda":
        # gradients all-reduced in bf16 (half the bytes), applied in fp32
        trainer.model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    g = res // 16
    gen = torch.Generator().manual_seed(0)
    items = [CachedItem(f"ref{i}", "zxy_style. a house", (res, res), torch.randn(128, g, g, generator=gen),
                        torch.randn(txt, cfg["joint_attention_dim"], generator=gen)) for i in range(8)]
    data = TrainingData("bench", items, torch.randn(txt, cfg["joint_attention_dim"], generator=gen), "random", res)
    plan = StepPlan(data.items, tc.batch_size, world, tc.seed)

    def step(s: int) -> float:  # the product's step (train.step.Trainer.step), as train.worker runs it
        return trainer.step(lambda micro: make_batch(plan, data, s, rank, tc.caption_dropout_rate))

    t0 = time.perf_counter()
    for s in range(1, config["warmup"] + 1):
        step(s)
    warm_s = time.perf_counter() - t0
    barrier = ray.get_actor(config["barrier"], namespace="klein-bench")
    ray.get(barrier.arrive.remote())  # every worker of every job of this phase enters the timed window together
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(config["warmup"] + 1, config["warmup"] + config["steps"] + 1):
        loss = step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    save = None
    if engine is not None:  # what a checkpoint costs under ZeRO: the LoRA gathered from the shards, the shards written
        t1 = time.perf_counter()
        lora = engine.full_lora(meta={})
        gathered = time.perf_counter() - t1
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.perf_counter()
            engine.save(Path(tmp))
            written = time.perf_counter() - t1
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        save = {"gather_lora_s": round(gathered, 3), "save_shards_s": round(written, 3), "shard_mib": round(size / 2**20, 1),
                "lora_layers": len(lora.layers)}
    allreduce = None
    if world > 1 and device.type == "cuda" and engine is None:  # the gradient all-reduce alone: LoRA-sized float32 buffer
        import torch.distributed as dist

        buf = torch.ones(sum(p.numel() for p in params), device=device)
        for _ in range(2):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        allreduce = {"mib": round(buf.numel() * 4 / 2**20), "ms": round((time.perf_counter() - t1) / 5 * 1000, 2)}
        del buf
    result = dict(placement, steps=config["steps"], timed_s=round(elapsed, 3), steps_per_s=round(config["steps"] / elapsed, 4),
                  allreduce=allreduce, ddp_hook=config.get("ddp_hook"), zero=zero_stage, offload=bool(config.get("offload")),
                  cap_gib=config.get("cap_gib"), gather=engine.units if engine else None, checkpoint=save, zero_options=config.get("zero_options") if zero_stage else None,
                  warmup_s=round(warm_s, 2), last_loss=loss, levers=accel["levers"] + [type(optimizer).__name__],
                  peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)
    Path(config["out_dir"], f"{config['job']}-rank{rank}.json").write_text(json.dumps(result))
    ray.train.report({"steps_per_s": result["steps_per_s"]})


# -- the driver ---------------------------------------------------------------------------------------------
def make_barrier(name: str, parties: int):
    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self, n):
            self.n, self.count = n, 0

        async def arrive(self, timeout_s: float = 900.0):
            self.count += 1
            deadline = time.monotonic() + timeout_s
            while self.count < self.n and time.monotonic() < deadline:  # a failed job must not hang the others
                await asyncio.sleep(0.05)
            return self.count >= self.n

    return Barrier.options(name=name, namespace="klein-bench", lifetime="detached").remote(parties)


# what the ZeRO phases set in the worker (the job's name is "<phase>-<i>"), in the order they run
PHASE_OPTIONS = {
    "ddp_plain": {"plain": True},
    "zero2": {"zero": 2},
    "zero3": {"zero": 3},  # deepspeed_gather auto: block (the bench trains with gradient checkpointing)
    "zero3_linear": {"zero": 3, "gather": "linear"},
    "zero3_module": {"zero": 3, "gather": "module"},  # DeepSpeed's own: every module hooked
    "ddp_cap": {"plain": True, "cap_gib": True},
    "zero3_cap": {"zero": 3, "cap_gib": True},
    "zero3_module_cap": {"zero": 3, "gather": "module", "cap_gib": True},
    "zero3_offload_cap": {"zero": 3, "offload": True, "cap_gib": True},
    "zero3_module_offload_cap": {"zero": 3, "gather": "module", "offload": True, "cap_gib": True},
}
ZERO_PHASES = tuple(PHASE_OPTIONS)


def run_job(job: str, workers: int, args, out_dir: str, barrier: str, errors: dict) -> None:
    """One training job exactly as train.job._fit submits it (queue turn, queued loop, pool scaling config)."""
    try:
        config = {"job": job, "config": args.config, "use_gpu": not args.cpu, "warmup": args.warmup, "steps": args.steps,
                  "out_dir": out_dir, "barrier": barrier, "no_compile": args.no_compile, "paths": [str(REPO), str(BENCH)],
                  "ddp_hook": "bf16" if job.startswith("ddpbf16") else None}
        config.update(PHASE_OPTIONS.get(job.rsplit("-", 1)[0], {}), zero_options=json.loads(args.zero_options))
        if config.get("cap_gib"):
            config["cap_gib"] = args.cap_gib
        trainer = TorchTrainer(
            queued_train_loop(bench_worker, job),
            train_loop_config=config,
            scaling_config=train_scaling_config(workers, use_gpu=not args.cpu),
            run_config=RunConfig(name=job, storage_path=str(Path(out_dir) / "ray_train")),
        )
        with train_pool_turn(job, poll_s=1.0):
            result = trainer.fit()
        if result.error is not None:
            errors[job] = str(result.error)[:2000]
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors[job] = f"{type(e).__name__}: {e}"[:2000]


def run_phase(name: str, jobs: list[tuple[str, int]], args, out_dir: str) -> dict:
    barrier_name = f"barrier-{name}-{int(time.time())}"
    barrier = make_barrier(barrier_name, sum(w for _, w in jobs))
    errors: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run_job, args=(job, workers, args, out_dir, barrier_name, errors)) for job, workers in jobs]
    for t in threads:
        t.start()
        time.sleep(0.5)  # submission order = queue order
    for t in threads:
        t.join()
    ray.kill(barrier)
    workers = []
    for job, n in jobs:
        for rank in range(n):
            f = Path(out_dir, f"{job}-rank{rank}.json")
            if f.exists():
                workers.append(json.loads(f.read_text()))
    out = {"jobs": [{"job": j, "workers": n} for j, n in jobs], "wall_s": round(time.perf_counter() - t0, 1),
           "workers": workers, "errors": errors}
    log(f"phase {name}", {k: v for k, v in out.items() if k != "workers"})
    return out


def main():
    args = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    n = args.gpus or (2 if args.cpu else torch.cuda.device_count())
    if not args.cpu and n < 1:
        raise SystemExit("no GPU visible: use --cpu to check the logic")
    device = torch.device("cpu" if args.cpu else "cuda")
    env = environment(device)
    env["gpus"] = n
    log("environment", env)
    cpus = max(4, (os.cpu_count() or 4))
    init_local_ray(num_cpus=cpus, num_gpus=0 if args.cpu else n, train_slots=n, object_store_memory=2 * 2**30,
                   runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]),
                                             "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                             "NVSHMEM_DISABLE_NVLS": "1",
                                             **({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,P2P,SHM,NET"} if args.nccl_debug else {})}})
    log("ray", ray.cluster_resources())
    R = {"what": f"LoRA training steps/s through Ray Train, {args.config} config, r32 all block Linears, "
                 f"{'1024²' if args.config == 'klein9b' else '128²'} batch 1 per worker; {args.steps} timed steps per worker",
         "gpus": n, "config": args.config, "cpu": args.cpu, "phases": {},
         "targets": {"concurrent_aggregate_vs_single": 0.9 * n, "ddp_samples_vs_single": 1.8 if n == 2 else 0.9 * n}}
    out_dir = tempfile.mkdtemp(prefix="klein-multi-")
    tiny = args.cpu or args.config == "tiny"
    phases = args.phases.split(",")
    try:
        if "single" in phases:
            R["phases"]["single"] = run_phase("single", [("single-0", 1)], args, out_dir)
            save_section(device, tiny, args.section, R)
        if "concurrent" in phases:
            R["phases"]["concurrent"] = run_phase("concurrent", [(f"concurrent-{i}", 1) for i in range(n)], args, out_dir)
            save_section(device, tiny, args.section, R)
        if "ddp" in phases and n > 1:
            R["phases"]["ddp"] = run_phase("ddp", [("ddp-0", n)], args, out_dir)
            save_section(device, tiny, args.section, R)
        if "ddp_bf16" in phases and n > 1:  # the same job, gradients all-reduced in bf16
            R["phases"]["ddp_bf16"] = run_phase("ddp_bf16", [("ddpbf16-0", n)], args, out_dir)
            save_section(device, tiny, args.section, R)
        for phase in ZERO_PHASES:
            if phase in phases:
                workers = 1 if "offload" in phase else n
                R["phases"][phase] = run_phase(phase, [(f"{phase}-0", workers)], args, out_dir)
                save_section(device, tiny, args.section, R)
    finally:
        finish(R, device, env, tiny, n, args.section)
        ray.shutdown()


def finish(R, device, env, tiny, n, section="multi_gpu"):
    P = R["phases"]
    rate = lambda ph: [w["steps_per_s"] for w in P.get(ph, {}).get("workers", [])]
    single = (rate("single") or [None])[0]
    conc = rate("concurrent")
    ddp = rate("ddp")
    summary = {"single_steps_per_s": single}
    if conc and single:
        summary.update(concurrent_jobs=len(conc), concurrent_aggregate_steps_per_s=round(sum(conc), 4),
                       concurrent_vs_single=round(sum(conc) / single, 3),
                       concurrent_target_met=sum(conc) / single >= 0.9 * n)
    if ddp and single:
        samples = min(ddp) * len(ddp)  # every worker trains its own sample each step; the slowest sets the pace
        summary.update(ddp_workers=len(ddp), ddp_steps_per_s=round(min(ddp), 4), ddp_samples_per_s=round(samples, 4),
                       ddp_vs_single=round(samples / single, 3),
                       ddp_target_met=samples / single >= (1.8 if n == 2 else 0.9 * n))
    bf16 = rate("ddp_bf16")
    if bf16 and single:
        samples = min(bf16) * len(bf16)
        summary.update(ddp_bf16_samples_per_s=round(samples, 4), ddp_bf16_vs_single=round(samples / single, 3),
                       ddp_bf16_target_met=samples / single >= (1.8 if n == 2 else 0.9 * n))
    summary["allreduce"] = {ph: d["workers"][0]["allreduce"] for ph, d in P.items()
                            if d.get("workers") and d["workers"][0].get("allreduce")}
    R["summary"] = summary
    save_section(device, tiny, section, R)
    rows = []
    for ph, data in P.items():
        for w in data.get("workers", []):
            rows.append({"phase": ph, "job": w["job"], "rank": f"{w['rank']}/{w['world_size']}", "node": w["node_id"],
                         "cvd": str(w["CUDA_VISIBLE_DEVICES"]), "dev": w["device"], "uuid": str(w.get("gpu_uuid", "-"))[:18],
                         "sps": w["steps_per_s"], "peak": w.get("peak_gib")})
            if w.get("checkpoint"):
                print(f"checkpoint {ph} rank {w['rank']}: {w['checkpoint']}", flush=True)
        for job, err in data.get("errors", {}).items():
            rows.append({"phase": ph, "job": job, "rank": "FAILED", "node": err[:60]})
    print_table(f"placement and steps/s, {R['what']} on {env['gpu']} x{n}", rows,
                [("phase", "phase", 24), ("job", "job", 13), ("rank", "rank", 5), ("node", "ray node", 13),
                 ("cvd", "CUDA_VISIBLE_DEVICES", 21), ("dev", "device", 7), ("uuid", "GPU uuid", 19),
                 ("sps", "steps/s", 8), ("peak", "peak GiB", 9)])
    print("summary:", summary, flush=True)


if __name__ == "__main__":
    main()

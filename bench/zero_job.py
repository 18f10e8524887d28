"""The product's ZeRO path end to end on GPUs: `run_training_job` with `deepspeed_stage` on the tiny model.

What tests/test_train_zero.py checks on CPU workers (fp32, gloo), here on N GPUs (bf16, NCCL): a ZeRO-2 job
and a ZeRO-3 job whose rank-0 worker is killed mid-step after a checkpoint; the ZeRO-3 job resumes from
DeepSpeed's merged shards. Prints each job's attempts, whether every step was trained once, and the largest
difference between the two LoRAs (same seed and data; bf16 compute, so not bit-equal across stages).
Section "zero_job" of bench/results/<gpu>-<date>.json.

    python bench/zero_job.py            # every visible GPU (at least 2)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from _common import environment, log, save_section

from cluster.pools import init_local_ray
from cluster.storage import Storage
from evaluation.board import make_board
from klein.lora import read_lora
from train.job import lora_prefix, run_training_job
from train.recipe import TrainConfig

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)


def main():
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)

    n = torch.cuda.device_count()
    if n < 2:
        raise SystemExit("needs 2 GPUs or more")
    device = torch.device("cuda")
    env = environment(device)
    init_local_ray(num_cpus=max(4, os.cpu_count() or 4), num_gpus=n, train_slots=n, object_store_memory=2 * 2**30,
                   runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                                             "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "NCCL_NVLS_ENABLE": "0",
                                             "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}})
    root = Path(tempfile.mkdtemp(prefix="klein-zero-"))
    board = root / "board"
    make_board("sepia", 6, board, size=256, seed=1)
    R = {"what": "run_training_job with deepspeed_stage on the tiny model, 2 workers, bf16 on GPUs", "jobs": {}}
    loras = {}
    try:
        for name, extra in (("zero2", dict(deepspeed_stage=2)), ("zero3-killed", dict(deepspeed_stage=3, fail_at_step=8, gradient_checkpointing=True))):
            store = root / name
            cfg = TrainConfig(trigger="zxy_sepia", storage=str(store), resolution=64, steps=12, save_every=5, job_id=f"job-{name}",
                              lr=2e-3, sample_prompts=["a house"], sample_steps=2, seed=3, variant="custom", optimizer="adamw",
                              num_workers=2, use_gpu=True, **extra)
            t0 = time.perf_counter()
            manifest = run_training_job(board, cfg)
            wall = time.perf_counter() - t0
            storage = Storage.from_uri(store)
            loras[name] = read_lora(storage.read_bytes(f"{lora_prefix('default', cfg.job_id)}/lora.safetensors"))
            m = manifest["metrics"]
            R["jobs"][name] = {"wall_s": round(wall, 1), "attempts": m["attempts"], "steps_trained_once": m["steps_trained_once"],
                               "fault_injected": storage.exists(f"jobs/{cfg.job_id}/fault_injected_8"),
                               "effective_batch": m["effective_batch"], "best_step": manifest.get("best_step"),
                               "final_val_loss": (m.get("val_curve") or [{}])[-1].get("val_loss")}
            log(name, R["jobs"][name])
        a, b = loras["zero2"], loras["zero3-killed"]
        worst = max((a.layers[k].up - b.layers[k].up).abs().max().item() for k in a.layers)
        scale = max(a.layers[k].up.abs().max().item() for k in a.layers)
        R["lora_max_abs_difference"] = worst
        R["lora_max_abs_up"] = scale
        log("zero2 vs resumed zero3", {"max_abs_difference": worst, "max_abs_up": scale})
    finally:
        save_section(device, False, "zero_job", R | {"environment": env})
        ray.shutdown()


if __name__ == "__main__":
    main()

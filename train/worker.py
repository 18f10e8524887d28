"""The Ray Train worker function: `Trainer.step` after step, checkpoints at every save, status for the driver.

Exactness of resume: see train/loop.py; the checkpoint a resumed attempt starts from is the one Ray Train
hands back (`ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from cluster.storage import Storage
from contracts import checkpoint_key, status_key
from klein.accel import InputPrefetcher
from klein.lora import lora_to_bytes, read_lora
from train.cache import load_cache
from train.loop import StepPlan, make_batch
from train.recipe import TrainConfig
from train.status import is_stopped
from train.step import Trainer

log = logging.getLogger("klein.train")


def midpoint_steps(steps: int) -> tuple[int, ...]:
    """Where the validation loss is measured whatever `save_every` is: 50 % and 60 % of the steps (500 and 600
    of 1000), the pair the cosine-midpoint check (train.job.midpoint_jumps) compares; at the defaults (saves
    every 250) no two checkpoints fall in its window."""
    return tuple(sorted({steps // 2, steps * 6 // 10})) if steps >= 10 else ()


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function. `config` holds `train` (TrainConfig as a dict) and `cache_key`."""
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    storage = Storage.from_uri(cfg.storage)

    data = load_cache(cfg.storage, config["cache_key"])
    content_lora = read_lora(storage.read_bytes(cfg.content_lora)) if cfg.content_lora else None
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_from:
        trainer, state = Trainer.setup(cfg, device, world=world, content_lora=content_lora,
                                       resume_from=Path(resume_from) if resume_from else None)
    if checkpoint is not None:
        log.info("worker %d resumed at step %d (attempt %d)", rank, state.step, state.attempt)
    zero = trainer.zero

    plan = StepPlan(data.items, cfg.batch_size, world, cfg.seed)
    accum = cfg.gradient_accumulation_steps
    # the next step's inputs are made while this one runs (make_batch is a pure function of the index)
    fetch = InputPrefetcher(lambda i: make_batch(plan, data, i, rank, cfg.caption_dropout_rate), device)
    last_index = cfg.steps * accum
    started = time.perf_counter()
    first_step = state.step + 1
    for step in range(first_step, cfg.steps + 1):
        def micro_batch(micro: int, step: int = step):
            index = (step - 1) * accum + micro + 1
            return fetch(index, next_index=index + 1 if index < last_index else None)

        def fault_hook(micro: int, step: int = step):
            if cfg.fail_at_step == step and rank == 0 and micro == 0:
                marker = f"jobs/{cfg.job_id}/fault_injected_{step}"
                if not storage.exists(marker):  # once per job: the resumed attempt must get past it
                    storage.write_bytes(marker, b"killed mid-step by fail_at_step")
                    os.kill(os.getpid(), signal.SIGKILL)
            if cfg.oom_at_step == step and micro == 0:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (testing hook oom_at_step={step})")

        loss_total = trainer.step(micro_batch, after_micro=fault_hook)
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
        state.step = step
        state.log.append({"step": step, "loss": loss_total, "lr": trainer.lr, "attempt": state.attempt})
        is_save = step % cfg.save_every == 0 or step == cfg.steps
        metrics = {"step": step, "loss": loss_total, "lr": trainer.lr}
        if not is_save and step in midpoint_steps(cfg.steps):
            state.log[-1]["val_loss"] = trainer.validation_loss(data, cfg.seed)  # no checkpoint, just the probe
        if not is_save and cfg.sample_every and step % cfg.sample_every == 0 and (rank == 0 or zero is not None):
            # a sample step between saves: keep its LoRA for the contact sheet (no trainer state needed)
            lora = trainer.current_lora(step)
            if rank == 0:
                storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_to_bytes(lora))
        if is_save:
            metrics["val_loss"] = trainer.validation_loss(data, cfg.seed)
            state.val.append({"step": step, "val_loss": metrics["val_loss"]})
            lora = trainer.current_lora(step) if rank == 0 or zero is not None else None
            with tempfile.TemporaryDirectory() as tmp:
                lora_bytes = lora_to_bytes(lora) if rank == 0 else None
                if rank == 0:
                    # every checkpoint's LoRA is kept in our storage for contact sheets and best-checkpoint choice
                    storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_bytes)
                trainer.save(Path(tmp), state, lora_bytes, rank)
                reports_files = rank == 0 or zero is not None
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if reports_files else None)
        # a driver stopped by a signal marked the job "stopped" (train/status.py); Ray kills these workers a moment
        # later, and until then they must not write "training" over that
        if rank == 0 and (is_save or step % 10 == 0 or step == first_step) and not is_stopped(storage, cfg.job_id):
            elapsed = time.perf_counter() - started
            per_step = elapsed / (step - first_step + 1)
            storage.write_json(status_key(cfg.job_id), {
                "state": "training", "step": step, "steps": cfg.steps, "loss": loss_total, "s_per_step": per_step,
                "eta_s": per_step * (cfg.steps - step), "val": state.val, "attempt": state.attempt,
                "effective_batch": cfg.batch_size * accum * world,
            })
    fetch.close()

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
import threading
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointUploadMode

from cluster.storage import Storage, StorageError
from contracts import checkpoint_key, compile_cache_key, status_key
from klein.accel import InputPrefetcher, compile_artifacts, compile_fingerprint, load_compile_artifacts
from klein.lora import lora_to_bytes, read_lora
from klein.model import load_transformer
from train.cache import load_cache
from train.live import event_log
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


# Ray Train (v2) rewrites this file in the run's folder each time its controller registers a checkpoint
# (ray.train.v2: CHECKPOINT_MANAGER_SNAPSHOT_FILENAME); the testing hook below reads it, nothing else does.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def wait_until_registered(storage: Storage, job_id: str, step: int, timeout_s: float = 60.0) -> bool:
    """Testing hook (`fail_at_step`): before a fault meant to come after the step-`step` checkpoint, wait until
    Ray Train's controller has registered that checkpoint. Its upload is asynchronous and the controller polls for
    reports, so on a slow machine a kill right after the save could otherwise land first, and the run would resume
    from an older checkpoint (or none): a different fault from the one the test asks for. False at the time-out."""
    key = f"ray_train/{job_id}/{RAY_TRAIN_SNAPSHOT}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            snapshot = storage.read_json(key)
        except StorageError:  # not written yet, or caught half-written
            snapshot = {}
        if any((r.get("metrics") or {}).get("step", 0) >= step for r in snapshot.get("checkpoint_results", [])):
            return True
        time.sleep(0.1)
    log.warning("fail_at_step: the step-%d checkpoint was not registered after %.0f s; injecting the fault anyway",
                step, timeout_s)
    return False


class CompileCache:
    """Compiled kernels kept in the job storage, keyed by what the graphs depend on (klein.accel.compile_fingerprint
    of the model, this job's LoRA and shape settings, torch and the GPU): the first job on a model writes them after
    its first step, and later jobs on any node load them before theirs and skip most of the compile (Klein 9B on an
    H200: 22 s less to the first step). Only where the blocks are compiled (CUDA by default); a missing or unreadable
    file just means compiling."""

    def __init__(self, storage: Storage, transformer, cfg: TrainConfig, device: torch.device, compiled: bool):
        self.storage, self.enabled = storage, compiled
        self.key = compile_cache_key(compile_fingerprint(
            transformer, device, rank=cfg.rank, alpha=cfg.linear_alpha, targets=cfg.targets, fp8=cfg.fp8,
            resolution=cfg.resolution, batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
            content_lora=bool(cfg.content_lora))) if compiled else None
        self.loaded = 0  # artifacts loaded from storage
        self._writer: threading.Thread | None = None
        self.saved_bytes: int | None = None

    def load(self) -> int:
        if not self.enabled or not self.storage.exists(self.key):
            return 0
        try:
            self.loaded = load_compile_artifacts(self.storage.read_bytes(self.key))
        except (StorageError, RuntimeError, ValueError, EOFError) as e:
            log.warning("compile cache %s not loaded (%s): compiling", self.key, e)
        return self.loaded

    def save_in_background(self) -> None:
        """After the first step: what it compiled goes to storage from a thread, off the steps' path (only when
        nothing was loaded: a loaded cache already holds these graphs)."""
        if not self.enabled or self.loaded:
            return
        blob = compile_artifacts()
        if blob is None:
            return
        self.saved_bytes = len(blob)

        def write() -> None:
            try:
                self.storage.write_bytes(self.key, blob)
            except StorageError as e:  # a cache: the job goes on without it
                log.warning("compile cache %s not written: %s", self.key, e)

        self._writer = threading.Thread(target=write, name="klein-compile-cache", daemon=True)
        self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.join()


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function. `config` holds `train` (TrainConfig as a dict) and `cache_key`."""
    entered = time.time()
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    storage = Storage.from_uri(cfg.storage)
    # where this worker's start-up went (seconds), for the job's status: the first step includes the compile
    startup: dict = {"worker_entered": entered}

    data = load_cache(cfg.storage, config["cache_key"])
    content_lora = read_lora(storage.read_bytes(cfg.content_lora)) if cfg.content_lora else None
    startup["cache_load_s"] = round(time.time() - entered, 2)
    loaded_at: list[float] = []

    def timed_load(*args, **kwargs):
        t = time.time()
        model = load_transformer(*args, **kwargs)
        loaded_at.append(time.time() - t)
        return model

    t = time.time()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_from:
        trainer, state = Trainer.setup(cfg, device, world=world, content_lora=content_lora, load_transformer=timed_load,
                                       resume_from=Path(resume_from) if resume_from else None)
    startup["setup_s"] = round(time.time() - t, 2)
    startup["transformer_load_s"] = round(loaded_at[0], 2) if loaded_at else None
    if checkpoint is not None:
        log.info("worker %d resumed at step %d (attempt %d)", rank, state.step, state.attempt)
    zero = trainer.zero
    compile_cache = CompileCache(storage, trainer.transformer, cfg, device, "compiled_blocks" in trainer.accel)
    t = time.time()
    startup["compile_cache_artifacts_loaded"] = compile_cache.load()
    startup["compile_cache_load_s"] = round(time.time() - t, 2)

    plan = StepPlan(data.items, cfg.batch_size, world, cfg.seed)
    accum = cfg.gradient_accumulation_steps
    # the next step's inputs are made while this one runs (make_batch is a pure function of the index)
    fetch = InputPrefetcher(lambda i: make_batch(plan, data, i, rank, cfg.caption_dropout_rate), device)
    last_index = cfg.steps * accum
    started = time.perf_counter()
    first_step = state.step + 1
    saves: list[dict] = []  # each checkpoint's cost on the step path (seconds), for the job's status
    # every step's scalars for TensorBoard (train/live.py); a resumed attempt drops what a killed one logged from here on
    events = event_log(cfg, storage, "worker", purge_step=first_step if first_step > 1 else None) if rank == 0 else None
    for step in range(first_step, cfg.steps + 1):
        step_started = time.time()
        def micro_batch(micro: int, step: int = step):
            index = (step - 1) * accum + micro + 1
            return fetch(index, next_index=index + 1 if index < last_index else None)

        def fault_hook(micro: int, step: int = step):
            if cfg.fail_at_step == step and rank == 0 and micro == 0:
                marker = f"jobs/{cfg.job_id}/fault_injected_{step}"
                if not storage.exists(marker):  # once per job: the resumed attempt must get past it
                    saved = (step - 1) // cfg.save_every * cfg.save_every
                    if saved >= 1:
                        wait_until_registered(storage, cfg.job_id, saved)
                    storage.write_bytes(marker, b"killed mid-step by fail_at_step")
                    os.kill(os.getpid(), signal.SIGKILL)
            if cfg.oom_at_step == step and micro == 0:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (testing hook oom_at_step={step})")

        loss_total = trainer.step(micro_batch, after_micro=fault_hook)
        if step == first_step:
            startup["first_step_s"] = round(time.time() - step_started, 2)  # compile (or cache load) + one step
            startup["to_first_step_s"] = round(time.time() - entered, 2)
            if rank == 0:  # every worker compiled the same graphs: one of them writes them
                t = time.time()
                compile_cache.save_in_background()
                startup["compile_cache_saved_bytes"] = compile_cache.saved_bytes
                startup["compile_cache_save_s"] = round(time.time() - t, 2)  # the serialisation; the write is a thread
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
        state.step = step
        state.log.append({"step": step, "loss": loss_total, "lr": trainer.lr, "attempt": state.attempt})
        is_save = step % cfg.save_every == 0 or step == cfg.steps
        if not is_save and step in midpoint_steps(cfg.steps):
            state.log[-1]["val_loss"] = trainer.validation_loss(data, cfg.seed)  # no checkpoint, just the probe
        if not is_save and cfg.sample_every and step % cfg.sample_every == 0 and (rank == 0 or zero is not None):
            # a sample step between saves: keep its LoRA for the contact sheet (no trainer state needed)
            lora = trainer.current_lora(step)
            if rank == 0:
                storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_to_bytes(lora))
        scalars = {"loss": loss_total, "lr": trainer.lr, "grad_norm": trainer.last_grad_norm,
                   "s_per_step": time.time() - step_started}
        metrics = {"step": step, **scalars}
        if events is not None:
            events.scalars(step, scalars)
        if not is_save and step % cfg.log_every == 0:
            # Ray Train's own metrics stream (callbacks such as MLflow's see it; train/live.py). Every worker reports
            # (each report is a barrier), on the same steps; not every step: a worker holds one report until the
            # controller takes it (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so faster reports would stall steps
            ray.train.report(metrics)
        if is_save:
            t = time.time()
            metrics["val_loss"] = trainer.validation_loss(data, cfg.seed)
            if events is not None:
                events.scalars(step, {"val_loss": metrics["val_loss"]})
                events.sync()
            state.val.append({"step": step, "val_loss": metrics["val_loss"]})
            timing = {"step": step, "validation_s": round(time.time() - t, 2)}
            t = time.time()
            lora = trainer.current_lora(step) if rank == 0 or zero is not None else None
            lora_bytes = lora_to_bytes(lora) if rank == 0 else None
            if rank == 0:
                # every checkpoint's LoRA is kept in our storage for contact sheets and best-checkpoint choice; it is
                # there before Ray Train registers the checkpoint, so a resumed run never lacks a registered step's LoRA
                storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_bytes)
            # Ray Train copies the directory into its run storage from a background thread (ASYNC) and then deletes
            # it; the steps go on meanwhile. A crash before the copy ends resumes from the previous checkpoint.
            directory = Path(tempfile.mkdtemp(prefix=f"klein-ckpt-{step}-")) if rank == 0 or zero is not None else None
            if directory is not None:
                trainer.save(directory, state, lora_bytes, rank)
            timing["write_s"] = round(time.time() - t, 2)
            t = time.time()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)) if directory is not None else None,
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=directory is not None)
            timing["report_s"] = round(time.time() - t, 2)
            saves.append(timing)
        # a driver stopped by a signal marked the job "stopped" (train/status.py); Ray kills these workers a moment
        # later, and until then they must not write "training" over that
        if rank == 0 and (is_save or step % 10 == 0 or step == first_step) and not is_stopped(storage, cfg.job_id):
            elapsed = time.perf_counter() - started
            per_step = elapsed / (step - first_step + 1)
            storage.write_json(status_key(cfg.job_id), {
                "state": "training", "step": step, "steps": cfg.steps, "loss": loss_total, "s_per_step": per_step,
                "eta_s": per_step * (cfg.steps - step), "val": state.val, "attempt": state.attempt,
                "effective_batch": cfg.batch_size * accum * world, "startup": startup, "saves": saves,
            })
    fetch.close()
    compile_cache.close()
    if events is not None:
        events.close()

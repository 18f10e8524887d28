"""The training loop: what each Ray Train worker runs, built from small pieces that run without Ray.

Read top to bottom:
  1. `flow_matching_batch`  — FLUX.2's objective: x_t = (1-σ)·x0 + σ·noise, target noise - x0, σ from a
                              logit-normal shifted by the image's token count (resolution-dependent shift)
  2. `StepPlan`             — which cached items and which randomness every step uses, a pure function of
                              (seed, step, worker), so a resumed run draws exactly what the lost one would have
  3. `make_optimizer` / `make_lr_scheduler`
  4. `validation_loss`      — fixed noise and fixed σ over the refs, comparable across checkpoints
  5. `TrainState` save/load — LoRA, optimizer, scheduler, RNG states, step and the step log
  6. `train_loop_per_worker`— the Ray Train function tying them together

Exactness of resume: all randomness of step s comes from generators seeded by (seed, s, rank) and the data
order from (seed, epoch); the optimizer and scheduler state come from the checkpoint. A run killed after
step k and resumed from its step-k checkpoint therefore trains steps k+1.. exactly as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from diffusers.optimization import get_scheduler
from ray.train import Checkpoint

from cluster.storage import Storage
from contracts import checkpoint_key
from klein.accel import InputPrefetcher, prepare_for_training
from klein.lora import add_lora, extract_lora, lora_config, lora_to_bytes
from klein.model import load_transformer
from train.cache import CachedItem, TrainingData, load_cache
from train.recipe import TrainConfig

log = logging.getLogger("klein.train")

# FLUX's resolution-dependent shift: mu grows linearly with the number of image tokens
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
VALIDATION_SIGMAS = (0.25, 0.5, 0.75)


# -- 1. objective ------------------------------------------------------------------------------------------
def shift_mu(image_seq_len: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)


def sample_sigmas(batch: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps, shifted towards noise for larger images (as FLUX trains)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    mu = shift_mu(image_seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / t.clamp(1e-5, 1 - 1e-5) - 1))


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] → tokens [B, h·w, C] and their (t, h, w, l) position ids, as Flux2KleinPipeline does."""
    b, c, h, w = latents.shape
    tokens = latents.reshape(b, c, h * w).permute(0, 2, 1)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return tokens, ids.unsqueeze(0).expand(b, -1, -1)


def text_ids(batch: int, seq_len: int) -> torch.Tensor:
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq_len))
    return ids.unsqueeze(0).expand(batch, -1, -1)


def flow_matching_loss(transformer, x0: torch.Tensor, embeds: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) at noise level σ."""
    device = next(transformer.parameters()).device
    x0, noise, embeds = x0.to(device), noise.to(device), embeds.to(device)
    s = sigmas.to(device).view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    tokens, img_ids = pack_latents(noisy)
    target, _ = pack_latents(noise - x0)
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = transformer(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            timestep=sigmas.to(device=device, dtype=dtype),
            img_ids=img_ids.to(device),
            txt_ids=text_ids(embeds.shape[0], embeds.shape[1]).to(device),
            guidance=None,
            return_dict=False,
        )[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# -- 2. data order and per-step randomness -----------------------------------------------------------------
def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class StepPlan:
    items: list[CachedItem]
    batch_size: int
    world_size: int
    seed: int
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Same-bucket batches in a shuffled order, fixed by (seed, epoch)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng(_mix(self.seed, epoch, 17))
            by_bucket: dict[tuple, list[int]] = {}
            for i, item in enumerate(self.items):
                by_bucket.setdefault(tuple(item.bucket), []).append(i)
            batches = []
            for bucket in sorted(by_bucket):
                idx = [int(i) for i in rng.permutation(by_bucket[bucket])]
                batches += [idx[j : j + self.batch_size] for j in range(0, len(idx), self.batch_size)]
            order = [int(k) for k in rng.permutation(len(batches))]
            self._epochs = {epoch: [batches[k] for k in order]}  # keep one epoch in memory
        return self._epochs[epoch]

    def batch(self, step: int, rank: int) -> list[int]:
        """Item indices that worker `rank` trains on at `step` (1-based)."""
        per_epoch = len(self._epoch_batches(0))
        global_index = (step - 1) * self.world_size + rank
        return self._epoch_batches(global_index // per_epoch)[global_index % per_epoch]

    def generator(self, step: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(self.seed, step, rank, 3))


def make_batch(plan: StepPlan, data: TrainingData, step: int, rank: int, caption_dropout_rate: float):
    """(x0, embeds, sigmas, noise, dropped) for one step of one worker."""
    idx = plan.batch(step, rank)
    gen = plan.generator(step, rank)
    x0 = torch.stack([data.items[i].latents for i in idx])
    dropped = (torch.rand(len(idx), generator=gen) < caption_dropout_rate).tolist()
    embeds = torch.stack([data.empty_embeds if d else data.items[i].embeds for i, d in zip(idx, dropped)])
    sigmas = sample_sigmas(len(idx), x0.shape[2] * x0.shape[3], gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, embeds, sigmas, noise, dropped


# -- 3. optimiser and schedule -----------------------------------------------------------------------------
# make_optimizer lives in train/optim.py (GroupedAdafactor on CUDA); re-exported here for the loop's readers
from train.optim import make_optimizer  # noqa: E402,F401


def make_lr_scheduler(optimizer, cfg: TrainConfig):
    kwargs = {"num_cycles": cfg.lr_restarts} if cfg.lr_scheduler == "cosine_with_restarts" else {}
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps, **kwargs)


# -- 4. validation -----------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(transformer, data: TrainingData, seed: int, autocast_dtype=None) -> float:
    """Mean loss over every ref at fixed σ ∈ {0.25, 0.5, 0.75} with fixed noise: the same numbers at every
    checkpoint, so its curve shows learning and overfitting rather than sampling noise."""
    gen = torch.Generator().manual_seed(_mix(seed, 99991))
    losses = []
    for item in data.items:
        x0 = item.latents.unsqueeze(0)
        for sigma in VALIDATION_SIGMAS:
            noise = torch.randn(x0.shape, generator=gen)
            loss = flow_matching_loss(transformer, x0, item.embeds.unsqueeze(0), torch.tensor([sigma]), noise, autocast_dtype)
            losses.append(loss.item())
    return float(np.mean(losses))


# -- 5. state ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    log: list[dict] = field(default_factory=list)  # one entry per trained step: step, loss, lr, dropped
    val: list[dict] = field(default_factory=list)  # one entry per checkpoint: step, val_loss
    attempt: int = 0


def lora_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, transformer, optimizer, scheduler, state: TrainState, lora_bytes: bytes,
                    trainer_state: bool = True) -> None:
    """Rank 0's part of a checkpoint. `trainer_state=False` under ZeRO, whose engine writes the LoRA's
    master weights, optimizer and schedule itself, sharded (train/zero.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lora.safetensors").write_bytes(lora_bytes)
    if trainer_state:
        trainable = {n: p.detach().cpu().clone() for n, p in lora_parameters(transformer).items()}
        torch.save({"params": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / "trainer_state.pt")
    (directory / "state.json").write_text(json.dumps({"step": state.step, "log": state.log, "val": state.val, "attempt": state.attempt}))


def load_checkpoint(directory: Path, transformer, optimizer, scheduler, zero=None) -> TrainState:
    if zero is not None:
        zero.load(directory)
    else:
        # our own checkpoint (never a user upload); weights_only keeps torch.load from running pickled code
        blob = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
        params = lora_parameters(transformer)
        missing = set(params) - set(blob["params"])
        if missing:
            raise RuntimeError(f"checkpoint {directory} lacks {len(missing)} LoRA parameters (e.g. {sorted(missing)[0]}): it belongs to another configuration")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(blob["params"][name])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    meta = json.loads((directory / "state.json").read_text())
    return TrainState(step=meta["step"], log=meta["log"], val=meta["val"], attempt=meta.get("attempt", 0) + 1)


# -- 6. the worker function --------------------------------------------------------------------------------
CONTENT_ADAPTER = "content"


def setup_transformer(cfg: TrainConfig, device: torch.device, content_lora=None, dtype: torch.dtype | None = None):
    """The frozen base transformer with a fresh LoRA adapter on `cfg.targets` (seeded).

    `content_lora` (ConsisLoRA's second stage): a LoRA loaded as a frozen adapter that stays active under
    the trained one, so the trained adapter learns what the content LoRA does not already explain.
    `dtype` (default: bf16 on CUDA, fp32 elsewhere) lets ZeRO-3 load a GPU job's bf16 model in host memory.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_transformer(cfg.model, dtype=dtype, device=device)
    transformer.requires_grad_(False)
    if content_lora is not None:
        add_lora(transformer, content_lora, adapter_name=CONTENT_ADAPTER)
    torch.manual_seed(_mix(cfg.seed, 1))
    transformer.add_adapter(lora_config(transformer, cfg.rank, cfg.linear_alpha, cfg.targets), adapter_name="default")
    if content_lora is not None:
        transformer.set_adapters([CONTENT_ADAPTER, "default"], [1.0, 1.0])
        # peft marks every active adapter trainable: the content adapter must stay frozen
        for name, p in transformer.named_parameters():
            p.requires_grad_(".default." in name or name.endswith(".default"))
    for p in lora_parameters(transformer).values():
        p.data = p.data.float()  # LoRA weights train in fp32 under bf16 autocast
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer




def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function. `config` holds `train` (TrainConfig as a dict) and `cache_key`."""
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    storage = Storage.from_uri(cfg.storage)

    data = load_cache(cfg.storage, config["cache_key"])
    content_lora = None
    if cfg.content_lora:
        from klein.lora import read_lora

        content_lora = read_lora(storage.read_bytes(cfg.content_lora))
    zero3 = cfg.deepspeed_stage == 3
    # ZeRO-3 shards the base from host memory, so no GPU ever holds the whole model
    transformer = setup_transformer(cfg, torch.device("cpu") if zero3 else device, content_lora,
                                    dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    # GPU levers measured in bench/train_step.py: peft input upcast off, regional compile, optional fp8 base
    # (compile and fp8 are off under ZeRO: recipe.validate refuses them there)
    prepare_for_training(transformer, device, compile=False if cfg.deepspeed_stage else cfg.compile, fp8=cfg.fp8)
    zero = None
    if cfg.deepspeed_stage:
        from train.zero import ZeroEngine, deepspeed_config, partition_for_zero3

        ds_config = deepspeed_config(cfg, device)
        if zero3:
            partition_for_zero3(transformer, ds_config, device)
    params = list(lora_parameters(transformer).values())
    optimizer = make_optimizer(params, cfg, device)
    scheduler = make_lr_scheduler(optimizer, cfg)
    if cfg.deepspeed_stage:
        zero = ZeroEngine(transformer, params, optimizer, scheduler, cfg, device, ds_config)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), transformer, optimizer, scheduler, zero)
        log.info("worker %d resumed at step %d (attempt %d)", rank, state.step, state.attempt)
    model = transformer
    if zero is not None:
        model = zero.model  # DeepSpeed reduces the gradients itself
    elif world > 1:
        model = ray.train.torch.prepare_model(transformer, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": False})

    def current_lora(step: int):
        """The LoRA as trained so far. Under ZeRO a collective that every rank joins."""
        if zero is not None:
            return zero.full_lora(meta={"step": step})
        return extract_lora(transformer, "default", meta={"step": step})
    plan = StepPlan(data.items, cfg.batch_size, world, cfg.seed)
    accum = cfg.gradient_accumulation_steps
    # the next step's inputs are made while this one runs (make_batch is a pure function of the index)
    fetch = InputPrefetcher(lambda i: make_batch(plan, data, i, rank, cfg.caption_dropout_rate), device)
    last_index = cfg.steps * accum
    started = time.perf_counter()
    first_step = state.step + 1
    for step in range(first_step, cfg.steps + 1):
        loss_total = 0.0
        for micro in range(accum):
            index = (step - 1) * accum + micro + 1
            x0, embeds, sigmas, noise, dropped = fetch(index, next_index=index + 1 if index < last_index else None)
            loss = flow_matching_loss(model, x0, embeds, sigmas, noise, autocast_dtype) / accum
            if zero is not None:
                zero.backward(loss)  # DeepSpeed reduces, clips and steps at the accumulation boundary
            else:
                loss.backward()
            loss_total += loss.item()
            if cfg.fail_at_step == step and rank == 0 and micro == 0:
                marker = f"jobs/{cfg.job_id}/fault_injected_{step}"
                if not storage.exists(marker):  # once per job: the resumed attempt must get past it
                    storage.write_bytes(marker, b"killed mid-step by fail_at_step")
                    os.kill(os.getpid(), signal.SIGKILL)
        if world > 1:  # the logged loss is the mean over every worker's batch, like the gradient
            mean_loss = torch.tensor([loss_total], device=device)
            torch.distributed.all_reduce(mean_loss)
            loss_total = mean_loss.item() / world
        if zero is None:
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
        state.step = step
        state.log.append({"step": step, "loss": loss_total, "lr": scheduler.get_last_lr()[0], "attempt": state.attempt})
        is_save = step % cfg.save_every == 0 or step == cfg.steps
        metrics = {"step": step, "loss": loss_total, "lr": scheduler.get_last_lr()[0]}
        if not is_save and cfg.sample_every and step % cfg.sample_every == 0 and (rank == 0 or zero is not None):
            # a sample step between saves: keep its LoRA for the contact sheet (no trainer state needed)
            lora = current_lora(step)
            if rank == 0:
                storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_to_bytes(lora))
        if is_save:
            val_model = model if zero is not None else transformer  # ZeRO-3 gathers weights in the engine
            val_model.eval()
            metrics["val_loss"] = validation_loss(val_model, data, cfg.seed, autocast_dtype)
            val_model.train()
            state.val.append({"step": step, "val_loss": metrics["val_loss"]})
            lora = current_lora(step) if rank == 0 or zero is not None else None
            with tempfile.TemporaryDirectory() as tmp:
                if zero is not None:
                    zero.save(Path(tmp))  # every rank writes its own shards; Ray Train merges the directories
                if rank == 0:
                    lora_bytes = lora_to_bytes(lora)
                    # every checkpoint's LoRA is kept in our storage for contact sheets and best-checkpoint choice
                    storage.write_bytes(checkpoint_key(cfg.job_id, step), lora_bytes)
                    save_checkpoint(Path(tmp), transformer, optimizer, scheduler, state, lora_bytes, trainer_state=zero is None)
                reports_files = rank == 0 or zero is not None
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if reports_files else None)
        if rank == 0 and (is_save or step % 10 == 0 or step == first_step):
            elapsed = time.perf_counter() - started
            per_step = elapsed / (step - first_step + 1)
            storage.write_json(f"jobs/{cfg.job_id}/status.json", {
                "state": "training", "step": step, "steps": cfg.steps, "loss": loss_total, "s_per_step": per_step,
                "eta_s": per_step * (cfg.steps - step), "val": state.val, "attempt": state.attempt,
                "effective_batch": cfg.batch_size * accum * world,
            })
    fetch.close()

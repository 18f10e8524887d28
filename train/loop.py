"""The pieces of the training loop, each runnable without Ray.

Read top to bottom:
  1. `flow_matching_batch`  — FLUX.2's objective: x_t = (1-σ)·x0 + σ·noise, target noise - x0, σ from a
                              logit-normal shifted by the image's token count (resolution-dependent shift)
  2. `StepPlan`             — which cached items and which randomness every step uses, a pure function of
                              (seed, step, worker), so a resumed run draws exactly what the lost one would have
  3. `make_optimizer` / `make_lr_scheduler`
  4. `validation_loss`      — fixed noise and fixed σ over the refs, comparable across checkpoints
  5. `TrainState` save/load — LoRA, optimizer, scheduler, RNG states, step and the step log
The step that uses them is `train.step.Trainer` (setup / step / save), and the Ray Train function that runs
it step after step is `train.worker.train_loop_per_worker`.

Exactness of resume: all randomness of step s comes from generators seeded by (seed, s, rank) and the data
order from (seed, epoch); the optimizer and scheduler state come from the checkpoint. A run killed after
step k and resumed from its step-k checkpoint therefore trains steps k+1.. exactly as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.optimization import get_scheduler

from klein.lora import add_lora, lora_config
from klein.model import load_transformer
from train.cache import CachedItem, TrainingData
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
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))  # where the generator lives
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


def setup_transformer(cfg: TrainConfig, device: torch.device, content_lora=None, dtype: torch.dtype | None = None,
                      load: Callable[..., torch.nn.Module] = load_transformer):
    """The frozen base transformer with a fresh LoRA adapter on `cfg.targets` (seeded).

    `content_lora` (ConsisLoRA's second stage): a LoRA loaded as a frozen adapter that stays active under
    the trained one, so the trained adapter learns what the content LoRA does not already explain.
    `dtype` (default: bf16 on CUDA, fp32 elsewhere) lets ZeRO-3 load a GPU job's bf16 model in host memory.
    `load` (klein.model.load_transformer's signature) builds the base: benchmarks pass random weights.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load(cfg.model, dtype=dtype, device=device)
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

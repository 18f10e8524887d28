"""A reference for data-parallel training written from the formulas, not from our training step.

The replay this replaced ran the product's own loss, optimizer and scheduler, so a bug in those was in the
oracle too and only DDP-specific errors could show. This one writes each piece out here: the rectified-flow
objective (noisy = (1 - σ)·x0 + σ·noise, velocity target noise - x0, MSE over the packed tokens), the mean of
the ranks' gradients (what DDP's all-reduce computes), clipping by the global gradient norm, the cosine
schedule, and the AdamW / Adafactor updates. Only the inputs come from the product: the frozen base with its
fresh seeded LoRA (`setup_transformer`) and each rank's batch at each step (`make_batch`, the data order and
per-step randomness that a run is defined by).
"""

from __future__ import annotations

import math

import torch

from klein.lora import extract_lora
from train.cache import load_cache
from train.loop import StepPlan, lora_parameters, make_batch, setup_transformer
from train.recipe import TrainConfig


def _tokens(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] → [B, h·w, C] tokens and their (t, h, w, l) ids, row-major, as Flux2KleinPipeline packs."""
    b, c, h, w = latents.shape
    ids = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(h), torch.arange(w),
                                     torch.zeros(1, dtype=torch.long), indexing="ij"), dim=-1).reshape(-1, 4)
    return latents.reshape(b, c, h * w).transpose(1, 2), ids.unsqueeze(0).expand(b, -1, -1)


def rectified_flow_loss(transformer, x0, embeds, sigmas, noise) -> torch.Tensor:
    s = sigmas.view(-1, 1, 1, 1)
    tokens, img_ids = _tokens((1 - s) * x0 + s * noise)
    target, _ = _tokens(noise - x0)
    b, seq = embeds.shape[:2]
    txt_ids = torch.zeros(b, seq, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(seq)
    pred = transformer(hidden_states=tokens, encoder_hidden_states=embeds, timestep=sigmas, img_ids=img_ids,
                       txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    return ((pred.float() - target.float()) ** 2).mean()


def cosine_lr(cfg: TrainConfig, step: int) -> float:
    """The lr used at training step `step` (1-based): linear warm-up, then half a cosine to 0 at cfg.steps."""
    done = step - 1
    if done < cfg.lr_warmup_steps:
        return cfg.lr * done / max(1, cfg.lr_warmup_steps)
    progress = (done - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    scale = max_norm / (total + 1e-6)
    return [g * scale for g in grads] if scale < 1 else grads


def adamw_update(p, g, state: dict, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8) -> None:
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = betas[0] * state.get("m", torch.zeros_like(p)) + (1 - betas[0]) * g
    v = state["v"] = betas[1] * state.get("v", torch.zeros_like(p)) + (1 - betas[1]) * g * g
    p.mul_(1 - lr * weight_decay)
    p.sub_(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))


def adafactor_update(p, g, state: dict, lr: float, weight_decay: float, eps=1e-30, clip=1.0, decay=-0.8) -> None:
    """Adafactor (Shazeer & Stern 2018) with a given lr: no relative step, no parameter scale, no momentum."""
    t = state["t"] = state.get("t", 0) + 1
    beta2 = 1.0 - t ** decay
    sq = g * g + eps
    if g.dim() >= 2:  # factored second moment: row and column means
        row = state["row"] = beta2 * state.get("row", torch.zeros(g.shape[:-1])) + (1 - beta2) * sq.mean(dim=-1)
        col = state["col"] = beta2 * state.get("col", torch.zeros(g.shape[:-2] + g.shape[-1:])) + (1 - beta2) * sq.mean(dim=-2)
        v_hat = (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)
    else:
        v_hat = state["v"] = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * sq
    update = g / v_hat.sqrt()
    rms = update.norm() / math.sqrt(update.numel())
    update = update / max(1.0, float(rms) / clip)
    if weight_decay:
        p.add_(p, alpha=-weight_decay * lr)
    p.sub_(lr * update)


def formula_reference(cfg: TrainConfig, cache_key: str, world: int):
    """The LoRA that `world` data-parallel workers must end with, computed from the formulas above."""
    if cfg.lr_scheduler != "cosine" or cfg.optimizer not in ("adamw", "adafactor") or cfg.gradient_accumulation_steps != 1:
        raise NotImplementedError("the formula reference covers cosine, adamw / adafactor, no gradient accumulation")
    data = load_cache(cfg.storage, cache_key)
    transformer = setup_transformer(cfg, torch.device("cpu"))
    params = list(lora_parameters(transformer).values())
    update = adamw_update if cfg.optimizer == "adamw" else adafactor_update
    states: list[dict] = [{} for _ in params]
    plan = StepPlan(data.items, cfg.batch_size, world, cfg.seed)
    for step in range(1, cfg.steps + 1):
        grads = [torch.zeros_like(p) for p in params]
        for rank in range(world):
            x0, embeds, sigmas, noise, _ = make_batch(plan, data, step, rank, cfg.caption_dropout_rate)
            loss = rectified_flow_loss(transformer, x0, embeds, sigmas, noise)
            for total, g in zip(grads, torch.autograd.grad(loss, params)):
                total += g / world  # DDP: the mean of the ranks' gradients
        if cfg.max_grad_norm:
            grads = clip_by_global_norm(grads, cfg.max_grad_norm)
        lr = cosine_lr(cfg, step)
        with torch.no_grad():
            for p, g, state in zip(params, grads, states):
                update(p, g, state, lr, cfg.weight_decay)
    return extract_lora(transformer, "default")

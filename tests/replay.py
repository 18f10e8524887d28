"""The test oracle for data-parallel training: the same steps in one process, no Ray, no DDP, no DeepSpeed."""

from __future__ import annotations

import torch

from klein.lora import extract_lora
from train.recipe import TrainConfig


def replay_data_parallel(cfg: TrainConfig, cache_key: str, world: int):
    """The same training in one process: each step averages the losses of every rank's batch, which is
    what DDP's gradient all-reduce computes. Returns the trained LoRA."""
    from train.cache import load_cache
    from train.loop import (
        StepPlan,
        flow_matching_loss,
        lora_parameters,
        make_batch,
        make_lr_scheduler,
        make_optimizer,
        setup_transformer,
    )

    device = torch.device("cpu")
    data = load_cache(cfg.storage, cache_key)
    transformer = setup_transformer(cfg, device)
    params = list(lora_parameters(transformer).values())
    optimizer = make_optimizer(params, cfg, device)
    scheduler = make_lr_scheduler(optimizer, cfg)
    plan = StepPlan(data.items, cfg.batch_size, world, cfg.seed)
    for step in range(1, cfg.steps + 1):
        for rank in range(world):
            x0, embeds, sigmas, noise, _ = make_batch(plan, data, step, rank, cfg.caption_dropout_rate)
            (flow_matching_loss(transformer, x0, embeds, sigmas, noise) / world).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return extract_lora(transformer, "default")

"""Run by tests/test_train_zero.py in its own process (DeepSpeed needs torch.distributed, one group per
process): three ZeRO-3 steps on the tiny model for each `deepspeed_gather` unit, from the same seed and
inputs; prints one JSON line per unit with its losses, its LoRA and which modules DeepSpeed treats as leaves."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from train.loop import flow_matching_loss, lora_parameters, make_lr_scheduler, setup_transformer
from train.optim import make_optimizer
from train.recipe import TrainConfig
from train.zero import ZeroEngine, deepspeed_config, partition_for_zero3


def run(unit: str, checkpointing: bool) -> dict:
    from deepspeed.utils import get_z3_leaf_modules

    cfg = TrainConfig(model="tiny", steps=3, seed=0, lr=2e-3, optimizer="adamw", variant="custom", deepspeed_stage=3,
                      deepspeed_gather=unit, gradient_checkpointing=checkpointing)
    cfg.validate()
    device = torch.device("cpu")
    torch.manual_seed(0)
    transformer = setup_transformer(cfg, device, dtype=torch.float32)
    ds_config = deepspeed_config(cfg, device)
    partition_for_zero3(transformer, ds_config, device)
    params = list(lora_parameters(transformer).values())
    optimizer = make_optimizer(params, cfg, device)
    zero = ZeroEngine(transformer, params, optimizer, make_lr_scheduler(optimizer, cfg), cfg, device, ds_config)
    leaves = sorted({type(m).__name__ for m in get_z3_leaf_modules(transformer)})
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(cfg.steps):
        x0 = torch.randn(1, 128, 4, 4, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        embeds = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=generator)
        sigmas = torch.rand(1, generator=generator)
        loss = flow_matching_loss(zero.model, x0, embeds, sigmas, noise)
        zero.backward(loss)
        losses.append(loss.item())
    lora = {k: v.flatten()[:64].tolist() for k, v in sorted(zero.full_lora_state().items())}
    return dict(unit=zero.units, checkpointing=checkpointing, leaves=leaves, losses=losses, lora=lora)


if __name__ == "__main__":
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what Ray Train sets in its workers
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
    for spec in sys.argv[2:]:
        unit, checkpointing = spec.split(":")
        print(json.dumps(run(unit, checkpointing == "gc")), flush=True)
    dist.destroy_process_group()

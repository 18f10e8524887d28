"""One training step, the product's: `Trainer.setup` / `Trainer.step` / `Trainer.save`.

The Ray Train worker (train/worker.py), the ZeRO path (train/zero.py's engine, driven from here) and every
benchmark in bench/ run this same code, so a benchmark times the product's step and not a copy of it.

- `setup`: the base transformer with its LoRA (`setup_transformer`), the GPU levers (`prepare_for_training`),
  ZeRO's partitioning and engine when `deepspeed_stage` is set, the optimizer and the schedule, a resumed
  checkpoint, and DDP when there are several workers;
- `step`: the micro-batches of one optimizer step through `flow_matching_loss`, backward (DeepSpeed's under
  ZeRO: it reduces, clips and steps itself), the mean loss over the workers, clip / optimizer / scheduler;
- `save`: a checkpoint directory (rank 0's LoRA and trainer state, or ZeRO's shards on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.train.torch
import torch

from klein.accel import prepare_for_training
from klein.lora import extract_lora
from klein.model import load_transformer
from train.loop import (
    TrainState, flow_matching_loss, load_checkpoint, lora_parameters, make_lr_scheduler, make_optimizer, save_checkpoint,
    setup_transformer, validation_loss,
)
from train.recipe import TrainConfig
from train.zero import ZeroEngine, deepspeed_config, partition_for_zero3

Batch = tuple  # (x0, embeds, sigmas, noise, ...) as train.loop.make_batch returns it


@dataclass
class Trainer:
    cfg: TrainConfig
    transformer: torch.nn.Module
    model: torch.nn.Module  # what the forward runs through: the transformer, its DDP wrapper or ZeRO's engine
    params: list[torch.nn.Parameter]
    optimizer: object
    scheduler: object
    device: torch.device
    world: int
    zero: ZeroEngine | None
    accel: dict  # what prepare_for_training switched on (`levers`)
    autocast_dtype: torch.dtype | None
    grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping

    @classmethod
    def setup(cls, cfg: TrainConfig, device: torch.device, *, world: int = 1, content_lora=None,
              resume_from: Path | None = None, zero_options: dict | None = None,
              on_transformer: Callable[[torch.nn.Module], None] | None = None,
              load_transformer: Callable[..., torch.nn.Module] = load_transformer,
              autocast_dtype: torch.dtype | None | str = "auto") -> tuple["Trainer", TrainState]:
        """Everything a worker needs before its first step, and the state to go on from (fresh or resumed).

        `load_transformer` builds the base (benchmarks: random weights); `zero_options` are merged into DeepSpeed's `zero_optimization` (benchmarks try settings with them);
        `on_transformer` runs once the transformer is built, before anything else is allocated (a benchmark caps
        the GPU memory there)."""
        zero3 = cfg.deepspeed_stage == 3
        # ZeRO-3 shards the base from host memory, so no GPU ever holds the whole model
        transformer = setup_transformer(cfg, torch.device("cpu") if zero3 else device, content_lora,
                                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                        load=load_transformer)
        if on_transformer is not None:
            on_transformer(transformer)
        # GPU levers measured in bench/train_step.py: peft input upcast off, regional compile, optional fp8 base
        # (compile and fp8 are off under ZeRO: TrainConfig.validate refuses them there)
        accel = prepare_for_training(transformer, device, compile=False if cfg.deepspeed_stage else cfg.compile, fp8=cfg.fp8)
        ds_config = None
        if cfg.deepspeed_stage:
            ds_config = deepspeed_config(cfg, device)
            ds_config["zero_optimization"].update(zero_options or {})
            if zero3:
                partition_for_zero3(transformer, ds_config, device)
        params = list(lora_parameters(transformer).values())
        optimizer = make_optimizer(params, cfg, device)
        scheduler = make_lr_scheduler(optimizer, cfg)
        zero = ZeroEngine(transformer, params, optimizer, scheduler, cfg, device, ds_config) if ds_config else None
        state = TrainState()
        if resume_from is not None:
            state = load_checkpoint(resume_from, transformer, optimizer, scheduler, zero)
        model = transformer
        if zero is not None:
            model = zero.model  # DeepSpeed reduces the gradients itself
        elif world > 1:
            model = ray.train.torch.prepare_model(transformer, move_to_device=False,
                                                  parallel_strategy_kwargs={"find_unused_parameters": False})
        if autocast_dtype == "auto":
            autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
        return cls(cfg, transformer, model, params, optimizer, scheduler, device, world, zero, accel, autocast_dtype), state

    def step(self, micro_batches: Callable[[int], Batch], *, after_micro: Callable[[int], None] | None = None,
             sync: bool = True) -> float | torch.Tensor:
        """One optimizer step over `gradient_accumulation_steps` micro-batches (`micro_batches(i)`, i from 0).

        Returns the step's loss, the mean over every worker's batch like the gradient (a float; with
        `sync=False` a tensor on the device, so the host does not wait for the GPU: benchmarks only)."""
        accum = self.cfg.gradient_accumulation_steps
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(accum):
            x0, embeds, sigmas, noise = micro_batches(micro)[:4]
            loss = flow_matching_loss(self.model, x0, embeds, sigmas, noise, self.autocast_dtype) / accum
            if self.zero is not None:
                self.zero.backward(loss)  # DeepSpeed reduces, clips and steps at the accumulation boundary
            else:
                loss.backward()
            total += loss.detach().double()
            if after_micro is not None:
                after_micro(micro)
        if self.world > 1:
            torch.distributed.all_reduce(total)
            total /= self.world
        if self.zero is None:
            # the norm before clipping, for the job's TensorBoard log (max_grad_norm 0: measured, not clipped)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total.item() if sync else total

    @property
    def last_grad_norm(self) -> float | None:
        """The last step's gradient norm before clipping (under ZeRO, DeepSpeed's own global norm)."""
        if self.zero is not None:
            norm = self.zero.engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None if self.grad_norm is None else float(self.grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def validation_loss(self, data, seed: int) -> float:
        """The validation loss (train.loop.validation_loss), run eagerly: a no-grad eval forward is a new graph for
        every compiled block, whose compile costs more than it saves on the few forwards it would speed up (3 σ per
        ref, at two or three checkpoints a job)."""
        model = self.model if self.zero is not None else self.transformer  # ZeRO-3 gathers weights in the engine
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"):
                return validation_loss(model, data, seed, self.autocast_dtype)
        finally:
            model.train()

    def current_lora(self, step: int):
        """The LoRA as trained so far. Under ZeRO a collective that every rank joins."""
        if self.zero is not None:
            return self.zero.full_lora(meta={"step": step})
        return extract_lora(self.transformer, "default", meta={"step": step})

    def save(self, directory: Path, state: TrainState, lora_bytes: bytes | None, rank: int) -> None:
        """This rank's part of a checkpoint: ZeRO's shards on every rank, the LoRA and trainer state on rank 0."""
        if self.zero is not None:
            self.zero.save(directory)  # every rank writes its own shards; Ray Train merges the directories
        if rank == 0:
            save_checkpoint(directory, self.transformer, self.optimizer, self.scheduler, state, lora_bytes,
                            trainer_state=self.zero is None)

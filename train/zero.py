"""DeepSpeed ZeRO for the training loop (`deepspeed_stage: 2 | 3`): for GPUs that cannot hold the model alone.

What each stage shards over the job's workers:
  - ZeRO-2: the LoRA's gradients and optimizer state. The frozen base is still whole on every GPU, so it
    saves little for a LoRA (about 1 GB at rank 32); it is here for parity with the other trainers.
  - ZeRO-3: the parameters too, the frozen 9B base included. Each of N GPUs keeps about 1/N of the weights
    and gathers one block's weights only while that block runs. With `deepspeed_offload: true` the shards
    live in host memory instead, so even one GPU smaller than the model can train.

The loop stays the one in `train/loop.py`; `ZeroEngine` holds only what differs under DeepSpeed:
  - the forward runs through the DeepSpeed engine, `backward` hands it the loss, and DeepSpeed reduces,
    clips, steps the optimizer and the LR schedule at the accumulation boundary;
  - the LoRA is read from the optimizer's fp32 master shards (`full_lora`), a collective every rank joins;
  - a checkpoint is DeepSpeed's own per-rank files, which every rank reports to Ray Train; Ray merges
    them into one checkpoint directory and hands all of it back on resume (`save` / `load`).

Exact resume holds as without ZeRO: the fp32 master weights, the optimizer moments, the schedule and
DeepSpeed's step counters come back from the checkpoint, and each step's data and noise come from the seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft.tuners.lora import Linear as LoraLinear

from klein.lora import extract_lora
from train.recipe import ConfigError, TrainConfig  # TrainConfig.validate says what ZeRO cannot combine with

CHECKPOINT_TAG = "zero"  # one tag per checkpoint directory: Ray Train gives every save its own directory


def deepspeed_config(cfg: TrainConfig, device: torch.device) -> dict:
    """DeepSpeed's config from ours. bf16 on CUDA (DeepSpeed keeps the LoRA's fp32 master weights in the
    optimizer shards); fp32 on CPU, as the loop without ZeRO."""
    zero: dict = {"stage": cfg.deepspeed_stage, "overlap_comm": device.type == "cuda", "contiguous_gradients": True}
    if cfg.deepspeed_stage == 3:
        # block weights stay sharded between uses; parameters under 1M entries (the LoRA's own matrices, norms,
        # biases: about 0.2 GB in all at rank 32) stay whole on every GPU, which spares hundreds of small
        # gathers per pass: 1.71 s/step instead of 2.04 on 2×H200 at the same peak memory (bench/README.md)
        zero.update({"stage3_param_persistence_threshold": 1_000_000, "stage3_gather_16bit_weights_on_model_save": False})
        if cfg.deepspeed_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": float(cfg.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": device.type == "cuda"},
        # our optimizer is torch's AdamW, which ZeRO wraps as any client optimizer (recipe.ZERO_OPTIMIZERS)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # each worker writes its own shards into its own staging directory, which Ray Train then merges
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("deepspeed_stage needs the deepspeed package on every training worker: "
                          "pip install deepspeed") from e
    return deepspeed


def _prepare_process(device: torch.device):
    """DeepSpeed, set up for this worker process; returns the module.

    - DeepSpeed places shards on `cuda:$LOCAL_RANK`; Ray Train's device for this worker is the authority.
    - CUDA memory in expandable segments (unless PYTORCH_CUDA_ALLOC_CONF says otherwise): ZeRO-3 allocates
      and frees a whole block's weights at every use, and in fixed segments that left 1.5 GiB reserved but
      unusable on a 16 GiB GPU, enough to run out of memory where the same step needs only 14.7 GiB.
    - On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (about 40 s of C++ on two cores) that only
      speeds up large CPU all-reduces; the LoRA's are small, so gloo's own is used. DeepSpeed keeps its
      op-compatibility table in `deepspeed.ops.__compatible_ops__` and consults it before building.
    """
    deepspeed = import_deepspeed()
    if device.type == "cuda":
        os.environ["LOCAL_RANK"] = str(device.index if device.index is not None else torch.cuda.current_device())
        if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
            # torch 2.10+ names it per accelerator; the CUDA name is older and now warns
            set_allocator_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
            (set_allocator_settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    else:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def partition_for_zero3(transformer, ds_config: dict, device: torch.device):
    """Shard a model that lives in host memory over the workers before DeepSpeed's engine sees it, so no GPU
    ever holds the whole model (the engine alone would move it to the GPU first, then shard it)."""
    deepspeed = _prepare_process(device)
    if ds_config["bf16"]["enabled"]:
        # the engine casts only parameters it has not sharded yet: the fp32 LoRA goes to bf16 here (its fp32
        # master copy lives in the optimizer's shards), or ZeRO-3's linear meets bf16 inputs and fp32 weights
        transformer.to(torch.bfloat16)
    deepspeed.zero.Init(module=transformer, config_dict_or_path=ds_config)
    return transformer


def zero3_gather(cfg: TrainConfig) -> str:
    """`deepspeed_gather` with auto resolved: block under gradient checkpointing, else linear."""
    if cfg.deepspeed_gather != "auto":
        return cfg.deepspeed_gather
    return "block" if cfg.gradient_checkpointing else "linear"


def zero3_units(transformer, cfg: TrainConfig) -> str:
    """Make ZeRO-3 gather bigger units than single modules; returns the unit ("block", "linear" or "module").

    DeepSpeed hooks every module: it gathers and releases weights, and keeps its trace, around each one's
    forward and backward. On this model those hooks, not the communication, are most of ZeRO-3's step time
    (bench/README.md). A "leaf" module is gathered and released as one unit, its children unhooked:
      - block: each transformer block (8 + 24 on the 9B), its weights (~1/32 of the model) whole while it runs;
      - linear: each LoRA'd Linear with its LoRA A/B and dropout (5 hooked modules become 1).
    A leaf's LoRA gradients are reduced by a backward hook on the leaf that fires once the gradients of its
    positional inputs exist. Two things keep that after the LoRA's own gradients:
      - the transformer's inputs (the noisy latents, the text embeddings) are made to require grad, so every
        activation inside does (as transformers' `enable_input_require_grads`); otherwise a Linear of the
        first block, whose input has no gradient, reduces before its LoRA's gradients arrive;
      - blocks only under gradient checkpointing, which calls each block with positional arguments; outside
        it diffusers passes keyword arguments, which the hook does not see (recipe.validate refuses that).
    Must run before `deepspeed.initialize`, which installs the hooks.
    """
    unit = zero3_gather(cfg)
    if unit == "module":
        return unit
    from deepspeed.utils import set_z3_leaf_modules

    if unit == "block":
        leaf_types = sorted({type(b) for name in ("transformer_blocks", "single_transformer_blocks")
                             for b in getattr(transformer, name, [])}, key=lambda t: t.__name__)
        if not leaf_types:
            raise ConfigError(f"deepspeed_gather: block found no transformer blocks in {type(transformer).__name__}; "
                              f"use deepspeed_gather: linear or module")
    else:
        leaf_types = [LoraLinear]
    set_z3_leaf_modules(transformer, leaf_types)
    transformer.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)
    return unit


def _inputs_require_grad(module, args, kwargs):
    """Forward pre-hook: the latents and text embeddings (positional or keyword) require grad while training."""
    if not torch.is_grad_enabled():
        return args, kwargs

    def needing_grad(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
            return value.detach().requires_grad_(True)
        return value

    args = tuple(needing_grad(v) if i < 2 else v for i, v in enumerate(args))
    kwargs = {k: needing_grad(v) if k in ("hidden_states", "encoder_hidden_states") else v for k, v in kwargs.items()}
    return args, kwargs


class ZeroEngine:
    """A DeepSpeed engine around the transformer, its LoRA parameters, optimizer and LR schedule."""

    def __init__(self, transformer, params: list[torch.nn.Parameter], optimizer, scheduler, cfg: TrainConfig,
                 device: torch.device, ds_config: dict):
        deepspeed = _prepare_process(device)
        self.stage = cfg.deepspeed_stage
        self.transformer = transformer
        self.names = {id(p): n for n, p in transformer.named_parameters()}
        self.params = params
        self.units = zero3_units(transformer, cfg) if self.stage == 3 else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=transformer, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config, dist_init_required=False)

    @property
    def model(self):
        """What the loss calls: the engine, whose forward also runs ZeRO-3's parameter gathering."""
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward (the loop already divided the loss by the accumulation steps), then
        DeepSpeed's step, which reduces, clips and steps optimizer and schedule only at the boundary."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def full_lora_state(self) -> dict[str, torch.Tensor]:
        """Every LoRA parameter whole, in fp32, from the optimizer's master shards. A collective: every
        rank must call it, and every rank gets the whole state."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {self.names[id(p)]: safe_get_full_fp32_param(p).detach().float().cpu().clone() for p in self.params}

    def full_lora(self, meta: dict):
        return extract_lora(self.transformer, "default", meta=meta, state_dict=self.full_lora_state())

    def save(self, directory: Path) -> None:
        """This rank's shards (fp32 master weights, optimizer moments, schedule, step counters). The frozen
        base is not written: it is the model the job started from."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {directory} has no DeepSpeed state under tag {CHECKPOINT_TAG!r}: "
                               f"it was written without deepspeed_stage, or by another configuration")

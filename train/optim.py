"""The training optimisers: `make_optimizer` (what the loop builds) and `GroupedAdafactor` (its Adafactor on CUDA).

transformers' `Adafactor` walks the LoRA's parameters one by one, about 20 small kernels each. A Klein LoRA on
every block Linear has 288 matrices of only a handful of shapes, so on an H200 that optimizer step took 0.10 s
of a 0.40 s compiled training step, nearly all launch overhead (bench/README.md). `GroupedAdafactor` runs the
same arithmetic on all the matrices of one shape at once (stacked), for the configuration the product uses:
`relative_step=False, scale_parameter=False, warmup_init=False`, no first moment (`beta1=None`), weight decay.
Its state keeps transformers' layout (`step`, `RMS`, `exp_avg_sq_row`/`exp_avg_sq_col` or `exp_avg_sq` per
parameter; the tensors are views into the stacked buffers), so a checkpoint written by either loads into the
other and a resumed run may switch between them. Results equal transformers' up to the summation order of
float32 reductions (tests/test_optim.py; 0.0 difference measured on CPU and on an H200).
"""

from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor

from train.recipe import ConfigError

ADAFACTOR_KWARGS = dict(relative_step=False, scale_parameter=False, warmup_init=False)


class GroupedAdafactor(torch.optim.Optimizer):
    """transformers' Adafactor (lr given, no relative step, no parameter scale, no warm-up init, no first
    moment), one batch of kernels per parameter shape instead of ~20 launches per parameter."""

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False):
        if lr is None or relative_step or scale_parameter or warmup_init or beta1 is not None:
            raise ValueError("GroupedAdafactor covers lr given, relative_step=False, scale_parameter=False, "
                             "warmup_init=False, beta1=None; use transformers' Adafactor for the rest")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults)
        self._stacked: dict = {}

    def _buffers(self, gi: int, shape: tuple, ps: list) -> dict:
        """Stacked state of `ps` (one shape); each parameter's state entries are views into it."""
        names = ("exp_avg_sq_row", "exp_avg_sq_col") if len(shape) >= 2 else ("exp_avg_sq",)
        key = (gi, shape, tuple(id(p) for p in ps))
        bufs = self._stacked.get(key)
        if bufs is not None and all(
            self.state[p].get(n) is not None and self.state[p][n].data_ptr() == bufs[n][i].data_ptr()
            for n in names for i, p in enumerate(ps)
        ):
            return bufs
        # first step, or the state was replaced (load_state_dict): stack what is there, zeros where nothing is
        bufs = {}
        for n in names:
            sub = shape[:-1] if n == "exp_avg_sq_row" else (shape[:-2] + shape[-1:] if n == "exp_avg_sq_col" else shape)
            buf = torch.zeros((len(ps),) + tuple(sub), dtype=torch.float32, device=ps[0].device)
            for i, p in enumerate(ps):
                old = self.state[p].get(n)
                if old is not None:
                    buf[i].copy_(old)
                self.state[p][n] = buf[i]
            bufs[n] = buf
        self._stacked[key] = bufs
        return bufs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            buckets: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                if p.dtype != torch.float32:
                    raise RuntimeError("GroupedAdafactor expects float32 parameters (the LoRA trains in fp32)")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["RMS"] = 0
                buckets.setdefault((tuple(p.shape), p.device, state["step"]), []).append(p)
            for (shape, _, step), ps in buckets.items():
                self._step_bucket(gi, group, shape, step, ps)
        return loss

    def _step_bucket(self, gi, group, shape, step, ps):
        step += 1
        for p in ps:
            self.state[p]["step"] = step
        lr = group["lr"]
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        grads = torch.stack([p.grad.float() for p in ps])
        update = grads.square().add_(group["eps"][0])
        bufs = self._buffers(gi, shape, ps)
        if len(shape) >= 2:
            row, col = bufs["exp_avg_sq_row"], bufs["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor)
            update.mul_(grads)
        else:
            v = bufs["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = v.rsqrt().mul_(grads)
        rms = update.flatten(1).norm(dim=1) / (math.prod(shape) ** 0.5)
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0).view((-1,) + (1,) * len(shape)))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            torch._foreach_add_(ps, ps, alpha=-group["weight_decay"] * lr)
        torch._foreach_add_(ps, list(update.neg_().unbind(0)))


def make_optimizer(params, cfg, device, grouped: bool | None = None):
    """The optimizer `cfg.optimizer` names. Adafactor is `GroupedAdafactor` on CUDA (same arithmetic, one launch
    per parameter shape) and transformers' `Adafactor` elsewhere, unless `grouped` says otherwise."""
    device = torch.device(device)
    if cfg.optimizer == "adafactor":
        if grouped is None:
            grouped = device.type == "cuda"
        if grouped:
            return GroupedAdafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **ADAFACTOR_KWARGS)
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **ADAFACTOR_KWARGS)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError("optimizer: adamw8bit runs only on CUDA GPUs (bitsandbytes); use adamw or adafactor on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("optimizer: adamw8bit needs the bitsandbytes package: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer: unknown {cfg.optimizer!r}")

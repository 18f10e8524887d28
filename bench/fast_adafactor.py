"""transformers' Adafactor, one batch of kernels per parameter shape instead of ~20 launches per parameter.

The Klein LoRA has 288 trainable matrices of only a handful of shapes. `transformers.optimization.Adafactor`
walks them one by one (about 20 small kernels each): on an H200 that optimizer step took 0.10 s of a 0.40 s
compiled training step, nearly all of it launch overhead. `GroupedAdafactor` runs the same arithmetic on all
matrices of one shape at once (stacked), for the configuration the product uses (`relative_step=False`,
`scale_parameter=False`, `warmup_init=False`, no first moment), and keeps its state in transformers' layout
(`step`, `exp_avg_sq_row`, `exp_avg_sq_col` per parameter, as views into the stacked buffers), so a
checkpoint written by one loads into the other.

Equal to transformers' Adafactor up to the summation order of fp32 reductions (checked by `python
bench/fast_adafactor.py`). Proposed for `train.loop.make_optimizer`; it lives in bench/ until it moves there.
"""

from __future__ import annotations

import copy
import math

import torch


class GroupedAdafactor(torch.optim.Optimizer):
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
        if bufs is not None and all(self.state[p].get(n) is not None and self.state[p][n].data_ptr() == bufs[n][i].data_ptr()
                                    for n in names for i, p in enumerate(ps)):
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


def _selftest(steps: int = 6, device: str = "cpu") -> float:
    """Same parameters, same gradients, same LR schedule: transformers' Adafactor vs GroupedAdafactor."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    shapes = [(32, 64), (96, 32), (32, 64), (32, 160), (96, 32), (48,)]
    ref = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-4)
    opt_ref, opt_new = Adafactor(ref, **kw), GroupedAdafactor(new, **kw)
    sch = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt_ref, opt_new)]
    worst = 0.0
    for s in range(steps):
        for a, b in zip(ref, new):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step(), opt_new.step()
        for sc in sch:
            sc.step()
        if s == steps // 2:  # a checkpoint written by transformers' Adafactor resumes in GroupedAdafactor
            opt_new.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as through torch.save / torch.load
        for a, b in zip(ref, new):
            worst = max(worst, ((a - b).norm() / a.norm()).item())
    for a, b in zip(ref, new):
        sa, sb = opt_ref.state[a], opt_new.state[b]
        assert sa["step"] == sb["step"]
        for n in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if n in sa:
                worst = max(worst, ((sa[n] - sb[n]).norm() / sa[n].norm()).item())
    return worst


if __name__ == "__main__":
    err = _selftest()
    print(f"GroupedAdafactor vs transformers Adafactor: worst relative difference {err:.2e}")
    assert err < 1e-5, err

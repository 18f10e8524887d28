"""What the field uses to speed up a LoRA step and an image, tried against the product on Klein 9B shapes (issue 17, item 4).

In one process, the product's training step (`train.step.Trainer.step` through `bench/train_step.py`'s `Ours`:
random-weight Klein 9B, r32 on every block Linear, 1024², batch 1) and then variants of it, each with the same
model, LoRA and optimizer:
  ours                 the product step (bf16 base, regional compile, attention eager)
  fused_down           each LoRA's down-projection A stacked under the frozen base weight, [W; A], so one GEMM gives
                       the base output and the LoRA's hidden h = xAᵀ (and one GEMM the input gradient); A's rows in
                       the stack are refreshed from the trainable A after each optimizer step
  cudagraphs           the same blocks compiled with mode="reduce-overhead" (CUDA graphs, cudagraph trees)
  torchao_tensorwise   torchao's float8 training (`convert_to_float8_training`, tensorwise recipe) on the frozen base
  torchao_rowwise      the same, rowwise recipe (the one that matches `klein/fp8.py`'s scaling)
  ours_fp8             the product's `fp8: true` (`klein/fp8.py`: base stored in e4m3 once, row-wise scales)
Each variant's gradient on one fixed batch is compared with the product step's (relative L2 error of all LoRA
gradients) before it is timed: a faster step that trains something else is no lever.

Then, with `--inference`, a 1024², 50-step, CFG image through `klein.generate.generate_image` on the exact
(bf16, fused, compiled) pipeline: no cache, the product's `StepCache` (what fast mode uses), and diffusers'
`TaylorSeerCacheConfig` (lite: blocks skipped and the output projection extrapolated, as our cache does;
and full: every attention extrapolated), each timed end to end and compared with the uncached image's pixels.

    python bench/step_levers.py --inference     # on a GPU: about 8 min on an H200, compiles included
    python bench/step_levers.py --tiny --inference   # the same code on tiny shapes (CPU ok)
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch
import torch._dynamo
from _common import (
    KLEIN9B,
    TINY,
    build_pipeline,
    cuda_timer,
    environment,
    free_memory,
    log,
    model_dtype,
    peak_gib,
    pick_device,
    print_table,
    random_lora_weights,
    reset_peak,
    save_section,
    time_steps,
)
from diffusers import TaylorSeerCacheConfig
from generate import compare, pixels
from torch import nn
from train_step import Ours

from klein.accel import StepCache, blocks, configure_dynamo, keep_attention_eager, prepare_for_inference, uncompile_blocks
from klein.generate import GenerateRequest, generate_image
from train.loop import flow_matching_loss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated training variants to leave out")
    p.add_argument("--inference", action="store_true", help="also the inference caches (TaylorSeer against StepCache)")
    p.add_argument("--only-inference", action="store_true")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    # the fields below exist only for Ours (bench/train_step.py's arguments)
    p.add_argument("--loss-steps", type=int, default=0)
    p.add_argument("--budget-gib", type=float, default=44.0)
    p.add_argument("--section", default="step_levers")
    return p.parse_args()


# -- fused down-projection ----------------------------------------------------------------------------------
class _StackedDown(torch.autograd.Function):
    """out = x [W; A]ᵀ in one GEMM. Backward: gx = g [W; A] in one GEMM, gA = g_hᵀ x (W frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x, stacked, lora_a):
        ctx.save_for_backward(x, stacked)
        ctx.rank = lora_a.shape[0]
        ctx.a_dtype = lora_a.dtype
        return x @ stacked.t()

    @staticmethod
    def backward(ctx, g):
        x, stacked = ctx.saved_tensors
        g = g.to(stacked.dtype)  # autocast may have made the forward's output (so g) lower precision than W
        gx = g @ stacked
        gh = g[..., -ctx.rank:].reshape(-1, ctx.rank)
        ga = (gh.t() @ x.reshape(-1, x.shape[-1])).to(ctx.a_dtype)
        return gx, None, ga


class FusedDownLinear(nn.Module):
    """A peft LoRA Linear (base W frozen, A and B trained) computed as y = x Wᵀ + s·(x Aᵀ) Bᵀ with [W; A] stacked."""

    def __init__(self, wrapper):
        super().__init__()
        base = wrapper.base_layer
        self.wrapper = [wrapper]  # to put it back (a list: not a submodule, so its parameters are not counted twice)
        self.lora_a = wrapper.lora_A["default"].weight
        self.lora_b = wrapper.lora_B["default"].weight
        self.scale = float(wrapper.scaling["default"])
        self.out_features = base.out_features
        self.register_buffer("stacked", torch.cat([base.weight.detach(), self.lora_a.detach().to(base.weight.dtype)]))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach())

    @torch.no_grad()
    def refresh(self):
        self.stacked[self.out_features:].copy_(self.lora_a)

    def forward(self, x):
        x = x.to(self.stacked.dtype)
        out = _StackedDown.apply(x, self.stacked, self.lora_a)
        y = out[..., :self.out_features]
        h = out[..., self.out_features:]
        y = y + self.scale * (h @ self.lora_b.to(h.dtype).t())
        return y if self.bias is None else y + self.bias


def _swap(transformer, make, want) -> list:
    swapped = []
    for name, module in list(transformer.named_modules()):
        if want(module):
            parent, _, child = name.rpartition(".")
            new = make(module)
            setattr(transformer.get_submodule(parent), child, new)
            swapped.append(new)
    return swapped


def fuse_down(transformer) -> list[FusedDownLinear]:
    return _swap(transformer, FusedDownLinear, lambda m: hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def unfuse_down(transformer) -> int:
    return len(_swap(transformer, lambda m: m.wrapper[0], lambda m: isinstance(m, FusedDownLinear)))


# -- torchao float8 training ---------------------------------------------------------------------------------
# torchao is no dependency of the product (the bench found nothing in it to adopt): imported only where it is tried
def torchao_convert(transformer, recipe: str) -> int:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    n = [0]

    def want(module, fqn):
        ok = (fqn.endswith(".base_layer") and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        n[0] += ok
        return ok

    convert_to_float8_training(transformer, module_filter_fn=want, config=config)
    return n[0]


def torchao_revert(transformer) -> int:
    from torchao.float8.float8_linear import Float8Linear as AoFloat8Linear

    def plain(module):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = module.weight
        if module.bias is not None:
            linear.bias = module.bias
        return linear

    return len(_swap(transformer, plain, lambda m: isinstance(m, AoFloat8Linear)))


# -- the training variants -------------------------------------------------------------------------------------
def recompile(transformer, compile: bool, **kwargs) -> None:
    torch._dynamo.reset()
    uncompile_blocks(transformer)
    if compile:
        configure_dynamo()
        keep_attention_eager(True)
        for block in blocks(transformer):
            block.compile(fullgraph=False, **kwargs)


def gradient(ours: Ours, batch) -> torch.Tensor:
    """All LoRA gradients (flattened, float32) of one forward/backward on `batch`; nothing is stepped."""
    trainer = ours.trainer
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.compiler.cudagraph_mark_step_begin()
    loss = flow_matching_loss(trainer.model, *batch[:4], trainer.autocast_dtype)
    loss.backward()
    g = torch.cat([p.grad.detach().float().flatten() for p in ours.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return g


def run_training(args, device, R):
    V = R["variants"]
    ours = Ours(args, device)
    compile_on = not args.no_compile and (device.type == "cuda")
    skip = set(filter(None, args.skip.split(",")))
    ours.stage(2)
    check_batch = ours.staged[0]
    reference = {}

    # one LoRA state for every gradient check: B away from its zero init, so A's gradient is checked too
    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(3)
        for p in ours.params:
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.01)
    ours.initial = [p.detach().clone() for p in ours.params]
    after_reset = []  # what a variant must redo when the LoRA is reset (the stacked A of fused_down)

    def measure(name, levers, step=None, setup=None, teardown=None):
        if name in skip:
            return
        t0 = time.perf_counter()
        try:
            extra = setup() if setup else {}
            setup_s = round(time.perf_counter() - t0, 2)
            step = step or ours.step_product
            ours.reset_lora()
            for redo in after_reset:
                redo()
            g = gradient(ours, check_batch)  # compiles (the step below compiles the rest)
            reference.setdefault("g", g)  # the product step's (measured first) is the reference
            grad = {"grad_rel_err": round(float((g - reference["g"]).norm() / reference["g"].norm()), 5)}
            r = time_steps(step, device, args.warmup, args.iters)
            r.update(levers=list(levers), ok=True, setup_s=setup_s, **grad, **(extra or {}))
        except Exception as e:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "levers": list(levers)}
            ours.optimizer.zero_grad(set_to_none=True)
        finally:
            try:
                if teardown:
                    teardown()
            except Exception:
                traceback.print_exc()
            free_memory()
        V[name] = r
        log(name, {k: v for k, v in r.items() if k != "times_s"})
        save_section(device, args.tiny, args.section, R)

    transformer = ours.transformer
    measure("ours", ["product step: bf16, regional compile (attention eager)"])

    fused = []

    def refresh():
        for module in fused:
            module.refresh()

    def fuse():
        fused[:] = fuse_down(transformer)
        after_reset.append(refresh)
        recompile(transformer, compile_on)
        return {"fused_linears": len(fused)}

    def fused_step():
        ours.step_product()
        refresh()

    def unfuse():
        unfuse_down(transformer)
        fused.clear()
        after_reset.clear()
        recompile(transformer, compile_on)

    measure("fused_down", ["LoRA down-projection stacked under the base weight: one GEMM forward, one input-gradient GEMM"],
            step=fused_step, setup=fuse, teardown=unfuse)
    def graphed_step():
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' previous outputs may be overwritten
        ours.step_product()

    if compile_on:
        measure("cudagraphs", ["blocks compiled with mode='reduce-overhead' (CUDA graphs)"], step=graphed_step,
                setup=lambda: recompile(transformer, True, mode="reduce-overhead"),
                teardown=lambda: recompile(transformer, True))
    for recipe in ("tensorwise", "rowwise"):
        def convert(recipe=recipe):
            n = torchao_convert(transformer, recipe)
            recompile(transformer, compile_on)
            return {"float8_linears": n}

        def revert():
            torchao_revert(transformer)
            recompile(transformer, compile_on)

        measure(f"torchao_{recipe}", [f"torchao convert_to_float8_training, recipe {recipe}, frozen base only"],
                setup=convert, teardown=revert)

    def product_fp8():
        ours.fp8()
        return {"fp8": True}

    measure("ours_fp8", ["product fp8: true (klein/fp8.py)"], setup=product_fp8)
    return ours


# -- inference: TaylorSeer against the product's step cache ----------------------------------------------------
def run_inference(args, device, R):
    cfg = TINY if args.tiny else KLEIN9B
    size = 64 if args.tiny else args.size
    steps = args.steps
    V = R["inference"]
    V["what"] = (f"{size}x{size}, {steps} steps, CFG 4, Klein 9B config (random bf16 weights), r32 LoRA fused, exact mode "
                 "(bf16, compiled blocks), denoise + VAE decode, text encoding excluded")
    pipe = build_pipeline(cfg, device, model_dtype(device), tiny_vae=args.tiny)
    lora = random_lora_weights(pipe.transformer, rank=32 if not args.tiny else 4, seed=1)
    accel = prepare_for_inference(pipe, loras=[("style", lora, 1.0)], mode="exact",
                                  compile=False if args.no_compile else None)
    transformer = pipe.transformer
    request = GenerateRequest(prompt="zxy_style. a lighthouse at dawn", seed=7, steps=steps, width=size, height=size,
                              guidance=4.0)

    def image(step_cache=None):
        reset_peak(device)
        stop = cuda_timer(device)
        accel.step_cache = step_cache  # what fast mode sets; exact mode has none
        with transformer.cache_context("cfg"):  # TaylorSeer's hooks need a context; without hooks it does nothing
            img = generate_image(pipe, request)
        s = stop()
        accel.step_cache = None
        transformer._reset_stateful_cache()
        return img, round(s, 3), peak_gib(device)

    image()  # compiles
    exact, t, peak = image()
    V["none"] = {"total_s": t, "peak_gib": peak, "computed_steps": steps}
    log("no cache", V["none"])
    cache = StepCache()
    img, t, peak = image(cache)
    V["step_cache"] = {"total_s": t, "peak_gib": peak, "computed_steps": cache.computed_steps(steps),
                       "settings": f"warmup {cache.warmup}, interval {cache.interval}, cooldown {cache.cooldown}, order {cache.order}",
                       "vs_none_pixels": compare(pixels(img), pixels(exact))}
    log("step cache", V["step_cache"])
    save_section(device, args.tiny, args.section, R)

    # diffusers' hooks wrap each module's forward; the compiled block must sit under the hook, not around it
    # (a compiled hook would recompile for every step index), so the blocks are compiled as functions below it
    uncompile_blocks(transformer)
    torch._dynamo.reset()
    if accel.compiled:
        for block in blocks(transformer):
            block.forward = torch.compile(block.forward, fullgraph=False)
    image()  # compiles the blocks as functions
    _, t, peak = image()
    V["none_function_compiled"] = {"total_s": t, "peak_gib": peak, "computed_steps": steps,
                                   "what": "no cache, blocks compiled as functions under where the hooks go"}
    for name, config in (
            ("taylorseer_lite_i2", TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=5, disable_cache_after_step=steps - 2,
                                                          max_order=1, use_lite_mode=True)),
            ("taylorseer_lite_i5", TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                                          use_lite_mode=True)),
            ("taylorseer_attn_i2", TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=5,
                                                          disable_cache_after_step=steps - 2, max_order=1))):
        try:
            transformer.enable_cache(config)
            img, t, peak = image()
            V[name] = {"total_s": t, "peak_gib": peak, "settings": repr(config),
                       "vs_none_pixels": compare(pixels(img), pixels(exact))}
        except Exception as e:
            traceback.print_exc()
            V[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        finally:
            transformer.disable_cache()
        log(name, V[name])
        save_section(device, args.tiny, args.section, R)


def finish(args, device, R):
    env = environment(device)
    V = R["variants"]
    base = V.get("ours", {}).get("median_s")
    rows = [{"name": n, "s": v.get("median_s"), "peak": v.get("peak_gib"), "first": v.get("first_s"),
             "ratio": v["median_s"] / base if base and v.get("median_s") else None, "err": v.get("grad_rel_err"),
             "note": "FAILED " + v.get("error", "")[:70] if not v.get("ok", True) else ""} for n, v in V.items()]
    print_table(f"LoRA step levers, Klein 9B config, 1024², on {env['gpu']} (median of {args.iters})", rows,
                [("name", "variant", 20), ("s", "s/step", 8), ("peak", "peak GiB", 9), ("first", "1st s", 7),
                 ("ratio", "/ours", 7), ("err", "grad rel err", 12), ("note", "", 1)])
    inf = R.get("inference", {})
    none = inf.get("none", {}).get("total_s")
    rows = [{"name": n, "s": v.get("total_s"), "ratio": v["total_s"] / none if none and v.get("total_s") else None,
             "px": (v.get("vs_none_pixels") or {}).get("mean_abs"), "psnr": (v.get("vs_none_pixels") or {}).get("psnr_db"),
             "note": "FAILED " + v.get("error", "")[:70] if not v.get("ok", True) else ""}
            for n, v in inf.items() if isinstance(v, dict)]
    if rows:
        print_table(f"inference caches: {inf.get('what')}", rows,
                    [("name", "cache", 20), ("s", "image s", 8), ("ratio", "/none", 7), ("px", "mean|Δ|", 8),
                     ("psnr", "PSNR dB", 8), ("note", "", 1)])


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    log("environment", env)
    R = {"what": "LoRA step levers (issue 17 item 4), Klein 9B config, random bf16 weights, r32 every block Linear, "
                 "1024² batch 1", "variants": {}, "inference": {}, "tiny": args.tiny}
    try:
        if not args.only_inference:
            ours = run_training(args, device, R)
            del ours
            torch._dynamo.reset()
            free_memory()
        if args.inference or args.only_inference:
            run_inference(args, device, R)
    finally:
        save_section(device, args.tiny, args.section, R)
        finish(args, device, R)


if __name__ == "__main__":
    main()

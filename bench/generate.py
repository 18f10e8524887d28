"""A 2048² FLUX.2 Klein 9B image, 50 steps with CFG, with a style LoRA, end to end (denoise + VAE decode).

In one process, one `Flux2KleinPipeline` (Klein 9B transformer config with random bf16 weights, a random
`AutoencoderKLFlux2` of the default FLUX.2 config, Klein's scheduler; the text encoder replaced by fixed random
Qwen3-like embeddings, since the text stage runs once per image for both and is left out) and one r32 LoRA on
every block Linear:
  stock   the stock pipeline call with the LoRA loaded through diffusers/peft, unfused, CFG as two batch-1
          forwards. Timed at 2 and 6 steps: per step = the difference / 4; 50 steps = t(2) + 48 × per step
          (every step costs the same there, and a 99 s run would buy nothing more).
  exact   the product path: `klein.accel.prepare_for_inference(pipe, mode="exact")` (takes over the peft
          adapter, unloads the wrappers, compiles the blocks), `klein.generate.set_active_loras` (fuses the
          LoRA) and `generate_image` (our loop: CFG as one batch of 2). Timed end to end at 50 steps.
  fast    `klein.accel.set_inference_mode(pipe, "fast")`: base weights in float8 (requantised with the LoRA
          fused) and step caching; timed end to end at 50 steps; per step without the cache from 2 and 6 steps.
          Pixel difference to the exact image of the same seed (mean/max |Δ| of 8-bit RGB, PSNR).

Prints a table and merges the numbers into bench/results/<gpu>-<date>.json (section "generate").

    python bench/generate.py            # on a GPU (about 4 min on an H200, compiles included)
    python bench/generate.py --tiny     # the same code on tiny shapes (CPU ok)
"""

from __future__ import annotations

import argparse
import math
import time
import traceback

import numpy as np
import torch
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
)

from klein.accel import prepare_for_inference, set_inference_mode
from klein.generate import GenerateRequest, generate_image, set_active_loras
from klein.lora import add_lora


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-fast", action="store_true")
    return p.parse_args()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a - b)
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"mean_abs": round(float(d.mean()), 3), "max_abs": int(d.max()), "p99_abs": int(np.percentile(d, 99)),
            "psnr_db": round(10 * math.log10(255 ** 2 / mse), 2) if mse > 0 else None}


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    dtype = model_dtype(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    log("environment", env)

    cfg = TINY if args.tiny else KLEIN9B
    size = 64 if args.tiny else args.size
    R = {"what": f"{size}x{size} image, {args.steps} steps, CFG (guidance 4), Klein 9B config (random bf16 weights), "
                 "r32 LoRA on every block Linear, denoise + VAE decode (text encoding excluded)",
         "steps": args.steps, "size": size, "tiny": args.tiny, "variants": {},
         "issue_reference_h200": {"stock_b2_unfused_step_s": 2.01, "stock_b2_fused_step_s": 1.57,
                                  "target_exact_ratio": 0.8, "target_fast_ratio": 0.5}}
    V = R["variants"]
    save = lambda: save_section(device, args.tiny, "generate", R)

    pipe = build_pipeline(cfg, device, dtype, tiny_vae=args.tiny)
    lora = random_lora_weights(pipe.transformer, rank=32 if not args.tiny else 4, seed=1)
    R["lora_params_m"] = round(sum(l.down.numel() + l.up.numel() for l in lora.layers.values()) / 1e6, 2)
    req = lambda steps: GenerateRequest(prompt="zxy_style. a lighthouse at dawn", seed=7, steps=steps, width=size,
                                        height=size, guidance=4.0)

    def run(name, steps, stock=False):
        reset_peak(device)
        stop = cuda_timer(device)
        if stock:  # the stock pipeline call, as klein.generate ran it before (peft adapter, CFG as 2 x batch 1)
            image = pipe(prompt=req(steps).prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                         generator=torch.Generator(device="cpu").manual_seed(7)).images[0]
        else:
            image = generate_image(pipe, req(steps))
        s = stop()
        log(f"{name}: {steps} steps in {s:.2f} s, peak {peak_gib(device)} GiB")
        return image, round(s, 3), peak_gib(device)

    def per_step(name, lo=2, hi=6, stock=False, levers=()):
        run(name + " warm-up", 1, stock)
        _, t_lo, _ = run(name, lo, stock)
        _, t_hi, peak = run(name, hi, stock)
        step = (t_hi - t_lo) / (hi - lo)
        V[name] = {"step_s": round(step, 4), f"t{lo}_s": t_lo, f"t{hi}_s": t_hi, "peak_gib": peak,
                   "total_s": round(t_lo + (args.steps - lo) * step, 2), "how": f"t({lo}) + {args.steps - lo} x (t({hi}) - t({lo}))/{hi - lo}",
                   "levers": list(levers), "ok": True}
        log(name, V[name])
        save()

    # -- stock -------------------------------------------------------------------------------------------------
    add_lora(pipe.transformer, lora, adapter_name="style")  # diffusers' own loader: peft LoRA layers
    pipe.transformer.set_adapters(["style"], [1.0])
    try:
        per_step("stock", stock=True, levers=["stock pipeline call", "LoRA unfused (peft)", "CFG as 2 x batch 1"])
    except Exception as e:
        traceback.print_exc()
        V["stock"] = {"ok": False, "error": str(e)[:1000]}
    free_memory()

    # -- ours, exact -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    accel = prepare_for_inference(pipe, mode="exact", compile=False if args.no_compile else None)
    set_active_loras(pipe, [("style", None, 1.0)])
    R["prepare_s"] = round(time.perf_counter() - t0, 2)
    levers = ["LoRA fused, peft wrappers unloaded", "CFG as one batch of 2"] + (["regional compile (attention eager)"] if accel.compiled else [])
    exact_image = None
    try:
        _, first, _ = run("exact warm-up (compiles)", 2)
        _, t2, _ = run("exact", 2)
        exact_image, t50, peak = run("exact", args.steps)
        V["exact"] = {"total_s": t50, "step_s": round((t50 - t2) / (args.steps - 2), 4), "t2_s": t2, "first_call_s": first,
                      "peak_gib": peak, "how": "measured end to end", "levers": levers, "ok": True}
        log("exact", V["exact"])
    except Exception as e:
        traceback.print_exc()
        V["exact"] = {"ok": False, "error": str(e)[:1000], "levers": levers}
    save()

    # -- ours, fast --------------------------------------------------------------------------------------------
    if not args.skip_fast:
        try:
            t0 = time.perf_counter()
            accel = set_inference_mode(pipe, "fast")
            R["fast_switch_s"] = round(time.perf_counter() - t0, 2)
            cache = accel.step_cache
            accel.step_cache = None  # per step of the fp8 transformer alone first
            per_step("fast_nocache", levers=levers + ["float8 base (e4m3, row-wise scales)"])
            accel.step_cache = cache
            fast_image, t50, peak = run("fast", args.steps)
            V["fast"] = {"total_s": t50, "peak_gib": peak, "how": "measured end to end", "ok": True,
                         "levers": levers + ["float8 base (e4m3, row-wise scales)",
                                             f"step cache (warmup {cache.warmup}, interval {cache.interval}, cooldown "
                                             f"{cache.cooldown}, order {cache.order}): {cache.computed_steps(args.steps)} of "
                                             f"{args.steps} steps computed"]}
            if exact_image is not None:
                V["fast"]["vs_exact_pixels"] = compare(pixels(fast_image), pixels(exact_image))
            log("fast", V["fast"])
        except Exception as e:
            traceback.print_exc()
            V["fast"] = {"ok": False, "error": str(e)[:1000]}
        save()
    finish(args, device, env, R)


def finish(args, device, env, R):
    V = R["variants"]
    stock = V.get("stock", {}).get("total_s")
    rows = []
    for name, v in V.items():
        rows.append({"name": name, "total": v.get("total_s"), "step": v.get("step_s"), "peak": v.get("peak_gib"),
                     "ratio": (v["total_s"] / stock) if stock and v.get("total_s") else None, "how": v.get("how", ""),
                     "note": "FAILED " + v.get("error", "")[:60] if not v.get("ok", True) else ""})
    exact, fast = V.get("exact", {}).get("total_s"), V.get("fast", {}).get("total_s")
    R["summary"] = {
        "gpu": env["gpu"], "stock_total_s": stock, "exact_total_s": exact, "fast_total_s": fast,
        "exact_vs_stock": round(exact / stock, 3) if exact and stock else None,
        "fast_vs_stock": round(fast / stock, 3) if fast and stock else None,
        "exact_target_met": bool(exact and stock and exact / stock <= 0.8),
        "fast_target_met": bool(fast and stock and fast / stock <= 0.5),
        "fast_vs_exact_pixels": V.get("fast", {}).get("vs_exact_pixels"),
    }
    save_section(device, args.tiny, "generate", R)
    print_table(f"{R['what']} on {env['gpu']}", rows,
                [("name", "variant", 14), ("total", f"{args.steps}-step s", 12), ("step", "s/step", 8), ("peak", "peak GiB", 9),
                 ("ratio", "/stock", 7), ("how", "how", 10), ("note", "", 1)])
    print("summary:", R["summary"], flush=True)


if __name__ == "__main__":
    main()

"""A 2048² FLUX.2 Klein 9B image with a style LoRA: one denoising step with CFG, and the 50-step estimate.

In one process, on one transformer (Klein 9B config, random bf16 weights, the baseline's r32 LoRA on every
block Linear, adapters in fp32 as the baseline keeps them):
  stock   `Flux2KleinPipeline` runs CFG as two batch-1 forwards with the LoRA unfused (what `klein.generate`
          does today through the stock pipeline); the baseline's CFG-as-batch-2 forward, unfused and after
          `fuse_lora()`.
  ours    LoRA fused and the peft wrappers dropped (plain Linears), CFG as a batch of 2, then regional
          torch.compile of the 32 blocks (attention call left eager, then whole blocks), each kept only if it
          pays; forced cuDNN attention last, only if the child-process check says it beats the default.
  VAE     one 2048² decode through a real `AutoencoderKLFlux2` of the default (FLUX.2) config, random weights.
  total   50 x step + decode, for stock and ours (the Qwen3 text encoding, once per image, is left out of both).
  attn    SDPA backends (default / flash / cuDNN / efficient) at the shapes the step and the training use.

Prints a table and merges the numbers into bench/results/<gpu>-<date>.json (section "generate").

    python bench/generate.py            # on a GPU (about 4-5 min on an H100, compile included)
    python bench/generate.py --tiny     # the same code on tiny shapes (CPU ok)
"""

from __future__ import annotations

import argparse
import traceback

import torch
import torch._dynamo as torch_dynamo

from _common import (KLEIN9B, STOCK_TARGETS, TINY, attention_bench, build_transformer, compile_blocks, configure_dynamo,
                     cudnn_pays, environment, keep_attention_eager,
                     free_memory, log, model_dtype, pick_device, print_table, save_section, stock_batch,
                     strip_peft_wrappers, time_steps)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the end-to-end estimate")
    p.add_argument("--no-compile", action="store_true")
    return p.parse_args()


def vae_decode(args, device, dtype, grid, R) -> dict:
    """One decode of a (grid*2)² latent through AutoencoderKLFlux2 of the default (FLUX.2) config, random weights."""
    from diffusers import AutoencoderKLFlux2

    vae_kwargs = dict(block_out_channels=(32, 32, 32, 32)) if args.tiny else {}
    with torch.device(device):
        vae = AutoencoderKLFlux2(**vae_kwargs).to(dtype).eval()
    R["vae_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items() if not k.startswith("_")}
    lat = torch.randn(1, vae.config.latent_channels, grid * 2, grid * 2, device=device, dtype=dtype)  # 2048/8 = 256
    measure_vae = lambda: vae.decode(lat, return_dict=False)[0]
    with torch.no_grad():
        r = time_steps(measure_vae, device, args.warmup, args.iters)
        r["output_shape"] = list(vae.decode(lat, return_dict=False)[0].shape)
    R["vae_decode"] = r
    log("vae decode", r)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        with torch.no_grad():
            r2 = time_steps(measure_vae, device, args.warmup + 1, args.iters)
        R["vae_decode_cudnn_benchmark"] = r2
        log("vae decode, cudnn.benchmark", r2)
        torch.backends.cudnn.benchmark = False
    vae_stock = R["vae_decode"]["median_s"]
    vae_ours = min(vae_stock, R.get("vae_decode_cudnn_benchmark", {}).get("median_s", vae_stock))
    return {"stock": vae_stock, "ours": vae_ours}


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    dtype = model_dtype(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    log("environment", env)
    from peft import LoraConfig

    cfg = TINY if args.tiny else KLEIN9B
    grid, grid_small, txt = (8, 4, 16) if args.tiny else (128, 64, 512)  # 2048² -> 16384 tokens; 1024² -> 4096
    R = {"what": f"denoising step at {grid * 16}x{grid * 16} ({grid * grid} image + {txt} text tokens), CFG, "
                 "Klein 9B config (random bf16 weights), r32 LoRA on every block Linear; VAE decode; "
                 f"{args.steps}-step end-to-end estimate",
         "warmup": args.warmup, "iters": args.iters, "steps": args.steps, "tiny": args.tiny, "variants": {},
         "issue_reference_h200": {"stock_b2_unfused_s": 2.01, "stock_b2_fused_s": 1.57, "target_ratio": 0.8}}
    V = R["variants"]
    if device.type == "cuda":
        R["attention_sdpa"] = attention_bench("infer")

    R['vae_s'] = vae_decode(args, device, dtype, grid, R)
    free_memory()


    m = build_transformer(cfg, device, dtype)
    m.requires_grad_(False)
    m.eval()
    m.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=STOCK_TARGETS, init_lora_weights="gaussian"))
    gen = torch.Generator(device=device).manual_seed(0)
    for n, p in m.named_parameters():
        if "lora" in n:
            p.data = p.data.float()
            if "lora_B" in n:  # peft starts B at zero; a non-zero delta makes the fused-vs-unfused check mean something
                p.data.normal_(0.0, 0.02, generator=gen)
    b2 = stock_batch(grid, 2, txt, cfg["joint_attention_dim"], device, dtype)
    cond = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in b2.items()}
    uncond = {k: (v[1:] if torch.is_tensor(v) else v) for k, v in b2.items()}

    def measure(name, fn, levers, ref=None, **extra):
        try:
            with torch.no_grad():
                r = time_steps(fn, device, args.warmup, args.iters)
                if ref is not None:
                    out = m(**b2)[0].float()
                    r["rel_err_vs_unfused"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                    del out
            r.update(levers=levers, ok=True, **extra)
        except Exception as e:
            traceback.print_exc()
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "levers": levers}
            free_memory()
        V[name] = r
        log(name, {k: v for k, v in r.items() if k != "times_s"})
        return r

    # -- stock -----------------------------------------------------------------------------------------------
    measure("stock_pipeline_cfg_2x1_unfused", lambda: (m(**cond), m(**uncond)),
            ["stock pipeline: CFG as two batch-1 forwards", "LoRA unfused (peft)"])
    measure("stock_cfg_b2_unfused", lambda: m(**b2), ["CFG as batch 2", "LoRA unfused (peft)"])
    with torch.no_grad():
        ref = m(**b2)[0].float()
    m.fuse_lora()
    measure("stock_cfg_b2_fused", lambda: m(**b2), ["CFG as batch 2", "fuse_lora()"], ref=ref)
    small = stock_batch(grid_small, 2, txt, cfg["joint_attention_dim"], device, dtype)
    measure("stock_cfg_b2_fused_1024", lambda: m(**small), ["1024² reference: CFG as batch 2", "fuse_lora()"])

    # -- ours ------------------------------------------------------------------------------------------------
    n = strip_peft_wrappers(m)
    log(f"dropped {n} peft wrappers (LoRA stays fused in the weights)")
    kept = ["CFG as batch 2", "LoRA fused, peft wrappers dropped"]
    best = measure("ours_fused_plain", lambda: m(**b2), list(kept), ref=ref)
    state = {"best": best, "kept": kept}
    if not args.no_compile:
        configure_dynamo()
        # attention left eager first (in training, whole compiled blocks faulted right after the SDPA call)
        keep_attention_eager(True)
        compile_blocks(m, fullgraph=False)
        r = measure("ours_compile", lambda: m(**b2), kept + ["regional compile (attention eager)"], ref=ref)
        if r.get("ok") and r["median_s"] <= best["median_s"]:
            state = {"best": r, "kept": kept + ["regional compile (attention eager)"]}
        finish(args, device, env, R, state)
        # whole blocks compiled, attention inside the graph: last but one, everything above saved
        if device.type == "cuda":
            name = "ours_compile_whole_blocks"
            V[name] = {"ok": False, "error": "process died during this variant (see log)", "levers": kept + ["regional compile (whole blocks)"]}
            save_section(device, args.tiny, "generate", R)
            keep_attention_eager(False)
            torch_dynamo.reset()
            compile_blocks(m, fullgraph=True)
            r = measure(name, lambda: m(**b2), kept + ["regional compile (whole blocks)"], ref=ref)
            if r.get("ok") and r["median_s"] <= state["best"]["median_s"]:
                state = {"best": r, "kept": kept + ["regional compile (whole blocks)"]}
    kept, best = state["kept"], state["best"]
    finish(args, device, env, R, state)

    # cuDNN attention last, and only where the child-process check passed: a fault there ends the process
    if device.type == "cuda":
        if cudnn_pays(R.get("attention_sdpa", {})):
            name = "ours_compile_cudnn" if not args.no_compile else "ours_cudnn_attention"
            V[name] = {"ok": False, "error": "process died during this variant (see log)", "levers": kept + ["cuDNN attention"]}
            save_section(device, args.tiny, "generate", R)
            m.set_attention_backend("_native_cudnn")
            r = measure(name, lambda: m(**b2), kept + ["cuDNN attention"], ref=ref)
            if r.get("ok") and r["median_s"] <= best["median_s"]:
                state = {"best": r, "kept": kept + ["cuDNN attention"]}
            finish(args, device, env, R, state)
        else:
            R["cudnn_attention_skipped"] = ("child-process check: forcing cuDNN would not beat the default SDPA choice "
                                            "(on torch 2.11 the default already is cuDNN), or it failed or differed")
            save_section(device, args.tiny, "generate", R)


def finish(args, device, env, R, state):
    V = R["variants"]
    best, kept = state["best"], state["kept"]
    ours_name = next(k for k, v in V.items() if v is best)
    vae_stock, vae_ours = R["vae_s"]["stock"], R["vae_s"]["ours"]
    steps = args.steps
    est = {}
    for name, v in V.items():
        if v.get("ok") and "1024" not in name:
            vae_t = vae_ours if name.startswith("ours") else vae_stock
            est[name] = round(steps * v["median_s"] + vae_t, 2)
    R["end_to_end_estimate_s"] = est
    stock_pipe = est.get("stock_pipeline_cfg_2x1_unfused")
    stock_fused = est.get("stock_cfg_b2_fused")
    ours_total = est.get(ours_name)
    R["summary"] = {
        "gpu": env["gpu"], "ours": ours_name, "ours_levers": kept,
        "ours_step_s": V[ours_name].get("median_s"), "ours_total_s": ours_total,
        "stock_pipeline_total_s": stock_pipe, "stock_fused_total_s": stock_fused,
        "ours_vs_stock_pipeline": round(ours_total / stock_pipe, 3) if ours_total and stock_pipe else None,
        "ours_vs_stock_fused": round(ours_total / stock_fused, 3) if ours_total and stock_fused else None,
        "note": "total = steps x step + one VAE decode; text encoding (once per image) excluded from both",
    }
    save_section(device, args.tiny, "generate", R)
    base = V.get("stock_pipeline_cfg_2x1_unfused", {}).get("median_s")
    rows = []
    for name, v in V.items():
        rows.append({"name": name, "s": v.get("median_s"), "peak": v.get("peak_gib"), "first": v.get("first_s"),
                     "ratio": (v["median_s"] / base) if base and v.get("median_s") else None,
                     "total": est.get(name), "err": v.get("rel_err_vs_unfused"),
                     "note": "FAILED " + v["error"][:60] if not v.get("ok", True) else ""})
    print_table(f"denoising step, {R['what']} on {env['gpu']} (median of {args.iters}, s/step)", rows,
                [("name", "variant", 32), ("s", "s/step", 8), ("peak", "peak GiB", 9), ("first", "1st call s", 10),
                 ("ratio", "/stock_pipe", 11), ("total", f"{steps}-step+VAE s", 15), ("err", "rel err", 8), ("note", "note", 4)])
    print(f"VAE decode {vae_stock:.3f} s (stock), {vae_ours:.3f} s (ours)")
    print("summary:", R["summary"], flush=True)


if __name__ == "__main__":
    main()

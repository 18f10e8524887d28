"""Switching between resident style LoRAs on a Klein 9B replica, and the cold load of one from local storage.

In one process, one pipeline (Klein 9B transformer config, random bf16 weights), two r32 LoRAs on every block
Linear (87 M parameters, float32 files of 348 MB) written to local disk:
  stock   diffusers + peft: `pipe.load_lora_weights(file)` (cold load); switching resident adapters unfused
          (`set_adapters`: instant, but every denoising step then pays the LoRA matmuls, 1.96 vs 1.53 s/step at
          2048²), and fused (`unfuse_lora` + `set_adapters` + `fuse_lora`: what a fused replica must do).
  ours    the serving path: `serve.generator.KleinGenerator(pipe=..., accel="exact")` over our storage:
          `load_adapter_set(model_id)` (storage read with sha256 check, safetensors parse, factors to the GPU)
          is the cold load; `klein.generate.set_active_loras` (one addmm per layer from the pristine copies) is
          the switch; the same after `set_inference_mode(pipe, "fast")` (float8 weights requantised).
Page cache dropped for each file before a cold load (posix_fadvise DONTNEED). Targets: switch ≤ 50 ms,
cold load ≤ 1 s. Section "lora_switch" of bench/results/<gpu>-<date>.json.

    python bench/lora_switch.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _common import (
    KLEIN9B,
    TINY,
    build_pipeline,
    cuda_timer,
    ensure_ray_serve_importable,
    environment,
    free_memory,
    log,
    model_dtype,
    peak_gib,
    pick_device,
    print_table,
    random_lora_weights,
    save_section,
)

from cluster.storage import Storage
from klein.accel import set_inference_mode
from klein.fp8 import quantize_rowwise
from klein.generate import set_active_loras
from klein.lora import lora_to_bytes, read_lora
from serve.adapter_sets import adapter_set_id
from serve.generator import KleinGenerator


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--dir", default=None, help="local storage folder (default: a temporary one)")
    return p.parse_args()


def drop_cache(path: Path) -> None:
    """Evict the file from the page cache, so that the load reads the disk (written pages flushed first)."""
    os.sync()
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def med(xs):
    return round(statistics.median(xs), 4)


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    dtype = model_dtype(device)
    env = environment(device)
    log("environment", env)
    env["ray_serve_stubbed"] = ensure_ray_serve_importable()

    cfg = TINY if args.tiny else KLEIN9B
    R = {"what": "switch between resident r32 LoRAs (every block Linear) and cold-load one from local disk, Klein 9B config",
         "repeats": args.repeats, "tiny": args.tiny, "stock": {}, "ours": {},
         "targets": {"switch_s": 0.05, "cold_load_s": 1.0}}
    R["ray_serve_stubbed"] = env["ray_serve_stubbed"]
    save = lambda: save_section(device, args.tiny, "lora_switch", R)
    pipe = build_pipeline(cfg, device, dtype, tiny_vae=True)
    root = Path(args.dir or tempfile.mkdtemp(prefix="klein-switch-"))
    storage = Storage.from_uri(str(root))
    files, ids = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        lora = random_lora_weights(pipe.transformer, rank=32 if not args.tiny else 4, seed=seed)
        data = lora_to_bytes(lora)
        sha = storage.write_bytes(f"loras/{name}.safetensors", data)
        files[name] = root / "loras" / f"{name}.safetensors"
        ids[name] = adapter_set_id([{"key": f"loras/{name}.safetensors", "sha256": sha}])
        R["file_mb"] = round(len(data) / 2**20, 1)
        R["lora_params_m"] = round(sum(l.down.numel() + l.up.numel() for l in lora.layers.values()) / 1e6, 2)
    del lora, data

    # -- stock: diffusers + peft ---------------------------------------------------------------------------
    S = R["stock"]
    try:
        loads = []
        for name in ("a", "b"):
            drop_cache(files[name])
            stop = cuda_timer(device)
            pipe.load_lora_weights(str(files[name]), adapter_name=name)
            loads.append(round(stop(), 4))
        S["cold_load_s"] = loads
        unfused, fused = [], []
        for i in range(args.repeats):
            name = "ab"[i % 2]
            stop = cuda_timer(device)
            pipe.set_adapters([name], [1.0])
            unfused.append(stop())
        S["switch_unfused_s"] = med(unfused)
        pipe.set_adapters(["a"], [1.0])
        pipe.fuse_lora(adapter_names=["a"])
        for i in range(args.repeats):
            name = "ba"[i % 2]
            stop = cuda_timer(device)
            pipe.unfuse_lora()
            pipe.set_adapters([name], [1.0])
            pipe.fuse_lora(adapter_names=[name])
            fused.append(stop())
        S["switch_fused_s"] = med(fused)
        S["switch_fused_all_s"] = [round(x, 4) for x in fused]
        S["peak_gib"] = peak_gib(device)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        log("stock", S)
    except Exception as e:
        traceback.print_exc()
        S["error"] = str(e)[:1000]
    save()
    free_memory()

    # -- ours: the generator's path ------------------------------------------------------------------------
    O = R["ours"]
    try:
        gen = KleinGenerator("random-klein9b", storage=storage, accel="exact", compile=False, pipe=pipe)
        loads, names = [], {}
        for name in ("a", "b"):
            drop_cache(files[name])
            stop = cuda_timer(device)
            names[name] = gen.load_adapter_set(ids[name])
            loads.append(round(stop(), 4))
        O["cold_load_s"] = loads
        # where a cold load's time goes (same steps, run one by one)
        gen.delete_adapters(names["b"])
        drop_cache(files["b"])
        t0 = time.perf_counter()
        raw = storage.read_verified("loras/b.safetensors", ids["b"].rpartition("#")[2])
        t1 = time.perf_counter()
        lora = read_lora(raw)
        t2 = time.perf_counter()
        stop = cuda_timer(device)
        gen.accel.loras.add(names["b"][0], lora)
        t3 = stop()
        O["cold_load_breakdown_s"] = {"read_and_sha256": round(t1 - t0, 4), "parse": round(t2 - t1, 4), "to_gpu": round(t3, 4)}
        del raw, lora
        na, nb = names["a"][0], names["b"][0]
        stop = cuda_timer(device)
        set_active_loras(pipe, [(na, None, 1.0)])
        O["first_activation_s"] = round(stop(), 4)  # makes the pristine copies of the base weights
        O["pristine_gib"] = round(sum(t.numel() * t.element_size() for t in gen.accel.loras.pristine.values()) / 2**30, 2)

        def switches(current):
            """`current`: the adapter fused now; every timed switch changes the weights."""
            other = nb if current == na else na
            times = {"a<->b": [], "to_base_and_back": [], "weighted_pair": []}
            for i in range(args.repeats):
                stop = cuda_timer(device)
                set_active_loras(pipe, [(other if i % 2 == 0 else current, None, 1.0)])
                times["a<->b"].append(stop())
            for _ in range(args.repeats // 2):
                stop = cuda_timer(device)
                set_active_loras(pipe, [])
                times["to_base_and_back"].append(stop())
                stop = cuda_timer(device)
                set_active_loras(pipe, [(na, None, 1.0)])
                times["to_base_and_back"].append(stop())
            for _ in range(args.repeats // 2):
                stop = cuda_timer(device)
                set_active_loras(pipe, [(na, None, 0.7), (nb, None, 0.5)])
                times["weighted_pair"].append(stop())
                stop = cuda_timer(device)
                set_active_loras(pipe, [(na, None, 1.0)])
                times["weighted_pair"].append(stop())
            out = {k: med(v) for k, v in times.items()}
            out["all_a<->b_s"] = [round(x, 4) for x in times["a<->b"]]
            return out

        O["exact"] = switches(na)
        O["exact"]["peak_gib"] = peak_gib(device)
        log("ours exact", O)
        save()
        stop = cuda_timer(device)
        accel = set_inference_mode(pipe, "fast")
        O["to_fast_mode_s"] = round(stop(), 3)
        if device.type == "cuda":  # what prepare_for_inference does when it compiles (blocks skipped here)
            accel.loras.quantize = torch.compile(quantize_rowwise)
        stop = cuda_timer(device)
        set_active_loras(pipe, [(nb, None, 1.0)])  # first fast switch compiles the requantisation
        O["fast_first_switch_s"] = round(stop(), 3)
        O["fast"] = switches(nb)
        O["fast"]["peak_gib"] = peak_gib(device)
        log("ours fast", O["fast"])
    except Exception as e:
        traceback.print_exc()
        O["error"] = str(e)[:1000]
    finish(args, device, env, R)


def finish(args, device, env, R):
    S, O = R["stock"], R["ours"]
    rows = [
        {"name": "cold load (median of 2)", "stock": med(S["cold_load_s"]) if S.get("cold_load_s") else None,
         "ours": med(O["cold_load_s"]) if O.get("cold_load_s") else None, "target": 1.0},
        {"name": "switch a<->b, fused", "stock": S.get("switch_fused_s"), "ours": O.get("exact", {}).get("a<->b"), "target": 0.05},
        {"name": "switch a<->b, fast (fp8)", "stock": S.get("switch_fused_s"), "ours": O.get("fast", {}).get("a<->b"), "target": 0.05},
        {"name": "switch, stock unfused", "stock": S.get("switch_unfused_s"), "ours": None, "target": None},
        {"name": "to base and back", "stock": None, "ours": O.get("exact", {}).get("to_base_and_back"), "target": 0.05},
        {"name": "weighted pair", "stock": None, "ours": O.get("exact", {}).get("weighted_pair"), "target": 0.05},
    ]
    for r in rows:
        r["ratio"] = r["ours"] / r["stock"] if r.get("ours") and r.get("stock") else None
        r["met"] = "" if r["target"] is None or r["ours"] is None else ("yes" if r["ours"] <= r["target"] else "NO")
    R["summary"] = {r["name"]: {k: r[k] for k in ("stock", "ours", "target", "met")} for r in rows}
    save_section(device, args.tiny, "lora_switch", R)
    print_table(f"LoRA switch and cold load, r32 on every block Linear, Klein 9B config, on {env['gpu']} (s)", rows,
                [("name", "what", 26), ("stock", "stock", 9), ("ours", "ours", 9), ("ratio", "ours/stock", 11),
                 ("target", "target", 7), ("met", "met", 4)])
    print("cold load breakdown:", O.get("cold_load_breakdown_s"), "first activation:", O.get("first_activation_s"), flush=True)


if __name__ == "__main__":
    main()

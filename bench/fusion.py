"""K-LoRA preparation for 3 rank-32 LoRAs on the Klein 9B configuration: the per-layer top-k |ΔW| scores.

K-LoRA needs, for every layer and LoRA, the sum of the k = r_i·r_j largest |ΔW| entries (k = 1024 at r32):
288 layers × 3 LoRAs of ΔW, 26 G entries in all.
  stock   the previous `serve.fusion` code (one layer at a time: dense ΔW, `torch.topk` over all its entries),
          on the GPU with the LoRAs already there; timed on one layer of each shape and scaled by entry count
          (the whole run would take tens of seconds of device time).
  ours    `serve.fusion.klora_layer_scores(loras, device)`: layers of one shape batched in one bmm, top-k from the
          k blocks with the largest block maxima (exact); timed from LoRAs in CPU memory (as read from storage:
          includes the transfer), from LoRAs already on the GPU, and end to end through
          `FusionService.klora_scores` (local storage read, sha256 check, parse, scores).
Checks the scores against the stock algorithm's on the timed layers. Target ≤ 0.3 s.
Section "fusion" of bench/results/<gpu>-<date>.json.

    python bench/fusion.py [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import traceback

import torch
from _common import (
    KLEIN9B,
    TINY,
    build_transformer,
    cuda_timer,
    ensure_ray_serve_importable,
    environment,
    log,
    pick_device,
    print_table,
    save_section,
)

from cluster.storage import Storage
from klein.lora import LoraLayer, LoraWeights, lora_to_bytes
from serve.fusion import FusionService, KLoraSchedule, klora_k, klora_layer_scores


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def stock_layer_score(layer, k: int, device) -> float:
    """The previous implementation, per layer: dense ΔW, a full top-k over its entries."""
    delta = (layer.up.to(device).float() @ layer.down.to(device).float()) * layer.scale
    k = min(int(k), delta.numel())
    return float(torch.topk(delta.abs().flatten(), k).values.sum())


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    env = environment(device)
    log("environment", env)
    env["ray_serve_stubbed"] = ensure_ray_serve_importable()

    cfg = TINY if args.tiny else KLEIN9B
    rank = 4 if args.tiny else 32
    with torch.device("meta"):  # only the module names and shapes are needed
        meta = build_transformer(cfg, "meta", torch.bfloat16)
    loras = []
    for seed, scale in ((1, 0.020), (2, 0.022), (3, 0.018)):
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for name, module in meta.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                layers[name] = LoraLayer(torch.randn(rank, module.in_features, generator=g) * scale,
                                         torch.randn(module.out_features, rank, generator=g) * scale, float(rank))
        loras.append(LoraWeights(layers=layers))
    n_entries = sum(l.up.shape[0] * l.down.shape[1] for lora in loras for l in lora.layers.values())
    R = {"what": f"K-LoRA scores of 3 r{rank} LoRAs on every block Linear, Klein 9B config ({len(loras[0].layers)} layers, "
                 f"{n_entries / 1e9:.1f} G ΔW entries)", "tiny": args.tiny, "target_s": 0.3}
    R["ray_serve_stubbed"] = env["ray_serve_stubbed"]
    save = lambda: save_section(device, args.tiny, "fusion", R)

    # -- ours --------------------------------------------------------------------------------------------------
    klora_layer_scores(loras, device)  # warm-up (allocator, kernels)
    times = []
    for _ in range(args.repeats):
        stop = cuda_timer(device)
        scores = klora_layer_scores(loras, device)
        times.append(stop())
    R["ours_from_cpu_s"] = round(statistics.median(times), 4)
    on_device = [LoraWeights(layers={n: LoraLayer(l.down.to(device), l.up.to(device), l.alpha) for n, l in x.layers.items()})
                 for x in loras]
    times = []
    for _ in range(args.repeats):
        stop = cuda_timer(device)
        klora_layer_scores(on_device, device)
        times.append(stop())
    R["ours_on_gpu_s"] = round(statistics.median(times), 4)
    del on_device
    log("ours", R)
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage.from_uri(tmp)
        specs = []
        for i, lora in enumerate(loras):
            data = lora_to_bytes(lora)
            specs.append({"id": f"l{i}", "key": f"l{i}.safetensors", "sha256": storage.write_bytes(f"l{i}.safetensors", data)})
        times = []
        for _ in range(args.repeats):
            service = FusionService(storage, device=device)  # a fresh cache each time
            stop = cuda_timer(device)
            service.klora_scores(specs)
            times.append(stop())
        R["ours_service_end_to_end_s"] = round(statistics.median(times), 4)
    save()

    # -- stock (previous code): one layer of each shape, scaled by entries ---------------------------------------
    try:
        by_shape = {}
        for name in sorted(loras[0].layers):
            layer = loras[0].layers[name]
            by_shape.setdefault((layer.up.shape[0], layer.down.shape[1]), name)
        gpu_layers = {n: [LoraLayer(x.layers[n].down.to(device), x.layers[n].up.to(device), x.layers[n].alpha) for x in loras]
                      for n in by_shape.values()}
        for n, ls in gpu_layers.items():  # warm-up
            stock_layer_score(ls[0], klora_k(loras, n), device)
        stop = cuda_timer(device)
        timed_entries = 0
        worst = 0.0
        for n, ls in gpu_layers.items():
            k = klora_k(loras, n)
            for i, l in enumerate(ls):
                ref = stock_layer_score(l, k, device)
                worst = max(worst, abs(ref - scores[n][i]) / ref)
                timed_entries += l.up.shape[0] * l.down.shape[1]
        t = stop()
        R["stock_timed_layers"] = len(gpu_layers) * len(loras)
        R["stock_timed_s"] = round(t, 4)
        R["stock_estimate_s"] = round(t * n_entries / timed_entries, 3)
        R["scores_max_rel_diff_vs_stock"] = worst
        steps = 50
        R["schedule_equal_to_stock_on_timed_layers"] = all(
            KLoraSchedule.build({n: scores[n]}, steps).choices == KLoraSchedule.build(
                {n: [stock_layer_score(l, klora_k(loras, n), device) for l in ls]}, steps).choices
            for n, ls in gpu_layers.items())
        log("stock", {k: v for k, v in R.items() if k.startswith(("stock", "scores", "schedule"))})
    except Exception as e:
        traceback.print_exc()
        R["stock_error"] = str(e)[:1000]
    stock = R.get("stock_estimate_s")
    rows = [{"name": "from LoRAs in CPU memory", "ours": R["ours_from_cpu_s"], "stock": stock},
            {"name": "LoRAs already on the GPU", "ours": R["ours_on_gpu_s"], "stock": stock},
            {"name": "FusionService end to end", "ours": R["ours_service_end_to_end_s"], "stock": None}]
    for r in rows:
        r["ratio"] = r["ours"] / r["stock"] if r["stock"] else None
        r["met"] = "yes" if r["ours"] <= 0.3 else "NO"
    R["summary"] = {"ours_s": R["ours_from_cpu_s"], "stock_estimate_s": stock, "target_met": R["ours_from_cpu_s"] <= 0.3,
                    "service_end_to_end_s": R["ours_service_end_to_end_s"]}
    save()
    print_table(f"{R['what']} on {env['gpu']} (s)", rows,
                [("name", "what", 26), ("ours", "ours", 8), ("stock", "stock", 8), ("ratio", "ours/stock", 11), ("met", "≤0.3s", 6)])
    print("scores vs stock: max rel diff", R.get("scores_max_rel_diff_vs_stock"), "schedules equal:",
          R.get("schedule_equal_to_stock_on_timed_layers"), flush=True)


if __name__ == "__main__":
    main()

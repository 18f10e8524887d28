"""One LoRA training step of FLUX.2 Klein 9B at 1024² (4096 image + 512 text tokens), batch 1: stock vs ours.

In one process:
  stock   the baseline's step (shared/reference/baseline_klein9b.py): stock diffusers Flux2Transformer2DModel
          (random bf16 weights), stock peft LoRA r32 on every block Linear, bf16 autocast, MSE, transformers'
          Adafactor; with and without gradient checkpointing.
  ours    the product's step, `train.step.Trainer` (setup with `klein.model.load_transformer` swapped
          for a random-weight Klein 9B built on the GPU), `klein.accel.prepare_for_training` (peft input upcast
          off, regional compile with the attention call eager), `train.optim.make_optimizer` (GroupedAdafactor
          on CUDA), `make_lr_scheduler`, and the body of `train_loop_per_worker`: `make_batch` from a CPU cache,
          `flow_matching_loss`, backward, `loss.item()`, grad clipping, optimizer, scheduler.
          Variants: the same step with the inputs staged on the GPU and no per-step host sync (what the loop
          could still change), with gradient checkpointing (the config switch), and `fp8=True` (frozen base
          in float8 e4m3, `klein.fp8`).
  loss    200 steps on one fixed batch from the same initial LoRA, bf16 then fp8: the per-step relative loss
          difference (target: within 2%).

Prints a table (s/step median, peak GiB, ratio to stock) and merges the numbers into
bench/results/<gpu>-<date>.json (section "train_step").

    python bench/train_step.py            # on a GPU (about 5 min on an H200, compiles included)
    python bench/train_step.py --tiny     # the same code on tiny shapes (CPU ok) to check the logic
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import traceback

import torch
import torch._dynamo
from _common import (
    KLEIN9B,
    STOCK_TARGETS,
    TINY,
    build_transformer,
    environment,
    free_memory,
    log,
    model_dtype,
    pick_device,
    print_table,
    save_section,
    stock_batch,
    sync,
    time_steps,
)
from peft import LoraConfig
from transformers.optimization import Adafactor

from klein.accel import InputPrefetcher, prepare_for_training
from train.cache import CachedItem, TrainingData
from train.loop import StepPlan, make_batch, make_lr_scheduler
from train.optim import make_optimizer
from train.recipe import TrainConfig
from train.step import Trainer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU if no GPU): checks the logic, numbers mean nothing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--loss-steps", type=int, default=200, help="steps of the fixed-batch bf16 vs fp8 loss comparison")
    p.add_argument("--budget-gib", type=float, default=44.0, help="peak memory target for the step")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--quick", action="store_true", help="no fixed-batch loss check, no checkpointing variant")
    p.add_argument("--section", default="train_step", help="results section (a second run on another day/machine: another name)")
    return p.parse_args()


def shapes(tiny: bool):
    if tiny:
        return TINY, 128, 16  # 128 px -> 8x8 latents -> 64 image tokens; 16 text tokens
    return KLEIN9B, 1024, 512  # 4096 image tokens + 512 text tokens


# ---------------------------------------------------------------------------------------------------------
def run_stock(args, device, results: dict):
    """The baseline's logic, verbatim apart from the timing helper."""
    cfg, res, txt = shapes(args.tiny)
    m = build_transformer(cfg, device, model_dtype(device))
    m.requires_grad_(False)
    m.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=STOCK_TARGETS, init_lora_weights="gaussian"))
    for n, p in m.named_parameters():
        if "lora" in n:
            p.data = p.data.float()
            p.requires_grad_(True)
    lora_params = [p for p in m.parameters() if p.requires_grad]
    results["stock_lora_params_m"] = round(sum(p.numel() for p in lora_params) / 1e6, 2)
    opt = Adafactor(lora_params, lr=1e-4, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-4)
    b = stock_batch(res // 16, 1, txt, cfg["joint_attention_dim"], device, model_dtype(device))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = m(**b)[0]
        loss = torch.nn.functional.mse_loss(out.float(), b["hidden_states"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for gc_on, name in ((True, "stock_gc"), (False, "stock_nogc")):
        if gc_on:
            m.enable_gradient_checkpointing()
        else:
            m.disable_gradient_checkpointing()
        r = time_steps(step, device, args.warmup, args.iters)
        r.update(levers=["stock", "gradient_checkpointing" if gc_on else "no_checkpointing"], ok=True)
        results["variants"][name] = r
        log(name, r)


class _Skip(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
class Ours:
    """The product's model, optimizer, scheduler and data, and the loop's step over them."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        cfg, res, txt = shapes(args.tiny)

        def load_random_transformer(source="tiny", dtype=torch.float32, device="cpu", cache_dir=None):
            return build_transformer(cfg, device, dtype)  # instead of from_pretrained(folder)

        # product defaults otherwise
        self.tc = TrainConfig(model="random-klein9b", steps=1000, compile=False if args.no_compile else None)
        self.trainer, _ = Trainer.setup(self.tc, device, load_transformer=load_random_transformer,
                                        autocast_dtype=torch.bfloat16 if (device.type == "cuda" or args.tiny) else None)
        self.transformer, self.accel, self.params = self.trainer.transformer, self.trainer.accel, self.trainer.params
        log("prepare_for_training", self.accel)
        self.initial = [p.detach().clone() for p in self.params]
        self.lora_params_m = round(sum(p.numel() for p in self.params) / 1e6, 2)
        g = res // 16
        gen = torch.Generator().manual_seed(0)
        items = [CachedItem(f"ref{i}", "zxy_style. a lighthouse", (res, res), torch.randn(128, g, g, generator=gen),
                            torch.randn(txt, cfg["joint_attention_dim"], generator=gen)) for i in range(4)]
        self.data = TrainingData("bench", items, torch.randn(txt, cfg["joint_attention_dim"], generator=gen), "random", res)
        self.plan = StepPlan(self.data.items, self.tc.batch_size, 1, self.tc.seed)
        self.counter = itertools.count(1)
        self.staged = []
        self.last_loss = None
        self.fetch = None

    @property
    def optimizer(self):
        return self.trainer.optimizer

    def fp8(self):
        """The same model, frozen base converted to float8 (the product call with fp8=True)."""
        torch._dynamo.reset()  # drop the bf16 graphs (and their references to the bf16 weights)
        self.accel = prepare_for_training(self.transformer, self.device, compile=False if self.args.no_compile else None, fp8=True)
        log("prepare_for_training(fp8=True)", self.accel)
        free_memory()

    def reset_lora(self):
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        self.trainer.optimizer = make_optimizer(self.params, self.tc, self.device)
        self.trainer.scheduler = make_lr_scheduler(self.trainer.optimizer, self.tc)

    # the product's step (train.step.Trainer.step), as train.worker runs it (no Ray, no fault hook, no status)
    def step_product(self):
        step = next(self.counter)
        self.last_loss = self.trainer.step(lambda micro: make_batch(self.plan, self.data, step, 0, self.tc.caption_dropout_rate))

    # the same step with klein.accel.InputPrefetcher making the next step's batch while this one runs
    def step_prefetch(self):
        if self.fetch is None:
            self.fetch = InputPrefetcher(lambda i: make_batch(self.plan, self.data, i, 0, self.tc.caption_dropout_rate), self.device)
        step = next(self.counter)
        self.last_loss = self.trainer.step(lambda micro: self.fetch(step, next_index=step + 1))

    # inputs already on the device, no per-step host sync: what the loop itself could still change
    def stage(self, n=8):
        self.staged = [tuple(t.to(self.device) for t in make_batch(self.plan, self.data, s, 0, self.tc.caption_dropout_rate)[:4])
                       for s in range(1, n + 1)]

    def step_nosync(self):
        batch = self.staged[next(self.counter) % len(self.staged)]
        self.trainer.step(lambda micro: batch, sync=False)

    def fixed_batch_losses(self, steps: int) -> dict:
        """`steps` product steps on the one fixed (staged) batch from the initial LoRA; losses and step times."""
        self.reset_lora()
        batch = self.staged[0]
        losses = torch.zeros(steps, device=self.device, dtype=torch.float64)
        times = []
        for i in range(steps):
            sync(self.device)
            t0 = time.perf_counter()
            losses[i] = self.trainer.step(lambda micro: batch, sync=False)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return {"losses": [round(x, 6) for x in losses.tolist()], "median_s": round(statistics.median(times[5:] or times), 4)}


def run_ours(args, device, results: dict):
    V = results["variants"]
    ours = Ours(args, device)
    results["ours_lora_params_m"] = ours.lora_params_m
    results["ours_levers"] = ours.accel["levers"] + ["GroupedAdafactor" if type(ours.optimizer).__name__ == "GroupedAdafactor"
                                                     else type(ours.optimizer).__name__]

    def measure(name, step, levers, **extra):
        try:
            r = time_steps(step, device, args.warmup, args.iters)
            r.update(levers=list(levers), ok=True, **extra)
            if ours.last_loss is not None:
                r["last_loss"] = ours.last_loss
        except Exception as e:  # record and go on: one failing variant must not lose the others' numbers
            traceback.print_exc()
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "levers": list(levers)}
            ours.optimizer.zero_grad(set_to_none=True)
            free_memory()
        V[name] = r
        log(name, {k: v for k, v in r.items() if k != "times_s"})
        save_section(device, args.tiny, args.section, results)
        return r

    levers = results["ours_levers"]
    measure("ours", ours.step_product, ["product step (train.step.Trainer.step)"] + levers)
    measure("ours_prefetch", ours.step_prefetch, ["product step + klein.accel.InputPrefetcher"] + levers)
    ours.stage()
    measure("ours_nosync", ours.step_nosync, ["inputs on the GPU, no loss.item()"] + levers)
    if not args.quick:
        ours.transformer.enable_gradient_checkpointing()
        measure("ours_gc", ours.step_product, ["product step", "gradient_checkpointing: true"] + levers)
        ours.transformer.disable_gradient_checkpointing()

    loss = {} if args.quick else results.setdefault("loss_check", {"steps": args.loss_steps, "batch": "one fixed staged batch, same initial LoRA"})
    try:
        if args.quick:
            raise _Skip
        bf16 = ours.fixed_batch_losses(args.loss_steps)
        loss["bf16"] = bf16
        log("bf16 fixed-batch losses", bf16["losses"][:3], "...", bf16["losses"][-3:], "median step", bf16["median_s"])
    except _Skip:
        pass
    except Exception as e:
        traceback.print_exc()
        loss["bf16_error"] = str(e)[:1000]
    save_section(device, args.tiny, args.section, results)
    if args.skip_fp8:
        return ours
    try:
        ours.fp8()
    except Exception as e:
        traceback.print_exc()
        V["ours_fp8"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        return ours
    ours.reset_lora()
    fp8_levers = ours.accel["levers"] + levers[-1:]
    measure("ours_fp8", ours.step_product, ["product step", "fp8=True"] + fp8_levers)
    measure("ours_fp8_prefetch", ours.step_prefetch, ["product step + klein.accel.InputPrefetcher", "fp8=True"] + fp8_levers)
    measure("ours_fp8_nosync", ours.step_nosync, ["inputs on the GPU, no loss.item()", "fp8=True"] + fp8_levers)
    try:
        if args.quick:
            return ours
        fp8 = ours.fixed_batch_losses(args.loss_steps)
        loss["fp8"] = fp8
        if "bf16" in loss:
            a, b = loss["bf16"]["losses"], fp8["losses"]
            rel = [abs(y - x) / abs(x) for x, y in zip(a, b)]
            tail = max(1, len(a) // 10)
            loss["rel_diff_max"] = round(max(rel), 5)
            loss["rel_diff_mean"] = round(sum(rel) / len(rel), 5)
            loss["rel_diff_last10pct_mean"] = round(abs(sum(b[-tail:]) - sum(a[-tail:])) / abs(sum(a[-tail:])), 5)
            loss["bf16_first_last"] = [a[0], a[-1]]
            loss["fp8_first_last"] = [b[0], b[-1]]
            loss["within_2pct"] = loss["rel_diff_max"] <= 0.02
        log("fp8 loss check", {k: v for k, v in loss.items() if k not in ("bf16", "fp8")})
    except Exception as e:
        traceback.print_exc()
        loss["fp8_error"] = str(e)[:1000]
    return ours


def finish(args, device, results):
    env = environment(device)
    V = results["variants"]
    sg, sn = V.get("stock_gc", {}).get("median_s"), V.get("stock_nogc", {}).get("median_s")
    rows = []
    for name, v in V.items():
        rows.append({"name": name, "s": v.get("median_s"), "peak": v.get("peak_gib"), "first": v.get("first_s"),
                     "vs_gc": (v["median_s"] / sg) if sg and v.get("median_s") else None,
                     "vs_nogc": (v["median_s"] / sn) if sn and v.get("median_s") else None,
                     "note": "FAILED " + v.get("error", "")[:60] if not v.get("ok", True) else ""})
    ours, fp8 = V.get("ours", {}), V.get("ours_fp8", {})
    loss = results.get("loss_check", {})
    results["summary"] = {
        "gpu": env["gpu"], "stock_gc_s": sg, "stock_nogc_s": sn,
        "ours_s": ours.get("median_s"), "ours_peak_gib": ours.get("peak_gib"),
        "ours_prefetch_s": V.get("ours_prefetch", {}).get("median_s"),
        "ours_fp8_prefetch_s": V.get("ours_fp8_prefetch", {}).get("median_s"),
        "ours_vs_stock_nogc": round(ours["median_s"] / sn, 3) if sn and ours.get("median_s") else None,
        "ours_vs_stock_gc": round(ours["median_s"] / sg, 3) if sg and ours.get("median_s") else None,
        "target_bf16": {"s": 0.30, "peak_gib": args.budget_gib,
                        "met": bool(ours.get("median_s") and ours["median_s"] <= 0.30 and (ours.get("peak_gib") or 0) <= args.budget_gib)},
        "ours_fp8_s": fp8.get("median_s"), "ours_fp8_peak_gib": fp8.get("peak_gib"),
        "target_fp8": {"s": 0.20, "loss_within": 0.02, "met_time": bool(fp8.get("median_s") and fp8["median_s"] <= 0.20),
                       "loss_rel_diff_max": loss.get("rel_diff_max"), "met_loss": loss.get("within_2pct")},
    }
    save_section(device, args.tiny, args.section, results)
    print_table(f"train step, {results['what']} on {env['gpu']} (median of {args.iters}, s/step)", rows,
                [("name", "variant", 18), ("s", "s/step", 8), ("peak", "peak GiB", 9), ("first", "1st call s", 10),
                 ("vs_gc", "/stock_gc", 10), ("vs_nogc", "/stock_nogc", 12), ("note", "note", 4)])
    if loss:
        print("loss check:", {k: v for k, v in loss.items() if k not in ("bf16", "fp8")})
    print("summary:", results["summary"], flush=True)


def main():
    args = parse_args()
    device = pick_device(args.tiny)
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    log("environment", env)
    cfg, res, txt = shapes(args.tiny)
    results = {
        "what": "LoRA training step, Klein 9B config (random bf16 weights), r32 on every block Linear, "
                f"{res}x{res} ({(res // 16) ** 2} image + {txt} text tokens), batch 1, bf16 autocast, Adafactor",
        "warmup": args.warmup, "iters": args.iters, "budget_gib": args.budget_gib, "tiny": args.tiny,
        "variants": {},
        "issue_reference_h200": {"stock_gc": {"median_s": 0.733, "peak_gib": 20.0}, "stock_nogc": {"median_s": 0.518, "peak_gib": 44.4},
                                 "target": {"median_s": 0.30, "peak_gib": 44.0}, "target_fp8": {"median_s": 0.20, "loss_within": 0.02}},
    }
    if not args.skip_stock:
        try:
            run_stock(args, device, results)
        except Exception as e:
            traceback.print_exc()
            results["stock_error"] = str(e)[:1000]
        free_memory()  # the stock model went with run_stock's frame
        save_section(device, args.tiny, args.section, results)
    try:
        run_ours(args, device, results)
    finally:
        finish(args, device, results)


if __name__ == "__main__":
    main()

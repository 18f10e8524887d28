"""Shared pieces of the GPU benchmarks: the Klein 9B transformer configuration with random weights, timing,
the results file and the printed table.

Every benchmark times the stock diffusers+peft path and ours in the same process, on the same GPU, and
merges its section into `bench/results/<gpu-slug>-<YYYY-MM-DD>.json` (copied to $OUT when that is set).
`--tiny` runs the same code on small shapes (CPU if no GPU) to check the logic before spending GPU time.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks run as scripts (`python bench/x.py`): the repo's packages below
    sys.path.insert(0, str(REPO))

from klein.tiny import KLEIN_SCHEDULER  # noqa: E402 — after the path set-up above
from serve.testing import random_lora  # noqa: E402

# FLUX.2 Klein 9B transformer (DESIGN.md): hidden 4096 = 32 heads x 128, 8 double + 24 single blocks,
# joint_attention_dim 12288 (three Qwen3-8B layers), in_channels 128, no guidance embedding.
KLEIN9B = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
               num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
TINY = dict(KLEIN9B, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))

# The baseline's (shared/reference/baseline_klein9b.py) LoRA targets: every Linear inside the 32 blocks.
STOCK_TARGETS = (r".*(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                 r"|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
                 r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))$")

GIB = 2**30


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def pick_device(tiny: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the logic on CPU")
    return torch.device("cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_transformer(cfg: dict, device, dtype):
    """A Flux2Transformer2DModel with random weights created directly on `device` in `dtype` (as the baseline)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Flux2Transformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / GIB, 2)
    return None


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(step, device, warmup: int, iters: int) -> dict:
    """Run `step()` warmup + iters times, each bracketed by device syncs; peak memory over the timed steps.

    The first warm-up call carries any compilation; its time is reported as `first_s`.
    """
    times = []
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    reset_peak(device)
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "times_s": [round(t, 4) for t in times],
        "first_s": round(first, 2),
        "peak_gib": peak_gib(device),
    }


def gpu_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device) -> dict:
    env = {
        "gpu": gpu_name(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["sm_count"] = props.multi_processor_count
    return env


def results_path(device, tiny: bool) -> Path:
    env = environment(device)
    if tiny:  # logic checks never land in the committed results
        return Path(os.environ.get("TMPDIR", "/tmp")) / "klein-bench" / f"{slug(env['gpu'])}-{env['date_utc']}-tiny.json"
    return REPO / "bench" / "results" / f"{slug(env['gpu'])}-{env['date_utc']}.json"


RUN_ID = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def save_section(device, tiny: bool, section: str, payload: dict) -> Path:
    """Merge `payload` under `section` into this GPU's results file for today, and copy it to $OUT.

    A section written by an earlier run (another run id) is kept under `previous_runs[section]`, not lost.
    """
    path = results_path(device, tiny)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    old = data.get(section)
    if old is not None and old.get("run_id") != RUN_ID:
        prev = data.setdefault("previous_runs", {}).setdefault(section, [])
        prev.append({"environment": data.get("environment"), **old})
    data["environment"] = environment(device)
    payload["run_id"] = RUN_ID
    data[section] = payload
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    out = os.environ.get("OUT")
    if out:
        shutil.copy(path, Path(out) / path.name)
    log("wrote", path)
    return path


def fmt(x, nd=3):
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def print_table(title: str, rows: list[dict], cols: list[tuple[str, str, int]]):
    """rows: dicts; cols: (key, header, width)."""
    print("\n" + title, flush=True)
    print(" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (_, h, w) in enumerate(cols)))
    for r in rows:
        cells = []
        for i, (k, _, w) in enumerate(cols):
            v = r.get(k)
            s = v if isinstance(v, str) else ("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
            cells.append(s.ljust(w) if i == 0 else s.rjust(w))
        print(" ".join(cells))
    sys.stdout.flush()


def img_ids(h: int, w: int, device) -> torch.Tensor:
    """The baseline's image position ids: (t=0, row, col, l=0), float, [1, h*w, 4]."""
    ii = torch.zeros(h, w, 4, device=device)
    ii[..., 1] = torch.arange(h, device=device)[:, None]
    ii[..., 2] = torch.arange(w, device=device)[None, :]
    return ii.reshape(1, h * w, 4)


def stock_batch(grid: int, bs: int, txt: int, joint_dim: int, device, dtype=torch.bfloat16) -> dict:
    """The baseline's forward kwargs: grid x grid image tokens, txt text tokens."""
    return dict(hidden_states=torch.randn(bs, grid * grid, 128, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(bs, txt, joint_dim, device=device, dtype=dtype),
                timestep=torch.rand(bs, device=device), img_ids=img_ids(grid, grid, device).expand(bs, -1, -1),
                txt_ids=torch.zeros(bs, txt, 4, device=device), return_dict=False)


def random_lora_weights(transformer, rank: int = 32, scale: float = 0.02, seed: int = 0, preset: str = "all"):
    """A random `klein.lora.LoraWeights` (CPU, float32) on every block Linear, as a trained r32 LoRA is laid out.

    With down, up ~ N(0, scale²) and alpha = rank, ΔW entries are ~ scale²·√r (~15% of a 4096-wide init weight
    at scale 0.02): large enough that fused-vs-unfused and fp8 differences mean something.
    """
    return random_lora(transformer, rank=rank, scale=scale, seed=seed, preset=preset)


def build_pipeline(cfg: dict, device, dtype, tiny_vae: bool = False, seed: int = 0):
    """A Flux2KleinPipeline around a random-weight transformer of `cfg` and a random AutoencoderKLFlux2 (default =
    FLUX.2 config), with Klein's scheduler; no text encoder: `encode_prompt` answers fixed random Qwen3-like
    embeddings per prompt (the text stage runs once per image and is left out of every timing)."""
    torch.manual_seed(seed)
    transformer = build_transformer(cfg, device, dtype).eval()
    transformer.requires_grad_(False)
    vae_kwargs = dict(block_out_channels=(32, 32, 32, 32)) if tiny_vae else {}
    with torch.device(device):
        vae = AutoencoderKLFlux2(**vae_kwargs).to(dtype).eval()
    vae.requires_grad_(False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    joint = cfg["joint_attention_dim"]
    cache: dict = {}

    def encode_prompt(prompt=None, device=None, num_images_per_prompt=1, prompt_embeds=None, max_sequence_length=512,
                      text_encoder_out_layers=(9, 18, 27)):
        if prompt_embeds is None:
            key = (str(prompt), max_sequence_length)
            if key not in cache:
                g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
                cache[key] = torch.randn(1, max_sequence_length, joint, generator=g).to(transformer.device, dtype)
            prompt_embeds = cache[key]
        return prompt_embeds, pipe._prepare_text_ids(prompt_embeds).to(transformer.device)

    pipe.encode_prompt = encode_prompt
    return pipe


def ensure_ray_serve_importable() -> bool:
    """Make `from ray import serve` work where Ray Serve's own dependencies (starlette, fastapi, ...) are missing,
    as on the GPU image: the benchmarks time the plain parts of serve/ (KleinGenerator, FusionService), which
    never touch Serve, so a stub whose decorators return what they decorate stands in. Returns True if stubbed."""
    try:
        import ray.serve  # noqa: F401

        return False
    except Exception:  # ImportError, or a dependency missing deeper down
        import types

        import ray

        def decorator(*args, **kwargs):
            if args and callable(args[0]) and len(args) == 1 and not kwargs:
                return args[0]
            return lambda obj: obj

        stub = types.ModuleType("ray.serve")
        stub.deployment = stub.multiplexed = stub.batch = decorator
        sys.modules["ray.serve"] = stub
        ray.serve = stub
        log("ray.serve is not importable here: stubbed (its decorators only)")
        return True


def cuda_timer(device):
    """A wall-clock timer bracketed by device syncs: t = timer(); ...; t() -> seconds."""
    sync(device)
    t0 = time.perf_counter()

    def stop():
        sync(device)
        return time.perf_counter() - t0

    return stop


# -- SDPA backends, measured in a child process: a backend that faults (cuDNN's backward raised an illegal memory
# access inside the Klein training step on torch 2.11+cu130, H200, 2026-11-22) takes the CUDA context down with it
ATTENTION_SHAPES = {"infer": (2, 16896, False), "train": (1, 4608, True)}  # (batch, tokens, fwd+bwd)


def _attention_child(which: str, tiny: bool = False):
    b, n, train = ATTENTION_SHAPES[which]
    h, d = 32, 128
    if tiny:
        n = 64
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    # laid out as diffusers' attention hands them over: [B, S, H, D] made contiguous as [B, H, S, D]
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_(train) for _ in range(3))
    go = torch.randn(b, n, h * d, device=dev, dtype=torch.bfloat16, generator=gen)
    flops = 4 * b * h * n * n * d * (3.5 if train else 1.0)
    ref = None
    for name, be in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(be=be):
            if be is None:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                with sdpa_kernel(be):
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            o2 = o.permute(0, 2, 1, 3).reshape(b, n, h * d)  # as the block uses it: the grad arrives non-contiguous
            if train:
                o2.backward(go)
            return o
        row = {"backend": name}
        try:
            out = run().detach().float()
            torch.cuda.synchronize()
            if ref is None:
                ref = out
            row["rel_err_vs_default"] = round(((out - ref).norm() / ref.norm()).item(), 5)
            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                run()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 5
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), ok=True)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        print("ATTN " + json.dumps(row), flush=True)
        if not row["ok"]:
            break  # the context may be gone


def attention_bench(which: str, tiny: bool = False) -> dict:
    """SDPA backends at the step's attention shape, in a child process; one row per backend that finished."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--attention", which] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("ATTN ")]
    b, n, train = ATTENTION_SHAPES[which]
    res = {"shape": f"[{b}, 32, {n}, 128] bf16" + (" fwd+bwd" if train else " fwd"), "rc": p.returncode,
           "wall_s": round(time.perf_counter() - t0, 1), "backends": {r.pop("backend"): r for r in rows}}
    if p.returncode != 0:
        res["stderr_tail"] = p.stderr[-1500:]
    log("attention", which, res)
    return res


def cudnn_pays(att: dict, margin: float = 0.97) -> bool:
    """cuDNN attention ran cleanly, matched the default, and beat it by at least 3%."""
    be = att.get("backends", {})
    c, d = be.get("cudnn", {}), be.get("default", {})
    return (att.get("rc") == 0 and c.get("ok") and d.get("ok") and c.get("rel_err_vs_default", 1) < 2e-2
            and c["ms"] <= d["ms"] * margin)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--attention":
    _attention_child(sys.argv[2], tiny="--tiny" in sys.argv)

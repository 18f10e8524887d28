"""Write a FLUX.2 Klein diffusers folder with random bf16 weights at the real sizes, without downloading.

    python scripts/make_klein_folder.py OUT --size 9b|4b|test [--device cuda] [--max-shard-size 5GB]

`9b`: `Flux2TransformerModel` at Klein 9B's configuration (32 heads x 128 = 4096 hidden, 8 double + 24
single blocks, joint_attention_dim 12288 = 3 x Qwen3-8B's hidden size, in_channels 128, no guidance
embedding) with `Qwen3ForCausalLM` at Qwen3-8B's configuration as the text encoder. `4b`: 24 heads, 5 + 20
blocks, joint_attention_dim 7680, Qwen3-4B. Both get `AutoencoderKLFlux2` at diffusers' defaults (FLUX.2's
VAE: 128/256/512/512 channels, 32 latent channels, 2x2 patches) and the scheduler Klein ships with
(`klein.tiny.KLEIN_SCHEDULER`). `test`: small sizes through the very same code, for CPU tests.

Weights are made directly on `--device` in bf16 (no CPU round trip, no fp32 copy) and drawn as
normal(0, 0.02) for every matrix (norm weights stay 1, biases 0), which keeps activations finite through
all 36 encoder layers; they carry no knowledge, only the real shapes, memory and compute. The tokenizer is
`klein.tiny.build_tiny_tokenizer()` (a ~600-token byte-level BPE: Qwen's real vocabulary cannot be made
offline), while the text encoder's embedding keeps Qwen3's real 151936 rows, so memory is real. Components
are saved as diffusers saves them (`save_pretrained(..., max_shard_size=...)`: sharded safetensors with an
index), so the folder passes `klein.model.check_klein_folder` and loads with `klein.model.load_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from klein.model import KleinVariant, check_klein_folder  # noqa: E402
from klein.tiny import KLEIN_SCHEDULER, TINY_VAE, build_tiny_tokenizer  # noqa: E402

QWEN3_VOCAB = 151936
# Qwen3's published config.json values (Qwen/Qwen3-8B, Qwen/Qwen3-4B)
QWEN3_COMMON = dict(vocab_size=QWEN3_VOCAB, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, hidden_act="silu", max_position_embeddings=40960, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, attention_bias=False, attention_dropout=0.0, initializer_range=0.02)
TRANSFORMER_COMMON = dict(patch_size=1, in_channels=128, timestep_guidance_channels=256, mlp_ratio=3.0,
                          axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)

SIZES = {
    "9b": dict(
        transformer=dict(TRANSFORMER_COMMON, num_layers=8, num_single_layers=24, attention_head_dim=128,
                         num_attention_heads=32, joint_attention_dim=12288),
        text_encoder=dict(QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
        vae={},  # diffusers' AutoencoderKLFlux2 defaults are FLUX.2's VAE
        expect="klein-9b",
    ),
    "4b": dict(
        transformer=dict(TRANSFORMER_COMMON, num_layers=5, num_single_layers=20, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=7680),
        text_encoder=dict(QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
        vae={},
        expect="klein-4b",
    ),
    # small, for CPU tests: the pipeline stacks encoder hidden states 9, 18 and 27, so 27+ layers;
    # joint_attention_dim = 3 x the encoder's hidden size, as in the real models
    "test": dict(
        transformer=dict(TRANSFORMER_COMMON, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                         axes_dims_rope=(4, 4, 4, 4)),
        text_encoder=dict(QWEN3_COMMON, hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
        vae=TINY_VAE,
        expect="klein-custom",
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def random_init_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """normal(0, std) for every parameter of 2+ dimensions (Linear, Conv, Embedding); 1-D parameters keep
    their constructor values (norm weights 1, biases 0); buffers (BatchNorm statistics) are left as built."""
    for p in module.parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=generator)


def build_modules(size: str, device: torch.device, seed: int = 0):
    """(transformer, text_encoder, vae, tokenizer) at `size`, made directly on `device` in bf16."""
    spec = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    generator = torch.Generator(device=device).manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are born bf16: no fp32 copy of 17 B parameters
    try:
        with torch.device(device):
            t0 = time.perf_counter()
            transformer = Flux2Transformer2DModel(**spec["transformer"]).eval()
            random_init_(transformer, generator)
            log(f"transformer {_count(transformer) / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            text_config = Qwen3Config(**spec["text_encoder"], pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
            text_encoder = Qwen3ForCausalLM(text_config).eval()
            random_init_(text_encoder, generator)
            log(f"text encoder {_count(text_encoder) / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            vae = AutoencoderKLFlux2(**spec["vae"]).eval()
            random_init_(vae, generator)
            log(f"VAE {_count(vae) / 1e6:.1f} M parameters in {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_default_dtype(previous)
    for name, m in (("transformer", transformer), ("text encoder", text_encoder), ("VAE", vae)):
        odd = sorted({str(p.dtype) for p in m.parameters()} - {"torch.bfloat16"})
        if odd:  # a constructor that pins a dtype would silently double the memory it was asked to model
            raise RuntimeError(f"the {name} has {', '.join(odd)} parameters; expected bfloat16 only")
    return transformer, text_encoder, vae, tokenizer


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_klein_folder(out: str | Path, size: str, device: str | torch.device = "cpu", max_shard_size: str = "5GB",
                      seed: int = 0, overwrite: bool = False) -> dict:
    """Write the folder (atomically: built next to `out`, then renamed) and return what was written."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
        shutil.rmtree(out)
    device = torch.device(device)
    started = time.perf_counter()
    transformer, text_encoder, vae, tokenizer = build_modules(size, device, seed)
    variant = KleinVariant.from_config(transformer.config)
    if variant.name != SIZES[size]["expect"]:
        raise RuntimeError(f"--size {size} built a {variant.name} transformer; expected {SIZES[size]['expect']}")
    built_s = time.perf_counter() - started
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=False)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    saved_s = time.perf_counter() - t0
    info = {
        "size": size, "variant": variant.name, "seed": seed, "device": str(device), "dtype": "bfloat16",
        "max_shard_size": max_shard_size, "init": "normal(0, 0.02) for every 2+-D parameter",
        "parameters": {"transformer": _count(transformer), "text_encoder": _count(text_encoder), "vae": _count(vae)},
        "tokenizer": f"klein.tiny.build_tiny_tokenizer ({len(tokenizer)} tokens; the embedding keeps "
                     f"{text_encoder.config.vocab_size} rows)",
        "note": "random weights at the real shapes: for timing and memory only",
        "build_s": round(built_s, 2), "save_s": round(saved_s, 2),
    }
    (tmp / "klein_random.json").write_text(json.dumps(info, indent=1) + "\n")
    check_klein_folder(tmp)
    tmp.rename(out)
    info["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info["total_s"] = round(time.perf_counter() - started, 2)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (must not exist unless --overwrite)")
    parser.add_argument("--size", required=True, choices=list(SIZES), help="9b (Qwen3-8B), 4b (Qwen3-4B) or test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the weights are made (default: cuda if available)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        info = make_klein_folder(args.out, args.size, args.device, args.max_shard_size, args.seed, args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.out}: {info['variant']}, {info['bytes'] / 2**30:.2f} GiB in {info['total_s']:.1f} s "
        f"(build {info['build_s']:.1f} s, save {info['save_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

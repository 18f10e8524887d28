"""The mini preset: FLUX.2 Klein's own classes at small sizes, pretrained on a procedural world and shipped.

`tiny` has a random transformer: it exercises the machinery but draws noise. `mini` draws. Its weights were
trained by `scripts/pretrain_mini.py` (VAE first, then the transformer with the same flow-matching objective as
`train/loop.py`) on the pretraining styles of `evaluation.world`, and live in `klein/presets/mini/` as an
ordinary diffusers folder that loads through `Flux2KleinPipeline.from_pretrained`, the path real weights take.
Its world knows every image's content class and style, so an exact judge (`evaluation.judge`) measures what a
LoRA learnt. This is a proxy for the method, not for Klein's own quality.

Sizes (chosen for the 2-core CPU budget: a 128x128, 28-step CFG image in about 2 s):
- transformer: 4 heads x 64 (hidden 256), 2 double- and 4 single-stream blocks, in_channels 128, 8.1 M params;
- VAE: AutoencoderKLFlux2 with 8x downsampling (128 px -> 16x16x32 latents -> 8x8 tokens of 128 channels);
- text encoder: a frozen Qwen3 (hidden 64, 27 layers for the hidden states 9/18/27 the pipeline reads) with a
  byte-level BPE tokenizer trained on the world's captions. Like Klein's, it is never trained.
- prompts are padded to 64 tokens (Klein pads to 512): `klein_preset.json` declares it and every encoder call
  reads it through `klein.model.max_sequence_length`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from klein.tiny import KLEIN_SCHEDULER, build_tiny_tokenizer

# Bump when the architecture or the shipped weights change: model ids and caches are keyed by it.
MINI_PRESET_VERSION = "2"  # 2: run 6 of scripts/pretrain_mini.py (reads past trigger prefixes)
MINI_PRESET_DIR = Path(__file__).parent / "presets" / "mini"
MINI_RESOLUTION = 128
MINI_MAX_SEQUENCE_LENGTH = 64

MINI_TEXT_HIDDEN = 64
MINI_TEXT_LAYERS = 27
MINI_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=3 * MINI_TEXT_HIDDEN,
    timestep_guidance_channels=64,
    mlp_ratio=3.0,
    axes_dims_rope=(16, 16, 16, 16),
    rope_theta=2000,
    guidance_embeds=False,
)
MINI_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 96, 96),
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=16,
    sample_size=MINI_RESOLUTION,
    mid_block_add_attention=False,  # attention in the mid block slows CPU generation
)


def build_mini_pipeline(corpus: list[str], seed: int = 0) -> Flux2KleinPipeline:
    """An untrained mini pipeline (seeded): the starting point of `scripts/pretrain_mini.py`."""
    tokenizer = build_tiny_tokenizer(corpus=corpus, vocab_size=1000)
    tokenizer.model_max_length = MINI_MAX_SEQUENCE_LENGTH
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=MINI_TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=MINI_TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tie_word_embeddings=True,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(**MINI_TRANSFORMER)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(**MINI_VAE)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def save_mini_preset(pipe: Flux2KleinPipeline, out_dir: Path, provenance: dict) -> None:
    """Save in half precision (the repository budget is 25 MB) with the preset's declaration beside it."""
    out_dir = Path(out_dir)
    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    declaration = {
        "preset": "mini",
        "version": MINI_PRESET_VERSION,
        "resolution": MINI_RESOLUTION,
        "max_sequence_length": MINI_MAX_SEQUENCE_LENGTH,
        **provenance,
    }
    (out_dir / "klein_preset.json").write_text(json.dumps(declaration, indent=2, sort_keys=True) + "\n")

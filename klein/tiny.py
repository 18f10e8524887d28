"""The tiny preset: FLUX.2 Klein's own classes at toy sizes, with seeded weights.

It is built once, saved as an ordinary diffusers folder in a cache directory, and then loaded back through
`Flux2KleinPipeline.from_pretrained`, the very path real Klein weights take. Nothing is faked in between:
the transformer has Klein's structure (double- then single-stream blocks, in_channels 128, no guidance
embedding), the text encoder is a Qwen3 with enough layers for the hidden states the pipeline reads
(9, 18, 27), the tokenizer is a byte-level BPE `Qwen2TokenizerFast` trained locally.

The VAE is the one part that gets a short seeded training run at build time: a random VAE is not an
autoencoder, and a style LoRA learnt in latent space would then be invisible in pixels. A few hundred
reconstruction steps on procedural images make decode(encode(x)) ≈ x, so style shows up in the samples.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

log = logging.getLogger("klein.tiny")

# Bump when anything below changes: the cache folder is keyed by it.
TINY_PRESET_VERSION = "5"

TINY_TEXT_HIDDEN = 16
TINY_TEXT_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * TINY_TEXT_HIDDEN,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    guidance_embeds=False,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=False,  # attention in the mid block slows CPU generation and fitting
)
# The same scheduler settings Klein ships with: dynamic (resolution-dependent) shift.
KLEIN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = """a house beside two trees under the sun. a cat sitting on a wall. a boat on the sea near a lighthouse.
mountains behind a lake with a small cabin. a woman in a coat walking a dog in the park. a tower and a bridge
over a river. three fish swimming among rocks. a portrait of a man with a hat. a bicycle leaning on a fence.
a city street with cars and people at night. flowers in a vase on a table. a bird on a branch. an astronaut
riding a horse on the moon. a castle on a hill. a child flying a kite on the beach. user assistant system"""


def default_cache_dir() -> Path:
    return Path(os.environ.get("KLEIN_CACHE", Path.home() / ".cache" / "klein-style"))


def tiny_preset_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The diffusers folder of the tiny preset, built on first use (atomically: built in a temporary
    folder, then renamed, so a concurrent or interrupted build never leaves a half folder)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-klein-v{TINY_PRESET_VERSION}"
    if (target / "model_index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # One builder at a time: pytest-xdist workers, Ray workers and CLI subprocesses may all ask for it at once on a
    # fresh machine, and each build costs minutes of CPU. The others wait here, then find the folder built. The
    # lock is released when its file closes, also when the builder dies; the rename still keeps a half folder out.
    with open(root / f".tiny-klein-v{TINY_PRESET_VERSION}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model_index.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
        try:
            build_tiny_preset(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "model_index.json").exists():  # a builder without the lock won: theirs is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_preset(out_dir: Path, seed: int = 0) -> None:

    log.info("building the tiny Klein preset in %s", out_dir)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=TINY_TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tie_word_embeddings=True,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(**TINY_VAE)
    _fit_tiny_vae(vae, seed=seed + 3)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "klein_preset.json").write_text(json.dumps({"preset": "tiny", "version": TINY_PRESET_VERSION, "seed": seed}))


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 600):
    """A byte-level BPE `Qwen2TokenizerFast` trained on `corpus` (the tiny preset's own by default)."""

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus if corpus is not None else _CORPUS.split("\n"), trainer=trainer)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.model_max_length = 512
    return tok


def _procedural_batch(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """Random flat shapes, stripes and gradients in random palettes: what style boards are made of."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        base = rng.uniform(-1, 1, 3)[:, None, None] * np.ones((3, size, size))
        grad = rng.uniform(-0.6, 0.6, (3, 1, 1)) * (yy if rng.random() < 0.5 else xx)
        img = base + grad
        for _ in range(rng.integers(1, 5)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.4)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            img[:, mask] = rng.uniform(-1, 1, (3, 1))
        if rng.random() < 0.4:
            period = rng.integers(3, 12)
            stripes = (np.floor((xx if rng.random() < 0.5 else yy) * size / period) % 2).astype(np.float32)
            img += 0.3 * (stripes - 0.5)[None]
        imgs[i] = np.clip(img, -1, 1)
    return torch.from_numpy(imgs)


@torch.enable_grad()  # the preset may first be built inside a caller's no_grad (train.cache.build_cache)
def _fit_tiny_vae(vae, seed: int, steps: int = 300, size: int = 32, batch: int = 16) -> None:
    """Seeded reconstruction training so the tiny VAE is an actual autoencoder (see module docstring)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    vae.train()
    for _ in range(steps):
        x = _procedural_batch(rng, batch, size)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean  # the pipeline encodes with the mode; train the path it uses
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    # Latent statistics for the pipeline's batch-norm normalisation (patchified, 4 × latent_channels).
    vae.eval()
    with torch.no_grad():
        z = vae.encode(_procedural_batch(rng, 32, size)).latent_dist.mode()
        b, c, h, w = z.shape
        patched = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        vae.bn.running_mean.copy_(patched.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(patched.var(dim=(0, 2, 3)))
    log.info("tiny VAE reconstruction mse %.4f", loss.item())

"""Latents and prompt embeddings, computed once per dataset and stored under the storage URI.

Training workers read this cache and never load the VAE or the text encoder. The cache key hashes
everything the tensors depend on (pixels, captions, model, resolution), so a re-run with the same inputs
reuses it and any change makes a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save

from cluster.storage import Storage
from contracts import cache_prefix
from klein.model import load_pipeline, model_id
from train.dataset import RefSet, bucket_size, prepare_image

CACHE_VERSION = 1


@dataclass
class CachedItem:
    name: str
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    latents: torch.Tensor  # [128, h/16, w/16], patchified and batch-norm normalised as the pipeline does
    embeds: torch.Tensor  # [seq, joint_attention_dim]


@dataclass
class TrainingData:
    key: str
    items: list[CachedItem]
    empty_embeds: torch.Tensor  # the embedding of "" used when caption dropout fires
    model: str
    resolution: int


def cache_key(ref_set: RefSet, captions: list[str], model_id: str, resolution: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "model": model_id, "resolution": resolution}).encode())
    for ref, caption in zip(ref_set.refs, captions):
        h.update(ref.sha256.encode())
        h.update(caption.encode())
    return h.hexdigest()[:24]


def image_to_tensor(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def build_cache(
    ref_set: RefSet,
    captions: list[str],
    model_source: str,
    storage_uri: str,
    resolution: int,
    device: str = "cpu",
) -> str:
    """Encode every ref and caption (plus the empty prompt) and store them; returns the cache key.

    Skips all work when the cache for these inputs already exists.
    """
    storage = Storage.from_uri(storage_uri)
    key = cache_key(ref_set, captions, model_id(model_source), resolution)
    prefix = cache_prefix(key)
    if storage.exists(f"{prefix}/index.json"):
        return key
    pipe = load_pipeline(model_source, device=device, components=("vae", "text_encoder", "tokenizer", "scheduler"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    latents, index = {}, []
    for i, ref in enumerate(ref_set.refs):
        bucket = bucket_size(ref.width, ref.height, resolution)
        pixels = image_to_tensor(prepare_image(ref.image, bucket)).to(device=device, dtype=pipe.vae.dtype)
        latents[f"latent_{i}"] = pipe._encode_vae_image(pixels, generator)[0].float().cpu()
        index.append({"name": ref.name, "caption": captions[i], "bucket": list(bucket)})
    unique_captions = sorted(set(captions) | {""})
    embeds = {}
    for j in range(0, len(unique_captions), 8):
        chunk = unique_captions[j : j + 8]
        prompt_embeds, _ = pipe.encode_prompt(chunk, device=device, max_sequence_length=pipe.klein_max_sequence_length)
        for caption, emb in zip(chunk, prompt_embeds):
            embeds[caption] = emb.float().cpu()
    embed_tensors = {f"embed_{k}": embeds[c] for k, c in enumerate(unique_captions)}
    for item in index:
        item["embed"] = f"embed_{unique_captions.index(item['caption'])}"
    storage.write_bytes(f"{prefix}/latents.safetensors", st_save(latents))
    storage.write_bytes(f"{prefix}/embeds.safetensors", st_save(embed_tensors))
    # index last: its presence marks a complete cache
    storage.write_json(f"{prefix}/index.json", {
        "version": CACHE_VERSION, "model": model_id(model_source), "resolution": resolution, "items": index,
        "empty_embed": f"embed_{unique_captions.index('')}",
    })
    return key


def load_cache(storage_uri: str, key: str) -> TrainingData:
    storage = Storage.from_uri(storage_uri)
    prefix = cache_prefix(key)
    index = storage.read_json(f"{prefix}/index.json")
    latents = st_load(storage.read_bytes(f"{prefix}/latents.safetensors"))
    embeds = st_load(storage.read_bytes(f"{prefix}/embeds.safetensors"))
    items = [
        CachedItem(name=it["name"], caption=it["caption"], bucket=tuple(it["bucket"]), latents=latents[f"latent_{i}"], embeds=embeds[it["embed"]])
        for i, it in enumerate(index["items"])
    ]
    return TrainingData(key=key, items=items, empty_embeds=embeds[index["empty_embed"]], model=index["model"], resolution=index["resolution"])

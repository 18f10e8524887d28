"""Test helpers (used by tests/test_serve_*.py): synthetic LoRAs that fit a model, stored like trained ones."""

from __future__ import annotations

import torch

from klein.lora import LoraLayer, LoraWeights, lora_to_bytes, transformer_targets


def random_lora(transformer, rank: int = 4, scale: float = 0.05, seed: int = 0, preset: str = "all") -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    layers = {}
    for name in transformer_targets(transformer, preset):
        base = getattr(modules[name], "base_layer", modules[name])
        layers[name] = LoraLayer(
            down=torch.randn(rank, base.in_features, generator=gen) * scale,
            up=torch.randn(base.out_features, rank, generator=gen) * scale,
            alpha=float(rank),
        )
    return LoraWeights(layers=layers, meta={"trigger": "zxy_test"})


def store_lora(storage, tenant: str, lora_id: str, lora: LoraWeights, trigger: str = "zxy_test",
               profile: dict | None = None) -> dict:
    """Write a LoRA folder + manifest exactly where a training job would (manifest last)."""
    prefix = f"tenants/{tenant}/loras/{lora_id}"
    sha = storage.write_bytes(f"{prefix}/lora.safetensors", lora_to_bytes(lora))
    manifest = {"id": lora_id, "tenant": tenant, "trigger": trigger, "files": {"lora.safetensors": sha},
                "style_profile": profile, "decision": {"variant": "test", "reason": "synthetic",
                                                       "text_stage": {"use_gemini": False, "reason": "test"}}}
    storage.write_json(f"{prefix}/manifest.json", manifest)
    return manifest

"""Fusing several LoRAs: an exact weighted linear merge, and K-LoRA (per layer, per step selection).

Linear merge, exact in low-rank space: Σ w_i s_i B_i A_i = [B_1 … B_n] · [w_1 s_1 A_1; …; w_n s_n A_n], so
stacking the factors gives one LoRA of rank Σ r_i (with scale 1) whose ΔW is exactly the weighted sum; no
dense ΔW is ever built.

K-LoRA (Ouyang et al., "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs", CVPR 2025):
for each layer, S_i = sum of the k largest |ΔW_i| entries with k = the product of the LoRAs' ranks. At each
denoising step the layer uses ONE LoRA: the first ("content") LoRA scores S_0 / γ, every other ("style")
LoRA scores S_i · scale(p) with scale(p) = α·p + β (p = step / steps, growing through denoising, so style
takes over the later, detail-forming steps). The highest score wins (ties go to the content LoRA). We
apply the choice as a per-step, per-layer adapter-weight schedule (`KLoraSchedule`), so the LoRAs stay
low-rank adapters in the transformer. The top-k sums need each layer's ΔW once: one layer's ΔW at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from klein.lora import LoraLayer, LoraWeights

log = logging.getLogger("klein.serve.fusion")

FUSION_METHODS = ("linear", "klora")
KLORA_MAX_LORAS = 3


class FusionError(ValueError):
    """The LoRAs cannot be fused as asked; the message says why."""


# -- linear merge ------------------------------------------------------------------------------------------
def linear_merge(loras: list[LoraWeights], weights: list[float]) -> LoraWeights:
    """One LoRA whose ΔW equals Σ w_i ΔW_i exactly (rank Σ r_i over the LoRAs that have the layer)."""
    if len(loras) != len(weights) or not loras:
        raise FusionError("linear merge needs one weight per LoRA and at least one LoRA")
    names = sorted(set().union(*(l.layers for l in loras)))
    merged: dict[str, LoraLayer] = {}
    for name in names:
        downs, ups = [], []
        for lora, weight in zip(loras, weights):
            layer = lora.layers.get(name)
            if layer is None:
                continue
            # the weight and the layer's alpha/r scale ride on the down factor; the stacked layer has scale 1
            downs.append(layer.down.float() * (float(weight) * layer.scale))
            ups.append(layer.up.float())
        down = torch.cat(downs, dim=0)
        merged[name] = LoraLayer(down=down, up=torch.cat(ups, dim=1), alpha=float(down.shape[0]))
    return LoraWeights(layers=merged, meta={"fusion": "linear", "weights": [float(w) for w in weights]})


# -- K-LoRA ------------------------------------------------------------------------------------------------
def topk_abs_sum(layer: LoraLayer, k: int) -> float:
    """Sum of the k largest |ΔW| entries of one layer (ΔW built for this layer only, then dropped)."""
    delta = layer.delta()
    k = min(int(k), delta.numel())
    value = float(torch.topk(delta.abs().flatten(), k).values.sum())
    del delta
    return value


def klora_k(loras: list[LoraWeights], name: str) -> int:
    """k = product of the ranks (the paper's K = r_c · r_s) of the LoRAs that have this layer."""
    return math.prod(l.layers[name].rank for l in loras if name in l.layers)


def klora_layer_scores(loras: list[LoraWeights]) -> dict[str, list[float]]:
    """Per layer, each LoRA's top-k |ΔW| sum (0.0 where a LoRA lacks the layer, so it is never chosen there)."""
    if not 2 <= len(loras) <= KLORA_MAX_LORAS:
        raise FusionError(f"K-LoRA fuses 2 to {KLORA_MAX_LORAS} LoRAs, got {len(loras)}")
    names = sorted(set().union(*(l.layers for l in loras)))
    scores = {}
    for name in names:
        k = klora_k(loras, name)
        scores[name] = [topk_abs_sum(l.layers[name], k) if name in l.layers else 0.0 for l in loras]
    return scores


def klora_time_scale(progress: float, alpha: float = 1.5, beta: float = 0.5) -> float:
    """The paper's time-dependent factor on the style scores: α·p + β, p in [0, 1)."""
    return alpha * progress + beta


def klora_choose(layer_scores: list[float], progress: float, alpha: float = 1.5, beta: float = 0.5,
                 gamma: float = 1.0) -> int:
    """Index of the LoRA this layer uses at `progress` (0 = content LoRA; ties go to it)."""
    scale = klora_time_scale(progress, alpha, beta)
    weighted = [layer_scores[0] / gamma] + [s * scale for s in layer_scores[1:]]
    best = 0
    for i, value in enumerate(weighted[1:], start=1):
        if value > weighted[best]:
            best = i
    return best


@dataclass
class KLoraSchedule:
    """choices[step][layer] = index of the LoRA that layer uses at that denoising step."""

    layers: list[str]
    choices: list[list[int]]

    @classmethod
    def build(cls, scores: dict[str, list[float]], steps: int, alpha: float = 1.5, beta: float = 0.5,
              gamma: float = 1.0) -> "KLoraSchedule":
        layers = sorted(scores)
        choices = [[klora_choose(scores[name], step / steps, alpha, beta, gamma) for name in layers]
                   for step in range(steps)]
        return cls(layers=layers, choices=choices)

    def weights_at(self, step: int, user_weights: list[float]) -> dict[str, list[float]]:
        """Per layer, the adapter weights at `step`: the chosen LoRA at its user weight, the others at 0."""
        row = self.choices[min(step, len(self.choices) - 1)]
        out = {}
        for name, chosen in zip(self.layers, row):
            out[name] = [w if i == chosen else 0.0 for i, w in enumerate(user_weights)]
        return out

    def usage(self) -> list[float]:
        """Share of (layer, step) slots each LoRA got: a quick summary for responses and logs."""
        counts: dict[int, int] = {}
        total = 0
        for row in self.choices:
            for c in row:
                counts[c] = counts.get(c, 0) + 1
                total += 1
        n = max(counts) + 1 if counts else 0
        return [counts.get(i, 0) / total for i in range(n)] if total else []


# -- cache keys ---------------------------------------------------------------------------------------------
def fusion_cache_key(shas: list[str], weights: list[float], method: str) -> str:
    """Stable key of (LoRA contents, weights, method); content hashes rather than ids, so edits never alias."""
    text = method + "|" + "|".join(f"{sha}:{float(w)!r}" for sha, w in zip(shas, weights))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class LruCache:
    def __init__(self, size: int):
        self.size = max(1, size)
        self._items: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


# -- the service part (no Ray here; serve/deployments.py wraps it) -----------------------------------------
FUSED_PREFIX = "cache/fused"


class FusionService:
    """Fuses LoRAs stored with their sha256; results cached by (contents, weights, method).

    Linear: the merged LoRA is written to storage (`cache/fused/<key>.safetensors`), so any generator
    replica can load it like a trained LoRA (sha256-checked). K-LoRA: the per-layer top-k sums
    (weights do not change them, so they are cached by contents only).
    """

    def __init__(self, storage, cache_size: int = 32):
        self.storage = storage
        self.cache = LruCache(cache_size)

    def _read(self, specs: list[dict]) -> list[LoraWeights]:
        from klein.lora import read_lora

        return [read_lora(self.storage.read_verified(s["key"], s["sha256"]), name=s.get("id")) for s in specs]

    def linear(self, specs: list[dict]) -> dict:
        from cluster.storage import sha256_bytes
        from klein.lora import lora_to_bytes

        weights = [float(s["weight"]) for s in specs]
        key = fusion_cache_key([s["sha256"] for s in specs], weights, "linear")
        cached = self.cache.get(("linear", key))
        if cached is not None:
            return {**cached, "cached": True}
        merged = linear_merge(self._read(specs), weights)
        data = lora_to_bytes(merged)
        storage_key = f"{FUSED_PREFIX}/{key}.safetensors"
        self.storage.write_bytes(storage_key, data)
        result = {"key": storage_key, "sha256": sha256_bytes(data), "rank": merged.rank}
        self.cache.put(("linear", key), result)
        return {**result, "cached": False}

    def klora_scores(self, specs: list[dict]) -> dict:
        key = fusion_cache_key([s["sha256"] for s in specs], [1.0] * len(specs), "klora")
        cached = self.cache.get(("klora", key))
        if cached is not None:
            return {"scores": cached, "cached": True}
        scores = klora_layer_scores(self._read(specs))
        self.cache.put(("klora", key), scores)
        return {"scores": scores, "cached": False}


# -- the Serve deployment ----------------------------------------------------------------------------------
from ray import serve  # noqa: E402  (the pure functions above import without Serve)


@serve.deployment(name="Fusion")
class Fusion:
    def __init__(self, config: dict):
        from cluster.storage import Storage
        from serve.config import ServeConfig

        cfg = ServeConfig.from_any(config)
        self.service = FusionService(Storage.from_uri(cfg.storage), cfg.fusion_cache_size)

    async def linear(self, specs: list[dict]) -> dict:
        import asyncio

        return await asyncio.to_thread(self.service.linear, specs)

    async def klora_scores(self, specs: list[dict]) -> dict:
        import asyncio

        return await asyncio.to_thread(self.service.klora_scores, specs)

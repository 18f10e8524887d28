"""The Fusion deployment: fuses stored LoRAs for a request and caches the result.

The math lives in `klein/fusion.py` (linear merge, K-LoRA scores and schedule); this module reads the
LoRAs from storage (sha256-checked, validated by `klein.lora.read_lora`), caches results by content, and
decides where K-LoRA scores are computed:

Where the scores are computed (`klora_scores_on`, `scores_place`): a Fusion replica that holds no GPU
while the generator runs on CUDA hands them to the generator (`{"scores": None}`: the generator computes
them on its GPU from the resident adapters and caches them per adapter set), since at 9B they take tens of
seconds on a CPU. A Fusion replica with a GPU of its own, or a CPU-only service, computes them here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import ray
import torch
from diffusers import Flux2Transformer2DModel
from ray import serve

from cluster.storage import Storage, sha256_bytes
from klein.fusion import (  # noqa: F401  (re-exported: the fusion math's old home)
    FUSION_METHODS, KLORA_BLOCK, KLORA_CHUNK_BYTES, KLORA_FAN, KLORA_MAX_LORAS, FusionError, KLoraSchedule,
    fusion_cache_key, klora_choose, klora_device, klora_k, klora_layer_scores, klora_time_scale, linear_merge,
    topk_abs_sum, topk_abs_sums)
from klein.lora import LoraError, LoraWeights, check_lora_fits, lora_to_bytes, read_lora
from klein.model import model_id, resolve_model_source
from serve.config import KLORA_SCORES_ON, ServeConfig
from train.captions import TriggerError, check_trigger

log = logging.getLogger("klein.serve.fusion")

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

    def __init__(self, storage, cache_size: int = 32, device=None, scores_on: str = "fusion"):
        if scores_on not in ("fusion", "generator"):
            raise FusionError(f"scores_on must be fusion or generator, got {scores_on!r}")
        self.storage = storage
        self.cache = LruCache(cache_size)
        self.device = device  # K-LoRA scores: None = the GPU if this process has one
        self.scores_on = scores_on  # "generator": K-LoRA scores are left to the generator (see `scores_place`)

    def _read(self, specs: list[dict]) -> list[LoraWeights]:
        return [read_lora(self.storage.read_verified(s["key"], s["sha256"]), name=s.get("id")) for s in specs]

    def linear(self, specs: list[dict]) -> dict:
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
        """{"scores", "cached", "scores_on"}; scores None means: the generator computes them (on its GPU)."""
        if not 2 <= len(specs) <= KLORA_MAX_LORAS:
            raise FusionError(f"K-LoRA fuses 2 to {KLORA_MAX_LORAS} LoRAs, got {len(specs)}")
        if self.scores_on == "generator":
            return {"scores": None, "cached": False, "scores_on": "generator"}
        key = fusion_cache_key([s["sha256"] for s in specs], [1.0] * len(specs), "klora")
        cached = self.cache.get(("klora", key))
        if cached is not None:
            return {"scores": cached, "cached": True, "scores_on": "fusion"}
        scores = klora_layer_scores(self._read(specs), self.device)
        self.cache.put(("klora", key), scores)
        return {"scores": scores, "cached": False, "scores_on": "fusion"}


def scores_place(klora_scores_on: str, holds_gpu: bool, generator_device: str) -> str:
    """Where a Fusion replica leaves K-LoRA scores: "fusion" (computed in the replica) or "generator".

    "auto": in the replica if it holds a GPU, or if the generator has none either (CPU-only setups, tests);
    otherwise by the generator, on its GPU. A replica without a GPU of its own never computes on a GPU it
    merely sees (Ray leaves every GPU of the node visible to actors that reserved none).
    """
    if klora_scores_on not in KLORA_SCORES_ON:
        raise FusionError(f"klora_scores_on must be one of {', '.join(KLORA_SCORES_ON)}, got {klora_scores_on!r}")
    if klora_scores_on != "auto":
        return klora_scores_on
    if holds_gpu or not str(generator_device).startswith("cuda"):
        return "fusion"
    return "generator"


# -- bring-your-own LoRA: the upload's checks, where torch is (the Ingress replica holds none) ------------------
_SKELETONS: dict[str, torch.nn.Module] = {}


def model_skeleton(model: str) -> torch.nn.Module:
    """The served transformer's modules on the `meta` device (shapes only, no memory), to check uploads."""
    if model not in _SKELETONS:
        folder = resolve_model_source(model)
        config = Flux2Transformer2DModel.load_config(str(folder / "transformer"))
        with torch.device("meta"):
            _SKELETONS[model] = Flux2Transformer2DModel.from_config(config)
    return _SKELETONS[model]


def prepare_import(data: bytes, trigger: str | None, model: str) -> dict:
    """An uploaded LoRA file (`POST /v1/loras/import`) read, validated and re-written in our format for `model`.

    `trigger`: the tenant's, already checked; None takes the file's own (checked here). Returns {"lora": bytes in our
    format, "trigger", "base_model", "source_format", "rank", "layers"}, or {"error": what is wrong, "field": "lora" or
    "trigger"} for a file the tenant must fix: an answer, not an exception, so the Ingress needs none of our LoRA
    classes to tell a bad file from a failed replica."""
    try:
        lora = read_lora(data, name="the uploaded LoRA")  # safetensors only; validated
        check_lora_fits(lora, model_skeleton(model))
    except LoraError as e:
        return {"error": str(e), "field": "lora"}
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as e:
        return {"error": f"the uploaded LoRA has tensors of unexpected shapes or types ({type(e).__name__})", "field": "lora"}
    if trigger is None and lora.meta.get("trigger"):
        try:
            trigger = check_trigger(str(lora.meta["trigger"]))
        except TriggerError as e:  # its message is written for users
            return {"error": str(e), "field": "trigger"}
    meta = {"trigger": trigger, "base_model": model_id(model), "imported": True, "source_format": lora.meta.get("source_format")}
    clean = LoraWeights(layers=lora.layers, meta={k: v for k, v in meta.items() if v is not None})
    return {"lora": lora_to_bytes(clean), "trigger": trigger, "base_model": meta["base_model"],
            "source_format": meta["source_format"], "rank": clean.rank, "layers": len(clean.layers)}


def _holds_gpu() -> bool:
    """Whether this process (a Serve replica) was given a GPU by Ray."""
    return ray.is_initialized() and bool(ray.get_gpu_ids())


# -- the Serve deployment ----------------------------------------------------------------------------------
@serve.deployment(name="Fusion")
class Fusion:
    def __init__(self, config: dict):
        cfg = ServeConfig.from_any(config)
        holds_gpu = _holds_gpu()
        place = scores_place(cfg.klora_scores_on, holds_gpu, cfg.device)
        # without a GPU of its own the replica computes on the CPU, not on a GPU of the node it did not reserve
        self.service = FusionService(Storage.from_uri(cfg.storage), cfg.fusion_cache_size,
                                     device=None if holds_gpu else "cpu", scores_on=place)
        self.model = cfg.model
        log.info("K-LoRA scores: computed by the %s (this replica %s a GPU, the generator runs on %s)",
                 place, "holds" if holds_gpu else "holds no", cfg.device)

    async def linear(self, specs: list[dict]) -> dict:
        return await asyncio.to_thread(self.service.linear, specs)

    async def klora_scores(self, specs: list[dict]) -> dict:
        return await asyncio.to_thread(self.service.klora_scores, specs)

    async def prepare_import(self, data: bytes, trigger: str | None) -> dict:
        """`prepare_import` for the served model: the Ingress stores what this returns."""
        return await asyncio.to_thread(prepare_import, data, trigger, self.model)

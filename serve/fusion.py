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
low-rank adapters in the transformer.

The top-k sums need each layer's ΔW once. `klora_layer_scores` builds them batched (all layers of one shape
and rank in one `bmm`, in chunks), on the GPU when there is one, and finds each top-k sum exactly without a
full top-k over ΔW: the k largest |entries| lie in the k blocks (of `KLORA_BLOCK` consecutive entries) with
the largest block maxima, so one min/max pass over ΔW and a top-k over k blocks suffice (bench/fusion.py).

Where the scores are computed (`klora_scores_on`, `scores_place`): a Fusion replica that holds no GPU
while the generator runs on CUDA hands them to the generator (`{"scores": None}`: the generator computes
them on its GPU from the resident adapters and caches them per adapter set), since at 9B they take tens of
seconds on a CPU. A Fusion replica with a GPU of its own, or a CPU-only service, computes them here.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from klein.lora import LoraLayer, LoraWeights
from serve.config import KLORA_SCORES_ON

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


KLORA_BLOCK = 1024  # entries per block: the one pass over ΔW reduces each block to its largest |entry|
KLORA_FAN = 32  # then block maxima are grouped by 32, level by level, so no top-k runs over more than ~32·k values
KLORA_CHUNK_BYTES = 2 << 30  # ΔW built at most this many bytes at a time


def klora_device(device=None) -> torch.device:
    """Where the scores are computed: `device`, else the GPU if this process has one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pad_to(x: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    pad = (-x.shape[1]) % multiple
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def topk_abs_sums(deltas: torch.Tensor, k: int, block: int = KLORA_BLOCK, fan: int = KLORA_FAN) -> torch.Tensor:
    """For each slice of `deltas` [L, ...], the sum of its k largest |entries|, exactly (float64 sums).

    Why it is exact: partition the entries into groups; every entry larger than the k-th largest lies in one
    of the k groups with the largest maxima (otherwise k groups with larger maxima would hold k larger
    entries), and those k groups hold at least k entries as large as the k-th largest. So: one pass reduces
    blocks of `block` entries to their maxima; maxima are grouped `fan` at a time into a pyramid; from its top
    the k best groups are followed down, keeping k of k·fan candidates per level; inside the k chosen blocks
    the same is done with sub-blocks of `fan` entries. Every top-k is over at most ~fan·k values, however
    large ΔW is (a top-k over 150 M values runs on one GPU block per slice and is slow).
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    k = min(int(k), n)
    if n <= 4 * fan * k or block % fan:
        return flat.abs().topk(k, dim=1).values.sum(dim=1, dtype=torch.float64)
    blocks = _pad_to(flat, block, 0.0).view(flat.shape[0], -1, block)  # zeros never beat a real |entry|
    lo, hi = torch.aminmax(blocks, dim=2)
    levels = [torch.maximum(hi, lo.neg())]  # level 0: each block's largest |entry|; padding below is -1
    while levels[-1].shape[1] > fan * k:
        levels.append(_pad_to(levels[-1], fan, -1.0).view(flat.shape[0], -1, fan).amax(dim=2))
    idx = levels[-1].topk(min(k, levels[-1].shape[1]), dim=1).indices
    arange = torch.arange(fan, device=flat.device)
    for level in reversed(levels[:-1]):  # follow the chosen groups down to blocks
        children = (idx.unsqueeze(-1) * fan + arange).flatten(1)
        values = _pad_to(level, fan, -1.0).gather(1, children)
        idx = children.gather(1, values.topk(min(k, values.shape[1]), dim=1).indices)
    chosen = blocks.gather(1, idx.unsqueeze(-1).expand(-1, -1, block))  # [L, k, block] entries of the k blocks
    subs = chosen.reshape(flat.shape[0], -1, fan)
    lo, hi = torch.aminmax(subs, dim=2)
    best = torch.maximum(hi, lo.neg()).topk(k, dim=1).indices
    entries = subs.gather(1, best.unsqueeze(-1).expand(-1, -1, fan)).abs().flatten(1)
    return entries.topk(k, dim=1).values.sum(dim=1, dtype=torch.float64)


def klora_layer_scores(loras: list[LoraWeights], device=None) -> dict[str, list[float]]:
    """Per layer, each LoRA's top-k |ΔW| sum (0.0 where a LoRA lacks the layer, so it is never chosen there).

    Layers of equal shape and rank are done together, in float32 (TF32 off), on `device` (default: the GPU
    if there is one). Equal to `topk_abs_sum` per layer up to float32 summation order.
    """
    if not 2 <= len(loras) <= KLORA_MAX_LORAS:
        raise FusionError(f"K-LoRA fuses 2 to {KLORA_MAX_LORAS} LoRAs, got {len(loras)}")
    device = klora_device(device)
    names = sorted(set().union(*(l.layers for l in loras)))
    scores = {name: [0.0] * len(loras) for name in names}
    groups: dict[tuple, list] = {}
    for name in names:
        k = klora_k(loras, name)
        for i, lora in enumerate(loras):
            layer = lora.layers.get(name)
            if layer is not None:
                key = (layer.up.shape[0], layer.down.shape[1], layer.rank, k)
                groups.setdefault(key, []).append((name, i, layer))
    results = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the scores compare LoRAs: keep ΔW in full float32
    try:
        with torch.no_grad():
            for (out_f, in_f, _, k), items in groups.items():
                chunk = max(1, KLORA_CHUNK_BYTES // (out_f * in_f * 4))
                for start in range(0, len(items), chunk):
                    part = items[start:start + chunk]
                    up = torch.stack([l.up.to(device, non_blocking=True).float() for _, _, l in part])
                    down = torch.stack([l.down.to(device, non_blocking=True).float() for _, _, l in part])
                    # B·A without the alpha/r scale: Σ top-k |s·x| = s · Σ top-k |x| for s > 0, so the scale is
                    # applied to the sums below (no extra pass over ΔW, no host-to-device copy per chunk)
                    delta = torch.bmm(up, down)
                    results.append((part, topk_abs_sums(delta, k)))
                    del delta
            values = torch.cat([sums for _, sums in results]).tolist() if results else []  # the one host sync
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for (name, i, layer), value in zip([item for part, _ in results for item in part], values):
        scores[name][i] = float(value) * abs(layer.scale)
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

    def __init__(self, storage, cache_size: int = 32, device=None, scores_on: str = "fusion"):
        if scores_on not in ("fusion", "generator"):
            raise FusionError(f"scores_on must be fusion or generator, got {scores_on!r}")
        self.storage = storage
        self.cache = LruCache(cache_size)
        self.device = device  # K-LoRA scores: None = the GPU if this process has one
        self.scores_on = scores_on  # "generator": K-LoRA scores are left to the generator (see `scores_place`)

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


def _holds_gpu() -> bool:
    """Whether this process (a Serve replica) was given a GPU by Ray."""
    import ray

    return ray.is_initialized() and bool(ray.get_gpu_ids())


# -- the Serve deployment ----------------------------------------------------------------------------------
from ray import serve  # noqa: E402  (the pure functions above import without Serve)


@serve.deployment(name="Fusion")
class Fusion:
    def __init__(self, config: dict):
        from cluster.storage import Storage
        from serve.config import ServeConfig

        cfg = ServeConfig.from_any(config)
        holds_gpu = _holds_gpu()
        place = scores_place(cfg.klora_scores_on, holds_gpu, cfg.device)
        # without a GPU of its own the replica computes on the CPU, not on a GPU of the node it did not reserve
        self.service = FusionService(Storage.from_uri(cfg.storage), cfg.fusion_cache_size,
                                     device=None if holds_gpu else "cpu", scores_on=place)
        log.info("K-LoRA scores: computed by the %s (this replica %s a GPU, the generator runs on %s)",
                 place, "holds" if holds_gpu else "holds no", cfg.device)

    async def linear(self, specs: list[dict]) -> dict:
        import asyncio

        return await asyncio.to_thread(self.service.linear, specs)

    async def klora_scores(self, specs: list[dict]) -> dict:
        import asyncio

        return await asyncio.to_thread(self.service.klora_scores, specs)

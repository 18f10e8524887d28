"""Fusion math for several LoRAs (no Ray, no serving): an exact weighted linear merge, and K-LoRA.

Linear merge, exact in low-rank space: Σ w_i s_i B_i A_i = [B_1 … B_n] · [w_1 s_1 A_1; …; w_n s_n A_n], so
stacking the factors gives one LoRA of rank Σ r_i (with scale 1) whose ΔW is exactly the weighted sum; no
dense ΔW is ever built.

K-LoRA (Ouyang et al., "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs", CVPR 2025):
for each layer, S_i = sum of the k largest |ΔW_i| entries with k = the product of the LoRAs' ranks. At each
denoising step the layer uses ONE LoRA: the first ("content") LoRA scores S_0 / γ, every other ("style")
LoRA scores S_i · scale(p) with scale(p) = α·p + β (p = step / steps, growing through denoising, so style
takes over the later, detail-forming steps). The highest score wins (ties go to the content LoRA). The
choice is applied as a per-step, per-layer adapter-weight schedule (`KLoraSchedule`).

One scoring path: `klora_layer_scores` is what the Fusion replica and the generator both call (the
generator on the factors resident on its GPU). It builds each layer's ΔW once, batched (all layers of one
shape and rank in one `bmm`, in chunks), and finds each top-k sum exactly without a full top-k over ΔW
(`topk_abs_sums`: the k largest |entries| lie in the k blocks with the largest block maxima).
`topk_abs_sum` (one layer, dense) is the plain reference it is tested against.

No input makes this endless or unbounded: every layer is checked first (rank >= 1, A and B of equal inner
dimension, finite scale), k is at least 1 and capped at ΔW's size and at `KLORA_MAX_K`, the pyramid of
block maxima has at most log_fan(n) + 1 levels, and one call builds at most `KLORA_MAX_ENTRIES` ΔW
entries in all; past those bounds the answer is a `FusionError` naming the layer or the size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from klein.lora import LoraLayer, LoraWeights

FUSION_METHODS = ("linear", "klora")
KLORA_MAX_LORAS = 3
KLORA_DEFAULTS = (1.5, 0.5, 1.0)  # the paper's α, β and γ
KLORA_MAX_K = 1 << 22  # k = the product of the ranks; past this the top-k is no longer a small selection
KLORA_MAX_ENTRIES = 1 << 36  # ΔW entries one scoring call may build in all (a 9B Klein's 3 LoRAs: ~2^35)


class FusionError(ValueError):
    """The LoRAs cannot be fused as asked; the message says why."""


def check_fusable(loras: list[LoraWeights]) -> None:
    """Every layer usable by the fusion math: rank >= 1, A [r, in] and B [out, r] of one r, a finite scale."""
    for index, lora in enumerate(loras):
        for name, layer in lora.layers.items():
            if layer.down.dim() != 2 or layer.up.dim() != 2:
                raise FusionError(f"LoRA {index}, layer {name}: A and B must be matrices, got {tuple(layer.down.shape)} "
                                  f"and {tuple(layer.up.shape)}")
            if layer.down.shape[0] < 1 or layer.up.shape[1] != layer.down.shape[0]:
                raise FusionError(f"LoRA {index}, layer {name}: rank must be >= 1 and A's rows equal B's columns, got "
                                  f"A {tuple(layer.down.shape)}, B {tuple(layer.up.shape)}")
            if not math.isfinite(layer.scale):
                raise FusionError(f"LoRA {index}, layer {name}: alpha/rank is not finite ({layer.alpha!r})")


# -- linear merge ------------------------------------------------------------------------------------------
def linear_merge(loras: list[LoraWeights], weights: list[float]) -> LoraWeights:
    """One LoRA whose ΔW equals Σ w_i ΔW_i exactly (rank Σ r_i over the LoRAs that have the layer)."""
    if len(loras) != len(weights) or not loras:
        raise FusionError("linear merge needs one weight per LoRA and at least one LoRA")
    if not all(math.isfinite(float(w)) for w in weights):
        raise FusionError(f"linear merge weights must be finite, got {weights}")
    check_fusable(loras)
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
    """Sum of the k largest |ΔW| entries of one layer (dense: the reference `topk_abs_sums` is tested against)."""
    check_fusable([LoraWeights(layers={"layer": layer})])
    if int(k) < 1:
        raise FusionError(f"top-k needs k >= 1, got {k}")
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
    if int(k) < 1:
        raise FusionError(f"top-k needs k >= 1, got {k}")  # k = 0 would never shrink the pyramid below
    if fan < 2 or block < fan:
        raise FusionError(f"top-k needs fan >= 2 and block >= fan, got block {block}, fan {fan}")
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    if n == 0:
        return torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
    k = min(int(k), n)
    if n <= 4 * fan * k or block % fan:
        return flat.abs().topk(k, dim=1).values.sum(dim=1, dtype=torch.float64)
    blocks = _pad_to(flat, block, 0.0).view(flat.shape[0], -1, block)  # zeros never beat a real |entry|
    lo, hi = torch.aminmax(blocks, dim=2)
    levels = [torch.maximum(hi, lo.neg())]  # level 0: each block's largest |entry|; padding below is -1
    max_levels = 2 + math.ceil(math.log(max(2, levels[0].shape[1]), fan))
    while levels[-1].shape[1] > fan * k:  # shrinks by `fan` each time: fan >= 2 and k >= 1 end it
        if len(levels) > max_levels:
            raise FusionError(f"top-k pyramid did not converge ({len(levels)} levels for {n} entries)")
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
    check_fusable(loras)
    device = klora_device(device)
    names = sorted(set().union(*(l.layers for l in loras)))
    scores = {name: [0.0] * len(loras) for name in names}
    groups: dict[tuple, list] = {}
    entries = 0
    for name in names:
        k = klora_k(loras, name)
        for i, lora in enumerate(loras):
            layer = lora.layers.get(name)
            if layer is not None:
                key = (layer.up.shape[0], layer.down.shape[1], layer.rank, k)
                groups.setdefault(key, []).append((name, i, layer))
                entries += layer.up.shape[0] * layer.down.shape[1]
        if k > KLORA_MAX_K:
            raise FusionError(f"K-LoRA's k (the product of the ranks) is {k} at layer {name}; at most {KLORA_MAX_K} "
                              "(use fusion=linear for LoRAs of such ranks)")
    if entries > KLORA_MAX_ENTRIES:
        raise FusionError(f"K-LoRA would build {entries} ΔW entries; at most {KLORA_MAX_ENTRIES}")
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


def klora_time_scale(progress: float, alpha: float = KLORA_DEFAULTS[0], beta: float = KLORA_DEFAULTS[1]) -> float:
    """The paper's time-dependent factor on the style scores: α·p + β, p in [0, 1)."""
    return alpha * progress + beta


def klora_choose(layer_scores: list[float], progress: float, alpha: float = KLORA_DEFAULTS[0],
                 beta: float = KLORA_DEFAULTS[1], gamma: float = KLORA_DEFAULTS[2]) -> int:
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
    def build(cls, scores: dict[str, list[float]], steps: int, alpha: float = KLORA_DEFAULTS[0],
              beta: float = KLORA_DEFAULTS[1], gamma: float = KLORA_DEFAULTS[2]) -> "KLoraSchedule":
        if not 1 <= int(steps) <= 10_000:
            raise FusionError(f"a K-LoRA schedule needs 1 to 10000 steps, got {steps}")
        if gamma == 0 or not all(math.isfinite(float(c)) for c in (alpha, beta, gamma)):
            raise FusionError(f"K-LoRA constants must be finite with gamma != 0, got {(alpha, beta, gamma)}")
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


def apply_klora_step(modules: dict, names: list[str], schedule: KLoraSchedule, step: int, user_weights: list[float]) -> None:
    """Set each peft layer's adapter scales for `step`: the chosen LoRA at its weight, the others at 0."""
    for layer, weights in schedule.weights_at(step, user_weights).items():
        module = modules.get(layer)
        if module is None:
            continue
        for name, weight in zip(names, weights):
            module.set_scale(name, weight)

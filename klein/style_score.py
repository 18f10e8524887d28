"""Style score: how close images are to a set of reference images in style. Lower = closer.

    distance = palette_weight * palette distance + gram_weight * Gram distance

- palette distance: sliced Wasserstein-1 distance between the Lab colour distributions of an image and of all
  refs pooled, over fixed projections (the L, a, b axes plus seeded random directions), in Lab units / 100;
- Gram distance: relative Frobenius distance between Gram matrices of multi-scale features (4 depths, receptive
  fields of 3 to ~45 px) of a fixed, seeded random conv net fed the image minus its mean colour (random filters
  capture texture statistics well: Ustyuzhaninov et al. 2017) and the refs' mean Gram matrices, averaged over depths.

Both ignore where things are, so content barely matters: a new subject in the refs' palette and texture scores
close, the same subject in another style scores far. Deterministic (weights from a seeded numpy generator) and
CPU-fast: images are scored at `size` px on the longest side (tens of ms each). `StyleScorer` computes the
refs' features once so a sweep can score many samples against the same refs cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_SIZE = 128
DEFAULT_SEED = 0
NET_CHANNELS = (3, 32, 64, 96, 128)
N_RANDOM_PROJECTIONS = 13
N_QUANTILES = 32
PIXELS_FOR_PALETTE = 4096  # per image, evenly strided: the palette of a 128 px image needs no more


# -- image preparation --------------------------------------------------------------------------------
def _to_rgb_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, H, W) float in [0, 1], longest side = `size`; transparency composited on white."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    new_size = (max(8, round(w * scale)), max(8, round(h * scale)))
    if new_size != (w, h):
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) sRGB in [0, 1] -> (H*W, 3) Lab (D65)."""
    pixels = rgb.reshape(3, -1).T.double()
    linear = torch.where(pixels <= 0.04045, pixels / 12.92, ((pixels + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        dtype=torch.float64,
    )
    xyz = linear @ matrix.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(0) ** (1 / 3), (kappa * xyz + 16) / 116)
    lab = torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)
    return lab.float()


# -- palette ------------------------------------------------------------------------------------------
def _projections(seed: int) -> torch.Tensor:
    """(3, P) unit directions in Lab: the three axes plus seeded random ones."""
    rng = np.random.default_rng(seed)
    random_dirs = rng.normal(size=(N_RANDOM_PROJECTIONS, 3))
    random_dirs /= np.linalg.norm(random_dirs, axis=1, keepdims=True)
    directions = np.concatenate([np.eye(3), random_dirs], axis=0)
    return torch.from_numpy(directions.T.astype(np.float32))


def _palette_quantiles(lab_pixels: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """(P, Q) quantiles of the pixels projected on each direction."""
    if len(lab_pixels) > PIXELS_FOR_PALETTE:
        stride = len(lab_pixels) / PIXELS_FOR_PALETTE
        lab_pixels = lab_pixels[(torch.arange(PIXELS_FOR_PALETTE) * stride).long()]
    projected = lab_pixels @ projections  # (N, P)
    levels = (torch.arange(N_QUANTILES, dtype=torch.float32) + 0.5) / N_QUANTILES
    return torch.quantile(projected, levels, dim=0).T.contiguous()


# -- random conv net ----------------------------------------------------------------------------------
class RandomConvNet:
    """Four 3x3 conv layers with seeded He-normal weights, ReLU, 2x average pooling between layers."""

    def __init__(self, seed: int = DEFAULT_SEED, channels: Sequence[int] = NET_CHANNELS):
        rng = np.random.default_rng(seed)
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            std = np.sqrt(2.0 / (c_in * 9))
            self.weights.append(torch.from_numpy(rng.normal(0, std, size=(c_out, c_in, 3, 3)).astype(np.float32)))
            # small random biases break the symmetry of ReLU on zero-mean inputs
            self.biases.append(torch.from_numpy(rng.normal(0, 0.05, size=(c_out,)).astype(np.float32)))

    @torch.no_grad()
    def features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (C, H, W) of every layer for one image (3, H, W) in [0, 1].

        The image's mean colour is removed first: the palette distance judges colour, and without this the
        Gram matrices would mostly repeat it and barely see texture. Contrast is kept (it is part of a style).
        """
        x = ((rgb - rgb.mean(dim=(1, 2), keepdim=True)) / 0.25).unsqueeze(0)
        maps = []
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if i > 0:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
            x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias))
            maps.append(x[0])
        return maps


def _gram(feature_map: torch.Tensor) -> torch.Tensor:
    c = feature_map.shape[0]
    flat = feature_map.reshape(c, -1)
    return flat @ flat.T / flat.shape[1]


# -- scorer -------------------------------------------------------------------------------------------
@dataclass
class StyleFeatures:
    palette: torch.Tensor  # (P, Q) projected-colour quantiles
    lab_pixels: torch.Tensor  # (N, 3) sampled Lab pixels, kept to pool refs
    grams: list[torch.Tensor]  # one (C, C) Gram matrix per depth


class StyleScorer:
    """Distances of images to fixed refs; the refs' features are computed once, at construction."""

    def __init__(
        self,
        refs: Sequence[Image.Image],
        *,
        size: int = DEFAULT_SIZE,
        seed: int = DEFAULT_SEED,
        palette_weight: float = 1.0,
        gram_weight: float = 1.0,
    ):
        if not refs:
            raise ValueError("StyleScorer needs at least one reference image")
        self.size = size
        self.palette_weight = palette_weight
        self.gram_weight = gram_weight
        self._net = RandomConvNet(seed)
        self._projections = _projections(seed)
        ref_features = [self.features(r) for r in refs]
        pooled = torch.cat([f.lab_pixels for f in ref_features])
        self._ref_palette = _palette_quantiles(pooled, self._projections)
        self._ref_grams = [torch.stack(g).mean(0) for g in zip(*(f.grams for f in ref_features))]
        self._ref_gram_norms = [g.norm() + 1e-8 for g in self._ref_grams]

    def features(self, image: Image.Image) -> StyleFeatures:
        rgb = _to_rgb_tensor(image, self.size)
        lab = _rgb_to_lab(rgb)
        if len(lab) > PIXELS_FOR_PALETTE:
            lab = lab[(torch.arange(PIXELS_FOR_PALETTE) * (len(lab) / PIXELS_FOR_PALETTE)).long()]
        return StyleFeatures(
            palette=_palette_quantiles(lab, self._projections),
            lab_pixels=lab,
            grams=[_gram(m) for m in self._net.features(rgb)],
        )

    def _palette_distance(self, features: StyleFeatures) -> float:
        return float((features.palette - self._ref_palette).abs().mean() / 100.0)

    def _gram_distance(self, features: StyleFeatures) -> float:
        per_depth = [
            (g - ref).norm() / norm for g, ref, norm in zip(features.grams, self._ref_grams, self._ref_gram_norms)
        ]
        return float(torch.stack(per_depth).mean())

    def components(self, images: Sequence[Image.Image]) -> dict[str, float]:
        """Mean palette, Gram and combined distance of `images` to the refs."""
        if not images:
            raise ValueError("score at least one image")
        palette, gram = [], []
        for image in images:
            features = self.features(image)
            palette.append(self._palette_distance(features))
            gram.append(self._gram_distance(features))
        p, g = float(np.mean(palette)), float(np.mean(gram))
        return {"palette": p, "gram": g, "total": self.palette_weight * p + self.gram_weight * g}

    def distances(self, images: Sequence[Image.Image]) -> list[float]:
        """Combined distance of each image to the refs."""
        result = []
        for image in images:
            features = self.features(image)
            result.append(
                self.palette_weight * self._palette_distance(features)
                + self.gram_weight * self._gram_distance(features)
            )
        return result

    def distance(self, images: Sequence[Image.Image]) -> float:
        """Mean combined distance of `images` to the refs."""
        if not images:
            raise ValueError("score at least one image")
        return float(np.mean(self.distances(images)))


# -- functions ----------------------------------------------------------------------------------------
def style_distance(images: list[Image.Image], refs: list[Image.Image]) -> float:
    """Mean style distance of `images` to `refs` (palette + Gram); lower = closer in style."""
    return StyleScorer(refs).distance(images)


def palette_distance(images: list[Image.Image], refs: list[Image.Image]) -> float:
    """Mean sliced-Wasserstein distance between each image's Lab colours and the refs' pooled colours (/100)."""
    return StyleScorer(refs).components(images)["palette"]


def gram_distance(images: list[Image.Image], refs: list[Image.Image]) -> float:
    """Mean relative distance between random-conv-net Gram matrices of each image and the refs' mean."""
    return StyleScorer(refs).components(images)["gram"]

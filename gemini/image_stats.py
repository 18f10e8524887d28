"""Measurements of how a set of images looks: palette, luminance, contrast, saturation, hue spread, texture.

The offline STYLE_PROFILE (gemini/profile.py) turns these numbers into words, and the Gemini L1 prompt
hands Gemini the measured palette so its COLOR entry uses exact colours. Numpy only, deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from gemini.colour import colour_name, kmeans_lab, lab_chroma_hue, lab_to_srgb, rgb_to_hex, srgb_to_lab

ANALYSIS_SIDE = 256  # images are measured at this longest side: enough for statistics, fast on a CPU
PIXELS_PER_IMAGE = 4000  # palette pixels sampled per image, so every ref weighs the same
PALETTE_SIZE = 6
MIN_SHARE = 0.03  # palette entries below this share are noise, not palette


@dataclass
class PaletteEntry:
    hex: str
    name: str
    share: float
    lab: tuple[float, float, float]
    chroma: float


@dataclass
class ImageSetStats:
    """Means over the images, so one dark ref among ten bright ones moves the words only a little."""

    n_images: int
    palette: list[PaletteEntry]
    mean_lightness: float  # Lab L*, 0..100
    contrast: float  # std of L* per image, averaged
    shadow_fraction: float  # share of pixels with L* < 15
    highlight_fraction: float  # share of pixels with L* > 90
    mean_chroma: float  # Lab chroma of the pixels, averaged
    peak_chroma: float  # 90th percentile of chroma: a vivid accent on a muted field still counts
    colourful_fraction: float  # share of pixels with chroma > 20
    hue_spread: float  # 0 = one hue, 1 = hues all round the wheel (chroma-weighted circular variance)
    dominant_hue: float  # degrees, chroma-weighted circular mean
    warm_fraction: float  # share of colourful pixels with warm hues (reds, oranges, yellows)
    light_temperature: float  # mean b* of the brightest quarter of pixels: > 0 warm light, < 0 cool
    edge_density: float  # share of pixels on an edge
    high_frequency: float  # share of spectral energy above a quarter of the Nyquist frequency
    grain: float  # median fine-scale residual in flat areas, in L* units
    centre_sharpness_ratio: float  # gradient energy centre / border: > 1.6 reads as shallow depth of field
    vignette: float  # centre L* minus border L*
    aspect_ratio: float  # width / height, averaged
    per_image: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB in [0, 1] at ANALYSIS_SIDE; transparency composited on white (how a viewer sees it)."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if max(image.size) > ANALYSIS_SIDE:
        image = image.copy()
        image.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def _gradient_magnitude(lightness: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of L* (units of L* per pixel)."""
    p = np.pad(lightness, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]) / 8
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]) / 8
    return np.hypot(gx, gy)


def _box_blur3(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1, mode="edge")
    return sum(p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3)) / 9


def _high_frequency_share(lightness: np.ndarray) -> float:
    """Share of (windowed, mean-removed) spectral energy at radii > 1/4 of Nyquist."""
    h, w = lightness.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    spectrum = np.abs(np.fft.fft2((lightness - lightness.mean()) * window)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.hypot(fy, fx)  # cycles per pixel; Nyquist is 0.5
    total = spectrum[radius > 0.01].sum()
    return float(spectrum[radius > 0.125].sum() / total) if total > 0 else 0.0


def _centre_and_border(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = x.shape
    centre = np.zeros_like(x, dtype=bool)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    return x[centre], x[~centre]


def _measure_one(rgb: np.ndarray) -> dict:
    lab = srgb_to_lab(rgb)
    lightness = lab[..., 0]
    chroma, hue = lab_chroma_hue(lab)
    gradient = _gradient_magnitude(lightness)
    flat = gradient < 2.0
    residual = np.abs(lightness - _box_blur3(lightness))
    centre_grad, border_grad = _centre_and_border(gradient**2)
    centre_l, border_l = _centre_and_border(lightness)
    bright = lightness >= np.percentile(lightness, 75)
    return {
        "lightness": float(lightness.mean()),
        "contrast": float(lightness.std()),
        "shadow_fraction": float((lightness < 15).mean()),
        "highlight_fraction": float((lightness > 90).mean()),
        "chroma": float(chroma.mean()),
        "peak_chroma": float(np.percentile(chroma, 90)),
        "colourful_fraction": float((chroma > 20).mean()),
        "light_temperature": float(lab[..., 2][bright].mean()),
        "edge_density": float((gradient > 6.0).mean()),
        "high_frequency": _high_frequency_share(lightness),
        "grain": float(np.median(residual[flat])) if flat.any() else 0.0,
        "centre_sharpness_ratio": float((centre_grad.mean() + 1e-6) / (border_grad.mean() + 1e-6)),
        "vignette": float(centre_l.mean() - border_l.mean()),
        "aspect_ratio": float(rgb.shape[1] / rgb.shape[0]),
        "_lab": lab.reshape(-1, 3),
        "_chroma": chroma.reshape(-1),
        "_hue": hue.reshape(-1),
    }


def _sample(pixels: np.ndarray, count: int, seed: int) -> np.ndarray:
    if len(pixels) <= count:
        return pixels
    rng = np.random.default_rng(seed)
    return pixels[rng.choice(len(pixels), size=count, replace=False)]


def _merge_same_names(centres: np.ndarray, shares: np.ndarray) -> list[tuple[np.ndarray, float, str]]:
    """Two clusters with one name read as one colour to a person: merge them (share-weighted Lab mean)."""
    merged: dict[str, tuple[np.ndarray, float]] = {}
    for centre, share in zip(centres, shares):
        name = colour_name(centre)
        if name in merged:
            lab, total = merged[name]
            merged[name] = ((lab * total + centre * share) / (total + share), total + share)
        else:
            merged[name] = (centre, float(share))
    return [(lab, share, name) for name, (lab, share) in merged.items()]


def _palette(lab_pixels: np.ndarray) -> list[PaletteEntry]:
    centres, shares = kmeans_lab(lab_pixels, PALETTE_SIZE, seed=0)
    entries = []
    for centre, share, name in sorted(_merge_same_names(centres, shares), key=lambda c: -c[1]):
        if share < MIN_SHARE:
            continue
        chroma, _ = lab_chroma_hue(centre)
        entries.append(
            PaletteEntry(
                hex=rgb_to_hex(lab_to_srgb(centre)),
                name=name,
                share=round(float(share), 4),
                lab=tuple(round(float(v), 2) for v in centre),
                chroma=round(float(chroma), 2),
            )
        )
    total = sum(e.share for e in entries)
    for e in entries:
        e.share = round(e.share / total, 4)
    return entries


def _hue_statistics(chroma: np.ndarray, hue: np.ndarray) -> tuple[float, float, float]:
    """(spread, dominant hue, warm fraction) from the colourful pixels, weighted by chroma."""
    colourful = chroma > 10
    if colourful.sum() < 10:
        return 0.0, 0.0, 0.5
    weights = chroma[colourful]
    angles = np.radians(hue[colourful])
    vector = np.sum(weights * np.exp(1j * angles)) / weights.sum()
    spread = float(1 - abs(vector))
    dominant = float(np.degrees(np.angle(vector)) % 360)
    # Lab hue angles: magenta-red ~350-360/0, orange ~60, yellow ~95; warm = 330..110 degrees.
    h = hue[colourful]
    warm = (h >= 330) | (h <= 110)
    return spread, dominant, float(weights[warm].sum() / weights.sum())


def measure_images(images: Sequence[Image.Image]) -> ImageSetStats:
    """Measure a set of images (1 or more). Deterministic."""
    if not images:
        raise ValueError("measure_images needs at least one image")
    measured = [_measure_one(_to_rgb_array(im)) for im in images]
    lab_pixels = np.concatenate([_sample(m["_lab"], PIXELS_PER_IMAGE, seed=i) for i, m in enumerate(measured)])
    chroma = np.concatenate([_sample(m["_chroma"], PIXELS_PER_IMAGE, seed=i) for i, m in enumerate(measured)])
    hue = np.concatenate([_sample(m["_hue"], PIXELS_PER_IMAGE, seed=i) for i, m in enumerate(measured)])
    spread, dominant, warm = _hue_statistics(chroma, hue)

    def mean(key: str) -> float:
        return float(np.mean([m[key] for m in measured]))

    per_image = [{k: round(v, 4) for k, v in m.items() if not k.startswith("_")} for m in measured]
    return ImageSetStats(
        n_images=len(images),
        palette=_palette(lab_pixels),
        mean_lightness=mean("lightness"),
        contrast=mean("contrast"),
        shadow_fraction=mean("shadow_fraction"),
        highlight_fraction=mean("highlight_fraction"),
        mean_chroma=mean("chroma"),
        peak_chroma=mean("peak_chroma"),
        colourful_fraction=mean("colourful_fraction"),
        hue_spread=spread,
        dominant_hue=dominant,
        warm_fraction=warm,
        light_temperature=mean("light_temperature"),
        edge_density=mean("edge_density"),
        high_frequency=mean("high_frequency"),
        grain=mean("grain"),
        centre_sharpness_ratio=float(np.exp(np.mean([np.log(m["centre_sharpness_ratio"]) for m in measured]))),
        vignette=mean("vignette"),
        aspect_ratio=mean("aspect_ratio"),
        per_image=per_image,
    )

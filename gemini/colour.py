"""Colour science for the offline text stage: sRGB <-> CIE Lab, CIEDE2000, colour names, k-means palettes.

Numpy only and deterministic (seeded), so the offline fallback gives the same profile for the same images.
"""

from __future__ import annotations

import numpy as np

# D65 white point, the reference white of sRGB.
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """`rgb` in [0, 1], shape (..., 3) -> Lab (L in 0..100)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """Lab -> sRGB in [0, 1] (clipped to the gamut)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f**3 > eps, f**3, (116 * f - 16) / kappa) * _WHITE
    linear = xyz @ np.linalg.inv(_RGB_TO_XYZ).T
    linear = np.clip(linear, 0, 1)
    rgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(rgb, 0, 1)


def hex_to_rgb(hex_code: str) -> np.ndarray:
    h = hex_code.lstrip("#")
    return np.array([int(h[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255


def rgb_to_hex(rgb: np.ndarray) -> str:
    r, g, b = (int(round(float(c) * 255)) for c in np.clip(rgb, 0, 1))
    return f"#{r:02x}{g:02x}{b:02x}"


def lab_chroma_hue(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chroma and hue angle (degrees, 0..360) of Lab colours."""
    lab = np.asarray(lab, dtype=np.float64)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360
    return chroma, hue


def ciede2000(lab1: np.ndarray, lab2: np.ndarray, k_l: float = 1.0) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma et al. 2005); broadcasts over leading axes.

    `k_l` > 1 weighs lightness less, for matching colour *words* (a "pink" is a hue more than a lightness).
    """
    lab1 = np.asarray(lab1, dtype=np.float64)
    lab2 = np.asarray(lab2, dtype=np.float64)
    L1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    L2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dLp = L2 - L1
    dCp = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0, dh)
    dHp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    Lp_mean = (L1 + L2) / 2
    Cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    hp_mean = np.where(
        c1p * c2p == 0,
        h_sum,
        np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)),
    )
    t = (
        1
        - 0.17 * np.cos(np.radians(hp_mean - 30))
        + 0.24 * np.cos(np.radians(2 * hp_mean))
        + 0.32 * np.cos(np.radians(3 * hp_mean + 6))
        - 0.20 * np.cos(np.radians(4 * hp_mean - 63))
    )
    d_theta = 30 * np.exp(-(((hp_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(Cp_mean**7 / (Cp_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (Lp_mean - 50) ** 2 / np.sqrt(20 + (Lp_mean - 50) ** 2)
    s_c = 1 + 0.045 * Cp_mean
    s_h = 1 + 0.015 * Cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dLp / (k_l * s_l)) ** 2 + (dCp / s_c) ** 2 + (dHp / s_h) ** 2 + r_t * (dCp / s_c) * (dHp / s_h))


# Names a designer or a prompt would use; nearest by CIEDE2000. Dense in the dark and muted regions,
# where photographs spend most of their pixels.
NAMED_COLOURS: dict[str, str] = {
    # neutrals
    "black": "#0b0b0c",
    "charcoal": "#34363a",
    "dark gray": "#555759",
    "gray": "#808080",
    "slate gray": "#6c7a89",
    "warm gray": "#8c847a",
    "taupe": "#8b7d6b",
    "silver": "#b9bcc0",
    "light gray": "#d6d6d6",
    "off-white": "#efece4",
    "white": "#fafafa",
    "ivory": "#fbf6e4",
    "cream": "#f1e3c2",
    "beige": "#d8c7a6",
    # reds and pinks
    "red": "#d02430",
    "crimson": "#b3122e",
    "scarlet": "#f02c1c",
    "burgundy": "#7a1a2a",
    "maroon": "#561a1c",
    "brick red": "#a23a2c",
    "rust": "#b04a1e",
    "terracotta": "#c76b4a",
    "coral": "#f47e5e",
    "salmon": "#f29a88",
    "pink": "#f4b6c6",
    "hot pink": "#ff5fa2",
    "rose": "#d9607e",
    "dusty rose": "#c08a92",
    "blush": "#f0cfc8",
    "mauve": "#a8869a",
    "magenta": "#cc2a9c",
    "plum": "#6b2d5c",
    # oranges and browns
    "orange": "#f7861c",
    "burnt orange": "#c5541a",
    "amber": "#f7b318",
    "peach": "#f9c7a0",
    "apricot": "#eea46c",
    "copper": "#b5703c",
    "caramel": "#b07a40",
    "ochre": "#c88a2c",
    "mustard": "#d0a62a",
    "tan": "#cfae84",
    "camel": "#be9868",
    "khaki": "#bfb088",
    "sand": "#dccba0",
    "sienna": "#9c5232",
    "brown": "#7a4e30",
    "chocolate": "#4e2e1c",
    "dark brown": "#33231a",
    "umber": "#5e4c3c",
    # yellows and greens
    "yellow": "#f4d81c",
    "lemon": "#f8ee66",
    "pale yellow": "#f4e9a8",
    "gold": "#d2aa3a",
    "olive": "#6f7434",
    "dark olive": "#454624",
    "khaki green": "#8c8a5a",
    "moss green": "#7e8c4e",
    "sage": "#9cac8c",
    "lime": "#9ccc34",
    "green": "#3a9a48",
    "forest green": "#21482c",
    "emerald": "#1c9468",
    "mint": "#aee4c6",
    # cyans and blues
    "teal": "#1e7878",
    "dark teal": "#123e42",
    "turquoise": "#3cc4bc",
    "cyan": "#1cb8d4",
    "sky blue": "#8cc8ea",
    "powder blue": "#b6d2e4",
    "ice blue": "#dce9f2",
    "steel blue": "#4a7aa8",
    "denim": "#3c5a88",
    "blue": "#2c5cd0",
    "cobalt": "#1a48a8",
    "royal blue": "#3e62dc",
    "navy": "#1c2848",
    "midnight blue": "#141a34",
    "slate blue": "#56688a",
    # purples
    "purple": "#7a3a9c",
    "violet": "#8c5cd4",
    "indigo": "#3c2a78",
    "lavender": "#c2b4e0",
    "lilac": "#c8a4cc",
    "aubergine": "#3a1e34",
}

_NAMES = list(NAMED_COLOURS)
_NAMED_LAB = srgb_to_lab(np.stack([hex_to_rgb(NAMED_COLOURS[n]) for n in _NAMES]))


def colour_name(lab: np.ndarray) -> str:
    """The nearest named colour (CIEDE2000) to one Lab colour."""
    distances = ciede2000(np.asarray(lab, dtype=np.float64)[None, :], _NAMED_LAB)
    return _NAMES[int(np.argmin(distances))]


# Spellings and near-synonyms a prompt uses for colours of the table.
COLOUR_ALIASES = {"grey": "gray", "golden": "gold", "colourful": "", "colorful": ""}


def named_colour_lab(name: str) -> np.ndarray | None:
    """Lab of a named colour from the table (also plain words like 'red'); None when unknown."""
    name = COLOUR_ALIASES.get(name.lower(), name.lower())
    if name in NAMED_COLOURS:
        return _NAMED_LAB[_NAMES.index(name)]
    return None


def kmeans_lab(pixels: np.ndarray, k: int, *, seed: int = 0, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """k-means on Lab pixels (N, 3) with k-means++ seeding; returns (centres (k', 3), shares (k',)).

    Empty clusters are dropped, so k' <= k. Deterministic for a given seed.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    n = len(pixels)
    if n == 0:
        raise ValueError("kmeans_lab needs at least one pixel")
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [pixels[rng.integers(n)]]
    closest = np.sum((pixels - centres[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct colours than k
            break
        idx = rng.choice(n, p=closest / total)
        centres.append(pixels[idx])
        closest = np.minimum(closest, np.sum((pixels - pixels[idx]) ** 2, axis=1))
    centres_arr = np.array(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        d = ((pixels[:, None, :] - centres_arr[None, :, :]) ** 2).sum(-1)
        labels = d.argmin(1)
        moved = np.array(
            [pixels[labels == j].mean(0) if np.any(labels == j) else centres_arr[j] for j in range(len(centres_arr))]
        )
        if np.allclose(moved, centres_arr, atol=1e-3):
            centres_arr = moved
            break
        centres_arr = moved
    counts = np.bincount(labels, minlength=len(centres_arr)).astype(np.float64)
    keep = counts > 0
    return centres_arr[keep], counts[keep] / counts.sum()

"""A procedural world where content and style are known exactly.

Every picture shows ONE subject of a content class (lighthouse, house, boat, cat, ...) with a random
placement, scale and pose (mirror, tilt) taken from a seed, drawn in ONE style. The world is built for the
`mini` model: pretrain a small diffusion model on `PRETRAIN_STYLES`, train style LoRAs on `HELDOUT_STYLES`,
and judge every generated picture's content class and style with a small classifier.

How a picture is made: the layout (from `(content, seed)` only) is drawn as a *role map* (each pixel says
what it is: background, ground, subject body, subject part, light detail, dark detail, accent) with PIL
polygons. A style (a `WorldStyle` recipe: palette, outline weight, fill texture, lighting, background
treatment, ...) then paints the role map with numpy. So the same seed gives the same layout in every
style, the style never depends on the content, and the content never depends on the style.

All geometry and texture periods are fractions of the side, so `render(size=256)` downsampled to 128
looks like `render(size=128)`. Rendering a 128x128 picture takes about a millisecond or two on one core.

Captions (`caption`) are content-only, in the product's own form: they name the class and, when the
layout says so, its size ("a small boat") and side ("a cat on the left"); never how it looks.
"""

from __future__ import annotations

import io
import math
import os
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# -- content ---------------------------------------------------------------------------------------------

CONTENT_CLASSES: tuple[str, ...] = (
    "lighthouse", "house", "boat", "cat", "fish", "tree", "mountain", "sun", "bird", "car", "flower", "person",
)

# Roles: what each pixel of a picture is. A style gives each role a colour (its palette, in this order).
BG, GROUND, BODY, PART, DETAIL, DARK, ACCENT = range(7)
N_ROLES = 7
ROLE_NAMES = ("background", "ground", "body", "part", "detail", "dark", "accent")

# Size of the subject's box as a fraction of the side, and the thresholds of the caption's size words.
_SCALE = (0.42, 0.74)
_SMALL_BELOW = _SCALE[0] + (_SCALE[1] - _SCALE[0]) / 3
_LARGE_ABOVE = _SCALE[0] + 2 * (_SCALE[1] - _SCALE[0]) / 3
_LEFT_BELOW, _RIGHT_ABOVE = 0.42, 0.58  # subject centre x (fraction of the side)
_FLOATING = {"sun", "bird"}  # drawn in the sky, not standing on the ground


@dataclass(frozen=True)
class Layout:
    """Where and how the subject is drawn: everything a caption may say comes from here."""

    content: str
    cx: float  # centre of the subject's box, fraction of the side
    base: float  # bottom of the subject's box, fraction of the side
    scale: float  # side of the subject's box, fraction of the side
    flip: bool  # mirrored
    tilt: float  # degrees, positive = clockwise
    horizon: float  # where the ground starts, fraction of the side

    @property
    def size_word(self) -> str:
        if self.scale < _SMALL_BELOW:
            return "small"
        if self.scale > _LARGE_ABOVE:
            return "large"
        return ""

    @property
    def side_word(self) -> str:
        if self.cx < _LEFT_BELOW:
            return "left"
        if self.cx > _RIGHT_ABOVE:
            return "right"
        return ""


def _check_content(content: str) -> None:
    if content not in CONTENT_CLASSES:
        raise ValueError(f"unknown content class {content!r}; known classes: {', '.join(CONTENT_CLASSES)}")


def layout(content: str, seed: int) -> Layout:
    """The layout of `content` for `seed` (the same in every style)."""
    _check_content(content)
    rng = random.Random(f"world-layout:{content}:{int(seed)}")  # str seeds hash with sha512: stable across runs
    scale = rng.uniform(*_SCALE)
    margin = 0.03
    lo, hi = scale / 2 + margin, 1 - scale / 2 - margin
    # Pick the side first so that left / middle / right are about equally common at every scale.
    where = rng.choice(("left", "middle", "right"))
    if where == "left":
        cx = rng.uniform(lo, max(lo, _LEFT_BELOW - 0.02))
    elif where == "right":
        cx = rng.uniform(min(hi, _RIGHT_ABOVE + 0.02), hi)
    else:
        cx = rng.uniform(0.46, 0.54)
    flip = rng.random() < 0.5
    tilt = rng.uniform(-12.0, 12.0)
    if content == "fish":
        horizon = rng.uniform(0.12, 0.22)  # mostly water
        base = rng.uniform(horizon + scale + 0.02, 0.98) if horizon + scale + 0.02 < 0.98 else 0.98
    elif content in _FLOATING:
        horizon = rng.uniform(0.7, 0.86)
        base = rng.uniform(min(scale + 0.03, horizon - 0.02), horizon - 0.02)
    elif content == "boat":
        horizon = rng.uniform(0.55, 0.75)
        base = min(horizon + rng.uniform(0.05, 0.15), 0.97)
    else:
        horizon = rng.uniform(0.5, 0.72)
        base = rng.uniform(max(horizon + 0.04, scale + 0.03), 0.97)
    base = min(max(base, scale + 0.02), 0.99)
    return Layout(content, cx, base, scale, flip, tilt, horizon)


def caption(content: str, seed: int) -> str:
    """Content-only caption of `render(content, style, seed)`: "a cat", "a small boat on the left", ..."""
    lay = layout(content, seed)
    noun = f"{lay.size_word} {content}".strip()
    article = "an" if noun[0] in "aeiou" else "a"
    text = f"{article} {noun}"
    if lay.side_word:
        text += f" on the {lay.side_word}"
    return text


class _Pen:
    """Draws in the subject's own frame: u across (-0.5..0.5), v up (0 at the base, 1 at the top)."""

    def __init__(self, draw: ImageDraw.ImageDraw, lay: Layout, side: int):
        self.draw = draw
        self.side = side
        self.unit = lay.scale * side
        self.ox, self.oy = lay.cx * side, lay.base * side
        self.mirror = -1.0 if lay.flip else 1.0
        t = math.radians(lay.tilt)
        self.cos, self.sin = math.cos(t), math.sin(t)

    def pt(self, u: float, v: float) -> tuple[float, float]:
        dx, dy = self.mirror * u * self.unit, -v * self.unit
        return (self.ox + dx * self.cos - dy * self.sin, self.oy + dx * self.sin + dy * self.cos)

    def poly(self, pts, role: int) -> None:
        self.draw.polygon([self.pt(u, v) for u, v in pts], fill=role)

    def rect(self, u0, v0, u1, v1, role: int) -> None:
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], role)

    def ellipse(self, u, v, ru, rv, role: int, n: int = 20) -> None:
        self.poly([(u + ru * math.cos(2 * math.pi * k / n), v + rv * math.sin(2 * math.pi * k / n))
                   for k in range(n)], role)

    def line(self, pts, role: int, width: float) -> None:
        self.draw.line([self.pt(u, v) for u, v in pts], fill=role, width=max(1, round(width * self.unit)),
                       joint="curve")


# Subjects, in the unit box. Each is a few bold shapes: recognisable at 64 px in any style.

def _lighthouse(p: _Pen) -> None:
    p.ellipse(0, 0.02, 0.34, 0.07, DARK)  # rock
    p.poly([(-0.4, 0.86), (-0.06, 0.83), (-0.06, 0.79), (-0.4, 0.74)], ACCENT)  # light beams
    p.poly([(0.4, 0.86), (0.06, 0.83), (0.06, 0.79), (0.4, 0.74)], ACCENT)
    p.poly([(-0.15, 0.04), (0.15, 0.04), (0.1, 0.74), (-0.1, 0.74)], BODY)  # tower
    for v0 in (0.16, 0.42):
        w0, w1 = 0.15 - v0 * 0.07, 0.15 - (v0 + 0.12) * 0.07
        p.poly([(-w0, v0), (w0, v0), (w1, v0 + 0.12), (-w1, v0 + 0.12)], PART)  # bands
    p.rect(-0.14, 0.73, 0.14, 0.77, DARK)  # gallery
    p.rect(-0.075, 0.77, 0.075, 0.88, DETAIL)  # lamp room
    p.poly([(-0.12, 0.88), (0.12, 0.88), (0, 1.0)], PART)  # roof
    p.rect(-0.04, 0.04, 0.04, 0.16, DARK)  # door


def _house(p: _Pen) -> None:
    p.rect(0.18, 0.6, 0.3, 0.95, PART)  # chimney
    p.rect(-0.4, 0.0, 0.4, 0.56, BODY)
    p.poly([(-0.5, 0.54), (0.5, 0.54), (0, 0.96)], PART)  # roof
    p.rect(-0.22, 0.0, -0.06, 0.32, DARK)  # door
    p.rect(0.06, 0.22, 0.28, 0.42, DETAIL)  # window
    p.line([(0.17, 0.22), (0.17, 0.42)], DARK, 0.03)
    p.line([(0.06, 0.32), (0.28, 0.32)], DARK, 0.03)
    p.ellipse(-0.1, 0.14, 0.018, 0.018, ACCENT, n=8)  # door knob


def _boat(p: _Pen) -> None:
    p.line([(0, 0.2), (0, 1.0)], DARK, 0.035)  # mast
    p.poly([(0.04, 0.97), (0.04, 0.3), (0.44, 0.3)], BODY)  # mainsail
    p.poly([(-0.04, 0.85), (-0.04, 0.3), (-0.32, 0.3)], DETAIL)  # jib
    p.poly([(-0.5, 0.24), (0.5, 0.24), (0.34, 0.0), (-0.36, 0.0)], PART)  # hull
    p.rect(-0.42, 0.16, 0.44, 0.2, ACCENT)  # stripe
    p.poly([(0.0, 1.0), (0.16, 0.95), (0.0, 0.9)], ACCENT)  # flag


def _cat(p: _Pen) -> None:
    p.line([(0.22, 0.08), (0.4, 0.12), (0.46, 0.3), (0.4, 0.46)], PART, 0.07)  # tail
    p.ellipse(0, 0.27, 0.28, 0.27, BODY)  # body
    p.ellipse(0, 0.66, 0.21, 0.18, BODY)  # head
    for s in (-1, 1):
        p.poly([(s * 0.2, 0.7), (s * 0.2, 0.97), (s * 0.05, 0.8)], BODY)  # ears
        p.poly([(s * 0.17, 0.76), (s * 0.17, 0.9), (s * 0.09, 0.8)], ACCENT)
        p.ellipse(s * 0.085, 0.68, 0.045, 0.05, DETAIL, n=12)  # eyes
        p.ellipse(s * 0.085, 0.68, 0.018, 0.04, DARK, n=8)
        p.line([(s * 0.06, 0.58), (s * 0.3, 0.62)], DARK, 0.015)  # whiskers
        p.line([(s * 0.06, 0.56), (s * 0.3, 0.52)], DARK, 0.015)
        p.ellipse(s * 0.12, 0.04, 0.08, 0.045, PART, n=12)  # paws
    p.poly([(-0.03, 0.61), (0.03, 0.61), (0, 0.57)], ACCENT)  # nose


def _fish(p: _Pen) -> None:
    p.poly([(0.24, 0.5), (0.5, 0.76), (0.44, 0.5), (0.5, 0.24)], PART)  # tail
    p.poly([(-0.1, 0.64), (0.05, 0.84), (0.18, 0.62)], PART)  # dorsal fin
    p.ellipse(-0.04, 0.5, 0.36, 0.2, BODY, n=24)
    for u in (-0.02, 0.12):
        p.line([(u, 0.34), (u + 0.03, 0.5), (u, 0.66)], ACCENT, 0.04)  # stripes
    p.ellipse(-0.24, 0.55, 0.055, 0.055, DETAIL, n=12)
    p.ellipse(-0.25, 0.55, 0.025, 0.025, DARK, n=8)
    p.line([(-0.4, 0.47), (-0.32, 0.45)], DARK, 0.02)  # mouth
    p.ellipse(-0.45, 0.72, 0.04, 0.04, DETAIL, n=10)  # bubbles
    p.ellipse(-0.48, 0.86, 0.03, 0.03, DETAIL, n=10)


def _tree(p: _Pen) -> None:
    p.poly([(-0.08, 0.0), (0.08, 0.0), (0.04, 0.6), (-0.04, 0.6)], DARK)  # trunk
    p.line([(0.02, 0.3), (0.2, 0.48)], DARK, 0.04)  # branches
    p.line([(-0.02, 0.36), (-0.18, 0.52)], DARK, 0.035)
    for u, v, r in ((0.0, 0.8, 0.2), (-0.22, 0.66, 0.17), (0.22, 0.66, 0.17), (-0.12, 0.52, 0.13),
                    (0.13, 0.52, 0.13), (0.0, 0.64, 0.18)):
        p.ellipse(u, v, r, r * 0.92, BODY)  # a bumpy crown
    for u, v in ((-0.2, 0.66), (0.14, 0.84), (0.22, 0.56), (-0.04, 0.62), (-0.12, 0.86)):
        p.ellipse(u, v, 0.035, 0.035, ACCENT, n=10)  # fruit


def _mountain(p: _Pen) -> None:
    p.poly([(0.0, 0.0), (0.3, 0.62), (0.52, 0.0)], PART)  # the peak behind
    p.poly([(-0.52, 0.0), (-0.06, 0.95), (0.36, 0.0)], BODY)
    p.poly([(-0.2, 0.66), (-0.06, 0.95), (0.08, 0.66), (0.0, 0.7), (-0.08, 0.64), (-0.14, 0.7)], DETAIL)  # snow
    p.poly([(0.2, 0.3), (0.3, 0.62), (0.37, 0.42), (0.3, 0.46)], DETAIL)
    p.poly([(-0.06, 0.0), (0.0, 0.3), (0.1, 0.0)], DARK)  # a ravine


def _sun(p: _Pen) -> None:
    for k in range(12):
        a = 2 * math.pi * k / 12
        a0, a1 = a - 0.12, a + 0.12
        p.poly([(0.3 * math.cos(a0), 0.5 + 0.3 * math.sin(a0)), (0.49 * math.cos(a), 0.5 + 0.49 * math.sin(a)),
                (0.3 * math.cos(a1), 0.5 + 0.3 * math.sin(a1))], ACCENT)
    p.ellipse(0, 0.5, 0.29, 0.29, BODY, n=28)
    p.ellipse(0, 0.5, 0.19, 0.19, DETAIL, n=24)


def _bird(p: _Pen) -> None:
    p.poly([(0.3, 0.52), (0.5, 0.62), (0.5, 0.4)], PART)  # tail
    p.ellipse(0.0, 0.5, 0.3, 0.12, BODY, n=24)  # body
    p.ellipse(-0.28, 0.6, 0.11, 0.1, BODY, n=16)  # head
    p.poly([(-0.37, 0.63), (-0.5, 0.58), (-0.37, 0.55)], ACCENT)  # beak
    p.ellipse(-0.3, 0.63, 0.025, 0.025, DARK, n=8)
    p.poly([(-0.1, 0.56), (0.1, 0.98), (0.22, 0.92), (0.14, 0.54)], PART)  # wing up
    p.poly([(-0.06, 0.46), (0.08, 0.16), (0.16, 0.2), (0.14, 0.46)], PART)  # wing down


def _car(p: _Pen) -> None:
    p.poly([(-0.26, 0.42), (-0.16, 0.7), (0.2, 0.7), (0.32, 0.42)], BODY)  # cabin
    p.poly([(-0.2, 0.45), (-0.12, 0.64), (0.0, 0.64), (0.0, 0.45)], DETAIL)  # windows
    p.poly([(0.04, 0.45), (0.04, 0.64), (0.17, 0.64), (0.25, 0.45)], DETAIL)
    p.rect(-0.5, 0.12, 0.5, 0.44, PART)  # body
    p.rect(-0.5, 0.28, -0.42, 0.36, ACCENT)  # lights
    p.rect(0.44, 0.28, 0.5, 0.36, DARK)
    for u in (-0.28, 0.28):
        p.ellipse(u, 0.13, 0.13, 0.13, DARK)
        p.ellipse(u, 0.13, 0.05, 0.05, DETAIL, n=12)


def _flower(p: _Pen) -> None:
    p.line([(0, 0.14), (0.02, 0.4), (0, 0.66)], PART, 0.045)  # stem
    p.ellipse(0.12, 0.34, 0.11, 0.045, PART, n=14)
    p.ellipse(-0.12, 0.44, 0.11, 0.045, PART, n=14)
    p.poly([(-0.16, 0.16), (0.16, 0.16), (0.12, 0.0), (-0.12, 0.0)], DARK)  # pot
    for k in range(7):
        a = 2 * math.pi * k / 7 + 0.3
        p.ellipse(0.17 * math.cos(a), 0.74 + 0.17 * math.sin(a), 0.1, 0.1, BODY, n=14)
    p.ellipse(0, 0.74, 0.09, 0.09, ACCENT, n=16)


def _person(p: _Pen) -> None:
    p.line([(-0.15, 0.68), (-0.3, 0.42), (-0.32, 0.3)], DETAIL, 0.06)  # arms
    p.line([(0.15, 0.68), (0.3, 0.82), (0.34, 0.96)], DETAIL, 0.06)  # waving
    p.rect(-0.13, 0.0, -0.03, 0.4, DARK)  # legs
    p.rect(0.03, 0.0, 0.13, 0.4, DARK)
    p.poly([(-0.16, 0.72), (0.16, 0.72), (0.19, 0.36), (-0.19, 0.36)], BODY)  # body
    p.ellipse(0, 0.85, 0.11, 0.11, DETAIL, n=18)  # head
    p.poly([(-0.12, 0.86), (-0.1, 0.95), (0.0, 0.98), (0.1, 0.95), (0.12, 0.86), (0.0, 0.92)], PART)  # hair
    p.ellipse(-0.04, 0.84, 0.015, 0.02, DARK, n=6)
    p.ellipse(0.04, 0.84, 0.015, 0.02, DARK, n=6)
    p.rect(-0.14, 0.0, -0.02, 0.035, ACCENT)  # shoes
    p.rect(0.02, 0.0, 0.14, 0.035, ACCENT)


_DRAW = {
    "lighthouse": _lighthouse, "house": _house, "boat": _boat, "cat": _cat, "fish": _fish, "tree": _tree,
    "mountain": _mountain, "sun": _sun, "bird": _bird, "car": _car, "flower": _flower, "person": _person,
}
assert set(_DRAW) == set(CONTENT_CLASSES)


def role_map(content: str, seed: int, size: int = 128) -> np.ndarray:
    """The picture's role map (size x size uint8, values BG..ACCENT); the same in every style."""
    lay = layout(content, seed)
    image = Image.new("L", (size, size), BG)
    draw = ImageDraw.Draw(image)
    horizon = round(lay.horizon * size)
    draw.rectangle([0, horizon, size, size], fill=GROUND)
    _DRAW[content](_Pen(draw, lay, size))
    return np.asarray(image, dtype=np.uint8)


# -- styles ----------------------------------------------------------------------------------------------

TEXTURES = ("flat", "hatch", "crosshatch", "halftone", "dots", "grain", "bleed", "stripes", "dither",
            "crayon", "facets", "scanlines", "cross")
LIGHTINGS = ("none", "top", "bottom", "radial", "side")
BACKGROUNDS = ("flat", "gradient", "rays", "bands", "grid", "dots", "paper", "checker")


@dataclass(frozen=True)
class WorldStyle:
    """A style recipe. Periods and widths are fractions of the side (so they scale with the picture)."""

    name: str
    description: str
    palette: tuple[str, ...]  # one hex colour per role: background, ground, body, part, detail, dark, accent
    background_2: str  # second background colour, used by the background treatment
    ink: str = "#000000"  # outline and texture ink
    paper: str = "#ffffff"  # what texture gaps show (hatching, halftone, crayon)
    outline: float = 0.0  # outline width, fraction of the side (0: no outline)
    outline_role_colour: bool = False  # outlines take each region's own colour (neon) instead of the ink
    glow: float = 0.0  # blur radius of a glow around the outlines, fraction of the side
    fill: float = 1.0  # how much regions show their colour (1) vs the background colour (0)
    texture: str = "flat"  # one of TEXTURES
    texture_period: float = 1 / 32
    texture_angle: float = 45.0  # degrees
    texture_strength: float = 0.5
    mono: bool = False  # print with ink on paper only (luminance decides the ink)
    ramp: tuple[str, ...] = ()  # quantise luminance to these colours (dark -> light), ordered-dithered
    blocks: int = 0  # cells per side: sample the role map on a coarse grid (pixel art, mosaic, stitches)
    grout: str = ""  # colour between blocks (mosaic); "" for none
    lighting: str = "none"  # one of LIGHTINGS
    lighting_strength: float = 0.3
    background: str = "flat"  # one of BACKGROUNDS
    background_period: float = 1 / 8
    shadow: float = 0.0  # drop-shadow offset of the subject (paper cut-outs), fraction of the side
    misregister: float = 0.0  # shift of the outline layer (risograph), fraction of the side
    outline_breaks: float = 0.0  # fraction of the outline left out, in rough dashes (chalk)
    noise: float = 0.0  # per-pixel grain added at the end (0..255 scale)

    def __post_init__(self) -> None:
        if len(self.palette) != N_ROLES:
            raise ValueError(f"style {self.name!r}: the palette needs {N_ROLES} colours ({', '.join(ROLE_NAMES)})")
        for field, value, allowed in (("texture", self.texture, TEXTURES), ("lighting", self.lighting, LIGHTINGS),
                                      ("background", self.background, BACKGROUNDS)):
            if value not in allowed:
                raise ValueError(f"style {self.name!r}: unknown {field} {value!r}; known: {', '.join(allowed)}")


def _rgb(hex_colour: str) -> np.ndarray:
    h = hex_colour.lstrip("#")
    return np.array([int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)], dtype=np.float32)


_S = WorldStyle
_STYLE_LIST = (
    # ---- pretraining styles ----
    _S("flat", "flat vector shapes in clean bright colours, no outlines, plain sky",
       ("#8fd3f4", "#7cc576", "#f28c28", "#d7263d", "#ffffff", "#1b2a41", "#ffd23f"), "#8fd3f4"),
    _S("comic", "thick black outlines, primary colours, halftone dots on every fill, dotted sky",
       ("#fff3b0", "#3fa34d", "#e63946", "#1d70d6", "#fefefe", "#111111", "#ffb703"), "#f4a259",
       outline=0.022, texture="dots", texture_period=1 / 22, texture_strength=0.28, background="dots",
       background_period=1 / 14),
    _S("engraving", "brown ink hatching and cross-hatching on cream paper, fine outlines",
       ("#e8dcc0", "#9b8262", "#b09070", "#6a4a30", "#f0e6d0", "#2a1a10", "#8a6a48"), "#e8dcc0",
       ink="#3b2414", paper="#f1e4c8", outline=0.008, texture="crosshatch", texture_period=1 / 36,
       texture_angle=35, texture_strength=1.0, mono=True),
    _S("watercolour", "soft bleeding washes with paper showing through, no outlines",
       ("#cfe6f2", "#a8d088", "#e0707e", "#5a8ed0", "#fbf3e0", "#3e5270", "#f0b840"), "#f7efe0",
       texture="bleed", texture_period=1 / 60, texture_strength=0.18, background="paper", noise=4.0),
    _S("blueprint", "deep blue sheet, thin white line-work, faint fills and a measuring grid",
       ("#1b4d89", "#1f5596", "#2a62a6", "#23599c", "#3a78c0", "#143c6e", "#4b8ad0"), "#5d93d6",
       ink="#eaf2ff", outline=0.012, fill=0.25, background="grid", background_period=1 / 16),
    _S("neon", "near-black ground, saturated glowing outlines in each region's colour, scanlines",
       ("#0b0820", "#061c2c", "#ff2fd0", "#00e5ff", "#fff03a", "#7dff4f", "#ff6a00"), "#1b0f3a",
       outline=0.014, outline_role_colour=True, glow=0.03, fill=0.12, texture="scanlines",
       texture_period=1 / 42, texture_strength=0.35, background="gradient"),
    _S("pixel", "chunky pixel-art blocks, an earthy 8-bit palette, dark block outlines",
       ("#5b6ee1", "#37946e", "#df7126", "#ac3232", "#fbf236", "#222034", "#d95763"), "#639bff",
       ink="#222034", outline=0.02, blocks=28, background="bands", background_period=1 / 7),
    _S("mosaic", "square terracotta, ochre and teal tiles set in dark grout",
       ("#4f9aa8", "#5f7440", "#f0b030", "#c83a2a", "#fff4d8", "#2a1e18", "#e07a30"), "#3f8795",
       blocks=22, grout="#574b40", texture="grain", texture_strength=10.0),
    _S("pastel_dither", "pale pastel fills, ordered dithering, a soft top-down fade, no outlines",
       ("#a8d4f0", "#b4e0b0", "#f4a0bc", "#b8a0e0", "#fff0c0", "#7a6a9c", "#ffe070"), "#f4e8f4",
       texture="dither", texture_period=1 / 42, texture_strength=0.35, background="gradient", lighting="top",
       lighting_strength=0.12),
    _S("woodcut", "black, cream and red only, heavy carved outlines, gouge lines in the ground and sky",
       ("#efe6d2", "#1a1a1a", "#c8281e", "#1a1a1a", "#efe6d2", "#1a1a1a", "#c8281e"), "#1a1a1a",
       ink="#141414", paper="#efe6d2", outline=0.026, texture="stripes", texture_period=1 / 20, texture_angle=0,
       texture_strength=0.85, background="bands", background_period=1 / 20),
    _S("pop_stripes", "magenta and cyan pop art, diagonal stripes on fills, a sunburst sky",
       ("#ff4fa3", "#2ec4b6", "#ffe600", "#3a0ca3", "#ffffff", "#101010", "#ff7f11"), "#ff8cc6",
       outline=0.016, texture="stripes", texture_period=1 / 18, texture_angle=45, texture_strength=0.3,
       background="rays"),
    _S("silhouette", "black silhouettes against an orange to purple sunset gradient",
       ("#ff9e3d", "#4a1812", "#120818", "#1c0c22", "#2e1632", "#05020a", "#ffcf5a"), "#6a2a8c",
       background="gradient", lighting="bottom", lighting_strength=0.25),
    _S("newsprint", "grey newspaper halftone: black dots on grey paper, thin outlines",
       ("#d8d8d0", "#7a7a74", "#5e5e58", "#3a3a36", "#ecece6", "#1a1a18", "#9a9a92"), "#c8c8c0",
       ink="#161616", paper="#dcdcd2", outline=0.008, texture="halftone", texture_period=1 / 30,
       texture_strength=1.0, mono=True, noise=5.0),
    _S("gameboy", "four shades of green, chunky dithered pixels",
       ("#c4dc50", "#8bac0f", "#306230", "#0f380f", "#e0f0a0", "#0f380f", "#6a8c20"), "#9bbc0f",
       ramp=("#0f380f", "#306230", "#8bac0f", "#9bbc0f"), blocks=40, outline=0.008, ink="#0f380f",
       background="gradient", lighting="top", lighting_strength=0.2),
    _S("papercut", "layered paper cut-outs with drop shadows, paper grain, muted card colours",
       ("#f3e9dc", "#c2b280", "#e07a5f", "#3d405b", "#f4f1de", "#22223b", "#81b29a"), "#eadfcf",
       shadow=0.025, texture="grain", texture_strength=7.0, background="paper", lighting="radial",
       lighting_strength=0.15),
    _S("crayon", "waxy crayon strokes on white paper with paper showing through, wobbly dark outlines",
       ("#ffffff", "#6cc24a", "#ff6b35", "#4361ee", "#ffd60a", "#3c1f0f", "#e5383b"), "#ffffff",
       ink="#3c1f0f", paper="#ffffff", outline=0.014, texture="crayon", texture_period=1 / 40,
       texture_strength=0.55, texture_angle=20),
    # ---- held-out styles (the base never sees them) ----
    _S("stained_glass", "jewel-toned glass facets in thick black leading, lit from the centre",
       ("#1f4e9c", "#1b7f4c", "#c21d3a", "#e3a21a", "#9ad0f5", "#3a1650", "#7b2cbf"), "#2a64c0",
       ink="#0d0d0d", outline=0.02, texture="facets", texture_period=1 / 9, texture_strength=0.28,
       lighting="radial", lighting_strength=0.45),
    _S("risograph", "two-ink risograph: fluorescent pink and teal on off-white, coarse grain, misregistered outlines",
       ("#f6f1e7", "#39a0a0", "#ff5a8a", "#2a7f8f", "#fbd3df", "#1d4f6e", "#ff8fab"), "#f6f1e7",
       ink="#1d4f6e", outline=0.014, misregister=0.03, texture="halftone", texture_period=1 / 16,
       texture_strength=0.5, noise=12.0),
    _S("chalkboard", "broken chalk lines and scribbled chalk fills on a slate-green board, dusty and vignetted",
       ("#24382f", "#2c4438", "#f2f2e8", "#f7c8d8", "#fff6b0", "#a0d8ef", "#ffb88c"), "#3a5245",
       ink="#f0f0e6", paper="#24382f", outline=0.016, outline_breaks=0.3, fill=0.6, texture="crayon",
       texture_strength=0.6, background="paper", lighting="radial", lighting_strength=0.35, noise=10.0),
    _S("cross_stitch", "cross-stitch embroidery: coloured X stitches on a linen grid",
       ("#7fb5d5", "#6a9c4a", "#c84b31", "#2d4263", "#f0e0b0", "#2b2b2b", "#ecb365"), "#7fb5d5",
       blocks=30, texture="cross", paper="#e9dfc8"),
)
STYLES: dict[str, WorldStyle] = {style.name: style for style in _STYLE_LIST}
HELDOUT_STYLES: tuple[str, ...] = ("stained_glass", "risograph", "chalkboard", "cross_stitch")
PRETRAIN_STYLES: tuple[str, ...] = tuple(name for name in STYLES if name not in HELDOUT_STYLES)


def _check_style(style: str) -> WorldStyle:
    if style not in STYLES:
        raise ValueError(f"unknown world style {style!r}; known styles: {', '.join(STYLES)}")
    return STYLES[style]


# -- painting --------------------------------------------------------------------------------------------

_BAYER_4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], dtype=np.float32) / 16 + 1 / 32
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side (y, x)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None].repeat(size, 1), c[None, :].repeat(size, 0)


@lru_cache(maxsize=8)
def _noise(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed noise fields for a size: white (N(0,1) per pixel), smooth (low frequency) and streaks (along x).

    The smooth and streak fields come from the same coarse source at every size, so they scale with the side.
    """
    white = np.random.default_rng(20261201 + size).standard_normal((size, size)).astype(np.float32)
    rng = np.random.default_rng(20261201)
    coarse = rng.standard_normal((8, 8)).astype(np.float32)
    streak_src = rng.standard_normal((12, 40)).astype(np.float32)  # 40 streaks down the side, 12 knots along each
    fields = []
    for src in (coarse, streak_src):
        img = Image.fromarray(src).resize((size, size), Image.Resampling.BICUBIC if src is coarse else Image.Resampling.BILINEAR)
        field = np.asarray(img, dtype=np.float32)
        fields.append((field - field.mean()) / (field.std() + 1e-6))
    smooth, streaks = fields[0], fields[1].T
    return white, smooth, streaks.copy()


@lru_cache(maxsize=8)
def _facets(size: int, period: float) -> tuple[np.ndarray, np.ndarray]:
    """A Voronoi cell index per pixel (cells about `period` wide) and the mask of cell borders."""
    rng = np.random.default_rng(7)  # the same cells at every size
    n = max(2, round(1 / period))
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float32)
    pts = np.stack([(gy.ravel() + rng.uniform(0.15, 0.85, n * n)) / n, (gx.ravel() + rng.uniform(0.15, 0.85, n * n)) / n], 1)
    y, x = _grid(size)
    d = (y.ravel()[:, None] - pts[None, :, 0]) ** 2 + (x.ravel()[:, None] - pts[None, :, 1]) ** 2
    cells = d.argmin(1).reshape(size, size).astype(np.int32)
    return cells, _edges(cells, max(1, round(size / 160)))


def _edges(labels: np.ndarray, width: int) -> np.ndarray:
    """Where labels change, thickened to about `width` pixels."""
    edge = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dy
    edge[:, 1:] |= dx
    for k in range(1, width):
        grown = edge.copy()
        if k % 2:
            grown[:-1, :] |= edge[1:, :]
            grown[:, :-1] |= edge[:, 1:]
        else:
            grown[1:, :] |= edge[:-1, :]
            grown[:, 1:] |= edge[:, :-1]
        edge = grown
    return edge


def _px(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


def _blur(pixels: np.ndarray, radius: float) -> np.ndarray:
    """A Gaussian-like blur of `radius` pixels, done at half resolution (it is smooth anyway: 3x faster)."""
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    size = img.size
    small = img.reduce(2).filter(ImageFilter.GaussianBlur(radius / 2))
    return np.asarray(small.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _rolled(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The field shifted by a random fraction of the side (the same fraction at every size)."""
    dy, dx = rng.random(2)
    return np.roll(field, (int(dy * field.shape[0]), int(dx * field.shape[1])), (0, 1))


@dataclass
class _Prepared:
    """Everything about a style at one size that does not depend on the picture (cached)."""

    pal: np.ndarray
    ink: np.ndarray
    paper: np.ndarray
    back: np.ndarray | None  # background treatment (size, size, 3)
    light: np.ndarray | None  # lighting field (size, size, 1)
    pattern: np.ndarray | None  # texture geometry: a distance-like field or a mask, by texture
    block_rows: np.ndarray | None  # pixel -> role-map row/col of its block's centre
    block_cell: np.ndarray | None  # pixel -> block index
    ramp: np.ndarray | None
    ramp_threshold: np.ndarray | None


@lru_cache(maxsize=256)
def _prepare(name: str, size: int) -> _Prepared:
    st = STYLES[name]
    y, x = _grid(size)
    pal = np.stack([_rgb(c) for c in st.palette])
    bg, bg2 = pal[BG], _rgb(st.background_2)
    p = st.background_period
    back = None
    if st.background == "gradient":
        t = y[..., None]
        back = bg * (1 - t) + bg2 * t
    elif st.background == "rays":
        ang = np.arctan2(y - 1.1, x - 0.5)
        back = np.where(((ang * 12 / math.pi) % 2 < 1)[..., None], bg, bg2)
    elif st.background == "bands":
        back = np.where(((y / p) % 1 < 0.5)[..., None], bg, bg * 0.8 + bg2 * 0.2)
    elif st.background == "grid":
        lines = ((y / p) % 1 < 0.07) | ((x / p) % 1 < 0.07)
        back = np.where(lines[..., None], bg * 0.5 + bg2 * 0.5, bg)
    elif st.background == "dots":
        r = np.hypot((y / p) % 1 - 0.5, (x / p + 0.5 * np.floor(y / p)) % 1 - 0.5)
        back = np.where((r < 0.28)[..., None], bg2, bg)
    elif st.background == "paper":
        back = bg + (bg2 - bg) * np.clip(0.5 + 0.35 * _noise(size)[1], 0, 1)[..., None]
    elif st.background == "checker":
        back = np.where(((np.floor(y / p) + np.floor(x / p)) % 2 == 0)[..., None], bg, bg2)
    if back is not None:
        back = back.astype(np.float32)

    light = None
    s = st.lighting_strength
    if st.lighting == "top":
        light = 1 + s * (0.5 - y)
    elif st.lighting == "bottom":
        light = 1 + s * (y - 0.5)
    elif st.lighting == "side":
        light = 1 + s * (0.5 - x)
    elif st.lighting == "radial":
        light = 1 + s * (0.35 - 1.6 * ((y - 0.5) ** 2 + (x - 0.5) ** 2))
    if light is not None:
        light = light[..., None].astype(np.float32)

    theta = math.radians(st.texture_angle)
    along = (x * math.cos(theta) + y * math.sin(theta)) / st.texture_period
    across = (-x * math.sin(theta) + y * math.cos(theta)) / st.texture_period
    pattern = None
    if st.texture in ("halftone", "dots"):
        pattern = np.hypot(along % 1 - 0.5, across % 1 - 0.5)
    elif st.texture in ("hatch", "crosshatch"):
        pattern = np.stack([np.abs(along % 1 - 0.5), np.abs(across % 1 - 0.5)])
    elif st.texture == "stripes":
        pattern = (along % 1) < 0.5
    elif st.texture == "scanlines":
        pattern = (y / st.texture_period) % 1 < 0.4
    elif st.texture == "dither":
        period = st.texture_period
        threshold = _BAYER_4[(y / period * 2).astype(int) % 4, (x / period * 2).astype(int) % 4]
        pattern = threshold < (0.25 + 0.6 * y)
    elif st.texture == "facets":
        cells, borders = _facets(size, st.texture_period)
        jitter = np.random.default_rng(11).uniform(1 - st.texture_strength, 1 + st.texture_strength,
                                                    cells.max() + 1).astype(np.float32)
        pattern = np.where(borders, np.float32(-1), jitter[cells])
    block_rows = block_cell = None
    if st.blocks:
        idx = (np.arange(size) * st.blocks) // size
        block_cell = idx
        block_rows = np.minimum(((idx + 0.5) * size / st.blocks).astype(int), size - 1)
        pos = ((np.arange(size) + 0.5) * st.blocks / size) % 1.0
        if st.texture == "cross":
            u, v = pos[:, None], pos[None, :]
            pattern = (np.abs(u - v) < 0.22) | (np.abs(u + v - 1) < 0.22)
        if st.grout:
            g = (pos < 0.13) | np.r_[True, idx[1:] != idx[:-1]]  # at least one pixel per cell edge
            pattern = g[:, None] | g[None, :]
    ramp = ramp_threshold = None
    if st.ramp:
        ramp = np.stack([_rgb(c) for c in st.ramp])
        cell = max(1, size // (st.blocks or size))
        by = (np.arange(size) // cell) % 4
        ramp_threshold = _BAYER_4[by[:, None], by[None, :]] - 0.5
    return _Prepared(pal, _rgb(st.ink), _rgb(st.paper), back, light, pattern, block_rows, block_cell, ramp,
                     ramp_threshold)


def _paint(roles: np.ndarray, st: WorldStyle, texture_seed: int) -> np.ndarray:
    size = roles.shape[0]
    pre = _prepare(st.name, size)
    rng = np.random.default_rng(texture_seed)
    pal, ink, paper = pre.pal, pre.ink, pre.paper
    if st.blocks:
        roles = roles[pre.block_rows[:, None], pre.block_rows[None, :]]
    is_bg = (roles == BG)[..., None]
    out = np.take(pal, roles, axis=0)
    if pre.back is not None:
        out = np.where(is_bg, pre.back, out)
    if st.fill < 1.0:
        base = pre.back if pre.back is not None else pal[BG]
        out = np.where(is_bg, out, out * st.fill + base * (1 - st.fill))

    if st.shadow:  # drop shadow of the subject (cut paper)
        subject = roles >= BODY
        k = _px(st.shadow, size)
        shadow = np.zeros_like(subject)
        shadow[k:, k:] = subject[:-k, :-k]
        out = np.where((shadow & ~subject)[..., None], out * 0.55, out)
    if pre.light is not None:
        out = out * pre.light

    tex, strength, pattern = st.texture, st.texture_strength, pre.pattern
    if tex in ("hatch", "crosshatch", "halftone"):
        dark = 1 - np.clip(out @ _LUMA / 255, 0, 1)
        sharp = st.texture_period * size  # pixels per period: edges of lines and dots are one pixel soft
        if tex == "halftone":
            reach = np.sqrt(dark) * 0.62 * strength + (0.0 if st.mono else 0.08)
            cover = np.clip((reach - pattern) * sharp + 0.5, 0, 1)
        else:
            cover = np.clip((dark * 0.55 * strength - pattern[0]) * sharp + 0.5, 0, 1)
            if tex == "crosshatch":
                cross = np.clip(((dark - 0.45) * 0.8 * strength - pattern[1]) * sharp + 0.5, 0, 1) * (dark > 0.45)
                cover = np.maximum(cover, cross)
        cover = cover[..., None]
        if st.mono:
            out = paper + (ink - paper) * cover
        else:
            lit = out * (1 - 0.25 * strength) + paper * (0.25 * strength)
            out = lit + (out * 0.55 + ink * 0.135 - lit) * cover
    elif tex == "dots":
        out = np.where(((pattern < 0.3)[..., None]) & ~is_bg, out * (1 - strength), out)
    elif tex == "stripes":
        if st.texture_angle == 0:  # gouge lines: only in the background and ground (woodcut)
            out = np.where((pattern & (roles <= GROUND))[..., None], out * (1 - strength) + paper * strength, out)
        else:
            out = np.where(pattern[..., None] & ~is_bg, out * (1 - strength) + 153 * strength, out)
    elif tex == "dither":
        out = np.where(pattern[..., None], out * (1 - strength) + 255 * strength, out)
    elif tex == "grain":
        out = out + (_rolled(_noise(size)[0], rng) * strength)[..., None]
    elif tex == "bleed":
        out = _blur(out, st.texture_period * size)
        wash = 1 + strength * _rolled(_noise(size)[1], rng)
        out = 255 - (255 - out) * wash[..., None]
        out = np.where(_edges(roles, _px(1 / 128, size))[..., None], out * 0.85, out)
    elif tex == "crayon":
        white, _, streaks = _noise(size)
        s = _rolled(streaks, rng) + 0.6 * _rolled(white, rng)
        out = np.where((s > (1.4 - 2.0 * strength))[..., None] & ~is_bg, out * 0.35 + paper * 0.65, out)
    elif tex == "scanlines":
        out = np.where(pattern[..., None], out * (1 - strength), out)
    elif tex == "facets":
        out = np.where((pattern < 0)[..., None], ink, out * np.abs(pattern)[..., None])
    elif tex == "cross":
        out = np.where(pattern[..., None] & ~is_bg, out, np.where(is_bg, out * 0.25 + paper * 0.75, paper))

    if pre.ramp is not None:
        lum = np.clip(out @ _LUMA / 255, 0, 1) * (len(pre.ramp) - 1)
        level = np.clip(np.floor(lum + pre.ramp_threshold + 0.5), 0, len(pre.ramp) - 1).astype(np.intp)
        out = pre.ramp[level]

    if st.outline:
        edge = _edges(roles, _px(st.outline, size))
        if st.outline_breaks:
            edge &= _rolled(_noise(size)[2], rng) > (st.outline_breaks * 2.5 - 1.25)
        if st.misregister:
            k = _px(st.misregister, size)
            edge = np.roll(edge, (k, -k), (0, 1))
        if st.outline_role_colour:
            lines = np.where(edge[..., None], np.take(pal, roles, axis=0), np.float32(0))
            if st.glow:
                glow = _blur(lines, st.glow * size)
                out = out + glow * 1.6
            out = np.where(edge[..., None], lines, out)
        else:
            out = np.where(edge[..., None], ink, out)

    if st.grout:
        cell = pre.block_cell
        tone = rng.uniform(0.9, 1.08, (st.blocks, st.blocks, 1)).astype(np.float32)
        out = np.where(pattern[..., None], _rgb(st.grout), out * tone[cell[:, None], cell[None, :]])
    if st.noise:
        out = out + (_rolled(_noise(size)[0], rng) * st.noise)[..., None]
    return out


def _texture_seed(style: str, seed: int) -> int:
    return zlib.crc32(f"world-texture:{style}:{int(seed)}".encode())


def render(content: str, style: str, seed: int, size: int = 128) -> Image.Image:
    """`content` drawn in `style`: an RGB size x size picture whose layout comes from `seed` alone."""
    _check_content(content)
    st = _check_style(style)
    if size < 32:
        raise ValueError(f"size {size} is too small for the world's pictures; use 32 or more")
    roles = role_map(content, seed, size)
    pixels = _paint(roles, st, _texture_seed(style, seed))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def layout_seed(seed: int, index: int) -> int:
    """The layout seed of picture `index` of a run with `seed` (what `sample` uses)."""
    return int(seed) * 1_000_003 + int(index)


def sample(style: str, index: int, seed: int = 0, size: int = 128) -> tuple[Image.Image, str, str]:
    """Picture `index` of a stream in one style: (image, caption, content); content cycles the classes."""
    _check_style(style)
    content = CONTENT_CLASSES[index % len(CONTENT_CLASSES)]
    s = layout_seed(seed, index)
    return render(content, style, s, size), caption(content, s), content


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes with no timestamps or text chunks: the same picture gives the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def make_world_board(style: str, n: int, out_dir: str | os.PathLike, seed: int = 0, size: int = 256) -> list[Path]:
    """Write `n` pictures of `style` as 000.png, 001.png, ... with content-only captions 000.txt, ...

    Content cycles through the classes; deterministic bytes given the arguments. Returns the PNG paths.
    """
    _check_style(style)
    if n < 1:
        raise ValueError(f"a board needs at least 1 picture, got n={n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(n - 1)))
    paths = []
    for index in range(n):
        image, text, _ = sample(style, index, seed, size)
        path = out / f"{index:0{digits}d}.png"
        _write_atomic(path, png_bytes(image))
        _write_atomic(path.with_suffix(".txt"), (text + "\n").encode("utf-8"))
        paths.append(path)
    return paths


def board_contents(n: int) -> list[str]:
    """The content classes a world board of `n` pictures shows (`sample` cycles them), each once, in order."""
    if n < 1:
        raise ValueError(f"a board needs at least 1 picture, got n={n}")
    return list(CONTENT_CLASSES[: min(n, len(CONTENT_CLASSES))])


def contact_sheet(styles: tuple[str, ...] | list[str] | None = None, classes: tuple[str, ...] | list[str] | None = None,
                  seed: int = 0, size: int = 96, columns: int = 5) -> Image.Image:
    """One tile per style (all styles by default), each a row of `classes` in that style, tiles in `columns`.

    For looking at the world by eye: every class in a style, every style beside the others.
    """
    styles = list(STYLES) if styles is None else list(styles)
    classes = list(CONTENT_CLASSES[:4]) if classes is None else list(classes)
    for name in classes:
        _check_content(name)
    for name in styles:
        _check_style(name)
    gap = max(2, size // 16)
    tile_w, tile_h = size * len(classes), size
    rows = -(-len(styles) // columns)
    sheet = Image.new("RGB", (columns * (tile_w + gap) + gap, rows * (tile_h + gap) + gap), (255, 255, 255))
    for k, name in enumerate(styles):
        ox, oy = gap + (k % columns) * (tile_w + gap), gap + (k // columns) * (tile_h + gap)
        for j, content in enumerate(classes):
            sheet.paste(render(content, name, layout_seed(seed, k * len(classes) + j), size), (ox + j * size, oy))
    return sheet

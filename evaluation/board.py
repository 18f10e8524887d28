"""Procedural style boards: a set of pictures in one constant style over varied content.

`make_board("ukiyo", 12, "refs/")` writes `000.png ... 011.png` and a content-only caption beside each
(`000.txt`: "a house beside two trees under the sun"). The content (houses, trees, mountains, boats,
cats, faces, fish, towers, ...) changes from picture to picture while the palette and the rendering stay
the same, which is exactly what a style LoRA needs to learn a style and not a subject. Boards feed demos
and tests: they are real inputs for `train.dataset.load_refs` with no downloads.

How a picture is made: a scene is first drawn as a *role map* (each pixel says what it is: sky, ground,
water, subject body, roof, window, trunk, ...) with PIL primitives, at twice the output size. A style then
renders the role map: its palette gives each role a colour and its texture decides how regions and edges
look (flat with ink outlines, glowing outlines, dithered pastel, engraved hatching, mosaic tiles, ...).
The role map depends only on (seed, index), so the same seed gives the same scenes in every style.

Captions name what is in the picture and never how it looks (no colour, lighting, medium or mood words);
a test checks each one with `train.captions.lint_caption`.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# -- roles: what each pixel of a scene is -------------------------------------------------------------

SKY, GROUND, WATER, FAR, BODY, ROOF, ACCENT, DARK, LIGHT, FOLIAGE = range(10)
N_ROLES = 10

# -- scenes ---------------------------------------------------------------------------------------------

_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}


def _count(n: int, singular: str, plural: str | None = None) -> str:
    if n == 1:
        article = "an" if singular[0] in "aeiou" else "a"
        return f"{article} {singular}"
    return f"{_COUNT_WORDS[n]} {plural or singular + 's'}"


class _Canvas:
    """A role map being drawn: coordinates are fractions of the side, so scenes scale to any size."""

    def __init__(self, side: int):
        self.side = side
        self.image = Image.new("L", (side, side), SKY)
        self.draw = ImageDraw.Draw(self.image)

    def px(self, value: float) -> float:
        return value * self.side

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [self.px(x0), self.px(y0), self.px(x1), self.px(y1)]

    def points(self, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(self.px(x), self.px(y)) for x, y in pts]

    def rect(self, x0, y0, x1, y1, role):
        self.draw.rectangle(self.box(x0, y0, x1, y1), fill=role)

    def ellipse(self, cx, cy, rx, ry, role):
        self.draw.ellipse(self.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=role)

    def polygon(self, pts, role):
        self.draw.polygon(self.points(pts), fill=role)

    def line(self, pts, role, width):
        self.draw.line(self.points(pts), fill=role, width=max(1, round(self.px(width))), joint="curve")

    def arc(self, cx, cy, rx, ry, start, end, role, width):
        self.draw.arc(self.box(cx - rx, cy - ry, cx + rx, cy + ry), start, end, fill=role,
                      width=max(1, round(self.px(width))))


# Subjects. Each draws at (cx, base) with size s (fractions of the side); `base` is where it stands.

def _house(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    w, h = s, s * rng.uniform(0.6, 0.8)
    c.rect(cx - w / 2, base - h, cx + w / 2, base, BODY)
    c.polygon([(cx - w * 0.62, base - h), (cx, base - h - s * rng.uniform(0.4, 0.6)), (cx + w * 0.62, base - h)], ROOF)
    door_x = cx + rng.uniform(-0.2, 0.2) * w
    c.rect(door_x - w * 0.1, base - h * 0.5, door_x + w * 0.1, base, DARK)
    for wx in (cx - w * 0.3, cx + w * 0.3):
        if abs(wx - door_x) > w * 0.22:
            c.rect(wx - w * 0.09, base - h * 0.78, wx + w * 0.09, base - h * 0.55, ACCENT)


def _tree(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    c.rect(cx - s * 0.07, base - s * 0.6, cx + s * 0.07, base, DARK)
    if rng.random() < 0.5:  # a round tree
        c.ellipse(cx, base - s * 0.85, s * 0.38, s * 0.42, FOLIAGE)
    else:  # a pine
        for step in range(3):
            top = base - s * (1.3 - step * 0.28)
            half = s * (0.22 + step * 0.1)
            c.polygon([(cx - half, top + s * 0.4), (cx, top), (cx + half, top + s * 0.4)], FOLIAGE)


def _tower(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    h, w = s * 2.0, s * 0.36
    c.polygon([(cx - w / 2, base), (cx - w * 0.35, base - h), (cx + w * 0.35, base - h), (cx + w / 2, base)], BODY)
    for k in range(1, 4):
        y = base - h * k / 4
        c.rect(cx - w * 0.45, y - s * 0.06, cx + w * 0.45, y + s * 0.06, ROOF)
    c.rect(cx - w * 0.3, base - h - s * 0.22, cx + w * 0.3, base - h, ACCENT)
    c.polygon([(cx - w * 0.45, base - h - s * 0.22), (cx, base - h - s * 0.45), (cx + w * 0.45, base - h - s * 0.22)], DARK)


def _cat(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    face = rng.choice([-1, 1])
    c.ellipse(cx, base - s * 0.28, s * 0.42, s * 0.28, BODY)
    c.arc(cx - face * s * 0.55, base - s * 0.5, s * 0.2, s * 0.35, 90 - 90 * face, 270 - 90 * face, BODY, s * 0.07)
    hx, hy = cx + face * s * 0.38, base - s * 0.6
    c.ellipse(hx, hy, s * 0.2, s * 0.18, BODY)
    for ex in (hx - s * 0.15, hx + s * 0.15):
        c.polygon([(ex - s * 0.07, hy - s * 0.1), (ex, hy - s * 0.3), (ex + s * 0.07, hy - s * 0.1)], BODY)
    for ex in (hx - s * 0.07, hx + s * 0.07):
        c.ellipse(ex, hy - s * 0.02, s * 0.035, s * 0.045, ACCENT)


def _flower(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    top = base - s * rng.uniform(0.5, 0.8)
    c.line([(cx, base), (cx, top)], FOLIAGE, s * 0.05)
    c.ellipse(cx + s * 0.1, base - s * 0.25, s * 0.1, s * 0.05, FOLIAGE)
    for k in range(6):
        angle = k * math.pi / 3
        c.ellipse(cx + math.cos(angle) * s * 0.13, top + math.sin(angle) * s * 0.13, s * 0.09, s * 0.09, LIGHT)
    c.ellipse(cx, top, s * 0.08, s * 0.08, ACCENT)


def _boat(c: _Canvas, cx: float, base: float, s: float, rng: random.Random) -> None:
    c.polygon([(cx - s * 0.6, base - s * 0.2), (cx + s * 0.6, base - s * 0.2), (cx + s * 0.4, base + s * 0.05),
               (cx - s * 0.4, base + s * 0.05)], ROOF)
    c.line([(cx, base - s * 0.2), (cx, base - s * 1.2)], DARK, s * 0.04)
    c.polygon([(cx + s * 0.03, base - s * 1.15), (cx + s * 0.03, base - s * 0.28), (cx + s * 0.5, base - s * 0.28)], LIGHT)
    if rng.random() < 0.5:
        c.polygon([(cx - s * 0.03, base - s * 0.95), (cx - s * 0.03, base - s * 0.3), (cx - s * 0.38, base - s * 0.3)], LIGHT)


def _fish(c: _Canvas, cx: float, cy: float, s: float, rng: random.Random) -> None:
    face = rng.choice([-1, 1])
    c.polygon([(cx - face * s * 0.3, cy), (cx - face * s * 0.55, cy - s * 0.2), (cx - face * s * 0.55, cy + s * 0.2)], ROOF)
    c.ellipse(cx, cy, s * 0.38, s * 0.2, BODY)
    c.polygon([(cx - s * 0.05, cy - s * 0.16), (cx + face * s * 0.05, cy - s * 0.32), (cx + face * s * 0.15, cy - s * 0.14)], ROOF)
    c.ellipse(cx + face * s * 0.22, cy - s * 0.04, s * 0.05, s * 0.05, ACCENT)
    c.ellipse(cx + face * s * 0.23, cy - s * 0.04, s * 0.022, s * 0.022, DARK)


def _mountains(c: _Canvas, horizon: float, rng: random.Random) -> None:
    x = -0.1
    while x < 1.1:
        width = rng.uniform(0.3, 0.55)
        peak = horizon - rng.uniform(0.15, 0.35)
        c.polygon([(x, horizon), (x + width / 2, peak), (x + width, horizon)], FAR)
        cap = (horizon - peak) * 0.3
        c.polygon([(x + width / 2 - width * 0.15, peak + cap), (x + width / 2, peak),
                   (x + width / 2 + width * 0.15, peak + cap)], LIGHT)
        x += width * rng.uniform(0.6, 0.9)


def _sun(c: _Canvas, rng: random.Random) -> str:
    cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.22), rng.uniform(0.06, 0.09)
    for k in range(10):
        angle = k * math.pi / 5
        c.line([(cx + math.cos(angle) * r * 1.3, cy + math.sin(angle) * r * 1.3),
                (cx + math.cos(angle) * r * 1.8, cy + math.sin(angle) * r * 1.8)], ACCENT, 0.012)
    c.ellipse(cx, cy, r, r, ACCENT)
    return "under the sun"


def _moon(c: _Canvas, rng: random.Random) -> str:
    cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.2), rng.uniform(0.05, 0.08)
    c.ellipse(cx, cy, r, r, ACCENT)
    c.ellipse(cx + r * 0.45, cy - r * 0.2, r * 0.85, r * 0.85, SKY)
    return "under a crescent moon"


def _birds(c: _Canvas, rng: random.Random) -> str:
    n = rng.randint(2, 4)
    for _ in range(n):
        bx, by, w = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.3), rng.uniform(0.025, 0.04)
        c.line([(bx - w, by - w * 0.5), (bx, by), (bx + w, by - w * 0.5)], DARK, 0.01)
    return f"with {_COUNT_WORDS[n]} birds in the sky"


def _clouds(c: _Canvas, rng: random.Random) -> str:
    n = rng.randint(1, 3)
    for _ in range(n):
        cx, cy, w = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.28), rng.uniform(0.08, 0.14)
        for dx, dy, r in ((-0.6, 0.15, 0.45), (0.0, -0.1, 0.6), (0.6, 0.15, 0.45)):
            c.ellipse(cx + dx * w, cy + dy * w, r * w, r * w * 0.8, LIGHT)
    return "under clouds" if n > 1 else "under a cloud"


_SKY_OBJECTS = (_sun, _moon, _birds, _clouds)

# name, plural, draw, size range, "stands on the ground"
_LAND_SUBJECTS: dict[str, tuple[str, Callable, tuple[float, float]]] = {
    "house": ("houses", _house, (0.28, 0.4)),
    "tree": ("trees", _tree, (0.24, 0.32)),
    "tower": ("towers", _tower, (0.15, 0.2)),
    "cat": ("cats", _cat, (0.26, 0.36)),
    "flower": ("flowers", _flower, (0.24, 0.32)),
}


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} beside {phrases[1]}"
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def _land_scene(c: _Canvas, rng: random.Random) -> str:
    horizon = rng.uniform(0.58, 0.72)
    has_mountains = rng.random() < 0.5
    if has_mountains:
        _mountains(c, horizon, rng)
    hill = rng.random() < 0.4
    c.rect(0, horizon, 1, 1, GROUND)
    if hill:
        c.ellipse(rng.uniform(0.3, 0.7), horizon + 0.05, 0.55, 0.16, GROUND)
    sky_phrase = rng.choice(_SKY_OBJECTS)(c, rng)
    kinds = rng.sample(sorted(_LAND_SUBJECTS), rng.randint(1, 2))
    counts = {kind: (rng.randint(1, 3) if kind in ("tree", "flower") else 1) for kind in kinds}
    slots = sum(counts.values())
    xs = [(k + 0.5) / slots + rng.uniform(-0.04, 0.04) for k in range(slots)]
    rng.shuffle(xs)
    base = horizon + (0.9 - horizon) * rng.uniform(0.4, 0.8)
    for kind in kinds:
        plural, draw, (s_min, s_max) = _LAND_SUBJECTS[kind]
        for _ in range(counts[kind]):
            draw(c, xs.pop(), base + rng.uniform(-0.02, 0.02), rng.uniform(s_min, s_max), rng)
    subjects = _join([_count(counts[kind], kind, _LAND_SUBJECTS[kind][0]) for kind in kinds])
    ground = "on a hill" if hill else "in a field"
    tail = ", with mountains behind" if has_mountains else ""
    return f"{subjects} {ground} {sky_phrase}{tail}"


def _sea_scene(c: _Canvas, rng: random.Random) -> str:
    horizon = rng.uniform(0.5, 0.65)
    c.rect(0, horizon, 1, 1, WATER)
    sky_phrase = rng.choice(_SKY_OBJECTS)(c, rng)
    n_boats = rng.randint(1, 2)
    lighthouse = rng.random() < 0.5
    if lighthouse:
        x = rng.choice([0.18, 0.82])
        c.ellipse(x, horizon + 0.12, 0.16, 0.07, GROUND)
        _tower(c, x, horizon + 0.08, 0.15, rng)
    boat_xs = [0.5] if n_boats == 1 else [0.35, 0.65]
    for bx in boat_xs:
        _boat(c, bx + rng.uniform(-0.08, 0.08), horizon + rng.uniform(0.15, 0.28), rng.uniform(0.17, 0.24), rng)
    boats = _count(n_boats, "sailboat")
    if lighthouse:
        return f"{boats} on the sea near a lighthouse on a rock {sky_phrase}"
    return f"{boats} on the sea {sky_phrase}"


def _underwater_scene(c: _Canvas, rng: random.Random) -> str:
    c.rect(0, 0, 1, 1, WATER)
    c.rect(0, 0.88, 1, 1, GROUND)
    for _ in range(rng.randint(3, 5)):
        x = rng.uniform(0.05, 0.95)
        pts = [(x + 0.03 * math.sin(k * 1.3 + x * 9), 0.9 - k * 0.07) for k in range(rng.randint(4, 7))]
        c.line(pts, FOLIAGE, 0.025)
    for _ in range(rng.randint(4, 8)):
        r = rng.uniform(0.01, 0.025)
        c.ellipse(rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.5), r, r, LIGHT)
    n_fish = rng.randint(1, 3)
    for k in range(n_fish):
        _fish(c, (k + 0.5) / n_fish + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.32), rng)
    return f"{_count(n_fish, 'fish', 'fish')} swimming among seaweed with bubbles"


def _portrait_background(c: _Canvas, rng: random.Random) -> str:
    """A portrait's surroundings: sometimes a floor line, sometimes something in the sky behind the head."""
    parts = []
    if rng.random() < 0.5:
        c.rect(0, rng.uniform(0.78, 0.88), 1, 1, GROUND)
    if rng.random() < 0.6:
        parts.append(rng.choice(_SKY_OBJECTS)(c, rng))
    return (", " + " ".join(parts)) if parts else ""


def _cat_face(c: _Canvas, rng: random.Random) -> str:
    background = _portrait_background(c, rng)
    cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.52, 0.62), rng.uniform(0.22, 0.34)
    fur = rng.choice([BODY, LIGHT, ROOF])
    for side in (-1, 1):
        c.polygon([(cx + side * r * 0.9, cy - r * 0.35), (cx + side * r * 0.75, cy - r * 1.25),
                   (cx + side * r * 0.2, cy - r * 0.8)], fur)
    c.ellipse(cx, cy, r, r * 0.88, fur)
    closed_eyes = rng.random() < 0.35
    for side in (-1, 1):
        ex, ey = cx + side * r * 0.38, cy - r * 0.15
        if closed_eyes:
            c.arc(ex, ey - r * 0.1, r * 0.14, r * 0.12, 30, 150, DARK, 0.012)
        else:
            c.ellipse(ex, ey, r * 0.16, r * 0.2, ACCENT)
            c.ellipse(ex, ey, r * 0.05, r * 0.16, DARK)
        for dy in (-0.04, 0.06):
            c.line([(cx + side * r * 0.25, cy + r * (0.25 + dy)), (cx + side * r * 1.1, cy + r * (0.18 + dy * 2))],
                   DARK, 0.006)
    c.polygon([(cx - r * 0.1, cy + r * 0.12), (cx + r * 0.1, cy + r * 0.12), (cx, cy + r * 0.25)], ROOF if fur != ROOF else DARK)
    eyes = " with closed eyes" if closed_eyes else ""
    return f"the face of a cat{eyes}, close up{background}"


def _person_face(c: _Canvas, rng: random.Random) -> str:
    background = _portrait_background(c, rng)
    cx, cy, r = rng.uniform(0.38, 0.62), rng.uniform(0.44, 0.52), rng.uniform(0.17, 0.25)
    hair_role = rng.choice([DARK, ROOF, FAR])
    hair = rng.choice(["long hair", "short hair", "a bun"])
    c.ellipse(cx, 1.05, r * 1.8, 0.25, rng.choice([ROOF, FOLIAGE, WATER]))  # shoulders
    if hair == "long hair":
        c.rect(cx - r * 1.1, cy - r * 0.2, cx + r * 1.1, cy + r * 1.5, hair_role)
    if hair == "a bun":
        c.ellipse(cx, cy - r * 1.25, r * 0.4, r * 0.35, hair_role)
    c.ellipse(cx, cy - r * 0.2, r * 1.1, r * 1.0, hair_role)
    c.ellipse(cx, cy + r * 0.1, r * 0.85, r * 1.05, BODY)  # face
    glasses = rng.random() < 0.3
    for side in (-1, 1):
        c.ellipse(cx + side * r * 0.35, cy, r * 0.1, r * 0.07, DARK)
        c.ellipse(cx + side * r * 0.5, cy + r * 0.35, r * 0.12, r * 0.08, ACCENT)
        if glasses:
            c.arc(cx + side * r * 0.35, cy, r * 0.22, r * 0.18, 0, 360, DARK, 0.008)
    c.arc(cx, cy + r * 0.45, r * 0.3, r * 0.2, 20, 160, DARK, 0.012)
    extra = " and glasses" if glasses else ""
    return f"the face of a person with {hair}{extra}, shoulders visible{background}"


def _portrait_scene(c: _Canvas, rng: random.Random) -> str:
    return (_cat_face if rng.random() < 0.5 else _person_face)(c, rng)


_SCENES = (_land_scene, _sea_scene, _underwater_scene, _portrait_scene, _land_scene)


def draw_scene(seed: int, index: int, side: int) -> tuple[np.ndarray, str]:
    """The role map (side×side uint8) and the content caption of picture `index` of a board."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = _SCENES[(index + seed) % len(_SCENES)]
    canvas = _Canvas(side)
    caption = scene(canvas, rng)
    return np.asarray(canvas.image, dtype=np.uint8).copy(), caption


# -- rendering helpers ----------------------------------------------------------------------------------


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _palette(*hex_colours: str) -> np.ndarray:
    assert len(hex_colours) == N_ROLES, "one colour per role"
    return np.array([_rgb(c) for c in hex_colours], dtype=np.float32)


def _edges(roles: np.ndarray, width: int) -> np.ndarray:
    """Boolean mask of role boundaries, thickened to about `width` pixels."""
    edge = np.zeros(roles.shape, dtype=bool)
    edge[1:, :] |= roles[1:, :] != roles[:-1, :]
    edge[:, 1:] |= roles[:, 1:] != roles[:, :-1]
    if width > 1:
        size = width + 1 - width % 2  # MaxFilter needs an odd size
        mask = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
        edge = np.asarray(mask) > 127
    return edge


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:side, 0:side].astype(np.float32)


_BAYER_4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], dtype=np.float32) / 16 + 1 / 32


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# -- styles ---------------------------------------------------------------------------------------------


def _render_ukiyo(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat woodblock colours, thick indigo outlines, wave lines in water, a blue-to-cream graded sky (bokashi)."""
    side = roles.shape[0]
    y, x = _grid(side)
    out = palette[roles].copy()
    grade = np.clip(1 - y / (side * 0.45), 0, 1)[..., None] ** 1.5
    sky = roles == SKY
    out[sky] = (out * (1 - grade) + palette[WATER] * grade)[sky]
    period = side / 22
    wave = np.abs(((y + period * 0.35 * np.sin(x / side * 2 * math.pi * 6)) % period) - period / 2) < side / 300 + 0.8
    indigo = palette[DARK]
    out[(roles == WATER) & wave] = palette[LIGHT]
    sky_wave = wave & (roles == SKY) & ((y // period) % 3 == 0)
    out[sky_wave] = out[sky_wave] * 0.8 + indigo * 0.2
    out[_edges(roles, max(2, side // 110))] = indigo
    paper = rng.normal(0.0, 6.0, size=(side, side, 1))
    return out + paper


def _render_neon(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Near-black regions; every boundary is a saturated line with a soft glow around it."""
    side = roles.shape[0]
    y, x = _grid(side)
    base = palette[roles] * 0.12 + 8
    edge = _edges(roles, max(2, side // 170))
    lines = np.zeros_like(base)
    lines[edge] = palette[roles][edge]
    glow = np.asarray(_to_image(lines).filter(ImageFilter.GaussianBlur(side / 60)), dtype=np.float32)
    grid = ((x % (side / 16) < 1.2) | (y % (side / 16) < 1.2)) & np.isin(roles, (GROUND, WATER))
    base[grid] += palette[FAR] * 0.35
    return base + glow * 1.8 + lines


def _render_pastel(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft pastel fills, no outlines, an ordered 4×4 dither between each colour and a paler twin."""
    side = roles.shape[0]
    y, x = _grid(side)
    pale = palette * 0.55 + 255 * 0.45
    cell = 2  # dither cells of 2×2 pixels survive the half-size downsample as a visible pattern
    threshold = _BAYER_4[(y // cell).astype(int) % 4, (x // cell).astype(int) % 4]
    gradient = np.where(np.isin(roles, (SKY, WATER)), y / side, 0.35)
    use_pale = threshold < gradient
    return np.where(use_pale[..., None], pale[roles], palette[roles])


def _render_sepia(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Engraving: paper and one ink; each region is hatched at its own angle and density, dark ones cross-hatched."""
    side = roles.shape[0]
    y, x = _grid(side)
    paper, ink = palette[SKY], palette[DARK]
    # How dark each role engraves (0 = bare paper, 1 = solid ink) and the angle of its hatching.
    tone = np.array([0.05, 0.35, 0.45, 0.3, 0.25, 0.55, 0.15, 0.85, 0.0, 0.6], dtype=np.float32)
    angle = np.array([0, 20, 0, 60, 45, 135, 90, 45, 0, 110], dtype=np.float32) * math.pi / 180
    spacing = side / 64
    theta = angle[roles]
    along = (x * np.cos(theta) + y * np.sin(theta)) % spacing / spacing
    t = tone[roles]
    hatch = np.abs(along - 0.5) < t * 0.5
    cross_along = (x * np.cos(theta + math.pi / 2) + y * np.sin(theta + math.pi / 2)) % spacing / spacing
    hatch |= (t > 0.5) & (np.abs(cross_along - 0.5) < (t - 0.5) * 0.6)
    hatch |= _edges(roles, max(2, side // 200))
    grain = rng.normal(0.0, 5.0, size=(side, side, 1))
    return np.where(hatch[..., None], ink, paper) + grain


def _render_mosaic(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Square tiles, each one colour (the role under its centre), jittered in tone, with pale grout between."""
    side = roles.shape[0]
    tile = max(4, side // 40)
    centres = roles[tile // 2 :: tile, tile // 2 :: tile]
    jitter = rng.uniform(0.85, 1.12, size=centres.shape + (1,))
    tiles = palette[centres] * jitter
    out = np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1)[:side, :side]
    if out.shape[0] < side or out.shape[1] < side:  # side not a multiple of tile: pad with grout
        padded = np.empty((side, side, 3), dtype=np.float32)
        padded[:] = palette[LIGHT]
        padded[: out.shape[0], : out.shape[1]] = out
        out = padded
    y, x = _grid(side)
    grout = (y % tile < max(1, tile // 6)) | (x % tile < max(1, tile // 6))
    out[grout] = np.array(_rgb("#e8e2d4"), dtype=np.float32)
    return out


def _render_bauhaus(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat primaries, heavy black outlines, the sky cut into two blocks by a diagonal, striped water."""
    side = roles.shape[0]
    y, x = _grid(side)
    out = palette[roles].copy()
    second_block = (roles == SKY) & (x + y * 0.6 > side * 1.05)
    out[second_block] = palette[FAR] * 0.25 + palette[SKY] * 0.75
    stripes = (roles == WATER) & (y % (side / 12) < side / 48)
    out[stripes] = palette[DARK]
    out[_edges(roles, max(3, side // 70))] = np.array(_rgb("#111111"), dtype=np.float32)
    return out


def _render_blueprint(roles: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One deep blue ground, thin pale line-work on every boundary, and a faint measuring grid."""
    side = roles.shape[0]
    y, x = _grid(side)
    blue = palette[SKY]
    out = np.empty((side, side, 3), dtype=np.float32)
    out[:] = blue
    out += (palette[roles] - blue) * 0.18  # regions barely differ: the lines carry the drawing
    fine = (x % (side / 32) < 1) | (y % (side / 32) < 1)
    out[fine] = out[fine] * 0.8 + palette[LIGHT] * 0.2
    out[_edges(roles, max(2, side // 220))] = palette[LIGHT]
    return out


@dataclass(frozen=True)
class BoardStyle:
    name: str
    description: str
    palette: np.ndarray  # one RGB per role: SKY GROUND WATER FAR BODY ROOF ACCENT DARK LIGHT FOLIAGE
    render: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


BOARD_STYLES: dict[str, BoardStyle] = {
    style.name: style
    for style in (
        BoardStyle("ukiyo", "woodblock print: flat indigo, cream and vermilion, thick outlines, wave lines",
                   _palette("#efe3c6", "#b9a27a", "#2e4f86", "#5f7fa8", "#e6d3a8", "#c0432f", "#e9b949",
                            "#1c2747", "#f6efdc", "#4f6b3a"), _render_ukiyo),
        BoardStyle("neon", "dark ground, saturated glowing outlines and a synthwave grid",
                   _palette("#14102a", "#2a0f3a", "#0c2238", "#8a2be2", "#ff2fd0", "#00e5ff", "#fff03a",
                            "#ff6a00", "#7dff4f", "#39ff88"), _render_neon),
        BoardStyle("pastel", "soft pastel fills without outlines, ordered dither texture",
                   _palette("#c9e4f6", "#cdeccf", "#a9d8e8", "#d9c8ee", "#f8c8d8", "#f6d7a8", "#fff1a8",
                            "#9d8fb8", "#fdf6ee", "#b5e3b0"), _render_pastel),
        BoardStyle("sepia", "engraving: brown ink hatching and cross-hatching on aged paper",
                   # Only paper (SKY) and ink (DARK) are printed; the other roles list their tint for reference.
                   _palette("#f1e4c8", "#a88a66", "#947452", "#b89c78", "#c2a784", "#7c5a3c", "#d8c3a0",
                            "#4a2e1a", "#f1e4c8", "#6f5238"), _render_sepia),
        BoardStyle("mosaic", "square tesserae in terracotta, ochre and teal with pale grout",
                   _palette("#4f9aa8", "#b5652d", "#1f6f7a", "#7a8c5a", "#d9a441", "#a8322d", "#f2d16b",
                            "#3a2a20", "#efe6cf", "#587d3c"), _render_mosaic),
        BoardStyle("bauhaus", "flat red, yellow, blue and black shapes with heavy outlines on off-white",
                   _palette("#f5f1e8", "#1d4e89", "#f7b801", "#d62828", "#f7b801", "#d62828", "#f5f1e8",
                            "#111111", "#ffffff", "#1d4e89"), _render_bauhaus),
        BoardStyle("blueprint", "deep blue sheet, thin pale line-work and a measuring grid",
                   _palette("#1d4a87", "#24589c", "#1a4380", "#2b63a8", "#3470b8", "#2960a4", "#4a86cc",
                            "#163a6e", "#e8f1fb", "#285c9f"), _render_blueprint),
    )
}


# -- the board ------------------------------------------------------------------------------------------


def render_picture(style: str, seed: int, index: int, size: int = 256) -> tuple[Image.Image, str]:
    """Picture `index` of a board: the RGB image (size×size) and its content-only caption."""
    board_style = _style(style)
    side = size * 2  # draw and texture at 2× and downsample once: smooth edges, crisp textures
    roles, caption = draw_scene(seed, index, side)
    texture_rng = np.random.default_rng([seed, index, sorted(BOARD_STYLES).index(style)])
    pixels = board_style.render(roles, board_style.palette, texture_rng)
    image = _to_image(pixels).resize((size, size), Image.Resampling.LANCZOS)
    return image, caption


def _style(style: str) -> BoardStyle:
    if style not in BOARD_STYLES:
        raise ValueError(f"unknown board style {style!r}; known styles: {', '.join(sorted(BOARD_STYLES))}")
    return BOARD_STYLES[style]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_board(style: str, n: int, out_dir: str | os.PathLike, size: int = 256, seed: int = 0) -> list[Path]:
    """Write `n` pictures of one style as `000.png`, `001.png`, ... with `000.txt`, ... captions beside them.

    Deterministic given (style, n, size, seed). Returns the PNG paths in order. Existing files with the same
    names are replaced; nothing else in `out_dir` is touched.
    """
    _style(style)
    if n < 1:
        raise ValueError(f"a board needs at least 1 picture, got n={n}")
    if size < 64:
        raise ValueError(f"size {size} is too small to draw a scene; use 256 or more (the dataset minimum is 256)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(n - 1)))
    paths = []
    for index in range(n):
        image, caption = render_picture(style, seed, index, size)
        png_path = out / f"{index:0{digits}d}.png"
        buffer = _png_bytes(image)
        _write_atomic(png_path, buffer)
        _write_atomic(png_path.with_suffix(".txt"), (caption + "\n").encode("utf-8"))
        paths.append(png_path)
    return paths


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)  # no timestamps or text chunks: same bytes every run
    return buffer.getvalue()

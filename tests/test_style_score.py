"""Style score: palette + Gram distance from a seeded random conv net; lower = closer in style."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photographs")

from klein.style_score import StyleScorer, gram_distance, palette_distance, style_distance  # noqa: E402

WARM = [(60, 20, 10), (200, 80, 30), (250, 220, 170)]
COOL = [(10, 20, 60), (30, 120, 140), (200, 230, 240)]
REF_CONTENT = ["astronaut", "coffee", "chelsea"]
NEW_CONTENT = ["rocket", "immunohistochemistry", "camera"]


def luminance(name: str, size: int = 192) -> np.ndarray:
    image = Image.fromarray(getattr(skimage_data, name)()).convert("L").resize((size, size))
    return np.asarray(image, dtype=np.float32) / 255


def duotone(lum: np.ndarray, stops) -> np.ndarray:
    stops = np.array(stops, dtype=np.float32) / 255
    x = lum * (len(stops) - 1)
    i = np.clip(x.astype(int), 0, len(stops) - 2)
    t = (x - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


def render(name: str, palette, hatched: bool) -> Image.Image:
    """A photo's content in a style: a palette mapped onto luminance, and posterised hatching or a soft blur."""
    lum = luminance(name)
    if hatched:
        lum = np.round(lum * 5) / 5
        yy, xx = np.mgrid[: lum.shape[0], : lum.shape[1]]
        lum = np.clip(lum - ((xx + yy) % 10 < 5) * 0.2, 0, 1)
    image = Image.fromarray((duotone(lum, palette) * 255).astype(np.uint8))
    return image if hatched else image.filter(ImageFilter.GaussianBlur(2))


@pytest.fixture(scope="module")
def scorer() -> StyleScorer:
    return StyleScorer([render(n, WARM, hatched=True) for n in REF_CONTENT])


def test_same_style_new_content_scores_clearly_closer(scorer):
    same_style = [render(n, WARM, hatched=True) for n in NEW_CONTENT]
    other_style = [render(n, COOL, hatched=False) for n in NEW_CONTENT]
    same = scorer.distances(same_style)
    other = scorer.distances(other_style)
    # content held equal, the refs' style always wins
    assert all(s < o for s, o in zip(same, other)), (same, other)
    assert np.mean(same) < 0.75 * np.mean(other)
    # untouched photographs of the same subjects are not in the style either
    photos = [Image.fromarray(getattr(skimage_data, n)()) for n in NEW_CONTENT]
    assert np.mean(same) < 0.75 * scorer.distance(photos)


def test_components_separate_palette_from_texture(scorer):
    same = scorer.components([render(n, WARM, hatched=True) for n in NEW_CONTENT])
    other_palette = scorer.components([render(n, COOL, hatched=True) for n in NEW_CONTENT])
    other_texture = scorer.components([render(n, WARM, hatched=False) for n in NEW_CONTENT])
    assert other_palette["palette"] > 2 * same["palette"]  # the palette term sees the colours
    assert other_texture["palette"] < 1.5 * same["palette"]
    assert other_texture["gram"] > 1.15 * same["gram"]  # the Gram term sees the texture
    assert other_texture["total"] > same["total"] and other_palette["total"] > same["total"]


def test_functions_match_the_scorer_and_are_deterministic(scorer):
    refs = [render(n, WARM, hatched=True) for n in REF_CONTENT]
    images = [render(n, COOL, hatched=False) for n in NEW_CONTENT[:2]]
    components = scorer.components(images)
    assert style_distance(images, refs) == pytest.approx(components["total"], rel=1e-6)
    assert palette_distance(images, refs) == pytest.approx(components["palette"], rel=1e-6)
    assert gram_distance(images, refs) == pytest.approx(components["gram"], rel=1e-6)
    np.random.seed(1)  # the global RNGs' state must not reach the score: its projections and net are seeded
    first = style_distance(images, refs)
    np.random.seed(2)
    torch.manual_seed(2)
    assert style_distance(images, refs) == first
    assert StyleScorer(refs, seed=1).distance(images) != pytest.approx(components["total"], rel=1e-9)


def test_refs_are_close_to_themselves(scorer):
    refs = [render(n, WARM, hatched=True) for n in REF_CONTENT]
    assert scorer.components(refs)["palette"] < 0.05


def test_any_image_mode_and_size(scorer):
    rgba = render("rocket", WARM, hatched=True).convert("RGBA")
    grey = render("rocket", WARM, hatched=True).convert("L")
    tiny = render("rocket", WARM, hatched=True).resize((40, 24))
    for image in (rgba, grey, tiny):
        assert np.isfinite(scorer.distance([image]))
    with pytest.raises(ValueError, match="at least one reference"):
        StyleScorer([])
    with pytest.raises(ValueError, match="at least one image"):
        scorer.distance([])

"""evaluation/world: the procedural world (content classes x styles) that the mini model learns and is judged on."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from PIL import Image

from evaluation.world import (
    BODY,
    CONTENT_CLASSES,
    HELDOUT_STYLES,
    PRETRAIN_STYLES,
    STYLES,
    WorldStyle,
    caption,
    contact_sheet,
    layout,
    layout_seed,
    make_world_board,
    render,
    role_map,
    sample,
)
from train.captions import lint_caption
from train.dataset import load_refs, near_duplicate_pairs

REQUIRED_CLASSES = ("lighthouse", "house", "boat", "cat", "fish", "tree", "mountain", "sun", "bird", "car",
                    "flower", "person")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_classes_styles_and_splits():
    assert set(REQUIRED_CLASSES) <= set(CONTENT_CLASSES) and len(set(CONTENT_CLASSES)) == len(CONTENT_CLASSES)
    assert len(STYLES) >= 20
    assert len(PRETRAIN_STYLES) >= 16 and len(HELDOUT_STYLES) >= 4
    assert not set(PRETRAIN_STYLES) & set(HELDOUT_STYLES)
    assert set(PRETRAIN_STYLES) | set(HELDOUT_STYLES) <= set(STYLES)
    for name, style in STYLES.items():
        assert isinstance(style, WorldStyle) and style.name == name and style.description
    # Every style is its own recipe: no two share palette AND texture AND background treatment.
    recipes = {(s.palette, s.texture, s.background, s.blocks) for s in STYLES.values()}
    assert len(recipes) == len(STYLES)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known classes: lighthouse"):
        render("dragon", "flat", 0)
    with pytest.raises(ValueError, match="known styles: .*stained_glass"):
        render("cat", "baroque", 0)
    with pytest.raises(ValueError, match="known classes"):
        caption("dragon", 0)
    with pytest.raises(ValueError, match="known styles"):
        sample("baroque", 0)


def test_every_class_renders_in_every_style_with_a_visible_subject():
    for content, style in itertools.product(CONTENT_CLASSES, STYLES):
        image = render(content, style, seed=3, size=64)
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = _pixels(image)
        subject = role_map(content, 3, 64) >= BODY
        assert subject.mean() > 0.02, content
        # The subject stands out from its surroundings: its mean colour differs from the rest's.
        contrast = np.abs(pixels[subject].mean(0) - pixels[~subject].mean(0)).max()
        assert contrast > 12, (content, style, contrast)


def test_same_arguments_same_bytes_and_seeds_differ():
    for style in ("flat", "watercolour", "crayon", "risograph", "mosaic"):
        a = render("cat", style, 11).tobytes()
        assert a == render("cat", style, 11).tobytes()
        assert a != render("cat", style, 12).tobytes()


def test_layout_varies_with_seed():
    layouts = [layout("house", seed) for seed in range(40)]
    assert len({(round(lay.cx, 4), round(lay.scale, 4)) for lay in layouts}) == 40
    assert {lay.flip for lay in layouts} == {True, False}
    assert max(lay.tilt for lay in layouts) > 5 and min(lay.tilt for lay in layouts) < -5
    assert {lay.side_word for lay in layouts} == {"left", "", "right"}
    assert {lay.size_word for lay in layouts} == {"small", "", "large"}
    maps = [role_map("house", seed, 64).tobytes() for seed in range(10)]
    assert len(set(maps)) == 10
    # The layout is the same in every style: the style never moves the content.
    first = render("boat", "flat", 5, 64)
    assert all((_pixels(render("boat", style, 5, 64)) != _pixels(first)).any() for style in STYLES if style != "flat")


def test_captions_are_content_only_and_match_the_drawing():
    areas: dict[str, dict[str, list[float]]] = {c: {"small": [], "": [], "large": []} for c in CONTENT_CLASSES}
    for content, seed in itertools.product(CONTENT_CLASSES, range(30)):
        text = caption(content, seed)
        assert content in text.split() and lint_caption(text) == [], text
        assert caption(content, seed) == text
        subject = role_map(content, seed, 96) >= BODY
        xs = np.nonzero(subject)[1]
        centre = (xs.mean() + 0.5) / 96
        if text.endswith("on the left"):
            assert centre < 0.5, (text, centre)
        elif text.endswith("on the right"):
            assert centre > 0.5, (text, centre)
        else:
            assert 0.3 < centre < 0.7, (text, centre)
        size_word = "small" if " small " in text else "large" if " large " in text else ""
        areas[content][size_word].append(subject.mean())
    for content, by_word in areas.items():
        assert max(by_word["small"]) < min(by_word["large"]), content
        assert max(by_word["small"]) < max(by_word[""]) < max(by_word["large"]), content


def test_sample_cycles_the_classes_and_board_files_are_deterministic(tmp_path):
    for index in range(len(CONTENT_CLASSES) + 2):
        image, text, content = sample("stained_glass", index, seed=4, size=64)
        assert content == CONTENT_CLASSES[index % len(CONTENT_CLASSES)]
        assert text == caption(content, layout_seed(4, index))
        assert image.tobytes() == render(content, "stained_glass", layout_seed(4, index), 64).tobytes()
    first = make_world_board("risograph", 5, tmp_path / "a", seed=2, size=96)
    again = make_world_board("risograph", 5, tmp_path / "b", seed=2, size=96)
    assert [p.name for p in first] == [f"{k:03d}.png" for k in range(5)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [f"{k:03d}.png" for k in range(5)] + [f"{k:03d}.txt" for k in range(5)])  # no temporary files left
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".txt").read_bytes() == b.with_suffix(".txt").read_bytes()
        text = a.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert lint_caption(text) == []
        with Image.open(a) as image:
            assert image.size == (96, 96) and image.mode == "RGB"


def test_rendering_is_fast():
    for style in STYLES:  # warm the per-style caches
        render("cat", style, 0)
    pairs = list(itertools.product(CONTENT_CLASSES, STYLES))
    passes = []
    for _ in range(3):  # the best of three: a loaded machine slows a pass, it never speeds one up
        start = time.process_time()
        for k, (content, style) in enumerate(pairs):
            render(content, style, k)
        passes.append(time.process_time() - start)
    per_image_ms = min(passes) / len(pairs) * 1000
    assert per_image_ms < 6.0, f"{per_image_ms:.2f} ms per 128x128 picture (budget 3 ms, tested with margin)"


def test_geometry_is_resolution_independent():
    """Sizes, outlines and texture periods are fractions of the side: 256 px downsampled looks like 128 px."""
    pairs = (("lighthouse", "comic"), ("cat", "engraving"), ("car", "pixel"), ("fish", "neon"),
             ("boat", "stained_glass"), ("house", "cross_stitch"), ("tree", "crayon"), ("bird", "watercolour"),
             ("cat", "woodcut"), ("person", "newsprint"))
    for content, style in pairs:
        # Compared at 32 px: grain and crayon gaps are random per pixel, so only their average matches.
        big = render(content, style, 9, 256).resize((32, 32), Image.Resampling.BOX)
        small = render(content, style, 9, 128).resize((32, 32), Image.Resampling.BOX)
        assert np.abs(_pixels(big) - _pixels(small)).mean() < 6.5, (content, style)


def _style_features(image: Image.Image) -> np.ndarray:
    """Colour histogram (8 levels per channel, square-rooted) + edge energy at full and half resolution."""
    pixels = _pixels(image)
    q = (pixels // 32).astype(int)
    hist = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512) / q[..., 0].size
    grey = pixels.mean(-1)
    half = _pixels(image.reduce(2)).mean(-1)
    texture = [np.abs(np.diff(g, axis=a)).mean() / 32 for g in (grey, half) for a in (0, 1)]
    return np.concatenate([np.sqrt(hist), texture])


@pytest.mark.parametrize("blurred", [False, True])
def test_styles_are_separable_by_a_simple_statistic(blurred):
    def picture(style, index, seed):
        image, _, _ = sample(style, index, seed=seed, size=128)
        if blurred:  # blurred by 2x: the styles stay apart at the resolution a small model sees
            image = image.resize((64, 64), Image.Resampling.BOX).resize((128, 128), Image.Resampling.BILINEAR)
        return image

    names = list(STYLES)
    n = len(CONTENT_CLASSES)
    centroids = np.stack([np.mean([_style_features(picture(s, k, 1)) for k in range(n)], 0) for s in names])
    wrong = []
    for i, style in enumerate(names):
        for k in range(0, n, 2):
            distance = np.linalg.norm(centroids - _style_features(picture(style, k, 2)), axis=1)
            if distance.argmin() != i:
                wrong.append((style, CONTENT_CLASSES[k], names[distance.argmin()]))
    assert wrong == []


def test_contact_sheet_shows_every_style(tmp_path):
    sheet = contact_sheet(classes=("lighthouse", "cat", "boat", "person"), size=64)
    assert sheet.size[0] > 5 * 4 * 64 and sheet.size[1] > 4 * 64
    sheet.save(tmp_path / "sheet.png")
    tile = _pixels(sheet)[4:68, 4:68]
    assert tile.std() > 10


def test_a_world_board_is_a_valid_set_of_refs(tmp_path):
    """The demo trains LoRAs on world boards: they load as refs with their captions and no near-duplicates."""
    make_world_board(HELDOUT_STYLES[0], 12, tmp_path, seed=0, size=256)
    refset = load_refs(tmp_path)
    assert len(refset.refs) == 12 and all(ref.sidecar_caption for ref in refset.refs)
    assert near_duplicate_pairs(refset.refs) == []

"""evaluation/board: procedural style boards (constant style, varied content, content-only captions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from evaluation.board import BOARD_STYLES, make_board, render_picture
from train.captions import lint_caption
from train.dataset import load_refs, near_duplicate_pairs


def _colour_histogram(image: Image.Image) -> np.ndarray:
    """512-bin RGB histogram (8 levels per channel), normalised."""
    levels = np.asarray(image.convert("RGB")) // 32
    index = (levels[..., 0].astype(int) * 8 + levels[..., 1]) * 8 + levels[..., 2]
    counts = np.bincount(index.ravel(), minlength=512).astype(float)
    return counts / counts.sum()


def test_there_are_at_least_six_described_styles():
    assert len(BOARD_STYLES) >= 6
    for name, style in BOARD_STYLES.items():
        assert style.name == name and style.description
        assert style.palette.shape == (10, 3)


@pytest.mark.parametrize("style", sorted(BOARD_STYLES))
def test_board_files_captions_and_loading(style, tmp_path):
    paths = make_board(style, 6, tmp_path / style, size=256, seed=1)
    assert [p.name for p in paths] == [f"{k:03d}.png" for k in range(6)]
    assert sorted(p.name for p in (tmp_path / style).iterdir()) == sorted(
        [f"{k:03d}.png" for k in range(6)] + [f"{k:03d}.txt" for k in range(6)])
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (256, 256) and image.mode == "RGB"
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption and lint_caption(caption) == [], (path.name, caption)
    refset = load_refs(tmp_path / style)  # a board is a valid set of refs, with its captions attached
    assert len(refset.refs) == 6
    assert all(ref.sidecar_caption for ref in refset.refs)
    assert near_duplicate_pairs(refset.refs) == []


def test_every_caption_of_many_boards_is_content_only():
    for seed, index in itertools.product(range(4), range(25)):
        _, caption = render_picture("ukiyo", seed, index, size=64)
        assert lint_caption(caption) == [], caption


def test_deterministic_given_seed(tmp_path):
    first = make_board("neon", 3, tmp_path / "a", seed=7)
    again = make_board("neon", 3, tmp_path / "b", seed=7)
    other = make_board("neon", 3, tmp_path / "c", seed=8)
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()
    assert any(a.read_bytes() != c.read_bytes() for a, c in zip(first, other))


def test_content_varies_within_a_board():
    captions = [render_picture("pastel", 0, index, size=64)[1] for index in range(12)]
    assert len(set(captions)) >= 8, captions
    kinds = " ".join(captions)
    for subject in ("house", "tree", "sailboat", "fish", "face"):
        assert subject in kinds or subject + "s" in kinds, (subject, captions)


def test_styles_are_distinct_and_constant():
    """Each picture's colours are closest to its own style's average: the style, not the content, decides them."""
    styles = sorted(BOARD_STYLES)
    histograms = {style: [_colour_histogram(render_picture(style, 2, i, size=128)[0]) for i in range(10)]
                  for style in styles}
    centroids = {style: np.mean(histograms[style], axis=0) for style in styles}
    for a, b in itertools.combinations(styles, 2):
        assert np.abs(centroids[a] - centroids[b]).sum() > 0.8, (a, b)
    for style in styles:
        for index, histogram in enumerate(histograms[style]):
            nearest = min(styles, key=lambda s: np.abs(histogram - centroids[s]).sum())
            assert nearest == style, f"{style} picture {index} looks like {nearest}"


def test_same_scene_differs_between_styles():
    pictures = {style: np.asarray(render_picture(style, 0, 1, size=128)[0], dtype=float) for style in BOARD_STYLES}
    for a, b in itertools.combinations(sorted(pictures), 2):
        assert np.abs(pictures[a] - pictures[b]).mean() > 20, (a, b)


def test_unknown_style_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as caught:
        make_board("cubism", 3, tmp_path)
    message = str(caught.value)
    assert "unknown board style 'cubism'" in message
    for name in BOARD_STYLES:
        assert name in message
    assert not tmp_path.joinpath("000.png").exists()


def test_bad_counts_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="at least 1 picture"):
        make_board("ukiyo", 0, tmp_path)
    with pytest.raises(ValueError, match="too small"):
        make_board("ukiyo", 2, tmp_path, size=32)


def test_other_files_in_the_folder_are_left_alone(tmp_path):
    keep = tmp_path / "notes.md"
    keep.write_text("mine")
    make_board("mosaic", 2, tmp_path, size=128)
    assert keep.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

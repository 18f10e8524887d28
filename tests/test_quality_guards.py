"""The caption lint where the product calls it, on the spellings captions really come in: capitalised at the
start of a sentence ("Watercolor painting of a cat") and hyphenated compounds ("Black-and-white photo of ...",
"Sun-drenched street"). Two places use it: a sidecar caption in the refs (train.dataset.load_refs warns, naming
the words) and a Gemini caption (gemini.captions.caption_images asks again, then cuts the words).
"""

from __future__ import annotations

import pytest
from gemini_server import GeminiProtocolServer, client_for  # tests/ is on sys.path
from PIL import Image

from gemini.captions import caption_images
from evaluation.board import make_board
from train.dataset import load_refs

TRIGGER = "zxy_guard"

# (caption, a word the lint must name, its kind); hyphenated style words are not in the list today
CASES = [
    pytest.param("Watercolor painting of a cat", "watercolor", "medium", id="capitalised-medium"),
    pytest.param("A MOODY street at night", "moody", "mood", id="upper-case-mood"),
    pytest.param("Cat on a Blue sofa", "blue", "colour", id="capitalised-colour"),
    pytest.param("Black-and-white photo of a dog", "black-and-white", "colour", id="hyphenated-colour"),
    pytest.param("Sun-drenched street", "sun-drenched", "lighting", id="hyphenated-lighting"),
]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard-board")
    make_board("neon", 5, out, size=256, seed=0)
    return out


@pytest.mark.parametrize("caption,word,kind", CASES)
def test_a_sidecar_caption_with_a_style_word_is_flagged_by_load_refs(board, caption, word, kind):
    (board / "002.txt").write_text(caption + "\n")
    try:
        refs = load_refs(board)
    finally:
        make_board("neon", 5, board, size=256, seed=0)  # the board's own content-only captions back
    flagged = {r.name: r.warnings for r in refs.refs}
    others = [w for name, ws in flagged.items() if not name.startswith("002") for w in ws]
    assert not any("how the picture looks" in w for w in others), others
    lint = [w for name, ws in flagged.items() if name.startswith("002") for w in ws if "how the picture looks" in w]
    assert lint, flagged
    assert f"{kind}: " in lint[0] and word in lint[0].lower(), lint[0]


@pytest.mark.parametrize("caption,word,kind", CASES)
def test_a_gemini_caption_with_a_style_word_is_asked_again_then_cut(caption, word, kind):
    with GeminiProtocolServer() as server:
        server.responder = lambda request: {"caption": caption}
        result = caption_images([Image.new("RGB", (48, 48), (90, 120, 200))], ["a.png"], TRIGGER,
                                client=client_for(server))
        asked = len(server.requests)
    assert asked == 2, "the validator did not ask Gemini again about the style words"
    [warning] = result.warnings
    assert "kept style words" in warning and word in warning.lower(), warning
    final = result.captions["a.png"]
    assert final.startswith(f"{TRIGGER}. ") and word not in final.lower(), final

"""Captions: Gemini through the local protocol server, the style-word validator, sidecars, offline fallback."""

from __future__ import annotations

import pytest
from PIL import Image

from gemini.captions import caption_images, remove_style_words, with_trigger
from gemini.client import GeminiClient, GeminiConfig
from gemini.policy import text_stage_policy
from gemini.style_words import find_style_words

try:
    from tests.gemini_server import Action, GeminiProtocolServer, client_for, decode_image
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import Action, GeminiProtocolServer, client_for, decode_image

TRIGGER = "klnstyle"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CONTENT = {
    "red": "a fox sitting on a rock",
    "green": "a man reading a newspaper on a bench",
    "blue": "a boat on a lake",
}


def square(colour: str) -> Image.Image:
    return Image.new("RGB", (48, 48), COLOURS[colour])


def colour_of(request) -> str:
    """Which test image a request carried (the squares differ by their dominant channel)."""
    [(_, data)] = request.images
    r, g, b = decode_image(data).getpixel((24, 24))
    return ["red", "green", "blue"][max(range(3), key=lambda i: (r, g, b)[i])]


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


def test_gemini_captions_are_content_only_with_the_trigger(server):
    server.responder = lambda request: {"caption": CONTENT[colour_of(request)]}
    names = ["a.jpg", "b.jpg", "c.jpg"]
    result = caption_images([square(c) for c in COLOURS], names, TRIGGER, client=client_for(server))
    assert result.captions == {
        "a.jpg": f"{TRIGGER}. a fox sitting on a rock",
        "b.jpg": f"{TRIGGER}. a man reading a newspaper on a bench",
        "c.jpg": f"{TRIGGER}. a boat on a lake",
    }
    assert set(result.sources.values()) == {"gemini"}
    assert result.warnings == [] and result.model == "gemini-2.5-pro"
    assert len(server.requests) == 3
    assert all(
        r.schema_title == "CaptionAnswer" and "never describe how" in r.system_text.lower() for r in server.requests
    )


def test_trigger_is_not_doubled_when_gemini_adds_it(server):
    server.push_json({"caption": f"{TRIGGER}, a fox sitting on a rock"})
    result = caption_images([square("red")], ["a.png"], TRIGGER, client=client_for(server))
    assert result.captions["a.png"] == f"{TRIGGER}. a fox sitting on a rock"


def test_validator_asks_once_more_naming_the_style_words(server):
    server.push_json({"caption": "a moody watercolor painting of a red fox at golden hour"})
    server.push_json({"caption": "a fox sitting on a rock"})
    result = caption_images([square("red")], ["fox.png"], TRIGGER, client=client_for(server))
    assert result.items[0].caption == f"{TRIGGER}. a fox sitting on a rock"
    assert result.items[0].source == "gemini" and result.items[0].warnings == []
    retry = server.requests[1].prompt_text
    for word in ("moody", "watercolor", "painting", "red"):
        assert word in retry


def test_style_words_surviving_the_retry_are_cut_out(server):
    server.push_json({"caption": "a red fox in dramatic lighting"})
    server.push_json({"caption": "a red fox on a rock, cinematic"})
    result = caption_images([square("red")], ["fox.png"], TRIGGER, client=client_for(server))
    item = result.items[0]
    assert item.caption == f"{TRIGGER}. a fox on a rock"
    assert find_style_words(item.caption) == []
    assert "removed red, cinematic" in item.warnings[0]
    assert len(server.requests) == 2


def test_sidecar_always_wins_and_gets_the_trigger(server):
    server.responder = lambda request: {"caption": CONTENT[colour_of(request)]}
    sidecars = {
        "a.jpg": "a fox in the snow",  # no trigger: prepended
        "b": f"{TRIGGER}. an old man feeding pigeons",  # keyed by stem, trigger already there
        "c.txt": "a pink boat at sunset",  # style words: kept, with a warning
    }
    result = caption_images(
        [square(c) for c in COLOURS], ["a.jpg", "b.jpg", "c.jpg"], TRIGGER, sidecars=sidecars, client=client_for(server)
    )
    assert result.captions == {
        "a.jpg": f"{TRIGGER}. a fox in the snow",
        "b.jpg": f"{TRIGGER}. an old man feeding pigeons",
        "c.jpg": f"{TRIGGER}. a pink boat at sunset",
    }
    assert set(result.sources.values()) == {"sidecar"}
    assert server.requests == []  # sidecars cost no Gemini call
    assert any("pink (colour)" in w for w in result.warnings)


def test_mixed_sidecars_and_gemini_keep_order(server):
    server.responder = lambda request: {"caption": CONTENT[colour_of(request)]}
    result = caption_images(
        [square(c) for c in COLOURS], ["r", "g", "b"], TRIGGER, sidecars={"g": "a dog"}, client=client_for(server)
    )
    assert [i.name for i in result.items] == ["r", "g", "b"]
    assert result.sources == {"r": "gemini", "g": "sidecar", "b": "gemini"}
    assert len(server.requests) == 2


def test_without_a_key_captions_are_trigger_only_with_a_warning():
    client = GeminiClient(GeminiConfig.from_env({}))
    result = caption_images(
        [square("red"), square("blue")], ["a", "b"], TRIGGER, sidecars={"b": "a boat"}, client=client
    )
    assert result.captions == {"a": TRIGGER, "b": f"{TRIGGER}. a boat"}
    assert result.sources == {"a": "offline", "b": "sidecar"}
    assert "GEMINI_API_KEY" in result.warnings[0] and "generalise" in result.warnings[0]


def test_policy_skips_gemini_for_tiny_datasets(server):
    server.responder = lambda request: {"caption": "should not be asked"}
    policy = text_stage_policy(2)
    result = caption_images(
        [square("red"), square("blue")], ["a", "b"], TRIGGER, client=client_for(server), policy=policy
    )
    assert result.captions == {"a": TRIGGER, "b": TRIGGER}
    assert server.requests == []
    assert "1–3 refs" in result.warnings[0]
    assert result.to_manifest()["captions"]["policy"]["use_gemini"] is False


def test_one_failing_image_never_fails_the_job(server):
    # The blocked answer goes to the green square, whatever order the caption threads run in.
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}}
    server.responder = lambda request: (
        Action(body=blocked) if colour_of(request) == "green" else {"caption": CONTENT[colour_of(request)]}
    )
    result = caption_images([square(c) for c in COLOURS], ["r", "g", "b"], TRIGGER, client=client_for(server))
    assert result.sources == {"r": "gemini", "g": "offline", "b": "gemini"}
    assert result.captions["g"] == TRIGGER
    assert any("SAFETY" in w for w in result.warnings)
    assert any("failed for 1 of 3" in w for w in result.warnings)


def test_server_errors_fall_back_offline(server):
    for _ in range(10):
        server.push_status(503)
    result = caption_images([square("red")], ["a"], TRIGGER, client=client_for(server, max_retries=1))
    assert result.captions == {"a": TRIGGER} and result.sources == {"a": "offline"}


def test_manifest_block():
    result = caption_images([square("red")], ["a.png"], TRIGGER, sidecars={"a.png": "a fox"})
    block = result.to_manifest()["captions"]
    assert block["trigger"] == TRIGGER and block["items"][0]["caption"] == f"{TRIGGER}. a fox"
    assert block["prompt_version"] == "caption/1"


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="2 images but 1 names"):
        caption_images([square("red"), square("blue")], ["a"], TRIGGER)
    with pytest.raises(ValueError, match="unique"):
        caption_images([square("red"), square("blue")], ["a", "a"], TRIGGER)
    with pytest.raises(ValueError, match="trigger"):
        caption_images([square("red")], ["a"], "  ")


def test_caption_text_helpers():
    assert with_trigger("  a  cat ,on a mat ", "trg") == "trg. a cat, on a mat"
    assert with_trigger("TRG: a cat", "trg") == "trg. a cat"
    assert with_trigger("trgx is a word", "trg") == "trg. trgx is a word"
    assert with_trigger("", "trg") == "trg"
    assert remove_style_words("a watercolor painting of an old man", ["watercolor", "painting"]) == "an old man"


# -- lint gaps (issue 20): compounds, media, movements, references; the trigger once; no broken text -------------
@pytest.mark.parametrize("caption, word", [
    ("a black-and-white picture of a dog", "black-and-white"), ("a sun-drenched street", "sun-drenched"),
    ("pastel-hued houses by the sea", "pastel-hued"), ("a neon-lit alley", "neon-lit"), ("a photo of a dog", "photo"),
    ("a man with bokeh behind him", "bokeh"), ("an Art Deco lobby", "Art Deco"), ("ukiyo-e waves", "ukiyo-e"),
    ("a noir detective in a hat", "noir"), ("a vase of flowers in oils", "oils"), ("a print of a heron", "print"),
    ("a wheat field in the style of Van Gogh", "in the style of Van Gogh"),
])
def test_the_lint_catches_compounds_media_movements_and_references(caption, word):
    from gemini.style_words import find_style_words
    from train.captions import lint_caption

    assert word in [w for w, _ in find_style_words(caption)]
    assert lint_caption(caption) and word.split()[0].lower() in lint_caption(caption)[0].lower()


def test_content_words_that_look_like_references_are_not_flagged():
    from gemini.style_words import find_style_words

    assert find_style_words("a boat on a lake at noon") == []
    assert find_style_words("a house in the style of") == [("in the style of", "reference")]
    assert [w for w, _ in find_style_words("a barn in the style of Andrew Wyeth at dusk")] == ["in the style of Andrew Wyeth"]


def test_the_trigger_is_kept_once_at_the_head():
    from gemini.captions import with_trigger

    assert with_trigger("a cat zxy_ink on a wall", "zxy_ink") == "zxy_ink. a cat on a wall"
    assert with_trigger("zxy_ink. a cat, zxy_ink, on a ZXY_INK wall", "zxy_ink") == "zxy_ink. a cat, on a wall"
    assert with_trigger("zxy_inked cat", "zxy_ink") == "zxy_ink. zxy_inked cat"  # another token: kept


def test_cutting_style_words_never_leaves_broken_text():
    from gemini.captions import fix_articles, remove_style_words

    cut = fix_articles(remove_style_words("a dress under golden light, an illustration of a horse",
                                          ["golden", "illustration"], drop_clauses=True))
    assert cut == "a dress under light"
    assert fix_articles(remove_style_words("a watercolor of a fox", ["watercolor"], drop_clauses=True)) == "a fox"
    text = remove_style_words("a woman in a dress, painted in watercolor, beside a tree", ["painted", "watercolor"],
                              drop_clauses=True)
    assert text == "a woman in a dress, beside a tree"

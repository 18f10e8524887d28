"""Every stage of the text stage in sequence through one real client: a healthy server, then a broken one.

A job or a request must never fail because Gemini did: against a server that only errors, every stage
still answers, from the offline fallback, and says so (source "offline").
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gemini.captions import caption_images
from gemini.judge import judge_pair
from gemini.policy import text_stage_policy
from gemini.profile import extract_style_profile
from gemini.rewrite import reformulate

try:
    from tests.gemini_server import Action, GeminiProtocolServer, client_for, error_body
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import Action, GeminiProtocolServer, client_for, error_body

TRIGGER = "klnstyle"


def ref(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array([180, 70, 50]) + rng.normal(0, 25, (64, 64, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


REFS = [ref(i) for i in range(5)]

PROFILE = {
    "COLOR_DESCRIPTION": "brick red and rust, rich and warm",
    "TEXTURE": "grainy, mottled surfaces",
    "LIGHTING": "warm, even light",
    "MOOD": "earthy, energetic",
    "SIGNATURE_ELEMENTS": ["mottled grain", "red earth tones"],
    "WARDROBE_GENERAL": "rust linen",
    "WARDROBE_FEMININE": "a rust linen dress",
    "WARDROBE_MASCULINE": "a brick red linen shirt",
    "ENVIRONMENT": "a sunbaked red-clay courtyard",
    "CAMERA": "35mm, eye level",
    "PROMPT_SUFFIX_MUST": "brick red and rust palette, grainy mottled texture, warm even light, earthy energetic mood",
    "PROMPT_SUFFIX_ENRICH": "mottled grain, red earth tones, 35mm eye level",
}


def healthy(request):
    """Answers each stage by its response schema, as Gemini would."""
    title = request.schema_title
    if title == "CaptionAnswer":
        return {"caption": "a square tile on a table"}
    if title == "ProfileAnswer":
        return PROFILE
    if title == "RewriteAnswer":
        body = " ".join(["a woman walks across a sunbaked red-clay courtyard in a rust linen dress,"] * 9)
        return {"prompt": f"{TRIGGER}. {body} mottled grain, red earth tones. {PROFILE['PROMPT_SUFFIX_MUST']}"}
    if title == "JudgeAnswer":
        return {"winner": "a", "a_shows_content": True, "b_shows_content": True, "reason": "A keeps the grain."}
    raise AssertionError(f"unexpected schema {title!r}")


def run_every_stage(client):
    policy = text_stage_policy(len(REFS))
    captions = caption_images(REFS, [f"{i}.png" for i in range(len(REFS))], TRIGGER, client=client, policy=policy)
    profile = extract_style_profile(REFS, client=client, policy=policy)
    rewrite = reformulate(profile, "a woman walking in a courtyard", trigger=TRIGGER, client=client)
    judgement = judge_pair(REFS, ref(10), Image.new("RGB", (64, 64), (20, 40, 200)), "a tile", client=client)
    return captions, profile, rewrite, judgement


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


def test_every_stage_through_gemini(server):
    server.responder = healthy
    captions, profile, rewrite, judgement = run_every_stage(client_for(server))
    assert set(captions.sources.values()) == {"gemini"}
    assert all(c == f"{TRIGGER}. a square tile on a table" for c in captions.captions.values())
    assert profile.source == "gemini" and rewrite.source == "gemini" and judgement.source == "gemini"
    assert rewrite.checks.passed
    stages = {r.schema_title for r in server.requests}
    assert stages == {"CaptionAnswer", "ProfileAnswer", "RewriteAnswer", "JudgeAnswer"}


@pytest.mark.parametrize("failure", [500, 429, "blocked", "empty"])
def test_no_stage_fails_because_gemini_did(server, failure):
    def broken(request):
        if failure == "blocked":
            return Action(body={"promptFeedback": {"blockReason": "SAFETY"}})
        if failure == "empty":
            return Action(body={"candidates": [{"content": {"parts": []}, "finishReason": "STOP"}]})
        return Action(status=failure, body=error_body(failure))

    server.responder = broken
    captions, profile, rewrite, judgement = run_every_stage(client_for(server, max_retries=1))
    assert set(captions.sources.values()) == {"offline"} and captions.warnings
    assert profile.source == "offline" and any("Gemini failed" in w for w in profile.warnings)
    assert rewrite.source == "offline" and rewrite.checks.passed
    assert judgement.source == "offline" and judgement.winner == "a"

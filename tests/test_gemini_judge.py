"""Pairwise judge: Gemini's structured verdict through the protocol server, and the style-score fallback."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gemini.client import GeminiClient, GeminiConfig
from gemini.judge import MAX_JUDGE_REFS, judge_pair

try:
    from tests.gemini_server import GeminiProtocolServer, client_for
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import GeminiProtocolServer, client_for


def striped(colour_a, colour_b, period: int, seed: int, size: int = 96) -> Image.Image:
    """A two-colour striped picture with a seeded jitter (different 'content' per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    offset = rng.integers(0, period)
    mask = ((xx + yy * rng.uniform(0.2, 1.0) + offset) // (period / 2)) % 2 == 0
    image = np.where(mask[..., None], np.array(colour_a), np.array(colour_b)).astype(np.float32)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


REFS = [striped((200, 60, 40), (240, 210, 150), 8, seed) for seed in range(3)]
IN_STYLE = striped((200, 60, 40), (240, 210, 150), 8, 10)
OFF_STYLE = Image.new("RGB", (96, 96), (30, 60, 160))

VERDICT = {
    "winner": "b",
    "a_shows_content": True,
    "b_shows_content": False,
    "reason": "B's palette matches; B lost the dog.",
}


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


def test_gemini_verdict(server):
    server.push_json(VERDICT)
    judgement = judge_pair(REFS, OFF_STYLE, IN_STYLE, "a dog on a beach", client=client_for(server))
    assert judgement.source == "gemini" and judgement.model == "gemini-2.5-pro"
    assert (judgement.winner, judgement.a_shows_content, judgement.b_shows_content) == ("b", True, False)
    assert judgement.reason == VERDICT["reason"]
    [request] = server.requests
    assert len(request.images) == len(REFS) + 2  # refs, then A and B, all inline_data
    assert "Image A:" in request.texts and "Image B:" in request.texts
    assert "a dog on a beach" in request.prompt_text
    assert request.schema_title == "JudgeAnswer"
    assert set(request.schema["properties"]["winner"].get("enum", [])) == {"a", "b"}


def test_judge_sends_at_most_six_refs(server):
    server.push_json(VERDICT)
    many = [striped((200, 60, 40), (240, 210, 150), 8, seed) for seed in range(9)]
    judgement = judge_pair(many, OFF_STYLE, IN_STYLE, "a dog", client=client_for(server))
    assert len(server.requests[0].images) == MAX_JUDGE_REFS + 2
    assert any("9 refs given" in w for w in judgement.warnings)


def test_invalid_winner_is_a_bad_answer_then_offline(server):
    server.push_json({**VERDICT, "winner": "c"})
    server.push_json({**VERDICT, "winner": "both"})
    judgement = judge_pair(REFS, OFF_STYLE, IN_STYLE, "a dog", client=client_for(server))
    assert judgement.source == "offline" and judgement.winner == "b"
    assert len(server.requests) == 2


@pytest.mark.parametrize("in_style_is", ["a", "b"])
def test_offline_judge_picks_the_style_match(in_style_is):
    a, b = (IN_STYLE, OFF_STYLE) if in_style_is == "a" else (OFF_STYLE, IN_STYLE)
    judgement = judge_pair(REFS, a, b, "anything")
    assert judgement.source == "offline" and judgement.winner == in_style_is
    assert judgement.a_shows_content is None and judgement.b_shows_content is None
    assert any("content is not checked" in w for w in judgement.warnings)
    assert judgement.style_distance_a is not None and judgement.style_distance_b is not None


def test_gemini_faults_fall_back_to_the_style_score(server):
    for _ in range(5):
        server.push_status(429)
    judgement = judge_pair(REFS, OFF_STYLE, IN_STYLE, "a dog", client=client_for(server, max_retries=2))
    assert judgement.source == "offline" and judgement.winner == "b"
    assert any("Gemini failed" in w for w in judgement.warnings)
    assert len(server.requests) == 3


def test_no_key_uses_a_shared_scorer():
    from klein.style_score import StyleScorer

    scorer = StyleScorer(REFS)
    judgement = judge_pair(
        REFS, IN_STYLE, OFF_STYLE, "a dog", client=GeminiClient(GeminiConfig.from_env({})), scorer=scorer
    )
    assert judgement.source == "offline" and judgement.winner == "a"
    assert "GEMINI_API_KEY" in judgement.warnings[0]
    with pytest.raises(ValueError, match="at least one reference"):
        judge_pair([], IN_STYLE, OFF_STYLE, "a dog")

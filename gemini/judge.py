"""Pairwise judge for the evaluation sweeps: which of two images matches the refs' style better, and does each
still show what the prompt asked for?

Gemini answers with a structured verdict and a reason. Offline (no key, or Gemini failing) the style score
(klein/style_score.py: palette + Gram distance to the refs) picks the winner; it cannot see content, so the
content fields are None ("unknown") and a warning says so.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

from PIL import Image
from pydantic import BaseModel, Field

from gemini.client import GeminiClient, GeminiError
from gemini.profile import select_refs

logger = logging.getLogger("klein.gemini")

PROMPT_VERSION = "judge/1"
MAX_JUDGE_REFS = 6  # enough to show a style; every ref costs tokens on every comparison

SYSTEM_INSTRUCTION = """You judge image generations for a style LoRA.
You see reference images of a visual style, then image A and image B, both generated for the same prompt.
1. Decide which of A and B matches the references' STYLE better: palette, texture, lighting, rendering, mood.
   Ignore which subject the references show; judge how things look, not what they are.
2. For each image, decide whether it still shows the prompt's CONTENT (subjects, action, setting asked for).
Give a short reason (one or two sentences) naming the decisive differences. Answer in the JSON schema given."""


class JudgeAnswer(BaseModel):
    winner: Literal["a", "b"]
    a_shows_content: bool
    b_shows_content: bool
    reason: str = Field(min_length=1)


class Judgement(BaseModel):
    winner: Literal["a", "b"]
    a_shows_content: bool | None  # None: unknown (the offline judge cannot see content)
    b_shows_content: bool | None
    reason: str
    source: Literal["gemini", "offline"]
    model: str | None = None
    warnings: list[str] = Field(default_factory=list)
    style_distance_a: float | None = None
    style_distance_b: float | None = None


def offline_judgement(
    refs: Sequence[Image.Image], image_a: Image.Image, image_b: Image.Image, warnings: list[str], scorer=None
) -> Judgement:
    """Lower style distance wins; a tie goes to A. `scorer`: a `StyleScorer` on these refs, reused by sweeps."""
    from klein.style_score import StyleScorer  # torch is imported only when the offline judge runs

    scorer = scorer if scorer is not None else StyleScorer(list(refs))
    distance_a, distance_b = scorer.distances([image_a, image_b])
    winner: Literal["a", "b"] = "a" if distance_a <= distance_b else "b"
    return Judgement(
        winner=winner,
        a_shows_content=None,
        b_shows_content=None,
        reason=(
            f"style distance to the refs (palette + Gram): A {distance_a:.4f}, B {distance_b:.4f}; "
            f"{winner.upper()} is closer. Content was not checked (offline judge)."
        ),
        source="offline",
        warnings=warnings + ["offline judge: content is not checked (a_shows_content/b_shows_content are unknown)"],
        style_distance_a=distance_a,
        style_distance_b=distance_b,
    )


def judge_pair(
    refs: Sequence[Image.Image],
    image_a: Image.Image,
    image_b: Image.Image,
    prompt: str,
    client: GeminiClient | None = None,
    *,
    scorer=None,
) -> Judgement:
    """Verdict on A vs B against the refs' style. Never raises because of Gemini."""
    if not refs:
        raise ValueError("judge_pair needs at least one reference image to judge style against")
    if client is None or not client.available:
        why = "no Gemini client given" if client is None else "no Gemini API key (GEMINI_API_KEY)"
        return offline_judgement(refs, image_a, image_b, [f"offline judge: {why}"], scorer)
    chosen, warnings = select_refs(refs, MAX_JUDGE_REFS)
    parts: list = []
    for i, ref in enumerate(chosen, 1):
        parts += [f"Reference {i}:", ref]
    parts += ["Image A:", image_a, "Image B:", image_b, f"Prompt both images were generated for: {prompt}"]
    try:
        answer = client.generate(
            "judge", parts, JudgeAnswer, system_instruction=SYSTEM_INSTRUCTION, prompt_version=PROMPT_VERSION
        )
    except GeminiError as e:
        logger.warning("Gemini judge failed (%s); judging by the style score", e)
        return offline_judgement(refs, image_a, image_b, warnings + [f"offline judge: Gemini failed: {e}"], scorer)
    value = answer.value
    return Judgement(
        winner=value.winner,
        a_shows_content=value.a_shows_content,
        b_shows_content=value.b_shows_content,
        reason=value.reason.strip(),
        source="gemini",
        model=answer.model,
        warnings=warnings,
    )

"""Content-only captions for training: one per image, "<trigger>. <what is in the picture>".

A caption must say WHAT is in the image, never HOW it looks: a style word in a caption lets the text
carry the style and the LoRA learns less of it (DESIGN.md). So:

1. a sidecar .txt always wins (it is the user's word); style words in it only raise a warning;
2. otherwise Gemini writes the caption; a validator catches colour, lighting, medium and mood words and
   asks once more, naming them; if they survive the second try they are cut out, with a warning;
3. without Gemini (no key, text stage skipped by policy, or Gemini failing) the caption is the trigger alone,
   with a warning, because identical stub captions generalise worse.

A caption always begins with the trigger: "<trigger>. " is prepended when a sidecar or Gemini left it out.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Literal, Sequence

from PIL import Image
from pydantic import BaseModel, Field

from gemini.client import GeminiClient, GeminiError
from gemini.policy import TextStagePolicy
from gemini.style_words import find_style_words

logger = logging.getLogger("klein.gemini")

PROMPT_VERSION = "caption/1"
CaptionSource = Literal["sidecar", "gemini", "offline"]

SYSTEM_INSTRUCTION = """You write training captions for a style LoRA.
Describe WHAT is in the picture: the subjects, what they do, the objects, the kind of place, the framing
(close-up, full body, wide shot). Never describe HOW it looks: no colours, no lighting, no medium or
technique (photo, painting, illustration, render), no mood or atmosphere, no aesthetic or style words.
Write one plain sentence of 8 to 30 words, starting with the main subject. Do not add any trigger word.
Answer in the JSON schema given."""

RETRY_TEMPLATE = (
    "Your previous caption was: {previous!r}. It contains words that describe how the image looks: {words}. "
    "Write the caption again without those words or any other colour, lighting, medium or mood word."
)


class CaptionAnswer(BaseModel):
    caption: str = Field(min_length=1)


class ImageCaption(BaseModel):
    name: str
    caption: str
    source: CaptionSource
    warnings: list[str] = Field(default_factory=list)


class CaptionResult(BaseModel):
    trigger: str
    items: list[ImageCaption]
    warnings: list[str] = Field(default_factory=list)
    model: str | None = None
    prompt_version: str = PROMPT_VERSION
    policy: dict | None = None

    @property
    def captions(self) -> dict[str, str]:
        return {item.name: item.caption for item in self.items}

    @property
    def sources(self) -> dict[str, str]:
        return {item.name: item.source for item in self.items}

    def to_manifest(self) -> dict:
        """The captions block of the dataset manifest."""
        return {"captions": self.model_dump(mode="json")}


# -- caption text -------------------------------------------------------------------------------------
def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;])(?=[A-Za-z])", r"\1 ", text)
    return re.sub(r"([,;:])(?=[,.;:])", "", text).strip(" ,;:")


def strip_trigger(text: str, trigger: str) -> str:
    """Remove a leading trigger ("trig. ", "trig, ", "trig ") so that it can be added back once."""
    pattern = re.compile(rf"^\s*{re.escape(trigger)}(?![A-Za-z0-9_])[\s.,:;\-]*", re.IGNORECASE)
    return pattern.sub("", text, count=1)


def with_trigger(content: str, trigger: str) -> str:
    """'<trigger>. <content>', or the trigger alone when there is no content. The trigger appears once, at the
    head: copies of it elsewhere in the content (mid-caption, or twice) are cut out."""
    content = strip_trigger(content, trigger)
    content = re.sub(rf"(?<![A-Za-z0-9_\-]){re.escape(trigger)}(?![A-Za-z0-9_\-])[.,:;]?", "", content,
                     flags=re.IGNORECASE)
    content = _tidy(content)
    return f"{trigger}. {content}" if content else trigger


def caption_style_words(caption: str, trigger: str) -> list[tuple[str, str]]:
    """Style descriptors in a caption, the trigger itself excluded (a trigger may look like a word)."""
    return find_style_words(strip_trigger(caption, trigger))


def remove_style_words(text: str, words: Sequence[str], drop_clauses: bool = False) -> str:
    """Cut the given words out and tidy what remains (last resort after Gemini's second try).

    With `drop_clauses` (captions), a clause of three words or more after the first (text between commas
    or semicolons) that holds one of the words is dropped whole, so no broken text is left ("a dress, under
    neon light" -> "a dress"); in the first clause, which names the subject, and in short lists of adjectives,
    the words alone are cut and dangling articles and prepositions tidied away."""
    clauses = [c for c in re.split(r"\s*[,;]\s*", text.strip()) if c]
    if drop_clauses and len(clauses) > 1:
        def has_word(clause: str) -> bool:
            return any(re.search(rf"(?<![A-Za-z0-9\-]){re.escape(w)}(?![A-Za-z0-9\-])", clause, re.IGNORECASE)
                       for w in words)

        kept = [clauses[0]] + [c for c in clauses[1:] if len(c.split()) < 3 or not has_word(c)]
        text = ", ".join(kept)
    for word in words:
        text = re.sub(rf"(?<![A-Za-z0-9\-]){re.escape(word)}(?![A-Za-z0-9\-])", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, , portrait" -> "a, portrait"
    text = re.sub(r"\b(a|an|the)\s*,\s*", r"\1 ", text, flags=re.IGNORECASE)  # "a, portrait" -> "a portrait"
    text = re.sub(r"\b(a|an|the)\s+(?=(of|with|and|in|on|at|,|\.|$))", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(and|or)\s*(?=(and\b|or\b|,|\.|$))", "", text.strip(), flags=re.IGNORECASE)
    # a preposition left dangling before punctuation or the end ("..., painted in watercolor" -> "..., in")
    text = re.sub(r"\b(in|on|with|of|at|by|as|under|over|beside|near|behind|through|from|into)\s*(?=[,.;]|$)",
                  "", text.strip(), flags=re.IGNORECASE)
    text = re.sub(r"^(of|in|with|as)\s+", "", text.strip(), flags=re.IGNORECASE)  # "an illustration of a fox"
    return _tidy(text)


def fix_articles(text: str) -> str:
    """'a apple' -> 'an apple', 'an car' -> 'a car' after words were cut out."""
    text = re.sub(r"\b([Aa])\s+(?=[aeiouAEIOU])", lambda m: m.group(1) + "n ", text)
    return re.sub(r"\b([Aa])n\s+(?=[^aeiouAEIOU\W])", lambda m: m.group(1) + " ", text)


# -- sidecars -----------------------------------------------------------------------------------------
def _find_sidecar(name: str, sidecars: dict[str, str]) -> str | None:
    """A sidecar for 'dir/img01.jpg' may be keyed 'dir/img01.jpg', 'img01.jpg', 'img01' or 'img01.txt'."""
    path = PurePosixPath(name)
    for key in (
        name,
        path.name,
        path.stem,
        str(path.with_suffix(".txt")),
        path.stem + ".txt",
        str(path.with_suffix("")),
    ):
        if key in sidecars:
            return sidecars[key]
    return None


def _sidecar_caption(name: str, text: str, trigger: str) -> ImageCaption:
    caption = with_trigger(text, trigger)
    warnings = []
    if caption == trigger:
        warnings.append(f"{name}: the sidecar caption is empty; the caption is the trigger alone")
    style = caption_style_words(caption, trigger)
    if style:
        words = ", ".join(f"{w} ({k})" for w, k in style)
        warnings.append(
            f"{name}: the sidecar caption describes how the image looks ({words}); kept because sidecars win"
        )
    return ImageCaption(name=name, caption=caption, source="sidecar", warnings=warnings)


# -- Gemini -------------------------------------------------------------------------------------------
def _ask(client: GeminiClient, image: Image.Image, extra: str | None) -> tuple[str, str]:
    parts: list = [image, "Caption this image."]
    if extra:
        parts.append(extra)
    answer = client.generate(
        "caption", parts, CaptionAnswer, system_instruction=SYSTEM_INSTRUCTION, prompt_version=PROMPT_VERSION
    )
    return answer.value.caption, answer.model


def _gemini_caption(name: str, image: Image.Image, trigger: str, client: GeminiClient) -> ImageCaption:
    """Ask, validate, ask once more naming the style words, then cut any that survive."""
    try:
        text, _ = _ask(client, image, None)
        caption = with_trigger(text, trigger)
        style = caption_style_words(caption, trigger)
        if not style:
            return ImageCaption(name=name, caption=caption, source="gemini")
        words = ", ".join(w for w, _ in style)
        logger.info("caption for %s has style words (%s); asking Gemini once more", name, words)
        text, _ = _ask(client, image, RETRY_TEMPLATE.format(previous=strip_trigger(caption, trigger), words=words))
    except GeminiError as e:
        logger.warning("Gemini caption for %s failed (%s); the caption is the trigger alone", name, e)
        return ImageCaption(
            name=name,
            caption=trigger,
            source="offline",
            warnings=[f"{name}: Gemini failed ({e}); trigger-only caption"],
        )
    caption = with_trigger(text, trigger)
    style = caption_style_words(caption, trigger)
    if not style:
        return ImageCaption(name=name, caption=caption, source="gemini")
    removed = [w for w, _ in style]
    content = fix_articles(remove_style_words(strip_trigger(caption, trigger), removed, drop_clauses=True))
    return ImageCaption(
        name=name,
        caption=with_trigger(content, trigger),
        source="gemini",
        warnings=[f"{name}: Gemini kept style words after a second try; removed {', '.join(removed)}"],
    )


# -- the stage ----------------------------------------------------------------------------------------
def _check_inputs(images: Sequence[Image.Image], names: Sequence[str], trigger: str) -> str:
    if len(images) != len(names):
        raise ValueError(f"caption_images got {len(images)} images but {len(names)} names; pass one name per image")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"image names must be unique; repeated: {', '.join(duplicates)}")
    trigger = (trigger or "").strip()
    if not trigger:
        raise ValueError("a trigger word is required: captions are '<trigger>. <content>'")
    return trigger


def caption_images(
    images: list[Image.Image],
    names: list[str],
    trigger: str,
    sidecars: dict[str, str] | None = None,
    client: GeminiClient | None = None,
    *,
    policy: TextStagePolicy | None = None,
) -> CaptionResult:
    """One caption per image, in order. Never raises because of Gemini.

    `client=None`, a client without a key, or a `policy` that skips the text stage gives sidecar or
    trigger-only captions (source "offline"), with warnings saying why.
    """
    trigger = _check_inputs(images, names, trigger)
    sidecars = sidecars or {}
    items: dict[str, ImageCaption] = {}
    todo: list[tuple[str, Image.Image]] = []
    for name, image in zip(names, images):
        text = _find_sidecar(name, sidecars)
        if text is not None:
            items[name] = _sidecar_caption(name, text, trigger)
        else:
            todo.append((name, image))

    warnings: list[str] = []
    model: str | None = None
    skip_reason = None
    if policy is not None and not policy.use_gemini:
        skip_reason = policy.reason
    elif client is None:
        skip_reason = "no Gemini client given"
    elif not client.available:
        skip_reason = "no Gemini API key (set GEMINI_API_KEY)"

    if todo and skip_reason is not None:
        warnings.append(
            f"{len(todo)} image(s) without a sidecar get trigger-only captions ({skip_reason}); "
            "identical stub captions "
            "generalise worse than content captions: add sidecar .txt files or a Gemini key"
        )
        for name, _ in todo:
            items[name] = ImageCaption(name=name, caption=trigger, source="offline")
    elif todo:
        assert client is not None
        model = client.model_for("caption")
        with ThreadPoolExecutor(max_workers=client.config.max_concurrency) as pool:
            results = pool.map(lambda item: _gemini_caption(item[0], item[1], trigger, client), todo)
            for caption in results:
                items[caption.name] = caption
        failed = sum(1 for name, _ in todo if items[name].source == "offline")
        if failed:
            warnings.append(f"Gemini failed for {failed} of {len(todo)} image(s); those captions are the trigger alone")

    ordered = [items[name] for name in names]
    for item in ordered:
        warnings.extend(item.warnings)
    return CaptionResult(
        trigger=trigger,
        items=ordered,
        warnings=warnings,
        model=model,
        policy=policy.model_dump(mode="json") if policy is not None else None,
    )

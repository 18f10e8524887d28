"""Trigger words and captions for style training.

Two rules from the seeds (DESIGN.md, "What the seeds found"):

- The trigger must be a rare token. A common word ("style", "art", "painting") already means something
  to the text encoder, so the LoRA has to fight that meaning instead of filling an empty slot.
- Captions say WHAT is in the picture, never HOW it looks. A style word in a caption ("watercolor",
  "moody", "blue") lets the text carry the style, and the LoRA learns less of it.

Caption sources, in order of preference: a sidecar `.txt` next to the image, a captioner, or the trigger
alone (with a warning: identical stub captions generalise poorly). `build_captions` applies that order with
any captioner callable; the Gemini stage (`gemini.captions.caption_images`) applies the same order itself and
takes the sidecars as `RefSet.sidecar_captions`.
"""

from __future__ import annotations

import re
import unicodedata

from contracts import with_trigger, without_trigger  # noqa: F401 — the trigger format lives in contracts
from gemini.style_words import STYLE_WORDS, find_style_words


class TriggerError(ValueError):
    """The trigger word cannot be used; the message says why and suggests one that can."""


# Words the text encoder knows well and that describe images in general. Every style descriptor from the
# shared list is refused too (a trigger "watercolor" is a caption style word in disguise).
COMMON_TRIGGER_WORDS: frozenset[str] = frozenset(
    """style styles styled art arts artwork artworks artist artistic painting paintings paint illustration
    illustrations photo photos photography image images picture pictures pic drawing drawings draw design
    designs graphic graphics sketch render visual visuals aesthetic look looks theme filter effect mode
    digital abstract realistic realism portrait landscape scene poster print concept lora model token
    trigger custom new my the a an and of in on with it this that""".split()
) | frozenset(word for words in STYLE_WORDS.values() for word in words)

MAX_TRIGGER_CHARS = 40
# ASCII only: the tokenizer splits these predictably, and no look-alike characters sneak in.
_TRIGGER_ALLOWED = re.compile(r"[A-Za-z0-9_-]+")
# Past this a caption is mostly truncated by the text encoder's prompt length anyway.
MAX_CAPTION_CHARS = 1000


def _suggest_trigger(word: str) -> str:
    word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()  # "stylé" -> "style"
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", word).strip("_").lower() or "style"
    return f"zxy_{cleaned}"


def check_trigger(trigger: str | None) -> str:
    """Return the stripped trigger, or raise TriggerError saying what is wrong and what to use instead."""
    if trigger is None or not trigger.strip():
        raise TriggerError(
            "the trigger word is empty: choose a rare token that names this style, e.g. 'zxy_mystyle'"
        )
    trigger = trigger.strip()
    if any(ch.isspace() for ch in trigger):
        joined = re.sub(r"\s+", "_", trigger)
        raise TriggerError(
            f"the trigger {trigger!r} contains whitespace: a trigger is one word; use {joined!r} instead"
        )
    if len(trigger) > MAX_TRIGGER_CHARS:
        raise TriggerError(
            f"the trigger {trigger!r} is {len(trigger)} characters long: keep it to {MAX_TRIGGER_CHARS} or fewer, "
            f"e.g. {_suggest_trigger(trigger[:12])!r}"
        )
    if not _TRIGGER_ALLOWED.fullmatch(trigger):
        bad = sorted({ch for ch in trigger if not _TRIGGER_ALLOWED.fullmatch(ch)})
        raise TriggerError(
            f"the trigger {trigger!r} contains {', '.join(repr(ch) for ch in bad)}: use only ASCII letters, "
            f"digits, '_' and '-', e.g. {_suggest_trigger(trigger)!r}"
        )
    if trigger.lower() in COMMON_TRIGGER_WORDS:
        raise TriggerError(
            f"the trigger {trigger!r} is a common word the text encoder already knows, so the LoRA would fight "
            f"its meaning: use a rare token instead, e.g. {_suggest_trigger(trigger)!r}"
        )
    return trigger


def lint_caption(caption: str) -> list[str]:
    """Warnings for one caption (an empty list when it is fine).

    The main lint: style descriptors (colour, lighting, medium, mood words). Each warning lists the words
    found so the user can delete them.
    """
    warnings: list[str] = []
    text = (caption or "").strip()
    if not text:
        return ["the caption is empty: describe what is in the picture (e.g. 'a house beside two trees')"]
    found = find_style_words(text)
    if found:
        by_kind: dict[str, list[str]] = {}
        for word, kind in found:
            by_kind.setdefault(kind, []).append(word)
        listed = "; ".join(f"{kind}: {', '.join(words)}" for kind, words in by_kind.items())
        warnings.append(
            f"the caption describes how the picture looks ({listed}): captions say what is in the picture, "
            "never how it looks, or the caption steals the style from the LoRA; remove those words"
        )
    if len(text) > MAX_CAPTION_CHARS:
        warnings.append(
            f"the caption is {len(text)} characters long: the text encoder truncates long prompts; "
            f"keep it under {MAX_CAPTION_CHARS} characters"
        )
    return warnings



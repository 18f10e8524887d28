"""L2 reformulation: STYLE_PROFILE + the user's prompt -> one 100–200-word prompt for the generator.

The seeds' rules: the style decides visual matters (colours, textures, lighting); the user decides subject,
action and content; wardrobe adapts to the subject's gender ("pink ruffle blouse" -> "dusty rose cashmere");
a generic setting becomes the style's own; signature elements are always kept; mood words never flatten a
saturated palette. Gemini writes the prompt when it can; every result is checked (length, the user's subject,
PROMPT_SUFFIX_MUST, the trigger) and a failing one is asked for once more, then woven offline.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from gemini.captions import fix_articles, remove_style_words
from gemini.client import GeminiClient, GeminiError
from gemini.colour import ciede2000, hex_to_rgb, lab_chroma_hue, named_colour_lab, srgb_to_lab
from gemini.profile import FLATTENING_WORDS, StyleProfile, join_words
from gemini.style_words import find_style_words

logger = logging.getLogger("klein.gemini")

PROMPT_VERSION = "rewrite/1"
MIN_WORDS = 100
MAX_WORDS = 200

STOPWORDS = frozenset(
    """a an the and or but of in on at to for with without from by as into onto over under near beside behind
    between through while is are was were be being been it its this that these those there here his her their
    our your my some any one two three very just also then than so such who whom which what where when how
    holding wearing standing sitting walking looking""".split()
)
# Person words decide gendered wardrobe; the subject check never lets one of them go missing.
FEMININE = frozenset(
    "woman women girl girls lady ladies she her mother grandmother queen princess bride sister daughter actress "
    "businesswoman wife aunt niece".split()
)
MASCULINE = frozenset(
    "man men boy boys gentleman gentlemen he him his father grandfather king prince groom brother son actor "
    "businessman husband uncle nephew".split()
)
NEUTRAL_PEOPLE = frozenset("person people child children kid kids baby teenager figure dancer worker crowd".split())
GARMENTS = frozenset(
    """blouse shirt t-shirt tshirt dress skirt gown suit jacket coat blazer sweater jumper cardigan hoodie trousers
    pants jeans shorts scarf hat cap tie vest uniform robe kimono overalls outfit clothes clothing tuxedo
    ruffle ruffles""".split()
)
# Settings that say nothing about a place's look: the style supplies its own version.
GENERIC_SETTINGS = frozenset(
    """room park street city background studio outdoors outside indoors interior exterior place building house
    office landscape scene town field garden road""".split()
)
# "in/at/on ... a|an|the <up to three words>": a place phrase, unless its words are clothing or people.
_PLACE_PHRASE = re.compile(
    r"\b(?:in|at|on|inside|outside|through|across|by)\s+(?:a|an|the|his|her|their)\s+(?P<phrase>[\w\-]+(?:\s+(?!(?:and|or|with|while|who|as|in|on|at|by|of|near|under|over|to|for|from)\b)[\w\-]+){0,2})",
    re.IGNORECASE,
)
_TOKEN = re.compile(r"[A-Za-z][A-Za-z\-']*")


class RewriteAnswer(BaseModel):
    prompt: str = Field(min_length=1)


class RewriteChecks(BaseModel):
    word_count: int
    length_ok: bool
    subject_kept: bool
    missing_subject_terms: list[str] = Field(default_factory=list)
    suffix_must_present: bool
    trigger_present: bool | None = None  # None: no LoRA trigger to check
    saturation_kept: bool
    colours_present: bool = True  # the style's main palette colours are named
    missing_colours: list[str] = Field(default_factory=list)
    signature_kept: bool = True  # every SIGNATURE_ELEMENT is there (most of its words)
    missing_signature: list[str] = Field(default_factory=list)
    wardrobe_adapted: bool | None = None  # None: the prompt has no clothing
    setting_transformed: bool | None = None  # None: the prompt's setting is not a generic one

    @property
    def passed(self) -> bool:
        return (
            self.length_ok
            and self.subject_kept
            and self.suffix_must_present
            and self.trigger_present is not False
            and self.saturation_kept
            and self.colours_present
            and self.signature_kept
            and self.wardrobe_adapted is not False
            and self.setting_transformed is not False
        )

    def failures(self) -> list[str]:
        failed = []
        if not self.length_ok:
            failed.append(f"the prompt has {self.word_count} words; it must have {MIN_WORDS}-{MAX_WORDS}")
        if not self.subject_kept:
            failed.append(f"the user's subject is missing: keep {', '.join(self.missing_subject_terms)}")
        if not self.suffix_must_present:
            failed.append("PROMPT_SUFFIX_MUST is missing: include it verbatim")
        if self.trigger_present is False:
            failed.append("the trigger word is missing: start the prompt with it")
        if not self.saturation_kept:
            failed.append("the palette is saturated: remove words that flatten it (muted, faded, pastel, ...)")
        if not self.colours_present:
            failed.append(f"the style's colours are missing: name {', '.join(self.missing_colours)}")
        if not self.signature_kept:
            failed.append(f"signature elements are missing: keep {'; '.join(self.missing_signature)}")
        if self.wardrobe_adapted is False:
            failed.append("the clothing is not adapted: restyle the user's garments with WARDROBE_LANGUAGE")
        if self.setting_transformed is False:
            failed.append("the generic setting is not transformed: replace it with the style's ENVIRONMENT")
        return failed


class Reformulation(BaseModel):
    prompt: str
    source: Literal["gemini", "offline"]
    checks: RewriteChecks
    warnings: list[str] = Field(default_factory=list)
    model: str | None = None
    original_prompt: str = ""
    trigger: str | None = None


# -- text helpers -------------------------------------------------------------------------------------
def word_count(text: str) -> int:
    return len(text.split())


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _stem(word: str) -> str:
    word = word.lower().strip("'")
    for suffix in ("ing", "es", "ed", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def subject_gender(prompt: str) -> Literal["feminine", "masculine", "neutral"]:
    tokens = set(_tokens(prompt))
    feminine, masculine = bool(tokens & FEMININE), bool(tokens & MASCULINE)
    if feminine and not masculine:
        return "feminine"
    if masculine and not feminine:
        return "masculine"
    return "neutral"


def subject_terms(prompt: str) -> tuple[list[str], list[str]]:
    """(people words, other content words) of the user's prompt.

    Style words, garments and generic settings are left out: the rules let the style restyle those.
    """
    style = {w for w, _ in find_style_words(prompt)}
    people, content = [], []
    for token in _tokens(prompt):
        if token in FEMININE or token in MASCULINE or token in NEUTRAL_PEOPLE:
            if token not in ("he", "him", "his", "she", "her") and token not in people:
                people.append(token)
            continue
        if len(token) < 3 or token in STOPWORDS or token in style or token in GARMENTS or token in GENERIC_SETTINGS:
            continue
        if token not in content:
            content.append(token)
    return people, content


MAIN_COLOUR_SHARE = 0.25  # palette colours at least this large must be named (always the largest one)


def _content_stems(text: str) -> set[str]:
    return {_stem(t) for t in _tokens(text) if len(t) >= 3 and t not in STOPWORDS}


def _mostly_present(phrase: str, stems: set[str], share: float = 0.5) -> bool:
    wanted = _content_stems(phrase)
    return not wanted or len(wanted & stems) / len(wanted) >= share


def _coloured_garment_phrases(prompt: str) -> list[str]:
    """The user's clothing as written with a colour ("pink ruffle blouse"): kept verbatim, it was not restyled."""
    tokens = _TOKEN.findall(prompt)
    phrases = []
    for i, token in enumerate(tokens):
        if token.lower() in GARMENTS:
            before = tokens[max(0, i - 2) : i]
            if any(dict(find_style_words(w)).get(w.lower()) == "colour" for w in before):
                phrases.append(" ".join(before + [token]).lower())
    return phrases


def _rule_checks(text: str, profile: StyleProfile, user_prompt: str, stems: set[str]) -> dict:
    """The seed's rules checked against the profile: colours, signature elements, wardrobe, setting."""
    palette = sorted(profile.MUST_APPLY.COLOR.palette, key=lambda c: -c.share)
    main = [c.name for i, c in enumerate(palette) if i == 0 or c.share >= MAIN_COLOUR_SHARE]
    normalised = _normalise(text)
    missing_colours = [name for name in main if _normalise(name) not in normalised]
    missing_signature = [e for e in profile.ENRICH.SIGNATURE_ELEMENTS if not _mostly_present(e, stems)]
    wardrobe_ok = None
    if set(_tokens(user_prompt)) & GARMENTS:
        wardrobe = profile.ENRICH.WARDROBE_LANGUAGE
        outfit = {"feminine": wardrobe.feminine, "masculine": wardrobe.masculine}.get(subject_gender(user_prompt),
                                                                                      wardrobe.general)
        palette_stems = set().union(*(_content_stems(c.name) for c in palette)) if palette else set()
        styled = (_content_stems(outfit) | _content_stems(wardrobe.general)) - palette_stems
        kept_verbatim = any(phrase in normalised for phrase in _coloured_garment_phrases(user_prompt))
        wardrobe_ok = bool(styled & stems) and not kept_verbatim
    setting_ok = None
    if _setting_kind(user_prompt)[0] == "generic":
        setting_ok = _mostly_present(profile.ENRICH.ENVIRONMENT, stems)
    return {"colours_present": not missing_colours, "missing_colours": missing_colours,
            "signature_kept": not missing_signature, "missing_signature": missing_signature,
            "wardrobe_adapted": wardrobe_ok, "setting_transformed": setting_ok}


def check_reformulation(text: str, profile: StyleProfile, user_prompt: str, trigger: str | None) -> RewriteChecks:
    words = word_count(text)
    stems = {_stem(t) for t in _tokens(text)}
    people, content = subject_terms(user_prompt)
    missing_people = [p for p in people if _stem(p) not in stems]
    missing_content = [c for c in content if _stem(c) not in stems]
    # every person word, and most content words (a few may be restyled: "blouse" -> "cashmere top")
    content_ok = not content or (len(content) - len(missing_content)) / len(content) >= 0.6
    normalised = _normalise(text)
    suffix_ok = _normalise(profile.PROMPT_SUFFIX_MUST) in normalised
    trigger_ok = None
    if trigger:
        trigger_ok = (
            re.search(rf"(?<![A-Za-z0-9_]){re.escape(trigger.lower())}(?![A-Za-z0-9_])", normalised) is not None
        )
    saturation_ok = True
    if profile.MUST_APPLY.COLOR.saturation == "high":
        outside_suffix = normalised.replace(_normalise(profile.PROMPT_SUFFIX_MUST), " ")
        saturation_ok = not (set(_tokens(outside_suffix)) & FLATTENING_WORDS)
    return RewriteChecks(
        word_count=words,
        length_ok=MIN_WORDS <= words <= MAX_WORDS,
        subject_kept=not missing_people and content_ok,
        missing_subject_terms=missing_people + missing_content,
        suffix_must_present=suffix_ok,
        trigger_present=trigger_ok,
        saturation_kept=saturation_ok,
        **_rule_checks(text, profile, user_prompt, stems),
    )


# -- offline weaving ----------------------------------------------------------------------------------
def _palette_lab(profile: StyleProfile) -> list[tuple[str, np.ndarray]]:
    return [(c.name, srgb_to_lab(hex_to_rgb(c.hex))) for c in profile.MUST_APPLY.COLOR.palette]


def _nearest_palette_name(colour_word: str, palette: list[tuple[str, np.ndarray]]) -> str | None:
    """The palette colour a colour word turns into: a hue goes to the nearest hue, a neutral to the nearest neutral.

    Hue first: "pink" in a palette of rose tones becomes "dusty rose", not a pale beige of the same lightness.
    """
    lab = named_colour_lab(colour_word)
    if lab is None or not palette:
        return None
    word_chroma, word_hue = lab_chroma_hue(lab)
    word_is_chromatic = float(word_chroma) >= 15
    same_kind = [(name, p) for name, p in palette if (float(lab_chroma_hue(p)[0]) >= 12) == word_is_chromatic]
    candidates = same_kind or palette
    scores = []
    for _, p_lab in candidates:
        if word_is_chromatic:
            chroma, hue = lab_chroma_hue(p_lab)
            hue_gap = abs((float(hue) - float(word_hue) + 180) % 360 - 180)
            scores.append(
                hue_gap + 0.2 * abs(float(p_lab[0]) - float(lab[0])) + 0.3 * abs(float(chroma) - float(word_chroma))
            )
        else:
            scores.append(float(ciede2000(lab, p_lab, k_l=1.0)))
    return candidates[int(np.argmin(scores))][0]


def restyle_user_prompt(prompt: str, profile: StyleProfile) -> tuple[str, list[str]]:
    """The user's content with its visual words handed to the style.

    A colour word becomes the nearest palette colour ("pink blouse" -> "dusty rose blouse"); lighting,
    medium and mood words, colour words without a hue ("vibrant", "muted") and words that flatten
    saturation ("faded") are dropped: the style decides how things look.
    """
    palette = _palette_lab(profile)
    replaced: list[str] = []
    dropped: list[str] = []

    def swap(match: re.Match) -> str:
        word = match.group(0)
        if word.lower() in FLATTENING_WORDS:
            dropped.append(word)
            return word
        kind = dict(find_style_words(word)).get(word.lower())
        if kind is None:
            return word
        if kind == "colour":
            target = _nearest_palette_name(word.lower(), palette)
            if target is not None:
                replaced.append(f"{word} -> {target}")
                return target
        dropped.append(word)
        return word

    text = _TOKEN.sub(swap, prompt)
    if dropped:
        text = remove_style_words(text, sorted(set(dropped), key=len, reverse=True))
    text = fix_articles(re.sub(r"\s+", " ", text).strip())
    notes: list[str] = []
    if replaced:
        notes.append("colours handed to the style's palette: " + ", ".join(replaced))
    if dropped:
        notes.append("visual words left to the style: " + ", ".join(dropped))
    return text.strip(" ,;"), notes


def _setting_kind(prompt: str) -> tuple[str, str | None]:
    """('none' | 'generic' | 'specific', the setting word) from the prompt's place phrases.

    "in a red shirt" is clothing, not a place; "in a park" is a generic place; "on a train" a specific one.
    """
    for match in _PLACE_PHRASE.finditer(prompt):
        words = [w.lower() for w in _TOKEN.findall(match.group("phrase"))]
        if not words or set(words) & (GARMENTS | FEMININE | MASCULINE | NEUTRAL_PEOPLE):
            continue
        generic = [w for w in words if w in GENERIC_SETTINGS]
        return ("generic", generic[-1]) if generic else ("specific", words[-1])
    bare = sorted(set(_tokens(prompt)) & {"outdoors", "outside", "indoors"})
    return ("generic", bare[0]) if bare else ("none", None)


def _covered(sentence: str, text: str) -> bool:
    """True when every comma/semicolon phrase of `sentence` already appears in `text` (no repeats)."""
    phrases = [p.strip(" .:") for p in re.split(r"[,;]|\band\b", _normalise(sentence)) if p.strip(" .:")]
    haystack = _normalise(text)
    return bool(phrases) and all(p in haystack for p in phrases)


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".;,")
    return text[:1].upper() + text[1:] + "." if text else ""


def weave_offline(profile: StyleProfile, prompt: str, trigger: str | None) -> tuple[str, list[str]]:
    """The rules of L2 applied mechanically; deterministic. Returns (prompt, notes)."""
    content, notes = restyle_user_prompt(prompt, profile)
    if not content:
        content = prompt.strip()
    gender = subject_gender(prompt)
    people, _ = subject_terms(prompt)
    tokens = set(_tokens(prompt))
    wardrobe = profile.ENRICH.WARDROBE_LANGUAGE
    must = profile.MUST_APPLY
    enrich = profile.ENRICH

    core: list[str] = [_sentence(content)]
    if tokens & GARMENTS or people:
        outfit = {"feminine": wardrobe.feminine, "masculine": wardrobe.masculine}.get(gender, wardrobe.general)
        who = {"feminine": "Her", "masculine": "His"}.get(gender, "The")
        core.append(_sentence(f"{who} clothing is restyled in the style's wardrobe: {outfit}"))
        notes.append(f"wardrobe adapted for a {gender} subject")
    setting, setting_word = _setting_kind(prompt)
    if setting == "generic":
        core.append(_sentence(f"The {setting_word} becomes the style's own setting: {enrich.ENVIRONMENT}"))
        notes.append(f"generic setting '{setting_word}' given the style's environment")
    elif setting == "none":
        core.append(_sentence(f"Set in {enrich.ENVIRONMENT}"))
    core.append(_sentence(f"Signature elements: {join_words(enrich.SIGNATURE_ELEMENTS)}"))

    # Optional detail, added in this order while the prompt is short and dropped first when it is long;
    # a MUST_APPLY part already carried word for word by PROMPT_SUFFIX_MUST is not repeated.
    suffix = _normalise(profile.PROMPT_SUFFIX_MUST)
    must_parts = [
        ("Colour", must.COLOR.description),
        ("Lighting", must.LIGHTING),
        ("Texture", must.TEXTURE),
        ("Mood", must.MOOD),
    ]
    optional: list[str] = [
        _sentence(f"{label}: {text}") for label, text in must_parts if _normalise(text) not in suffix
    ]
    optional += [
        _sentence(f"Camera: {enrich.CAMERA}"),
        _sentence(profile.PROMPT_SUFFIX_ENRICH),
        _sentence(
            f"Every surface, garment and background stays within the palette of {join_words(profile.palette_names)}"
        ),
        _sentence(f"Wardrobe in this style: {wardrobe.general}"),
        _sentence(f"The setting follows the style: {enrich.ENVIRONMENT}"),
    ]
    if must.COLOR.saturation == "high":
        optional.insert(1, "Colours stay rich and fully saturated throughout.")
    head = f"{trigger}. " if trigger else ""
    tail = profile.PROMPT_SUFFIX_MUST.strip().rstrip(".") + "."  # verbatim, not re-capitalised

    def assemble(extra: list[str]) -> str:
        return head + " ".join(core + extra + [tail])

    chosen: list[str] = []
    for sentence in optional:
        if word_count(assemble(chosen)) >= MIN_WORDS + 20:
            break
        if _covered(sentence, assemble(chosen)):
            continue
        if word_count(assemble(chosen + [sentence])) <= MAX_WORDS:
            chosen.append(sentence)
    text = assemble(chosen)
    # A long user prompt plus a long profile: shed the style's optional core parts before the user's words.
    while word_count(text) > MAX_WORDS and len(core) > 1:
        core.pop()
        text = assemble(chosen)
    if word_count(text) > MAX_WORDS:
        notes.append(f"the user's prompt alone is too long to fit {MAX_WORDS} words with the style")
    return text, notes


# -- Gemini -------------------------------------------------------------------------------------------
SYSTEM_INSTRUCTION = f"""You rewrite a user's image prompt into the house style described by a STYLE_PROFILE.
Rules:
- The STYLE decides visual matters: colours, textures, lighting, mood. Replace the user's colour, lighting and
  medium words with the style's (a colour becomes the nearest palette colour).
- The USER decides subject, action and content: keep every subject, what they do and the objects.
- Wardrobe adapts to the subject's gender using WARDROBE_LANGUAGE ("pink ruffle blouse" -> "dusty rose cashmere").
- A generic setting (a room, a park, a street, no setting) becomes the style's ENVIRONMENT; a specific place stays.
- Always keep every SIGNATURE_ELEMENT.
- Never flatten a saturated palette with mood words (no "muted", "faded", "washed-out", "pastel").
- Length: {MIN_WORDS} to {MAX_WORDS} words, one paragraph of plain descriptive prose.
- Include PROMPT_SUFFIX_MUST verbatim, at the end.
- If a trigger word is given, start the prompt with it.
Answer in the JSON schema given."""


def _request_text(profile: StyleProfile, prompt: str, trigger: str | None, feedback: list[str] | None) -> str:
    style = {
        "MUST_APPLY": profile.MUST_APPLY.model_dump(mode="json"),
        "ENRICH": profile.ENRICH.model_dump(mode="json"),
        "PROMPT_SUFFIX_MUST": profile.PROMPT_SUFFIX_MUST,
        "PROMPT_SUFFIX_ENRICH": profile.PROMPT_SUFFIX_ENRICH,
    }
    lines = [
        "STYLE_PROFILE:",
        json.dumps(style, indent=1),
        f"USER PROMPT: {prompt}",
        f"TRIGGER: {trigger}" if trigger else "TRIGGER: none (no LoRA)",
        f"SUBJECT GENDER (from the prompt): {subject_gender(prompt)}",
    ]
    if feedback:
        lines.append("Your previous answer failed these checks; fix them: " + "; ".join(feedback))
    return "\n".join(lines)


def _offline(profile: StyleProfile, prompt: str, trigger: str | None, warnings: list[str]) -> Reformulation:
    text, notes = weave_offline(profile, prompt, trigger)
    return Reformulation(
        prompt=text,
        source="offline",
        checks=check_reformulation(text, profile, prompt, trigger),
        warnings=warnings + notes,
        original_prompt=prompt,
        trigger=trigger,
    )


def reformulate(
    profile: StyleProfile, prompt: str, trigger: str | None = None, client: GeminiClient | None = None
) -> Reformulation:
    """The user's prompt in the style's terms. Never raises because of Gemini: falls back to offline weaving."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: say what the image should show")
    prompt = prompt.strip()
    trigger = trigger.strip() if trigger and trigger.strip() else None
    if client is None or not client.available:
        why = "no Gemini client given" if client is None else "no Gemini API key (GEMINI_API_KEY)"
        return _offline(profile, prompt, trigger, [f"offline L2: {why}"])
    feedback: list[str] | None = None
    warnings: list[str] = []
    # one deadline for the whole L2 (both attempts): on the request path it must end well inside the request's
    deadline_at = time.monotonic() + client.config.deadline_for("rewrite")
    for attempt in (1, 2):
        try:
            answer = client.generate(
                "rewrite",
                [_request_text(profile, prompt, trigger, feedback)],
                RewriteAnswer,
                system_instruction=SYSTEM_INSTRUCTION,
                prompt_version=PROMPT_VERSION,
                deadline_at=deadline_at,
            )
        except GeminiError as e:
            logger.warning("L2 rewrite by Gemini failed (%s); weaving the prompt offline", e)
            return _offline(profile, prompt, trigger, warnings + [f"offline L2: Gemini failed: {e}"])
        text = re.sub(r"\s+", " ", answer.value.prompt).strip()
        checks = check_reformulation(text, profile, prompt, trigger)
        if checks.passed:
            return Reformulation(
                prompt=text,
                source="gemini",
                checks=checks,
                warnings=warnings,
                model=answer.model,
                original_prompt=prompt,
                trigger=trigger,
            )
        feedback = checks.failures()
        warnings.append(f"Gemini's rewrite (attempt {attempt}) failed checks: {'; '.join(feedback)}")
        logger.info("L2 rewrite attempt %d failed checks: %s", attempt, feedback)
    return _offline(profile, prompt, trigger, warnings + ["offline L2: Gemini's rewrites failed the checks twice"])

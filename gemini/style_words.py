"""Words that describe HOW an image looks rather than WHAT is in it.

Captions for a style LoRA must describe content only: a style word in a caption lets the text carry the
style, and the LoRA then learns less of it (DESIGN.md, "What the seeds found"). The caption lint in
`train/` and the Gemini caption validator both use this list.
"""

from __future__ import annotations

import re

STYLE_WORDS: dict[str, frozenset[str]] = {
    "colour": frozenset(
        """red orange yellow green blue purple violet pink magenta cyan teal turquoise brown beige tan
        black white gray grey golden gold silver crimson scarlet maroon navy indigo lavender lilac olive
        emerald amber ochre sepia pastel neon vibrant vivid saturated desaturated muted monochrome
        monochromatic colorful colourful colour color colors colours palette hue hues tint tinted
        warm-toned cool-toned duotone""".split()
    ),
    "lighting": frozenset(
        """lighting lit backlit backlight sunlit moonlit glow glowing glowy luminous shadowy shadows
        chiaroscuro high-key low-key rim-lit cinematic dramatic soft-lit harsh bright dim dark
        gloomy hazy foggy misty radiant golden-hour""".split()
    ),
    "medium": frozenset(
        """watercolor watercolour oil acrylic gouache pastel charcoal pencil ink sketch sketched
        painting painted painterly illustration illustrated drawing drawn cartoon anime manga comic
        render rendered 3d cgi photorealistic photograph photographic film grain grainy halftone
        engraving woodcut lithograph collage pixel vector lowpoly low-poly impasto brushstrokes
        brushstroke textured stippled crosshatched airbrushed photo photos photographs print prints printed
        oils bokeh polaroid analog daguerreotype cyanotype screenprint linocut etching mosaic""".split()
    ),
    # art movements and genres: a caption naming one hands the style to the text
    "movement": frozenset(
        """noir ukiyo-e impressionist impressionism impressionistic cubist cubism expressionist expressionism
        surrealist surrealism baroque rococo bauhaus pointillist pointillism fauvist fauvism art-deco
        art-nouveau pop-art futurist futurism dadaist dada constructivist minimalism brutalist vaporwave
        synthwave cyberpunk steampunk""".split()
    ),
    "mood": frozenset(
        """moody melancholic melancholy dreamy ethereal whimsical serene eerie ominous nostalgic
        romantic mysterious cozy cosy gritty surreal atmospheric somber sombre cheerful joyful
        haunting tranquil peaceful vintage retro aesthetic stylized stylised minimalist""".split()
    ),
}

_ALL = {word: kind for kind, words in STYLE_WORDS.items() for word in words}
_TOKEN = re.compile(r"[a-zA-Z][a-zA-Z0-9_\-]*")  # "zxy_neon" is one token: a trigger is not a style word
# Multi-word descriptors, and references to an artist or a look ("in the style of Van Gogh", "à la Hopper").
STYLE_PHRASES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\b(?i:in\s+the\s+style\s+of|in\s+the\s+manner\s+of|styled\s+after|inspired\s+by|(?:à|a)\s+la(?=\s+[A-Z]))"
                r"(?:\s+(?:the\s+)?[A-Z][\w'\-]*)*"), "reference"),
    (re.compile(r"\bart\s+(?:deco|nouveau)\b", re.IGNORECASE), "movement"),
    (re.compile(r"\bpop\s+art\b", re.IGNORECASE), "movement"),
    (re.compile(r"\bfilm\s+noir\b", re.IGNORECASE), "movement"),
    (re.compile(r"\bblack\s+and\s+white\b", re.IGNORECASE), "colour"),
    (re.compile(r"\bdepth\s+of\s+field\b", re.IGNORECASE), "medium"),
)
# The last part of a hyphenated compound that makes it a look, whatever comes first ("sun-drenched",
# "pastel-hued", "neon-lit", "candle-lit", "rain-soaked", "sepia-toned").
_LOOK_SUFFIXES = {
    "lit": "lighting", "drenched": "lighting", "kissed": "lighting", "washed": "colour", "hued": "colour",
    "toned": "colour", "tinted": "colour", "coloured": "colour", "colored": "colour", "saturated": "colour",
    "soaked": "mood", "style": "reference", "styled": "reference", "esque": "reference", "like": "reference",
}


def _phrase_with_capitals(match: re.Match, text: str) -> str:
    """A reference phrase keeps only the capitalised name that follows it ("in the style of Van Gogh")."""
    return text[match.start():match.end()].strip()


def _token_kind(token: str) -> str | None:
    kind = _ALL.get(token)
    if kind is not None or "-" not in token:
        return kind
    parts = [p for p in token.split("-") if p]
    if parts and parts[-1] in _LOOK_SUFFIXES:
        return _LOOK_SUFFIXES[parts[-1]]
    for part in parts:  # "black-and-white", "neon-pink": any part that is a style word
        if part in _ALL:
            return _ALL[part]
    return None


def find_style_words(text: str) -> list[tuple[str, str]]:
    """Return (word or phrase, kind) for every style descriptor in `text`, in order of appearance, without
    repeats: single words, hyphenated compounds, multi-word names of movements and looks, and references to
    an artist ("in the style of Van Gogh"). Phrases are returned as written, so they can be cut out whole."""
    found: list[tuple[int, str, str]] = []
    covered: list[tuple[int, int]] = []
    for pattern, kind in STYLE_PHRASES:
        for match in pattern.finditer(text):
            if match.group(0).strip():
                found.append((match.start(), _phrase_with_capitals(match, text), kind))
                covered.append((match.start(), match.end()))
    for match in _TOKEN.finditer(text):
        if any(a <= match.start() < b for a, b in covered):
            continue
        token = match.group(0).lower()
        kind = _token_kind(token)
        if kind is not None:
            found.append((match.start(), token, kind))
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _, word, kind in sorted(found):
        if word.lower() not in seen:
            seen.add(word.lower())
            out.append((word, kind))
    return out

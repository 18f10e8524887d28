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
        brushstroke textured stippled crosshatched airbrushed""".split()
    ),
    "mood": frozenset(
        """moody melancholic melancholy dreamy ethereal whimsical serene eerie ominous nostalgic
        romantic mysterious cozy cosy gritty surreal atmospheric somber sombre cheerful joyful
        haunting tranquil peaceful vintage retro aesthetic stylized stylised minimalist""".split()
    ),
}

_ALL = {word: kind for kind, words in STYLE_WORDS.items() for word in words}
_TOKEN = re.compile(r"[a-zA-Z][a-zA-Z0-9_\-]*")  # "zxy_neon" is one token: a trigger is not a style word


def find_style_words(text: str) -> list[tuple[str, str]]:
    """Return (word, kind) for every style descriptor in `text`, in order of appearance, without repeats."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for token in _TOKEN.findall(text.lower()):
        kind = _ALL.get(token)
        if kind is not None and token not in seen:
            seen.add(token)
            found.append((token, kind))
    return found

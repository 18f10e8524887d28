"""L1 style extraction: 1–10 reference images -> STYLE_PROFILE, computed once per LoRA and kept in its manifest.

MUST_APPLY holds what every prompt must carry (COLOR with the exact measured palette, TEXTURE, LIGHTING,
MOOD); ENRICH holds what a prompt may borrow (SIGNATURE_ELEMENTS, WARDROBE_LANGUAGE, ENVIRONMENT, CAMERA).
The palette is always measured from the pixels (k-means in Lab), so it is exact whoever writes the words:
Gemini when a client is available, or the offline fallback, which turns image statistics into words.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

from PIL import Image
from pydantic import BaseModel, Field, field_validator

from gemini.client import GeminiClient, GeminiError, image_hash
from gemini.image_stats import ImageSetStats, PaletteEntry, measure_images
from gemini.policy import TextStagePolicy

logger = logging.getLogger("klein.gemini")

SCHEMA_VERSION = 1
PROMPT_VERSION = "profile/1"
MAX_REFS = 10

# Words that flatten saturation; a vivid style must never be described with them.
FLATTENING_WORDS = frozenset(
    """muted desaturated washed-out washed faded dull drab greyed grayed subdued pale pastel
    monochrome monochromatic""".split()
)


# -- schema -------------------------------------------------------------------------------------------
class PaletteColour(BaseModel):
    hex: str = Field(pattern=r"^#[0-9a-f]{6}$")
    name: str
    share: float = Field(ge=0, le=1)


class ColourSpec(BaseModel):
    palette: list[PaletteColour] = Field(min_length=1, max_length=8)
    description: str  # how the palette is used, saturation and mood kept
    saturation: Literal["low", "medium", "high"]
    temperature: Literal["warm", "neutral", "cool"]


class MustApply(BaseModel):
    COLOR: ColourSpec
    TEXTURE: str
    LIGHTING: str
    MOOD: str


class WardrobeLanguage(BaseModel):
    """Wardrobe in the style's terms, per gender, so L2 can restyle clothes for the prompt's subject."""

    general: str
    feminine: str
    masculine: str


class Enrich(BaseModel):
    SIGNATURE_ELEMENTS: list[str] = Field(min_length=1, max_length=8)
    WARDROBE_LANGUAGE: WardrobeLanguage
    ENVIRONMENT: str
    CAMERA: str


class StyleProfile(BaseModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    MUST_APPLY: MustApply
    ENRICH: Enrich
    PROMPT_SUFFIX_MUST: str
    PROMPT_SUFFIX_ENRICH: str
    source: Literal["gemini", "offline"]
    model: str | None = None
    prompt_version: str = PROMPT_VERSION
    n_refs: int
    ref_hashes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    measurements: dict = Field(default_factory=dict)

    def to_manifest(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_manifest(cls, data: dict) -> "StyleProfile":
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"STYLE_PROFILE schema_version {version!r} is not supported "
                f"(this code reads version {SCHEMA_VERSION}); "
                "re-extract the profile from the LoRA's refs"
            )
        return cls.model_validate(data)

    @property
    def palette_names(self) -> list[str]:
        return [c.name for c in self.MUST_APPLY.COLOR.palette]


class ProfileAnswer(BaseModel):
    """What Gemini writes; the palette, saturation and temperature come from the measurements."""

    COLOR_DESCRIPTION: str = Field(min_length=3)
    TEXTURE: str = Field(min_length=3)
    LIGHTING: str = Field(min_length=3)
    MOOD: str = Field(min_length=3)
    SIGNATURE_ELEMENTS: list[str] = Field(min_length=1, max_length=8)
    WARDROBE_GENERAL: str = Field(min_length=3)
    WARDROBE_FEMININE: str = Field(min_length=3)
    WARDROBE_MASCULINE: str = Field(min_length=3)
    ENVIRONMENT: str = Field(min_length=3)
    CAMERA: str = Field(min_length=3)
    PROMPT_SUFFIX_MUST: str = Field(min_length=3)
    PROMPT_SUFFIX_ENRICH: str = Field(min_length=3)

    @field_validator("SIGNATURE_ELEMENTS")
    @classmethod
    def _non_empty_elements(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip() for v in value if v and v.strip()]
        if not cleaned:
            raise ValueError("SIGNATURE_ELEMENTS needs at least one element")
        return cleaned


# -- shared helpers -----------------------------------------------------------------------------------
def join_words(words: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    words = [w for w in words if w]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def select_refs(images: Sequence[Image.Image], limit: int = MAX_REFS) -> tuple[list[Image.Image], list[str]]:
    """At most `limit` refs, evenly spaced through the list (deterministic); warns when some were left out."""
    if not images:
        raise ValueError("a STYLE_PROFILE needs at least one reference image")
    if len(images) <= limit:
        return list(images), []
    step = len(images) / limit
    chosen = [images[int(i * step)] for i in range(limit)]
    return chosen, [f"{len(images)} refs given; the profile uses {limit} evenly spaced ones"]


def saturation_level(stats: ImageSetStats) -> Literal["low", "medium", "high"]:
    # The 90th percentile counts too: a vivid accent on a neutral field is a saturated style, not a muted one.
    if stats.peak_chroma > 48 or stats.mean_chroma > 32:
        return "high"
    if stats.peak_chroma < 26 or stats.mean_chroma < 8:
        return "low"
    return "medium"


def temperature_level(stats: ImageSetStats) -> Literal["warm", "neutral", "cool"]:
    if stats.light_temperature > 8 or (stats.mean_chroma > 12 and stats.warm_fraction > 0.8):
        return "warm"
    if stats.light_temperature < -3 or (stats.mean_chroma > 12 and stats.warm_fraction < 0.25):
        return "cool"
    return "neutral"


def _measured_palette(stats: ImageSetStats) -> list[PaletteColour]:
    return [PaletteColour(hex=p.hex, name=p.name, share=p.share) for p in stats.palette[:8]]


def _measurement_summary(stats: ImageSetStats) -> dict:
    keys = (
        "n_images mean_lightness contrast shadow_fraction highlight_fraction mean_chroma peak_chroma hue_spread "
        "dominant_hue warm_fraction light_temperature edge_density high_frequency grain centre_sharpness_ratio vignette"
    ).split()
    summary = {k: round(float(getattr(stats, k)), 4) for k in keys}
    summary["palette"] = [{"hex": p.hex, "name": p.name, "share": p.share, "chroma": p.chroma} for p in stats.palette]
    return summary


# -- offline words ------------------------------------------------------------------------------------
def _chromatic(stats: ImageSetStats, min_chroma: float = 12) -> list[PaletteEntry]:
    return [p for p in stats.palette if p.chroma >= min_chroma]


def _neutral(stats: ImageSetStats, max_chroma: float = 12) -> list[PaletteEntry]:
    return [p for p in stats.palette if p.chroma < max_chroma]


def offline_colour_description(stats: ImageSetStats, saturation: str, temperature: str) -> str:
    names = join_words([p.name for p in stats.palette[:4]])
    if stats.peak_chroma < 8:
        lead = f"a near-monochrome palette of {names}"
    elif saturation == "high":
        lead = f"a rich, saturated palette of {names}, colours kept at full strength"
    elif saturation == "medium":
        lead = f"a natural-strength palette of {names}"
    else:
        lead = f"a muted, low-saturation palette of {names}"
    if stats.hue_spread < 0.15 and stats.peak_chroma >= 8:
        lead += ", in closely related hues"
    elif stats.hue_spread > 0.6:
        lead += ", with contrasting hues side by side"
    return f"{lead}; {temperature} overall" if temperature != "neutral" else f"{lead}; neutral colour balance"


def offline_lighting_words(stats: ImageSetStats, temperature: str) -> list[str]:
    words: list[str] = []
    if stats.mean_lightness < 35:
        words.append("low-key exposure")
    elif stats.mean_lightness > 62:
        words.append("high-key, bright exposure")
    else:
        words.append("balanced mid-key exposure")
    if stats.contrast > 26:
        words.append("high contrast")
    elif stats.contrast < 14:
        words.append("soft, low contrast")
    else:
        words.append("moderate contrast")
    words.append({"warm": "warm light", "cool": "cool light", "neutral": "neutral white light"}[temperature])
    if stats.shadow_fraction > 0.25:
        words.append("deep black shadows")
    if stats.highlight_fraction > 0.15:
        words.append("bright clipped highlights")
    return words


_MOOD_TABLE = {
    ("dark", "low"): ["brooding", "somber"],
    ("dark", "medium"): ["moody", "quiet"],
    ("dark", "high"): ["dramatic", "intense"],
    ("mid", "low"): ["calm", "understated"],
    ("mid", "medium"): ["grounded", "natural"],
    ("mid", "high"): ["bold", "lively"],
    ("bright", "low"): ["airy", "gentle"],
    ("bright", "medium"): ["fresh", "open"],
    ("bright", "high"): ["cheerful", "energetic"],
}


def offline_mood_words(stats: ImageSetStats, saturation: str, temperature: str) -> list[str]:
    """Mood from luminance x saturation; never a flattening word when the style is saturated."""
    key = "dark" if stats.mean_lightness < 38 else "bright" if stats.mean_lightness > 62 else "mid"
    words = list(_MOOD_TABLE[(key, saturation)])
    if temperature == "warm":
        words.append("warm and intimate")
    elif temperature == "cool":
        words.append("cool and detached")
    if stats.hue_spread > 0.6 and stats.peak_chroma > 20:
        words.append("playful")
    elif stats.hue_spread < 0.15 and stats.peak_chroma > 20:
        words.append("cohesive")
    return words


def offline_texture_words(stats: ImageSetStats) -> list[str]:
    words: list[str] = []
    if stats.edge_density > 0.35:
        words.append("dense, intricate fine detail with rough, tactile surfaces")
    elif stats.edge_density > 0.18:
        words.append("crisp, well-defined detail")
    elif stats.edge_density > 0.07:
        words.append("moderate detail between smooth areas")
    else:
        words.append("smooth surfaces and soft, gentle gradients")
    if stats.high_frequency > 0.3:
        words.append("fine-grained high-frequency texture")
    elif stats.high_frequency < 0.05:
        words.append("clean, soft rendering")
    if stats.grain > 0.8:
        words.append("visible grain")
    return words


def offline_camera_words(stats: ImageSetStats) -> list[str]:
    if stats.aspect_ratio > 1.2:
        words = ["landscape framing"]
    elif stats.aspect_ratio < 0.85:
        words = ["portrait framing"]
    else:
        words = ["near-square framing"]
    if stats.centre_sharpness_ratio > 1.8:
        words.append("shallow depth of field, a sharp subject against a soft background")
    else:
        words.append("deep focus, sharp from front to back")
    if stats.vignette > 15:
        words.append("a dark vignette around the frame")
    return words


def offline_signature_elements(stats: ImageSetStats) -> list[str]:
    elements = [f"a {join_words([p.name for p in stats.palette[:3]])} colour scheme"]
    accents = [p for p in stats.palette if p.chroma > 35 and p.share < 0.3]
    if accents:
        accent = max(accents, key=lambda p: p.chroma)
        elements.append(f"{accent.name} accents")
    if stats.shadow_fraction > 0.25:
        elements.append("large areas of deep shadow")
    if stats.grain > 0.8:
        elements.append("visible grain")
    if stats.centre_sharpness_ratio > 1.8:
        elements.append("soft, blurred backgrounds")
    if stats.vignette > 15:
        elements.append("a dark vignette")
    return elements


def _fabrics(stats: ImageSetStats) -> tuple[str, str, str]:
    if stats.edge_density > 0.3 or stats.grain > 1.0:
        return ("tweed", "wool", "linen")
    if stats.edge_density < 0.1 and stats.grain < 0.5:
        return ("silk", "satin", "cashmere")
    return ("cotton", "wool", "cashmere")


def offline_wardrobe(stats: ImageSetStats) -> WardrobeLanguage:
    chromatic = [p.name for p in _chromatic(stats)]
    neutral = [p.name for p in _neutral(stats)]
    colours = (chromatic + neutral) or ["neutral"]
    main = colours[0]
    second = colours[1] if len(colours) > 1 else main
    base = next((n for n in neutral if n != main), second)
    fabric_a, fabric_b, fabric_c = _fabrics(stats)
    return WardrobeLanguage(
        general=f"clothing in {main} and {second}, cut from {fabric_a}, {fabric_b} and {fabric_c}",
        feminine=f"a {main} {fabric_c} blouse or a {fabric_a} dress with {second} details",
        masculine=f"a {main} {fabric_b} jacket over a {base} shirt",
    )


def offline_environment(stats: ImageSetStats, temperature: str) -> str:
    tones = join_words([p.name for p in stats.palette[:3]])
    key = "low-key" if stats.mean_lightness < 35 else "high-key" if stats.mean_lightness > 62 else "even"
    light = {"warm": "warm", "cool": "cool", "neutral": "neutral"}[temperature]
    return f"surroundings built from {tones} tones under {light}, {key} light"


def offline_profile(images: Sequence[Image.Image], warnings: Sequence[str] = ()) -> StyleProfile:
    """STYLE_PROFILE from image statistics alone. Deterministic: the same images give the same profile."""
    refs, select_warnings = select_refs(images)
    stats = measure_images(refs)
    return _profile_from_stats(refs, stats, list(warnings) + select_warnings)


def _profile_from_stats(refs: Sequence[Image.Image], stats: ImageSetStats, warnings: list[str]) -> StyleProfile:
    saturation = saturation_level(stats)
    temperature = temperature_level(stats)
    colour = ColourSpec(
        palette=_measured_palette(stats),
        description=offline_colour_description(stats, saturation, temperature),
        saturation=saturation,
        temperature=temperature,
    )
    texture = ", ".join(offline_texture_words(stats))
    lighting = ", ".join(offline_lighting_words(stats, temperature))
    mood = ", ".join(offline_mood_words(stats, saturation, temperature))
    signature = offline_signature_elements(stats)
    camera = ", ".join(offline_camera_words(stats))
    suffix_must = f"{colour.description}, {texture}, {lighting}, {mood} mood"
    suffix_enrich = f"{join_words(signature)}, {camera}"
    return StyleProfile(
        MUST_APPLY=MustApply(COLOR=colour, TEXTURE=texture, LIGHTING=lighting, MOOD=mood),
        ENRICH=Enrich(
            SIGNATURE_ELEMENTS=signature,
            WARDROBE_LANGUAGE=offline_wardrobe(stats),
            ENVIRONMENT=offline_environment(stats, temperature),
            CAMERA=camera,
        ),
        PROMPT_SUFFIX_MUST=suffix_must,
        PROMPT_SUFFIX_ENRICH=suffix_enrich,
        source="offline",
        n_refs=len(refs),
        ref_hashes=[image_hash(r) for r in refs],
        warnings=warnings,
        measurements=_measurement_summary(stats),
    )


# -- Gemini -------------------------------------------------------------------------------------------
SYSTEM_INSTRUCTION = """You are an art director who writes a STYLE_PROFILE for an image-generation style.
You are shown reference images that share one visual style but show different subjects.
Describe only the STYLE (how things look), never the particular subjects of these images.
Rules:
- COLOR_DESCRIPTION: use the measured palette you are given (its colour names); say how the colours are used.
  Keep the measured saturation: a saturated palette must stay saturated; never call it muted, faded or pastel.
- TEXTURE, LIGHTING, MOOD: short, concrete phrases a text-to-image model understands.
- SIGNATURE_ELEMENTS: 2-6 recurring visual devices of the style (motifs, treatments), not subjects.
- WARDROBE_*: how clothes look in this style (fabrics, cuts, the palette's colours), for any subject,
  for a woman, and for a man.
- ENVIRONMENT: the kind of setting this style turns a generic setting into.
- CAMERA: framing, lens, depth of field, viewpoint.
- PROMPT_SUFFIX_MUST: one comma-separated phrase (15-40 words) carrying COLOR, TEXTURE, LIGHTING and MOOD.
- PROMPT_SUFFIX_ENRICH: one comma-separated phrase (10-30 words) with signature elements and camera.
Answer in the JSON schema given."""


def _measurement_prompt(stats: ImageSetStats, saturation: str, temperature: str) -> str:
    palette = "; ".join(f"{p.name} {p.hex} ({round(p.share * 100)}%)" for p in stats.palette)
    return (
        f"Measured palette (exact, k-means in Lab over all refs): {palette}.\n"
        f"Measured saturation: {saturation}. Light temperature: {temperature}. "
        f"Mean lightness {stats.mean_lightness:.0f}/100, contrast {stats.contrast:.0f} (std of L*).\n"
        "Write the STYLE_PROFILE for the style these images share."
    )


def _flattening_words(text: str) -> list[str]:
    tokens = {t.strip(".,;:!?()").lower() for t in text.split()}
    return sorted(tokens & FLATTENING_WORDS)


def _profile_from_answer(
    answer: ProfileAnswer, refs: Sequence[Image.Image], stats: ImageSetStats, model: str, warnings: list[str]
) -> StyleProfile:
    saturation = saturation_level(stats)
    temperature = temperature_level(stats)
    if saturation == "high":
        flattening = _flattening_words(" ".join([answer.COLOR_DESCRIPTION, answer.MOOD, answer.PROMPT_SUFFIX_MUST]))
        if flattening:
            warnings.append(
                f"Gemini described a saturated style with flattening words {flattening}; kept, but L2 drops them"
            )
    return StyleProfile(
        MUST_APPLY=MustApply(
            COLOR=ColourSpec(
                palette=_measured_palette(stats),
                description=answer.COLOR_DESCRIPTION.strip(),
                saturation=saturation,
                temperature=temperature,
            ),
            TEXTURE=answer.TEXTURE.strip(),
            LIGHTING=answer.LIGHTING.strip(),
            MOOD=answer.MOOD.strip(),
        ),
        ENRICH=Enrich(
            SIGNATURE_ELEMENTS=answer.SIGNATURE_ELEMENTS[:8],
            WARDROBE_LANGUAGE=WardrobeLanguage(
                general=answer.WARDROBE_GENERAL.strip(),
                feminine=answer.WARDROBE_FEMININE.strip(),
                masculine=answer.WARDROBE_MASCULINE.strip(),
            ),
            ENVIRONMENT=answer.ENVIRONMENT.strip(),
            CAMERA=answer.CAMERA.strip(),
        ),
        PROMPT_SUFFIX_MUST=answer.PROMPT_SUFFIX_MUST.strip(),
        PROMPT_SUFFIX_ENRICH=answer.PROMPT_SUFFIX_ENRICH.strip(),
        source="gemini",
        model=model,
        n_refs=len(refs),
        ref_hashes=[image_hash(r) for r in refs],
        warnings=warnings,
        measurements=_measurement_summary(stats),
    )


def extract_style_profile(
    images: Sequence[Image.Image],
    client: GeminiClient | None = None,
    *,
    policy: TextStagePolicy | None = None,
) -> StyleProfile:
    """STYLE_PROFILE of 1–10 refs (more are subsampled). Never raises because of Gemini: falls back offline.

    `client=None` or a client without a key gives the offline profile (with a warning saying so); a
    `policy` that skips the text stage (1–3 refs) does too, with the policy's reason.
    """
    refs, warnings = select_refs(images)
    stats = measure_images(refs)
    if policy is not None and not policy.use_gemini:
        return _profile_from_stats(refs, stats, warnings + [f"offline profile: {policy.reason}"])
    if client is None or not client.available:
        why = "no Gemini client given" if client is None else "no Gemini API key (GEMINI_API_KEY)"
        return _profile_from_stats(refs, stats, warnings + [f"offline profile: {why}"])
    saturation = saturation_level(stats)
    temperature = temperature_level(stats)
    parts: list = []
    for i, ref in enumerate(refs, 1):
        parts += [f"Reference image {i}:", ref]
    parts.append(_measurement_prompt(stats, saturation, temperature))
    try:
        answer = client.generate(
            "profile", parts, ProfileAnswer, system_instruction=SYSTEM_INSTRUCTION, prompt_version=PROMPT_VERSION
        )
    except GeminiError as e:
        logger.warning("STYLE_PROFILE from Gemini failed (%s); using the offline profile", e)
        return _profile_from_stats(refs, stats, warnings + [f"offline profile: Gemini failed: {e}"])
    return _profile_from_answer(answer.value, refs, stats, answer.model, warnings)

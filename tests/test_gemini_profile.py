"""L1 STYLE_PROFILE: offline words on real photographs, the schema, and Gemini through the protocol server."""

from __future__ import annotations

import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photographs")

from gemini.client import GeminiClient, GeminiConfig  # noqa: E402
from gemini.policy import text_stage_policy  # noqa: E402
from gemini.profile import (  # noqa: E402
    SCHEMA_VERSION,
    StyleProfile,
    extract_style_profile,
    offline_profile,
)

try:
    from tests.gemini_server import GeminiProtocolServer, client_for
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import GeminiProtocolServer, client_for

# Colour names a person would use for each family (the offline namer picks from gemini/colour.py's table).
REDS_BROWNS = {
    "red",
    "crimson",
    "brick red",
    "maroon",
    "burgundy",
    "rust",
    "terracotta",
    "copper",
    "brown",
    "dark brown",
    "chocolate",
    "sienna",
    "caramel",
    "camel",
    "burnt orange",
    "umber",
    "tan",
    "beige",
}
BLUES = {"navy", "midnight blue", "denim", "slate blue", "steel blue", "blue", "cobalt", "slate gray", "indigo"}
DARKS = {"black", "charcoal", "dark gray"}


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


@pytest.fixture(scope="module")
def photos() -> dict[str, StyleProfile]:
    names = ["coffee", "rocket", "hubble_deep_field", "chelsea", "astronaut", "immunohistochemistry"]
    return {n: offline_profile([photo(n)]) for n in names}


def test_coffee_reads_warm_saturated_red_brown(photos):
    profile = photos["coffee"]
    colour = profile.MUST_APPLY.COLOR
    assert colour.saturation == "high" and colour.temperature == "warm"
    top = [c.name for c in colour.palette[:4]]
    assert len(set(top) & REDS_BROWNS) >= 3, top
    assert "warm light" in profile.MUST_APPLY.LIGHTING
    assert "saturated" in colour.description
    # a saturated style is never described with flattening words
    text = " ".join([colour.description, profile.MUST_APPLY.MOOD, profile.PROMPT_SUFFIX_MUST]).lower()
    assert not any(w in text for w in ("muted", "faded", "washed", "pastel", "dull"))
    assert "shallow depth of field" in profile.ENRICH.CAMERA  # the cup is sharp, the table falls off


def test_rocket_at_dusk_reads_cool_dark_blue(photos):
    profile = photos["rocket"]
    colour = profile.MUST_APPLY.COLOR
    assert colour.temperature == "cool"
    top = [c.name for c in colour.palette[:3]]
    assert len(set(top) & (BLUES | DARKS)) == 3, top
    assert colour.palette[0].name in BLUES
    assert "low-key" in profile.MUST_APPLY.LIGHTING and "cool light" in profile.MUST_APPLY.LIGHTING
    assert colour.saturation != "high"


def test_deep_field_reads_black_low_key_fine_grained(photos):
    profile = photos["hubble_deep_field"]
    colour = profile.MUST_APPLY.COLOR
    assert colour.palette[0].name == "black" and colour.palette[0].share > 0.8
    assert "near-monochrome" in colour.description
    assert "low-key" in profile.MUST_APPLY.LIGHTING and "deep black shadows" in profile.MUST_APPLY.LIGHTING
    assert "fine-grained" in profile.MUST_APPLY.TEXTURE
    assert any(w in profile.MUST_APPLY.MOOD for w in ("brooding", "somber", "moody"))


def test_cat_reads_soft_earthy_not_vivid(photos):
    profile = photos["chelsea"]
    colour = profile.MUST_APPLY.COLOR
    assert colour.saturation in ("low", "medium") and colour.temperature == "warm"
    assert {c.name for c in colour.palette} & {"caramel", "brown", "tan", "camel", "taupe", "chocolate"}
    assert "low contrast" in profile.MUST_APPLY.LIGHTING


def test_astronaut_has_an_orange_accent_and_high_contrast(photos):
    profile = photos["astronaut"]
    assert "high contrast" in profile.MUST_APPLY.LIGHTING
    names = {c.name for c in profile.MUST_APPLY.COLOR.palette}
    assert names & {"orange", "burnt orange", "terracotta", "coral", "rust", "copper"}
    assert names & {"white", "off-white", "silver", "light gray"}
    assert names & DARKS


def test_textures_from_edges_and_frequencies():
    rough = offline_profile([photo("gravel")]).MUST_APPLY.TEXTURE
    smooth = offline_profile([photo("moon")]).MUST_APPLY.TEXTURE
    assert "intricate" in rough or "rough" in rough
    assert "smooth" in smooth


def test_offline_profile_is_deterministic_and_complete(photos):
    again = offline_profile([photo("coffee")])
    assert again == photos["coffee"]
    profile = photos["immunohistochemistry"]
    assert profile.source == "offline" and profile.schema_version == SCHEMA_VERSION
    for text in (
        profile.MUST_APPLY.TEXTURE,
        profile.MUST_APPLY.LIGHTING,
        profile.MUST_APPLY.MOOD,
        profile.ENRICH.ENVIRONMENT,
        profile.ENRICH.CAMERA,
        profile.PROMPT_SUFFIX_MUST,
        profile.PROMPT_SUFFIX_ENRICH,
        profile.ENRICH.WARDROBE_LANGUAGE.feminine,
        profile.ENRICH.WARDROBE_LANGUAGE.masculine,
    ):
        assert text.strip()
    assert profile.ENRICH.SIGNATURE_ELEMENTS
    assert all(c.hex.startswith("#") and len(c.hex) == 7 for c in profile.MUST_APPLY.COLOR.palette)
    assert abs(sum(c.share for c in profile.MUST_APPLY.COLOR.palette) - 1) < 0.01


def test_manifest_round_trip_and_version_check(photos):
    data = photos["rocket"].to_manifest()
    assert StyleProfile.from_manifest(data) == photos["rocket"]
    with pytest.raises(ValueError, match="schema_version 99 is not supported"):
        StyleProfile.from_manifest({**data, "schema_version": 99})


def test_more_than_ten_refs_are_subsampled():
    refs = [Image.new("RGB", (32, 32), (i * 20, 100, 200 - i * 10)) for i in range(12)]
    profile = offline_profile(refs)
    assert profile.n_refs == 10 and len(profile.ref_hashes) == 10
    assert any("12 refs given" in w for w in profile.warnings)
    with pytest.raises(ValueError, match="at least one reference image"):
        offline_profile([])


# -- through Gemini -----------------------------------------------------------------------------------
GEMINI_PROFILE = {
    "COLOR_DESCRIPTION": "deep navy and denim blues with charcoal, cool and quiet",
    "TEXTURE": "smooth gradients, clean edges",
    "LIGHTING": "dusk light, low-key, cool ambient glow with small warm points of light",
    "MOOD": "still, expectant, nocturnal",
    "SIGNATURE_ELEMENTS": ["tiny warm lights against a cool field", "tall vertical structures"],
    "WARDROBE_GENERAL": "technical fabrics in navy and slate",
    "WARDROBE_FEMININE": "a navy wool coat with a slate scarf",
    "WARDROBE_MASCULINE": "a charcoal flight jacket over a denim shirt",
    "ENVIRONMENT": "an open launch field at blue hour",
    "CAMERA": "wide lens, low viewpoint, deep focus",
    "PROMPT_SUFFIX_MUST": "navy and denim palette, smooth gradients, low-key cool dusk light, still nocturnal mood",
    "PROMPT_SUFFIX_ENRICH": "tiny warm lights, tall verticals, wide low-angle shot",
}


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


def test_gemini_profile_keeps_the_measured_palette(server):
    server.push_json(GEMINI_PROFILE)
    refs = [photo("rocket"), photo("hubble_deep_field")]
    profile = extract_style_profile(refs, client=client_for(server))
    assert profile.source == "gemini" and profile.model == "gemini-2.5-pro"
    assert profile.MUST_APPLY.MOOD == GEMINI_PROFILE["MOOD"]
    assert profile.ENRICH.WARDROBE_LANGUAGE.masculine == GEMINI_PROFILE["WARDROBE_MASCULINE"]
    assert profile.PROMPT_SUFFIX_MUST == GEMINI_PROFILE["PROMPT_SUFFIX_MUST"]
    # the palette is the measured one, not Gemini's guess
    assert profile.MUST_APPLY.COLOR.palette == offline_profile(refs).MUST_APPLY.COLOR.palette
    [request] = server.requests
    assert request.path.endswith("/models/gemini-2.5-pro:generateContent")
    assert len(request.images) == 2
    assert profile.MUST_APPLY.COLOR.palette[0].hex in request.prompt_text  # Gemini is told the exact palette
    assert request.schema_title == "ProfileAnswer"


def test_gemini_profile_failures_fall_back_offline(server):
    server.push_text("{not json")
    server.push_empty_candidate()
    profile = extract_style_profile([photo("coffee")], client=client_for(server))
    assert profile.source == "offline"
    assert any("Gemini failed" in w for w in profile.warnings)
    assert profile.MUST_APPLY.COLOR.saturation == "high"


def test_gemini_incomplete_profile_is_a_bad_answer(server):
    incomplete = {k: v for k, v in GEMINI_PROFILE.items() if k != "CAMERA"}
    server.push_json(incomplete)
    server.push_json(incomplete)
    profile = extract_style_profile([photo("coffee")], client=client_for(server))
    assert profile.source == "offline" and len(server.requests) == 2


def test_gemini_safety_block_falls_back_offline(server):
    server.push_blocked("candidate")
    profile = extract_style_profile([photo("coffee")], client=client_for(server))
    assert profile.source == "offline" and any("SAFETY" in w for w in profile.warnings)


def test_cached_profile_costs_nothing_on_a_rerun(server, tmp_path):
    server.push_json(GEMINI_PROFILE)
    refs = [photo("rocket")]
    first = extract_style_profile(refs, client=client_for(server, cache_uri=str(tmp_path)))
    second = extract_style_profile(refs, client=client_for(server, cache_uri=str(tmp_path)))
    assert first == second and second.source == "gemini"
    assert len(server.requests) == 1


def test_no_key_and_policy_give_offline_profiles(server):
    no_key = extract_style_profile([photo("coffee")], client=GeminiClient(GeminiConfig.from_env({})))
    assert no_key.source == "offline" and "GEMINI_API_KEY" in no_key.warnings[0]
    skipped = extract_style_profile([photo("coffee")], client=client_for(server), policy=text_stage_policy(3))
    assert skipped.source == "offline" and "1–3 refs" in skipped.warnings[0]
    assert server.requests == []

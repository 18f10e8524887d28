"""L2 reformulation: the seed's rules offline, and Gemini through the protocol server with checks and retry."""

from __future__ import annotations

import pytest

from gemini.client import GeminiClient, GeminiConfig
from gemini.profile import ColourSpec, Enrich, MustApply, PaletteColour, StyleProfile, WardrobeLanguage
from gemini.rewrite import MAX_WORDS, MIN_WORDS, check_reformulation, reformulate, subject_gender, weave_offline

try:
    from tests.gemini_server import GeminiProtocolServer, client_for
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import GeminiProtocolServer, client_for

TRIGGER = "klnstyle"


def rose_profile(saturation: str = "high") -> StyleProfile:
    return StyleProfile(
        MUST_APPLY=MustApply(
            COLOR=ColourSpec(
                palette=[
                    PaletteColour(hex="#c08a92", name="dusty rose", share=0.4),
                    PaletteColour(hex="#1e7878", name="teal", share=0.3),
                    PaletteColour(hex="#efece4", name="off-white", share=0.2),
                    PaletteColour(hex="#34363a", name="charcoal", share=0.1),
                ],
                description="saturated dusty rose against deep teal, kept rich",
                saturation=saturation,
                temperature="neutral",
            ),
            TEXTURE="soft film grain, velvety surfaces",
            LIGHTING="soft window light from the side, gentle shadows",
            MOOD="wistful, intimate",
        ),
        ENRICH=Enrich(
            SIGNATURE_ELEMENTS=["sheer curtains", "a single brass object catching the light"],
            WARDROBE_LANGUAGE=WardrobeLanguage(
                general="soft knits and cashmere in dusty rose and teal",
                feminine="a dusty rose cashmere sweater with a teal silk skirt",
                masculine="a teal wool overcoat over a charcoal turtleneck",
            ),
            ENVIRONMENT="a quiet nineteenth-century parlour with teal walls",
            CAMERA="50mm lens, eye level, shallow depth of field",
        ),
        PROMPT_SUFFIX_MUST=(
            "dusty rose and teal palette, soft film grain, soft side window light, wistful intimate mood"
        ),
        PROMPT_SUFFIX_ENRICH="sheer curtains, brass accents, 50mm shallow depth of field",
        source="offline",
        n_refs=5,
    )


GOOD_REWRITE = (
    f"{TRIGGER}. A young woman stands in a quiet nineteenth-century parlour with teal walls, her hands resting on the "
    "back of a velvet chair as she looks toward the window. She wears a dusty rose cashmere sweater with soft ruffled "
    "cuffs and a teal silk skirt that falls to her ankles. Sheer curtains drift in the draught and a single brass "
    "candlestick on the mantel catches the light. The composition is intimate, framed at eye level with a 50mm lens "
    "and a shallow depth of field that lets the far wall melt into soft teal. Every surface carries a fine velvety "
    "texture, and the colours stay rich and deep rather than faint. The light falls from the side across her face "
    "and shoulders, leaving gentle shadows on the floorboards. dusty rose and teal palette, soft film grain, soft "
    "side window light, wistful intimate mood"
)


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


# -- offline ------------------------------------------------------------------------------------------
def test_offline_weaving_follows_the_seed_rules():
    profile = rose_profile()
    result = reformulate(profile, "a woman in a pink ruffle blouse standing in a park", trigger=TRIGGER)
    text = result.prompt
    assert result.source == "offline" and result.checks.passed, result.checks
    assert MIN_WORDS <= len(text.split()) <= MAX_WORDS
    assert text.startswith(f"{TRIGGER}. ")
    assert text.rstrip(".").endswith(profile.PROMPT_SUFFIX_MUST)
    assert "dusty rose ruffle blouse" in text and "pink" not in text  # the style decides colours
    assert profile.ENRICH.WARDROBE_LANGUAGE.feminine in text  # wardrobe adapts to a woman
    assert profile.ENRICH.WARDROBE_LANGUAGE.masculine not in text
    assert "park" in text and profile.ENRICH.ENVIRONMENT in text  # a generic setting becomes the style's own
    for element in profile.ENRICH.SIGNATURE_ELEMENTS:  # signature elements are always kept
        assert element in text
    assert "woman" in text  # the user decides the subject


def test_offline_wardrobe_for_a_man_and_no_setting():
    profile = rose_profile()
    result = reformulate(profile, "a man in a red shirt playing the cello", trigger=TRIGGER)
    assert result.checks.passed
    assert profile.ENRICH.WARDROBE_LANGUAGE.masculine in result.prompt
    assert "cello" in result.prompt and "playing" in result.prompt
    assert f"Set in {profile.ENRICH.ENVIRONMENT}" in result.prompt


def test_mood_words_never_flatten_a_saturated_palette():
    profile = rose_profile("high")
    result = reformulate(
        profile, "a muted, faded, desaturated portrait of an old sailor, dark and moody", trigger=TRIGGER
    )
    lowered = result.prompt.lower()
    for word in ("muted", "desaturated", "moody"):
        assert word not in lowered
    assert result.checks.saturation_kept and result.checks.passed
    assert "sailor" in lowered
    assert any("left to the style" in w for w in result.warnings)


def test_offline_without_trigger_and_determinism():
    profile = rose_profile()
    first = reformulate(profile, "a lighthouse on a cliff")
    assert first.checks.trigger_present is None and first.checks.passed
    assert first.prompt == reformulate(profile, "a lighthouse on a cliff").prompt
    assert not first.prompt.startswith(TRIGGER)


def test_a_long_user_prompt_still_fits():
    long_prompt = "a crowded harbour market with " + ", ".join(f"stall number {i} selling fish" for i in range(25))
    result = reformulate(rose_profile(), long_prompt, trigger=TRIGGER)
    assert result.checks.suffix_must_present and result.checks.trigger_present
    assert result.checks.word_count <= MAX_WORDS or any("too long" in w for w in result.warnings)


def test_checks_catch_each_failure():
    profile = rose_profile()
    prompt = "a woman walking a dog"
    assert check_reformulation(GOOD_REWRITE.replace("woman", "figure"), profile, prompt, TRIGGER).subject_kept is False
    short = f"{TRIGGER}. a woman walking a dog. {profile.PROMPT_SUFFIX_MUST}"
    assert check_reformulation(short, profile, prompt, TRIGGER).length_ok is False
    no_suffix = GOOD_REWRITE.replace("wistful intimate mood", "calm")
    assert check_reformulation(no_suffix, profile, "a young woman", TRIGGER).suffix_must_present is False
    assert (
        check_reformulation(GOOD_REWRITE.replace(TRIGGER, "x"), profile, "a young woman", TRIGGER).trigger_present
        is False
    )
    flattened = GOOD_REWRITE.replace("rich and deep", "muted and faded")
    assert check_reformulation(flattened, profile, "a young woman", TRIGGER).saturation_kept is False
    assert check_reformulation(GOOD_REWRITE, profile, "a young woman by a window", TRIGGER).passed


def test_subject_gender():
    assert subject_gender("a woman reading") == "feminine"
    assert subject_gender("an old man and his dog") == "masculine"
    assert subject_gender("a boy and a girl") == "neutral"
    assert subject_gender("a lighthouse") == "neutral"


def test_weave_offline_notes():
    text, notes = weave_offline(rose_profile(), "a woman in a pink dress in a room", TRIGGER)
    assert any("pink -> dusty rose" in n for n in notes)
    assert any("generic setting 'room'" in n for n in notes)


# -- through Gemini -----------------------------------------------------------------------------------
def test_gemini_rewrite_that_passes_the_checks(server):
    server.push_json({"prompt": GOOD_REWRITE})
    result = reformulate(rose_profile(), "a young woman by a window", trigger=TRIGGER, client=client_for(server))
    assert result.source == "gemini" and result.checks.passed and result.prompt == GOOD_REWRITE
    [request] = server.requests
    assert request.schema_title == "RewriteAnswer"
    assert "a young woman by a window" in request.prompt_text and "dusty rose" in request.prompt_text
    assert (
        f"TRIGGER: {TRIGGER}" in request.prompt_text
        and "SUBJECT GENDER (from the prompt): feminine" in request.prompt_text
    )


def test_gemini_rewrite_failing_checks_is_retried_with_feedback(server):
    server.push_json({"prompt": "a woman by a window, teal"})  # too short, no suffix, no trigger
    server.push_json({"prompt": GOOD_REWRITE})
    result = reformulate(rose_profile(), "a young woman by a window", trigger=TRIGGER, client=client_for(server))
    assert result.source == "gemini" and result.prompt == GOOD_REWRITE
    feedback = server.requests[1].prompt_text
    assert "failed these checks" in feedback and "PROMPT_SUFFIX_MUST is missing" in feedback
    assert "trigger word is missing" in feedback
    assert any("attempt 1" in w for w in result.warnings)


def test_gemini_rewrite_failing_twice_is_woven_offline(server):
    server.push_json({"prompt": "a woman"})
    server.push_json({"prompt": "a woman by a window"})
    result = reformulate(rose_profile(), "a young woman by a window", trigger=TRIGGER, client=client_for(server))
    assert result.source == "offline" and result.checks.passed
    assert any("failed the checks twice" in w for w in result.warnings)


@pytest.mark.parametrize("fault", ["status", "malformed", "blocked", "timeout"])
def test_gemini_faults_fall_back_to_offline(server, fault):
    for _ in range(4):
        if fault == "status":
            server.push_status(500)
        elif fault == "malformed":
            server.push_text('{"prompt": ')
        elif fault == "blocked":
            server.push_blocked("prompt")
        else:
            server.push_delay(2.0)
    client = client_for(server, max_retries=1, timeout_s=0.2)
    result = reformulate(rose_profile(), "a young woman by a window", trigger=TRIGGER, client=client)
    assert result.source == "offline" and result.checks.passed
    assert any("Gemini failed" in w for w in result.warnings)


def test_no_key_and_empty_prompt():
    result = reformulate(rose_profile(), "a cat", client=GeminiClient(GeminiConfig.from_env({})))
    assert result.source == "offline" and "GEMINI_API_KEY" in result.warnings[0]
    with pytest.raises(ValueError, match="prompt is empty"):
        reformulate(rose_profile(), "   ")


# -- every rule of the seed, checked against the profile (issue 20) -------------------------------------------
LAZY_REWRITE = (
    f"{TRIGGER}. A young woman in a pink ruffle blouse sits working at her desk in an office, typing on a laptop while a "
    "cup of coffee cools beside a stack of papers. Sheer curtains hang at the tall window behind her and the "
    "afternoon falls across the carpet. She looks up from the screen with a small smile as a colleague walks past "
    "the glass partition, and the printer hums in the corner near the potted plant. The desk holds a notebook, a "
    "pen and a framed photograph, and the chair is pushed back a little from the desk as she stretches her "
    "shoulders after a long morning of meetings and emails. dusty rose and teal palette, soft film grain, soft "
    "side window light, wistful intimate mood"
)


def test_an_answer_that_breaks_the_rules_is_reasked_naming_them_then_woven_offline(server):
    prompt = "a woman in a pink ruffle blouse working in an office"
    checks = check_reformulation(LAZY_REWRITE, rose_profile(), prompt, TRIGGER)
    assert checks.length_ok and checks.suffix_must_present and checks.trigger_present and checks.subject_kept
    assert checks.wardrobe_adapted is False and checks.setting_transformed is False and not checks.signature_kept
    assert checks.missing_signature == ["a single brass object catching the light"]
    server.push_json({"prompt": LAZY_REWRITE})
    server.push_json({"prompt": LAZY_REWRITE})
    result = reformulate(rose_profile(), prompt, trigger=TRIGGER, client=client_for(server))
    assert result.source == "offline" and result.checks.passed
    feedback = server.requests[1].prompt_text
    for rule in ("clothing is not adapted", "generic setting is not transformed", "signature elements are missing"):
        assert rule in feedback, rule
    assert "pink ruffle blouse" not in result.prompt


def test_the_colour_rule_names_the_main_palette_colours():
    text = GOOD_REWRITE.replace("dusty rose", "rose").replace("teal", "green")
    checks = check_reformulation(text, rose_profile(), "a young woman by a window", TRIGGER)
    assert not checks.colours_present and checks.missing_colours == ["dusty rose", "teal"]
    assert any("style's colours are missing: name dusty rose, teal" in f for f in checks.failures())

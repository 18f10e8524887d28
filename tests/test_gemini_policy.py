"""Text-stage policy: Gemini is skipped for 1–3 refs, and the reason is recorded."""

from __future__ import annotations

import pytest

from gemini.policy import text_stage_policy


@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_tiny_datasets_skip_gemini(n_refs):
    policy = text_stage_policy(n_refs)
    assert policy.use_gemini is False and policy.n_refs == n_refs
    assert "1–3 refs" in policy.reason and "hurt" in policy.reason


def test_two_refs_warn():
    assert any("2 refs" in w for w in text_stage_policy(2).warnings)
    assert text_stage_policy(3).warnings == []


@pytest.mark.parametrize("n_refs, recipe", [(4, "GEM+B"), (6, "GEM+B"), (12, "GEM+A"), (40, "any recipe")])
def test_larger_datasets_use_gemini(n_refs, recipe):
    policy = text_stage_policy(n_refs)
    assert policy.use_gemini is True and recipe in policy.reason


def test_manifest_and_errors():
    block = text_stage_policy(1).to_manifest()["text_stage"]
    assert block == {"use_gemini": False, "reason": text_stage_policy(1).reason, "n_refs": 1, "warnings": []}
    assert block["reason"].startswith("1 ref(s): the text stage is skipped for 1–3 refs"), block["reason"]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            text_stage_policy(bad)

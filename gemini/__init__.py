"""The text stage: Gemini client (retries, JSON schema, cache), captions, L1 STYLE_PROFILE, L2 reformulation,
pairwise judge, the 1–3-refs policy, and the deterministic offline fallback used when Gemini is not there.

Modules: client, captions, profile, rewrite, judge, policy, style_words, colour, image_stats.
"""

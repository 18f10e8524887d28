"""The style stage: L1 STYLE_PROFILE (stored with each LoRA, or extracted from uploaded images) and L2, the
user's prompt restated in the style's terms. Gemini when configured and allowed, the offline fallback
otherwise; the answer always says which (`gemini_source`) and why."""

from __future__ import annotations

import asyncio
import io
import logging

from ray import serve

log = logging.getLogger("klein.serve.style")


def with_triggers(prompt: str, triggers: list[str]) -> str:
    """The prompt with every LoRA trigger in front (training captions start with `<trigger>.`)."""
    missing = [t for t in triggers if t and t not in prompt]
    return ". ".join(missing + [prompt]) if missing else prompt


class StyleService:
    def __init__(self, gemini_mode: str = "auto"):
        from gemini.client import GeminiClient, GeminiConfig

        self.gemini_mode = gemini_mode
        self.client = GeminiClient(GeminiConfig.from_env())

    def _client_for(self, use_gemini: str):
        if use_gemini == "off" or self.gemini_mode == "off":
            return None
        return self.client

    def restyle(self, prompt: str, profile: dict | None, triggers: list[str], use_gemini: str = "auto",
                policy_allows: bool = True) -> dict:
        """The final prompt and where it came from.

        off: the prompt as given (triggers added). auto: L2 when the LoRA has a profile and its text-stage
        policy allows it (Gemini if a key is set, else offline weaving). on: L2 whenever there is a profile.
        """
        from gemini.profile import StyleProfile
        from gemini.rewrite import reformulate

        base = with_triggers(prompt.strip(), [])
        if use_gemini == "off" or profile is None or (use_gemini == "auto" and not policy_allows):
            reason = ("use_gemini=off" if use_gemini == "off" else "no style profile" if profile is None
                      else "the LoRA's text-stage policy skips Gemini")
            return {"prompt": with_triggers(base, triggers), "gemini_source": "none", "warnings": [f"L2 skipped: {reason}"]}
        trigger = triggers[0] if triggers else None
        try:
            style_profile = StyleProfile.from_manifest(profile)
        except ValueError as e:
            return {"prompt": with_triggers(base, triggers), "gemini_source": "none", "warnings": [f"L2 skipped: {e}"]}
        result = reformulate(style_profile, base, trigger=trigger, client=self._client_for(use_gemini))
        warnings = list(result.warnings)
        if use_gemini == "on" and result.source != "gemini":
            warnings.append("use_gemini=on but Gemini was not used: the offline fallback answered")
        return {"prompt": with_triggers(result.prompt, triggers),
                "gemini_source": result.source, "warnings": warnings}

    def profile_from_images(self, images: list[bytes], use_gemini: str = "auto") -> dict:
        from PIL import Image

        from gemini.profile import extract_style_profile

        pictures = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                pictures.append(im.convert("RGB"))
        profile = extract_style_profile(pictures, client=self._client_for(use_gemini))
        return profile.to_manifest()


@serve.deployment(name="StyleStage")
class StyleStage:
    def __init__(self, config: dict):
        from serve.config import ServeConfig

        self.service = StyleService(ServeConfig.from_any(config).gemini)

    async def restyle(self, prompt: str, profile: dict | None, triggers: list[str], use_gemini: str,
                      policy_allows: bool) -> dict:
        # Gemini calls block on the network: keep them off the replica's event loop
        return await asyncio.to_thread(self.service.restyle, prompt, profile, triggers, use_gemini, policy_allows)

    async def profile_from_images(self, images: list[bytes], use_gemini: str) -> dict:
        return await asyncio.to_thread(self.service.profile_from_images, images, use_gemini)

"""The style stage: L1 STYLE_PROFILE (stored with each LoRA, or extracted from uploaded images) and L2, the
user's prompt restated in the style's terms. Gemini when configured and allowed, the offline fallback
otherwise; the answer always says which (`gemini_source`) and why."""

from __future__ import annotations

import asyncio
import io
import logging

from PIL import Image
from ray import serve

from gemini.client import GeminiClient, GeminiConfig
from gemini.policy import text_stage_policy
from gemini.profile import StyleProfile, extract_style_profile
from gemini.rewrite import reformulate
from serve.config import ServeConfig

log = logging.getLogger("klein.serve.style")


def with_triggers(prompt: str, triggers: list[str]) -> str:
    """The prompt with every LoRA trigger in front (training captions start with `<trigger>.`)."""
    missing = [t for t in triggers if t and t not in prompt]
    return ". ".join(missing + [prompt]) if missing else prompt


class StyleService:
    def __init__(self, gemini_mode: str = "auto"):
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
        """{"profile", "text_stage"}: the seeds' refs policy decides whether Gemini is asked (1–3 pictures:
        no, unless `use_gemini` is "on": the user's explicit choice wins, with a warning)."""
        pictures = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                pictures.append(im.convert("RGB"))
        policy = text_stage_policy(len(pictures))
        text_stage = policy.model_dump(mode="json")
        client = self._client_for(use_gemini)
        override = use_gemini == "on" and not policy.use_gemini
        if override:
            text_stage["warnings"] = [*text_stage["warnings"], "use_gemini=on overrides the 1–3 refs policy"]
        text_stage["use_gemini"] = client is not None and client.available and (policy.use_gemini or override)
        profile = extract_style_profile(pictures, client=client, policy=None if override else policy)
        return {"profile": profile.to_manifest(), "text_stage": text_stage}


@serve.deployment(name="StyleStage")
class StyleStage:
    def __init__(self, config: dict):
        self.service = StyleService(ServeConfig.from_any(config).gemini)

    async def restyle(self, prompt: str, profile: dict | None, triggers: list[str], use_gemini: str,
                      policy_allows: bool) -> dict:
        # Gemini calls block on the network: keep them off the replica's event loop
        return await asyncio.to_thread(self.service.restyle, prompt, profile, triggers, use_gemini, policy_allows)

    async def profile_from_images(self, images: list[bytes], use_gemini: str) -> dict:
        return await asyncio.to_thread(self.service.profile_from_images, images, use_gemini)

"""When the Gemini text stage runs, from the number of reference images (DESIGN.md, "What the seeds found").

With 1–3 refs the seeds found that Gemini's text (captions, STYLE_PROFILE rewriting) hurts: the LoRA is
trained on trigger-only (or sidecar) captions and prompts go to the model as written, with the trigger.
The decision and its reason go into the LoRA manifest and the API's answers.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

MIN_REFS_FOR_GEMINI = 4


class TextStagePolicy(BaseModel):
    use_gemini: bool
    reason: str
    n_refs: int
    warnings: list[str] = Field(default_factory=list)

    def to_manifest(self) -> dict:
        return {"text_stage": self.model_dump(mode="json")}


def text_stage_policy(n_refs: int) -> TextStagePolicy:
    """Decide whether the Gemini text stage runs for a style with `n_refs` reference images."""
    if not isinstance(n_refs, int) or isinstance(n_refs, bool) or n_refs < 1:
        raise ValueError(
            f"n_refs must be a positive integer, got {n_refs!r}: a style needs at least one reference image"
        )
    warnings: list[str] = []
    if n_refs == 2:
        warnings.append("2 refs: no recipe trained reliably on 2 images in the seed runs; expect a weak style")
    if n_refs < MIN_REFS_FOR_GEMINI:
        return TextStagePolicy(
            use_gemini=False,
            reason=(
                f"{n_refs} ref(s): the text stage is skipped for 1–3 refs because Gemini text hurt tiny datasets "
                "in the seed runs; captions are trigger-only or from sidecars and prompts are not rewritten"
            ),
            n_refs=n_refs,
            warnings=warnings,
        )
    if n_refs < 10:
        reason = f"{n_refs} refs: Gemini captions and STYLE_PROFILE (the seeds' GEM+B recipe pairs them with rank 128)"
    elif n_refs < 30:
        reason = f"{n_refs} refs: Gemini captions and STYLE_PROFILE (the seeds' GEM+A recipe pairs them with rank 32)"
    else:
        reason = f"{n_refs} refs: Gemini captions and STYLE_PROFILE; any recipe works at this size"
    return TextStagePolicy(use_gemini=True, reason=reason, n_refs=n_refs, warnings=warnings)

"""What a style LoRA does to the mini model, measured by the exact world judge.

`lora_quality(pipe, lora, trigger, style)` draws the same (content, seed) pairs with the base model and with the
LoRA active (prompt "<trigger>. <content caption>"), and reports for each side `content_ok` (the judge recognises
the prompted content) and `style_prob` (the judge's probability of the target style). The demo, the example sweep
and the quality tests all measure through here, so they report the same numbers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from contracts import with_trigger
from evaluation import world
from evaluation.world_judge import WorldJudge
from klein.generate import GenerateRequest, generate_images, set_active_loras
from klein.lora import LoraWeights
from klein.mini import MINI_RESOLUTION

DEFAULT_CONTENTS = ("lighthouse", "cat", "boat", "house", "tree", "car")
MINI_STEPS = 28  # the sampler steps every mini quality figure uses
MINI_GUIDANCE = 4.0


@dataclass
class SideQuality:
    content_ok: float
    style_prob: float
    images: list[Image.Image] = field(repr=False, default_factory=list)


@dataclass
class LoraQuality:
    style: str
    base: SideQuality
    lora: SideQuality
    prompts: list[str]

    def as_dict(self) -> dict:
        return {
            "judge": "exact world judge (evaluation.world_judge)",
            "style": self.style,
            "n": len(self.prompts),
            "base": {"content_ok": self.base.content_ok, "style_prob": self.base.style_prob},
            "lora": {"content_ok": self.lora.content_ok, "style_prob": self.lora.style_prob},
        }


def draw(pipe, prompts: list[str], seeds: list[int], size: int, steps: int = MINI_STEPS,
         guidance: float = MINI_GUIDANCE) -> list[Image.Image]:
    return generate_images(pipe, [GenerateRequest(prompt=p, seed=s, steps=steps, width=size, height=size, guidance=guidance)
                                  for p, s in zip(prompts, seeds)])


def world_prompts(trigger: str, contents, seeds) -> tuple[list[str], list[int], list[str]]:
    """(prompts, seeds, contents) of every (content, seed) pair: "<trigger>. <world caption>", seed-major."""
    pairs = [(c, s) for s in seeds for c in contents]
    prompts = [with_trigger(trigger, world.caption(c, s)) for c, s in pairs]
    return prompts, [s for _, s in pairs], [c for c, _ in pairs]


def side_quality(pipe, lora: LoraWeights | None, trigger: str, style: str, contents=DEFAULT_CONTENTS, seeds=(0,),
                 size: int = MINI_RESOLUTION, steps: int = MINI_STEPS, weight: float = 1.0,
                 judge: WorldJudge | None = None) -> SideQuality:
    """One side of `lora_quality`: the (content, seed) prompts drawn with `lora` active (None: the base model),
    judged. The sweep's world judge calls it per cell and once per board for the base."""
    judge = judge or WorldJudge.load()
    prompts, pair_seeds, pair_contents = world_prompts(trigger, contents, seeds)
    if lora is None:
        set_active_loras(pipe, [])
        images = draw(pipe, prompts, pair_seeds, size, steps)
    else:
        adapter = f"quality_{id(lora):x}"  # a fresh name: a resident adapter of the same name would be reused
        set_active_loras(pipe, [(adapter, lora, weight)])
        try:
            images = draw(pipe, prompts, pair_seeds, size, steps)
        finally:
            set_active_loras(pipe, [])
            if getattr(pipe, "_klein_accel", None) is None:
                pipe.transformer.delete_adapters([adapter])
    figures = judge.summary(images, pair_contents, style)
    return SideQuality(figures["content_ok"], figures["style_prob"], images)


def lora_quality(pipe, lora: LoraWeights, trigger: str, style: str, contents=DEFAULT_CONTENTS, seeds=(0,),
                 size: int = MINI_RESOLUTION, steps: int = MINI_STEPS, weight: float = 1.0,
                 judge: WorldJudge | None = None) -> LoraQuality:
    """Base vs LoRA on the same (content, seed) pairs, both judged; the base is drawn from the same prompts
    (trigger included: to the base model it is an unknown word)."""
    judge = judge or WorldJudge.load()
    base = side_quality(pipe, None, trigger, style, contents, seeds, size, steps, weight, judge)
    after = side_quality(pipe, lora, trigger, style, contents, seeds, size, steps, weight, judge)
    return LoraQuality(style=style, base=base, lora=after, prompts=world_prompts(trigger, contents, seeds)[0])


def before_after_sheet(quality: LoraQuality, scale: int = 2) -> Image.Image:
    """Two rows (base, LoRA), one column per prompt, each tile upscaled `scale`x with nearest-neighbour."""
    tiles = [quality.base.images, quality.lora.images]
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (len(tiles[0]) * w * scale, 2 * h * scale), "white")
    for row, images in enumerate(tiles):
        for col, im in enumerate(images):
            sheet.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST), (col * w * scale, row * h * scale))
    return sheet

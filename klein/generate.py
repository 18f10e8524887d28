"""One image from a Klein pipeline with optional LoRAs: the code path shared by the CLI and the Serve generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from klein.lora import LoraWeights, add_lora

MAX_SIDE_DEFAULT = 2048


class GenerateError(ValueError):
    """A request the generator cannot run; the message names the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class GenerateRequest:
    prompt: str
    seed: int = 0
    steps: int = 50
    width: int = 1024
    height: int = 1024
    guidance: float = 4.0
    negative_prompt: str = ""
    max_sequence_length: int = 512
    extra: dict = field(default_factory=dict)

    def validate(self, max_side: int = MAX_SIDE_DEFAULT) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value > max_side or value % 16:
                raise GenerateError(f"{name} must be a multiple of 16 between 64 and {max_side}, got {value!r}", name)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 200:
            raise GenerateError(f"steps must be between 1 and 200, got {self.steps!r}", "steps")
        if not 0.0 <= float(self.guidance) <= 30.0:
            raise GenerateError(f"guidance must be between 0 and 30, got {self.guidance!r}", "guidance")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise GenerateError(f"seed must be an integer in [0, 2^63), got {self.seed!r}", "seed")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise GenerateError("prompt must be a non-empty string", "prompt")


def set_active_loras(pipe, loras: list[tuple[str, LoraWeights | None, float]]) -> None:
    """Activate exactly these adapters (name, weights-if-not-yet-loaded, weight) on the pipeline's transformer.

    An adapter already resident under `name` is reused; an empty list disables all adapters, so the base
    model runs unchanged.
    """
    transformer = pipe.transformer
    resident = set(getattr(transformer, "peft_config", {}) or {})
    for name, weights, _ in loras:
        if name not in resident:
            if weights is None:
                raise KeyError(f"adapter {name} is not resident and no weights were given")
            add_lora(transformer, weights, adapter_name=name)
    if loras:
        transformer.enable_adapters()
        transformer.set_adapters([n for n, _, _ in loras], [float(w) for _, _, w in loras])
    elif resident:
        transformer.disable_adapters()


def generate_image(
    pipe,
    request: GenerateRequest,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Run the pipeline for `request`. The same request (seed included) gives the same pixels."""
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    negative = None
    if request.guidance > 1.0 and request.negative_prompt:
        negative, _ = pipe.encode_prompt(request.negative_prompt, device=device, max_sequence_length=request.max_sequence_length)
    def report_step(_pipe, i, _t, kwargs):
        on_step(i + 1, request.steps)
        return kwargs
    out = pipe(
        prompt=request.prompt,
        negative_prompt_embeds=negative,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=generator,
        max_sequence_length=request.max_sequence_length,
        callback_on_step_end=report_step if on_step is not None else None,
    )
    return out.images[0]

"""What the generator is asked for: the request and its validation, without torch.

The HTTP tier (serve.routers.generate) builds and validates requests here; klein.generate draws them. Kept apart
so that importing the request costs no torch, diffusers or peft (the Ingress replica holds none of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    max_sequence_length: int | None = None  # None: the model's own (klein.model.max_sequence_length)
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

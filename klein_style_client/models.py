"""The HTTP contract of Klein Style: every request and response body as a pydantic model.

The service builds its OpenAPI document (`/openapi.json`) from these models and its routers answer with them;
the client (`klein_style_client.Client`) sends and parses them. This module imports pydantic alone.

Request models refuse unknown keys (a typo is a 422 naming the field). Response models ignore keys they do not
know, so an older client keeps working when the service adds a field.
"""

from __future__ import annotations

import base64

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

__all__ = [
    "ErrorBody", "HealthStarting", "Health", "LoraSummary", "LoraList", "Progress", "LoraStatus", "Deleted",
    "TrainSourceBody", "TrainUpload", "Submission", "LoraImportUpload", "ImportedLora", "LoraRef", "GenerateBody",
    "FusionInfo", "LoraWeight", "GenerateResult", "ProfileBody", "ProfileUpload", "ProfileResult",
    "MAX_LORAS_PER_REQUEST", "MAX_PICTURES",
]

MAX_LORAS_PER_REQUEST = 8
MAX_PICTURES = 10
_ALLOWED_CONTROLS = "\n\t"
UseGemini = Literal["auto", "on", "off"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors -------------------------------------------------------------------------------------------------------
class ErrorBody(_Response):
    """Every error the service answers, whatever the status: a short code, a sentence, the field at fault."""

    error: str = Field(..., description="a short code: invalid_request, unauthorized, not_found, rate_limited, "
                                        "overloaded, unavailable, timeout, lora_not_ready, internal_error, ...")
    detail: str = Field(..., description="what went wrong, in a sentence written for the caller")
    field: str | None = Field(..., description="the request field (or header) at fault, if one is")
    request_id: str | None = Field(None, description="500s only: quote it when reporting the failure (server logs)")


class HealthStarting(ErrorBody):
    """/healthz while no Generator replica runs yet (503 + Retry-After)."""

    state: Literal["starting"]
    replica: str


# -- service ------------------------------------------------------------------------------------------------------
class Health(_Response):
    status: Literal["ok"]
    model: str = Field(..., description="the served model: `tiny`, `mini` or a Klein folder")
    replica: str = Field(..., description="the ingress replica that answered")
    generator: Literal["ready", "unknown"] = Field(..., description="unknown: Serve's controller did not say")
    detail: str


# -- LoRAs --------------------------------------------------------------------------------------------------------
class LoraSummary(_Response):
    id: str
    status: str = Field(..., description="done, queued, preparing, caching, training, failed, stopped, unknown, ...")
    trigger: str | None


class LoraList(_Response):
    loras: list[LoraSummary]


class Progress(_Response):
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    eta_s: float | None = None


class LoraStatus(_Response):
    """A LoRA of the tenant: its training status, then (once done) its metrics, health report and files."""

    id: str
    status: str
    progress: Progress
    trigger: str | None
    error: str | None
    decision: dict[str, Any] | None = Field(..., description="the variant and text stage chosen, and why")
    warnings: list[str]
    metrics: dict[str, Any] | None = Field(..., description="done only: the training metrics")
    best_step: int | None
    style_profile: dict[str, Any] | None = Field(..., description="done only: the L1 style profile")
    health: dict[str, Any] | None = Field(..., description="done only: the health report (state pending/none until "
                                                          "written)")
    files: dict[str, str] | None = Field(..., description="done only: file name -> download path")


class Deleted(_Response):
    id: str
    deleted: bool


class TrainSourceBody(_Request):
    """POST /v1/loras as JSON: train on the reference images at an s3:// or gs:// URI."""

    source_uri: StrictStr = Field(..., min_length=1, max_length=2000)
    trigger: StrictStr = "zxy_style"
    variant: StrictStr | None = Field(None, min_length=1, max_length=32)
    steps: StrictInt | None = Field(None, ge=1, le=100_000)
    rank: StrictInt | None = Field(None, ge=1, le=512)
    linear_alpha: StrictFloat | StrictInt | None = Field(None, gt=0, le=4096)
    optimizer: StrictStr | None = Field(None, min_length=1, max_length=32)
    lr: StrictFloat | None = Field(None, gt=0, lt=1)
    resolution: StrictInt | None = Field(None, ge=64, le=4096)
    targets: StrictStr | None = Field(None, min_length=1, max_length=32)
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)


class TrainUpload(_Request):
    """POST /v1/loras as multipart/form-data: a zip of reference images (and optional sidecar .txt captions)."""

    refs: bytes = Field(..., description="a .zip of the reference images", json_schema_extra={"format": "binary"})
    trigger: str = Field("zxy_style", description="the trigger word the captions start with")
    variant: str | None = Field(None, max_length=32, description="auto, custom or a variant name (GEM+A, B_r128, ...)")
    steps: int | None = Field(None, ge=1)
    rank: int | None = Field(None, ge=1)
    resolution: int | None = Field(None, ge=64)


class Submission(_Response):
    """202 to a training submission: the job id, and the keys this request set with their source."""

    id: str
    status: Literal["queued"]
    variant: str | None
    config: dict[str, Any] = Field(..., description="the keys set for this job (the rest follows the variant)")
    config_sources: dict[str, Literal["user", "operator", "service"]]


class LoraImportUpload(_Request):
    """POST /v1/loras/import (multipart/form-data): bring your own .safetensors LoRA."""

    lora: bytes = Field(..., description="a .safetensors LoRA (diffusers/peft, ComfyUI, ai-toolkit or kohya keys)",
                        json_schema_extra={"format": "binary"})
    trigger: str | None = None


class ImportedLora(_Response):
    id: str
    status: Literal["done"]
    trigger: str | None
    layers: int
    rank: int


# -- generate -----------------------------------------------------------------------------------------------------
def _no_numbers_as_text(value):
    """Numbers come as JSON numbers: "1" and true are refused, not coerced (1.0 for an integer is fine)."""
    if isinstance(value, (str, bool)):
        raise ValueError(f"must be a JSON number, not {'a boolean' if isinstance(value, bool) else 'a string'}")
    return value


def _no_control_characters(value: str) -> str:
    bad = [ch for ch in value if (ord(ch) < 32 and ch not in _ALLOWED_CONTROLS) or 127 <= ord(ch) < 160]
    if bad:
        raise ValueError(f"must not contain control characters (found {bad[0]!r}); only newlines and tabs are allowed")
    return value


class LoraRef(_Request):
    id: StrictStr = Field(..., min_length=1, max_length=200)
    weight: float = Field(1.0, ge=-4.0, le=4.0)

    _weight_is_a_number = field_validator("weight", mode="before")(_no_numbers_as_text)


class GenerateBody(_Request):
    """POST /v1/generate: one image, with no LoRA, one (`lora_id`) or several fused (`loras` + `fusion`)."""

    prompt: StrictStr = Field(..., min_length=1, max_length=4000)
    lora_id: StrictStr | None = Field(None, min_length=1, max_length=200)
    loras: list[LoraRef] | None = Field(None, description=f"at most {MAX_LORAS_PER_REQUEST}; not with lora_id")
    fusion: Literal["linear", "klora"] = "linear"
    width: int | None = Field(None, description="a multiple of 16 up to the server's max_side")
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    use_gemini: UseGemini = "auto"
    negative_prompt: StrictStr = Field("", max_length=4000)
    response: Literal["png", "json"] = Field("png", description="png: the image itself; json: GenerateResult")

    _numbers = field_validator("width", "height", "steps", "guidance", "seed", mode="before")(_no_numbers_as_text)
    _texts = field_validator("prompt", "negative_prompt")(_no_control_characters)


class FusionInfo(_Response):
    method: Literal["none", "single", "linear", "klora"]
    cached: bool | None = None
    rank: int | None = None
    scores_on: Literal["fusion", "generator"] | None = None


class LoraWeight(_Response):
    id: str
    weight: float


class GenerateResult(_Response):
    """POST /v1/generate with `response: json`."""

    image_base64: str = Field(..., description="the PNG, base64")
    prompt: str = Field(..., description="the prompt the generator drew (after the style stage)")
    original_prompt: str
    gemini_source: str = Field(..., description="gemini, offline or none")
    warnings: list[str]
    profile: dict[str, Any] | None
    loras: list[LoraWeight]
    fusion: FusionInfo
    seed: int
    steps: int
    width: int
    height: int
    guidance: float

    def image_bytes(self) -> bytes:
        return base64.b64decode(self.image_base64)


# -- style profile ------------------------------------------------------------------------------------------------
class ProfileBody(_Request):
    """POST /v1/style-profile as JSON: the L1 style profile stored with a LoRA."""

    lora_id: StrictStr = Field(..., min_length=1, max_length=200)
    use_gemini: UseGemini = "auto"


class ProfileUpload(_Request):
    """POST /v1/style-profile as multipart/form-data: a profile extracted from 1–10 pictures."""

    images: list[bytes] = Field(..., min_length=1, max_length=MAX_PICTURES,
                                json_schema_extra={"items": {"type": "string", "format": "binary"}})
    use_gemini: UseGemini = "auto"


class ProfileResult(_Response):
    profile: dict[str, Any] | None
    source: Literal["lora", "images"]
    lora_id: str | None = Field(None, description="source lora: the LoRA's id")
    text_stage: dict[str, Any] | None = Field(None, description="source images: whether Gemini was asked, and why")

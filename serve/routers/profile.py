"""POST /v1/style-profile: the L1 STYLE_PROFILE stored with a LoRA (JSON `lora_id`), or one extracted from
1–10 uploaded pictures (multipart `images`). With 1–3 pictures the seeds' policy keeps Gemini out (unless
`use_gemini=on`); the answer's `text_stage` says which and why."""

from __future__ import annotations

import asyncio
import io

from fastapi import APIRouter, Request

from klein_style_client.models import MAX_PICTURES, ProfileBody, ProfileResult, ProfileUpload
from serve import jobs as jobstore
from serve.errors import ApiError
from serve.middleware import API_PREFIX, ctx, parse_json_body, tenant_of
from serve.openapi import API_KEY, V1_ERRORS, errors, request_body
from serve.routers.common import downstream, owned, upload_label
from train.dataset import FileProblem, decode_image

router = APIRouter(prefix=API_PREFIX, tags=["generate"], dependencies=API_KEY, responses=errors(*V1_ERRORS))

MAX_PICTURE_PIXELS = 64_000_000


def checked_picture(label: str, data: bytes) -> bytes:
    """An uploaded picture decoded and converted to an RGB PNG, or a 422 naming what is wrong with it."""
    result = decode_image(label, data, MAX_PICTURE_PIXELS)
    if isinstance(result, FileProblem):
        raise ApiError(422, str(result), "images")
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG")
    return buffer.getvalue()


@router.post("/style-profile", response_model=ProfileResult, responses=errors(404, 409, 415, 422),
             openapi_extra=request_body(json=ProfileBody, multipart=ProfileUpload))
async def style_profile(request: Request) -> ProfileResult:
    """JSON `{"lora_id": ...}` (the profile stored with the LoRA), or multipart `images` (1–10 pictures)."""
    state = ctx()
    tenant = await tenant_of(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = parse_json_body(await request.body(), ProfileBody)
        lora_id = owned(tenant, body.lora_id, "lora_id")
        manifest = await asyncio.to_thread(jobstore.read_manifest, state.storage, tenant, lora_id)
        if manifest is None:
            raise ApiError(409, f"LoRA {lora_id} is not ready", "lora_id", error="lora_not_ready")
        return ProfileResult(profile=manifest.get("style_profile"), source="lora", lora_id=lora_id)
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "send multipart/form-data with `images`, or JSON with `lora_id`", "content-type")
    form = await request.form(max_files=MAX_PICTURES, max_fields=4)
    uploads = [f for f in form.getlist("images") if not isinstance(f, str)]
    if not uploads:
        raise ApiError(422, f"attach 1–{MAX_PICTURES} pictures in the `images` form field", "images")
    use_gemini = form.get("use_gemini", "auto")
    if use_gemini not in ("auto", "on", "off"):
        raise ApiError(422, "use_gemini must be auto, on or off", "use_gemini")
    # each picture is checked and converted here, by the training data's own decoder (EXIF rotation,
    # CMYK, 16-bit, alpha; bombs, truncation and animations refused), so the style stage gets plain RGB PNGs
    images = [await asyncio.to_thread(checked_picture, upload_label(f.filename), await f.read()) for f in uploads]
    result = await downstream(lambda: state.style.profile_from_images.remote(images, use_gemini), "style stage")
    return ProfileResult(profile=result["profile"], source="images", text_stage=result["text_stage"])

"""POST /v1/generate: the style stage (L2), fusion, then the generator, under one deadline per request."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from contracts import lora_prefix
from klein.request import GenerateError, GenerateRequest
from klein_style_client.models import MAX_LORAS_PER_REQUEST as MAX_LORAS
from klein_style_client.models import FusionInfo, GenerateBody, GenerateResult, LoraRef, LoraWeight
from serve import jobs as jobstore
from serve import metrics
from serve.adapter_sets import NonFiniteOutput, adapter_set_id
from serve.errors import ApiError
from serve.middleware import API_PREFIX, ctx, header_safe, parse_json_body, tenant_of
from serve.openapi import API_KEY, V1_ERRORS, errors, request_body
from serve.routers.common import downstream, owned

router = APIRouter(prefix=API_PREFIX, tags=["generate"], dependencies=API_KEY, responses=errors(*V1_ERRORS))
_TEXT_HEADERS = {"X-Final-Prompt": {"description": "the prompt drawn (after the style stage), printable ASCII",
                                   "schema": {"type": "string"}},
                 "X-Gemini-Source": {"description": "gemini, offline or none", "schema": {"type": "string"}}}

def _timeout_for(request: Request) -> float:
    """The request's deadline for downstream calls: `X-Request-Timeout` (seconds) if the client sets a
    shorter one than the server's `downstream_timeout_s`."""
    limit = ctx().config.downstream_timeout_s
    value = request.headers.get("x-request-timeout")
    if value is None:
        return limit
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ApiError(422, "X-Request-Timeout must be a positive number of seconds", "x-request-timeout")
    return min(seconds, limit)


def _resolve_loras(tenant: str, body: GenerateBody) -> list[dict]:
    state = ctx()
    if body.lora_id is not None and body.loras:
        raise ApiError(422, "give either lora_id or loras, not both", "loras")
    refs = [LoraRef(id=body.lora_id)] if body.lora_id is not None else list(body.loras or [])
    field = "lora_id" if body.lora_id is not None else "loras"
    if len(refs) > MAX_LORAS:
        raise ApiError(422, f"at most {MAX_LORAS} LoRAs per request", "loras")
    resolved = []
    for ref in refs:
        lora_id = owned(tenant, ref.id, field)
        manifest = jobstore.read_manifest(state.storage, tenant, lora_id)
        if manifest is None:
            status = state.jobs.state_of(lora_id).get("state")
            raise ApiError(409, f"LoRA {lora_id} is not ready (status: {status}); wait until it is done", field,
                           error="lora_not_ready")
        sha = manifest.get("files", {}).get("lora.safetensors")
        if not sha:
            raise ApiError(409, f"LoRA {lora_id} has no weights file", field, error="lora_not_ready")
        resolved.append({"id": lora_id, "key": f"{lora_prefix(tenant, lora_id)}/lora.safetensors", "sha256": sha,
                         "weight": ref.weight, "trigger": manifest.get("trigger"),
                         "style_profile": manifest.get("style_profile"),
                         "use_gemini": ((manifest.get("decision") or {}).get("text_stage") or {}).get("use_gemini", True)})
    return resolved


def _generate_request(body: GenerateBody) -> GenerateRequest:
    config = ctx().config
    request = GenerateRequest(
        prompt=body.prompt, seed=body.seed,
        steps=body.steps if body.steps is not None else config.default_steps,
        width=body.width if body.width is not None else config.side_default,
        height=body.height if body.height is not None else config.side_default,
        guidance=body.guidance if body.guidance is not None else config.default_guidance,
        negative_prompt=body.negative_prompt,
    )
    try:
        request.validate(config.max_side)
    except GenerateError as e:
        raise ApiError(422, str(e), e.field) from None
    return request


async def _adapters(loras: list[dict], fusion: str, left) -> tuple[str, list[float], dict | None, dict]:
    """(multiplexed model id, adapter weights, K-LoRA scores, info for the response)."""
    fusion_stage = ctx().fusion
    if not loras:
        return "", [], None, {"method": "none"}
    if len(loras) == 1:
        return adapter_set_id(loras), [loras[0]["weight"]], None, {"method": "single"}
    specs = [{k: lora[k] for k in ("id", "key", "sha256", "weight")} for lora in loras]
    if fusion == "klora":
        if len(loras) > 3:
            raise ApiError(422, "K-LoRA fuses 2 or 3 LoRAs; use fusion=linear for more", "loras")
        result = await downstream(lambda: fusion_stage.klora_scores.remote(specs), "fusion stage", left())
        # scores None: the generator computes them on its GPU (serve/fusion.py, `scores_place`)
        return adapter_set_id(loras), [lora["weight"] for lora in loras], {"scores": result["scores"]}, \
            {"method": "klora", "cached": result["cached"], "scores_on": result.get("scores_on", "fusion")}
    result = await downstream(lambda: fusion_stage.linear.remote(specs), "fusion stage", left())
    return adapter_set_id([result]), [1.0], None, {"method": "linear", "cached": result["cached"], "rank": result["rank"]}


@router.post("/generate", response_model=GenerateResult,
             responses={200: {"description": "the image: a PNG (`response: png`, the default) or GenerateResult "
                                             "(`response: json`)", "headers": _TEXT_HEADERS,
                              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                        **errors(404, 409, 415, 422)},
             openapi_extra=request_body(json=GenerateBody))
async def generate(request: Request) -> Response:
    state = ctx()
    tenant = await tenant_of(request)
    body = parse_json_body(await request.body(), GenerateBody)
    deadline = time.monotonic() + _timeout_for(request)  # one deadline for the whole request

    def left() -> float:
        return max(0.001, deadline - time.monotonic())

    gen_request = _generate_request(body)
    loras = await asyncio.to_thread(_resolve_loras, tenant, body)
    model_id, weights, klora, fusion_info = await _adapters(loras, body.fusion, left)
    primary = loras[0] if loras else None
    styled = await downstream(lambda: state.style.restyle.remote(
        gen_request.prompt, primary["style_profile"] if primary else None,
        [lora["trigger"] for lora in loras if lora.get("trigger")], body.use_gemini,
        bool(primary["use_gemini"]) if primary else False), "style stage", left())
    # the adapter set travels once, as the multiplexed model id: the generator reads it from its request context
    item = {"prompt": styled["prompt"], "seed": gen_request.seed, "steps": gen_request.steps,
            "width": gen_request.width, "height": gen_request.height, "guidance": gen_request.guidance,
            "negative_prompt": gen_request.negative_prompt, "adapter_weights": weights, "klora": klora}
    try:
        png = await downstream(lambda: state.generator.options(multiplexed_model_id=model_id).generate.remote(item),
                               "generator", left())
    except NonFiniteOutput as e:
        raise ApiError(422, f"{e.args[0] if e.args else e}", "loras" if len(loras) > 1 else "lora_id" if loras else None,
                       error="non_finite_image") from None
    metrics.GENERATIONS.labels(fusion=fusion_info["method"], gemini_source=styled["gemini_source"]).inc()
    headers = {"X-Final-Prompt": header_safe(styled["prompt"]), "X-Gemini-Source": header_safe(styled["gemini_source"])}
    if body.response == "png":
        return Response(png, media_type="image/png", headers=headers)
    result = GenerateResult(
        image_base64=base64.b64encode(png).decode(),
        prompt=styled["prompt"],
        original_prompt=body.prompt,
        gemini_source=styled["gemini_source"],
        warnings=styled["warnings"],
        profile=primary["style_profile"] if primary else None,
        loras=[LoraWeight(id=lora["id"], weight=lora["weight"]) for lora in loras],
        fusion=FusionInfo(**fusion_info),
        seed=gen_request.seed, steps=gen_request.steps, width=gen_request.width,
        height=gen_request.height, guidance=gen_request.guidance,
    )
    return JSONResponse(result.model_dump(mode="json"), headers=headers)

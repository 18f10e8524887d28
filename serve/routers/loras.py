"""LoRAs of a tenant: list, status, delete, public files, and import (bring your own .safetensors)."""

from __future__ import annotations

import asyncio
import hashlib
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from contracts import lora_prefix
from klein_style_client.models import Deleted, ImportedLora, LoraImportUpload, LoraList, LoraStatus, LoraSummary, Progress
from serve import jobs as jobstore
from serve.errors import ApiError, not_found
from serve.middleware import API_PREFIX, ctx, tenant_of
from serve.openapi import API_KEY, V1_ERRORS, errors, request_body
from serve.routers.common import checked_trigger, downstream, owned
from train.status import AFTER_DELIVERY

router = APIRouter(prefix=API_PREFIX, tags=["loras"], dependencies=API_KEY, responses=errors(*V1_ERRORS))


def _public_status(state: str | None) -> str:
    return state or "unknown"


@router.get("/loras", response_model=LoraList)
async def list_loras(request: Request) -> LoraList:
    state = ctx()
    tenant = await tenant_of(request)
    items = []
    finished = set(await asyncio.to_thread(state.storage.list_tenant, tenant, "loras"))
    for lora_id in await asyncio.to_thread(jobstore.list_jobs, state.storage, tenant):
        if lora_id in finished:  # trained or imported: the manifest says what it is
            manifest = await asyncio.to_thread(jobstore.read_manifest, state.storage, tenant, lora_id) or {}
            items.append(LoraSummary(id=lora_id, status="done", trigger=manifest.get("trigger")))
            continue
        status = await asyncio.to_thread(state.jobs.state_of, lora_id)
        items.append(LoraSummary(id=lora_id, status=_public_status(status.get("state")), trigger=status.get("trigger")))
    return LoraList(loras=items)


@router.get("/loras/{lora_id}", response_model=LoraStatus, responses=errors(404))
async def get_lora(lora_id: str, request: Request) -> LoraStatus:
    state = ctx()
    tenant = await tenant_of(request)
    lora_id = owned(tenant, lora_id)
    status = await asyncio.to_thread(state.jobs.state_of, lora_id)
    manifest = await asyncio.to_thread(jobstore.read_manifest, state.storage, tenant, lora_id)
    submission = state.storage.read_json(jobstore.submission_key(tenant, lora_id)) \
        if state.storage.exists(jobstore.submission_key(tenant, lora_id)) else {}
    done = manifest is not None
    return LoraStatus(
        id=lora_id,
        status="done" if done else _public_status(status.get("state")),
        progress=Progress(**{k: status.get(k) for k in ("step", "steps", "loss", "eta_s") if k in status}),
        trigger=(manifest or submission).get("trigger"),
        error=status.get("error"),
        decision=(manifest or {}).get("decision") or status.get("decision"),
        warnings=(manifest or {}).get("warnings") or status.get("warnings") or [],
        # the rest once the LoRA is delivered; null until then
        metrics=manifest.get("metrics") if done else None,
        best_step=manifest.get("best_step") if done else None,
        style_profile=manifest.get("style_profile") if done else None,
        # the health report (train/health.py): rendered after delivery, once the contact sheet is (train/job.py), so
        # pending through both of those stages
        health=(manifest.get("health") or {"state": "pending" if status.get("state") in AFTER_DELIVERY else "none"})
        if done else None,
        files={name: f"{API_PREFIX}/loras/{lora_id}/files/{name}" for name in jobstore.public_files(manifest)}
        if done else None,
    )


@router.delete("/loras/{lora_id}", response_model=Deleted, responses=errors(404))
async def delete_lora(lora_id: str, request: Request) -> Deleted:
    tenant = await tenant_of(request)
    lora_id = owned(tenant, lora_id)
    await asyncio.to_thread(ctx().jobs.delete, tenant, lora_id)
    return Deleted(id=lora_id, deleted=True)


_FILE_TYPES = {"image/png": {"schema": {"type": "string", "format": "binary"}},
               "text/markdown": {"schema": {"type": "string"}},
               "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get("/loras/{lora_id}/files/{name}", response_class=Response,
            responses={200: {"description": "the file: a PNG (samples, contact sheet, plots), the health report "
                                            "(Markdown) or a LoRA (.safetensors, as an attachment)",
                             "content": _FILE_TYPES}, **errors(404)})
async def get_lora_file(lora_id: str, name: str, request: Request) -> Response:
    storage = ctx().storage
    tenant = await tenant_of(request)
    lora_id = owned(tenant, lora_id)
    manifest = await asyncio.to_thread(jobstore.read_manifest, storage, tenant, lora_id)
    path = jobstore.public_files(manifest).get(name) if manifest is not None else None
    if path is None:
        raise not_found("file", "name")
    data = await asyncio.to_thread(storage.read_verified, f"{lora_prefix(tenant, lora_id)}/{path}",
                                   manifest["files"][path])
    if name.endswith(".png"):
        return Response(data, media_type="image/png")
    if name.endswith(".md"):
        return Response(data, media_type="text/markdown; charset=utf-8")
    # a LoRA download keeps its name (the ComfyUI export's is unique per job: ComfyUI's loras folder is flat)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.post("/loras/import", status_code=201, response_model=ImportedLora, responses=errors(415, 422),
             openapi_extra=request_body(multipart=LoraImportUpload))
async def import_lora(request: Request) -> ImportedLora:
    """Bring your own LoRA: multipart `lora` (a .safetensors file: diffusers/peft, ComfyUI, ai-toolkit or
    kohya keys) and an optional `trigger`. Only safetensors is read, never a pickle; the file passes the one
    LoRA validator (`klein.lora.validate_lora`: ranks, alphas, dtypes, finite weights, typed metadata) and
    every layer must fit the served blocks. It is stored like a trained LoRA, in our format."""
    tenant = await tenant_of(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "send multipart/form-data with the .safetensors file in the `lora` field", "content-type")
    form = await request.form(max_files=1, max_fields=4)
    upload = form.get("lora")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "attach the LoRA (.safetensors) in the `lora` form field", "lora")
    trigger = form.get("trigger")
    if trigger is not None and not isinstance(trigger, str):
        raise ApiError(422, "`trigger` must be a text field", "trigger")
    if trigger is not None:
        trigger = checked_trigger(trigger)
    data = await upload.read()
    lora_id = jobstore.new_id()
    # read, checked against the served blocks and re-written in our format by the Fusion replica (torch lives there)
    fusion = ctx().fusion
    prepared = await downstream(lambda: fusion.prepare_import.remote(data, trigger), "fusion stage")
    if "error" in prepared:
        raise ApiError(422, prepared["error"], prepared["field"])
    manifest = await asyncio.to_thread(_store_import, tenant, lora_id, data, prepared)
    return ImportedLora(id=lora_id, status="done", trigger=manifest["trigger"], layers=manifest["layers"],
                        rank=manifest["rank"])


def _store_import(tenant: str, lora_id: str, data: bytes, prepared: dict) -> dict:
    """The prepared LoRA (serve.fusion.prepare_import) and its manifest, stored like a trained LoRA's."""
    state = ctx()
    prefix = lora_prefix(tenant, lora_id)
    sha = state.storage.write_bytes(f"{prefix}/lora.safetensors", prepared["lora"])
    manifest = {
        "id": lora_id, "tenant": tenant, "trigger": prepared["trigger"], "base_model": prepared["base_model"],
        "source": {"kind": "import", "format": prepared["source_format"], "sha256": hashlib.sha256(data).hexdigest()},
        "rank": prepared["rank"], "layers": prepared["layers"], "style_profile": None,
        "decision": {"variant": "imported", "reason": "uploaded by the tenant",
                     "text_stage": {"use_gemini": False, "reason": "imported LoRA: no style profile"}},
        "files": {"lora.safetensors": sha}, "created": time.time(),
    }
    state.storage.write_json(f"{prefix}/manifest.json", manifest)  # last: the LoRA exists from here on
    return manifest

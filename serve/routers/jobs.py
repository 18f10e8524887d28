"""Training submissions: POST /v1/loras (multipart `refs` zip, or JSON `source_uri`) starts a job through
serve/jobs.py. Everything the request says is checked before anything is stored: a refused request
leaves no trace."""

from __future__ import annotations

import asyncio
import logging
import os
import zipfile
from urllib.parse import urlparse

from fastapi import APIRouter, Request

from klein_style_client.models import Submission, TrainSourceBody, TrainUpload
from serve import jobs as jobstore
from serve.errors import ApiError
from serve.middleware import API_PREFIX, ctx, parse_json_body, tenant_of
from serve.openapi import API_KEY, V1_ERRORS, errors, request_body
from serve.routers.common import checked_trigger, upload_label
from serve.tenants import retry_after_header
from train.dataset import DatasetError, load_refs
from train.recipe import ConfigError

log = logging.getLogger("klein.serve.ingress")

router = APIRouter(prefix=API_PREFIX, tags=["loras"], dependencies=API_KEY, responses=errors(*V1_ERRORS))


def _is_inside(uri: str, root: str) -> bool:
    a, b = uri.rstrip("/"), root.rstrip("/")
    return a == b or a.startswith(b + "/")


def _check_zip(fileobj) -> None:
    fileobj.seek(0)
    if not zipfile.is_zipfile(fileobj):
        raise ApiError(422, "`refs` must be a zip file of reference images", "refs")


def _form_value(value, name: str) -> int:
    text = value.strip() if isinstance(value, str) else None
    if not text or not text.isdigit() or not text.isascii():  # "1.5", "1e3", "true", "-1", "١": refused
        raise ApiError(422, f"{name} must be an integer", name)
    return int(text)


@router.post("/loras", status_code=202, response_model=Submission, responses=errors(415, 422),
             openapi_extra=request_body(json=TrainSourceBody, multipart=TrainUpload))
async def create_lora(request: Request) -> Submission:
    """Start training: multipart (`refs`: a zip of images, `trigger`, optional `variant`/`steps`/`rank`/
    `resolution`), or JSON `{"source_uri": ..., "trigger": ..., "variant": ..., "rank": ...}`. Answers the job id
    and the keys this request set with their source (`user`): they win over the variant's defaults."""
    state = ctx()
    tenant = await tenant_of(request)
    if state.jobs.active_count(tenant) >= state.config.max_training_jobs_per_tenant:
        raise ApiError(429, f"at most {state.config.max_training_jobs_per_tenant} training job(s) may run at once per "
                       "tenant; wait for one to finish", None, headers=retry_after_header(30))
    job_id = jobstore.new_id()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        source, options = await _receive_zip(request, tenant, job_id)
    elif content_type.startswith("application/json"):
        source, options = await _source_from_json(request)
    else:
        raise ApiError(415, "send multipart/form-data with a `refs` zip, or JSON with `source_uri`", "content-type")
    trigger = options.pop("trigger")
    try:
        cfg = jobstore.train_config(state.config.train_overrides, tenant, job_id, trigger, state.storage.uri,
                                    state.config.model, options)
    except ConfigError as e:
        await asyncio.to_thread(_forget_upload, jobstore.upload_key(tenant, job_id))
        raise ApiError(422, str(e), None) from None
    state.jobs.submit(tenant, source, cfg)
    # the keys this request set, each with its source: they win over the variant's defaults
    return Submission(**jobstore.submission_answer(cfg, state.config.train_overrides))


async def _receive_zip(request: Request, tenant: str, job_id: str) -> tuple[str, dict]:
    state = ctx()
    form = await request.form(max_files=1, max_fields=16)
    upload = form.get("refs")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "attach the reference images as a zip in the `refs` form field", "refs")
    if upload.size is not None and upload.size > state.config.max_upload_bytes:
        raise ApiError(413, f"the upload is {upload.size} bytes; the limit is {state.config.max_upload_bytes}", "refs")
    options = {name: _form_value(form.get(name), name) for name in ("steps", "rank", "resolution")
               if form.get(name) is not None}
    variant = form.get("variant")
    if variant is not None:
        if not isinstance(variant, str) or not variant.strip() or len(variant) > 32:
            raise ApiError(422, "`variant` must be auto, custom or a variant name", "variant")
        options["variant"] = variant.strip()
    trigger = form.get("trigger")
    if trigger is not None and not isinstance(trigger, str):
        raise ApiError(422, "`trigger` must be a text field", "trigger")
    # absent: the default trigger; given (even empty): it must pass the check
    options["trigger"] = checked_trigger("zxy_style" if trigger is None else trigger)
    await asyncio.to_thread(_check_zip, upload.file)
    key = jobstore.upload_key(tenant, job_id)
    upload.file.seek(0)
    try:
        await asyncio.to_thread(state.storage.write_chunks, key, iter(lambda: upload.file.read(1 << 20), b""))
        await asyncio.to_thread(_check_refs, key, upload_label(upload.filename))
    except BaseException:
        await asyncio.to_thread(_forget_upload, key)
        raise
    return state.storage.uri_of(key), options


def _check_refs(key: str, label: str) -> None:
    storage = ctx().storage
    try:
        load_refs(key, storage=storage)
    except DatasetError as e:
        # the problems name the upload as the client knows it, never by its path on the server
        raise ApiError(422, str(e).replace(storage.uri_of(key), label), "refs") from None


def _forget_upload(key: str) -> None:
    """Remove a refused upload and the folders it created, so a refused request leaves storage as it was."""
    storage = ctx().storage
    folder = key.rsplit("/", 1)[0]
    try:
        storage.delete(folder)
        if storage.is_local:  # empty parents (uploads/<tenant>/) that this upload may have created
            parent = storage.local_path(folder).parent
            for path in (parent, parent.parent):
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
    except Exception as e:  # noqa: BLE001 — never hide the request's own error
        log.warning("could not remove the refused upload %s: %s", folder, type(e).__name__)


async def _source_from_json(request: Request) -> tuple[str, dict]:
    state = ctx()
    body = parse_json_body(await request.body(), TrainSourceBody)
    uri = body.source_uri.strip()
    scheme = urlparse(uri).scheme
    root = state.storage.uri
    # never let a tenant point the trainer at the platform's own storage (other tenants' data)
    if _is_inside(uri, root) or _is_inside(os.path.realpath(uri) if scheme in ("", "file") else uri, root):
        raise ApiError(422, "source_uri may not point inside the service's storage", "source_uri")
    if scheme in ("s3", "gs"):
        pass
    elif scheme in ("", "file") and state.config.allow_local_source_uri:
        if not os.path.exists(urlparse(uri).path if scheme == "file" else uri):
            raise ApiError(422, "source_uri does not exist on the server", "source_uri")
    else:
        raise ApiError(422, "source_uri must be an s3:// or gs:// URI of a folder or zip of reference images", "source_uri")
    options = body.model_dump(exclude_none=True, exclude={"source_uri"})
    options["trigger"] = checked_trigger(body.trigger)
    return uri, options

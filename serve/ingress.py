"""The HTTP API (FastAPI on a Serve ingress deployment): auth, validation, tenancy, and the calls into the
style stage, fusion and the generator. Every error is JSON {error, detail, field}."""

import asyncio
import base64
import json
import logging
import os
import tempfile
import time
import zipfile
from typing import Literal
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError

from cluster.storage import Storage
from klein.generate import GenerateError, GenerateRequest
from serve import jobs as jobstore
from serve import metrics
from serve.config import ServeConfig
from serve.errors import ApiError, error_response, install_catch_all_middleware, install_error_handlers, not_found
from serve.tenants import AuthError, KeyStore, TokenBucketLimiter, key_from_headers, retry_after_header
from train.job import JobError, check_job_id, lora_prefix

log = logging.getLogger("klein.serve.ingress")

API_PREFIX = "/v1"
OVERLOAD_RETRY_S = 2

api = FastAPI(
    title="Klein Style",
    version="1.0",
    description="Train style LoRAs for FLUX.2 Klein and generate images in those styles. "
    "Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)

# Set by the replica's Ingress.__init__: the module-level middleware reads the limits from here.
_RUNTIME: dict = {"config": ServeConfig(storage=tempfile.gettempdir())}


# -- request bodies ---------------------------------------------------------------------------------------
class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1, max_length=4000)
    lora_id: str | None = None
    loras: list[LoraRef] | None = None
    fusion: Literal["linear", "klora"] = "linear"
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    use_gemini: Literal["auto", "on", "off"] = "auto"
    negative_prompt: str = Field("", max_length=4000)
    response: Literal["png", "json"] = "png"


class TrainSourceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_uri: str
    trigger: str = "zxy_style"
    steps: int | None = Field(None, ge=1, le=100_000)
    rank: int | None = Field(None, ge=1, le=512)
    resolution: int | None = Field(None, ge=64, le=4096)


class ProfileBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_id: str
    use_gemini: Literal["auto", "on", "off"] = "auto"


# -- middleware: metrics, body limit, CORS ------------------------------------------------------------------
def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


@api.middleware("http")
async def limits_and_cors(request: Request, call_next):
    config: ServeConfig = _RUNTIME["config"]
    origin = request.headers.get("origin")
    cors = bool(origin) and origin in config.cors_origins  # CORS is off unless origins are configured
    if cors and request.method == "OPTIONS":
        return Response(status_code=204, headers=_cors_headers(origin, preflight=True))
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > config.max_upload_bytes:
        metrics.count_error(413, "payload_too_large")
        return error_response(413, "payload_too_large",
                              f"the request body is {int(length)} bytes; the limit is {config.max_upload_bytes}", None)
    response = await call_next(request)
    if cors:
        response.headers.update(_cors_headers(origin))
    return response


def _cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "GET, POST, DELETE",
                        "Access-Control-Allow-Headers": "Authorization, X-API-Key, Content-Type",
                        "Access-Control-Max-Age": "600"})
    return headers


install_catch_all_middleware(api, metrics.count_error)


@api.middleware("http")
async def record_metrics(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    route = _route_of(request)
    metrics.REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
    metrics.LATENCY.labels(route=route, method=request.method).observe(time.perf_counter() - started)
    return response


install_error_handlers(api, metrics.count_error)


# -- helpers ------------------------------------------------------------------------------------------------
def _check_id(lora_id: str, field: str = "id") -> str:
    try:
        return check_job_id(lora_id)
    except JobError:
        # an id that cannot exist is simply not found (and is never used as a path)
        raise not_found("LoRA", field) from None


def _public_status(state: str | None) -> str:
    return state or "unknown"


def _is_inside(uri: str, root: str) -> bool:
    a, b = uri.rstrip("/"), root.rstrip("/")
    return a == b or a.startswith(b + "/")


async def _call(response):
    """Await a deployment call; Serve's back-pressure becomes a 503 with Retry-After."""
    try:
        return await response
    except BackPressureError:
        raise ApiError(503, "the service is at capacity; retry shortly", None,
                       headers=retry_after_header(OVERLOAD_RETRY_S)) from None


def _check_zip(fileobj) -> None:
    fileobj.seek(0)
    if not zipfile.is_zipfile(fileobj):
        raise ApiError(422, "`refs` must be a zip file of reference images", "refs")


def _form_value(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{name} must be an integer", name) from None


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:1000].replace("\n", " ")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, style, generator, fusion, config: dict):
        self.config = ServeConfig.from_any(config)
        # Serve pickles this class by value (with copies of the globals it uses); the middleware reads the
        # real module's _RUNTIME, so reach it through an import
        import serve.ingress as this_module

        this_module._RUNTIME["config"] = self.config
        self.storage = Storage.from_uri(self.config.storage)
        self.keys = KeyStore(self.storage)
        self.limiter = TokenBucketLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst)
        self.style = style
        self.generator = generator
        self.fusion = fusion
        self.jobs = jobstore.JobRunner(self.storage, self.config.train_task_num_cpus)

    # -- auth + rate limit --------------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str:
        key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        try:
            tenant = self.keys.tenant_of(key)
        except AuthError as e:
            raise ApiError(401, str(e), "authorization", headers={"WWW-Authenticate": "Bearer"}) from None
        wait = self.limiter.try_acquire(tenant)
        if wait > 0:
            raise ApiError(429, f"rate limit of {self.config.rate_limit_per_s:g} requests/s exceeded; retry later",
                           None, headers=retry_after_header(wait))
        return tenant

    def _owned(self, tenant: str, lora_id: str, field: str = "id") -> str:
        lora_id = _check_id(lora_id, field)
        if not jobstore.owns(self.storage, tenant, lora_id):
            raise not_found("LoRA", field)
        return lora_id

    # -- service ------------------------------------------------------------------------------------------
    @api.get("/healthz", tags=["service"])
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.model}

    @api.get("/metrics", tags=["service"], include_in_schema=False)
    async def metrics_endpoint(self) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- LoRAs --------------------------------------------------------------------------------------------
    @api.post(f"{API_PREFIX}/loras", tags=["loras"], status_code=202)
    async def create_lora(self, request: Request) -> JSONResponse:
        """Start training: multipart (`refs`: a zip of images, `trigger`, optional `steps`/`rank`/`resolution`),
        or JSON `{"source_uri": ..., "trigger": ...}`."""
        tenant = self._tenant(request)
        if self.jobs.active_count(tenant) >= self.config.max_training_jobs_per_tenant:
            raise ApiError(429, f"at most {self.config.max_training_jobs_per_tenant} training job(s) may run at once per "
                           "tenant; wait for one to finish", None, headers=retry_after_header(30))
        job_id = jobstore.new_id()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            source, options = await self._receive_zip(request, tenant, job_id)
        elif content_type.startswith("application/json"):
            source, options = await self._source_from_json(request)
        else:
            raise ApiError(415, "send multipart/form-data with a `refs` zip, or JSON with `source_uri`", "content-type")
        trigger = options.pop("trigger", None) or "zxy_style"
        try:
            from train.captions import check_trigger

            trigger = check_trigger(trigger)
        except Exception as e:  # noqa: BLE001 — the check's message is written for users
            raise ApiError(422, str(e), "trigger") from None
        cfg = jobstore.train_config(self.config.train_overrides, tenant, job_id, trigger, self.storage.uri,
                                    self.config.model, options)
        self.jobs.submit(tenant, source, cfg)
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    async def _receive_zip(self, request: Request, tenant: str, job_id: str) -> tuple[str, dict]:
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("refs")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "attach the reference images as a zip in the `refs` form field", "refs")
        if upload.size is not None and upload.size > self.config.max_upload_bytes:
            raise ApiError(413, f"the upload is {upload.size} bytes; the limit is {self.config.max_upload_bytes}", "refs")
        await asyncio.to_thread(_check_zip, upload.file)
        key = jobstore.upload_key(tenant, job_id)
        upload.file.seek(0)
        await asyncio.to_thread(self.storage.write_chunks, key, iter(lambda: upload.file.read(1 << 20), b""))
        await asyncio.to_thread(self._check_refs, key)
        options = {name: _form_value(form.get(name), name) for name in ("steps", "rank", "resolution") if form.get(name)}
        options["trigger"] = form.get("trigger") if isinstance(form.get("trigger"), str) else None
        return self.storage.uri_of(key), options

    def _check_refs(self, key: str) -> None:
        from train.dataset import DatasetError, load_refs

        try:
            load_refs(key, storage=self.storage)
        except DatasetError as e:
            self.storage.delete(key.rsplit("/", 1)[0])
            raise ApiError(422, str(e), "refs") from None

    async def _source_from_json(self, request: Request) -> tuple[str, dict]:
        try:
            body = TrainSourceBody.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError:
            raise ApiError(400, "the body is not valid JSON", None) from None
        except ValueError as e:
            errors = getattr(e, "errors", lambda: [])()
            field = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            raise ApiError(422, errors[0]["msg"] if errors else str(e), field) from None
        uri = body.source_uri.strip()
        scheme = urlparse(uri).scheme
        # never let a tenant point the trainer at the platform's own storage (other tenants' data)
        if _is_inside(uri, self.storage.uri) or _is_inside(os.path.realpath(uri) if scheme in ("", "file") else uri, self.storage.uri):
            raise ApiError(422, "source_uri may not point inside the service's storage", "source_uri")
        if scheme in ("s3", "gs"):
            pass
        elif scheme in ("", "file") and self.config.allow_local_source_uri:
            if not os.path.exists(urlparse(uri).path if scheme == "file" else uri):
                raise ApiError(422, "source_uri does not exist on the server", "source_uri")
        else:
            raise ApiError(422, "source_uri must be an s3:// or gs:// URI of a folder or zip of reference images", "source_uri")
        options = body.model_dump(exclude_none=True, exclude={"source_uri"})
        return uri, options

    @api.get(f"{API_PREFIX}/loras", tags=["loras"])
    async def list_loras(self, request: Request) -> dict:
        tenant = self._tenant(request)
        items = []
        for lora_id in await asyncio.to_thread(jobstore.list_jobs, self.storage, tenant):
            status = await asyncio.to_thread(self.jobs.state_of, lora_id)
            items.append({"id": lora_id, "status": _public_status(status.get("state")), "trigger": status.get("trigger")})
        return {"loras": items}

    @api.get(f"{API_PREFIX}/loras/{{lora_id}}", tags=["loras"])
    async def get_lora(self, lora_id: str, request: Request) -> dict:
        tenant = self._tenant(request)
        lora_id = self._owned(tenant, lora_id)
        status = await asyncio.to_thread(self.jobs.state_of, lora_id)
        manifest = await asyncio.to_thread(jobstore.read_manifest, self.storage, tenant, lora_id)
        submission = self.storage.read_json(jobstore.submission_key(tenant, lora_id)) \
            if self.storage.exists(jobstore.submission_key(tenant, lora_id)) else {}
        body = {
            "id": lora_id,
            "status": "done" if manifest is not None else _public_status(status.get("state")),
            "progress": {k: status.get(k) for k in ("step", "steps", "loss", "eta_s") if k in status},
            "trigger": (manifest or submission).get("trigger"),
            "error": status.get("error"),
            "decision": (manifest or {}).get("decision") or status.get("decision"),
            "warnings": (manifest or {}).get("warnings") or status.get("warnings") or [],
        }
        if manifest is not None:
            body.update({
                "metrics": manifest.get("metrics"),
                "best_step": manifest.get("best_step"),
                "style_profile": manifest.get("style_profile"),
                "files": {name: f"{API_PREFIX}/loras/{lora_id}/files/{name}"
                          for name, path in jobstore.PUBLIC_FILES.items() if path in manifest.get("files", {})},
            })
        return body

    @api.delete(f"{API_PREFIX}/loras/{{lora_id}}", tags=["loras"])
    async def delete_lora(self, lora_id: str, request: Request) -> dict:
        tenant = self._tenant(request)
        lora_id = self._owned(tenant, lora_id)
        await asyncio.to_thread(self.jobs.delete, tenant, lora_id)
        return {"id": lora_id, "deleted": True}

    @api.get(f"{API_PREFIX}/loras/{{lora_id}}/files/{{name}}", tags=["loras"])
    async def get_lora_file(self, lora_id: str, name: str, request: Request) -> Response:
        tenant = self._tenant(request)
        lora_id = self._owned(tenant, lora_id)
        path = jobstore.PUBLIC_FILES.get(name)
        if path is None:
            raise not_found("file", "name")
        manifest = await asyncio.to_thread(jobstore.read_manifest, self.storage, tenant, lora_id)
        if manifest is None or path not in manifest.get("files", {}):
            raise not_found("file", "name")
        data = await asyncio.to_thread(self.storage.read_verified, f"{lora_prefix(tenant, lora_id)}/{path}",
                                       manifest["files"][path])
        media = "image/png" if name.endswith(".png") else "application/octet-stream"
        return Response(data, media_type=media)

    # -- generation ----------------------------------------------------------------------------------------
    def _resolve_loras(self, tenant: str, body: GenerateBody) -> list[dict]:
        if body.lora_id and body.loras:
            raise ApiError(422, "give either lora_id or loras, not both", "loras")
        refs = [LoraRef(id=body.lora_id)] if body.lora_id else list(body.loras or [])
        field = "lora_id" if body.lora_id else "loras"
        if len(refs) > 8:
            raise ApiError(422, "at most 8 LoRAs per request", "loras")
        resolved = []
        for ref in refs:
            lora_id = self._owned(tenant, ref.id, field)
            manifest = jobstore.read_manifest(self.storage, tenant, lora_id)
            if manifest is None:
                state = self.jobs.state_of(lora_id).get("state")
                raise ApiError(409, f"LoRA {lora_id} is not ready (status: {state}); wait until it is done", field,
                               error="lora_not_ready")
            sha = manifest.get("files", {}).get("lora.safetensors")
            if not sha:
                raise ApiError(409, f"LoRA {lora_id} has no weights file", field, error="lora_not_ready")
            resolved.append({"id": lora_id, "key": f"{lora_prefix(tenant, lora_id)}/lora.safetensors", "sha256": sha,
                             "weight": ref.weight, "trigger": manifest.get("trigger"),
                             "style_profile": manifest.get("style_profile"),
                             "use_gemini": ((manifest.get("decision") or {}).get("text_stage") or {}).get("use_gemini", True)})
        return resolved

    def _request(self, body: GenerateBody) -> GenerateRequest:
        request = GenerateRequest(
            prompt=body.prompt, seed=body.seed,
            steps=body.steps if body.steps is not None else self.config.default_steps,
            width=body.width if body.width is not None else self.config.side_default,
            height=body.height if body.height is not None else self.config.side_default,
            guidance=body.guidance if body.guidance is not None else self.config.default_guidance,
            negative_prompt=body.negative_prompt,
        )
        try:
            request.validate(self.config.max_side)
        except GenerateError as e:
            raise ApiError(422, str(e), e.field) from None
        return request

    async def _adapters(self, loras: list[dict], fusion: str) -> tuple[str, list[float], dict | None, dict]:
        """(multiplexed model id, adapter weights, K-LoRA scores, info for the response)."""
        from serve.generator import adapter_set_id

        if not loras:
            return "", [], None, {"method": "none"}
        if len(loras) == 1:
            return adapter_set_id(loras), [loras[0]["weight"]], None, {"method": "single"}
        specs = [{k: l[k] for k in ("id", "key", "sha256", "weight")} for l in loras]
        if fusion == "klora":
            if len(loras) > 3:
                raise ApiError(422, "K-LoRA fuses 2 or 3 LoRAs; use fusion=linear for more", "loras")
            result = await _call(self.fusion.klora_scores.remote(specs))
            return adapter_set_id(loras), [l["weight"] for l in loras], {"scores": result["scores"]}, \
                {"method": "klora", "cached": result["cached"]}
        result = await _call(self.fusion.linear.remote(specs))
        return adapter_set_id([result]), [1.0], None, {"method": "linear", "cached": result["cached"], "rank": result["rank"]}

    @api.post(f"{API_PREFIX}/generate", tags=["generate"],
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(self, body: GenerateBody, request: Request) -> Response:
        tenant = self._tenant(request)
        gen_request = self._request(body)
        loras = await asyncio.to_thread(self._resolve_loras, tenant, body)
        model_id, weights, klora, fusion_info = await self._adapters(loras, body.fusion)
        primary = loras[0] if loras else None
        styled = await _call(self.style.restyle.remote(
            gen_request.prompt, primary["style_profile"] if primary else None,
            [l["trigger"] for l in loras if l.get("trigger")], body.use_gemini,
            bool(primary["use_gemini"]) if primary else False))
        item = {"prompt": styled["prompt"], "seed": gen_request.seed, "steps": gen_request.steps,
                "width": gen_request.width, "height": gen_request.height, "guidance": gen_request.guidance,
                "negative_prompt": gen_request.negative_prompt, "model_id": model_id, "adapter_weights": weights,
                "klora": klora}
        png = await _call(self.generator.options(multiplexed_model_id=model_id).generate.remote(item))
        metrics.GENERATIONS.labels(fusion=fusion_info["method"], gemini_source=styled["gemini_source"]).inc()
        headers = {"X-Final-Prompt": _header_safe(styled["prompt"]), "X-Gemini-Source": styled["gemini_source"]}
        if body.response == "png":
            return Response(png, media_type="image/png", headers=headers)
        return JSONResponse({
            "image_base64": base64.b64encode(png).decode(),
            "prompt": styled["prompt"],
            "original_prompt": body.prompt,
            "gemini_source": styled["gemini_source"],
            "warnings": styled["warnings"],
            "profile": primary["style_profile"] if primary else None,
            "loras": [{"id": l["id"], "weight": l["weight"]} for l in loras],
            "fusion": fusion_info,
            "seed": gen_request.seed, "steps": gen_request.steps, "width": gen_request.width,
            "height": gen_request.height, "guidance": gen_request.guidance,
        })

    # -- style profile -------------------------------------------------------------------------------------
    @api.post(f"{API_PREFIX}/style-profile", tags=["generate"])
    async def style_profile(self, request: Request) -> dict:
        """JSON `{"lora_id": ...}` (the profile stored with the LoRA), or multipart `images` (1–10 pictures)."""
        tenant = self._tenant(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                body = ProfileBody.model_validate(json.loads(await request.body()))
            except (json.JSONDecodeError, ValueError):
                raise ApiError(422, "send JSON {\"lora_id\": ...} or multipart images", "lora_id") from None
            lora_id = self._owned(tenant, body.lora_id, "lora_id")
            manifest = await asyncio.to_thread(jobstore.read_manifest, self.storage, tenant, lora_id)
            if manifest is None:
                raise ApiError(409, f"LoRA {lora_id} is not ready", "lora_id", error="lora_not_ready")
            return {"profile": manifest.get("style_profile"), "source": "lora", "lora_id": lora_id}
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with `images`, or JSON with `lora_id`", "content-type")
        form = await request.form(max_files=10, max_fields=4)
        uploads = [f for f in form.getlist("images") if not isinstance(f, str)]
        if not uploads:
            raise ApiError(422, "attach 1–10 pictures in the `images` form field", "images")
        images = [await f.read() for f in uploads]
        use_gemini = form.get("use_gemini") if form.get("use_gemini") in ("auto", "on", "off") else "auto"
        try:
            profile = await _call(self.style.profile_from_images.remote(images, use_gemini))
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 — undecodable pictures are the client's problem, not a 500
            if "cannot identify image" in str(e) or "UnidentifiedImageError" in str(e):
                raise ApiError(422, "one of the images could not be decoded", "images") from None
            raise
        return {"profile": profile, "source": "images"}


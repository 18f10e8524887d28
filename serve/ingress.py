"""The HTTP API (FastAPI on a Serve ingress deployment): auth, validation, tenancy, and the calls into the
style stage, fusion and the generator. Every error is JSON {error, detail, field}.

Overload and faults never reach the client as anything else:
- each replica answers at most `max_inflight_requests` /v1 requests at once; past that it answers 503 +
  Retry-After itself, at once (its Serve slots are a little larger and its proxy queue unbounded, so Serve's
  proxy never answers a plain-text 503 of its own);
- a downstream deployment that is full (Serve back-pressure), restarting (its replica died) or slower than
  `downstream_timeout_s` also becomes 503 + Retry-After (`error`: overloaded / unavailable / timeout);
- request bodies are counted as they stream in: past `max_upload_bytes` the answer is 413, with or
  without a Content-Length header.
"""

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from typing import Literal
from urllib.parse import urlparse

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

try:  # newer Serve only
    from ray.serve.exceptions import ReplicaUnavailableError
except ImportError:  # pragma: no cover
    ReplicaUnavailableError = DeploymentUnavailableError

from cluster.storage import Storage
from klein.generate import GenerateError, GenerateRequest
from serve import jobs as jobstore
from serve import metrics
from serve.config import ServeConfig
from serve.errors import ApiError, error_response, install_catch_all_middleware, install_error_handlers, not_found
from serve.tenants import AuthError, KeyStore, SharedRateLimit, TokenBucketLimiter, key_from_headers, retry_after_header
from train.job import JobError, check_job_id, lora_prefix

log = logging.getLogger("klein.serve.ingress")

API_PREFIX = "/v1"
OVERLOAD_RETRY_S = 2
# routes that take a JSON body only: anything else is a 415, not a confusing validation error
JSON_ONLY = {f"{API_PREFIX}/generate"}

api = FastAPI(
    title="Klein Style",
    version="1.0",
    description="Train style LoRAs for FLUX.2 Klein and generate images in those styles. "
    "Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)

# Set by the replica's Ingress.__init__: the module-level middleware reads the limits from here, and counts
# the /v1 requests in flight on this replica (one event loop per replica: no lock needed).
_RUNTIME: dict = {"config": ServeConfig(storage=tempfile.gettempdir()), "inflight": 0, "refused": 0}


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
    path = request.url.path
    if request.method == "POST" and path in JSON_ONLY:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            metrics.count_error(415, "unsupported_media_type")
            return error_response(415, "unsupported_media_type",
                                  f"send the body as application/json, not {content_type[:80] or 'no content type'}",
                                  "content-type")
    counted = path.startswith(API_PREFIX + "/")
    if counted:
        if _RUNTIME["inflight"] >= config.max_inflight_requests:
            _RUNTIME["refused"] += 1
            metrics.count_error(503, "overloaded")
            return error_response(503, "overloaded", f"this server is handling {config.max_inflight_requests} requests "
                                  "already; retry shortly", None, retry_after_header(config.overload_retry_after_s))
        _RUNTIME["inflight"] += 1
    try:
        response = await call_next(request)
    finally:
        if counted:
            _RUNTIME["inflight"] -= 1
    if cors:
        response.headers.update(_cors_headers(origin))
    return response


class BodyTooLarge(HTTPException):
    """Raised while a body streams in past the limit (FastAPI re-raises HTTPExceptions from body parsing)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class BodySizeLimit:
    """ASGI wrapper that counts body bytes as they arrive: a chunked upload with no Content-Length cannot
    get past `max_upload_bytes` either (the Content-Length check above refuses declared sizes first)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _RUNTIME["config"].max_upload_bytes
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body") or b"")
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, counted_receive, send)


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
api.add_middleware(BodySizeLimit)


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


_REPLICA_FAILURES = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


def _is_replica_failure(error: BaseException) -> bool:
    """A downstream replica died or is gone (not: the request itself was bad)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _REPLICA_FAILURES):
            return True
        if isinstance(error, RayServeException) and "actor died" in str(error):
            return True
        error = getattr(error, "cause", None) if isinstance(error, RayTaskError) else error.__cause__
    return False


async def _call(make, what: str = "service", timeout_s: float | None = None, retry_after_s: int = OVERLOAD_RETRY_S,
                attempts: int = 2):
    """Call a deployment: `make()` sends the request and returns its DeploymentResponse.

    Every call the ingress makes is idempotent (a seeded image, a prompt rewrite, a fusion), so a call whose
    replica died under it is sent once more, to a live or a replacement replica, while the deadline allows.
    Back-pressure, a replica failure that persists and the deadline become 503 + Retry-After; a call past the
    deadline is cancelled so that it does not hold a slot downstream."""

    async def wait(response):
        return await response

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retry = retry_after_header(retry_after_s)
    for attempt in range(attempts):
        response = make()
        remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(wait(response), remaining)
        except BackPressureError as e:
            raise ApiError(503, f"the {what} is at capacity; retry shortly", None, error="overloaded",
                           headers=retry_after_header(e.retry_after_s or retry_after_s)) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, f"the {what} did not answer within {timeout_s:g} s; retry shortly", None,
                           error="timeout", headers=retry) from None
        except Exception as e:
            if not _is_replica_failure(e):
                raise
            if attempt + 1 < attempts and (deadline is None or deadline - time.monotonic() > 1.0):
                log.warning("a %s replica failed under a request (%s); sending it again", what, type(e).__name__)
                continue
            log.warning("the %s failed while handling a request (%s); answering 503", what, type(e).__name__)
            raise ApiError(503, f"the {what} is restarting; retry shortly", None, error="unavailable",
                           headers=retry) from None


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


def _replica_tag() -> str:
    """This ingress replica's Serve id (shows which replica answered /healthz), or the process id."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 — outside Serve (tests calling the app directly)
        return f"pid-{os.getpid()}"


def _upload_label(filename: str | None) -> str:
    """How errors name an uploaded file: its base name as the client sent it (printable, short)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:100]
    return name or "the uploaded zip"


MAX_PICTURE_PIXELS = 64_000_000


def _checked_picture(label: str, data: bytes) -> bytes:
    """An uploaded picture decoded and converted to an RGB PNG, or a 422 naming what is wrong with it."""
    from train.dataset import FileProblem, decode_image

    result = decode_image(label, data, MAX_PICTURE_PIXELS)
    if isinstance(result, FileProblem):
        raise ApiError(422, str(result), "images")
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_trigger(value) -> str:
    from train.captions import check_trigger

    try:
        return check_trigger(value)
    except Exception as e:  # noqa: BLE001 — the check's message is written for users
        raise ApiError(422, str(e), "trigger") from None


def _invalid_json(e: json.JSONDecodeError) -> ApiError:
    return ApiError(400, f"the body is not valid JSON ({e.msg} at position {e.pos})", None, error="invalid_json")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, style, generator, fusion, config: dict, rate_limiter=None):
        self.config = ServeConfig.from_any(config)
        # Serve pickles this class by value (with copies of the globals it uses); the middleware reads the
        # real module's _RUNTIME, so reach it through an import
        import serve.ingress as this_module

        this_module._RUNTIME["config"] = self.config
        self.storage = Storage.from_uri(self.config.storage)
        self.keys = KeyStore(self.storage)
        local = TokenBucketLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst,
                                   overrides=self.config.tenant_rate_limits)
        self.limiter = SharedRateLimit(rate_limiter if self.config.shared_rate_limit else None, local)
        self.style = style
        self.generator = generator
        self.fusion = fusion
        self.jobs = jobstore.JobRunner(self.storage, self.config.train_task_num_cpus)
        self._lora_skeleton = None

    async def _downstream(self, make, what: str, timeout_s: float | None = None):
        """`make()` sends one call to a deployment; see `_call` for retries, time-outs and 503s."""
        timeout_s = self.config.downstream_timeout_s if timeout_s is None else timeout_s
        return await _call(make, what, timeout_s, self.config.overload_retry_after_s)

    def _timeout_for(self, request: Request) -> float:
        """The request's deadline for downstream calls: `X-Request-Timeout` (seconds) if the client sets a
        shorter one than the server's `downstream_timeout_s`."""
        limit = self.config.downstream_timeout_s
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

    # -- auth + rate limit --------------------------------------------------------------------------------
    async def _tenant(self, request: Request) -> str:
        key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        try:
            tenant = self.keys.tenant_of(key)
        except AuthError as e:
            raise ApiError(401, str(e), "authorization", headers={"WWW-Authenticate": "Bearer"}) from None
        wait = await self.limiter.acquire(tenant)
        if wait > 0:
            rate, _ = self.config.rate_limit_of(tenant)
            raise ApiError(429, f"rate limit of {rate:g} requests/s exceeded; retry later",
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
        return {"status": "ok", "model": self.config.model, "replica": _replica_tag()}

    @api.get("/metrics", tags=["service"], include_in_schema=False)
    async def metrics_endpoint(self) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- LoRAs --------------------------------------------------------------------------------------------
    @api.post(f"{API_PREFIX}/loras", tags=["loras"], status_code=202)
    async def create_lora(self, request: Request) -> JSONResponse:
        """Start training: multipart (`refs`: a zip of images, `trigger`, optional `steps`/`rank`/`resolution`),
        or JSON `{"source_uri": ..., "trigger": ...}`."""
        tenant = await self._tenant(request)
        if self.jobs.active_count(tenant) >= self.config.max_training_jobs_per_tenant:
            raise ApiError(429, f"at most {self.config.max_training_jobs_per_tenant} training job(s) may run at once per "
                           "tenant; wait for one to finish", None, headers=retry_after_header(30))
        job_id = jobstore.new_id()
        content_type = request.headers.get("content-type", "")
        # everything the request says is checked before anything is stored: a refused request leaves no trace
        if content_type.startswith("multipart/form-data"):
            source, options = await self._receive_zip(request, tenant, job_id)
        elif content_type.startswith("application/json"):
            source, options = await self._source_from_json(request)
        else:
            raise ApiError(415, "send multipart/form-data with a `refs` zip, or JSON with `source_uri`", "content-type")
        trigger = options.pop("trigger")
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
        options = {name: _form_value(form.get(name), name) for name in ("steps", "rank", "resolution") if form.get(name)}
        trigger = form.get("trigger")
        if trigger is not None and not isinstance(trigger, str):
            raise ApiError(422, "`trigger` must be a text field", "trigger")
        # absent: the default trigger; given (even empty): it must pass the check
        options["trigger"] = _check_trigger("zxy_style" if trigger is None else trigger)
        await asyncio.to_thread(_check_zip, upload.file)
        key = jobstore.upload_key(tenant, job_id)
        upload.file.seek(0)
        try:
            await asyncio.to_thread(self.storage.write_chunks, key, iter(lambda: upload.file.read(1 << 20), b""))
            await asyncio.to_thread(self._check_refs, key, _upload_label(upload.filename))
        except BaseException:
            await asyncio.to_thread(self._forget_upload, key)
            raise
        return self.storage.uri_of(key), options

    def _check_refs(self, key: str, label: str) -> None:
        from train.dataset import DatasetError, load_refs

        try:
            load_refs(key, storage=self.storage)
        except DatasetError as e:
            # the problems name the upload as the client knows it, never by its path on the server
            raise ApiError(422, str(e).replace(self.storage.uri_of(key), label), "refs") from None

    def _forget_upload(self, key: str) -> None:
        """Remove a refused upload and the folders it created, so a refused request leaves storage as it was."""
        folder = key.rsplit("/", 1)[0]
        try:
            self.storage.delete(folder)
            if self.storage.is_local:  # empty parents (uploads/<tenant>/) that this upload may have created
                parent = self.storage.local_path(folder).parent
                for path in (parent, parent.parent):
                    if path.is_dir() and not any(path.iterdir()):
                        path.rmdir()
        except Exception as e:  # noqa: BLE001 — never hide the request's own error
            log.warning("could not remove the refused upload %s: %s", folder, type(e).__name__)

    async def _source_from_json(self, request: Request) -> tuple[str, dict]:
        try:
            body = TrainSourceBody.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as e:
            raise _invalid_json(e) from None
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
        options["trigger"] = _check_trigger(body.trigger)
        return uri, options

    @api.post(f"{API_PREFIX}/loras/import", tags=["loras"], status_code=201)
    async def import_lora(self, request: Request) -> JSONResponse:
        """Bring your own LoRA: multipart `lora` (a .safetensors file: diffusers/peft, ComfyUI, ai-toolkit or
        kohya keys) and an optional `trigger`. Only safetensors is read, never a pickle; every layer must fit
        the served model and every weight must be finite. It is stored like a trained LoRA, in our format."""
        tenant = await self._tenant(request)
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
            trigger = _check_trigger(trigger)
        data = await upload.read()
        lora_id = jobstore.new_id()
        manifest = await asyncio.to_thread(self._import_lora, tenant, lora_id, data, trigger)
        return JSONResponse({"id": lora_id, "status": "done", "trigger": manifest["trigger"],
                             "layers": manifest["layers"], "rank": manifest["rank"]}, status_code=201)

    def _import_lora(self, tenant: str, lora_id: str, data: bytes, trigger: str | None) -> dict:
        from klein.lora import LoraError, LoraWeights, check_lora_fits, lora_to_bytes, read_lora
        from klein.model import model_id

        try:
            lora = read_lora(data, name="the uploaded LoRA")  # safetensors only; NaN/inf refused
            check_lora_fits(lora, self._model_skeleton())
        except LoraError as e:
            raise ApiError(422, str(e), "lora") from None
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as e:
            raise ApiError(422, f"the uploaded LoRA has tensors of unexpected shapes or types ({type(e).__name__})",
                           "lora") from None
        if trigger is None and lora.meta.get("trigger"):
            trigger = _check_trigger(str(lora.meta["trigger"]))
        meta = {"trigger": trigger, "base_model": model_id(self.config.model), "imported": True,
                "source_format": lora.meta.get("source_format")}
        clean = LoraWeights(layers=lora.layers, meta={k: v for k, v in meta.items() if v is not None})
        prefix = lora_prefix(tenant, lora_id)
        sha = self.storage.write_bytes(f"{prefix}/lora.safetensors", lora_to_bytes(clean))
        manifest = {
            "id": lora_id, "tenant": tenant, "trigger": trigger, "base_model": meta["base_model"],
            "source": {"kind": "import", "format": meta["source_format"], "sha256": hashlib.sha256(data).hexdigest()},
            "rank": clean.rank, "layers": len(clean.layers), "style_profile": None,
            "decision": {"variant": "imported", "reason": "uploaded by the tenant",
                         "text_stage": {"use_gemini": False, "reason": "imported LoRA: no style profile"}},
            "files": {"lora.safetensors": sha}, "created": time.time(),
        }
        self.storage.write_json(f"{prefix}/manifest.json", manifest)  # last: the LoRA exists from here on
        return manifest

    def _model_skeleton(self):
        """The served transformer's modules on the `meta` device (shapes only, no memory), to check uploads."""
        if self._lora_skeleton is None:
            import torch
            from diffusers import Flux2Transformer2DModel

            from klein.model import resolve_model_source

            folder = resolve_model_source(self.config.model)
            config = Flux2Transformer2DModel.load_config(str(folder / "transformer"))
            with torch.device("meta"):
                self._lora_skeleton = Flux2Transformer2DModel.from_config(config)
        return self._lora_skeleton

    @api.get(f"{API_PREFIX}/loras", tags=["loras"])
    async def list_loras(self, request: Request) -> dict:
        tenant = await self._tenant(request)
        items = []
        finished = set(await asyncio.to_thread(self.storage.list_tenant, tenant, "loras"))
        for lora_id in await asyncio.to_thread(jobstore.list_jobs, self.storage, tenant):
            if lora_id in finished:  # trained or imported: the manifest says what it is
                manifest = await asyncio.to_thread(jobstore.read_manifest, self.storage, tenant, lora_id) or {}
                items.append({"id": lora_id, "status": "done", "trigger": manifest.get("trigger")})
                continue
            status = await asyncio.to_thread(self.jobs.state_of, lora_id)
            items.append({"id": lora_id, "status": _public_status(status.get("state")), "trigger": status.get("trigger")})
        return {"loras": items}

    @api.get(f"{API_PREFIX}/loras/{{lora_id}}", tags=["loras"])
    async def get_lora(self, lora_id: str, request: Request) -> dict:
        tenant = await self._tenant(request)
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
        tenant = await self._tenant(request)
        lora_id = self._owned(tenant, lora_id)
        await asyncio.to_thread(self.jobs.delete, tenant, lora_id)
        return {"id": lora_id, "deleted": True}

    @api.get(f"{API_PREFIX}/loras/{{lora_id}}/files/{{name}}", tags=["loras"])
    async def get_lora_file(self, lora_id: str, name: str, request: Request) -> Response:
        tenant = await self._tenant(request)
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

    async def _adapters(self, loras: list[dict], fusion: str, left=None) -> tuple[str, list[float], dict | None, dict]:
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
            result = await self._downstream(lambda: self.fusion.klora_scores.remote(specs), "fusion stage", left and left())
            # scores None: the generator computes them on its GPU (serve/fusion.py, `scores_place`)
            return adapter_set_id(loras), [l["weight"] for l in loras], {"scores": result["scores"]}, \
                {"method": "klora", "cached": result["cached"], "scores_on": result.get("scores_on", "fusion")}
        result = await self._downstream(lambda: self.fusion.linear.remote(specs), "fusion stage", left and left())
        return adapter_set_id([result]), [1.0], None, {"method": "linear", "cached": result["cached"], "rank": result["rank"]}

    @api.post(f"{API_PREFIX}/generate", tags=["generate"],
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(self, body: GenerateBody, request: Request) -> Response:
        tenant = await self._tenant(request)
        deadline = time.monotonic() + self._timeout_for(request)  # one deadline for the whole request

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        gen_request = self._request(body)
        loras = await asyncio.to_thread(self._resolve_loras, tenant, body)
        model_id, weights, klora, fusion_info = await self._adapters(loras, body.fusion, left)
        primary = loras[0] if loras else None
        styled = await self._downstream(lambda: self.style.restyle.remote(
            gen_request.prompt, primary["style_profile"] if primary else None,
            [l["trigger"] for l in loras if l.get("trigger")], body.use_gemini,
            bool(primary["use_gemini"]) if primary else False), "style stage", left())
        item = {"prompt": styled["prompt"], "seed": gen_request.seed, "steps": gen_request.steps,
                "width": gen_request.width, "height": gen_request.height, "guidance": gen_request.guidance,
                "negative_prompt": gen_request.negative_prompt, "model_id": model_id, "adapter_weights": weights,
                "klora": klora}
        png = await self._downstream(lambda: self.generator.options(multiplexed_model_id=model_id).generate.remote(item),
                                     "generator", left())
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
        tenant = await self._tenant(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                body = ProfileBody.model_validate(json.loads(await request.body()))
            except json.JSONDecodeError as e:
                raise _invalid_json(e) from None
            except ValueError:
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
        # each picture is checked and converted here, by the training data's own decoder (EXIF rotation,
        # CMYK, 16-bit, alpha; bombs, truncation and animations refused), so the style stage gets plain RGB PNGs
        images = [await asyncio.to_thread(_checked_picture, _upload_label(f.filename), await f.read()) for f in uploads]
        use_gemini = form.get("use_gemini") if form.get("use_gemini") in ("auto", "on", "off") else "auto"
        try:
            profile = await self._downstream(lambda: self.style.profile_from_images.remote(images, use_gemini),
                                             "style stage")
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 — undecodable pictures are the client's problem, not a 500
            if "cannot identify image" in str(e) or "UnidentifiedImageError" in str(e):
                raise ApiError(422, "one of the images could not be decoded", "images") from None
            raise
        return {"profile": profile, "source": "images"}


"""The OpenAPI document of the HTTP API, built from the contract's models (`klein_style_client.models`).

FastAPI documents what a route declares; the parts it cannot see are added here:
- request bodies: the routers read their bodies themselves (JSON or multipart, with their own size, depth and
  content-type checks), so each route names its body models with `request_body(...)` and `install` adds those
  models to `components.schemas`;
- errors: every error is `ErrorBody` ({error, detail, field}, + request_id on 500s), whatever raised it, so each
  route lists its error statuses with `errors(...)` (FastAPI's own 422 `HTTPValidationError` never appears);
- authentication: exactly what `serve.middleware.tenant_of` accepts, `Authorization: Bearer <key>` or
  `X-API-Key: <key>` (either one), declared as two security schemes on every /v1 route.
"""

from __future__ import annotations

from fastapi import FastAPI, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from klein_style_client.models import (
    ErrorBody, GenerateBody, LoraImportUpload, ProfileBody, ProfileUpload, TrainSourceBody, TrainUpload,
)

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    TrainSourceBody, TrainUpload, LoraImportUpload, GenerateBody, ProfileBody, ProfileUpload,
)
_SCHEMAS = "#/components/schemas/{model}"

_KEY_HELP = ("A tenant's API key (`ks_...`). `klein-style serve` prints the first one; "
             "`serve.tenants.create_api_key` makes more. Keys are stored hashed.")
# auto_error=False: these only declare the schemes; `tenant_of` checks the key and answers 401 in the error shape
bearer_key = HTTPBearer(auto_error=False, scheme_name="bearerAuth", description=_KEY_HELP)
header_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKeyHeader", description=_KEY_HELP)
# Two security dependencies become two alternatives in each operation's `security` list: either header will do.
API_KEY = [Security(bearer_key), Security(header_key)]

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before sending the request again",
                                "schema": {"type": "integer"}}}
_ERRORS = {
    400: ("the body is not JSON, nests too deep, or the client went away mid-body (`invalid_json`, `bad_request`)",
          None),
    401: ("no API key, or an unknown one (`unauthorized`)", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    404: ("no such LoRA or file for this tenant (another tenant's is a 404 too)", None),
    408: ("the request body did not arrive in time (`timeout`)", None),
    409: ("the LoRA is still training (`lora_not_ready`)", None),
    413: ("the body is over `max_upload_bytes`, or a JSON body over its limit (`payload_too_large`)", None),
    415: ("the wrong content type (`unsupported_media_type`)", None),
    422: ("a field is invalid; `field` names it (`invalid_request`, `non_finite_image`)", None),
    429: ("the tenant's rate limit, training-job limit, or too many failed authentications (`rate_limited`)",
          _RETRY_AFTER),
    500: ("the server failed; `request_id` points at its log line (`internal_error`, `integrity_error`)", None),
    503: ("at capacity, a replica restarting, or a downstream deadline passed (`overloaded`, `unavailable`, "
          "`timeout`)", _RETRY_AFTER),
}
# what any /v1 request can get: authentication, rate limits, overload, a body cut off or too large, a failure
V1_ERRORS = (400, 401, 408, 413, 429, 500, 503)


def errors(*statuses: int, model: type[BaseModel] = ErrorBody, description: str | None = None) -> dict:
    """`responses=` entries: each status answers `model` (the one error shape), with its headers."""
    out = {}
    for status in statuses:
        text, headers = _ERRORS[status]
        out[status] = {"model": model, "description": description or text, **({"headers": headers} if headers else {})}
    return out


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": _SCHEMAS.format(model=model.__name__)}


def request_body(json: type[BaseModel] | None = None, multipart: type[BaseModel] | None = None) -> dict:
    """`openapi_extra=` for a route that reads its body itself: JSON and/or multipart/form-data."""
    content = {}
    if json is not None:
        content["application/json"] = {"schema": _ref(json)}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": _ref(multipart)}
    return {"requestBody": {"required": True, "content": content}}


def install(api: FastAPI) -> None:
    """Replace `api.openapi` with FastAPI's document plus the request body models."""

    def openapi() -> dict:
        if api.openapi_schema is None:
            document = get_openapi(title=api.title, version=api.version, description=api.description,
                                   routes=api.routes, tags=api.openapi_tags, servers=api.servers)
            _, defs = models_json_schema([(model, "validation") for model in REQUEST_MODELS], ref_template=_SCHEMAS)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            clash = sorted(set(defs.get("$defs", {})) & set(schemas))
            if clash:
                raise RuntimeError(f"request and response models share the schema names {clash}")
            schemas.update(defs.get("$defs", {}))
            _no_fastapi_validation_errors(document)
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi


def _no_fastapi_validation_errors(document: dict) -> None:
    """FastAPI adds a 422 `HTTPValidationError` to routes with parameters; ours answer `ErrorBody` instead."""
    fastapi_422 = "#/components/schemas/HTTPValidationError"
    ours = {"description": _ERRORS[422][0], "content": {"application/json": {"schema": _ref(ErrorBody)}}}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            answer = (operation.get("responses") or {}).get("422")
            if answer and answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref") == fastapi_422:
                operation["responses"]["422"] = ours
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)

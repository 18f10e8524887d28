"""One JSON error shape for every failure: {"error", "detail", "field"} (+ "request_id" on 500s).

Clients never see a stack trace: anything unexpected becomes a generic 500 whose request id points at the
server-side log line that holds the trace.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.storage import IntegrityError

log = logging.getLogger("klein.serve")

# 503s carry a more precise `error`: overloaded (at capacity), unavailable (a replica is restarting), timeout.
_STATUS_NAMES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "rate_limited", 500: "internal_error", 502: "bad_gateway", 503: "overloaded", 504: "timeout",
}


class ApiError(Exception):
    """A failure the client can act on: HTTP status, a short code, a sentence, and the field at fault."""

    def __init__(self, status: int, detail: str, field: str | None = None, *, error: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error or _STATUS_NAMES.get(status, "error")
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def not_found(what: str, field: str | None = None) -> ApiError:
    # Same answer for "does not exist" and "belongs to another tenant", so nothing is disclosed.
    return ApiError(404, f"{what} not found", field)


def error_body(error: str, detail: str, field: str | None = None, **extra) -> dict:
    return {"error": error, "detail": detail, "field": field, **extra}


def error_response(status: int, error: str, detail: str, field: str | None = None,
                   headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(error, detail, field, **extra), status_code=status, headers=headers)


def _validation_field(err: dict) -> str | None:
    # FastAPI locations look like ("body", "width") or ("query", "limit"); the client wants "width".
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
    return ".".join(loc) or None


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Register handlers that turn every exception into the JSON error shape. `on_error(status, code)` counts them."""

    def counted(status: int, code: str) -> None:
        if on_error is not None:
            on_error(status, code)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        counted(exc.status, exc.error)
        return error_response(exc.status, exc.error, exc.detail, exc.field, exc.headers)

    @app.exception_handler(IntegrityError)  # also a replica's, which Ray raises as a subclass of it
    async def integrity_error(_request: Request, _exc: IntegrityError):
        counted(500, "integrity_error")  # the message names a server path: the client gets a plain sentence
        return error_response(500, "integrity_error", "a stored file this request needs does not match the sha256 "
                              "its manifest recorded (it changed after it was written), so it was not used; "
                              "train or import the LoRA again", None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # not JSON at all: a 400, like every other endpoint's
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            counted(400, "invalid_json")
            return error_response(400, "invalid_json", f"the body is not valid JSON ({reason})", None)
        field = _validation_field(first)
        message = first.get("msg", "invalid request")
        detail = f"{field}: {message}" if field else message
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more problem(s))"
        counted(422, "invalid_request")
        return error_response(422, "invalid_request", detail, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = _STATUS_NAMES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        counted(exc.status_code, code)
        return error_response(exc.status_code, code, detail, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
        counted(500, "internal_error")
        return error_response(500, "internal_error", "the server failed to handle this request; quote the request id "
                              "when reporting it", None, request_id=request_id)


def install_catch_all_middleware(app: FastAPI, on_error=None) -> None:
    """Starlette re-raises after its Exception handler runs; this middleware answers first so nothing leaks."""

    @app.middleware("http")
    async def catch_all(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 — the last line of defence: log the trace, answer generically
            http_exc = _nested_http_exception(exc)
            if http_exc is not None:  # e.g. a body over the limit, raised while a middleware's task group read it
                code = _STATUS_NAMES.get(http_exc.status_code, "error")
                if on_error is not None:
                    on_error(http_exc.status_code, code)
                detail = http_exc.detail if isinstance(http_exc.detail, str) else code.replace("_", " ")
                return error_response(http_exc.status_code, code, detail, None, getattr(http_exc, "headers", None))
            request_id = uuid.uuid4().hex[:16]
            log.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
            if on_error is not None:
                on_error(500, "internal_error")
            return error_response(500, "internal_error", "the server failed to handle this request; quote the "
                                  "request id when reporting it", None, request_id=request_id)


def _nested_http_exception(exc: BaseException, depth: int = 0) -> StarletteHTTPException | None:
    """An HTTPException wrapped in exception groups (anyio task groups in Starlette's middleware) or causes."""
    if depth > 8 or exc is None:
        return None
    if isinstance(exc, StarletteHTTPException):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _nested_http_exception(inner, depth + 1)
        if found is not None:
            return found
    return _nested_http_exception(exc.__cause__, depth + 1) if exc.__cause__ is not exc else None

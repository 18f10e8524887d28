"""Middleware of the HTTP API: request limits, CORS, metrics, errors, and authentication.

Every request is bounded before any endpoint sees it (`RequestLimits`, the outermost layer):
- a declared Content-Length past `max_upload_bytes` is a 413 at once; a body is counted as it streams in,
  so a chunked upload with no Content-Length cannot get past the limit either;
- a body must arrive within `body_timeout_s` in all, with no gap longer than `body_idle_s` (a body that
  stalls or trickles, or a chunked body with no end, is answered 408 and its connection let go);
- a JSON body is at most `max_json_bytes` and nested at most `max_json_depth` deep (a 10,000-deep body
  would otherwise be a RecursionError);
- a request counts against `max_inflight_requests` only once its body is in: clients that send headers and
  stall cannot lock the service out; past the limit the answer is 503 + Retry-After, at once.
The limits come from `Limits` (the app builder's `limits`, else `KLEIN_SERVE_*` environment variables).

Authentication (`tenant_of`): the API key names the tenant, each tenant is rate-limited, and failed
authentication is rate-limited per client address, so guessing keys costs time.
Every error is JSON {error, detail, field} (serve/errors.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, fields

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from serve import metrics
from serve.config import ServeConfig
from serve.errors import ApiError, error_response, install_catch_all_middleware, install_error_handlers
from serve.tenants import AuthError, TokenBucketLimiter, key_from_headers, retry_after_header

API_PREFIX = "/v1"
# routes that take a JSON body only: anything else is a 415, not a confusing validation error
JSON_ONLY = {f"{API_PREFIX}/generate"}
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_SPOOL_BYTES = 1 << 20  # bodies larger than this wait on disk, not in memory
_REPLAY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds on every request's body and on failed authentication. Environment: KLEIN_SERVE_<NAME upper>."""

    body_timeout_s: float = 120.0  # the whole body must be in within this
    body_idle_s: float = 15.0  # and no gap between two chunks may be longer
    max_json_bytes: int = 1 << 20
    max_json_depth: int = 32
    auth_failures_per_s: float = 0.5  # failed authentications per client address (token bucket)
    auth_failure_burst: int = 10

    @classmethod
    def from_env(cls, overrides: dict | None = None, environ: dict | None = None) -> "Limits":
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f"KLEIN_SERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _number(raw, f"KLEIN_SERVE_{f.name.upper()}", int if f.type in (int, "int") else float)
        unknown = sorted(set(overrides or {}) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown request limits {unknown}; known: {[f.name for f in fields(cls)]}")
        values.update(overrides or {})  # explicit settings win over the environment
        limits = cls(**values)
        for f in fields(cls):
            value = getattr(limits, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"request limit {f.name} must be a positive number, got {value!r}")
        return limits


def _number(raw: str, name: str, kind):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


# Set by the replica's Ingress.__init__: the middleware and the routers read the replica's state from here
# (one event loop per replica: no lock needed). `ctx` is the Ingress instance.
RUNTIME: dict = {"config": ServeConfig(storage=tempfile.gettempdir()), "limits": Limits(), "inflight": 0,
                 "refused": 0, "ctx": None, "auth_failures": None}


def ctx():
    """The Ingress replica serving this request (its storage, keys, handles)."""
    return RUNTIME["ctx"]


# -- JSON bodies --------------------------------------------------------------------------------------------
def json_depth(data: bytes) -> int:
    """How deep a JSON text nests (brackets outside strings), in one pass without parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_json_body(raw: bytes, model: type[BaseModel]):
    """A JSON body validated into `model`: 400 when it is not JSON, 422 naming the field when it does not fit.
    (Size and depth were bounded by `RequestLimits` before the endpoint ran.)"""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at position {e.pos})", None, error="invalid_json") from None
    except (UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", None, error="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{field}: {first['msg']}" if field else first["msg"], field) from None


# -- the outermost layer: bodies bounded in size and time, in-flight counted after the body ----------------
class _Refused(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


class RequestLimits:
    """ASGI wrapper: reads a request's whole body under the size and time limits (spooled to disk past
    1 MiB), checks JSON size and depth, then counts the request in flight and replays the body to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config: ServeConfig = RUNTIME["config"]
        limits: Limits = RUNTIME["limits"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        body = None
        try:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > config.max_upload_bytes:
                raise _Refused(413, "payload_too_large",
                               f"the request body is {int(length)} bytes; the limit is {config.max_upload_bytes}")
            if scope.get("method") in _BODY_METHODS:
                body = await self._read_body(receive, config, limits,
                                             headers.get("content-type", "").split(";")[0].strip().lower())
            counted = path.startswith(API_PREFIX + "/")
            if counted and RUNTIME["inflight"] >= config.max_inflight_requests:
                RUNTIME["refused"] += 1
                raise _Refused(503, "overloaded", f"this server is handling {config.max_inflight_requests} requests "
                               "already; retry shortly", retry_after_header(config.overload_retry_after_s))
        except _Refused as r:
            if body is not None:
                body.close()
            metrics.count_error(r.status, r.error)
            response = error_response(r.status, r.error, r.detail, None, r.headers)
            return await response(scope, receive, send)
        if counted:
            RUNTIME["inflight"] += 1
        try:
            return await self.app(scope, self._replay(body, receive) if body is not None else receive, send)
        finally:
            if counted:
                RUNTIME["inflight"] -= 1
            if body is not None:
                body.close()

    @staticmethod
    async def _read_body(receive, config: ServeConfig, limits: Limits, content_type: str):
        is_json = content_type == "application/json" or content_type.endswith("+json")
        cap = min(config.max_upload_bytes, limits.max_json_bytes) if is_json else config.max_upload_bytes
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        deadline = time.monotonic() + limits.body_timeout_s
        size = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), min(left, limits.body_idle_s))
                if message["type"] == "http.disconnect":
                    raise _Refused(400, "bad_request", "the client went away before the body was complete")
                chunk = message.get("body") or b""
                size += len(chunk)
                if size > cap:
                    what = f"a JSON body is at most {cap} bytes" if is_json else f"the limit is {cap}"
                    raise _Refused(413, "payload_too_large", f"the request body is over the limit of {cap} bytes ({what})")
                spool.write(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            spool.close()
            raise _Refused(408, "timeout", f"the request body did not arrive in time (at most {limits.body_timeout_s:g} s "
                           f"in all, {limits.body_idle_s:g} s between chunks)", {"Connection": "close"}) from None
        except BaseException:
            spool.close()
            raise
        if is_json and size:
            spool.seek(0)
            depth = json_depth(spool.read())
            if depth > limits.max_json_depth:
                spool.close()
                raise _Refused(400, "invalid_json", f"the JSON body nests {depth} levels deep; at most "
                               f"{limits.max_json_depth} are accepted")
        spool.seek(0)
        return spool

    @staticmethod
    def _replay(body, receive):
        done = False

        async def replay():
            nonlocal done
            if done:
                return await receive()  # after the body: disconnect notices come from the real channel
            chunk = body.read(_REPLAY_CHUNK)
            more = bool(chunk) and body.tell() < _end(body)
            done = not more
            return {"type": "http.request", "body": chunk, "more_body": more}

        return replay


def _end(spool) -> int:
    here = spool.tell()
    spool.seek(0, os.SEEK_END)
    end = spool.tell()
    spool.seek(here)
    return end


# -- CORS and content types -----------------------------------------------------------------------------------
def _cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "GET, POST, DELETE",
                        "Access-Control-Allow-Headers": "Authorization, X-API-Key, Content-Type",
                        "Access-Control-Max-Age": "600"})
    return headers


def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def install(api: FastAPI) -> None:
    """Every middleware and error handler of the API, in order (the last added runs first)."""

    @api.middleware("http")
    async def cors_and_content_type(request: Request, call_next):
        config: ServeConfig = RUNTIME["config"]
        origin = request.headers.get("origin")
        cors = bool(origin) and origin in config.cors_origins  # CORS is off unless origins are configured
        if cors and request.method == "OPTIONS":
            return Response(status_code=204, headers=_cors_headers(origin, preflight=True))
        if request.method == "POST" and request.url.path in JSON_ONLY:
            content_type = request.headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != "application/json":
                metrics.count_error(415, "unsupported_media_type")
                shown = header_safe(content_type, 80) or "no content type"
                return error_response(415, "unsupported_media_type", f"send the body as application/json, not {shown}",
                                      "content-type")
        response = await call_next(request)
        if cors:
            response.headers.update(_cors_headers(origin))
        return response

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
    api.add_middleware(RequestLimits)


# -- text that goes into a header --------------------------------------------------------------------------------
def header_safe(text: str, limit: int = 1000) -> str:
    """Printable ASCII only: control characters (CR, LF, NUL, ESC, DEL, C1) become spaces and other non-ASCII
    characters `?`, so no text can split, end or corrupt a header."""
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        out.append(" " if code < 32 or 127 <= code < 160 else ch if code < 127 else "?")
    return "".join(out)


# -- authentication -----------------------------------------------------------------------------------------------
def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def tenant_of(request: Request) -> str:
    """The tenant whose API key the request carries, after that tenant's rate limit; 401 or 429 otherwise.

    A client address that keeps failing authentication gets 429 + Retry-After until its bucket refills,
    before its key is even looked at."""
    state = ctx()
    config: ServeConfig = RUNTIME["config"]
    limits: Limits = RUNTIME["limits"]
    failures = RUNTIME["auth_failures"]
    if failures is None:
        failures = RUNTIME["auth_failures"] = TokenBucketLimiter(limits.auth_failures_per_s, limits.auth_failure_burst)
    client = _client_address(request)
    key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if key:  # an address that is out of attempts is refused before its key is even looked at
        wait = failures.peek(client)
        if wait > 0:
            raise ApiError(429, "too many failed authentications from this address; retry later", "authorization",
                           error="rate_limited", headers=retry_after_header(wait))
    try:
        tenant = state.keys.tenant_of(key)
    except AuthError as e:
        if key:  # a missing key costs nothing to send again; a wrong one is a guess
            wait = failures.try_acquire(client)
            if wait > 0:
                raise ApiError(429, "too many failed authentications from this address; retry later", "authorization",
                               error="rate_limited", headers=retry_after_header(wait)) from None
        raise ApiError(401, str(e), "authorization", headers={"WWW-Authenticate": "Bearer"}) from None
    wait = await state.limiter.acquire(tenant)
    if wait > 0:
        rate, _ = config.rate_limit_of(tenant)
        raise ApiError(429, f"rate limit of {rate:g} requests/s exceeded; retry later",
                       None, headers=retry_after_header(wait))
    return tenant

"""Service endpoints: /healthz (ready or not, and which replica answered) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.schema import ServeStatus

from klein_style_client.models import Health, HealthStarting
from serve import metrics
from serve.errors import error_response
from serve.middleware import RUNTIME
from serve.openapi import errors

router = APIRouter(tags=["service"])

GENERATOR = "Generator"  # the deployment that draws images (serve/app.py binds it under this name)
STARTING_RETRY_AFTER_S = 5
# one controller call per this many seconds at most, whatever the probe rate
_READINESS_TTL_S = 1.0
_readiness_cache: dict[str, tuple[float, tuple[bool | None, str]]] = {}


def replica_tag() -> str:
    """This ingress replica's Serve id (shows which replica answered /healthz), or the process id."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 — outside Serve (tests calling the app directly)
        return f"pid-{os.getpid()}"


def generator_readiness(status: ServeStatus, app_name: str) -> tuple[bool | None, str]:
    """(ready, why) for the app's Generator from Serve's public status: ready once one replica runs (a replica
    loads the whole model in its constructor, so until then every image request would wait or fail); None when
    the status does not show the deployment (we cannot tell)."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(GENERATOR) if app is not None else None
    if deployment is None:
        return None, f"Serve reports no {GENERATOR} deployment in app {app_name!r}"
    running = sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")
    if running:
        return True, f"{running} {GENERATOR} replica(s) running"
    total = sum(deployment.replica_states.values())
    return False, (f"the {GENERATOR} is starting (0 of {total} replica(s) running, deployment {deployment.status}); "
                   f"it loads the model first: retry in a few seconds")


def _current_readiness() -> tuple[bool | None, str]:
    """This app's Generator readiness, asked of the Serve controller (cached for _READINESS_TTL_S)."""
    try:
        app_name = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 — outside Serve there is no Generator to wait for
        return None, "not running under Ray Serve"
    cached = _readiness_cache.get(app_name)
    if cached is not None and time.monotonic() - cached[0] < _READINESS_TTL_S:
        return cached[1]
    try:
        answer = generator_readiness(serve.status(), app_name)
    except Exception as e:  # noqa: BLE001 — the controller is away: replicas keep serving, so this is no 503
        answer = (None, f"the Serve controller did not answer ({type(e).__name__})")
    _readiness_cache[app_name] = (time.monotonic(), answer)
    return answer


def health_response(ready: bool | None, why: str, model: str, replica: str) -> JSONResponse:
    """200 once the Generator can draw (or when we cannot tell: Serve keeps serving without its controller);
    503 + Retry-After with the JSON error shape while it is still starting."""
    if ready is False:
        return error_response(503, "unavailable", why, None, headers={"Retry-After": str(STARTING_RETRY_AFTER_S)},
                              state="starting", replica=replica)
    return JSONResponse(Health(status="ok", model=model, replica=replica, generator="ready" if ready else "unknown",
                               detail=why).model_dump(mode="json"))


@router.get("/healthz", response_model=Health,
            responses={**errors(500), **errors(503, model=HealthStarting, description="no Generator replica runs yet "
                                                "(`unavailable`, `state: starting`): retry after `Retry-After`")})
async def healthz() -> JSONResponse:
    ready, why = await asyncio.to_thread(_current_readiness)
    return health_response(ready, why, RUNTIME["config"].model, replica_tag())


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)

"""Service endpoints: /healthz (which replica answered) and /metrics (Prometheus)."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import Response
from ray import serve

from serve import metrics
from serve.middleware import RUNTIME

router = APIRouter(tags=["service"])


def replica_tag() -> str:
    """This ingress replica's Serve id (shows which replica answered /healthz), or the process id."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 — outside Serve (tests calling the app directly)
        return f"pid-{os.getpid()}"


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok", "model": RUNTIME["config"].model, "replica": replica_tag()}


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)

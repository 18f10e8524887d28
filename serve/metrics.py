"""Prometheus metrics of the HTTP API (one registry per ingress replica, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("klein_http_requests_total", "HTTP requests by route, method and status",
                   ["route", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("klein_http_request_seconds", "HTTP request latency by route", ["route", "method"],
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=REGISTRY)
ERRORS = Counter("klein_http_errors_total", "Error responses by status and error code", ["status", "code"],
                 registry=REGISTRY)
GENERATIONS = Counter("klein_generations_total", "Images generated, by fusion method and Gemini source",
                      ["fusion", "gemini_source"], registry=REGISTRY)


def count_error(status: int, code: str) -> None:
    ERRORS.labels(status=str(status), code=code).inc()


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

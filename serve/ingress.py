"""The HTTP API (FastAPI on a Serve ingress deployment). Every error is JSON {error, detail, field}.

The API is put together here from its parts:
- serve/middleware.py: request limits (body size and deadlines, JSON size and depth, in-flight requests
  counted once their body is in), CORS, metrics, the error shape, authentication and rate limits;
- serve/routers/: service (/healthz, /metrics), loras (list, status, delete, files, import), jobs (training
  submissions), generate, profile.

Overload and faults never reach the client as anything else:
- each replica answers at most `max_inflight_requests` /v1 requests at once; past that it answers 503 +
  Retry-After itself, at once (its Serve slots are a little larger and its proxy queue unbounded, so Serve's
  proxy never answers a plain-text 503 of its own);
- a downstream deployment that is full (Serve back-pressure), restarting (its replica died) or slower than
  `downstream_timeout_s` also becomes 503 + Retry-After (`error`: overloaded / unavailable / timeout);
- request bodies are counted as they stream in: past `max_upload_bytes` the answer is 413, with or
  without a Content-Length header; a body that does not arrive in time is a 408.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from cluster.storage import Storage
from serve import jobs as jobstore
from serve import middleware, openapi
from serve.config import ServeConfig
from serve.middleware import Limits
from serve.routers import generate, jobs, loras, profile, service
from serve.tenants import KeyStore, SharedRateLimit, TokenBucketLimiter

api = FastAPI(
    title="Klein Style",
    version="1.0",
    description="Train style LoRAs for FLUX.2 Klein and generate images in those styles. "
    "Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`. Every error is JSON "
    "`{error, detail, field}` (`ErrorBody`); 429 and 503 carry `Retry-After`. A typed Python client: "
    "`klein_style_client` (httpx + pydantic).",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
middleware.install(api)
for part in (service, jobs, loras, generate, profile):
    api.include_router(part.router)
openapi.install(api)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """One replica's state; the routers reach it through `serve.middleware.ctx()`."""

    def __init__(self, style, generator, fusion, config: dict, rate_limiter=None, limits: dict | None = None):
        self.config = ServeConfig.from_any(config)
        self.storage = Storage.from_uri(self.config.storage)
        self.keys = KeyStore(self.storage)
        local = TokenBucketLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst,
                                   overrides=self.config.tenant_rate_limits)
        self.limiter = SharedRateLimit(rate_limiter if self.config.shared_rate_limit else None, local)
        self.style = style
        self.generator = generator
        self.fusion = fusion
        self.jobs = jobstore.JobRunner(self.storage, self.config.train_task_num_cpus)
        # through the module: Serve pickles this class by value, and a copied dict would not be the one that
        # the middleware and the routers read
        middleware.RUNTIME.update(config=self.config, limits=Limits.from_env(limits), ctx=self, auth_failures=None)

"""The Serve application: Ingress → StyleStage → Generator, with Fusion beside them.

    serve run serve.app:app_builder storage=/data model=tiny      # args on the command line
    serve deploy serve/serve_config.yaml                          # or a config file (serveConfigV2)

`build_app(config)` binds the graph; each deployment gets the same `ServeConfig` as a dict. Replica counts,
autoscaling, queue limits and resources come from each deployment's defaults here, and a Serve config file
overrides them per deployment (serve/serve_config.yaml).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

from ray import serve

from cluster.pools import serve_actor_options
from serve.config import ServeConfig
from serve.fusion import Fusion
from serve.generator import Generator
from serve.ingress import Ingress
from serve.middleware import Limits
from serve.style import StyleStage
from serve.tenants import RateLimiter

APP_NAME = "klein-style"
ROUTE_PREFIX = "/"


def _cpu_replica(num_cpus: float) -> dict:
    # CPU-only replicas still take a sliver of `infer_gpu`, so they stay in the inference pool
    return serve_actor_options(num_gpus=0, num_cpus=num_cpus)


def _generator_options(config: ServeConfig, num_cpus: float) -> dict:
    gpus = 1 if config.device.startswith("cuda") else 0
    return serve_actor_options(num_gpus=gpus, num_cpus=num_cpus)


def build_app(config: dict | ServeConfig | None = None, *, replica_cpus: float = 0.1,
              deployment_options: dict[str, dict] | None = None, limits: dict | None = None) -> serve.Application:
    """The bound application. `replica_cpus` is what each replica reserves (small on a laptop or in tests).

    `limits` sets the request limits of `serve.middleware.Limits` (body deadlines, JSON size and depth,
    failed-authentication rate); unset ones come from `KLEIN_SERVE_*` environment variables, then defaults.

    `deployment_options` overrides Serve options per deployment name, as a config file's `deployments`
    list does, e.g. {"Ingress": {"num_replicas": 2}, "Generator": {"max_queued_requests": 16}}.
    """
    cfg = ServeConfig.from_any(config)
    cfg_dict = cfg.to_dict()
    request_limits = asdict(Limits.from_env(limits))  # checked here: a bad limit fails the build, not a replica
    extra = dict(deployment_options or {})
    unknown = sorted(set(extra) - {"Ingress", "StyleStage", "Fusion", "Generator", "RateLimiter"})
    if unknown:
        raise ValueError(f"deployment_options names unknown deployments {unknown}")

    def opts(name: str, **defaults) -> dict:
        return {**defaults, **extra.get(name, {})}

    style = StyleStage.options(**opts("StyleStage", ray_actor_options=_cpu_replica(replica_cpus),
                                      max_ongoing_requests=32)).bind(cfg_dict)
    fusion = Fusion.options(**opts("Fusion", ray_actor_options=_cpu_replica(replica_cpus),
                                   max_ongoing_requests=8)).bind(cfg_dict)
    generator = Generator.options(**opts(
        "Generator",
        ray_actor_options=_generator_options(cfg, replica_cpus),
        # enough ongoing requests to fill a batch; more wait in the queue, and past that, callers get 503s
        max_ongoing_requests=max(2 * cfg.max_batch_size, 4),
        max_queued_requests=64,
        health_check_period_s=30,
        health_check_timeout_s=60,
    )).bind(cfg_dict)
    limiter = None
    if cfg.shared_rate_limit:
        # exactly one replica: it is the single holder of every tenant's token bucket
        limiter = RateLimiter.options(**{**opts("RateLimiter", ray_actor_options=_cpu_replica(replica_cpus),
                                                max_ongoing_requests=1000), "num_replicas": 1}).bind(cfg_dict)
    # The ingress refuses work past `max_inflight_requests` with its own JSON 503; its Serve slots are a little
    # larger so that those refusals (and /healthz) always get a slot, and its proxy queue is unbounded so
    # that the proxy never answers a plain-text 503 itself (queued requests drain at refusal speed).
    return Ingress.options(**opts(
        "Ingress", ray_actor_options=_cpu_replica(replica_cpus), max_ongoing_requests=cfg.max_inflight_requests + 16,
        max_queued_requests=-1,
    )).bind(style, generator, fusion, cfg_dict, rate_limiter=limiter, limits=request_limits)


def app_builder(args: dict) -> serve.Application:
    """Entry point for `serve run serve.app:app_builder key=value ...` and the `import_path` of a config file.

    `args` are ServeConfig fields, or request limits (`serve.middleware.Limits`: body_timeout_s, ...);
    `replica_cpus` sets the CPUs each replica reserves.
    """
    args = dict(args or {})
    replica_cpus = float(args.pop("replica_cpus", 0.1))
    limit_names = {f.name: f.type for f in dataclasses.fields(Limits)}
    limits = {name: (int if limit_names[name] in (int, "int") else float)(args.pop(name))
              for name in list(args) if name in limit_names}
    return build_app(_coerce(args), replica_cpus=replica_cpus, limits=limits)


def _coerce(args: dict) -> dict:
    """`serve run` passes every CLI arg as a string: convert to the field's type."""
    types = {f.name: f.type for f in dataclasses.fields(ServeConfig)}
    out = {}
    for key, value in args.items():
        kind = str(types.get(key, "str"))
        if isinstance(value, str) and key in types:
            if kind.startswith("int"):
                value = int(value)
            elif kind.startswith("float"):
                value = float(value)
            elif kind.startswith("bool"):
                value = value.lower() in ("1", "true", "yes", "on")
            elif kind.startswith(("dict", "list")):
                value = json.loads(value)
        out[key] = value
    return out

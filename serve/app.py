"""The Serve application: Ingress → StyleStage → Generator, with Fusion beside them (and the RateLimiter).

Ray's own CLIs work on it, as Serve's builder pattern has them:

    serve run serve/serve_config.yaml                             # the config file (serveConfigV2): args + options
    serve deploy serve/serve_config.yaml                          # the same file, to a running cluster
    serve run serve.app:app_builder storage=/data model=tiny      # the typed builder, args on the command line
    serve build serve.app:app -o my_config.yaml                   # a config file listing every deployment

`app_builder(args: ServeArgs)` is a typed application builder: Serve validates the file's `args` (or the
`key=value` arguments) into `ServeArgs` before calling it, so a wrong option fails the deploy with a message that
names it. `app` is the application at its defaults (storage: KLEIN_STORAGE), for `serve build`, which needs an
Application rather than a builder.

`build_app(config)` binds the graph; each deployment gets the same `ServeConfig` as a dict. Replica counts,
autoscaling, queue limits and resources come from each deployment's defaults here, and a Serve config file
overrides them per deployment (serve/serve_config.yaml).
"""

# No `from __future__ import annotations` here: Serve reads the builder's annotation (ServeArgs) at run time.

import dataclasses
import json
import typing
from dataclasses import asdict

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ray import serve

from cluster.pools import serve_actor_options
from serve.config import ServeConfig, ServeConfigError
from serve.fusion import Fusion
from serve.generator import Generator
from serve.ingress import Ingress
from serve.middleware import Limits
from serve.style import StyleStage
from serve.tenants import RateLimiter
from train.recipe import unknown_keys_message

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


class _ServeArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_names_and_cli_text(cls, data):
        """An unknown option is named with the closest known one; `serve run ... key=value` passes every value
        as text, so dict and list options are read as JSON text (numbers and booleans pydantic reads itself)."""
        if not isinstance(data, dict):
            return data
        known = cls.model_fields
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(unknown_keys_message(unknown, known, {}, "serve app args").replace(
                "unknown keys", "unknown serve option(s)"))
        out = dict(data)
        for name, value in data.items():
            annotation = known[name].annotation
            if isinstance(value, str) and (typing.get_origin(annotation) or annotation) in (dict, list):
                try:
                    out[name] = json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(f"{name} must be JSON text (a mapping or a list), got {value!r}") from None
        return out


def _serve_args_fields() -> dict:
    """ServeConfig's fields as they are, the request limits (unset: KLEIN_SERVE_* or their defaults) and
    `replica_cpus`."""
    hints = typing.get_type_hints(ServeConfig)
    out = {}
    for f in dataclasses.fields(ServeConfig):
        default = Field(default_factory=f.default_factory) if f.default is dataclasses.MISSING else f.default
        out[f.name] = (hints[f.name], default)
    for f in dataclasses.fields(Limits):
        kind = int if f.type in (int, "int") else float
        out[f.name] = (typing.Optional[kind], Field(None, gt=0, description=f"request limit (default {f.default})"))
    out["replica_cpus"] = (float, Field(0.1, gt=0, description="CPUs each CPU-only replica reserves"))
    return out


ServeArgs = create_model(
    "ServeArgs", __base__=_ServeArgsBase, __module__=__name__,
    __doc__="The app's `args` (a Serve config file's `args:` or `serve run ... key=value`): ServeConfig's fields, "
            "the request limits of `serve.middleware.Limits`, and `replica_cpus`.",
    **_serve_args_fields())
_LIMIT_NAMES = frozenset(f.name for f in dataclasses.fields(Limits))


def app_builder(args: ServeArgs) -> serve.Application:
    """The typed application builder: `import_path: serve.app:app_builder` in a config file, or `serve run
    serve.app:app_builder key=value ...`. Serve validates the args into `ServeArgs` before the call."""
    return application(args)


def application(args: "ServeArgs | dict | None" = None, *,
                deployment_options: dict[str, dict] | None = None) -> serve.Application:
    """The application for `args` (ServeArgs or its dict); `deployment_options` as in `build_app` (a config file's
    `deployments` list, by name). Only the options set explicitly count as the user's (`ServeConfig.sources`)."""
    if not isinstance(args, ServeArgs):
        try:
            args = ServeArgs.model_validate(dict(args or {}))
        except ValueError as e:  # pydantic's ValidationError: keep its message, name our error
            raise ServeConfigError(str(e)) from None
    limits = args.model_dump(include=set(_LIMIT_NAMES), exclude_unset=True, exclude_none=True)
    return build_app(serve_config_of(args), replica_cpus=args.replica_cpus, limits=limits,
                     deployment_options=deployment_options)


def serve_config_of(args: "ServeArgs") -> ServeConfig:
    """The ServeConfig of these args; the options set explicitly are the user's (`ServeConfig.sources`)."""
    return ServeConfig.from_any(args.model_dump(exclude_unset=True, exclude={"replica_cpus", *_LIMIT_NAMES}))


# The application at its defaults, for `serve build serve.app:app` (Serve's `build` takes an Application, not a
# builder) and `serve run serve.app:app`. Binding is cheap: nothing starts until Serve deploys it.
app = application()

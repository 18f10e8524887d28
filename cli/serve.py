"""`klein-style serve`: the Serve config file (serveConfigV2) applied on a local Ray with the pool resources,
then a first API key.

A thin wrapper over Serve's public API: the file is read as Serve reads it (`ray.serve.schema.ServeDeploySchema`),
its `http_options`, `proxy_location`, `grpc_options` and `logging_config` go to `serve.start`, its app's `args` to
the typed builder (`serve.app.ServeArgs`) and its `deployments` to `build_app` as per-deployment options (what
`serve deploy` does with them), and `serve.run` deploys the result. `--host`, `--port`, `--storage` and `--model`
override the file. On a cluster, use Ray's own CLI with the same file: `serve deploy serve/serve_config.yaml`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.pools import init_local_ray
from cluster.storage import Storage
from serve.app import APP_NAME, ROUTE_PREFIX, ServeArgs, application, serve_config_of
from serve.config import ServeConfigError
from serve.tenants import create_api_key, tenant_has_key

BUILDER = "serve.app:app_builder"
DEFAULT_HTTP = {"host": "127.0.0.1", "port": 8000}  # without a file: this machine only


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP API on Ray Serve (local Ray), from a Serve config file")
    p.add_argument("--config", help="a Serve config YAML (serve/serve_config.yaml): its http_options, app args and "
                                    "deployment options apply, as `serve run FILE` would apply them")
    p.add_argument("--host", help="address to listen on (default: the file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the file's http_options.port, else 8000)")
    p.add_argument("--storage", help="storage URI (default: the config's, or KLEIN_STORAGE)")
    p.add_argument("--model", help="`tiny` or a local FLUX.2 Klein folder (default: the config's, or tiny)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    p.set_defaults(func=cmd_serve)


@dataclass
class ServePlan:
    """What `klein-style serve` hands to Serve: `serve.start(**start_options)`, then `serve.run` of the app."""

    start_options: dict
    app_name: str = APP_NAME
    route_prefix: str = ROUTE_PREFIX
    args: dict = field(default_factory=dict)
    deployments: dict[str, dict] = field(default_factory=dict)
    logging_config: dict | None = None

    @property
    def url(self) -> str:
        http = self.start_options["http_options"]
        host = http.get("host", DEFAULT_HTTP["host"])
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"


def read_plan(path: str | None, *, host: str | None = None, port: int | None = None, storage: str | None = None,
              model: str | None = None) -> ServePlan:
    """The plan for a config file (or none: every default), with the command line's overrides."""
    plan = ServePlan(start_options={"http_options": dict(DEFAULT_HTTP)})
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        try:
            config = ServeDeploySchema.model_validate(data)
        except ValueError as e:
            raise ServeConfigError(f"{path} is not a Serve config file: {e}") from None
        if len(config.applications) != 1 or config.applications[0].import_path != BUILDER:
            raise ServeConfigError(f"{path}: klein-style serve runs one application with import_path {BUILDER}; "
                                   "for other files use Ray's own `serve run` / `serve deploy`")
        app = config.applications[0]
        plan.start_options = {
            "proxy_location": config.proxy_location,
            # the file's http_options as written (host, port, request_timeout_s, keep_alive_timeout_s, ...)
            "http_options": {**DEFAULT_HTTP, **config.http_options.model_dump(exclude_unset=True)},
        }
        for name in ("grpc_options", "logging_config"):
            if name in config.model_fields_set:
                plan.start_options[name] = getattr(config, name).model_dump(exclude_unset=True)
        plan.app_name = app.name if "name" in app.model_fields_set else APP_NAME
        plan.route_prefix = app.route_prefix or ROUTE_PREFIX
        plan.args = dict(app.args or {})
        plan.deployments = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
        if app.logging_config is not None:
            plan.logging_config = app.logging_config.model_dump(exclude_unset=True)
        if app.runtime_env:
            print("note: the app's runtime_env applies under `serve deploy`; a local run uses this environment",
                  file=sys.stderr)
    if host is not None:
        plan.start_options["http_options"]["host"] = host
    if port is not None:
        plan.start_options["http_options"]["port"] = port
    if storage:
        plan.args["storage"] = storage
    if model:
        plan.args["model"] = model
    return plan


def start(plan: ServePlan, num_cpus: int = 2) -> ServeArgs:
    """Build the app (a bad option fails here, before Ray starts), start a local Ray with the pool resources,
    then Serve with the file's cluster options, and deploy the app. Returns the validated args."""
    args = ServeArgs.model_validate(plan.args)
    app = application(args, deployment_options=plan.deployments)
    init_local_ray(num_cpus=num_cpus)
    serve.start(**plan.start_options)
    serve.run(app, name=plan.app_name, route_prefix=plan.route_prefix, logging_config=plan.logging_config)
    return args


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        plan = read_plan(args.config, host=args.host, port=args.port, storage=args.storage, model=args.model)
        app_args = start(plan, args.num_cpus)
    except (ServeConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = serve_config_of(app_args)
    storage = Storage.from_uri(config.storage)
    chosen = [f"{k}={getattr(config, k)!r}" for k, source in config.sources().items() if source == "user"]
    print("settings (user): " + (", ".join(chosen) if chosen else "none; every option at its default"))
    print(f"Klein Style is serving at {plan.url}  (API docs: {plan.url}/docs, storage: {storage.uri})")
    if not tenant_has_key(storage, "default"):
        key = create_api_key(storage, "default")
        print(f"API key for tenant 'default' (shown once, store it now): {key}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

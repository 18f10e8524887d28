"""`klein-style serve`: local Ray with the pool resources, the Serve app, and a first API key."""

from __future__ import annotations

import argparse
import sys
import time

import ray
import yaml
from ray import serve

from cluster.pools import init_local_ray
from cluster.storage import Storage
from serve.app import APP_NAME, app_builder
from serve.config import ServeConfig
from serve.tenants import create_api_key, tenant_has_key


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP API on Ray Serve (local Ray)")
    p.add_argument("--config", help="a Serve config YAML (serve/serve_config.yaml); its app args are the defaults")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--storage", help="storage URI (default: the config's, or KLEIN_STORAGE)")
    p.add_argument("--model", help="`tiny` or a local FLUX.2 Klein folder (default: the config's, or tiny)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    p.set_defaults(func=cmd_serve)


def _app_args(path: str | None) -> tuple[dict, dict]:
    """(app args, deployment overrides by name) from a Serve config file."""
    if not path:
        return {}, {}

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    apps = data.get("applications") or [{}]
    app = apps[0]
    return dict(app.get("args") or {}), {d["name"]: d for d in app.get("deployments") or [] if "name" in d}


def cmd_serve(args: argparse.Namespace) -> int:
    app_args, overrides = _app_args(args.config)
    if args.storage:
        app_args["storage"] = args.storage
    if args.model:
        app_args["model"] = args.model
    application = app_builder(app_args)
    for name, options in overrides.items():
        _apply_overrides(application, name, options)
    init_local_ray(num_cpus=args.num_cpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name=APP_NAME, route_prefix="/")

    config = ServeConfig.from_any({k: v for k, v in app_args.items() if k != "replica_cpus"})
    storage = Storage.from_uri(config.storage)
    chosen = [f"{k}={getattr(config, k)!r}" for k, source in config.sources().items() if source == "user"]
    print("settings (user): " + (", ".join(chosen) if chosen else "none; every option at its default"))
    url = f"http://{args.host}:{args.port}"
    print(f"Klein Style is serving at {url}  (API docs: {url}/docs, storage: {storage.uri})")
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


_OVERRIDABLE = ("max_ongoing_requests", "max_queued_requests", "autoscaling_config", "ray_actor_options",
                "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s", "num_replicas")


def _apply_overrides(application, name: str, options: dict) -> None:
    """Apply a config file's per-deployment options to the bound graph (what `serve deploy` does)."""
    node = _find(application, name)
    if node is None:
        return
    chosen = {k: v for k, v in options.items() if k in _OVERRIDABLE}
    if chosen:
        node._bound_deployment = node._bound_deployment.options(**chosen)


def _find(application, name: str):
    seen, stack = set(), [application]
    while stack:
        app = stack.pop()
        if id(app) in seen:
            continue
        seen.add(id(app))
        deployment = getattr(app, "_bound_deployment", None)
        if deployment is None:
            continue
        if deployment.name == name:
            return app
        stack.extend(a for a in list(deployment.init_args) + list(deployment.init_kwargs.values())
                     if hasattr(a, "_bound_deployment"))
    return None

"""The Serve config file and the app builder, without starting Ray."""

import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema
from ray.serve.scripts import cli as ray_serve_cli

from cli.serve import read_plan
from serve.app import ServeArgs, app_builder, application, build_app
from serve.config import ServeConfig, ServeConfigError

CONFIG = Path(__file__).resolve().parents[1] / "serve" / "serve_config.yaml"


def test_serve_config_yaml_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(data)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    names = {d.name for d in app.deployments}
    assert names == {"Ingress", "StyleStage", "Fusion", "Generator"}
    generator = next(d for d in app.deployments if d.name == "Generator")
    assert generator.ray_actor_options.resources["infer_gpu"] > 0
    assert generator.autoscaling_config and generator.max_queued_requests


def test_app_builder_accepts_the_config_args(tmp_path):
    args = dict(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"], storage=str(tmp_path))
    assert app_builder(args) is not None
    assert app_builder({"storage": str(tmp_path), "max_loras_per_replica": "3", "batch_forward": "false"}) is not None


def test_the_typed_builder_gets_its_args_as_serve_passes_them(tmp_path):
    # what `serve run serve.app:app_builder k=v` and `serve deploy FILE` do with the args: Serve's own call, which
    # validates them into the builder's annotated model (text from the command line included) before calling it
    built = call_user_app_builder_with_args_if_necessary(app_builder, {
        "storage": str(tmp_path), "max_side": "1024", "rate_limit_per_s": "2.5", "batch_forward": "true",
        "cors_origins": '["http://a"]', "body_timeout_s": "3", "replica_cpus": "0.2"})
    ingress = built._bound_deployment
    config = ingress.init_args[3]
    assert (config["max_side"], config["rate_limit_per_s"], config["batch_forward"], config["cors_origins"]) == \
        (1024, 2.5, True, ["http://a"])
    assert ingress.init_kwargs["limits"]["body_timeout_s"] == 3.0
    assert ingress.ray_actor_options["num_cpus"] == 0.2
    with pytest.raises(ValidationError, match=r"unknown serve option\(s\) \['max_sid'\] \(did you mean 'max_sid' → 'max_side'\?\)"):
        call_user_app_builder_with_args_if_necessary(app_builder, {"max_sid": 1024})
    with pytest.raises(ValidationError, match=r"max_side\n  Input should be a valid integer"):
        call_user_app_builder_with_args_if_necessary(app_builder, {"max_side": "big"})
    with pytest.raises(ServeConfigError):
        build_app({"storage": str(tmp_path), "no_such_option": 1})
    with pytest.raises(ServeConfigError, match="max_side must be a multiple of 16"):
        application({"storage": str(tmp_path), "max_side": 100})
    assert ServeConfig(model="tiny").side_default == 64 and ServeConfig(model="/models/klein").side_default == 2048
    assert set(ServeArgs.model_fields) >= {"storage", "accel", "body_timeout_s", "replica_cpus"}


def test_serve_build_writes_a_deployable_config_of_every_deployment(tmp_path, monkeypatch):
    """Ray's own `serve build` (offline: it imports the app and writes its config) on our import path."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # `serve build` puts its --app-dir first on sys.path
    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(ray_serve_cli, ["build", "serve.app:app", "-o", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    built = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    app = built.applications[0]
    assert app.import_path == "serve.app:app"
    options = {d.name: d.model_dump(exclude_unset=True) for d in app.deployments}
    assert set(options) == {"Ingress", "StyleStage", "Fusion", "Generator", "RateLimiter"}
    assert options["RateLimiter"]["num_replicas"] == 1  # the one holder of every tenant's token bucket
    assert options["Ingress"]["max_queued_requests"] == -1  # the ingress refuses overload itself, never the proxy
    assert options["Generator"]["health_check_period_s"] == 30
    assert all(o["ray_actor_options"]["resources"]["infer_gpu"] > 0 for o in options.values())
    # our config file tunes deployments that the app really has
    ours = yaml.safe_load(CONFIG.read_text())["applications"][0]
    assert {d["name"] for d in ours["deployments"]} <= set(options)
    # a builder is not an Application: `serve build` refuses it, which is why `serve.app:app` exists
    refused = CliRunner().invoke(ray_serve_cli, ["build", "serve.app:app_builder"])
    assert refused.exit_code != 0 and "to be an Application" in str(refused.exception)


def test_klein_style_serve_applies_the_config_files_http_options_and_deployments(tmp_path):
    plan = read_plan(str(CONFIG))
    http = plan.start_options["http_options"]
    assert http == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 300}  # the file's, as written
    assert plan.start_options["proxy_location"] == "EveryNode"
    assert plan.app_name == "klein-style" and plan.route_prefix == "/"
    assert plan.deployments["Generator"]["graceful_shutdown_timeout_s"] == 60
    # the command line wins over the file, for these four only
    plan = read_plan(str(CONFIG), host="127.0.0.1", port=8123, storage=str(tmp_path), model="tiny")
    assert plan.start_options["http_options"] == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 300}
    assert plan.args["storage"] == str(tmp_path) and plan.args["max_loras_per_replica"] == 10
    # the file's deployment options reach the bound deployments, over build_app's defaults
    app = application(plan.args, deployment_options=plan.deployments)
    assert _bound(app, "StyleStage").max_queued_requests == 128  # build_app leaves it unbounded
    generator = _bound(app, "Generator")
    assert generator._deployment_config.graceful_shutdown_timeout_s == 60  # (no public getter for these two)
    assert generator._deployment_config.autoscaling_config.max_replicas == 8
    # without a file: this machine only, Serve's port
    assert read_plan(None).start_options == {"http_options": {"host": "127.0.0.1", "port": 8000}}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"applications": [{"import_path": "somewhere:app"}]}))
    with pytest.raises(ServeConfigError, match=r"import_path serve.app:app_builder; for other files use Ray's own"):
        read_plan(str(other))


def _bound(app, name: str):
    """The bound deployment called `name` in a built app (the ingress and what it was bound with)."""
    ingress = app._bound_deployment
    if ingress.name == name:
        return ingress
    return next(a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")
                and a._bound_deployment.name == name)


def test_accel_is_validated_and_reaches_the_generator(tmp_path):
    with pytest.raises(ServeConfigError, match=r"accel must be one of auto, off, exact, fast, got 'turbo'"):
        build_app({"storage": str(tmp_path), "accel": "turbo"})
    assert ServeConfig().accel == "auto"
    generator = _bound(build_app({"storage": str(tmp_path), "accel": "exact"}), "Generator")
    assert generator.init_args[0]["accel"] == "exact"

    # and the deployment hands it to its KleinGenerator: the real one, on the tiny model (it loads in seconds)
    deployment = generator.func_or_class(generator.init_args[0])
    assert deployment.core.accel is not None and deployment.core.accel.mode == "exact"


def test_accel_modes_match_the_generator():
    from klein.accel import INFERENCE_MODES
    from serve.config import ACCEL_MODES

    assert set(ACCEL_MODES) == {"auto", "off", *INFERENCE_MODES}


def test_serve_options_are_typed_named_and_sourced():
    with pytest.raises(ServeConfigError, match=r"unknown serve option\(s\) \['max_sid'\] \(did you mean 'max_sid' → 'max_side'\?\)"):
        ServeConfig.from_any({"max_sid": 1024})
    with pytest.raises(ServeConfigError, match=r"max_side: expected an integer \(got 'big', of type str\)"):
        ServeConfig.from_any({"max_side": "big"})
    cfg = ServeConfig.from_any({"max_side": 1024, "model": "tiny"})
    sources = cfg.sources()
    assert sources["max_side"] == "user" and sources["model"] == "user" and sources["accel"] == "default"

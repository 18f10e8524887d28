"""The Serve config file and the app builder, without starting Ray."""

from pathlib import Path

import pytest
import yaml

from serve.app import _coerce, app_builder, build_app
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


def test_cli_strings_are_coerced_and_unknown_options_refused(tmp_path):
    coerced = _coerce({"max_side": "1024", "rate_limit_per_s": "2.5", "batch_forward": "true", "cors_origins": '["http://a"]'})
    assert coerced == {"max_side": 1024, "rate_limit_per_s": 2.5, "batch_forward": True, "cors_origins": ["http://a"]}
    with pytest.raises(ServeConfigError):
        build_app({"storage": str(tmp_path), "no_such_option": 1})
    with pytest.raises(ServeConfigError):
        ServeConfig.from_any({"max_side": 100})
    assert ServeConfig(model="tiny").side_default == 64 and ServeConfig(model="/models/klein").side_default == 2048


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

"""ray_config.yaml and k8s/: valid for Ray's and KubeRay's own checks, and consistent with cluster/pools.

- ray_config.yaml goes through Ray's cluster-launcher path: `prepare_config` + `validate_config`
  (ray/autoscaler/_private/util.py, the schema ray-schema.json), then autoscaler v2's config reader.
  The GCP variant documented in its comments is validated the same way.
- k8s/ manifests are checked against KubeRay's own CRDs (tests/data/kuberay/<release>, vendored from the
  release tags, strict about unknown fields as `kubectl apply` is), the stated KubeRay floor against the release
  before it, every Pod template and plain resource against Kubernetes' own schemas (kubernetes-validate, strict), each Ray cluster spec through Ray 2.60's own KubeRay autoscaling-config
  derivation, the serveConfigV2 through Serve's ServeDeploySchema, and KubeRay's v2 autoscaler rules.
"""

from __future__ import annotations

import copy
import gzip
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import pools

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_CONFIG = REPO_ROOT / "ray_config.yaml"
K8S = REPO_ROOT / "k8s"
KUBERAY_CRDS = Path(__file__).resolve().parent / "data" / "kuberay"  # <release>/ray.io_<plural>.yaml.gz (SOURCE.md)
KUBERAY_PLURAL = {"RayCluster": "rayclusters", "RayService": "rayservices", "RayJob": "rayjobs"}
OPTIONAL = ("optional/raycluster.yaml", "optional/rayjob.yaml")  # opt-in alternatives, not in the kustomization
K8S_VERSION = "1.33"

POOL_OF_NODE_TYPE = {"train_gpu": pools.TRAIN_POOL, "infer_gpu": pools.INFER_POOL}
POOL_OF_GROUP = {"train-gpu": pools.TRAIN_POOL, "infer-gpu": pools.INFER_POOL}
SERVE_DEPLOYMENTS = {"Ingress", "StyleStage", "Generator", "Fusion"}


# --- ray_config.yaml ---------------------------------------------------------------------------------


def load_ray_config() -> dict:
    return yaml.safe_load(RAY_CONFIG.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` does to the file before using it: merge provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    ready = prepare_config(copy.deepcopy(config))
    validate_config(ready)
    return ready


def gcp_variant() -> dict:
    """The GCP block kept in ray_config.yaml's comments, applied over the AWS config."""
    text = RAY_CONFIG.read_text()
    start = text.index("# --- GCP variant begin ---\n") + len("# --- GCP variant begin ---\n")
    end = text.index("# --- GCP variant end ---")
    block = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text[start:end].splitlines())
    overlay = yaml.safe_load(block)
    config = load_ray_config()
    config.update(overlay)
    return config


def test_ray_config_passes_rays_own_validation():
    ready = prepared(load_ray_config())
    assert ready["provider"]["type"] == "aws"
    assert set(ready["available_node_types"]) == {"head", "train_gpu", "infer_gpu"}


def test_the_gcp_variant_in_the_comments_passes_too():
    ready = prepared(gcp_variant())
    assert ready["provider"]["type"] == "gcp"
    assert ready["available_node_types"]["train_gpu"]["resources"] == load_ray_config()["available_node_types"]["train_gpu"]["resources"]


def test_head_runs_no_gpu_work():
    config = load_ray_config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not set(head["resources"]) & {pools.TRAIN_RESOURCE, pools.INFER_RESOURCE}
    assert "labels" not in head
    assert any("--num-gpus=0" in cmd for cmd in config["head_start_ray_commands"])


@pytest.mark.parametrize("node_type", sorted(POOL_OF_NODE_TYPE))
def test_pool_node_types_advertise_their_pool(node_type):
    config = load_ray_config()
    spec = config["available_node_types"][node_type]
    pool = POOL_OF_NODE_TYPE[node_type]
    gpus = spec["resources"]["GPU"]
    assert gpus >= 1
    for name, amount in pools.node_pool_resources(pool, gpus).items():
        assert spec["resources"][name] == amount
    other = pools.INFER_RESOURCE if pool == pools.TRAIN_POOL else pools.TRAIN_RESOURCE
    assert other not in spec["resources"], f"{node_type} must not advertise the other pool's resource"
    assert spec["labels"] == pools.node_pool_labels(pool)
    assert 0 <= spec["min_workers"] <= spec["max_workers"]
    assert spec["idle_timeout_s"] > 0


def test_pool_bounds_fit_the_cluster_max_and_autoscaler_v2_reads_them():
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    config = load_ray_config()
    pool_types = [config["available_node_types"][t] for t in POOL_OF_NODE_TYPE]
    assert sum(t["max_workers"] for t in pool_types) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0

    node_types = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True).get_node_type_configs()
    for name, pool in POOL_OF_NODE_TYPE.items():
        assert node_types[name].labels == pools.node_pool_labels(pool)
        assert node_types[name].resources[pools.POOL_RESOURCES[pool]] >= 1
        assert node_types[name].idle_timeout_s == config["available_node_types"][name]["idle_timeout_s"]


def test_container_image_and_setup_install_this_package():
    config = load_ray_config()
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert "-e KLEIN_POOL_LABELS=1" in config["docker"]["run_options"]
    mount_target = next(target for target, source in config["file_mounts"].items() if source == ".")
    assert any("pip install" in cmd and mount_target in cmd for cmd in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"]


# --- k8s/ --------------------------------------------------------------------------------------------


def _documents(paths) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for resource in paths:
        path = K8S / resource
        assert path.is_file(), f"{resource} does not exist"
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def load_kustomization() -> dict[str, list[dict]]:
    """Every document of every resource the kustomization lists (what `kubectl apply -k k8s/` creates), by kind."""
    return _documents(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])


def load_manifests() -> dict[str, list[dict]]:
    """The kustomization's documents and the opt-in ones in k8s/optional/, by kind."""
    by_kind = load_kustomization()
    for kind, docs in _documents(OPTIONAL).items():
        by_kind.setdefault(kind, []).extend(docs)
    return by_kind


def _strict(schema):
    """KubeRay's CRD schema as the API server applies it under `kubectl apply`'s strict field validation: a field
    the schema does not name is an error (plain JSON Schema would let it through), except where the CRD itself says
    to keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def kuberay_validator(kind: str, release: str = "v1.5.1") -> jsonschema.Draft7Validator:
    """The `ray.io/v1` schema of `kind` from KubeRay `release`'s own CRD."""
    crd = yaml.safe_load(gzip.decompress((KUBERAY_CRDS / release / f"ray.io_{KUBERAY_PLURAL[kind]}.yaml.gz").read_bytes()))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def schema_errors(kind: str, doc: dict, release: str = "v1.5.1") -> list[str]:
    errors = sorted(kuberay_validator(kind, release).iter_errors(doc), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def kuberay_floor() -> str:
    """The KubeRay release kustomization.yaml states it needs (`kuberay-version-floor: X.Y.Z`)."""
    return re.search(r"kuberay-version-floor: (\d+\.\d+\.\d+)", (K8S / "kustomization.yaml").read_text()).group(1)


def cluster_specs(manifests: dict[str, list[dict]]) -> dict[str, dict]:
    """The Ray cluster spec inside each Ray custom resource."""
    return {
        "RayCluster": manifests["RayCluster"][0]["spec"],
        "RayService": manifests["RayService"][0]["spec"]["rayClusterConfig"],
        "RayJob": manifests["RayJob"][0]["spec"]["rayClusterSpec"],
    }


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return groups


@pytest.fixture(scope="module")
def manifests():
    return load_manifests()


def test_the_kustomization_makes_one_ray_cluster_that_serves_and_trains():
    """One topology by default: the RayService's cluster, with both pools; its GCS keeps its state in the Redis the
    kustomization also applies, with the same Secret for both."""
    default = load_kustomization()
    assert set(default) == {"Namespace", "PersistentVolumeClaim", "Service", "Deployment", "RayService", "ConfigMap"}
    (service,) = default["RayService"]
    spec = service["spec"]["rayClusterConfig"]
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} == set(POOL_OF_GROUP)
    ft = spec["gcsFaultToleranceOptions"]
    (redis_service,) = [s for s in default["Service"] if s["metadata"]["name"] == "redis"]
    host, port = ft["redisAddress"].split(":")
    assert host == redis_service["metadata"]["name"] and int(port) in {p["port"] for p in redis_service["spec"]["ports"]}
    (redis,) = default["Deployment"]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = {e["name"]: e for e in redis["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert {len(load_manifests()[k]) for k in ("RayCluster", "RayService", "RayJob")} == {1}  # + the opt-in two


@pytest.mark.parametrize("kind", ["RayCluster", "RayService", "RayJob"])
def test_ray_resources_match_kuberays_own_crd(manifests, kind):
    errors = schema_errors(kind, manifests[kind][0])
    assert not errors, "\n".join(errors)


def test_the_stated_kuberay_floor_is_where_the_manifests_start_to_validate(manifests):
    """kustomization.yaml says 1.5.0: the manifests pass KubeRay 1.5's CRDs (above) and fail 1.4.2's, only on the
    worker groups' `labels` (the field 1.5.0 added)."""
    assert kuberay_floor() == "1.5.0"
    errors = schema_errors("RayService", manifests["RayService"][0], "v1.4.2") + schema_errors(
        "RayCluster", manifests["RayCluster"][0], "v1.4.2")
    assert errors and all(re.search(r"workerGroupSpecs/\d+: Additional properties .*'labels'", e) for e in errors), errors


def test_the_crd_rejects_what_kuberay_rejects():
    """KubeRay's schema, strict, is not a rubber stamp: typos and wrong types fail."""
    good = load_manifests()["RayCluster"][0]
    typo = copy.deepcopy(good)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    bad_version = copy.deepcopy(good)
    bad_version["spec"]["autoscalerOptions"]["version"] = "v3"
    no_template = copy.deepcopy(good)
    del no_template["spec"]["headGroupSpec"]["template"]
    no_redis_address = copy.deepcopy(load_manifests()["RayService"][0])
    no_redis_address["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAdress"] = "redis:6379"
    assert not schema_errors("RayCluster", good)
    for kind, broken in (("RayCluster", typo), ("RayCluster", wrong_type), ("RayCluster", bad_version),
                         ("RayCluster", no_template), ("RayService", no_redis_address)):
        assert schema_errors(kind, broken), broken["spec"]


def test_every_pod_template_passes_kubernetes_own_schema(manifests):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate to check Pod templates against core/v1"
    )
    checked = []  # validate() raises on the first schema error; this says the loops did not run empty
    for owner, spec in cluster_specs(manifests).items():
        for group, template in pod_templates(spec):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{owner.lower()}-{group}"}, "template": template}
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
            checked.append(owner)
    plain = ("ConfigMap", "Namespace", "Deployment", "Service", "PersistentVolumeClaim")
    for kind in plain:
        for doc in manifests[kind]:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked.append(kind)
    assert set(checked) == {*cluster_specs(manifests), *plain}, checked


def _custom_resources(ray_start_params: dict) -> dict:
    # KubeRay's documented form is a JSON object inside a quoted string: '"{\"train_gpu\": 1}"'.
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    return _get_custom_resources({}, ray_start_params, "test")


@pytest.mark.parametrize("owner", ["RayCluster", "RayService", "RayJob"])
def test_worker_groups_are_the_two_pools(manifests, owner):
    spec = cluster_specs(manifests)[owner]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(POOL_OF_GROUP)
    for name, group in groups.items():
        pool = POOL_OF_GROUP[name]
        container = group["template"]["spec"]["containers"][0]
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert gpus >= 1
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus, f"{name}: GPU limit != num-gpus"
        assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        assert _custom_resources(group["rayStartParams"]) == pools.node_pool_resources(pool, gpus)
        assert group["labels"] == pools.node_pool_labels(pool)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["idleTimeoutSeconds"] > 0
        assert {"name": pools.POOL_LABELS_ENV, "value": "1"} in container["env"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayService", "RayJob"])
def test_head_is_cpu_only(manifests, owner):
    head = cluster_specs(manifests)[owner]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "resources" not in head["rayStartParams"]
    assert "labels" not in head
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


@pytest.mark.parametrize("owner", ["RayCluster", "RayService", "RayJob"])
def test_autoscaler_v2_as_kuberay_wants_it(manifests, owner):
    spec = cluster_specs(manifests)[owner]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    # KubeRay rejects the env var next to autoscalerOptions.version, and v2 Pods must not restart.
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env
    for group, template in pod_templates(spec):
        assert template["spec"].get("restartPolicy", "Never") == "Never", f"{group}: restartPolicy must be Never for v2"


@pytest.mark.parametrize("owner", ["RayCluster", "RayService", "RayJob"])
def test_rays_own_kuberay_autoscaling_config_sees_the_pools(manifests, owner):
    """Ray 2.60 turns the CR into its autoscaling config exactly like this inside the cluster (and validates it)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "klein-style", "namespace": "klein-style"}, "spec": cluster_specs(manifests)[owner]}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    node_types = config["available_node_types"]
    head = node_types["headgroup"]
    assert head["resources"].get("GPU", 0) == 0 and not set(head["resources"]) & set(pools.POOL_RESOURCES.values())
    for group, pool in POOL_OF_GROUP.items():
        node_type = node_types[group]
        assert node_type["labels"] == pools.node_pool_labels(pool)
        assert node_type["resources"]["GPU"] == 1
        for name, amount in pools.node_pool_resources(pool, 1).items():
            assert node_type["resources"][name] == amount


def test_the_three_cluster_specs_agree(manifests):
    def shape(spec):
        return {
            g["groupName"]: (g["rayStartParams"], g["labels"], g["maxReplicas"], g["template"]["spec"]["containers"][0]["resources"])
            for g in spec["workerGroupSpecs"]
        } | {"head": spec["headGroupSpec"]["rayStartParams"], "rayVersion": spec["rayVersion"]}

    specs = cluster_specs(manifests)
    assert shape(specs["RayService"]) == shape(specs["RayCluster"])
    assert shape(specs["RayJob"]) == shape(specs["RayCluster"])
    images = {c["image"] for spec in specs.values() for _, t in pod_templates(spec) for c in t["spec"]["containers"]}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {image.split(":")[0] for image in images} == {i["name"] for i in kustomization["images"]}
    rayVersion = specs["RayCluster"]["rayVersion"]
    dockerfile_base = next(line.split()[1] for line in (K8S / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    assert dockerfile_base.startswith(f"rayproject/ray:{rayVersion}-")


def test_serve_config_is_a_valid_serve_app_on_the_inference_pool(manifests):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(manifests["RayService"][0]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.app:app_builder"
    assert isinstance(app["args"], dict) and app["args"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == SERVE_DEPLOYMENTS
    from serve.app import ServeArgs, serve_config_of

    # what Serve does with them: validated into the typed builder's ServeArgs, then the app's own config checks
    args = serve_config_of(ServeArgs.model_validate(app["args"]))
    generator_gpus = deployments["Generator"]["ray_actor_options"]["num_gpus"]
    assert args.device.startswith("cuda") == (generator_gpus > 0), "a Generator that reserves a GPU must be told device: cuda"
    # Fusion holds no GPU: its K-LoRA scores go to the generator's GPU, never onto a CPU at 9B
    from serve.fusion import scores_place

    fusion_gpus = deployments["Fusion"]["ray_actor_options"]["num_gpus"]
    assert scores_place(args.klora_scores_on, fusion_gpus > 0, args.device) == "generator"
    for name, deployment in deployments.items():
        options = deployment["ray_actor_options"]
        expected = pools.serve_actor_options(options["num_gpus"], options["num_cpus"], use_labels=True)
        assert options == expected, f"{name}: ray_actor_options differ from cluster.pools.serve_actor_options"


def test_sweep_job_runs_train_sweep_with_its_file(manifests):
    job = manifests["RayJob"][0]["spec"]
    assert "python -m evaluation.sweep sweep.yaml" in job["entrypoint"]
    yaml.safe_load(job["runtimeEnvYAML"])
    workdir = job["entrypoint"].split("cd ", 1)[1].split(" ", 1)[0]
    head_pod = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head_pod["containers"][0]["volumeMounts"] if m["mountPath"] == workdir)
    volume = next(v for v in head_pod["volumes"] if v["name"] == mount["name"])
    config_map = next(c for c in manifests["ConfigMap"] if c["metadata"]["name"] == volume["configMap"]["name"])
    sweep = yaml.safe_load(config_map["data"]["sweep.yaml"])
    assert sweep["variants"], "the sweep has no variants"
    assert job["shutdownAfterJobFinishes"] is True

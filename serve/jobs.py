"""Training jobs started over HTTP: ownership records, the background Ray task, status for clients.

Layout in storage:
- `tenants/<t>/submissions/<id>.json`: who asked for job <id> and when (written before the job starts,
  so ownership is known even before the LoRA exists);
- `uploads/<t>/<id>/refs.zip`: the uploaded references;
- `jobs/<id>/status.json` and `tenants/<t>/loras/<id>/...`: written by `train.job.run_training_job`.

The job runs as a Ray task (`num_cpus` 0 by default: it only drives Ray Train, whose workers hold the CPUs
or GPUs of the training pool), so the ingress never blocks on training.
"""

from __future__ import annotations

import logging
import time

import ray

import contracts
from cluster.storage import Storage, StorageError, tenant_prefix
from train.errors import check_job_id
from train.recipe import TrainConfig
from train.status import STOPPED

log = logging.getLogger("klein.serve.jobs")

TERMINAL_STATES = ("done", "failed", "cancelled", STOPPED)  # STOPPED: its driver got a stop signal (train/status.py)
# what clients may download from any LoRA folder, by the short name used in URLs (see public_files)
PUBLIC_FILES = {
    "contact_sheet.png": "samples/contact_sheet.png",
    "loss.png": "samples/loss.png",
    "lora.safetensors": "lora.safetensors",
    "health.png": contracts.HEALTH_IMAGE,
    "health.md": contracts.HEALTH_MARKDOWN,
}


def public_files(manifest: dict) -> dict[str, str]:
    """Short URL name -> path in the LoRA's folder, for the public files this manifest holds: the fixed ones, the LoRA
    under the job's name (`manifest["lora_file"]`, `<name>.safetensors`; absent in older LoRAs and imports) and the
    ComfyUI export, which is named after the job (`manifest["comfyui_file"]`) or, in LoRAs trained before,
    `lora_comfyui.safetensors`. The download keeps the URL's name (Content-Disposition)."""
    comfy = manifest.get("comfyui_file") or contracts.LEGACY_COMFYUI_FILE
    named = manifest.get("lora_file")
    candidates = {**PUBLIC_FILES, comfy: comfy, **({named: named} if named else {})}
    return {name: path for name, path in candidates.items() if path in manifest.get("files", {})}


# the keys are contracts' (contracts.py); here each part is checked first
def submission_key(tenant: str, job_id: str) -> str:
    tenant_prefix(tenant, "submissions")  # checks the tenant name
    return contracts.submission_key(tenant, check_job_id(job_id))


def upload_key(tenant: str, job_id: str) -> str:
    tenant_prefix(tenant, "uploads")
    return contracts.upload_key(tenant, check_job_id(job_id))


def status_key(job_id: str) -> str:
    return contracts.status_key(check_job_id(job_id))


def owns(storage: Storage, tenant: str, job_id: str) -> bool:
    """True when `job_id` belongs to `tenant` (submitted by it, or a LoRA stored under it)."""
    return storage.exists(submission_key(tenant, job_id)) or storage.exists(contracts.manifest_key(tenant, job_id))


def list_jobs(storage: Storage, tenant: str) -> list[str]:
    submitted = [k.rsplit("/", 1)[-1][: -len(".json")] for k in _list_quiet(storage, tenant_prefix(tenant, "submissions"))
                 if k.endswith(".json")]
    finished = storage.list_tenant(tenant, "loras")
    return sorted(set(submitted) | set(finished))


def _list_quiet(storage: Storage, prefix: str) -> list[str]:
    try:
        return storage.list(prefix) if storage.exists(prefix) else []
    except StorageError:
        return []


def read_status(storage: Storage, job_id: str) -> dict | None:
    key = status_key(job_id)
    return storage.read_json(key) if storage.exists(key) else None


def read_manifest(storage: Storage, tenant: str, job_id: str) -> dict | None:
    key = contracts.manifest_key(tenant, job_id)
    return storage.read_json(key) if storage.exists(key) else None


# the TrainConfig keys a tenant may set over HTTP (everything else is the operator's)
HTTP_TRAIN_KEYS = ("variant", "rank", "linear_alpha", "optimizer", "lr", "steps", "resolution", "targets", "seed")


def train_config(config_overrides: dict, tenant: str, job_id: str, trigger: str, storage_uri: str, model: str,
                 request_options: dict) -> TrainConfig:
    """The TrainConfig of a job: server overrides win over the request's options (the operator decides steps).
    Raises ConfigError (naming the key) for a bad option."""
    options = {k: v for k, v in request_options.items() if k in HTTP_TRAIN_KEYS and v is not None}
    options.update(config_overrides)
    return TrainConfig.from_dict({"trigger": trigger, "tenant": tenant, "job_id": job_id, "storage": storage_uri,
                                  "model": model, **options}, source="request")


def submission_answer(cfg: TrainConfig, operator_overrides: dict | None = None) -> dict:
    """What `POST /v1/loras` answers: the keys this job set, with their sources (`user`: the request;
    `operator`: the service's `train_overrides`, which win; `service`: tenant, id, storage and model). The rest
    (variant defaults, the step formula) depends on the dataset size; the job's status carries the resolved config
    and every value's source (`config`, `config_sources`) as soon as the references are read."""
    explicit = cfg.explicit()
    overrides = operator_overrides or {}

    def source(key: str) -> str:
        if key in overrides:
            return "operator"
        return "user" if key in HTTP_TRAIN_KEYS or key == "trigger" else "service"

    return {"id": cfg.job_id, "status": "queued", "variant": cfg.variant,
            "config": explicit, "config_sources": {k: source(k) for k in explicit}}


def _run_job(source: str, cfg_dict: dict) -> dict:
    """Body of the Ray task: run the whole job; failures are recorded in status.json by run_training_job.
    `cfg_dict` holds only the explicit keys (TrainConfig.explicit), so they still win after the trip."""
    # Imported here, in the task's worker, not at the top: the Ingress replica that starts this task imports this
    # module, and train.job brings torch, diffusers, peft and Ray Train (~6 CPU-s and a few hundred MB per replica)
    # that the HTTP tier never uses (tests/test_reliability_serve.py checks the live Ingress replicas for libtorch).
    from train.job import run_training_job

    manifest = run_training_job(source, TrainConfig.from_dict(cfg_dict))
    return {"id": manifest["id"], "best_step": manifest.get("best_step")}


class JobRunner:
    """Starts jobs as Ray tasks and remembers their refs, to report crashes status.json cannot show."""

    def __init__(self, storage: Storage, task_num_cpus: float = 0.0):
        self.storage = storage
        self.task_num_cpus = task_num_cpus
        self.running: dict[str, ray.ObjectRef] = {}

    def submit(self, tenant: str, source: str, cfg: TrainConfig) -> str:
        job_id = cfg.job_id
        self.storage.write_json(submission_key(tenant, job_id), {"id": job_id, "tenant": tenant, "created": time.time(),
                                                                 "trigger": cfg.trigger, "config": cfg.explicit()})
        self.storage.write_json(status_key(job_id), {"state": "queued", "job_id": job_id, "tenant": tenant, "updated": time.time()})
        task = ray.remote(_run_job).options(num_cpus=self.task_num_cpus, max_retries=0, name=f"train-{job_id}")
        self.running[job_id] = task.remote(source, cfg.explicit())
        return job_id

    def state_of(self, job_id: str) -> dict:
        """status.json, corrected when the task died without writing a final state."""
        status = read_status(self.storage, job_id) or {"state": "unknown", "job_id": job_id}
        ref = self.running.get(job_id)
        if ref is not None and status.get("state") not in TERMINAL_STATES:
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 — the job's error, reported as its state
                    status = {**status, "state": "failed", "error": _short_error(e)}
        return status

    def active_count(self, tenant: str) -> int:
        """Training jobs of `tenant` that are queued or running. Finished LoRAs (trained or imported, with a
        manifest) and jobs whose status is unknown do not count, so they can never block new jobs."""
        finished = set(self.storage.list_tenant(tenant, "loras"))
        count = 0
        for job_id in list_jobs(self.storage, tenant):
            if job_id in finished:
                continue
            if self.state_of(job_id).get("state") not in (*TERMINAL_STATES, "unknown"):
                count += 1
        return count

    def cancel(self, job_id: str) -> None:
        ref = self.running.pop(job_id, None)
        if ref is not None:
            try:
                ray.cancel(ref, force=True, recursive=True)
            except Exception:  # noqa: BLE001 — already finished
                pass

    def delete(self, tenant: str, job_id: str) -> None:
        self.cancel(job_id)
        for key in (contracts.lora_prefix(tenant, job_id), f"jobs/{job_id}", f"uploads/{tenant}/{job_id}", submission_key(tenant, job_id)):
            try:
                self.storage.delete(key)
            except (StorageError, OSError) as e:
                log.warning("could not delete %s: %s", key, e)


def _short_error(e: Exception) -> str:
    # the first line only: a RayTaskError's str() carries the remote traceback, which clients must not see
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def new_id() -> str:
    return contracts.new_job_id()

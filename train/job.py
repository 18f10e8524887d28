"""One style-LoRA job on Ray: refs → captions → cache (Ray task) → TorchTrainer → sheets → stored LoRA.

This is the thin Ray layer; every stage it calls runs without Ray too. Outputs land under
`tenants/<tenant>/loras/<job_id>/` and `manifest.json` is written last, so a LoRA exists for readers only
once every file it names is in place (with its sha256).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import ray
from ray.exceptions import RayTaskError
from ray.train.torch import TorchTrainer
from ray.train import CheckpointConfig, FailureConfig, RunConfig, TrainingFailedError, UserCallback

from cluster.pools import TRAIN_RESOURCE, cluster_has_gpus, queued_train_loop, train_pool_turn, train_scaling_config
from cluster.storage import Storage
from contracts import (
    CONTACT_SHEET,
    HEALTH_IMAGE,
    HEALTH_MARKDOWN,
    LORA_FILE,
    LOSS_PLOT,
    Manifest,
    checkpoint_key,
    comfyui_file_name,
    lora_prefix,
    manifest_key,
    named_lora_file,
    new_job_id,
    without_trigger,
)
from gemini.captions import caption_images
from gemini.client import GeminiClient, GeminiConfig
from gemini.policy import text_stage_policy
from gemini.profile import extract_style_profile
from klein.lora import export_lora, lora_to_bytes, read_lora
from klein.generate import GenerateRequest
from klein.model import model_id
from train.cache import build_cache
from train.captions import check_trigger
from train.dataset import load_refs, near_duplicate_pairs
from train.worker import train_loop_per_worker
from train.recipe import TrainConfig
from train.live import PROBE, SampleColumns, driver_log, mlflow_settings, sample_size
from train.samples import sample_task_options
from train.health import (detail_side, is_out_of_memory, loss_is_finite, out_of_memory_fix, probe_prompts, probe_requests,
                          render_health, summary_line)
from train.errors import JobError, check_job_id
from train.status import CHECKING_HEALTH, RENDERING_SAMPLES, JobStatus
from train.report import loss_plot_png

log = logging.getLogger("klein.train")


@dataclass
class PreparedDataset:
    ref_set: object
    captions: list[str]
    caption_info: dict
    decision: dict
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # config key -> user | variant | formula | policy | default


def prepare_dataset(source, cfg: TrainConfig, on_gpu: bool) -> tuple[PreparedDataset, TrainConfig]:
    """Validate refs and trigger, resolve the variant, and caption (Gemini or its fallback)."""
    cfg.trigger = check_trigger(cfg.trigger)
    ref_set = load_refs(source, max_refs=cfg.max_refs, resolution=cfg.resolution)
    n = len(ref_set.refs)
    resolved, decision = cfg.resolved(n, on_gpu=on_gpu)
    policy = text_stage_policy(n)
    if not resolved.use_gemini:
        policy = policy.model_copy(update={"use_gemini": False, "reason": policy.reason if not policy.use_gemini else f"variant {decision.variant} trains without Gemini"})
    client = GeminiClient(GeminiConfig.from_env()) if policy.use_gemini else None
    result = caption_images([r.image for r in ref_set.refs], [r.name for r in ref_set.refs], resolved.trigger,
                            ref_set.sidecar_captions, client, policy=policy)
    captions = [result.captions[r.name] for r in ref_set.refs]
    # caption_images already lints every caption and carries those warnings in result.warnings
    warnings = list(ref_set.warnings) + list(decision.warnings) + list(result.warnings)
    decision_info = {"variant": decision.variant, "reason": decision.reason, "text_stage": policy.model_dump(mode="json")}
    return PreparedDataset(ref_set, captions, result.to_manifest(), decision_info, warnings, decision.sources), resolved


def _cache_task_options(cfg: TrainConfig) -> dict:
    # the cache runs in the training pool (it feeds that pool's job) and, on GPUs, on one GPU
    return {"num_cpus": 1, "num_gpus": 1 if cfg.use_gpu else 0, "resources": {TRAIN_RESOURCE: 1}}


def ray_run_config(cfg: TrainConfig, storage: Storage, callbacks: Sequence[UserCallback] = ()) -> RunConfig:
    """Ray Train's run (checkpoints, its own state) under `<storage>/ray_train/<job_id>`, written through our
    storage's filesystem object: given only a URI, Ray would build its own filesystem and send an `s3://` run to
    AWS even where KLEIN_S3_ENDPOINT names a MinIO server (or a GCS emulator). With a filesystem, Ray wants the
    path inside it (`bucket/prefix/ray_train`, no scheme). `callbacks` see every `ray.train.report` of the workers
    (every `log_every` steps and each checkpoint) on the Train controller."""
    return RunConfig(
        name=cfg.job_id,
        storage_path=storage.path("ray_train"),
        storage_filesystem=storage.fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=list(callbacks),
    )


def run_training_job(source, cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
                     callbacks: Sequence[UserCallback] = ()) -> dict:
    """Run a whole job and return its manifest. `source` is a folder, a zip or a storage URI of refs.
    `callbacks` (`ray.train.UserCallback`) get every metrics report of the style LoRA's training (ray_run_config).

    Submitting again with the same `job_id` after the driver died resumes from the last checkpoint
    (Ray Train restores a run with the same name and storage path).
    """
    cfg.job_id = check_job_id(cfg.job_id or new_job_id())
    if named_lora_file(lora_name(cfg)) == comfyui_file_name(cfg.job_id, cfg.trigger):
        raise JobError(f"name {lora_name(cfg)!r} would give the LoRA the ComfyUI export's file name "
                       f"({comfyui_file_name(cfg.job_id, cfg.trigger)}): choose another name")
    if cfg.report_to == "mlflow":
        mlflow_settings()  # the package and MLFLOW_TRACKING_URI are there, or the job stops before it starts
    if cfg.consis_lora and cfg.content_lora:
        raise JobError("content_lora is what consis_lora's first stage trains: give consis_lora or content_lora, not both")
    if cfg.use_gpu is None:
        cfg.use_gpu = cluster_has_gpus()
    storage = Storage.from_uri(cfg.storage)
    cfg.storage = storage.uri
    started = time.time()
    status = JobStatus(storage, cfg.job_id, cfg.tenant, progress)
    with status.running():  # a stop signal to this driver marks the job "stopped" (train/status.py)
        try:
            return _run_stages(source, cfg, storage, status, started, callbacks)
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C in this thread: the job says so, not "training"
            status.stopped(f"{type(e).__name__} in the driver")
            raise


def _run_stages(source, cfg: TrainConfig, storage: Storage, status: JobStatus, started: float,
                callbacks: Sequence[UserCallback]) -> dict:
    status("preparing")
    try:
        prepared, cfg = prepare_dataset(source, cfg, on_gpu=bool(cfg.use_gpu))
    except Exception as e:
        status("failed", error=str(e), stage="dataset")
        raise
    for w in prepared.warnings:
        log.warning("%s", w)
    status.stage = "caching"
    try:
        status("caching", decision=prepared.decision, warnings=prepared.warnings, config=public_config(cfg),
               config_sources=public_sources(prepared.sources))
        ref_set = prepared.ref_set
        cache_key = _build_cache(ref_set, prepared.captions, cfg)
        status.stage = "training"
        consis = None
        if cfg.consis_lora:
            # ConsisLoRA: a content LoRA on the trigger-less captions first; the style LoRA then trains on top
            # of it (frozen, active), so content that the content LoRA explains does not leak into the style.
            content_steps = cfg.content_steps or max(1, cfg.steps // 2)
            content_cfg = cfg.model_copy(update=dict(job_id=f"{cfg.job_id}-content", consis_lora=False, early_stopping=False,
                                                     sample_every=None, steps=content_steps, save_every=content_steps))
            content_captions = [without_trigger(c, cfg.trigger) for c in prepared.captions]
            content_cache = _build_cache(ref_set, content_captions, content_cfg)
            status("training content LoRA", step=0, steps=content_cfg.steps, decision=prepared.decision)
            content_state = _fit(content_cfg, content_cache, storage)
            cfg.content_lora = checkpoint_key(content_cfg.job_id, content_state["step"])
            consis = {"content_job": content_cfg.job_id, "content_steps": content_state["step"], "content_val": content_state["val"],
                      "content_lora": cfg.content_lora}
        status("training", step=0, steps=cfg.steps, decision=prepared.decision)
        # the contact sheet's columns render on the inference pool as the checkpoints appear (train/live.py)
        tracker = driver_log(cfg, storage, public_config(cfg))  # TensorBoard's driver file, the MLflow run, or None
        samples = SampleColumns(cfg, storage, probe=health_probe_requests(cfg) if cfg.health else None, log=tracker)
        delivered = False
        try:  # the driver's log is closed whatever happens below (a failed job's too)
            with samples.watching():
                final_state = _fit(cfg, cache_key, storage, [*(tracker.callbacks() if tracker else ()), *callbacks])
            status.stage = "finishing"
            manifest = finish_job(cfg, prepared, final_state, cache_key, storage, started, consis=consis)
            delivered = True
            # the LoRA is delivered (its manifest is written); its contact sheet and health report follow on the
            # inference pool, and neither takes the delivered LoRA back when it fails (the manifest says why)
            status.stage = RENDERING_SAMPLES
            status(RENDERING_SAMPLES, manifest=manifest_key(cfg.tenant, cfg.job_id))
            manifest = add_contact_sheet(cfg, storage, manifest, samples)
            status.stage = CHECKING_HEALTH
            status(CHECKING_HEALTH, manifest=manifest_key(cfg.tenant, cfg.job_id))
            manifest = add_health_report(cfg, prepared, final_state, storage, manifest, samples)
        finally:
            samples.close(delivered)
    except Exception as e:
        # whichever stage failed (a model folder the cache task cannot load, a worker error, a contact sheet),
        # the job's own status says so in one line; checkpoints stay, and resubmitting the job id resumes
        reason = str(e) if isinstance(e, JobError) else f"job {cfg.job_id} failed while {status.stage}: {failure_reason(e)}"
        if is_out_of_memory(reason):  # the seeds' fix for this job, not a generic one
            reason += f" — out of memory: {out_of_memory_fix(public_config(cfg))}"
        status("failed", error=reason, stage=status.stage)
        if isinstance(e, JobError) and reason == str(e):
            raise
        raise JobError(reason) from e
    # what a delivered job could not add (its contact sheet) stays visible in its final status too
    after = {"contact_sheet": manifest["contact_sheet"]} if manifest.get("contact_sheet") else {}
    status("done", manifest=manifest_key(cfg.tenant, cfg.job_id), best_step=manifest["best_step"], **after)
    return manifest


def _build_cache(ref_set, captions: list[str], cfg: TrainConfig) -> str:
    """Latents and embeddings as one Ray task on the training pool (workers never load the VAE or Qwen3)."""
    return ray.get(ray.remote(build_cache).options(**_cache_task_options(cfg)).remote(
        ref_set, captions, cfg.model, cfg.storage, cfg.resolution, "cuda" if cfg.use_gpu else "cpu"))


def _fit(cfg: TrainConfig, cache_key: str, storage: Storage, callbacks: Sequence[UserCallback] = ()) -> dict:
    """One TorchTrainer run (resumed if a run of this job id exists); returns the final state.json."""
    trainer = TorchTrainer(
        queued_train_loop(train_loop_per_worker, cfg.job_id),
        train_loop_config={"train": cfg.to_dict(), "cache_key": cache_key},
        scaling_config=train_scaling_config(cfg.num_workers, use_gpu=bool(cfg.use_gpu)),
        run_config=ray_run_config(cfg, storage, callbacks),
    )
    # jobs enter the training pool in arrival order (Ray alone retries pending placement groups by back-off)
    with train_pool_turn(cfg.job_id, poll_s=1.0):
        try:
            result = trainer.fit()
        except TrainingFailedError as e:  # retries spent: the job fails with the worker's own reason, not Ray's dump
            raise JobError(f"training job {cfg.job_id} failed: {failure_reason(e)}") from e
    if result.error is not None or result.checkpoint is None:
        raise JobError(f"training job {cfg.job_id} failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / "state.json").read_text())


def failure_reason(error: BaseException) -> str:
    """What failed, as `Type: message`, without Ray's wrapping: the first failed worker of a Ray Train run
    (a WorkerGroupError carries one per rank), the original exception of a Ray task."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, failure = sorted(failures.items())[0]
        return f"rank {rank}: {failure_reason(failure)}"

    if isinstance(error, RayTaskError) and error.cause is not None:
        return failure_reason(error.cause)
    return f"{type(error).__name__}: {error}"


def sheet_steps(cfg: TrainConfig, saved_steps: list[int]) -> list[int]:
    """The checkpoints a contact sheet shows: every save, or every `sample_every` steps plus the last."""
    if not cfg.sample_every:
        return list(saved_steps)
    return sorted(set(range(cfg.sample_every, cfg.steps + 1, cfg.sample_every)) | {saved_steps[-1]})


def midpoint_jumps(val: list[dict], steps: int, rel: float = 0.10, probes: list[dict] = ()) -> list[dict]:
    """Validation-loss rises of more than `rel` between measurements near the cosine midpoint (40–65% of steps),
    where the seeds saw the schedule jump; those checkpoints deserve a look. `probes` are the step-log entries
    with a `val_loss` measured between saves (train.worker.midpoint_steps: 50 % and 60 %)."""
    points = sorted([*val, *({"step": p["step"], "val_loss": p["val_loss"]} for p in probes if "val_loss" in p)],
                    key=lambda v: v["step"])
    flags = []
    for prev, cur in zip(points, points[1:]):
        if 0.4 * steps <= cur["step"] <= 0.65 * steps and cur["val_loss"] > prev["val_loss"] * (1 + rel):
            flags.append({"from_step": prev["step"], "to_step": cur["step"], "rise": cur["val_loss"] / prev["val_loss"] - 1})
    return flags


def finish_job(cfg: TrainConfig, prepared: PreparedDataset, state: dict, cache_key: str, storage: Storage, started: float,
               consis: dict | None = None) -> dict:
    """Deliver the LoRA: pick the checkpoint, write it (ours and ComfyUI's) and the loss plot, the manifest last.
    The contact sheet follows (`add_contact_sheet`): a user can take the LoRA while its samples render."""
    val = state["val"]
    best = min(val, key=lambda v: v["val_loss"])
    final_step = state["step"]
    delivered_step = best["step"] if cfg.early_stopping else final_step
    lora = read_lora(storage.read_bytes(checkpoint_key(cfg.job_id, delivered_step)))
    lora.meta.update({"trigger": cfg.trigger, "base_model": model_id(cfg.model), "targets": cfg.targets, "step": delivered_step,
                      "job_id": cfg.job_id, "variant": prepared.decision["variant"]})
    lora_bytes = lora_to_bytes(lora)
    comfy_bytes = export_lora(lora, "comfyui")
    checkpoints = [v["step"] for v in val]
    sampled = sheet_steps(cfg, checkpoints)
    loss_png = loss_plot_png(state["log"], val, best_step=best["step"])
    prefix = lora_prefix(cfg.tenant, cfg.job_id)
    comfy_name = comfyui_file_name(cfg.job_id, cfg.trigger)
    named = named_lora_file(lora_name(cfg))
    files = {
        LORA_FILE: lora_bytes,  # the fixed name stays: serving, imports and older readers load it
        named: lora_bytes,  # the same LoRA under the job's name, to copy out of storage (README, "LoRA names")
        comfy_name: comfy_bytes,
        LOSS_PLOT: loss_png,
    }
    hashes = {name: storage.write_bytes(f"{prefix}/{name}", data) for name, data in files.items()}
    profile = _style_profile(prepared)
    steps_logged = [e["step"] for e in state["log"]]
    manifest = {
        "id": cfg.job_id,
        "tenant": cfg.tenant,
        "trigger": cfg.trigger,
        "base_model": model_id(cfg.model),
        "config": public_config(cfg),
        "config_sources": public_sources(prepared.sources),
        "decision": prepared.decision,
        "warnings": prepared.warnings,
        "captions": prepared.caption_info,
        "dataset": {"hash": prepared.ref_set.dataset_hash, "refs": [{"name": r.name, "sha256": r.sha256, "size": [r.width, r.height]} for r in prepared.ref_set.refs]},
        "cache_key": cache_key,
        "metrics": {
            "final_loss": state["log"][-1]["loss"],
            "steps": final_step,
            "val_curve": val,
            "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in state["log"]],
            "attempts": max(e.get("attempt", 0) for e in state["log"]) + 1,
            "steps_trained_once": steps_logged == list(range(1, final_step + 1)),
            "effective_batch": cfg.batch_size * cfg.gradient_accumulation_steps * cfg.num_workers,
        },
        "best_step": best["step"],
        "delivered_step": delivered_step,
        "midpoint_jumps": midpoint_jumps(val, cfg.steps, probes=state["log"]),
        "checkpoints": checkpoints,
        "sampled_steps": sampled,
        # ConsisLoRA: only the style LoRA is delivered; the content stage is recorded for the record
        "consis_lora": consis,
        "style_profile": profile,
        "files": hashes,
        "comfyui_file": comfy_name,
        "name": lora_name(cfg),
        "lora_file": named,
        "elapsed_s": time.time() - started,
    }
    Manifest.model_validate(manifest)  # the readers' contract (contracts.Manifest) holds before anything reads it
    storage.write_json(manifest_key(cfg.tenant, cfg.job_id), manifest)
    return manifest


def lora_name(cfg: TrainConfig) -> str:
    """The job's name: its `name`, else its id (both are safe file names)."""
    return cfg.name or cfg.job_id


def add_contact_sheet(cfg: TrainConfig, storage: Storage, manifest: dict, samples: SampleColumns) -> dict:
    """The contact sheet of a delivered LoRA (its `sampled_steps`), assembled from the columns rendered on the inference
    pool during training (the missing ones render now), written, then named in the manifest. A sheet that cannot be
    made (a render that fails on the inference pool, a write) never takes the delivered LoRA back: the manifest then
    says why under `contact_sheet.error`, as it does for the health report."""
    try:
        sheet_png = samples.sheet(manifest["sampled_steps"])
        sha = storage.write_bytes(f"{lora_prefix(cfg.tenant, cfg.job_id)}/{CONTACT_SHEET}", sheet_png)
    except Exception as e:
        log.warning("job %s: no contact sheet: %s", cfg.job_id, failure_reason(e))
        manifest = {**manifest, "contact_sheet": {"error": f"no contact sheet: {failure_reason(e)}"}}
        Manifest.model_validate(manifest)
        storage.write_json(manifest_key(cfg.tenant, cfg.job_id), manifest)
        return manifest
    manifest = {**manifest, "files": {**manifest["files"], CONTACT_SHEET: sha}}
    Manifest.model_validate(manifest)
    storage.write_json(manifest_key(cfg.tenant, cfg.job_id), manifest)  # the sheet is in place before the manifest names it
    return manifest


def add_health_report(cfg: TrainConfig, prepared: PreparedDataset, state: dict, storage: Storage, manifest: dict,
                      samples: SampleColumns) -> dict:
    """The health report (train/health.py), made on the inference pool after the LoRA is delivered from the probe
    images `samples` rendered during training (and any missing), added to the
    manifest with `samples/health.png` and `samples/health.md`. A report that cannot be made never takes the
    delivered LoRA back: the manifest then says why under `health.error`."""
    if not cfg.health:
        return manifest
    key = manifest_key(cfg.tenant, cfg.job_id)
    try:
        checkpoints = [(step, storage.read_bytes(checkpoint_key(cfg.job_id, step))) for step in manifest["checkpoints"]]
        args = health_task_args(cfg, prepared, checkpoints, manifest["delivered_step"], loss_is_finite(state["log"]))
        # most of the probe was drawn during training: from the same requests render_health makes of these arguments
        wanted = probe_requests(probe_prompts(args["cfg"]["sample_prompts"], args["trigger"]), args["trigger"],
                                int(args["cfg"]["seed"]), args["size"], args["sample_steps"])
        if samples.requests.get(PROBE) != wanted:
            raise JobError("the probe drawn during training is not the one the health report asks for")
        args["probe_images"] = samples.images(PROBE, manifest["checkpoints"])
        report, png, md = ray.get(render_health_task(bool(cfg.use_gpu)).remote(**args))
    except Exception as e:  # the LoRA stays delivered; the manifest says why it has no report
        log.warning("job %s: no health report: %s", cfg.job_id, failure_reason(e))
        manifest = {**manifest, "health": {"error": f"no health report: {failure_reason(e)}"}}
        storage.write_json(key, manifest)
        return manifest
    prefix = lora_prefix(cfg.tenant, cfg.job_id)
    hashes = {HEALTH_IMAGE: storage.write_bytes(f"{prefix}/{HEALTH_IMAGE}", png),
              HEALTH_MARKDOWN: storage.write_bytes(f"{prefix}/{HEALTH_MARKDOWN}", md.encode())}
    manifest = {**manifest, "health": report, "files": {**manifest["files"], **hashes}}
    Manifest.model_validate(manifest)
    storage.write_json(key, manifest)  # the files it names are in place first, as for the first manifest
    log.info("job %s %s", cfg.job_id, summary_line(report))
    return manifest


HEALTH_MAX_STEPS = 20  # the probe's sampler steps (at most the job's sample_steps): 12+ images per checkpoint
PROBE_REF_SIDE = 256  # refs travel to the health task at this size at most: the measures look at 128 px


def health_task_args(cfg: TrainConfig, prepared: PreparedDataset, checkpoints: list[tuple[int, bytes]],
                     delivered_step: int, loss_finite: bool) -> dict:
    """`render_health`'s arguments for this job (its refs' detail is measured here, on the full pictures, before
    they travel small)."""
    refs = prepared.ref_set.refs
    small = []
    for ref in refs:
        image = ref.image.copy()
        image.thumbnail((PROBE_REF_SIDE, PROBE_REF_SIDE))
        small.append(image)
    return dict(model=cfg.model, checkpoints=checkpoints, delivered_step=delivered_step, refs=small,
                detail_sides=[detail_side(r.image, min(r.width, r.height)) for r in refs], captions=prepared.captions,
                source_captions=[r.sidecar_caption or "" for r in refs], trigger=cfg.trigger, cfg=public_config(cfg),
                near_duplicates=len(near_duplicate_pairs(refs)), size=sample_size(cfg),
                sample_steps=min(cfg.sample_steps, HEALTH_MAX_STEPS), loss_finite=loss_finite,
                use_gpu=bool(cfg.use_gpu), job_id=cfg.job_id)


def health_probe_requests(cfg: TrainConfig) -> list[GenerateRequest]:
    """The health probe's requests at each checkpoint, as render_health makes them from `health_task_args`."""
    return probe_requests(probe_prompts(cfg.sample_prompts, cfg.trigger), cfg.trigger, cfg.seed, sample_size(cfg),
                          min(cfg.sample_steps, HEALTH_MAX_STEPS))


def render_health_task(use_gpu: bool):
    """The health probe runs on the inference pool, like the contact sheet."""
    return ray.remote(render_health).options(**sample_task_options(use_gpu))


def _style_profile(prepared: PreparedDataset) -> dict:
    """L1 STYLE_PROFILE, computed once per LoRA (Gemini when the policy allows it, else offline)."""
    use = prepared.decision["text_stage"]["use_gemini"]
    client = GeminiClient(GeminiConfig.from_env()) if use else None
    images = [r.image for r in prepared.ref_set.refs]
    return extract_style_profile(images, client=client).to_manifest()


PRIVATE_CONFIG_KEYS = ("fail_at_step", "step_delay_s", "oom_at_step", "fail_samples", "content_lora")


def public_config(cfg: TrainConfig) -> dict:
    """The resolved config as the manifest and the job status show it (testing hooks left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in PRIVATE_CONFIG_KEYS}


def public_sources(sources: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sources.items() if k not in PRIVATE_CONFIG_KEYS}

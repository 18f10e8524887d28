"""The contracts between our packages, in one place: ids, every storage key and layout, the typed manifest, the
trigger format, K-LoRA's defaults.

This is the ground floor: it imports nothing of ours, and every package may import it. A value that two
packages must agree on (a key one writes and another reads, a prompt format the trainer teaches and the
server sends) lives here, once.

Storage layout (relative to a `Storage` root):

    cache/<cache_key>/...                                   latents + embeddings of one (refs, captions, model)
    jobs/<job_id>/status.json                               a job's live state (written by the job's driver)
    jobs/<job_id>/checkpoints/step_<NNNNNN>.safetensors     each checkpoint's LoRA
    tenants/<tenant>/loras/<job_id>/manifest.json           written last: the LoRA exists from here on
    tenants/<tenant>/loras/<job_id>/lora.safetensors        ... and the other files the manifest names
    tenants/<tenant>/loras/<job_id>/<name>.safetensors      the same LoRA under the job's name (named_lora_file)
    tenants/<tenant>/submissions/<job_id>.json              who asked for a job over HTTP, and when
    uploads/<tenant>/<job_id>/refs.zip                      references uploaded over HTTP
    sweeps/<name>/...                                       an evaluation sweep (evaluation/sweep.py)
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# -- ids ------------------------------------------------------------------------------------------------------
JOB_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{2,63}$")
JOB_ID_RULE = "3–64 lowercase letters, digits, '-' or '_'"


def new_job_id() -> str:
    return f"lora-{uuid.uuid4().hex[:12]}"


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and bool(JOB_ID_RE.match(value))


# -- storage keys ---------------------------------------------------------------------------------------------
TENANTS_ROOT = "tenants"
MANIFEST = "manifest.json"
LORA_FILE = "lora.safetensors"
LEGACY_COMFYUI_FILE = "lora_comfyui.safetensors"  # the ComfyUI export of LoRAs trained before comfyui_file_name
CONTACT_SHEET = "samples/contact_sheet.png"
LOSS_PLOT = "samples/loss.png"
HEALTH_IMAGE = "samples/health.png"  # the health report (train/health.py): probe images with each symptom's verdict
HEALTH_MARKDOWN = "samples/health.md"


def comfyui_file_name(job_id: str, trigger: str) -> str:
    """`<job_id>_<trigger>.safetensors`: the ComfyUI export's name. ComfyUI keeps every LoRA in one flat
    `models/loras` folder, so a fixed name (every job's `lora.safetensors`) would overwrite the last download;
    the job id is unique and the trigger says which word calls the style up. Anything but ASCII letters, digits,
    '_' and '-' becomes '_' (ids and triggers are checked to that alphabet already; this keeps the name safe on
    every filesystem should one ever not be)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", f"{job_id}_{trigger}").strip("_-")[:120]
    return f"{stem}.safetensors"


LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LORA_NAME_RULE = "1–100 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_lora_name(value: object) -> bool:
    """A LoRA's name (TrainConfig `name`, ai-toolkit's `config.name`): safe as a file name on every filesystem."""
    return isinstance(value, str) and bool(LORA_NAME_RE.match(value)) and not value.lower().endswith(".safetensors")


def named_lora_file(name: str) -> str:
    """`<name>.safetensors`: the delivered LoRA (diffusers format) under the job's name, as ai-toolkit names its
    output, so that it keeps its identity once copied out of storage (every job's `lora.safetensors` collides).
    `name` must pass `is_lora_name` (TrainConfig checks it)."""
    if not is_lora_name(name):
        raise ValueError(f"invalid LoRA name {name!r}: use {LORA_NAME_RULE}, without .safetensors")
    return f"{name}.safetensors"


def lora_prefix(tenant: str, job_id: str) -> str:
    return f"{TENANTS_ROOT}/{tenant}/loras/{job_id}"


def manifest_key(tenant: str, job_id: str) -> str:
    return f"{lora_prefix(tenant, job_id)}/{MANIFEST}"


def status_key(job_id: str) -> str:
    return f"jobs/{job_id}/status.json"


def checkpoint_key(job_id: str, step: int) -> str:
    """Where the training loop stores each checkpoint's LoRA (for sheets and the best-step choice)."""
    return f"jobs/{job_id}/checkpoints/step_{step:06d}.safetensors"


def tensorboard_key(job_id: str) -> str:
    """The job's TensorBoard log folder: the worker's per-step scalars, the driver's sample images (train/live.py)."""
    return f"jobs/{job_id}/tensorboard"


def sample_column_prefix(job_id: str, settings_digest: str) -> str:
    """The contact sheet's columns (one PNG per prompt per checkpoint), under a digest of the sample settings."""
    return f"jobs/{job_id}/samples/{settings_digest}"


def cache_prefix(cache_key: str) -> str:
    return f"cache/{cache_key}"


def compile_cache_key(fingerprint: str) -> str:
    """Compiled kernels shared by every job whose graphs match (klein.accel.compile_fingerprint): model, shapes,
    LoRA settings, torch, GPU. Written by the first such job, read by the next ones on any node."""
    return f"compile_cache/{fingerprint}.bin"


def submission_key(tenant: str, job_id: str) -> str:
    return f"{TENANTS_ROOT}/{tenant}/submissions/{job_id}.json"


def upload_key(tenant: str, job_id: str) -> str:
    return f"uploads/{tenant}/{job_id}/refs.zip"


# -- the trigger format ---------------------------------------------------------------------------------------
def _leading_trigger(trigger: str, text: str) -> re.Match | None:
    # "zxy_ink. a cat" and "ZXY_INK, a cat" start with the trigger; "zxy_inked cat" does not.
    return re.match(re.escape(trigger) + r"(?![A-Za-z0-9_-])", text, flags=re.IGNORECASE)


def with_trigger(trigger: str, text: str | None) -> str:
    """`"<trigger>. <text>"`: how a trigger calls up a style, in training captions and in prompts alike.

    Unless the text already starts with the trigger; the trigger alone if the text is empty. A leading
    trigger in another case is rewritten to the trigger's own spelling: the tokenizer is case-sensitive,
    so "ZXY_INK" would be a different token.
    """
    text = " ".join((text or "").split())
    if not text:
        return trigger
    leading = _leading_trigger(trigger, text)
    if leading:
        return trigger + text[leading.end():]
    return f"{trigger}. {text}"


def without_trigger(text: str, trigger: str) -> str:
    """The text with a leading trigger (and its '.' or ',') removed: ConsisLoRA's content captions.

    A trigger-only caption becomes "" (the empty prompt), so the content stage learns the picture, not the word.
    """
    text = " ".join((text or "").split())
    leading = _leading_trigger(trigger, text)
    if leading:
        text = text[leading.end():].lstrip(" .,;:")
    return text


# -- K-LoRA ---------------------------------------------------------------------------------------------------
# the paper's alpha and beta; gamma balances content against style
KLORA_ALPHA = 1.5
KLORA_BETA = 0.5
KLORA_GAMMA = 1.0
KLORA_DEFAULTS = (KLORA_ALPHA, KLORA_BETA, KLORA_GAMMA)


# -- the manifest of a LoRA -----------------------------------------------------------------------------------
CONFIG_SOURCES = ("user", "variant", "formula", "policy", "default")


class Decision(BaseModel):
    model_config = ConfigDict(extra="allow")
    variant: str
    reason: str = ""
    text_stage: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """`tenants/<t>/loras/<id>/manifest.json`, written last by a training job (train/job.py) or an import.

    Readers use these fields; writers may add more (extra keys are kept)."""

    model_config = ConfigDict(extra="allow")
    id: str
    tenant: str
    trigger: str | None = None
    base_model: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    # where each config value came from: one of CONFIG_SOURCES per key
    config_sources: dict[str, str] = Field(default_factory=dict)
    decision: Decision
    warnings: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)  # file name (relative to the LoRA's prefix) -> sha256
    comfyui_file: str | None = None  # the ComfyUI export's name in `files` (comfyui_file_name); None: none written
    # the LoRA under the job's name in `files` (named_lora_file): the same bytes as `lora.safetensors`, which stays for
    # the readers of the fixed name; None in LoRAs trained before names, and in imports
    name: str | None = None
    lora_file: str | None = None
    # the contact sheet: None once it is in `files` (or while it renders); {"error": ...} when it could not be made
    contact_sheet: dict[str, Any] | None = None
    best_step: int | None = None
    delivered_step: int | None = None
    style_profile: dict[str, Any] | None = None
    # the health report (train/health.py): None until it is written after delivery; {"error": ...} if it failed
    health: dict[str, Any] | None = None

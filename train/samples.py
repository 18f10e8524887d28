"""Sample images of a LoRA (or of the base model) on the inference pool: the contact sheets of a training job
and the samples of a sweep are rendered by the same two pieces.

A Ray worker process keeps one pipeline per (model, device): Ray reuses workers, so later tasks skip the load.
Each LoRA is loaded under a name unique to its content and removed afterwards, so a reused pipeline never
serves one job's weights under another job's name.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from cluster.pools import infer_task_options
from klein.generate import generate_images, set_active_loras
from klein.lora import read_lora
from klein.model import load_pipeline

_PIPELINES: dict[tuple[str, str], Any] = {}
_PIPELINE_LOCK = threading.RLock()


def cached_pipeline(model: str, device: str):
    """This process's pipeline for (model, device), loaded on first use."""
    with _PIPELINE_LOCK:
        key = (model, device)
        if key not in _PIPELINES:
            _PIPELINES[key] = load_pipeline(model, device=device)
        return _PIPELINES[key]


def render_with_lora(pipe, lora_bytes: bytes | None, requests: list) -> list:
    """One image per `GenerateRequest` (drawn in batches), with the LoRA in `lora_bytes` active at weight 1 (None: the base model)."""
    adapter = None if lora_bytes is None else "sample_" + hashlib.sha256(lora_bytes).hexdigest()[:16]
    with _PIPELINE_LOCK:  # adapters are per pipeline: one render at a time in this process
        try:
            set_active_loras(pipe, [] if adapter is None else [(adapter, read_lora(lora_bytes), 1.0)])
            return generate_images(pipe, requests)
        finally:
            if adapter is not None:
                set_active_loras(pipe, [])
                pipe.transformer.delete_adapters([adapter])


def sample_task_options(use_gpu: bool) -> dict[str, Any]:
    """A sampling task on the inference pool: it reserves the GPU it renders on (never one a Serve replica
    holds without Ray knowing), and on a CPU-only cluster a CPU."""
    return infer_task_options(num_gpus=1 if use_gpu else 0, num_cpus=1)

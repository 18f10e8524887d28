"""The sampler shared by contact sheets and sweeps: one cached pipeline per worker, each LoRA under a name of
its own content and removed afterwards, and a reserved GPU when the job runs on GPUs."""

from __future__ import annotations

import numpy as np
import torch

from cluster.pools import INFER_RESOURCE
from klein import lora as L
from klein.generate import GenerateRequest
from klein.model import load_pipeline
from train.samples import cached_pipeline, render_with_lora, sample_task_options


def _random_lora_bytes(seed: int) -> bytes:
    pipe = load_pipeline("tiny", components=("transformer",))
    pipe.transformer.add_adapter(L.lora_config(pipe.transformer, rank=4, alpha=8, init="gaussian"), adapter_name="style")
    gen = torch.Generator().manual_seed(seed)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    return L.lora_to_bytes(L.extract_lora(pipe.transformer, "style", meta={"trigger": "zxy_test", "base_model": "tiny"}))


def test_loras_render_one_after_another_on_one_cached_pipeline(tiny_dir):
    pipe = cached_pipeline("tiny", "cpu")
    assert cached_pipeline("tiny", "cpu") is pipe  # a reused Ray worker skips the load
    requests = [GenerateRequest(prompt="zxy_test. a house", seed=s, steps=2, width=64, height=64) for s in (0, 1)]
    first, second = _random_lora_bytes(1), _random_lora_bytes(2)
    pixels = lambda images: [np.asarray(im, dtype=np.int16) for im in images]  # noqa: E731
    base = pixels(render_with_lora(pipe, None, requests))
    with_first = pixels(render_with_lora(pipe, first, requests))
    with_second = pixels(render_with_lora(pipe, second, requests))
    assert not getattr(pipe.transformer, "peft_config", {})  # no adapter left resident after a render
    assert all(np.abs(a - b).max() > 0 for a, b in zip(base, with_first))
    assert all(np.abs(a - b).max() > 0 for a, b in zip(with_first, with_second))  # not the first LoRA's name reused
    # each LoRA was removed after its render: the base model is unchanged, and rendering again gives the same pixels
    assert all(np.array_equal(a, b) for a, b in zip(base, pixels(render_with_lora(pipe, None, requests))))
    assert all(np.array_equal(a, b) for a, b in zip(with_first, pixels(render_with_lora(pipe, first, requests))))


def test_sampling_tasks_reserve_the_gpu_they_render_on():
    on_gpu, on_cpu = sample_task_options(True), sample_task_options(False)
    assert on_gpu["num_gpus"] == 1 and on_gpu["resources"][INFER_RESOURCE] == 1
    assert on_cpu["num_gpus"] == 0 and 0 < on_cpu["resources"][INFER_RESOURCE] < 1

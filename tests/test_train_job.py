"""Style LoRA jobs through real Ray Train on a local cluster: outputs, learning, and exact resume after a kill."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from cluster.storage import Storage
from klein.lora import read_lora
from train.board import make_board
from train.job import lora_prefix, run_training_job
from train.recipe import TrainConfig


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir):
    from cluster.pools import init_local_ray

    init_local_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    make_board("neon", 8, out, size=256, seed=0)
    return out


def _cfg(storage, job_id, **kw):
    base = dict(trigger="zxy_neon", storage=str(storage), resolution=64, steps=20, save_every=5, job_id=job_id,
                lr=2e-3, sample_prompts=["a house"], sample_steps=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_job_writes_a_complete_verified_lora(ray_cluster, board, tmp_path):
    statuses = []
    manifest = run_training_job(board, _cfg(tmp_path, "job-e2e"), progress=lambda s: statuses.append(s["state"]))
    storage = Storage.from_uri(tmp_path)
    prefix = lora_prefix("default", "job-e2e")
    assert storage.read_json(f"{prefix}/manifest.json") == json.loads(json.dumps(manifest, default=str))
    for name, sha in manifest["files"].items():
        storage.read_verified(f"{prefix}/{name}", sha)  # every file present and matching its sha256
    lora = read_lora(storage.read_bytes(f"{prefix}/lora.safetensors"))
    assert lora.meta["trigger"] == "zxy_neon" and lora.rank == 32 and lora.meta["base_model"].startswith("tiny")
    comfy = read_lora(storage.read_bytes(f"{prefix}/lora_comfyui.safetensors"))
    assert comfy.meta["source_format"] == "comfyui" and set(comfy.layers) == set(lora.layers)
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{prefix}/samples/contact_sheet.png")))
    assert sheet.width > sheet.height  # base + 4 checkpoints side by side
    Image.open(io.BytesIO(storage.read_bytes(f"{prefix}/samples/loss.png"))).verify()
    m = manifest["metrics"]
    assert m["steps"] == 20 and m["steps_trained_once"] and m["attempts"] == 1
    assert [v["step"] for v in m["val_curve"]] == [5, 10, 15, 20]
    assert manifest["checkpoints"] == [5, 10, 15, 20] and manifest["best_step"] in manifest["checkpoints"]
    assert manifest["decision"]["variant"] == "GEM+A"  # 8 refs
    assert manifest["style_profile"]["source"] == "offline"
    assert manifest["captions"] and all(not k.startswith("/") for k in manifest["dataset"]["refs"][0])
    assert statuses[0] == "preparing" and statuses[-1] == "done"
    assert storage.read_json("jobs/job-e2e/status.json")["state"] == "done"


def test_a_killed_worker_resumes_exactly(ray_cluster, board, tmp_path):
    """Kill the worker process mid-step (after the step-10 checkpoint); Ray Train restarts it from that
    checkpoint; the final LoRA equals an uninterrupted run with the same seed and no step ran twice."""
    clean = run_training_job(board, _cfg(tmp_path, "job-clean", steps=16, save_every=4))
    killed = run_training_job(board, _cfg(tmp_path, "job-killed", steps=16, save_every=4, fail_at_step=11))
    storage = Storage.from_uri(tmp_path)
    assert storage.exists("jobs/job-killed/fault_injected_11")
    assert killed["metrics"]["attempts"] == 2 and clean["metrics"]["attempts"] == 1
    assert killed["metrics"]["steps_trained_once"]
    steps = [e["step"] for e in killed["metrics"]["loss_curve"]]
    assert steps == list(range(1, 17))
    a = read_lora(storage.read_bytes(f"{lora_prefix('default', 'job-clean')}/lora.safetensors"))
    b = read_lora(storage.read_bytes(f"{lora_prefix('default', 'job-killed')}/lora.safetensors"))
    for name in a.layers:
        assert torch.allclose(a.layers[name].up, b.layers[name].up, atol=1e-5)
        assert torch.allclose(a.layers[name].down, b.layers[name].down, atol=1e-5)
    assert np.allclose([e["loss"] for e in clean["metrics"]["loss_curve"]], [e["loss"] for e in killed["metrics"]["loss_curve"]], atol=1e-5)


def test_bad_refs_fail_before_anything_is_stored(ray_cluster, tmp_path):
    from train.dataset import DatasetError

    empty = tmp_path / "refs"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="a.png"):
        run_training_job(empty, _cfg(tmp_path / "store", "job-bad"))
    storage = Storage.from_uri(tmp_path / "store")
    assert storage.read_json("jobs/job-bad/status.json")["state"] == "failed"
    assert not storage.exists(lora_prefix("default", "job-bad"))

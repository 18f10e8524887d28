"""scripts/make_klein_folder.py and bench/time_to_style.py at small sizes, through the code paths the GPU run takes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cluster.ports import free_port
from klein.generate import GenerateRequest, generate_image
from klein.lora import LoraLayer, LoraWeights, lora_to_bytes, read_lora
from klein.model import KleinVariant, check_klein_folder, load_pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

import make_klein_folder  # noqa: E402
import time_to_style  # noqa: E402


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory):
    """`--size test` through the script's command line, sharded small so the index path is taken too."""
    out = tmp_path_factory.mktemp("klein-random") / "klein-test"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_klein_folder.py"), str(out), "--size", "test",
                           "--device", "cpu", "--max-shard-size", "1MB"],
                          capture_output=True, text=True, timeout=300, env=time_to_style.child_env(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_test_folder_passes_the_check_loads_and_generates(test_folder):
    check_klein_folder(test_folder)
    info = json.loads((test_folder / "klein_random.json").read_text())
    assert info["size"] == "test" and info["dtype"] == "bfloat16"
    # sharded as diffusers saves: an index naming every shard, weights stored in bf16
    index = json.loads((test_folder / "text_encoder" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    with safe_open(str(test_folder / "text_encoder" / shards[0]), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.bfloat16"
    text_config = json.loads((test_folder / "text_encoder" / "config.json").read_text())
    assert text_config["vocab_size"] == make_klein_folder.QWEN3_VOCAB  # the real embedding size, whatever the tokenizer
    pipe = load_pipeline(test_folder)
    assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    image = generate_image(pipe, GenerateRequest(prompt="a lighthouse", steps=2, width=64, height=64))
    assert image.size == (64, 64)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all() and np.asarray(image).std() > 0


@pytest.mark.parametrize("size,variant,hidden,text_hidden", [("9b", "klein-9b", 4096, 4096), ("4b", "klein-4b", 3072, 2560)])
def test_full_size_configs_are_kleins(size, variant, hidden, text_hidden):
    """The 9B/4B specs name Klein's transformer (KleinVariant recognises it) and Qwen3-8B/4B's encoder, whose
    three stacked layers are the transformer's joint_attention_dim."""
    spec = make_klein_folder.SIZES[size]

    class Config:
        pass

    config = Config()
    for k, v in spec["transformer"].items():
        setattr(config, k, v)
    assert KleinVariant.from_config(config).name == variant
    assert config.num_attention_heads * config.attention_head_dim == hidden
    assert spec["text_encoder"]["hidden_size"] == text_hidden
    assert config.joint_attention_dim == 3 * text_hidden
    assert spec["text_encoder"]["vocab_size"] == 151936 and spec["text_encoder"]["num_hidden_layers"] == 36
    assert config.in_channels == 128 and config.guidance_embeds is False


def test_existing_folder_is_refused_unless_overwrite(test_folder, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_klein_folder.make_klein_folder(test_folder, "test")
    with pytest.raises(ValueError, match="unknown size"):
        make_klein_folder.make_klein_folder(tmp_path / "x", "13b")


@pytest.mark.slow  # ~3 min on two shared CPU cores: a real Ray Train job, then a whole Ray Serve application
def test_time_to_style_trains_then_serves_and_times_every_stage(test_folder, tmp_path):
    """bench/time_to_style.py as the lead runs it, at toy sizes, in one run as on the GPU: board → `klein-style
    train` subprocess → every stage timed from status.json, the checkpoints and the delivered files; then
    `klein-style serve` with the LoRA just trained: cold start, first image, and each (concurrency x LoRA set)
    phase with images, latencies and throughput, 3 copies round-robin; the JSON and table written. Each phase stops
    at 2 images a client (`--phase-images`): what is asserted of a phase (images, no errors, p50 <= p99, a rate)
    needs no more, and the 4 s budget of image after image was ~16 s of both cores."""
    out = tmp_path / "tts"
    cmd = [sys.executable, str(REPO / "bench" / "time_to_style.py"), "--model", str(test_folder), "--out", str(out),
           "--storage", str(tmp_path / "storage"), "--job-id", "tts-test", "--refs", "3", "--ref-size", "256", "--steps", "4",
           "--save-every", "2", "--resolution", "64", "--sample-size", "64", "--sample-steps", "2", "--variant", "GEM+A",
           "--fresh-compile-dirs", str(tmp_path / "compile"),
           "--serve", "--serve-size", "64", "--serve-steps", "2", "--phase-budget-s", "4", "--phase-images", "1:2,2:4", "--concurrency", "1,2",
           "--n-loras", "3", "--budget-s", "700", "--port", str(free_port())]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env=time_to_style.child_env(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "time_to_style.json").read_text())
    assert data["errors"] == []
    assert data["phases"]["board"]["n"] == 3
    train = data["phases"]["train"]
    assert train["returncode"] == 0 and train["summary"]["state"] == "done" and not train["timed_out"]
    stages = train["stages"]
    for name in ("cli_import", "ray_start", "captions", "cache", "model_load_and_compile", "steps", "samples", "finish"):
        assert stages[name]["seconds"] is not None and stages[name]["seconds"] >= 0, (name, stages[name])
    # a save's extra time is estimated against the steady step rate: at 4 toy steps a few hundredths either way is noise
    assert stages["checkpoints"]["seconds"] is not None and stages["checkpoints"]["seconds"] > -1, stages["checkpoints"]
    # the stages follow one another in the order the job runs them
    order = ["cli_import", "ray_start", "captions", "cache", "model_load_and_compile", "steps", "samples", "finish"]
    ends = [stages[n]["end_s"] for n in order]
    assert ends == sorted(ends)
    assert [c["step"] for c in stages["checkpoints"]["each"]] == [2, 4]
    assert all(c["file_seen_s"] is not None for c in stages["checkpoints"]["each"])
    s = train["summary"]
    assert 0 < s["refs_to_lora_s"] <= s["refs_to_done_s"] <= s["process_s"] <= time.time() - started
    assert s["steps_reached"] == 4 and s["s_per_step"] > 0 and s["cli_import_s"] == stages["cli_import"]["seconds"]
    assert train["manifest"]["steps"] == 4 and train["manifest"]["steps_trained_once"] is True
    assert train["manifest"]["rank"] == 32 and "samples/contact_sheet.png" in train["manifest"]["files"]
    assert train["config"] == {"steps": 4, "save_every": 2, "resolution": 64, "sample_size": 64, "sample_steps": 2,
                               "variant": "GEM+A"}
    # the LoRA is delivered before its contact sheet renders
    assert train["files_seen_s"]["manifest"] <= s["refs_to_sheet_s"] and s["refs_to_lora_s"] <= s["refs_to_sheet_s"]
    # the worker's own account of its start-up and of each checkpoint
    startup = train["worker"]["startup"]
    for key in ("ray_train_start_s", "cache_load_s", "transformer_load_s", "setup_s", "first_step_s", "to_first_step_s"):
        assert startup[key] is not None and startup[key] >= 0, (key, startup)
    assert startup["compile_cache_artifacts_loaded"] == 0  # nothing compiled on the CPU by default
    assert [save["step"] for save in train["worker"]["saves"]] == [2, 4]
    assert all(save["validation_s"] >= 0 and save["write_s"] >= 0 for save in train["worker"]["saves"])

    serve = data["phases"]["serve"]
    assert serve["ready_s"] > 0 and serve["first_image_s"] > 0 and serve["healthz"]["status"] == "ok"
    assert serve["first_image_lora"] == "tts-test"  # the LoRA this run trained, not a random one
    assert sorted(serve["load"]) == ["c1_1_lora", "c1_3_loras", "c2_1_lora", "c2_3_loras"]
    for name, phase in serve["load"].items():
        assert phase["ok"] >= 1 and phase["errors"] == 0, (name, phase)
        assert 0 < phase["p50_s"] <= phase["p99_s"] and phase["images_per_hour"] > 0
    assert serve["load"]["c2_3_loras"]["loras"] == 3 and serve["load"]["c1_1_lora"]["loras"] == 1
    table = (out / "time_to_style.md").read_text()
    assert "| model_load_and_compile |" in table and "refs_to_lora_s" in table and "| c2_3_loras | 2 | 3 |" in table
    assert "worker start-up (s):" in table and "- checkpoint at step 2:" in table


def test_perturbed_copies_are_distinct_loras_of_the_same_shapes():
    """The 10-LoRA serving phase needs 10 different LoRAs (different bytes, so no cache can fold them into one)."""
    base = LoraWeights(layers={"transformer_blocks.0.attn.to_q": LoraLayer(down=torch.randn(4, 16), up=torch.randn(16, 4), alpha=4.0)},
                       meta={"trigger": "zxy_style"})
    copies = time_to_style.perturbed_copies(lora_to_bytes(base), 3)
    assert len({hashlib.sha256(c).hexdigest() for c in copies}) == 3
    for i, data in enumerate(copies):
        layer = read_lora(data).layers["transformer_blocks.0.attn.to_q"]
        assert layer.up.shape == (16, 4) and torch.equal(layer.down, base.layers["transformer_blocks.0.attn.to_q"].down)
        assert torch.allclose(layer.up, base.layers["transformer_blocks.0.attn.to_q"].up * (1 + i / 100))

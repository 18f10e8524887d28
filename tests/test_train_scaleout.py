"""Data-parallel training (two Ray Train workers), ConsisLoRA's two stages, and `sample_every` sheets."""

from __future__ import annotations

import io

import pytest
import ray
import torch
from PIL import Image

from cluster.storage import Storage
from klein.lora import extract_lora, read_lora
from evaluation.board import make_board
from train.job import checkpoint_key, lora_prefix, run_training_job
from train.recipe import ConfigError, TrainConfig
from formula_reference import formula_reference  # tests/ is on sys.path


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir):
    from cluster.pools import init_local_ray

    # two training slots: one job of two workers (each takes a `train_gpu` slot and a CPU)
    init_local_ray(num_cpus=3, object_store_memory=300 * 1024 * 1024, train_slots=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    make_board("sepia", 6, out, size=256, seed=1)
    return out


def _cfg(storage, job_id, **kw):
    base = dict(trigger="zxy_sepia", storage=str(storage), resolution=64, steps=6, save_every=3, job_id=job_id,
                lr=2e-3, sample_prompts=["a house"], sample_steps=3, seed=3, variant="GEM+A")
    base.update(kw)
    return TrainConfig(**base)


def test_two_workers_train_data_parallel_exactly(ray_cluster, board, tmp_path):
    """Two DDP workers on disjoint batches give the LoRA that the formulas give for the mean of the two
    batches' gradients at every step (tests/formula_reference.py, not our step); the effective batch is reported."""
    manifest = run_training_job(board, _cfg(tmp_path, "job-ddp", num_workers=2))
    storage = Storage.from_uri(tmp_path)
    status = storage.read_json("jobs/job-ddp/status.json")
    assert status["state"] == "done"
    assert manifest["config"]["num_workers"] == 2 and manifest["metrics"]["steps_trained_once"]
    assert manifest["metrics"]["effective_batch"] == 2
    trained = read_lora(storage.read_bytes(f"{lora_prefix('default', 'job-ddp')}/lora.safetensors"))
    cfg = TrainConfig.from_dict(manifest["config"])
    replayed = formula_reference(cfg, manifest["cache_key"], world=2)
    assert set(trained.layers) == set(replayed.layers)
    worst = max((trained.layers[n].up - replayed.layers[n].up).abs().max().item() for n in trained.layers)
    assert worst < 1e-4, f"DDP result differs from the replay by {worst}"
    # and the LoRA did move: the up-projections start at zero
    assert max(trained.layers[n].up.abs().max().item() for n in trained.layers) > 1e-3


def test_consis_lora_trains_style_on_a_frozen_content_lora(ray_cluster, board, tmp_path):
    manifest = run_training_job(board, _cfg(tmp_path, "job-consis", consis_lora=True, content_steps=4,
                                            steps=6, save_every=6, sample_every=2))
    storage = Storage.from_uri(tmp_path)
    consis = manifest["consis_lora"]
    assert consis["content_job"] == "job-consis-content" and consis["content_steps"] == 4
    content = read_lora(storage.read_bytes(consis["content_lora"]))
    style = read_lora(storage.read_bytes(f"{lora_prefix('default', 'job-consis')}/lora.safetensors"))
    assert set(style.layers) == set(content.layers) and style.rank == 32
    # two different adapters: the style one was trained from a fresh start on top of the content one
    assert any(not torch.allclose(style.layers[n].up, content.layers[n].up) for n in style.layers)
    # only the style LoRA is delivered (with its health report); sample_every=2 puts steps 2, 4 and 6 on the sheet
    assert set(manifest["files"]) == {"lora.safetensors", "job-consis.safetensors",  # named after the job
                                      f"job-consis_{manifest['trigger']}.safetensors",
                                      "samples/contact_sheet.png", "samples/loss.png", "samples/health.png",
                                      "samples/health.md"}
    assert manifest["checkpoints"] == [6] and manifest["sampled_steps"] == [2, 4, 6]
    for step in (2, 4, 6):
        assert storage.exists(checkpoint_key("job-consis", step))
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{lora_prefix('default', 'job-consis')}/samples/contact_sheet.png")))
    one_column = Image.open(io.BytesIO(storage.read_bytes(f"{lora_prefix('default', 'job-consis')}/samples/loss.png")))
    assert sheet.width > 3 * sheet.height and one_column.width > 0  # base + 3 sampled checkpoints in one row
    # the content stage trained on captions without the trigger
    assert "content_lora" not in manifest["config"]


def test_content_adapter_stays_frozen_under_the_trained_one(tiny_dir):
    from serve.testing import random_lora
    from train.loop import CONTENT_ADAPTER, flow_matching_loss, lora_parameters, setup_transformer

    cfg = TrainConfig(trigger="zxy_sepia", resolution=64, rank=4, linear_alpha=4, seed=0)
    plain = setup_transformer(cfg, torch.device("cpu"))
    content = random_lora(plain, rank=4, seed=5, scale=0.5)
    transformer = setup_transformer(cfg, torch.device("cpu"), content_lora=content)
    trainable = lora_parameters(transformer)
    assert trainable and all(".default." in n for n in trainable)
    assert len(trainable) == len(lora_parameters(plain))
    before = extract_lora(transformer, CONTENT_ADAPTER)
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.1)
    x0 = torch.randn(1, 128, 4, 4)
    embeds = torch.randn(1, 8, transformer.config.joint_attention_dim)
    loss = flow_matching_loss(transformer, x0, embeds, torch.tensor([0.5]), torch.randn_like(x0))
    loss.backward()
    optimizer.step()
    after = extract_lora(transformer, CONTENT_ADAPTER)
    assert all(torch.equal(before.layers[n].up, after.layers[n].up) for n in before.layers)
    # and the content adapter is active: the output differs from the model without it
    with torch.no_grad():
        noise = torch.randn_like(x0)
        with_content = flow_matching_loss(transformer, x0, embeds, torch.tensor([0.5]), noise)
        transformer.set_adapters(["default"])
        without = flow_matching_loss(transformer, x0, embeds, torch.tensor([0.5]), noise)
    assert not torch.isclose(with_content, without)


def test_consis_options_are_checked(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="content_steps"):
        TrainConfig(content_steps=0).validate()
    from train.job import JobError

    with pytest.raises(JobError, match="not both"):
        run_training_job("unused", TrainConfig(consis_lora=True, content_lora="jobs/x/checkpoints/step_000001.safetensors", job_id="job-x"))
    # the CLI says so in one line and exits 1 (no traceback)
    import cli.train
    from cli.main import main

    config = tmp_path / "both.yaml"
    config.write_text("consis_lora: true\ncontent_lora: jobs/x/checkpoints/step_000001.safetensors\n")
    monkeypatch.setattr(cli.train, "_start_ray", lambda address: None)
    assert main(["train", "unused", "--trigger", "zxy_neon", "--config", str(config), "--job-id", "job-x",
                 "--storage", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: content_lora is what consis_lora's first stage trains") and "--job-id job-x" in err
    assert "Traceback" not in err
    with pytest.raises(ConfigError, match="sample_every"):
        TrainConfig(sample_every=0).validate()

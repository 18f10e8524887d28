"""Loading Klein pipelines: the tiny preset through from_pretrained, determinism, and clear loader errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from klein.generate import GenerateRequest, generate_image, generate_images
from klein.request import GenerateError
from klein.model import KleinVariant, ModelLoadError, check_klein_folder, load_pipeline, max_sequence_length


def test_tiny_preset_uses_the_real_klein_classes(tiny_dir, tiny_pipe):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert isinstance(tiny_pipe, Flux2KleinPipeline)
    assert isinstance(tiny_pipe.transformer, Flux2Transformer2DModel)
    assert isinstance(tiny_pipe.vae, AutoencoderKLFlux2)
    assert isinstance(tiny_pipe.text_encoder, Qwen3ForCausalLM)
    assert type(tiny_pipe.tokenizer).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")
    cfg = tiny_pipe.transformer.config
    assert cfg.in_channels == 128 and cfg.guidance_embeds is False
    assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1
    assert len(tiny_pipe.transformer.transformer_blocks) == cfg.num_layers
    assert len(tiny_pipe.transformer.single_transformer_blocks) == cfg.num_single_layers
    # the pipeline stacks hidden states 9, 18 and 27 of the text encoder into joint_attention_dim
    assert tiny_pipe.text_encoder.config.num_hidden_layers >= 27
    assert cfg.joint_attention_dim == 3 * tiny_pipe.text_encoder.config.hidden_size
    assert KleinVariant.from_config(cfg).name == "klein-custom"
    assert max_sequence_length("tiny") == 512  # tiny declares none: Klein's own length


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_pipe):
    req = GenerateRequest(prompt="a house beside a tree", seed=7, steps=8, width=64, height=64)
    a = np.asarray(generate_image(tiny_pipe, req))
    b = np.asarray(generate_image(tiny_pipe, req))
    c = np.asarray(generate_image(tiny_pipe, GenerateRequest(**{**req.__dict__, "seed": 8})))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_fresh_load_gives_the_same_pixels(tiny_pipe):
    req = GenerateRequest(prompt="a boat", seed=3, steps=4, width=64, height=64)
    again = load_pipeline("tiny")
    assert np.array_equal(np.asarray(generate_image(tiny_pipe, req)), np.asarray(generate_image(again, req)))


def test_negative_prompt_changes_the_image(tiny_pipe):
    req = GenerateRequest(prompt="a cat", seed=1, steps=4, width=64, height=64)
    neg = GenerateRequest(**{**req.__dict__, "negative_prompt": "a dog"})
    assert not np.array_equal(np.asarray(generate_image(tiny_pipe, req)), np.asarray(generate_image(tiny_pipe, neg)))


def test_batched_images_are_each_requests_own_image(tiny_pipe):
    """generate_images (samples, health probes, quality checks) batches requests that can share a pipeline call:
    each image is its own request's (seed, prompt, size, negative prompt), in the order asked, within a level of
    generate_image's pixels (a batch sums in another order)."""
    base = dict(steps=4, width=64, height=64, guidance=4.0)
    requests = [GenerateRequest(prompt="a cat", seed=1, **base), GenerateRequest(prompt="a boat", seed=2, **base),
                GenerateRequest(prompt="a house", seed=3, **{**base, "width": 80}),
                GenerateRequest(prompt="a cat", seed=1, negative_prompt="a dog", **base),
                GenerateRequest(prompt="a cat", seed=4, **base)]
    batched = [np.asarray(image, dtype=int) for image in generate_images(tiny_pipe, requests, batch_size=2)]
    single = [np.asarray(generate_image(tiny_pipe, request), dtype=int) for request in requests]
    assert [b.shape for b in batched] == [s.shape for s in single]
    for k, (b, s) in enumerate(zip(batched, single)):
        assert np.abs(b - s).max() <= 2 and np.abs(b - s).mean() < 0.05, k
    assert np.abs(batched[0] - batched[4]).mean() > 5  # seeds 1 and 4: other noise, other pictures
    # the negative prompt moves the tiny model's picture by 0.25 levels on average, 5x the tolerance above: its batch got it
    assert np.abs(single[0] - single[3]).mean() > 0.1 and np.abs(batched[0] - batched[3]).mean() > 0.1


def test_each_prompt_is_encoded_once_per_pipeline_and_text_length(tiny_pipe):
    """The contact sheet's columns and the health probe draw the same prompts at every checkpoint, with CFG's empty
    negative prompt beside each image: generate_images encodes each distinct (prompt, text length) once per pipeline
    and the images drawn from the kept embeddings are the ones drawn from fresh ones, pixel for pixel."""
    tiny_pipe._klein_prompt_cache = None  # other tests drew on this session's pipeline: start from an empty cache
    calls = []
    hook = tiny_pipe.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0] if args else 1))
    try:
        base = dict(steps=2, width=64, height=64, guidance=4.0)
        requests = [GenerateRequest(prompt=p, seed=s, **base) for p in ("a cat", "a boat") for s in (1, 2)]
        first = [np.asarray(image) for image in generate_images(tiny_pipe, requests, batch_size=4)]
        assert len(calls) == 3 and set(calls) == {1}  # "a cat", "a boat" and the empty negative prompt, each alone
        again = [np.asarray(image) for image in generate_images(tiny_pipe, requests, batch_size=4)]
        assert len(calls) == 3  # a later checkpoint's column encodes nothing
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        # the same prompt at another text length is another embedding, and draws what a single call draws
        short = [GenerateRequest(prompt="a cat", seed=s, max_sequence_length=32, **base) for s in (1, 2)]
        drawn = generate_images(tiny_pipe, short)
        assert len(calls) == 5
        for image, request in zip(drawn, short):
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(generate_image(tiny_pipe, request), dtype=int)).max() <= 2
    finally:
        hook.remove()


@pytest.mark.parametrize(
    "field,value",
    [("width", 65), ("height", 4096), ("steps", 0), ("guidance", -1.0), ("seed", -5), ("prompt", "  ")],
)
def test_request_validation_names_the_field(field, value):
    req = GenerateRequest(prompt="a cat", width=64, height=64)
    setattr(req, field, value)
    with pytest.raises(GenerateError) as e:
        req.validate()
    assert e.value.field == field


def test_missing_folder_says_so(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nope")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        check_klein_folder(tmp_path)


def test_missing_component_and_wrong_class_are_listed(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    index = json.loads((broken / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(broken)
    msg = str(e.value)
    assert "subfolder vae/ is missing" in msg
    assert "`transformer` is a FluxTransformer2DModel, expected Flux2Transformer2DModel" in msg


def test_not_a_klein_pipeline(tiny_dir, tmp_path):
    other = tmp_path / "flux1"
    shutil.copytree(tiny_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="expected 'Flux2KleinPipeline'"):
        check_klein_folder(other)


def test_weights_missing(tiny_dir, tmp_path):
    other = tmp_path / "noweights"
    shutil.copytree(tiny_dir, other)
    for f in (other / "transformer").glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="transformer/ holds no weights"):
        check_klein_folder(other)


def test_components_subset_loads_only_the_transformer():
    pipe = load_pipeline("tiny", components=("transformer",))
    assert pipe.transformer is not None and pipe.vae is None and pipe.text_encoder is None
    assert next(pipe.transformer.parameters()).dtype == torch.float32


def test_the_tiny_vae_fit_runs_inside_a_callers_no_grad():
    """The preset's first build can happen inside train.cache.build_cache (a no_grad function) on a fresh machine."""
    from diffusers import AutoencoderKLFlux2

    from klein.tiny import TINY_VAE, _fit_tiny_vae

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**TINY_VAE)
    before = [p.detach().clone() for p in vae.parameters()]
    with torch.no_grad():
        _fit_tiny_vae(vae, seed=1, steps=2, batch=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))

"""LoRA targets, our file format through diffusers' own loader, format round trips, and the shape check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from klein import lora as L
from klein.model import load_pipeline

KW = dict(prompt="a cat on a wall", height=64, width=64, num_inference_steps=4, guidance_scale=4.0, output_type="np")


def _gen(pipe, seed=1):
    return pipe(generator=torch.Generator().manual_seed(seed), **KW).images


@pytest.fixture(scope="module")
def trained_like():
    """A pipeline with a non-trivial in-memory adapter, its output, and the base output."""
    pipe = load_pipeline("tiny")
    base = _gen(pipe)
    pipe.transformer.add_adapter(L.lora_config(pipe.transformer, rank=4, alpha=8, init="gaussian"), adapter_name="style")
    torch.manual_seed(0)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    styled = _gen(pipe)
    lora = L.extract_lora(pipe.transformer, "style", meta={"preset": "all", "trigger": "zxy_test", "base_model": "tiny"})
    return lora, styled, base


def _fresh_output_with(path_or_bytes, tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    if isinstance(path_or_bytes, bytes):
        path.write_bytes(path_or_bytes)
    else:
        path = path_or_bytes
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(path), adapter_name=name)  # diffusers' own loader
    return _gen(pipe)


def test_presets_pick_the_right_layers():
    all_ = L.target_modules(8, 24, "all")
    assert len(all_) == 8 * 12 + 24 * 2  # the 9B layout: 12 Linears per double block, 2 per single block
    assert all(n.startswith("single_transformer_blocks.") for n in L.target_modules(8, 24, "single_blocks"))
    assert all(n.startswith("transformer_blocks.") for n in L.target_modules(8, 24, "double_blocks"))
    attn = L.target_modules(8, 24, "attention")
    assert "transformer_blocks.0.attn.to_q" in attn and "transformer_blocks.0.ff.linear_in" not in attn
    with pytest.raises(L.LoraError, match="unknown LoRA target preset"):
        L.target_modules(8, 24, "everything")


def test_rank32_all_on_klein9b_has_87m_parameters():
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32,
                                        joint_attention_dim=12288, guidance_embeds=False)
    modules = dict(model.named_modules())
    params = sum(32 * (modules[n].in_features + modules[n].out_features) for n in L.transformer_targets(model, "all"))
    assert abs(params / 1e6 - 87.0) < 0.1


def test_our_file_through_diffusers_loader_matches_in_memory(trained_like, tmp_path):
    lora, styled, base = trained_like
    assert not np.allclose(styled, base)
    path = L.save_lora(lora, tmp_path / "lora.safetensors")
    out = _fresh_output_with(path, tmp_path, "ours")
    assert np.array_equal(out, styled)
    back = L.read_lora(path)
    assert back.meta["trigger"] == "zxy_test" and back.rank == 4 and back.alpha == 8
    assert all(torch.equal(back.layers[n].up, lora.layers[n].up) for n in lora.layers)


def test_add_lora_matches_diffusers_loader(trained_like):
    lora, styled, _ = trained_like
    pipe = load_pipeline("tiny")
    L.add_lora(pipe.transformer, lora, adapter_name="mine")
    assert np.array_equal(_gen(pipe), styled)


@pytest.mark.parametrize("fmt", ["comfyui", "kohya", "ai-toolkit"])
def test_export_import_round_trip_is_lossless(trained_like, fmt):
    lora, _, _ = trained_like
    data = L.export_lora(lora, fmt)
    assert L.detect_format(st_load(data)) == fmt
    back = L.read_lora(data)
    assert set(back.layers) == set(lora.layers)
    if fmt == "ai-toolkit":  # no alpha key in that format: the scale is baked into B, ΔW is identical
        assert L.lora_delta_close(back, lora, atol=1e-6)
    else:
        for n, layer in lora.layers.items():
            assert torch.equal(back.layers[n].down, layer.down) and torch.equal(back.layers[n].up, layer.up)
            assert back.layers[n].alpha == layer.alpha


def test_comfyui_keys_are_bfl_names_with_alphas(trained_like):
    lora, _, _ = trained_like
    keys = st_load(L.export_lora(lora, "comfyui"))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys
    assert "diffusion_model.double_blocks.0.img_attn.qkv.alpha" in keys
    assert "diffusion_model.single_blocks.0.linear1.lora_up.weight" in keys
    # fused qkv: rank 3r with alpha 3α keeps the scale α/r
    assert keys["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"].shape[0] == 3 * lora.rank
    assert float(keys["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 3 * lora.alpha


@pytest.mark.parametrize("fmt", ["kohya", "ai-toolkit"])
def test_exports_load_through_diffusers_with_the_same_output(trained_like, tmp_path, fmt):
    lora, styled, _ = trained_like
    out = _fresh_output_with(L.export_lora(lora, fmt), tmp_path, fmt.replace("-", "_"))
    assert np.allclose(out, styled, atol=2e-6)


def test_comfyui_import_then_diffusers_loader(trained_like, tmp_path):
    lora, styled, _ = trained_like
    back = L.read_lora(L.export_lora(lora, "comfyui"))
    out = _fresh_output_with(L.lora_to_bytes(back), tmp_path, "comfy")
    assert np.array_equal(out, styled)


def test_flux1_lora_fails_with_layer_and_both_shapes():
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        klein9b = Flux2Transformer2DModel(num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32,
                                          joint_attention_dim=12288, guidance_embeds=False)
    r = 16
    flux1 = L.LoraWeights(layers={
        "transformer_blocks.0.attn.to_q": L.LoraLayer(torch.zeros(r, 3072), torch.zeros(3072, r), r),
        "transformer_blocks.0.attn.add_k_proj": L.LoraLayer(torch.zeros(r, 3072), torch.zeros(3072, r), r),
        "single_transformer_blocks.0.proj_mlp": L.LoraLayer(torch.zeros(r, 3072), torch.zeros(12288, r), r),
    })
    with pytest.raises(L.LoraError) as e:
        L.check_lora_fits(flux1, klein9b)
    msg = str(e.value)
    assert "transformer_blocks.0.attn.to_q: the model's layer is 4096→4096 (in→out), the LoRA's is 3072→3072" in msg
    assert "single_transformer_blocks.0.proj_mlp: no such layer" in msg
    assert "FLUX.1" in msg and "hidden 4096 / joint 12288" in msg


def test_flux1_lora_file_refused_by_add_lora(tmp_path):
    pipe = load_pipeline("tiny", components=("transformer",))
    r = 4
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(r, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, r),
    }
    lora = L.read_lora(st_save(state))
    with pytest.raises(L.LoraError, match="FLUX.1"):
        L.add_lora(pipe.transformer, lora, "flux1")
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing half-loaded


def test_not_safetensors_is_refused_without_unpickling(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(L.LoraError, match="not a safetensors file"):
        L.read_lora(path)
    with pytest.raises(L.LoraError, match="not a safetensors file"):
        L.read_lora(b"hello")


def test_nan_weights_are_refused():
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, 32), float("nan")),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
    }
    with pytest.raises(L.LoraError, match="NaN or infinite"):
        L.read_lora(st_save(state), name="nan.safetensors")


def test_unknown_key_format_is_named():
    with pytest.raises(L.LoraError, match="unrecognised LoRA key format"):
        L.read_lora(st_save({"foo.weight": torch.zeros(2, 2)}))


def _built_lora(layer_order, meta_items) -> L.LoraWeights:
    """A LoRA with mixed ranks (a tie: two layers of rank 2, two of rank 4) built from seeded tensors."""
    gen = torch.Generator().manual_seed(7)
    specs = {f"transformer_blocks.{i}.attn.to_q": (2 if i < 2 else 4) for i in range(4)}
    made = {name: L.LoraLayer(down=torch.randn(r, 8, generator=gen), up=torch.randn(8, r, generator=gen), alpha=r)
            for name, r in specs.items()}
    return L.LoraWeights(layers={name: made[name] for name in layer_order}, meta=dict(meta_items))


def test_lora_bytes_are_deterministic(tmp_path):
    import hashlib
    import subprocess
    import sys

    names = [f"transformer_blocks.{i}.attn.to_q" for i in range(4)]
    meta = [("trigger", "zxy_test"), ("preset", "all"), ("base_model", "tiny"), ("tags", {"b", "a", "c"}),
            ("train", {"steps": 10, "lr": 1e-4})]
    first = _built_lora(names, meta)
    again = [L.lora_to_bytes(first) for _ in range(8)]  # safetensors' metadata map changed order call to call
    rebuilt = L.lora_to_bytes(_built_lora(names[::-1], meta[::-1]))
    reordered_nested = L.lora_to_bytes(_built_lora(names, meta[:-1] + [("train", {"lr": 1e-4, "steps": 10})]))
    assert len({*again, rebuilt, reordered_nested}) == 1
    data = again[0]
    assert L.read_lora(data).rank == 4 and L.read_lora(data).meta["tags"] == ["a", "b", "c"]
    assert len(data[8:8 + int.from_bytes(data[:8], "little")]) % 8 == 0
    # and in another process, with another hash seed (set order), the same bytes
    path = tmp_path / "lora.sha"
    code = ("import sys, hashlib; sys.path[:0] = [sys.argv[1]]; import tests.test_lora as t; "
            "names = [f'transformer_blocks.{i}.attn.to_q' for i in range(4)]; "
            "meta = [('trigger', 'zxy_test'), ('preset', 'all'), ('base_model', 'tiny'), ('tags', {'c', 'a', 'b'}), "
            "('train', {'steps': 10, 'lr': 1e-4})]; "
            "open(sys.argv[2], 'w').write(hashlib.sha256(t.L.lora_to_bytes(t._built_lora(names, meta))).hexdigest())")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code, root, str(path)], check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert path.read_text() == hashlib.sha256(data).hexdigest()


def test_exported_lora_bytes_are_deterministic(trained_like):
    lora = trained_like[0]
    shuffled = L.LoraWeights(layers=dict(reversed(list(lora.layers.items()))), meta=dict(reversed(list(lora.meta.items()))))
    for fmt in ("comfyui", "kohya"):
        assert L.export_lora(lora, fmt) == L.export_lora(lora, fmt) == L.export_lora(shuffled, fmt)


# -- the one validator (issue 20): every reader, import and training output goes through it -------------------
def _ab(rank=4, width=32, out=32, prefix="transformer.transformer_blocks.0.attn.to_q"):
    g = torch.Generator().manual_seed(3)
    return {f"{prefix}.lora_A.weight": torch.randn(rank, width, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(out, rank, generator=g)}


def _with_meta(state, **meta) -> bytes:
    return st_save(state, metadata={k: v for k, v in meta.items()})


@pytest.mark.parametrize("alpha, why", [("NaN", "finite"), ("Infinity", "finite"), ("1e30", "scale"),
                                         ("0", "scale"), ("-4", "scale")])
@pytest.mark.reliability("bad_inputs")
def test_alphas_from_peft_metadata_must_be_finite_and_sane(alpha, why):
    data = _with_meta(_ab(), lora_adapter_metadata=f'{{"r": 4, "lora_alpha": {alpha}}}')
    with pytest.raises(L.LoraError, match=why):
        L.read_lora(data, name="alpha.safetensors")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e30])
@pytest.mark.reliability("bad_inputs")
def test_alphas_from_a_comfyui_alpha_tensor_must_be_finite_and_sane(alpha):
    state = {"diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": torch.randn(4, 32),
             "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": torch.randn(32, 4),
             "diffusion_model.double_blocks.0.img_attn.proj.alpha": torch.tensor(alpha)}
    with pytest.raises(L.LoraError, match="alpha"):
        L.read_lora(st_save(state), name="comfy.safetensors")


@pytest.mark.reliability("bad_inputs")
def test_rank_zero_and_rank_mismatch_are_refused_naming_the_layer():
    with pytest.raises(L.LoraError, match=r"transformer_blocks\.0\.attn\.to_q has rank 0"):
        L.read_lora(st_save(_ab(rank=0)))
    state = _ab()
    state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.randn(32, 3)
    with pytest.raises(L.LoraError, match="rank mismatch: A .* has 4 rows, B .* has 3 columns"):
        L.read_lora(st_save(state))


@pytest.mark.parametrize("key, text, match", [
    ("lora_adapter_metadata", "[]", "must be a JSON object, not list"),
    ("lora_adapter_metadata", '"r"', "must be a JSON object, not str"),
    ("lora_adapter_metadata", "{not json", "not valid JSON"),
    ("lora_adapter_metadata", '{"lora_alpha": "eight"}', "`lora_alpha`"),
    ("lora_adapter_metadata", '{"alpha_pattern": [1, 2]}', "`alpha_pattern`"),
    ("klein_style", "[1]", "must be a JSON object"),
    ("klein_style", '{"trigger": 5}', "`trigger`"),
])
@pytest.mark.reliability("bad_inputs")
def test_metadata_of_the_wrong_shape_is_an_error_naming_the_key(key, text, match):
    with pytest.raises(L.LoraError, match=match) as e:
        L.read_lora(_with_meta(_ab(), **{key: text}))
    assert key in str(e.value)


@pytest.mark.reliability("bad_inputs")
def test_the_dtype_policy():
    half = {k: v.to(torch.bfloat16) for k, v in _ab().items()}
    lora = L.read_lora(st_save(half))
    assert all(l.down.dtype == torch.float32 and l.up.dtype == torch.float32 for l in lora.layers.values())
    ints = {k: (v * 10).to(torch.int32) for k, v in _ab().items()}
    with pytest.raises(L.LoraError, match="int32; LoRA tensors must be float32, float16, bfloat16 or float64"):
        L.read_lora(st_save(ints))


@pytest.mark.reliability("bad_inputs")
def test_targets_must_lie_inside_the_served_blocks():
    pipe = load_pipeline("tiny", components=("transformer",))
    inner = pipe.transformer.x_embedder
    lora = L.LoraWeights(layers={"x_embedder": L.LoraLayer(torch.randn(2, inner.in_features),
                                                           torch.randn(inner.out_features, 2), 2.0)})
    with pytest.raises(L.LoraError, match="x_embedder: outside the served blocks"):
        L.check_lora_fits(lora, pipe.transformer)


def test_training_outputs_pass_the_same_validator():
    bad = L.LoraWeights(layers={"transformer_blocks.0.attn.to_q": L.LoraLayer(torch.randn(4, 8), torch.randn(8, 4),
                                                                              float("nan"))})
    with pytest.raises(L.LoraError, match="the LoRA to save.*alpha"):
        L.lora_to_bytes(bad)

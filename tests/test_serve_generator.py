"""The generator's plain part, without Ray: adapters load and go away, groups match single calls, K-LoRA steps."""

import io

import numpy as np
import pytest
from PIL import Image

from cluster.storage import Storage
from klein.generate import generate_image, set_active_loras
from klein.lora import lora_to_bytes
from serve.fusion import klora_layer_scores
from serve.adapter_sets import adapter_set_id, parse_adapter_set_id
from serve.generator import GenerateItem, KleinGenerator
from serve.testing import random_lora


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    storage = Storage.from_uri(tmp_path_factory.mktemp("gen-storage"))
    return KleinGenerator("tiny", storage=storage)


def _stored(gen, name, lora):
    data = lora_to_bytes(lora)
    sha = gen.storage.write_bytes(f"{name}.safetensors", data)
    return {"key": f"{name}.safetensors", "sha256": sha}


def _item(prompt="zxy_test. a house", seed=3, model_id="", weights=(), klora=None):
    return GenerateItem(prompt=prompt, seed=seed, steps=3, width=64, height=64, guidance=4.0,
                        model_id=model_id, adapter_weights=list(weights), klora=klora)


def test_adapter_set_ids_round_trip():
    files = [{"key": "tenants/a/loras/x/lora.safetensors", "sha256": "a" * 64}, {"key": "k2", "sha256": "b" * 64}]
    assert parse_adapter_set_id(adapter_set_id(files)) == files
    assert parse_adapter_set_id("") == []


def test_deleting_adapters_frees_their_parameters(gen):
    base = gen.parameter_count()
    lora = random_lora(gen.pipe.transformer, rank=4, seed=1)
    lora_params = sum(l.down.numel() + l.up.numel() for l in lora.layers.values())
    model_id = adapter_set_id([_stored(gen, "evict", lora)])
    names = gen.load_adapter_set(model_id)
    assert gen.resident_adapters() == names
    assert gen.parameter_count() == base + lora_params
    gen.delete_adapters(names)
    assert gen.resident_adapters() == []
    assert gen.parameter_count() == base


def test_a_group_run_item_by_item_equals_single_generation(gen, tiny_pipe):
    lora = random_lora(gen.pipe.transformer, rank=4, seed=2)
    model_id = adapter_set_id([_stored(gen, "group", lora)])
    names = gen.load_adapter_set(model_id)
    items = [_item(seed=s, model_id=model_id, weights=[0.8]) for s in (1, 2, 3)]
    pngs = gen.run_group(items, names)
    set_active_loras(tiny_pipe, [("ref_group", lora, 0.8)])
    for item, png in zip(items, pngs):
        expected = np.asarray(generate_image(tiny_pipe, item.request()).convert("RGB"))
        assert np.array_equal(_pixels(png), expected)
    set_active_loras(tiny_pipe, [])
    tiny_pipe.transformer.delete_adapters(["ref_group"])
    gen.delete_adapters(names)


def test_klora_with_a_dominant_lora_equals_that_lora_alone(gen):
    big = random_lora(gen.pipe.transformer, rank=4, scale=0.08, seed=3)
    small = random_lora(gen.pipe.transformer, rank=4, scale=0.001, seed=4)
    files = [_stored(gen, "big", big), _stored(gen, "small", small)]
    klora_id = adapter_set_id(files)
    names = gen.load_adapter_set(klora_id)
    scores = klora_layer_scores([big, small])
    klora_png = gen.run_group([_item(model_id=klora_id, weights=[0.9, 1.0], klora={"scores": scores})], names)[0]
    single_id = adapter_set_id(files[:1])
    single_names = gen.load_adapter_set(single_id)
    single_png = gen.run_group([_item(model_id=single_id, weights=[0.9])], single_names)[0]
    base_png = gen.run_group([_item()], [])[0]
    assert np.array_equal(_pixels(klora_png), _pixels(single_png))
    assert not np.array_equal(_pixels(klora_png), _pixels(base_png))
    gen.delete_adapters(names + single_names)


def test_probe_runs_a_real_forward(gen):
    gen.probe()
    original = gen.pipe.transformer.forward
    gen.pipe.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken"))
    try:
        with pytest.raises(RuntimeError):
            gen.probe()
    finally:
        gen.pipe.transformer.forward = original


# -- the accelerated generator (what a GPU replica runs: LoRAs fused into the weights, CFG as a batch of 2) --
@pytest.fixture(scope="module")
def fused_gen(tmp_path_factory):
    storage = Storage.from_uri(tmp_path_factory.mktemp("fused-storage"))
    return KleinGenerator("tiny", storage=storage, accel="exact")


def _close(png_a: bytes, png_b: bytes, tol: int = 2) -> bool:
    return int(np.abs(_pixels(png_a).astype(int) - _pixels(png_b).astype(int)).max()) <= tol


def test_fused_generator_switches_sets_and_matches_the_adapter_generator(gen, fused_gen):
    assert gen.accel is None and fused_gen.accel is not None  # CPU: "auto" keeps peft adapters
    base_params = fused_gen.parameter_count()
    loras = [random_lora(fused_gen.pipe.transformer, rank=4, scale=0.08, seed=s) for s in (11, 12)]
    ids = []
    for i, lora in enumerate(loras):  # the same bytes (one sha256) in both storages
        data = lora_to_bytes(lora)
        shas = {g.storage.write_bytes(f"sw{i}.safetensors", data) for g in (gen, fused_gen)}
        ids.append(adapter_set_id([{"key": f"sw{i}.safetensors", "sha256": shas.pop()}]))
    names = {i: (gen.load_adapter_set(i), fused_gen.load_adapter_set(i)) for i in ids}
    assert fused_gen.resident_adapters() == sorted(n for _, f in names.values() for n in f)
    assert fused_gen.parameter_count() == base_params + sum(l.down.numel() + l.up.numel() for x in loras for l in x.layers.values())
    pngs = []
    for model_id, weight in ((ids[0], 0.8), (ids[1], 1.0), ("", 0.0), (ids[0], 0.8)):
        item = _item(seed=4, model_id=model_id, weights=[weight] if model_id else [])
        ref_names, fused_names = names[model_id] if model_id else ([], [])
        ref = gen.run_group([item], ref_names)[0]
        got = fused_gen.run_group([item], fused_names)[0]
        assert _close(got, ref), model_id
        pngs.append(got)
    assert pngs[0] == pngs[3]  # back to the first set: the very same pixels
    assert len({p for p in pngs}) == 3
    for ref_names, fused_names in names.values():
        gen.delete_adapters(ref_names)
        fused_gen.delete_adapters(fused_names)
    assert fused_gen.resident_adapters() == [] and fused_gen.parameter_count() == base_params


def test_fused_klora_with_a_dominant_lora_equals_that_lora_alone(fused_gen):
    big = random_lora(fused_gen.pipe.transformer, rank=4, scale=0.08, seed=13)
    small = random_lora(fused_gen.pipe.transformer, rank=4, scale=0.001, seed=14)
    files = [_stored(fused_gen, "fbig", big), _stored(fused_gen, "fsmall", small)]
    klora_id = adapter_set_id(files)
    names = fused_gen.load_adapter_set(klora_id)
    scores = klora_layer_scores([big, small])
    # scores computed on the replica from its resident factors agree with the fusion service's
    local = fused_gen.klora_scores(names)
    assert local.keys() == scores.keys()
    assert all(np.allclose(local[k], scores[k], rtol=1e-4) for k in scores)
    klora_png = fused_gen.run_group([_item(model_id=klora_id, weights=[0.9, 1.0], klora={"scores": scores})], names)[0]
    no_scores = fused_gen.run_group([_item(model_id=klora_id, weights=[0.9, 1.0], klora={"scores": None})], names)[0]
    single_id = adapter_set_id(files[:1])
    single_names = fused_gen.load_adapter_set(single_id)
    single_png = fused_gen.run_group([_item(model_id=single_id, weights=[0.9])], single_names)[0]
    base_png = fused_gen.run_group([_item()], [])[0]
    assert klora_png == single_png == no_scores
    assert not np.array_equal(_pixels(klora_png), _pixels(base_png))
    fused_gen.delete_adapters(names + single_names)


def test_fused_generator_probe(fused_gen):
    before = fused_gen.last_ok
    fused_gen.probe()
    assert fused_gen.last_ok > before  # a real forward ran and passed its checks


@pytest.mark.reliability("faults")
def test_an_image_whose_latents_go_non_finite_is_an_error_not_a_black_image(gen):
    """A LoRA that passes the validator (finite weights, a sane alpha) but overflows the model: the
    transformer's output goes inf/NaN, and the generator raises instead of returning an all-black PNG."""
    from serve.generator import NonFiniteOutput

    lora = random_lora(gen.pipe.transformer, rank=4, scale=1e18, seed=9)  # finite, but ΔW ~ 1e36
    names = gen.load_adapter_set(adapter_set_id([_stored(gen, "overflow", lora)]))
    try:
        with pytest.raises(NonFiniteOutput, match="NaN or infinite"):
            gen.run_group([_item(weights=(1.0,))], names)
        assert np.isfinite(_pixels(gen.run_group([_item()], [])[0])).all()  # the base model still works
    finally:
        gen.delete_adapters(names)

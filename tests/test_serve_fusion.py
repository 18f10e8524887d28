"""Fusion math without Ray: the linear merge is exact; K-LoRA picks per the paper's formula."""

import pytest
import torch

from klein.lora import LoraLayer, LoraWeights, lora_to_bytes, read_lora
from klein.model import model_id
from serve.fusion import (FusionError, FusionService, KLoraSchedule, fusion_cache_key, klora_choose,
                          klora_layer_scores, klora_time_scale, linear_merge, prepare_import, topk_abs_sum)
from serve.testing import random_lora


def _layer(out_f, in_f, r, alpha, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return LoraLayer(down=torch.randn(r, in_f, generator=g) * scale, up=torch.randn(out_f, r, generator=g) * scale, alpha=alpha)


def _lora(seed, rank=3, alpha=6.0, scale=1.0, names=("a.q", "a.k", "b.out")):
    shapes = {"a.q": (12, 8), "a.k": (12, 8), "b.out": (5, 12)}
    return LoraWeights(layers={n: _layer(*shapes[n], rank, alpha, seed + i, scale) for i, n in enumerate(names)})


def test_linear_merge_equals_the_dense_weighted_sum():
    a, b, c = _lora(0, rank=2, alpha=4.0), _lora(10, rank=3, alpha=3.0), _lora(20, rank=5, alpha=1.0, names=("a.q",))
    weights = [0.7, -0.3, 1.5]
    merged = linear_merge([a, b, c], weights)
    for name, layer in merged.layers.items():
        dense = sum(w * l.layers[name].delta() for l, w in zip((a, b, c), weights) if name in l.layers)
        assert torch.allclose(layer.delta(), dense, atol=1e-5), name
    assert merged.layers["a.q"].rank == 2 + 3 + 5  # rank adds up: factors are stacked, never densified
    assert merged.layers["b.out"].rank == 2 + 3
    assert merged.layers["a.q"].scale == 1.0


def test_topk_abs_sum_matches_brute_force():
    layer = _layer(12, 8, 3, 6.0, 1)
    dense = layer.delta().abs().flatten().sort(descending=True).values
    assert topk_abs_sum(layer, 9) == pytest.approx(float(dense[:9].sum()), rel=1e-5)
    assert topk_abs_sum(layer, 10_000) == pytest.approx(float(dense.sum()), rel=1e-5)  # k capped at numel


def test_klora_scores_use_k_as_the_product_of_ranks():
    a, b = _lora(0, rank=2), _lora(5, rank=3)
    scores = klora_layer_scores([a, b])
    for name in a.layers:
        k = 2 * 3
        assert scores[name][0] == pytest.approx(topk_abs_sum(a.layers[name], k), rel=1e-6)
        assert scores[name][1] == pytest.approx(topk_abs_sum(b.layers[name], k), rel=1e-6)


def test_klora_chooses_the_larger_scaled_topk_sum_at_every_layer_and_step():
    a, b = _lora(0, rank=2, scale=1.0), _lora(5, rank=2, scale=0.9)
    scores = klora_layer_scores([a, b])
    steps, alpha, beta, gamma = 8, 1.5, 0.5, 1.0
    schedule = KLoraSchedule.build(scores, steps, alpha, beta, gamma)
    switched = False
    for step in range(steps):
        scale = alpha * step / steps + beta
        for layer, chosen in zip(schedule.layers, schedule.choices[step]):
            s_content, s_style = scores[layer][0] / gamma, scores[layer][1] * scale
            expected = 0 if s_content >= s_style else 1
            assert chosen == expected, (layer, step)
            switched |= step > 0 and chosen != schedule.choices[0][schedule.layers.index(layer)]
    assert switched, "with comparable LoRAs the growing style scale must flip some layer to the style LoRA"


def test_klora_weights_at_a_step_keep_only_the_chosen_lora():
    schedule = KLoraSchedule(layers=["x", "y"], choices=[[0, 1], [1, 1]])
    assert schedule.weights_at(0, [0.8, 1.2]) == {"x": [0.8, 0.0], "y": [0.0, 1.2]}
    assert schedule.weights_at(1, [0.8, 1.2]) == {"x": [0.0, 1.2], "y": [0.0, 1.2]}


def test_klora_three_loras_and_time_scale():
    assert klora_time_scale(0.0) == 0.5 and klora_time_scale(0.5) == pytest.approx(1.25)
    assert klora_choose([10.0, 4.0, 6.0], 0.0) == 0  # 10 vs 2 vs 3
    assert klora_choose([10.0, 4.0, 6.0], 0.99) == 2  # late: 10 vs 7.9 vs 11.9
    assert klora_choose([10.0, 4.0, 4.5], 0.99) == 0  # 10 vs 7.9 vs 8.9
    assert klora_choose([1.0, 1.0], 0.0, gamma=1.0) == 0  # 1 vs 0.5
    assert klora_choose([1.0, 1.0], 0.5) == 1  # 1 vs 1.25


def test_klora_refuses_one_or_four_loras():
    with pytest.raises(FusionError):
        klora_layer_scores([_lora(0)])
    with pytest.raises(FusionError):
        klora_layer_scores([_lora(i) for i in range(4)])


def test_fusion_cache_key_depends_on_contents_weights_and_method():
    k = fusion_cache_key(["a" * 64, "b" * 64], [1.0, 0.5], "linear")
    assert k == fusion_cache_key(["a" * 64, "b" * 64], [1.0, 0.5], "linear")
    assert k != fusion_cache_key(["a" * 64, "b" * 64], [1.0, 0.6], "linear")
    assert k != fusion_cache_key(["a" * 64, "b" * 64], [1.0, 0.5], "klora")
    assert k != fusion_cache_key(["b" * 64, "a" * 64], [1.0, 0.5], "linear")


def test_fusion_service_caches_and_verifies(tmp_path):
    from cluster.storage import IntegrityError, Storage, sha256_bytes
    from klein.lora import lora_to_bytes, read_lora

    storage = Storage.from_uri(tmp_path)
    specs = []
    for i in range(2):
        data = lora_to_bytes(_lora(i))
        storage.write_bytes(f"l{i}.safetensors", data)
        specs.append({"id": f"l{i}", "key": f"l{i}.safetensors", "sha256": sha256_bytes(data), "weight": 0.5 + i})
    service = FusionService(storage)
    first = service.linear(specs)
    assert not first["cached"] and service.linear(specs)["cached"]
    merged = read_lora(storage.read_verified(first["key"], first["sha256"]))
    expected = linear_merge([_lora(0), _lora(1)], [0.5, 1.5])
    for name in expected.layers:
        assert torch.allclose(merged.layers[name].delta(), expected.layers[name].delta(), atol=1e-5)
    assert not service.klora_scores(specs)["cached"] and service.klora_scores(specs)["cached"]
    bad = [dict(specs[0], sha256="0" * 64), specs[1]]
    with pytest.raises(IntegrityError):
        FusionService(storage).linear(bad)


def test_blockwise_topk_sums_are_exact():
    from serve.fusion import topk_abs_sums

    g = torch.Generator().manual_seed(7)
    cases = [torch.randn(3, 300, 500, generator=g),  # n = 150000 (not a multiple of the block: padded)
             torch.randint(-5, 6, (2, 128, 512), generator=g).float()]  # many ties
    spiky = torch.randn(2, 256, 256, generator=g) * 1e-3
    spiky[0, 7, :40] = 50.0  # all of the top-k in one block
    spiky[1, :, 3] = -9.0  # or spread over every row
    cases.append(spiky)
    for deltas in cases:
        for k in (1, 16, 33):
            brute = deltas.abs().flatten(1).sort(dim=1, descending=True).values[:, :k].sum(dim=1).double()
            for block, fan in ((64, 32), (16, 4), (8, 2)):  # small groups: several pyramid levels
                got = topk_abs_sums(deltas, k, block=block, fan=fan)
                assert torch.allclose(got, brute, rtol=1e-6), (deltas.shape, k, block, fan)


def test_klora_scores_batched_equal_the_per_layer_reference_on_larger_layers():
    shapes = {"a.q": (96, 200), "b.q": (96, 200), "c.out": (64, 160)}
    loras = []
    for seed, r in ((1, 8), (2, 6)):
        g = torch.Generator().manual_seed(seed)
        loras.append(LoraWeights(layers={n: LoraLayer(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 4.0)
                                         for n, (o, i) in shapes.items()}))
    scores = klora_layer_scores(loras, device="cpu")
    for name in shapes:
        for i, lora in enumerate(loras):
            assert scores[name][i] == pytest.approx(topk_abs_sum(lora.layers[name], 48), rel=1e-5)


def test_klora_scores_go_to_the_generator_only_when_fusion_has_no_gpu_and_the_generator_has_one():
    from serve.fusion import scores_place

    assert scores_place("auto", holds_gpu=False, generator_device="cuda") == "generator"
    assert scores_place("auto", holds_gpu=False, generator_device="cuda:0") == "generator"
    assert scores_place("auto", holds_gpu=True, generator_device="cuda") == "fusion"  # a Fusion GPU of its own
    assert scores_place("auto", holds_gpu=False, generator_device="cpu") == "fusion"  # the CPU-only setup
    assert scores_place("fusion", holds_gpu=False, generator_device="cuda") == "fusion"
    assert scores_place("generator", holds_gpu=True, generator_device="cpu") == "generator"
    with pytest.raises(FusionError, match="klora_scores_on must be one of auto, fusion, generator"):
        scores_place("gpu", holds_gpu=False, generator_device="cpu")


def test_fusion_service_leaves_klora_scores_to_the_generator(tmp_path):
    from cluster.storage import Storage

    # the files are not even read: the generator reads them (sha256-checked) and scores its resident adapters
    specs = [{"id": f"l{i}", "key": f"missing{i}.safetensors", "sha256": "0" * 64, "weight": 1.0} for i in range(2)]
    service = FusionService(Storage.from_uri(tmp_path), scores_on="generator")
    assert service.klora_scores(specs) == {"scores": None, "cached": False, "scores_on": "generator"}
    with pytest.raises(FusionError, match="2 to 3"):
        service.klora_scores(specs[:1])


def test_fusion_deployment_picks_where_scores_are_computed(tmp_path):
    from serve.config import ServeConfig, ServeConfigError
    from serve.fusion import Fusion

    def service(**config):
        return Fusion.func_or_class({"storage": str(tmp_path), **config}).service

    # without Ray (and so without a GPU of its own) the replica computes on the CPU unless the generator has CUDA
    tiny = service()
    assert (tiny.scores_on, tiny.device) == ("fusion", "cpu")
    assert service(device="cuda").scores_on == "generator"
    assert service(device="cuda", klora_scores_on="fusion").scores_on == "fusion"
    with pytest.raises(ServeConfigError, match="klora_scores_on must be one of auto, fusion, generator, got 'gpu'"):
        ServeConfig.from_any({"klora_scores_on": "gpu"})


# -- guards: no input makes the fusion math endless (issue 20) -------------------------------------------------
def test_topk_with_k_zero_is_refused_at_once_not_an_endless_pyramid():
    from klein.fusion import topk_abs_sums

    deltas = torch.randn(2, 300, 500)
    with pytest.raises(FusionError, match="k >= 1"):
        topk_abs_sums(deltas, 0)
    with pytest.raises(FusionError, match="fan >= 2"):
        topk_abs_sums(deltas, 4, block=64, fan=1)


def test_klora_refuses_rank_zero_and_mismatched_factors_before_any_work():
    a = _lora(0, rank=2)
    zero = LoraWeights(layers={"a.q": LoraLayer(torch.zeros(0, 8), torch.zeros(12, 0), 1.0)})
    with pytest.raises(FusionError, match="rank must be >= 1"):
        klora_layer_scores([a, zero])
    mismatched = LoraWeights(layers={"a.q": LoraLayer(torch.randn(3, 8), torch.randn(12, 2), 3.0)})
    with pytest.raises(FusionError, match="A's rows equal B's columns"):
        klora_layer_scores([a, mismatched])
    with pytest.raises(FusionError, match="rank must be >= 1"):
        linear_merge([a, zero], [1.0, 1.0])
    nan_alpha = LoraWeights(layers={"a.q": LoraLayer(torch.randn(2, 8), torch.randn(12, 2), float("nan"))})
    with pytest.raises(FusionError, match="not finite"):
        klora_layer_scores([a, nan_alpha])


def test_klora_work_is_bounded(monkeypatch):
    import klein.fusion as fusion_math

    a, b = _lora(0, rank=3), _lora(5, rank=3)
    monkeypatch.setattr(fusion_math, "KLORA_MAX_K", 8)  # k = 3 * 3 = 9
    with pytest.raises(FusionError, match="product of the ranks"):
        klora_layer_scores([a, b])
    monkeypatch.setattr(fusion_math, "KLORA_MAX_K", 1 << 22)
    monkeypatch.setattr(fusion_math, "KLORA_MAX_ENTRIES", 100)
    with pytest.raises(FusionError, match="ΔW entries"):
        klora_layer_scores([a, b])


def test_schedule_refuses_absurd_steps_and_constants():
    scores = klora_layer_scores([_lora(0), _lora(5)])
    with pytest.raises(FusionError, match="steps"):
        KLoraSchedule.build(scores, 0)
    with pytest.raises(FusionError, match="gamma"):
        KLoraSchedule.build(scores, 4, gamma=0.0)


def test_an_uploaded_lora_is_checked_and_rewritten_where_torch_is(tiny_pipe):
    """`prepare_import`, what the Fusion replica runs for POST /v1/loras/import: the tenant's trigger wins over the
    file's, the file's is taken (and checked) when the tenant gave none, a file that does not fit is an answer
    naming the field, and what comes back is our format, read back layer for layer."""
    lora = random_lora(tiny_pipe.transformer, rank=4)
    upload = lora_to_bytes(LoraWeights(layers=lora.layers, meta={"trigger": "zxy_file"}))
    mine = prepare_import(upload, "zxy_mine", "tiny")
    assert (mine["trigger"], mine["rank"], mine["layers"], mine["base_model"]) == ("zxy_mine", 4, len(lora.layers), model_id("tiny"))
    stored = read_lora(mine["lora"])
    assert stored.meta["trigger"] == "zxy_mine" and stored.meta["imported"] is True
    assert all(torch.equal(stored.layers[k].up, lora.layers[k].up) for k in lora.layers)
    assert prepare_import(upload, None, "tiny")["trigger"] == "zxy_file"
    common_word = lora_to_bytes(LoraWeights(layers=lora.layers, meta={"trigger": "art"}))
    assert prepare_import(common_word, None, "tiny")["field"] == "trigger"
    one_layer = next(iter(lora.layers))
    too_wide = LoraWeights(layers={one_layer: LoraLayer(down=torch.zeros(4, 7), up=torch.zeros(7, 4), alpha=4.0)}, meta={})
    answer = prepare_import(lora_to_bytes(too_wide), "zxy_mine", "tiny")
    assert answer["field"] == "lora" and "does not fit this model" in answer["error"], answer

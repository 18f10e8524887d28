"""klein.accel: the training levers leave the loss as it was; the serving path (fused LoRAs, CFG batch, fast
mode) computes what the peft path computes, and switching LoRAs is exact. CPU: nothing compiles here."""

import numpy as np
import pytest
import torch

from klein.accel import FusedLoras, StepCache, prepare_for_inference, prepare_for_training
from klein.generate import GenerateRequest, denoise, generate_image, set_active_loras
from klein.model import load_pipeline
from serve.testing import random_lora
from train.loop import flow_matching_loss, lora_parameters, setup_transformer
from train.optim import make_optimizer
from train.recipe import TrainConfig


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 128, 4, 4, generator=g)
    return x0, torch.randn(1, 8, 96, generator=g), torch.tensor([0.6]), torch.randn(x0.shape, generator=g)


def _pair(fp8=False):
    cfg = TrainConfig(model="tiny", steps=10)
    plain = setup_transformer(cfg, torch.device("cpu"))
    fast = setup_transformer(cfg, torch.device("cpu"))
    info = prepare_for_training(fast, "cpu", fp8=fp8)
    return cfg, plain, fast, info


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_prepared_training_gives_the_plain_loss_and_gradients(tiny_dir, autocast):
    cfg, plain, fast, info = _pair()
    assert info["levers"] == ["no peft input upcast"] and "compiled_blocks" not in info  # CPU: no compile
    x0, embeds, sigmas, noise = _batch()
    if embeds.shape[-1] != plain.config.joint_attention_dim:
        embeds = torch.randn(1, 8, plain.config.joint_attention_dim, generator=torch.Generator().manual_seed(5))
    losses = []
    for model in (plain, fast):
        loss = flow_matching_loss(model, x0, embeds, sigmas, noise, autocast)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, a), b in zip(lora_parameters(plain).items(), lora_parameters(fast).values()):
        assert torch.equal(a.grad, b.grad), n


def test_prepared_training_trains_like_the_plain_path(tiny_dir):
    cfg, plain, fast, _ = _pair()
    x0, _, sigmas, noise = _batch()
    embeds = torch.randn(1, 8, plain.config.joint_attention_dim, generator=torch.Generator().manual_seed(5))
    opts = [make_optimizer(list(lora_parameters(m).values()), cfg, "cpu", grouped=g) for m, g in ((plain, False), (fast, True))]
    for _ in range(3):
        for model, opt in zip((plain, fast), opts):
            flow_matching_loss(model, x0, embeds, sigmas, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(lora_parameters(plain).values(), lora_parameters(fast).values()):
        assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_fp8_training_stays_close_to_bf16_and_learns(tiny_dir):
    cfg, plain, fast, info = _pair(fp8=True)
    assert info["fp8_linears"] > 0 and not info["fp8_native"]
    x0, _, sigmas, noise = _batch()
    embeds = torch.randn(1, 8, plain.config.joint_attention_dim, generator=torch.Generator().manual_seed(5))
    ref = flow_matching_loss(plain, x0, embeds, sigmas, noise).item()
    opt = make_optimizer(list(lora_parameters(fast).values()), cfg, "cpu")
    losses = []
    for _ in range(6):
        loss = flow_matching_loss(fast, x0, embeds, sigmas, noise, torch.bfloat16)
        loss.backward()
        grads = {n: p.grad for n, p in lora_parameters(fast).items()}
        assert all(g is not None for g in grads.values())  # the gradient reaches every LoRA through the fp8 base
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (lora_A's is 0 while B is 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - ref) / ref < 0.05
    assert losses[-1] < losses[0]


# -- serving ---------------------------------------------------------------------------------------------
REQ = GenerateRequest(prompt="zxy_test. a house by the sea", seed=5, steps=5, width=64, height=64, guidance=4.0)


def _pixels(image):
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_our_loop_unbatched_is_the_pipeline_call(tiny_dir):
    pipe = load_pipeline("tiny")
    for req in (REQ, GenerateRequest(**{**REQ.__dict__, "negative_prompt": "blurry"}),
                GenerateRequest(**{**REQ.__dict__, "guidance": 1.0})):
        assert np.array_equal(_pixels(denoise(pipe, req, batch_cfg=False)), _pixels(generate_image(pipe, req)))
    batched = _pixels(denoise(pipe, REQ, batch_cfg=True))
    assert np.abs(batched - _pixels(generate_image(pipe, REQ))).max() <= 2
    # CFG's negative prompt comes from the pipeline's prompt cache (klein.generate.encoded_prompts): a request drawn
    # again encodes only its own prompt
    encodings = []
    hook = pipe.text_encoder.register_forward_hook(lambda module, args, out: encodings.append(1))
    try:
        again = _pixels(denoise(pipe, REQ, batch_cfg=True))
    finally:
        hook.remove()
    assert len(encodings) == 1 and np.array_equal(again, batched)


def test_fused_generation_matches_the_peft_adapter_path(tiny_dir):
    ref_pipe, pipe = load_pipeline("tiny"), load_pipeline("tiny")
    a = random_lora(pipe.transformer, rank=4, scale=0.08, seed=1)
    b = random_lora(pipe.transformer, rank=4, scale=0.08, seed=2)
    accel = prepare_for_inference(pipe, loras=[("a", a, 0.8)])
    assert not accel.compiled and accel.batch_cfg and accel.step_cache is None
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())  # no peft wrappers
    for active in ([("a", a, 0.8)], [("a", a, 0.6), ("b", b, 1.2)], []):
        set_active_loras(ref_pipe, active)
        set_active_loras(pipe, active)
        expected, got = _pixels(generate_image(ref_pipe, REQ)), _pixels(generate_image(pipe, REQ))
        assert np.abs(got - expected).max() <= 2, active
    set_active_loras(pipe, [("a", None, 0.8)])
    assert not np.array_equal(_pixels(generate_image(pipe, REQ)), expected)  # a LoRA changes the picture


def test_switching_is_exact_and_reversible(tiny_dir):
    pipe = load_pipeline("tiny")
    t = pipe.transformer
    pristine = {k: v.clone() for k, v in t.state_dict().items()}
    accel = prepare_for_inference(pipe)
    bank: FusedLoras = accel.loras
    a = random_lora(t, rank=4, scale=0.1, seed=1)
    b = random_lora(t, rank=2, scale=0.1, seed=2, preset="single_blocks")
    bank.add("a", a)
    bank.add("b", b)
    assert bank.names() == ["a", "b"]
    assert bank.parameter_count() == sum(l.down.numel() + l.up.numel() for x in (a, b) for l in x.layers.values())
    bank.activate([("a", 0.7)])
    fused_a = {k: v.clone() for k, v in t.state_dict().items()}
    name = "transformer_blocks.0.attn.to_q"
    expected = pristine[name + ".weight"] + 0.7 * a.layers[name].delta()
    assert torch.allclose(fused_a[name + ".weight"], expected, atol=1e-6)
    for pairs in ([("b", 1.0)], [("a", 0.3), ("b", -1.0)], [("a", 0.7)] * 0 + [("b", 2.0)]):
        bank.activate(pairs)
    bank.activate([("a", 0.7)])
    assert all(torch.equal(v, fused_a[k]) for k, v in t.state_dict().items())  # exactly, however often it switched
    single = "single_transformer_blocks.0.attn.to_out"
    bank.activate([("a", 0.5), ("b", 1.5)])
    both = pristine[single + ".weight"] + 0.5 * a.layers[single].delta() + 1.5 * b.layers[single].delta()
    assert torch.allclose(t.state_dict()[single + ".weight"], both, atol=1e-6)
    bank.activate([])
    assert all(torch.equal(v, pristine[k]) for k, v in t.state_dict().items())
    bank.activate([("b", 1.0)])
    bank.delete(["b"])  # deleting an active adapter puts its layers back
    assert all(torch.equal(v, pristine[k]) for k, v in t.state_dict().items())
    bank.delete(["a"])
    assert bank.names() == [] and bank.parameter_count() == 0 and not bank.pristine
    with pytest.raises(KeyError):
        bank.activate([("a", 1.0)])


def test_peft_adapters_already_loaded_are_taken_over(tiny_dir):
    ref_pipe, pipe = load_pipeline("tiny"), load_pipeline("tiny")
    lora = random_lora(pipe.transformer, rank=4, scale=0.08, seed=3)
    set_active_loras(pipe, [("style", lora, 1.0)])
    set_active_loras(ref_pipe, [("style", lora, 1.0)])
    accel = prepare_for_inference(pipe)
    assert accel.loras.names() == ["style"] and not getattr(pipe.transformer, "peft_config", None)
    set_active_loras(pipe, [("style", None, 1.0)])
    assert np.abs(_pixels(generate_image(pipe, REQ)) - _pixels(generate_image(ref_pipe, REQ))).max() <= 2


def test_fast_mode_fp8_and_step_cache(tiny_dir):
    exact_pipe, pipe = load_pipeline("tiny"), load_pipeline("tiny")
    lora = random_lora(pipe.transformer, rank=4, scale=0.08, seed=4)
    prepare_for_inference(exact_pipe, loras=[("s", lora, 1.0)])
    accel = prepare_for_inference(pipe, loras=[("s", lora, 1.0)], mode="fast", step_cache=StepCache(warmup=2, cooldown=1, interval=2))
    assert accel.fp8 and accel.step_cache.computed_steps(10) == 7
    req = GenerateRequest(**{**REQ.__dict__, "steps": 10})
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    fast = _pixels(generate_image(pipe, req))
    hook.remove()
    assert len(calls) == 7  # cached steps run no transformer
    exact = _pixels(generate_image(exact_pipe, req))
    assert np.isfinite(fast).all() and np.abs(fast - exact).mean() < 12
    # switching works on the float8 weights too: back to the base and to the LoRA again, reproducibly
    set_active_loras(pipe, [])
    base = _pixels(generate_image(pipe, req))
    set_active_loras(pipe, [("s", None, 1.0)])
    assert np.array_equal(_pixels(generate_image(pipe, req)), fast) and not np.array_equal(base, fast)


def test_step_cache_schedule():
    c = StepCache()
    assert [c.computes(i, 50) for i in range(8)] == [True] * 5 + [True, False, True]
    assert c.computes(48, 50) and c.computes(49, 50)
    assert c.computed_steps(50) == 29


def test_switching_mode_exact_fast_exact_keeps_the_fused_weights(tiny_dir):
    from klein.accel import set_inference_mode
    from klein.fp8 import Float8Linear

    pipe = load_pipeline("tiny")
    t = pipe.transformer
    pristine = {k: v.clone() for k, v in t.state_dict().items()}
    lora = random_lora(t, rank=4, scale=0.1, seed=6, preset="attention")
    prepare_for_inference(pipe, loras=[("a", lora, 0.9)])
    fused = {k: v.clone() for k, v in t.state_dict().items()}
    accel = set_inference_mode(pipe, "fast")
    assert accel.fp8 and accel.step_cache is not None
    assert all(isinstance(t.get_submodule(n), Float8Linear) for n in accel.loras.pristine)
    set_active_loras(pipe, [])  # float8 weights requantised from the pristine copies
    set_active_loras(pipe, [("a", None, 0.9)])
    accel = set_inference_mode(pipe, "exact")
    assert not accel.fp8 and accel.step_cache is None
    assert t.state_dict().keys() == fused.keys()
    assert all(torch.equal(v, fused[k]) for k, v in t.state_dict().items())
    set_active_loras(pipe, [])
    assert all(torch.equal(v, pristine[k]) for k, v in t.state_dict().items())


def test_input_prefetcher_gives_the_loop_exactly_its_batches(tiny_dir):
    from klein.accel import InputPrefetcher
    from train.cache import CachedItem, TrainingData
    from train.loop import StepPlan, make_batch

    g = torch.Generator().manual_seed(0)
    items = [CachedItem(f"r{i}", "c", (64, 64), torch.randn(128, 4, 4, generator=g), torch.randn(8, 96, generator=g)) for i in range(5)]
    data = TrainingData("k", items, torch.randn(8, 96, generator=g), "m", 64)
    plan = StepPlan(items, 2, 1, seed=3)
    fetch = InputPrefetcher(lambda i: make_batch(plan, data, i, 0, 0.3), "cpu")
    reference = StepPlan(items, 2, 1, seed=3)
    try:
        for i in range(1, 9):
            got = fetch(i, next_index=i + 1 if i < 8 else None)
            want = make_batch(reference, data, i, 0, 0.3)
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(got, want))
        assert fetch(3)[0].shape == want[0].shape  # an index out of order is made on demand
    finally:
        fetch.close()

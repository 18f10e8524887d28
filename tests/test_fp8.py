"""float8 frozen base (klein.fp8): the quantisation math, the matmul convention, the Linear and its gradient."""

import pytest
import torch
from torch import nn

from klein.fp8 import (E4M3, E4M3_MAX, Float8Linear, block_linear_names, convert_to_fp8, dequantize, quantize_rowwise,
                       scaled_matmul)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_quantisation_error_is_bounded_per_element():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different scale
    x[3] = 0.0  # an all-zero row stays zero
    q, scale = quantize_rowwise(x)
    assert q.dtype == E4M3 and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert q.float().abs().amax(dim=1)[torch.arange(64) != 3].allclose(torch.full((63,), E4M3_MAX))  # each row uses the full range
    back = dequantize(q, scale)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values; absolute <= scale * 2^-9 for subnormals
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-9) * 1.0001
    assert ((back - x).abs() <= bound).all()
    assert back[3].eq(0).all()
    assert _rel(back, x) < 0.04


def test_emulated_scaled_matmul_follows_torch_scaled_mm_convention():
    """Our emulation and torch._scaled_mm (CPU kernel, where this torch has it) compute the same product."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    aq, sa = quantize_rowwise(a)
    bq, sb = quantize_rowwise(b)
    emulated = scaled_matmul(aq, sa, bq, sb, torch.float32)
    exact_of_quantised = dequantize(aq, sa) @ dequantize(bq, sb).t()
    assert torch.allclose(emulated, exact_of_quantised)
    assert _rel(emulated, a @ b.t()) < 0.08
    try:
        native = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no CPU _scaled_mm here: {e}")
    assert _rel(native, exact_of_quantised) < 1e-2  # bf16 output rounding


def test_float8_linear_forward_and_input_gradient():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    f8 = Float8Linear.from_linear(lin, trainable_input=True)
    assert isinstance(f8, nn.Linear) and not any(True for _ in f8.parameters())  # frozen: buffers only
    assert (f8.in_features, f8.out_features) == (64, 48)
    x = torch.randn(2, 10, 64, generator=g, requires_grad=True)
    gy = torch.randn(2, 10, 48, generator=g)
    y = f8(x)
    assert y.shape == (2, 10, 48) and y.dtype == torch.bfloat16
    y.float().backward(gy)
    x_ref = x.detach().clone().requires_grad_(True)
    (lin(x_ref) * gy).sum().backward()
    assert _rel(y, lin(x)) < 0.08
    assert x.grad.dtype == x.dtype and _rel(x.grad, x_ref.grad) < 0.08
    # the backward's matmul is q(gy) @ q(W) with W quantised per input column: check it exactly
    gq, gs = quantize_rowwise(gy.to(torch.bfloat16).reshape(-1, 48))  # y is bf16: so is its gradient
    expected = (dequantize(gq, gs) @ dequantize(f8.weight_t_fp8, f8.weight_t_scale).t()).to(torch.bfloat16)
    assert torch.equal(x.grad.reshape(-1, 64), expected.float())


def test_float8_linear_inference_keeps_one_copy_and_requantises_in_place():
    lin = nn.Linear(32, 16, bias=True)
    f8 = Float8Linear.from_linear(lin)
    assert f8.weight_t_fp8 is None and f8.bias is not None
    ptr = f8.weight_fp8.data_ptr()
    f8.load_weight(torch.ones(16, 32))
    assert f8.weight_fp8.data_ptr() == ptr and torch.allclose(f8.dequantized_weight(), torch.ones(16, 32))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    xq, xs = quantize_rowwise(x)
    with torch.no_grad():
        expected = (dequantize(xq, xs) @ torch.ones(32, 16)).to(torch.bfloat16) + lin.bias.to(torch.bfloat16)
        assert torch.equal(f8(x), expected)


def test_convert_keeps_the_lora_and_replaces_only_the_base(tiny_dir):
    from klein.lora import lora_config
    from klein.model import load_transformer

    torch.manual_seed(0)
    t = load_transformer("tiny")
    t.requires_grad_(False)
    t.add_adapter(lora_config(t, rank=4, alpha=4), adapter_name="default")
    names = block_linear_names(t)
    assert names and all(n.endswith(".base_layer") for n in names)
    lora_before = {n: p.clone() for n, p in t.named_parameters() if p.requires_grad}
    n = convert_to_fp8(t, trainable_input=True)
    assert n == len(names)
    assert all(isinstance(t.get_submodule(name), Float8Linear) for name in names)
    assert {n: p for n, p in t.named_parameters() if p.requires_grad}.keys() == lora_before.keys()
    assert t.dtype == torch.float32  # the model's dtype is still its full-precision parameters'
    assert convert_to_fp8(t) == 0  # idempotent

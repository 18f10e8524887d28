"""A frozen Linear in float8 (e4m3) for the Klein transformer's base weights: training and fast inference.

The base model never trains, so its weights can live in float8 e4m3 with one float32 scale per row
(`quantize_rowwise`), and its matmuls run on Hopper's fp8 tensor cores through `torch._scaled_mm` with
row-wise scales: the activations are quantised per token on the fly. The LoRA path is untouched: peft's
`lora_A`/`lora_B` stay in their own dtype (float32 weights under bf16 autocast), only the wrapped
`base_layer` is replaced.

    y  = x @ Wᵀ          as  q(x) · sx  @  (q(W) · sW)ᵀ          W quantised per output row
    gx = gy @ W          as  q(gy) · sg @  (q(Wᵀ) · sWᵀ)ᵀ        Wᵀ quantised per input column (training only)

No weight gradient exists (the base is frozen), so nothing of the activations is saved for the backward.
Training keeps both fp8 copies (1 byte each per weight: the same memory as bf16); inference keeps one.
On CPU, or on a GPU without fp8 (before compute capability 8.9), the same arithmetic runs emulated in
float32 (dequantise, matmul), which is what the CPU tests check the math against.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12


def fp8_supported(device) -> bool:
    """Whether `torch._scaled_mm` runs natively here (CUDA, compute capability ≥ 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] → (q in e4m3 [..., K], scale float32 [..., 1]) with x ≈ q · scale, |q| ≤ 448 per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=_TINY) / E4M3_MAX
    q = (xf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def scaled_matmul(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype=torch.bfloat16, fast_accum: bool = False, native: bool | None = None) -> torch.Tensor:
    """(aq·a_scale) @ (bq·b_scale)ᵀ: aq [M, K] and bq [N, K] in e4m3 (row-major), scales [M, 1] and [N, 1].

    `torch._scaled_mm` with row-wise scales on CUDA (needs K and N multiples of 16), float32 emulation elsewhere
    (`native=None`: decide from the tensor's device).
    """
    if native is None:
        native = aq.is_cuda and fp8_supported(aq.device)
    if native:
        return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return (dequantize(aq, a_scale) @ dequantize(bq, b_scale).t()).to(out_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with W frozen in fp8; the backward gives the input gradient only (in fp8 too)."""

    @staticmethod
    def forward(ctx, x, wq, w_scale, wtq, wt_scale, native):
        shape = x.shape
        xq, x_scale = quantize_rowwise(x.reshape(-1, shape[-1]))
        y = scaled_matmul(xq, x_scale, wq, w_scale, torch.bfloat16, fast_accum=True, native=native)
        ctx.save_for_backward(wtq, wt_scale)
        ctx.x_dtype = x.dtype
        ctx.native = native
        return y.view(*shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, gy):
        wtq, wt_scale = ctx.saved_tensors
        shape = gy.shape
        gq, g_scale = quantize_rowwise(gy.reshape(-1, shape[-1]))
        gx = scaled_matmul(gq, g_scale, wtq, wt_scale, torch.bfloat16, fast_accum=False, native=ctx.native)
        return gx.view(*shape[:-1], wtq.shape[0]).to(ctx.x_dtype), None, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored in e4m3 with row-wise scales (buffers, not parameters).

    `trainable_input=True` also keeps Wᵀ quantised per input column for the input-gradient matmul of
    training; inference needs only W. The output is bfloat16 (fp8 matmuls write bf16). It is an `nn.Linear`
    to every isinstance check (in/out features, LoRA shape checks) but has no `weight` parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None,
                 trainable_input: bool = False, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: no full-precision weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.trainable_input = trainable_input
        self.native = fp8_supported(device) if device is not None else False  # torch._scaled_mm, else emulated
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if trainable_input:
            self.register_buffer("weight_t_fp8", torch.empty(in_features, out_features, dtype=E4M3, device=device))
            self.register_buffer("weight_t_scale", torch.ones(in_features, 1, dtype=torch.float32, device=device))
        else:
            self.weight_t_fp8 = self.weight_t_scale = None
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, trainable_input: bool = False) -> "Float8Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias, trainable_input, device=w.device)
        module.load_weight(w)
        return module

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor, quantize=quantize_rowwise) -> None:
        """(Re)quantise a full-precision weight [out, in] into this module's buffers, in place (`quantize`: the
        same function compiled, where the caller has one)."""
        q, s = quantize(weight)
        self.weight_fp8.copy_(q)
        self.weight_scale.copy_(s)
        if self.trainable_input:
            qt, st = quantize_rowwise(weight.t())
            self.weight_t_fp8.copy_(qt)
            self.weight_t_scale.copy_(st)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainable_input and torch.is_grad_enabled() and x.requires_grad:
            y = _Fp8LinearFunction.apply(x, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale,
                                         self.native)
        else:
            shape = x.shape
            xq, x_scale = quantize_rowwise(x.reshape(-1, shape[-1]))
            y = scaled_matmul(xq, x_scale, self.weight_fp8, self.weight_scale, torch.bfloat16, fast_accum=True,
                              native=self.native)
            y = y.view(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise, trainable_input={self.trainable_input}"


def _is_peft_wrapper(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def block_linear_names(transformer) -> list[str]:
    """Every Linear inside the double- and single-stream blocks (the base layer under a peft wrapper)."""
    names = []
    for name, module in transformer.named_modules():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if isinstance(module, nn.Linear) and ".lora_" not in name and not _is_peft_wrapper(module):
            names.append(name)
    return names


def convert_to_fp8(transformer, trainable_input: bool = False, names: list[str] | None = None,
                   on_convert=None) -> int:
    """Replace the block Linears (or `names`) by `Float8Linear`s, in place; returns how many.

    Under a peft LoRA wrapper the `base_layer` is replaced and the LoRA stays as it is. `on_convert(name,
    linear)` is called with each full-precision Linear before it goes (e.g. to keep a pristine copy).
    Layers whose sizes are not multiples of 16 (the fp8 kernels' constraint) are left in full precision.
    """
    names = block_linear_names(transformer) if names is None else names
    n = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        linear = getattr(parent, child)
        if (not isinstance(linear, nn.Linear) or isinstance(linear, Float8Linear) or linear.in_features % 16
                or linear.out_features % 16):
            continue
        if on_convert is not None:
            on_convert(name, linear)
        setattr(parent, child, Float8Linear.from_linear(linear, trainable_input))
        del linear
        n += 1
    return n

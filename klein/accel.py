"""What makes the Klein transformer fast on a GPU, for training and for serving (issue 7; bench/ proves each).

Training (`prepare_for_training`, after the LoRA adapter is added):
  - peft's input upcast off: under bf16 autocast peft would cast every LoRA input to float32 first
    (an extra pass over each activation, for nothing: autocast runs the LoRA matmuls in bf16 anyway);
  - regional `torch.compile` of the 32 blocks (each double/single-stream block compiled, the model around
    them eager), with the attention call itself left eager: with the attention inside the compiled graph
    the training backward faulted on torch 2.11 + CUDA 13 (bench/README.md); around it, compile fuses the
    norms, modulation, RoPE and activations;
  - optionally the frozen base in float8 (`klein.fp8`): the base Linears' matmuls on fp8 tensor cores.
  The optimizer half of the training levers is `train.optim.make_optimizer` (GroupedAdafactor on CUDA).

Serving (`prepare_for_inference(pipe, ...)`, then `klein.generate.set_active_loras` / `generate_image`):
  - LoRAs fused into the weights (`FusedLoras`): no peft wrappers and no LoRA matmuls in the denoiser.
    Several LoRAs stay resident as low-rank factors on the device next to a pristine copy of each base
    weight they touch; switching is W = W₀ + Σ wᵢ·Bᵢ·Aᵢ, one `addmm` per layer from the pristine copy, so it
    is exact (no drift, however often it switches) and takes milliseconds;
  - the blocks compiled as in training;
  - classifier-free guidance as one batch of 2 (cond + uncond) instead of two forwards;
  - mode "fast" adds the fp8 base (weights requantised from the pristine copies at each switch) and step
    caching (`StepCache`: some steps reuse an extrapolation of the last computed velocities).
On CPU nothing is compiled (compile=None means "on CUDA only") and fp8 runs emulated, so tests check the
same code path for correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from klein.fp8 import Float8Linear, block_linear_names, convert_to_fp8, fp8_supported, quantize_rowwise
from klein.lora import LoraLayer, LoraWeights, check_lora_fits

log = logging.getLogger("klein.accel")

INFERENCE_MODES = ("exact", "fast")


# -- shared levers ---------------------------------------------------------------------------------------
def configure_dynamo(limit: int = 32) -> None:
    """Room for a few recompiles per block code object (shapes: resolutions, batch 1 vs CFG batch 2)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < limit:
            setattr(cfg, key, limit)


def keep_attention_eager(enable: bool = True) -> None:
    """Leave diffusers' attention dispatch out of compiled graphs (a graph break around the SDPA call).

    Seen on torch 2.11+cu130, H200: with whole Klein blocks compiled, the training backward faulted (CUDA
    illegal memory access) right after the cuDNN SDPA backward; eager attention never did, and compiling
    everything around it was the fastest variant for training and as fast as whole blocks for inference.
    Process-wide (it patches the module attribute the Flux2 attention processors call); idempotent.
    """
    import diffusers.models.transformers.transformer_flux2 as tf2

    original = getattr(tf2, "_klein_original_dispatch", None) or tf2.dispatch_attention_fn
    tf2._klein_original_dispatch = original
    tf2.dispatch_attention_fn = torch.compiler.disable(original, recursive=True) if enable else original


def disable_peft_input_cast(model) -> int:
    """Stop peft from casting LoRA inputs to the adapter dtype (autocast decides the matmul dtype)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def blocks(transformer) -> list[nn.Module]:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def compile_blocks(transformer, dynamic: bool | None = None) -> int:
    """Regional compilation: `torch.compile` each double- and single-stream block, attention eager.

    Blocks of one kind share one compiled graph (same code, same shapes). `dynamic=None` compiles the first
    shape static and turns dynamic on the first other shape, so a new resolution costs one recompile.
    """
    configure_dynamo()
    keep_attention_eager(True)
    for block in blocks(transformer):
        block.compile(fullgraph=False, dynamic=dynamic)
    return len(blocks(transformer))


def compile_fingerprint(transformer, device, **settings) -> str:
    """A short name for what the compiled graphs depend on: the transformer's configuration, torch and Triton,
    the GPU, and the caller's settings (LoRA rank and targets, fp8, resolution...). Two jobs with the same
    fingerprint compile the same graphs, so the second can load the first's compiled kernels
    (`load_compile_artifacts`). A stale or foreign file only costs misses: torch checks each artifact's own key."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton  # only where a GPU build of torch brought it

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    payload = {"config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
               "torch": torch.__version__, "triton": triton_version, "gpu": gpu, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_compile_artifacts(blob: bytes) -> int:
    """Put another process's compiled graphs and kernels (`compile_artifacts`) into this process's compile caches
    (inductor's FX graph cache, AOTAutograd's cache, Triton's kernels), so `torch.compile` finds them instead of
    compiling; returns how many artifacts were loaded. Dynamo still traces the blocks (seconds), nothing more."""
    info = torch.compiler.load_cache_artifacts(blob)
    return sum(len(keys) for keys in info.artifacts.values()) if info is not None else 0


def compile_artifacts() -> bytes | None:
    """Everything this process compiled so far, as portable bytes (torch's "mega-cache"); None if nothing was."""
    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved is not None else None


def uncompile_blocks(transformer) -> None:
    for block in blocks(transformer):
        block._compiled_call_impl = None


def _want_compile(device, compile: bool | None) -> bool:
    return torch.device(device).type == "cuda" if compile is None else bool(compile)


# -- training --------------------------------------------------------------------------------------------
def prepare_for_training(transformer, device, compile: bool | None = None, fp8: bool = False) -> dict:
    """Apply the training levers to a transformer that already carries its LoRA adapter; returns what it did.

    `compile=None` compiles on CUDA only. `fp8=True` stores the frozen block Linears in float8 e4m3
    (native fp8 matmuls where the GPU has them, emulated elsewhere); the LoRA stays in float32.
    Call it after `setup_transformer` and before building the optimizer (parameters are unchanged either
    way: only frozen layers are replaced) and before wrapping in DDP.
    """
    device = torch.device(device)
    info: dict = {"levers": []}
    info["peft_input_cast_off"] = disable_peft_input_cast(transformer)
    if info["peft_input_cast_off"]:
        info["levers"].append("no peft input upcast")
    if fp8:
        info["fp8_linears"] = convert_to_fp8(transformer, trainable_input=True)
        info["fp8_native"] = fp8_supported(device)
        info["levers"].append("fp8 frozen base" + ("" if info["fp8_native"] else " (emulated)"))
    if _want_compile(device, compile):
        info["compiled_blocks"] = compile_blocks(transformer)
        info["levers"].append("regional compile (attention eager)")
    return info


class InputPrefetcher:
    """Makes each step's inputs one step ahead on a background thread (pinned memory on CUDA), so the loop's
    host work for step s+1 overlaps step s on the GPU instead of leaving it idle after the step's
    `loss.item()`; `fetch(i, next_index)` returns step i's tensors on the device (non-blocking copies) and
    starts making `next_index`'s. `make(i)` must be a pure function of i (train.loop.make_batch is), so
    the prefetched batches are exactly the ones the loop would make. Non-tensor items pass through.
    """

    def __init__(self, make, device):
        from concurrent.futures import ThreadPoolExecutor

        self.make, self.device = make, torch.device(device)
        self.pin = self.device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klein-prefetch")
        self.pending: dict = {}

    def _make(self, index):
        out = self.make(index)
        return tuple(t.pin_memory() if self.pin and torch.is_tensor(t) else t for t in out)

    def __call__(self, index, next_index=None):
        future = self.pending.pop(index, None) or self.pool.submit(self._make, index)
        if next_index is not None and next_index not in self.pending:
            self.pending[next_index] = self.pool.submit(self._make, next_index)
        return tuple(t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for t in future.result())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pending.clear()


# -- serving: LoRAs fused into the weights ----------------------------------------------------------------
class FusedLoras:
    """LoRAs resident as low-rank factors on the device, fused into the live weights on demand.

    `activate([(name, weight), ...])` makes every touched layer's live weight W₀ + Σ weight·scale·B·A, from
    a pristine copy W₀ kept for each layer a LoRA has touched (in fast mode: for every block Linear, since
    the live weights are float8). Deactivated layers go back to W₀ exactly.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.pristine: dict[str, torch.Tensor] = {}
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.fused: dict[str, tuple] = {}  # layer -> ((adapter, weight), ...) fused into it now
        ref = next(p for p in transformer.parameters() if p.is_floating_point())
        self.device, self.dtype = ref.device, ref.dtype
        self.quantize = quantize_rowwise  # float8 live weights: requantised at each switch (compiled on CUDA)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.adapters)

    def parameter_count(self) -> int:
        return sum(b.numel() + a.numel() for f in self.adapters.values() for b, a in f.values())

    def keep_pristine(self, layer: str, linear: nn.Linear) -> None:
        """Keep `linear`'s weight as the pristine copy of `layer` (used when the live layer becomes fp8)."""
        self.pristine[layer] = linear.weight.detach()

    def _module(self, layer: str) -> nn.Linear:
        module = self.transformer.get_submodule(layer)
        return getattr(module, "base_layer", module)

    def _pristine(self, layer: str) -> torch.Tensor:
        base = self.pristine.get(layer)
        if base is None:
            module = self._module(layer)
            if isinstance(module, Float8Linear):
                raise RuntimeError(f"{layer} is float8 and has no pristine copy")
            base = self.pristine[layer] = module.weight.detach().clone()
        return base

    # -- adapters ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, name: str, lora) -> None:
        """Make `lora` (a `klein.lora.LoraWeights`) resident under `name` (validated and its shapes checked first)."""
        check_lora_fits(lora, self.transformer)
        factors = {}
        for layer, l in lora.layers.items():
            up = l.up.to(self.device, non_blocking=True).to(self.dtype, copy=True)
            down = (l.down.to(self.device, non_blocking=True).float() * l.scale).to(self.dtype)  # never in place: l is the caller's
            factors[layer] = (up, down)
        self.adapters[name] = factors

    def resident_lora(self, name: str) -> LoraWeights:
        """Adapter `name` as a LoRA of its resident factors (on the device; the alpha/r scale is folded into
        the down factor, so alpha = rank): what K-LoRA scores, without a copy to the host."""
        return LoraWeights(layers={layer: LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
                                   for layer, (up, down) in self.adapters[name].items()})

    @torch.no_grad()
    def delete(self, names: list[str]) -> None:
        gone = set(names) & set(self.adapters)
        for layer, target in list(self.fused.items()):
            if any(n in gone for n, _ in target):
                self._set_layer(layer, ())
        for n in gone:
            del self.adapters[n]
        if not self.adapters:  # nothing left to fuse: drop the pristine copies of full-precision layers
            for layer in [l for l in self.pristine if not isinstance(self._module(l), Float8Linear)]:
                if not self.fused.get(layer):
                    del self.pristine[layer]

    @torch.no_grad()
    def activate(self, pairs: list[tuple[str, float]]) -> None:
        """Fuse exactly these (adapter, weight) pairs; every other layer returns to its base weight."""
        wanted: dict[str, list] = {}
        for name, weight in pairs:
            if name not in self.adapters:
                raise KeyError(f"adapter {name} is not resident")
            if float(weight) == 0.0:
                continue
            for layer in self.adapters[name]:
                wanted.setdefault(layer, []).append((name, float(weight)))
        for layer in sorted(set(wanted) | {l for l, t in self.fused.items() if t}):
            self._set_layer(layer, tuple(wanted.get(layer, ())))

    @torch.no_grad()
    def set_layers(self, layer_pairs: dict[str, list[tuple[str, float]]]) -> None:
        """Per layer, fuse exactly these (adapter, weight) pairs (K-LoRA's per-step choice); others untouched."""
        for layer, pairs in layer_pairs.items():
            self._set_layer(layer, tuple((n, float(w)) for n, w in pairs if float(w) != 0.0 and layer in self.adapters.get(n, ())))

    def _set_layer(self, layer: str, target: tuple) -> None:
        if self.fused.get(layer, ()) == target:
            return
        module = self._module(layer)
        base = self._pristine(layer)
        fp8 = isinstance(module, Float8Linear)
        if not target:
            if fp8:
                module.load_weight(base, self.quantize)
            else:
                module.weight.data.copy_(base)
        else:
            if len(target) == 1:
                (name, weight), = target
                up, down = self.adapters[name][layer]
            else:
                up = torch.cat([self.adapters[n][layer][0] * w for n, w in target], dim=1)
                down = torch.cat([self.adapters[n][layer][1] for n, _ in target], dim=0)
                weight = 1.0
            if fp8:
                module.load_weight(torch.addmm(base, up, down, alpha=weight), self.quantize)
            else:
                torch.addmm(base, up, down, alpha=weight, out=module.weight.data)
        if target:
            self.fused[layer] = target
        else:
            self.fused.pop(layer, None)


@dataclass
class StepCache:
    """Step caching for fast mode: the transformer runs on the first `warmup` steps, the last `cooldown`
    steps and every `interval`-th step in between; the other steps reuse the guided velocity of the last
    computed step (`order=0`) or its linear extrapolation from the last two (`order=1`, a first-order
    Taylor step in the step index, as TaylorSeer does per feature)."""

    warmup: int = 5
    cooldown: int = 2
    interval: int = 2
    order: int = 1

    def computes(self, i: int, steps: int) -> bool:
        return i < self.warmup or i >= steps - self.cooldown or (i - self.warmup) % self.interval == 0

    def computed_steps(self, steps: int) -> int:
        return sum(self.computes(i, steps) for i in range(steps))


@dataclass
class InferenceAccel:
    """What `prepare_for_inference` set up; `klein.generate` reads it from `pipe._klein_accel`."""

    mode: str
    loras: FusedLoras
    compiled: bool
    fp8: bool
    step_cache: StepCache | None
    batch_cfg: bool = True


def prepare_for_inference(pipe, loras: list | None = None, mode: str = "exact", compile: bool | None = None,
                          step_cache: StepCache | None = None, batch_cfg: bool = True) -> InferenceAccel:
    """Make `pipe` (a Flux2KleinPipeline) serve fast; `klein.generate` then takes the accelerated path.

    `loras`: [(name, LoraWeights, weight)] to make resident and fuse now (`set_active_loras` switches later).
    Adapters already loaded through peft are taken over (made resident, not active) and the peft wrappers
    unloaded. `mode="exact"`: bf16 weights with the LoRA fused, compiled blocks, CFG as a batch of 2.
    `mode="fast"`: also the base in float8 and step caching (`StepCache()` unless given).
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {INFERENCE_MODES}")
    if getattr(pipe, "_klein_accel", None) is not None:
        raise RuntimeError("this pipeline is already prepared for inference")
    from klein.lora import extract_lora

    transformer = pipe.transformer
    transformer.eval()
    taken = {}
    for name in list(getattr(transformer, "peft_config", {}) or {}):
        taken[name] = extract_lora(transformer, name)
    if getattr(transformer, "peft_config", None) is not None or taken:
        transformer.unload_lora()
    bank = FusedLoras(transformer)
    fp8 = mode == "fast"
    if fp8:
        convert_to_fp8(transformer, trainable_input=False, on_convert=bank.keep_pristine)
    compiled = _want_compile(bank.device, compile)
    if compiled:
        compile_blocks(transformer)
        bank.quantize = torch.compile(quantize_rowwise)  # one fused pass per weight when switching in fast mode
    accel = InferenceAccel(mode=mode, loras=bank, compiled=compiled, fp8=fp8,
                           step_cache=(step_cache or StepCache()) if mode == "fast" else step_cache, batch_cfg=batch_cfg)
    pipe._klein_accel = accel
    for name, lora in taken.items():
        bank.add(name, lora)
    for name, lora, _ in loras or []:
        bank.add(name, lora)
    if loras:
        bank.activate([(name, weight) for name, _, weight in loras])
    return accel


def inference_accel(pipe) -> InferenceAccel | None:
    return getattr(pipe, "_klein_accel", None)


@torch.no_grad()
def set_inference_mode(pipe, mode: str, step_cache: StepCache | None = None) -> InferenceAccel:
    """Switch a prepared pipeline between "exact" and "fast" in place, keeping resident and fused LoRAs.

    exact → fast: each block Linear becomes float8, quantised from its live (possibly fused) weight; its
    pristine bf16 copy stays (or, if nothing was fused into it, its weight becomes the pristine copy).
    fast → exact: each float8 Linear becomes a full-precision Linear again, rebuilt from the pristine copy
    with the LoRAs of the moment fused in. Compiled blocks recompile on their next call.
    """
    accel = getattr(pipe, "_klein_accel", None)
    if accel is None:
        raise RuntimeError("prepare the pipeline with prepare_for_inference first")
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {INFERENCE_MODES}")
    bank, transformer = accel.loras, pipe.transformer
    if mode == "fast" and not accel.fp8:
        def keep(layer, linear):
            if layer not in bank.pristine:
                bank.keep_pristine(layer, linear)

        convert_to_fp8(transformer, trainable_input=False, on_convert=keep)
        accel.fp8 = True
        accel.step_cache = step_cache or accel.step_cache or StepCache()
    elif mode == "exact" and accel.fp8:
        for layer in block_linear_names(transformer):
            module = transformer.get_submodule(layer)
            if not isinstance(module, Float8Linear):
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=bank.device, dtype=bank.dtype)
            linear.weight.data.copy_(bank.pristine[layer])
            if module.bias is not None:
                linear.bias.data.copy_(module.bias)
            linear.requires_grad_(False)
            parent_name, _, child = layer.rpartition(".")
            setattr(transformer.get_submodule(parent_name), child, linear)
            target = bank.fused.pop(layer, ())
            if target:
                bank._set_layer(layer, target)
            else:
                del bank.pristine[layer]
        accel.fp8 = False
        accel.step_cache = step_cache
    accel.mode = mode
    if accel.compiled:  # the blocks' graphs refer to the replaced modules: recompile rather than keep them alive
        import torch._dynamo

        torch._dynamo.reset()
    return accel

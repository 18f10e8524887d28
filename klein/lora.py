"""LoRA for the Klein transformer: target presets, files, formats and the shape check.

Canonical form (`LoraWeights`): diffusers module names of `Flux2Transformer2DModel` (e.g.
`transformer_blocks.0.attn.to_q`) mapped to a down matrix A [r, in], an up matrix B [out, r] and an alpha;
the layer adds `(alpha / r) · B A x`. Our `.safetensors` files are exactly what
`Flux2KleinPipeline.load_lora_weights` reads: `transformer.<module>.lora_A.weight` / `lora_B.weight` keys,
and peft's config (r, lora_alpha, target_modules) under the `lora_adapter_metadata` header key. Our own
facts (preset, base model, trigger) sit beside it under `klein_style`.

Other formats map to and from the canonical form:
- ComfyUI: `diffusion_model.<BFL name>.lora_down/lora_up.weight` + `.alpha` (BFL names: `double_blocks.N.
  img_attn.qkv`, `single_blocks.N.linear1`, ...). Klein's separate q/k/v LoRAs become one fused qkv LoRA
  of rank 3r whose up matrix is block-diagonal, which is exact; import splits it back.
- ai-toolkit: `diffusion_model.<BFL name>.lora_A/lora_B.weight`, no alpha (the scale is baked into B).
- kohya / musubi-tuner: `lora_unet_<BFL name with _>.lora_down/lora_up.weight` + `.alpha`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

LORA_FORMAT_VERSION = 1
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads
OUR_METADATA_KEY = "klein_style"

DOUBLE_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
DOUBLE_FEEDFORWARD = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# A single-stream block has two Linears: the fused q/k/v + MLP-in projection and the fused attention/MLP out.
SINGLE_ALL = ("attn.to_qkv_mlp_proj", "attn.to_out")

TARGET_PRESETS = {
    # every Linear in the double- and single-stream blocks, as ai-toolkit trains
    "all": (DOUBLE_ATTENTION + DOUBLE_FEEDFORWARD, SINGLE_ALL),
    # attention projections only; single blocks have no attention-only Linear, so their fused qkv(+mlp)
    # input projection stands in for it
    "attention": (DOUBLE_ATTENTION, ("attn.to_qkv_mlp_proj",)),
    # SplitFlux: the single-stream blocks carry style, the double-stream ones content
    "single_blocks": ((), SINGLE_ALL),
    "double_blocks": (DOUBLE_ATTENTION + DOUBLE_FEEDFORWARD, ()),
}

# diffusers name (inside a block) -> BFL name (inside a block) for layers that map one to one
_DOUBLE_TO_BFL = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_DOUBLE_QKV_TO_BFL = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
}
_SINGLE_TO_BFL = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}


class LoraError(ValueError):
    """A LoRA file or adapter is unusable; the message names the file or layer and what to do."""


# -- the one validator ------------------------------------------------------------------------------------
# Dtype policy: a file's tensors may be float32, float16, bfloat16 or float64; they are held, fused and saved
# as float32. Integer, boolean, complex and float8 tensors are refused (a LoRA of those is a broken export).
LORA_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_LORA_RANK = 1024  # the largest rank any trainer we know of writes for Klein (ours stops at 512)
MAX_LORA_SCALE = 64.0  # alpha / rank above this saturates every activation (kohya and peft use <= 2)


class AdapterMetadata(BaseModel):
    """peft's config as diffusers stores it under `lora_adapter_metadata` (keys without `transformer.`)."""

    model_config = ConfigDict(extra="allow")
    r: StrictInt | None = None
    lora_alpha: StrictInt | StrictFloat | None = None
    alpha_pattern: dict[str, StrictInt | StrictFloat] = {}
    rank_pattern: dict[str, StrictInt] = {}
    target_modules: list[StrictStr] | StrictStr | None = None


class OurMetadata(BaseModel):
    """Our facts under `klein_style`: a JSON object; the keys we read are typed, others are kept as they are."""

    model_config = ConfigDict(extra="allow")
    trigger: StrictStr | None = None
    preset: StrictStr | None = None
    base_model: StrictStr | None = None


_TYPE_TAG = re.compile(r"(int|float|str|bool|none|(list|dict|tuple)\[.*\])")


def _header_object(header: dict, key: str, label: str, model: type[BaseModel]) -> dict:
    """The header entry `key` parsed as a JSON object of `model`'s types, or a LoraError naming the key."""
    text = header.get(key)
    if text in (None, ""):
        return {}
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise LoraError(f"{label}: metadata key {key} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoraError(f"{label}: metadata key {key} must be a JSON object, not {type(value).__name__}")
    if key == ADAPTER_METADATA_KEY:
        value = {k.removeprefix("transformer."): v for k, v in value.items()}
    try:
        model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        # union members add their type to the location ("lora_alpha.int"): name the key only
        where = ".".join(str(p) for p in first["loc"] if not _TYPE_TAG.fullmatch(str(p)))
        raise LoraError(f"{label}: metadata key {key}: `{where}` {first['msg'].lower()}") from None
    return value


def check_tensor_types(tensors: dict[str, torch.Tensor], label: str) -> None:
    """The dtype policy and each tensor's dimensions, before anything reads a shape."""
    for key, tensor in tensors.items():
        if tensor.dtype not in LORA_FILE_DTYPES:
            raise LoraError(f"{label}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; LoRA tensors must "
                            "be float32, float16, bfloat16 or float64")
        if key.endswith(".alpha"):
            if tensor.numel() != 1:
                raise LoraError(f"{label}: tensor {key} must hold one number (the alpha), has shape {tuple(tensor.shape)}")
        elif tensor.dim() != 2:
            raise LoraError(f"{label}: tensor {key} has unexpected shapes: a LoRA matrix must be 2-D, got "
                            f"shape {tuple(tensor.shape)}")


def validate_lora(lora: LoraWeights, label: str) -> None:
    """The one check every LoRA passes before it is stored or loaded (import, training output, every reader).

    Per layer: A [r, in] and B [out, r] are matrices of one rank r with 1 <= r <= MAX_LORA_RANK; alpha is a
    finite number with 0 < alpha/r <= MAX_LORA_SCALE; every weight is finite. `check_lora_fits` adds the
    model's side (shapes, targets inside the served blocks)."""
    if not lora.layers:
        raise LoraError(f"{label} has no LoRA layers")
    for name, layer in sorted(lora.layers.items()):
        down, up = layer.down, layer.up
        if down.dim() != 2 or up.dim() != 2:
            raise LoraError(f"{label}: layer {name} has tensors of unexpected shapes: A {tuple(down.shape)} and "
                            f"B {tuple(up.shape)} must be matrices")
        if down.dtype not in LORA_FILE_DTYPES or up.dtype not in LORA_FILE_DTYPES:
            raise LoraError(f"{label}: layer {name} is {down.dtype}/{up.dtype}; LoRA weights must be floating point")
        rank = down.shape[0]
        if rank < 1 or up.shape[1] < 1:
            raise LoraError(f"{label}: layer {name} has rank 0 (A {tuple(down.shape)}, B {tuple(up.shape)}); "
                            "a LoRA layer needs rank >= 1")
        if up.shape[1] != rank:
            raise LoraError(f"{label}: layer {name} has a rank mismatch: A (lora_A/lora_down) has {rank} rows, "
                            f"B (lora_B/lora_up) has {up.shape[1]} columns")
        if rank > MAX_LORA_RANK:
            raise LoraError(f"{label}: layer {name} has rank {rank}; at most {MAX_LORA_RANK} is supported")
        alpha = layer.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise LoraError(f"{label}: layer {name} has alpha {alpha!r}; alpha must be a finite number")
        if not 0 < alpha / rank <= MAX_LORA_SCALE:
            raise LoraError(f"{label}: layer {name} has alpha {alpha:g} for rank {rank} (scale alpha/rank "
                            f"{alpha / rank:g}); the scale must be in (0, {MAX_LORA_SCALE:g}]")
    check_finite(lora, label)


@dataclass
class LoraLayer:
    down: torch.Tensor  # A: [r, in]
    up: torch.Tensor  # B: [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class LoraWeights:
    layers: dict[str, LoraLayer]
    meta: dict = field(default_factory=dict)  # preset, base_model, trigger, source format, ...

    # the most common rank/alpha over the layers; a tie goes to the larger value, never to the layer order
    @property
    def rank(self) -> int:
        return _most_common(l.rank for l in self.layers.values())

    @property
    def alpha(self) -> float:
        return _most_common(l.alpha for l in self.layers.values())


def _most_common(values):
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


# -- targets ---------------------------------------------------------------------------------------------
def target_modules(num_double: int, num_single: int, preset: str = "all") -> list[str]:
    """Full module names of `preset` for a transformer with that many double and single blocks."""
    if preset not in TARGET_PRESETS:
        raise LoraError(f"unknown LoRA target preset {preset!r}; choose one of {sorted(TARGET_PRESETS)}")
    double, single = TARGET_PRESETS[preset]
    names = [f"transformer_blocks.{i}.{s}" for i in range(num_double) for s in double]
    names += [f"single_transformer_blocks.{i}.{s}" for i in range(num_single) for s in single]
    return names


def transformer_targets(transformer, preset: str = "all") -> list[str]:
    return target_modules(transformer.config.num_layers, transformer.config.num_single_layers, preset)


def lora_config(transformer, rank: int = 32, alpha: float = 32, preset: str = "all", init: str | bool = True):
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=transformer_targets(transformer, preset), init_lora_weights=init)


# -- adapters in a live transformer ----------------------------------------------------------------------
def extract_lora(transformer, adapter_name: str = "default", meta: dict | None = None,
                 state_dict: dict | None = None) -> LoraWeights:
    """The canonical weights of a peft adapter living in `transformer` (copied to CPU float32).

    `state_dict` (parameter name → tensor) replaces the module's own tensors, for weights that live
    elsewhere: under DeepSpeed ZeRO the real values are the optimizer's gathered fp32 master shards."""
    config = transformer.peft_config[adapter_name]
    state = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=adapter_name)
    layers = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            layers[module] = LoraLayer(
                down=tensor.detach().float().cpu().clone(),
                up=state[module + ".lora_B.weight"].detach().float().cpu().clone(),
                alpha=float(config.alpha_pattern.get(module, config.lora_alpha)),
            )
    return LoraWeights(layers=layers, meta=dict(meta or {}))


def add_lora(transformer, lora: LoraWeights, adapter_name: str) -> None:
    """Load `lora` into `transformer` as adapter `adapter_name` through diffusers' own loader."""
    check_lora_fits(lora, transformer)
    state, metadata = to_diffusers_state(lora)
    metadata = {f"transformer.{k}": v for k, v in metadata.items()}  # diffusers keeps only prefixed keys
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name, metadata=metadata)


def check_lora_fits(lora: LoraWeights, transformer) -> None:
    """Every layer must exist in the model with matching shapes; otherwise say which layer and both shapes."""
    validate_lora(lora, "the LoRA")
    modules = dict(transformer.named_modules())
    served = set(transformer_targets(transformer, "all"))
    problems = []
    for name, layer in sorted(lora.layers.items()):  # a stable order: the message lists the first few
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such layer in this model")
            continue
        if name not in served:
            problems.append(f"{name}: outside the served blocks (a LoRA may target the Linears of the double- and "
                            "single-stream blocks only)")
            continue
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{name}: is a {type(base).__name__}, not a Linear")
            continue
        want = (base.out_features, base.in_features)
        have = (layer.up.shape[0], layer.down.shape[1])
        if want != have:
            problems.append(f"{name}: the model's layer is {want[1]}→{want[0]} (in→out), the LoRA's is {have[1]}→{have[0]}")
    if problems:
        cfg = transformer.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        hint = (
            f"The model is hidden {hidden} / joint {cfg.joint_attention_dim} with {cfg.num_layers} double and "
            f"{cfg.num_single_layers} single blocks."
        )
        dims = {l.down.shape[1] for l in lora.layers.values()} | {l.up.shape[0] for l in lora.layers.values()}
        if 3072 in dims and hidden != 3072:
            hint += " The LoRA has 3072-wide layers: it looks like a FLUX.1 adapter (hidden 3072, joint 4096), which cannot be used with FLUX.2 Klein."
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise LoraError(
            f"the LoRA does not fit this model ({len(problems)} of {len(lora.layers)} layers): "
            + "; ".join(shown) + ". " + hint + " Train or download a LoRA for this Klein variant."
        )


# -- our file format -------------------------------------------------------------------------------------
def to_diffusers_state(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and peft metadata as `Flux2KleinPipeline.load_lora_weights` expects them."""
    state = {}
    for name, layer in lora.layers.items():
        state[f"transformer.{name}.lora_A.weight"] = layer.down.contiguous()
        state[f"transformer.{name}.lora_B.weight"] = layer.up.contiguous()
    rank, alpha = lora.rank, float(lora.alpha)  # float: alpha 4 and 4.0 are the same LoRA (and the same bytes)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(lora.layers)}
    rank_pattern = {n: l.rank for n, l in lora.layers.items() if l.rank != rank}
    alpha_pattern = {n: float(l.alpha) for n, l in lora.layers.items() if l.alpha != alpha}
    if rank_pattern:
        metadata["rank_pattern"] = rank_pattern
    if alpha_pattern:
        metadata["alpha_pattern"] = alpha_pattern
    return state, metadata


def _json_default(value):
    """JSON for meta values json cannot write, independent of set order and hash seeds."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=lambda v: json.dumps(v, sort_keys=True, default=_json_default))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return str(value)


def _meta_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, default=_json_default)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """`safetensors.torch.save`, byte-deterministic: the same tensors and metadata always give the same bytes.

    safetensors keeps `__metadata__` in a Rust HashMap, whose order changes from one call to the next (so
    the header, and the file's sha256, did too). Its tensor entries are in a fixed order (dtype, then name),
    so the file is saved without metadata and `__metadata__` is put back into the header with sorted keys.
    Data offsets count from the end of the header, so the tensor bytes stay as they are.
    """
    raw = st_save(tensors)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors does: the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def lora_to_bytes(lora: LoraWeights, dtype: torch.dtype = torch.float32) -> bytes:
    """Our `.safetensors` (diffusers keys + metadata) as bytes, to be written atomically by storage.

    Deterministic: the same LoRA (whatever the order of its layers or meta) always gives the same bytes."""
    validate_lora(lora, "the LoRA to save")
    state, adapter_meta = to_diffusers_state(lora)
    header = {
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in adapter_meta.items()}, sort_keys=True),
        OUR_METADATA_KEY: _meta_json({"format_version": LORA_FORMAT_VERSION, "rank": lora.rank,
                                      "alpha": float(lora.alpha), **lora.meta}),
    }
    return safetensors_bytes({k: v.to(dtype) for k, v in state.items()}, header)


def save_lora(lora: LoraWeights, path: str | os.PathLike) -> Path:
    """Write to a local path atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(lora_to_bytes(lora))
    os.replace(tmp, path)
    return path


def read_lora(source: bytes | str | os.PathLike, name: str | None = None) -> LoraWeights:
    """Read a LoRA in any supported format (ours/diffusers, peft, ComfyUI, ai-toolkit, kohya/musubi).

    Only safetensors is accepted: a pickle is never unpickled.
    """
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), name or "the uploaded LoRA"
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as e:
            raise LoraError(f"LoRA file {label} does not exist") from e
    if len(data) < 8:
        raise LoraError(f"{label} is not a safetensors file ({len(data)} bytes); LoRAs must be .safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or header_len > len(data) - 8 or data[8:9] != b"{":
        raise LoraError(
            f"{label} is not a safetensors file (no valid header); only .safetensors LoRAs are accepted — "
            "pickled .pt/.ckpt/.bin files are never loaded"
        )
    try:
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise LoraError(f"{label} is a damaged safetensors file: {e}") from e
    if not tensors:
        raise LoraError(f"{label} holds no tensors")
    if not isinstance(header, dict):
        raise LoraError(f"{label}: the safetensors __metadata__ must be an object of strings")
    check_tensor_types(tensors, label)
    lora = _canonicalise(tensors, header, label)
    validate_lora(lora, label)
    return lora


def check_finite(lora: LoraWeights, label: str) -> None:
    bad = [n for n, l in lora.layers.items() if not (torch.isfinite(l.down).all() and torch.isfinite(l.up).all())]
    if bad:
        raise LoraError(f"{label} has NaN or infinite weights in {len(bad)} layers (first: {bad[0]}); the training run diverged — use an earlier checkpoint")


# -- format conversion -----------------------------------------------------------------------------------
def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui" if any(k.endswith(".alpha") or ".lora_down." in k for k in keys) else "ai-toolkit"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return "unknown"


def _canonicalise(tensors: dict[str, torch.Tensor], header: dict, label: str) -> LoraWeights:
    fmt = detect_format(tensors)
    ours = _header_object(header, OUR_METADATA_KEY, label, OurMetadata)
    meta = {k: v for k, v in ours.items() if k not in ("format_version", "rank", "alpha")}
    meta["source_format"] = fmt
    if fmt in ("diffusers", "peft"):
        adapter = _header_object(header, ADAPTER_METADATA_KEY, label, AdapterMetadata)
        layers = {}
        for key, tensor in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            up_key = module + ".lora_B.weight"
            if up_key not in tensors:
                raise LoraError(f"{label}: layer {module} has lora_A but no lora_B")
            name = module.removeprefix("base_model.model.").removeprefix("transformer.")
            rank = tensor.shape[0]
            alpha = (adapter.get("alpha_pattern") or {}).get(name, adapter.get("lora_alpha"))
            alpha = rank if alpha is None else alpha
            layers[name] = LoraLayer(tensor.float(), tensors[up_key].float(), float(alpha))
        return LoraWeights(layers=layers, meta=meta)
    if fmt in ("comfyui", "ai-toolkit", "kohya"):
        return LoraWeights(layers=_from_bfl(tensors, fmt, label), meta=meta)
    first = ", ".join(list(tensors)[:3])
    raise LoraError(
        f"{label}: unrecognised LoRA key format (first keys: {first}); supported are diffusers/peft "
        "(`transformer.*.lora_A.weight`), ComfyUI/ai-toolkit (`diffusion_model.*`) and kohya/musubi (`lora_unet_*`)"
    )


def _bfl_groups(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """{BFL module name: {'down', 'up', 'alpha'}} from ComfyUI, ai-toolkit or kohya keys."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
                             (".lora_B.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                break
        else:
            raise LoraError(f"unexpected key {key!r} in a {fmt} LoRA")
        if fmt == "kohya":
            module = _kohya_to_bfl(module.removeprefix("lora_unet_"))
        else:
            module = module.removeprefix("diffusion_model.")
        groups.setdefault(module, {})[part] = tensor
    return groups


_KOHYA = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def _kohya_to_bfl(name: str) -> str:
    m = _KOHYA.match(name)
    if not m:
        raise LoraError(f"unsupported kohya/musubi LoRA layer lora_unet_{name}: only double_blocks/single_blocks layers are supported")
    kind, idx, rest = m.groups()
    rest = re.sub(r"^(img|txt)_(attn|mlp)_", r"\1_\2.", rest)  # img_attn_qkv -> img_attn.qkv, img_mlp_0 -> img_mlp.0
    return f"{kind}.{idx}.{rest}"


def _from_bfl(tensors, fmt: str, label: str) -> dict[str, LoraLayer]:
    double_from_bfl = {v: k for k, v in _DOUBLE_TO_BFL.items()}
    single_from_bfl = {v: k for k, v in _SINGLE_TO_BFL.items()}
    qkv_from_bfl = {v: k for k, v in _DOUBLE_QKV_TO_BFL.items()}
    layers: dict[str, LoraLayer] = {}
    for module, parts in _bfl_groups(tensors, fmt).items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{label}: layer {module} lacks its {'up' if 'down' in parts else 'down'} matrix")
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
        if module.startswith(("transformer_blocks.", "single_transformer_blocks.")):  # diffusers names under diffusion_model.
            layers[module] = LoraLayer(down, up, alpha)
            continue
        kind, idx, inner = module.split(".", 2)
        if kind == "single_blocks" and inner in single_from_bfl:
            layers[f"single_transformer_blocks.{idx}.{single_from_bfl[inner]}"] = LoraLayer(down, up, alpha)
        elif kind == "double_blocks" and inner in double_from_bfl:
            layers[f"transformer_blocks.{idx}.{double_from_bfl[inner]}"] = LoraLayer(down, up, alpha)
        elif kind == "double_blocks" and inner in qkv_from_bfl:
            for name, layer in zip(qkv_from_bfl[inner], _split_qkv(down, up, alpha)):
                layers[f"transformer_blocks.{idx}.{name}"] = layer
        else:
            raise LoraError(f"{label}: unsupported layer {module} (Klein LoRAs cover double_blocks and single_blocks)")
    return layers


def _split_qkv(down: torch.Tensor, up: torch.Tensor, alpha: float) -> list[LoraLayer]:
    """A fused qkv LoRA → three LoRAs. A block-diagonal up matrix (what we and ComfyUI write) splits back
    to three rank-r/3 LoRAs exactly; any other shares the down matrix between q, k and v (also exact)."""
    rank = down.shape[0]
    ups = torch.chunk(up, 3, dim=0)
    if rank % 3 == 0:
        r = rank // 3
        blocks = [(u[:, i * r : (i + 1) * r], torch.cat([u[:, : i * r], u[:, (i + 1) * r :]], dim=1)) for i, u in enumerate(ups)]
        if all(off.abs().max() == 0 for _, off in blocks):
            # scale alpha/rank must survive: alpha_r / r == alpha / rank
            return [LoraLayer(down[i * r : (i + 1) * r].clone(), blk.clone(), alpha / 3) for i, (blk, _) in enumerate(blocks)]
    return [LoraLayer(down.clone(), u.clone(), alpha) for u in ups]


def to_bfl_layers(lora: LoraWeights) -> dict[str, LoraLayer]:
    """Canonical → BFL module names, fusing q/k/v triples into one block-diagonal qkv LoRA."""
    out: dict[str, LoraLayer] = {}
    pending = dict(lora.layers)
    blocks = sorted({int(n.split(".")[1]) for n in pending if n.startswith("transformer_blocks.")})
    for i in blocks:
        for triple, bfl in _DOUBLE_QKV_TO_BFL.items():
            names = [f"transformer_blocks.{i}.{t}" for t in triple]
            present = [n for n in names if n in pending]
            if not present:
                continue
            if len(present) != 3:
                raise LoraError(f"cannot export {present}: a fused qkv layer needs LoRAs on all of {names}")
            parts = [pending.pop(n) for n in names]
            if len({(p.rank, p.scale) for p in parts}) != 1:
                raise LoraError(f"cannot fuse {names}: their ranks or alphas differ")
            down = torch.cat([p.down for p in parts], dim=0)
            up = torch.block_diag(*[p.up for p in parts])
            out[f"double_blocks.{i}.{bfl}"] = LoraLayer(down, up, parts[0].alpha * 3)
    for name, layer in pending.items():
        kind, idx, inner = name.split(".", 2)
        table = _DOUBLE_TO_BFL if kind == "transformer_blocks" else _SINGLE_TO_BFL
        if inner not in table:
            raise LoraError(f"layer {name} has no ComfyUI/kohya name")
        prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        out[f"{prefix}.{idx}.{table[inner]}"] = layer
    return out


def export_lora(lora: LoraWeights, fmt: str) -> bytes:
    """`comfyui`, `ai-toolkit` or `kohya` safetensors bytes."""
    bfl = to_bfl_layers(lora)
    state: dict[str, torch.Tensor] = {}
    for name, layer in bfl.items():
        if fmt == "comfyui":
            state[f"diffusion_model.{name}.lora_down.weight"] = layer.down
            state[f"diffusion_model.{name}.lora_up.weight"] = layer.up
            state[f"diffusion_model.{name}.alpha"] = torch.tensor(layer.alpha)
        elif fmt == "ai-toolkit":  # no alpha key: the scale is baked into the up matrix
            state[f"diffusion_model.{name}.lora_A.weight"] = layer.down
            state[f"diffusion_model.{name}.lora_B.weight"] = layer.up * layer.scale
        elif fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = layer.down
            state[f"{key}.lora_up.weight"] = layer.up
            state[f"{key}.alpha"] = torch.tensor(layer.alpha)
        else:
            raise LoraError(f"unknown export format {fmt!r}; choose comfyui, ai-toolkit or kohya")
    meta = {"format": "pt", OUR_METADATA_KEY: _meta_json({**lora.meta, "exported_as": fmt})}
    return safetensors_bytes({k: v.contiguous().float() for k, v in state.items()}, meta)


def lora_delta_close(a: LoraWeights, b: LoraWeights, atol: float = 1e-6) -> bool:
    """Whether two LoRAs change every layer by the same ΔW (what matters, whatever the factorisation)."""
    if set(a.layers) != set(b.layers):
        return False
    return all(torch.allclose(a.layers[n].delta(), b.layers[n].delta(), atol=atol) for n in a.layers)


def lora_size_params(lora: LoraWeights) -> int:
    return sum(l.down.numel() + l.up.numel() for l in lora.layers.values())


__all__ = [
    "LoraError", "LoraLayer", "LoraWeights", "TARGET_PRESETS", "target_modules", "transformer_targets",
    "lora_config", "extract_lora", "add_lora", "check_lora_fits", "to_diffusers_state", "lora_to_bytes",
    "save_lora", "read_lora", "export_lora", "detect_format", "lora_delta_close", "check_finite", "validate_lora",
    "MAX_LORA_RANK", "MAX_LORA_SCALE", "LORA_FILE_DTYPES",
]

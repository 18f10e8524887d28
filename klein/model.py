"""Loading a FLUX.2 Klein pipeline: real weights from a local diffusers folder, or the tiny / mini preset.

Both go through `Flux2KleinPipeline.from_pretrained`. A folder that is not a Klein pipeline fails before
any weight is read, with a message that lists what is missing or wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from klein.mini import MINI_PRESET_DIR, MINI_PRESET_VERSION
from klein.tiny import TINY_PRESET_VERSION, tiny_preset_dir

# (subfolder, expected class, config file) of every component a Klein folder must hold.
KLEIN_COMPONENTS = {
    "transformer": ("Flux2Transformer2DModel", "config.json"),
    "vae": ("AutoencoderKLFlux2", "config.json"),
    "text_encoder": ("Qwen3ForCausalLM", "config.json"),
    "tokenizer": ("Qwen2TokenizerFast|Qwen2Tokenizer", "tokenizer_config.json"),
    "scheduler": ("FlowMatchEulerDiscreteScheduler", "scheduler_config.json"),
}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


class ModelLoadError(ValueError):
    """The model source is not a loadable FLUX.2 Klein pipeline; the message says what is wrong."""


@dataclass(frozen=True)
class KleinVariant:
    """What a transformer config says about the model, for error messages and manifests."""

    name: str
    hidden: int
    joint_attention_dim: int
    double_blocks: int
    single_blocks: int

    @classmethod
    def from_config(cls, config) -> "KleinVariant":
        hidden = config.num_attention_heads * config.attention_head_dim
        known = {(4096, 12288, 8, 24): "klein-9b", (3072, 7680, 5, 20): "klein-4b"}
        key = (hidden, config.joint_attention_dim, config.num_layers, config.num_single_layers)
        return cls(known.get(key, "klein-custom"), hidden, config.joint_attention_dim, config.num_layers, config.num_single_layers)


DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Klein pads every prompt to 512 Qwen3 tokens


def resolve_model_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """`tiny` → the tiny preset folder (built on first use); `mini` → the pretrained preset shipped in the
    repository; anything else → a checked local folder."""
    if str(source) == "tiny":
        return tiny_preset_dir(cache_dir)
    if str(source) == "mini":
        if not (MINI_PRESET_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"the mini preset's weights are missing from {MINI_PRESET_DIR}: they ship with the repository "
                "(check out the whole tree) and `python scripts/pretrain_mini.py` rebuilds them on a GPU"
            )
        check_klein_folder(MINI_PRESET_DIR)
        return MINI_PRESET_DIR
    path = Path(source).expanduser()
    check_klein_folder(path)
    return path


def preset_declaration(folder: str | os.PathLike) -> dict:
    """What a preset folder declares about itself in `klein_preset.json` (empty for real Klein folders)."""
    path = Path(folder) / "klein_preset.json"
    return json.loads(path.read_text()) if path.exists() else {}


def native_resolution(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> int:
    """The side images default to where the user gives none: 64 for tiny, the preset's own (mini: 128), else
    Klein's 1024."""
    if str(source) == "tiny":
        return 64
    folder = resolve_model_source(source, cache_dir)
    return int(preset_declaration(folder).get("resolution", 1024))


def max_sequence_length(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> int:
    """How many text tokens prompts are padded to: 512 for Klein, less where a preset declares it (mini: 64).
    Training caches, samples and serving must all use the same number, so they all ask here."""
    return _declared_text_length(resolve_model_source(source, cache_dir))


def _declared_text_length(folder: Path) -> int:
    return int(preset_declaration(folder).get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))


def check_klein_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model folder {path} does not exist: pass `tiny` or the local diffusers folder of FLUX.2 Klein "
            "Base 9B/4B (the one holding model_index.json); nothing is downloaded at run time"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model source {path} is a file: pass the diffusers folder that holds model_index.json")
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(
            f"{path} is not a diffusers pipeline folder: model_index.json is missing. Expected a FLUX.2 Klein "
            f"folder with subfolders {', '.join(KLEIN_COMPONENTS)}"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index_file} is not valid JSON ({e})") from e
    problems = []
    if index.get("_class_name") != "Flux2KleinPipeline":
        problems.append(f"model_index.json names pipeline {index.get('_class_name')!r}, expected 'Flux2KleinPipeline'")
    for sub, (cls_names, config_name) in KLEIN_COMPONENTS.items():
        entry = index.get(sub)
        if not entry or len(entry) != 2 or entry[1] is None:
            problems.append(f"model_index.json has no `{sub}` component")
        elif entry[1] not in cls_names.split("|"):
            problems.append(f"`{sub}` is a {entry[1]}, expected {cls_names.replace('|', ' or ')}")
        folder = path / sub
        if not folder.is_dir():
            problems.append(f"subfolder {sub}/ is missing")
            continue
        if not (folder / config_name).exists():
            problems.append(f"{sub}/{config_name} is missing")
        if sub in ("transformer", "vae", "text_encoder") and not any(
            f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()
        ):
            problems.append(f"{sub}/ holds no weights (*.safetensors)")
    if problems:
        raise ModelLoadError(f"{path} is not a FLUX.2 Klein pipeline:\n  - " + "\n  - ".join(problems))


def load_pipeline(
    source: str | os.PathLike = "tiny",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    components: tuple[str, ...] | None = None,
):
    """A `Flux2KleinPipeline` from `tiny` or a local Klein folder.

    `dtype` defaults to bfloat16 on CUDA and float32 on CPU. `components` restricts what is loaded (e.g.
    `("transformer",)` for a training worker, which never needs the text encoder or VAE); the others are None.
    """
    folder = resolve_model_source(source, cache_dir)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {}
    if components is not None:
        unknown = set(components) - set(KLEIN_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown pipeline components {sorted(unknown)}; choose from {list(KLEIN_COMPONENTS)}")
        kwargs = {name: None for name in KLEIN_COMPONENTS if name not in components}
    if device.index in (None, 0):
        # every component's shards read straight onto the device (diffusers' one-device map): the 16 GB Qwen3-8B
        # and the 18 GB transformer are never built in host memory first and copied over afterwards
        kwargs["device_map"] = device.type
    try:
        pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load the Klein pipeline from {folder}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    # Read by klein.generate and train.cache when a request leaves max_sequence_length unset.
    pipe.klein_max_sequence_length = _declared_text_length(folder)
    return pipe.to(device)


def load_transformer(source: str | os.PathLike = "tiny", dtype: torch.dtype = torch.float32, device="cpu", cache_dir=None):
    """Only the denoiser, for training workers (latents and prompt embeddings are cached beforehand).

    The safetensors shards are read straight onto `device` (diffusers' `device_map` with the one device): a
    GPU worker never builds the 18 GB bf16 Klein 9B in host memory first and copies it over afterwards."""
    folder = resolve_model_source(source, cache_dir)
    model = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype, local_files_only=True,
                                                    device_map={"": torch.device(device)})
    return model.to(device)


def model_id(source: str | os.PathLike) -> str:
    """A stable name for manifests: `tiny-v<N>`, `mini-v<N>` or the folder name of real weights."""
    if str(source) == "tiny":
        return f"tiny-v{TINY_PRESET_VERSION}"
    if str(source) == "mini":
        return f"mini-v{MINI_PRESET_VERSION}"
    return Path(source).expanduser().resolve().name

"""ai-toolkit job files (`job: extension`, `config: {name, process: [...]}`) read as our TrainConfig keys.

ai-toolkit nests its settings (`network.linear`, `train.lr`, `save.save_every`, ...) under one process entry;
we map each key we train the same way to our flat key, refuse each key whose behaviour we do not have BY ITS
ai-toolkit NAME (training silently without it would train something else than the file asks for), and accept
with a note the keys that change nothing here (devices, output folders, dtypes we do not choose).
The README's "ai-toolkit job files" table lists the same three groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.errors import ConfigError

AITOOLKIT_TRIGGER = "[trigger]"  # ai-toolkit's placeholder for the trigger word in sample prompts
# ai-toolkit path inside config.process[0] -> our TrainConfig key
MAPPED: dict[str, str] = {
    "trigger_word": "trigger",
    "network.linear": "rank",
    "network.linear_alpha": "linear_alpha",
    "train.steps": "steps",
    "train.lr": "lr",
    "train.optimizer": "optimizer",
    "train.batch_size": "batch_size",
    "train.gradient_accumulation_steps": "gradient_accumulation_steps",
    "train.gradient_checkpointing": "gradient_checkpointing",
    "train.lr_scheduler": "lr_scheduler",
    "train.caption_dropout_rate": "caption_dropout_rate",
    "train.seed": "seed",
    "train.max_grad_norm": "max_grad_norm",
    "train.optimizer_params.weight_decay": "weight_decay",
    "save.save_every": "save_every",
    "save.max_step_saves_to_keep": "keep_checkpoints",
    "sample.prompts": "sample_prompts",
    "sample.sample_every": "sample_every",
    "sample.sample_steps": "sample_steps",
    "datasets[0].caption_dropout_rate": "caption_dropout_rate",
    "datasets[0].resolution": "resolution",  # a list: the largest (see _resolution)
    "model.name_or_path": "model",
    "sample.width": "sample_size",  # our samples are square: width and height must agree
    "sample.height": "sample_size",
}
# keys that change nothing for us, with why; a value in ACCEPTED_ONLY_AS must be the one shown, or it is refused
NO_EFFECT: dict[str, str] = {
    "type": "one process, trained by klein-style",
    "training_folder": "outputs go to the storage URI (--storage / `storage:`)",
    "device": "Ray places the workers (num_workers, the train_gpu pool)",
    "performance_log_every": "the progress bar and status.json report s/step",
    "network.type": "klein-style trains LoRA",
    "save.dtype": "LoRA files are saved in float32",
    "save.push_to_hub": "nothing is uploaded",
    "save.hf_repo_id": "nothing is uploaded",
    "save.hf_private": "nothing is uploaded",
    "datasets[0].caption_ext": "captions are the .txt files beside the images",
    "datasets[0].cache_latents_to_disk": "latents and prompt embeddings are always cached under the storage URI",
    "datasets[0].cache_latents": "latents and prompt embeddings are always cached under the storage URI",
    "datasets[0].shuffle_tokens": "captions are used as written",
    "train.train_unet": "the transformer's LoRA is what is trained",
    "train.train_text_encoder": "the text encoder stays frozen",
    "train.noise_scheduler": "training is flow matching",
    "train.dtype": "the weights' dtype follows the device",
    "train.skip_first_sample": "the contact sheet's first row is always the base model",
    "model.is_flux": "the model is FLUX.2 Klein",
    "model.arch": "the model is FLUX.2 Klein",
    "model.low_vram": "memory is managed by gradient_checkpointing / deepspeed_stage",
    "model.quantize": "the base is not quantized (our `fp8: true` is the nearest setting)",
    "sample.sampler": "samples use the model's flow-matching scheduler",
    "sample.neg": "samples use no negative prompt",
    "sample.seed": "samples are drawn from `seed` (train.seed)",
    "sample.walk_seed": "each prompt gets seed + its index",
    "sample.guidance_scale": "samples use the model's default guidance",
}
ACCEPTED_ONLY_AS: dict[str, tuple[Any, str]] = {
    "type": ("sd_trainer", "klein-style runs ai-toolkit's sd_trainer process only"),
    "network.type": ("lora", "klein-style trains LoRA only (no LoKr/LoCon): set network.type: lora"),
    "save.push_to_hub": (False, "klein-style uploads nothing: set save.push_to_hub: false and copy the LoRA yourself"),
    "datasets[0].caption_ext": ("txt", "captions must be .txt files beside the images: rename them and set caption_ext: txt"),
    "datasets[0].shuffle_tokens": (False, "caption token shuffling is not implemented: set shuffle_tokens: false"),
    "train.train_unet": (True, "the transformer's LoRA is what klein-style trains: set train_unet: true"),
    "train.train_text_encoder": (False, "the text encoder cannot be trained: set train_text_encoder: false"),
    "train.noise_scheduler": ("flowmatch", "klein-style trains with flow matching: set noise_scheduler: flowmatch"),
    "model.quantize": (False, "the base cannot be quantized this way: remove model.quantize (or set false) and put "
                              "`fp8: true` in our own YAML for a float8 base"),
}
# keys ai-toolkit users commonly set that we refuse, with what to do instead (any other unknown key is refused too)
REFUSED_HINTS: dict[str, str] = {
    "network.conv": "klein-style trains Linear layers only: remove network.conv",
    "network.conv_alpha": "klein-style trains Linear layers only: remove network.conv_alpha",
    "network.network_kwargs": "choose the layers with our `targets:` (all, attention, single_blocks, double_blocks)",
    "train.ema_config": "EMA of the LoRA is not implemented: remove train.ema_config (or set use_ema: false)",
    "train.linear_timesteps": "timestep weighting is fixed (flow matching with shift): remove train.linear_timesteps",
    "train.disable_sampling": "the contact sheet is always drawn: remove train.disable_sampling",
    "train.optimizer_params": "only optimizer_params.weight_decay is read: remove the other optimizer_params",
    "datasets": "one dataset per job: merge the folders into one and keep datasets[0] only",
    "process": "one process per job file: put each process in its own file",
}
TOP_LEVEL_NO_EFFECT = {"job": "klein-style runs one training job", "meta": "the manifest records the run"}


@dataclass
class AiToolkitJob:
    """An ai-toolkit job file read as ours: the TrainConfig keys (each one set by the user), the refs folder it
    names, notes for the keys that change nothing, and which ai-toolkit path each of our keys came from."""

    config: dict[str, Any]
    dataset_folder: str | None
    notes: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # our key -> ai-toolkit path (for error messages)


def is_aitoolkit_job(data: dict) -> bool:
    """ai-toolkit's layout: `config:` holding a `process:` list (our own YAML has no `config` key)."""
    return isinstance(data.get("config"), dict) and "process" in data["config"]


def read_aitoolkit_job(data: dict, source: str) -> AiToolkitJob:
    """`data` (an ai-toolkit job file's mapping) as our keys; ConfigError names the ai-toolkit key and the fix."""
    notes, config, origin = [], {}, {}
    for key in data:
        if key in TOP_LEVEL_NO_EFFECT:
            notes.append(f"{key}: no effect here ({TOP_LEVEL_NO_EFFECT[key]})")
        elif key != "config":
            raise ConfigError(f"{source}: top-level key {key!r} is not part of an ai-toolkit job file (job, config, "
                              f"meta): remove it")
    for key in data["config"]:
        if key == "name":  # ai-toolkit names its LoRA file after it, and so do we (`name`: <name>.safetensors)
            config["name"], origin["name"] = data["config"]["name"], "config.name"
        elif key != "process":
            raise ConfigError(f"{source}: config.{key} is not supported by klein-style: remove it")
    processes = data["config"]["process"]
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise ConfigError(f"{source}: config.process must be a list holding one mapping (the sd_trainer process)")
    if len(processes) > 1:
        raise ConfigError(f"{source}: config.process has {len(processes)} entries; {REFUSED_HINTS['process']}")
    datasets = processes[0].get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets)):
        raise ConfigError(f"{source}: config.process[0].datasets must be a list of mappings (folder_path: ...)")
    if datasets and len(datasets) > 1:
        raise ConfigError(f"{source}: config.process[0].datasets has {len(datasets)} entries; {REFUSED_HINTS['datasets']}")

    dataset_folder = None
    for path, value in _leaves(processes[0]):
        where = f"{source}: config.process[0].{path}"
        if path == "datasets[0].folder_path":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: expected the path of the reference images' folder (got {value!r})")
            dataset_folder = value
        elif path in MAPPED:
            key = MAPPED[path]
            if key in config and config[key] != value:
                raise ConfigError(f"{where}: {value!r} contradicts config.process[0].{origin[key]} ({config[key]!r}); "
                                  f"both set our `{key}`: keep one")
            config[key], origin[key] = _resolution(value, where, notes) if key == "resolution" else value, path
        elif path in NO_EFFECT:
            expected, fix = ACCEPTED_ONLY_AS.get(path, (value, ""))
            if value != expected:
                raise ConfigError(f"{where}: {value!r} is not supported; {fix}")
            notes.append(f"{path}: no effect here ({NO_EFFECT[path]})")
        else:
            hint = next((h for prefix, h in REFUSED_HINTS.items() if path == prefix or path.startswith(prefix + ".")),
                        "klein-style has no such setting: remove it (README, 'ai-toolkit job files', lists what is read)")
            raise ConfigError(f"{where} is not supported: {hint}")
    return AiToolkitJob(config=config, dataset_folder=dataset_folder, notes=notes, origin=origin)


def _leaves(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every setting; a list of mappings (datasets) is indexed, any other list is a value."""
    out = []
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in REFUSED_HINTS:
            if path in ACCEPTED_ONLY_AS or path in MAPPED:  # a mapping where a plain value belongs
                out.append((path, value))
            else:
                out.extend(_leaves(value, path + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.extend(_leaves(item, f"{path}[{i}]."))
        else:
            out.append((path, value))
    return out


def _resolution(value: Any, where: str, notes: list[str]) -> Any:
    """ai-toolkit trains every listed size; we train one (with aspect buckets): the largest."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected an integer or a list of integers (got {value!r})")
        if len(value) > 1:
            notes.append(f"datasets[0].resolution {value}: klein-style trains one resolution (with aspect buckets); "
                         f"using the largest, {max(value)}")
        return max(value)
    return value


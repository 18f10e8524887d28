"""`TrainConfig`: one object per training job, loadable from YAML, with ai-toolkit's key names.

The defaults and the variant policy are the seeds' findings (DESIGN.md, "What the seeds found"):
rank 32 / alpha 32 / adafactor / lr 1e-4 / weight decay 1e-4 / cosine / caption dropout 0.05;
steps max(500, refs×30) at rank 32 and max(500, refs×20) at rank 128; the variant by dataset size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adafactor", "adamw", "adamw8bit")
ZERO3_GATHER = ("auto", "block", "linear", "module")
ZERO_OPTIMIZERS = ("adamw",)  # element-wise: ZeRO's flat fp32 shards of the LoRA change nothing for them
LR_SCHEDULERS = ("cosine", "cosine_with_restarts", "constant_with_warmup")
TARGET_PRESETS = ("all", "attention", "single_blocks", "double_blocks")

# variant name -> what it changes (the seeds' table)
VARIANTS: dict[str, dict[str, Any]] = {
    "GEM+A": dict(use_gemini=True, rank=32, linear_alpha=32, optimizer="adafactor"),
    "GEM+B": dict(use_gemini=True, rank=128, linear_alpha=128, optimizer="adamw8bit", early_stopping=True),
    "B_r128": dict(use_gemini=False, rank=128, linear_alpha=128, optimizer="adamw8bit", early_stopping=True),
    # small datasets: Gemini captions, rank 32, SplitFlux single blocks (style without content leakage)
    "GEM+D": dict(use_gemini=True, rank=32, linear_alpha=32, optimizer="adafactor", targets="single_blocks"),
}


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and the allowed values."""


@dataclass
class PolicyDecision:
    variant: str
    reason: str
    warnings: list[str] = field(default_factory=list)


def choose_variant(n_refs: int) -> PolicyDecision:
    """The seeds' dataset-size policy (`variant: auto`)."""
    if n_refs < 2:
        raise ConfigError(f"{n_refs} reference image(s): at least 2 are needed to learn a style")
    if n_refs == 2:
        return PolicyDecision("B_r128", "2 refs: rank 128 without Gemini; nothing works reliably with 2 refs",
                              ["nothing works reliably with 2 reference images: add more (10+ is best)"])
    if n_refs <= 3:
        return PolicyDecision("B_r128", f"{n_refs} refs (1–3): rank 128 alone, no Gemini — Gemini text hurts tiny datasets")
    if n_refs <= 7:
        return PolicyDecision("GEM+B", f"{n_refs} refs (5–7 band): Gemini captions + rank 128 with early stopping")
    if n_refs < 30:
        return PolicyDecision("GEM+A", f"{n_refs} refs (10–15 band): Gemini captions + rank 32")
    return PolicyDecision("GEM+A", f"{n_refs} refs (30+): any variant works; rank 32 is the cheapest")


def default_steps(rank: int, n_refs: int) -> int:
    return max(500, n_refs * (20 if rank >= 128 else 30))


@dataclass
class TrainConfig:
    # what and where
    trigger: str = "zxy_style"
    model: str = "tiny"
    tenant: str = "default"
    job_id: str | None = None
    storage: str = field(default_factory=lambda: os.environ.get("KLEIN_STORAGE", str(Path.home() / ".cache" / "klein-style" / "storage")))
    variant: str = "auto"  # auto | GEM+A | GEM+B | B_r128 | GEM+D | custom
    # LoRA (ai-toolkit names)
    rank: int = 32
    linear_alpha: float = 32
    targets: str = "all"
    # optimisation (ai-toolkit names)
    optimizer: str = "adafactor"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    lr_restarts: int = 2  # cycles for cosine_with_restarts
    steps: int | None = None  # None: the seeds' formula from rank and dataset size
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    caption_dropout_rate: float = 0.05
    resolution: int = 1024
    seed: int = 0
    max_grad_norm: float = 1.0
    # checkpoints, samples, validation
    save_every: int = 250
    sample_every: int | None = None  # None: at every save
    sample_prompts: list[str] = field(default_factory=lambda: ["a lighthouse on a cliff", "a cat sitting on a chair", "a city street"])
    sample_steps: int = 20
    sample_size: int | None = None  # None: 64 for tiny, 1024 otherwise
    early_stopping: bool = False
    keep_checkpoints: int = 3
    # text stage
    use_gemini: bool | None = None  # None: as the variant says
    consis_lora: bool = False  # ConsisLoRA: content LoRA first, then the style LoRA on top of it
    content_steps: int | None = None  # ConsisLoRA's content stage (None: half of `steps`)
    content_lora: str | None = None  # storage key of a frozen LoRA the trained one sits on (ConsisLoRA stage 2)
    # scale-out
    num_workers: int = 1
    use_gpu: bool | None = None  # None: if CUDA is available
    compile: bool | None = None  # regional torch.compile of the blocks (None: on CUDA only)
    fp8: bool = False  # frozen base Linears in float8 e4m3 (native on Hopper/Ada GPUs, emulated elsewhere)
    deepspeed_stage: int | None = None  # 2 or 3: DeepSpeed ZeRO (train/zero.py); 3 shards the base over the GPUs
    deepspeed_offload: bool = False  # ZeRO-3 only: keep the parameter shards in host memory (one small GPU)
    # ZeRO-3 only: what is gathered as one unit: a transformer block, each LoRA'd Linear, or (DeepSpeed's own)
    # every module; auto: block with gradient checkpointing, else linear (train/zero.py, zero3_units)
    deepspeed_gather: str = "auto"
    max_failures: int = 2
    max_refs: int = 50
    # testing hooks: kill this worker process once at this step (fault injection), slow each step down
    fail_at_step: int | None = None
    step_delay_s: float = 0.0

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e}); pass the path of a TrainConfig "
                              f"YAML file") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        aliases = {"alpha": "linear_alpha", "learning_rate": "lr", "max_train_steps": "steps", "network_dim": "rank",
                   "network_alpha": "linear_alpha", "train_batch_size": "batch_size"}
        data = {aliases.get(k, k): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = [f"{key!r} → {close[0]!r}" for key in unknown
                     if (close := difflib.get_close_matches(key, sorted(known | set(aliases)), n=1, cutoff=0.75))]
            listed = sorted(known - TESTING_KEYS)
            raise ConfigError(f"{source}: unknown keys {unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                              + f"; known keys are {listed}")
        # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; YAML 1.2 and ai-toolkit's configs mean a float
        for key in FLOAT_KEYS & set(data):
            if isinstance(data[key], str):
                try:
                    data[key] = float(data[key])
                except ValueError:
                    pass  # validate() names the key and the expected type
        config = cls(**data)
        config.validate()
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        def check(cond: bool, key: str, msg: str):
            if not cond:
                raise ConfigError(f"{key}: {msg} (got {getattr(self, key)!r})")

        self._check_types()
        check(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {OPTIMIZERS}")
        check(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"choose one of {LR_SCHEDULERS}")
        check(self.targets in TARGET_PRESETS, "targets", f"choose one of {TARGET_PRESETS}")
        check(self.variant in ("auto", "custom", *VARIANTS), "variant", f"choose auto, custom or one of {list(VARIANTS)}")
        check(isinstance(self.rank, int) and 1 <= self.rank <= 512, "rank", "an integer in [1, 512]")
        check(self.linear_alpha > 0, "linear_alpha", "must be positive")
        check(0 < self.lr < 1, "lr", "must be in (0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1), "steps", "a positive integer or null")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a positive integer")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "a positive integer")
        check(0 <= self.caption_dropout_rate < 1, "caption_dropout_rate", "must be in [0, 1)")
        check(self.resolution % 16 == 0 and 64 <= self.resolution <= 2048, "resolution", "a multiple of 16 in [64, 2048]")
        check(self.save_every >= 1, "save_every", "a positive integer")
        check(self.num_workers >= 1, "num_workers", "a positive integer")
        check(self.deepspeed_stage in (None, 2, 3), "deepspeed_stage", "2, 3 or null")
        check(not self.deepspeed_offload or self.deepspeed_stage == 3, "deepspeed_offload",
              "needs deepspeed_stage: 3 (it moves ZeRO-3's parameter shards to host memory)")
        check(self.deepspeed_gather in ZERO3_GATHER, "deepspeed_gather", f"choose one of {ZERO3_GATHER}")
        check(self.deepspeed_gather == "auto" or self.deepspeed_stage == 3, "deepspeed_gather",
              "needs deepspeed_stage: 3 (only ZeRO-3 gathers parameters)")
        check(self.deepspeed_gather != "block" or self.gradient_checkpointing, "deepspeed_gather",
              "block needs gradient_checkpointing: true (without it diffusers calls each block with keyword "
              "arguments, whose gradients DeepSpeed cannot see); use linear or auto")
        if self.deepspeed_stage is not None:
            check(self.optimizer in ZERO_OPTIMIZERS, "optimizer",
                  f"cannot run under deepspeed_stage {self.deepspeed_stage}: ZeRO hands the optimizer flat fp32 shards "
                  f"of the LoRA, where Adafactor's factored moments (they need each matrix's 2-D shape) do not exist "
                  f"and adamw8bit is untested. Set `optimizer: adamw` with `variant: custom`, or leave deepspeed_stage null")
            check(not self.fp8, "fp8", "the float8 base cannot be sharded by ZeRO: use fp8 or deepspeed_stage, not both")
            check(not self.compile, "compile", "ZeRO gathers and frees weights in hooks around every block, which "
                  "compiled blocks do not see; leave compile null (it is off under deepspeed_stage)")
        check(self.content_steps is None or (isinstance(self.content_steps, int) and self.content_steps >= 1),
              "content_steps", "a positive integer or null")
        check(self.sample_every is None or (isinstance(self.sample_every, int) and self.sample_every >= 1),
              "sample_every", "a positive integer or null")
        check(self.max_refs >= 2, "max_refs", "at least 2")

    def _check_types(self) -> None:
        """Each key against its annotation: `rank: true` or `sample_prompts: a house` must not slip through as
        an int (bool is one in Python) or as a list of characters."""
        for f in fields(self):
            value, annotation = getattr(self, f.name), str(f.type)
            optional = annotation.endswith("| None")
            base = annotation.removesuffix("| None").strip()
            if value is None:
                ok, expected = optional, base
            elif base == "bool":
                ok, expected = isinstance(value, bool), "true or false"
            elif base == "int":
                ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif base == "float":
                ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            elif base == "str":
                ok, expected = isinstance(value, str), "a string"
            elif base == "list[str]":
                ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
            else:
                continue
            if not ok:
                raise ConfigError(f"{f.name}: expected {expected}{' or null' if optional else ''} "
                                  f"(got {value!r}, of type {type(value).__name__})")

    # -- resolution of 'auto' ----------------------------------------------------------------------------
    def resolved(self, n_refs: int, on_gpu: bool = True) -> tuple["TrainConfig", PolicyDecision]:
        """The config with the variant's settings and the step formula applied for `n_refs` refs.

        A variant's adamw8bit needs a GPU (bitsandbytes); where the policy, not the user, picked it on a
        CPU-only run, plain adamw takes its place and the decision says so. An explicit
        `optimizer: adamw8bit` on CPU still fails in the training loop with a clear error.
        """
        if self.variant == "auto":
            decision = choose_variant(n_refs)
        elif self.variant == "custom":
            decision = PolicyDecision("custom", "variant 'custom': the config's own settings")
        else:
            decision = PolicyDecision(self.variant, f"variant {self.variant} chosen in the config")
        cfg = replace(self)
        if decision.variant in VARIANTS:
            for key, value in VARIANTS[decision.variant].items():
                if key == "use_gemini" and self.use_gemini is not None:
                    continue
                setattr(cfg, key, value)
            if cfg.optimizer == "adamw8bit" and not on_gpu:
                cfg.optimizer = "adamw"
                decision.warnings.append("adamw8bit needs a GPU: using adamw on this CPU-only run")
            if cfg.deepspeed_stage is not None and cfg.optimizer not in ZERO_OPTIMIZERS:
                decision.warnings.append(f"{decision.variant}'s {cfg.optimizer} cannot run on ZeRO's flat shards: "
                                         f"using adamw under deepspeed_stage {cfg.deepspeed_stage}")
                cfg.optimizer = "adamw"
        if cfg.use_gemini is None:
            cfg.use_gemini = n_refs > 3
        if cfg.steps is None:
            cfg.steps = default_steps(cfg.rank, n_refs)
        if cfg.deepspeed_stage == 3 and cfg.deepspeed_gather == "auto" and not cfg.gradient_checkpointing:
            decision.warnings.append("deepspeed_stage 3 without gradient_checkpointing gathers one Linear at a time "
                                     "(1.6 s/step on 2×H200 against 0.96 s gathering whole blocks): set "
                                     "gradient_checkpointing: true, which also needs less memory")
        cfg.validate()
        return cfg, decision


# testing hooks: accepted, but not offered in the known-keys list of an error
TESTING_KEYS = frozenset({"fail_at_step", "step_delay_s"})
# the keys a YAML file may spell as `1e-4` (see TrainConfig.from_dict)
FLOAT_KEYS = frozenset(f.name for f in fields(TrainConfig) if str(f.type).removesuffix("| None").strip() == "float")

"""Evaluation sweeps: boards × variants → one Ray Train job per cell → samples on the inference pool → tables.

    python -m evaluation.sweep sweep.yaml              # inside `ray job submit --working-dir . -- ...`, or locally
    klein-style sweep sweep.yaml                  # the same
    klein-style sweep --example                   # the built-in sweep: 2 procedural boards × 2 variants, tiny model

What a sweep does:

1. For every (board, variant) cell, one training job (`train.job.run_training_job`) with a job id derived
   from (sweep name, board, variant), so a re-run finds it. At most `concurrency` jobs train at once (the
   training pool's `train_gpu` units ÷ GPUs per job, unless the YAML says otherwise); the jobs also queue
   FIFO in the pool through `cluster.pools.train_pool_turn`.
2. As each job finishes, a Ray task on the inference pool (`train.samples.sample_task_options`) renders one
   image per (checkpoint, prompt, seed), and the base model's image per (board, prompt, seed).
3. Every sample is scored: style distance to the board's refs (`klein.style_score`), a content check
   (offline proxy: correlation of the edge maps of the sample and of the base model's image for the same
   prompt and seed; with GEMINI_API_KEY, the Gemini judge also says whether each compared image still shows
   the prompt) and the checkpoint's validation loss (the job manifest's `metrics.val_curve`).
4. Variants are judged pairwise on the same (board, prompt, seed) at their delivered checkpoints: by the
   Gemini judge (`gemini.judge.judge_pair`) when a key is set, else by the style score.
5. Tables (Markdown, CSV and PNG) under `sweeps/<name>/report/` in the storage, printed at the end: the
   seeds' table (variant, wins, win rate, notes), per board × variant, the dataset-size × variant matrix with
   the `auto` policy (`train.recipe.choose_variant`) beside the winner of each band, the convergence table
   (best step per board and variant) and a contact sheet per board.

A cell is finished when `sweeps/<name>/cells/<job_id>/manifest.json` exists (written last, with the same
settings); a re-run skips finished cells, reuses a finished LoRA whose samples are missing, and resumes an
interrupted training job from its last checkpoint.

Sweep YAML (every key but `boards` and `variants` optional):

    name: ink-sweep            # [a-z0-9][a-z0-9_-]*: outputs under sweeps/<name>/, part of every job id
    storage: s3://bucket/pfx   # --storage wins; default KLEIN_STORAGE, else ~/.cache/klein-style/storage
    model: tiny                # or a local FLUX.2 Klein folder
    tenant: default
    concurrency: null          # training jobs at once; default: the pool's train_gpu ÷ GPUs per job
                               # (set it when the pools autoscale from zero: they advertise nothing yet)
    judge: auto                # auto (Gemini with a key, else style score) | gemini | offline | world
                               # world: the exact judge of the procedural world (model mini, world boards only)
    base: {resolution: 1024}   # TrainConfig keys (ai-toolkit names) for every cell; `use_gpu: true` when the
                               # GPU pools start at zero (default: whether the cluster has GPUs now)
    steps: 600                 # steps of every cell (overrides base.steps); null: the seeds' formula
    boards:
      - {name: ink, refs: s3://bucket/refs/ink.zip, trigger: zxy_ink, steps: 400}
      - {name: neon3, make: {style: neon, n: 3}}        # a procedural board (evaluation.board.make_board)
      - {name: glass3, make: {style: stained_glass, n: 3}}  # a world board (evaluation.world.make_world_board)
    variants:
      - GEM+A                                           # a recipe variant by name
      - {name: r128-long, variant: B_r128, steps: 900}  # a name plus TrainConfig overrides
      - {name: r64, rank: 64, linear_alpha: 64}         # no `variant`: custom (the keys as given)
    prompts: [a lighthouse on a cliff, a cat on a chair]
    seeds: [0, 1]
    sample: {steps: 28, size: null, guidance: 4.0}      # size null: 64 for tiny, 1024 otherwise

Steps of a cell: the variant's `steps`, else the board's, else the top-level `steps`, else `base.steps`,
else the seeds' formula. Board entries may carry `config:` (TrainConfig overrides for that board).

`make:` draws a scene board (`evaluation.board`: ukiyo, neon, pastel, ...) or a board of the procedural world
(`evaluation.world`: one subject per picture, the styles the mini model knows or has never seen). `make.kind`
says which (`scene` | `world`); left out, the style's name decides, and the three names both kinds have (neon,
mosaic, blueprint) stay scene boards, as sweep files have always meant them.

`judge: world` (model `mini`, world boards only): each cell's delivered LoRA draws the board's own content
classes (`evaluation.world.board_contents`) from world captions behind the trigger, once per seed, at the mini
quality settings of `evaluation.quality`; the exact judge gives `style_prob` (the board's style) and
`content_ok`, and the base model's figures once per board are the reference. Pairwise winners follow
`WORLD_RULE`; the report adds the per-cell figures, the refs × variant matrix and the `auto` policy row.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import yaml
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cluster.pools import INFER_RESOURCE, TRAIN_RESOURCE, cluster_has_gpus, init_local_ray
from cluster.storage import Storage
from contracts import checkpoint_key, manifest_key, with_trigger
from evaluation import world
from evaluation.board import BOARD_STYLES, make_board
from evaluation.quality import MINI_GUIDANCE, MINI_STEPS, side_quality
from gemini.client import GeminiClient, GeminiConfig
from gemini.judge import judge_pair
from klein.generate import GenerateRequest
from klein.lora import read_lora
from klein.mini import MINI_RESOLUTION
from klein.model import native_resolution
from klein.style_score import StyleScorer
from train.captions import TriggerError, check_trigger
from train.dataset import DatasetError, load_refs
from train.job import run_training_job
from train.recipe import VARIANTS, ConfigError, TrainConfig, choose_variant, unknown_keys_message
from train.health import flagged_symptoms
from train.report import image_grid
from train.samples import cached_pipeline, render_with_lora, sample_task_options
from train.status import stop_jobs_on_signals

log = logging.getLogger("klein.sweep")

EXAMPLE_SWEEP = Path(__file__).with_name("sweeps") / "example.yaml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
JUDGES = ("auto", "gemini", "offline", "world")
BOARD_KINDS = ("scene", "world")
# The world judge's pairwise rule. A cell keeps the content when the judge recognises the prompted subject in at
# least half its images: a LoRA that draws only the style has failed as a style LoRA, however stylish.
WORLD_CONTENT_MIN = 0.5
WORLD_STYLE_TIE = 0.02  # style_prob gaps below this are noise at a few images per cell (one image moves it ~0.05+)
WORLD_RULE = (f"world judge (exact, evaluation.world_judge) per cell, on the board's own content classes × the sweep's "
              f"seeds: a cell keeps the content when content_ok ≥ {WORLD_CONTENT_MIN}; between two cells, one that keeps "
              f"it beats one that does not; otherwise the higher style_prob of the board's style wins when the gap is "
              f"≥ {WORLD_STYLE_TIE}, else the higher content_ok; equal on both: a tie (no winner). The board's winner: "
              f"among the cells that keep the content (all cells if none does), the highest style_prob, within "
              f"{WORLD_STYLE_TIE} of it the highest content_ok; still equal: a tie")
# Dataset-size bands of the seeds' findings. Sizes between them go where `choose_variant` puts them:
# 4 refs with 5–7, 8–29 with 10–15.
BANDS = ("1–3", "5–7", "10–15", "30+")
CONTENT_PROXY = ("content proxy (offline): correlation of the edge maps (gradient magnitude of the blurred 32×32 grey "
                 "image) of the sample and the base model's image for the same board, prompt and seed; it follows the "
                 "layout, not the palette (same scene in another style ~0.4–0.9, another scene ~0)")
CONTENT_KEPT_AT = 0.3
_TRAIN_CONFIG_KEYS_NOT_COMPARED = {"storage", "use_gpu", "fail_at_step", "step_delay_s", "oom_at_step"}


class SweepError(ValueError):
    """A bad sweep file or a sweep that cannot run; the message names the key or the cell."""


# -- the sweep file -----------------------------------------------------------------------------------------
@dataclass
class BoardSpec:
    name: str
    refs: str | None = None  # folder, .zip or storage URI of refs
    make: dict | None = None  # procedural board: {style, n, size, seed, kind}
    trigger: str | None = None
    steps: int | None = None
    config: dict = field(default_factory=dict)


@dataclass
class VariantSpec:
    name: str
    config: dict = field(default_factory=dict)  # TrainConfig overrides, `variant` included
    steps: int | None = None


@dataclass
class SampleSpec:
    steps: int = 28
    size: int | None = None
    guidance: float = 4.0


@dataclass
class SweepSpec:
    boards: list[BoardSpec]
    variants: list[VariantSpec]
    name: str = "sweep"
    storage: str | None = None
    model: str = "tiny"
    tenant: str = "default"
    concurrency: int | None = None
    judge: str = "auto"
    base: dict = field(default_factory=dict)
    steps: int | None = None
    prompts: list[str] = field(default_factory=lambda: ["a lighthouse on a cliff", "a cat sitting on a chair"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    sample: SampleSpec = field(default_factory=SampleSpec)

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "SweepSpec":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise SweepError(f"cannot read the sweep file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise SweepError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise SweepError(f"{path} must hold a mapping (name, boards, variants, ...), got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path), base_dir=Path(path).resolve().parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "sweep", base_dir: Path | None = None) -> "SweepSpec":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:  # the closest known key is offered, as for TrainConfig and ServeConfig
            raise SweepError(unknown_keys_message(unknown, known, {}, source))
        data = dict(data)

        def check_overrides(where: str, overrides: Any) -> dict:
            if overrides is None:
                return {}
            if not isinstance(overrides, dict):
                raise SweepError(f"{source}: {where} must be a mapping of TrainConfig keys")
            managed = {"trigger", "model", "storage", "job_id", "tenant", "sample_prompts"}
            bad = sorted(set(overrides) & managed)
            if bad:
                raise SweepError(f"{source}: {where} sets {bad}, which the sweep sets itself (use the sweep's keys)")
            try:
                TrainConfig.from_dict(dict(overrides), source=f"{source}: {where}")
            except ConfigError as e:
                raise SweepError(str(e)) from e
            return dict(overrides)

        base = check_overrides("base", data.pop("base", None))
        boards_raw = data.pop("boards", None)
        variants_raw = data.pop("variants", None)
        if not boards_raw or not isinstance(boards_raw, list):
            raise SweepError(f"{source}: `boards` must be a non-empty list of {{name, refs | make, trigger, steps}}")
        if not variants_raw or not isinstance(variants_raw, list):
            raise SweepError(f"{source}: `variants` must be a non-empty list of variant names or {{name, ...}}")

        boards = []
        for i, raw in enumerate(boards_raw):
            if not isinstance(raw, dict) or not raw.get("name"):
                raise SweepError(f"{source}: boards[{i}] needs a `name`")
            extra = sorted(set(raw) - {f.name for f in fields(BoardSpec)})
            if extra:
                raise SweepError(f"{source}: boards[{i}] has unknown keys {extra}; use name, refs, make, trigger, steps, config")
            board = BoardSpec(**{**raw, "name": str(raw["name"])})
            if (board.refs is None) == (board.make is None):
                raise SweepError(f"{source}: board {board.name!r} needs exactly one of `refs` (a folder, zip or URI) or `make`")
            if board.make is not None:
                if not isinstance(board.make, dict) or int(board.make.get("n", 0)) < 2:
                    raise SweepError(f"{source}: board {board.name!r}: make needs style and n >= 2")
                extra = sorted(set(board.make) - {"style", "n", "size", "seed", "kind"})
                if extra:
                    raise SweepError(f"{source}: board {board.name!r}: make has unknown keys {extra}; use style, n, size, seed, kind")
                board_kind(board.make, f"{source}: board {board.name!r}")  # raises on an unknown style or kind
            elif base_dir is not None and "://" not in board.refs and not Path(board.refs).expanduser().is_absolute():
                board.refs = str((base_dir / board.refs).resolve())  # relative to the sweep file
            board.config = check_overrides(f"board {board.name!r} config", board.config)
            _check_steps(board.steps, f"{source}: board {board.name!r} steps")
            boards.append(board)

        variants = []
        for i, raw in enumerate(variants_raw):
            if isinstance(raw, str):
                if raw not in VARIANTS and raw != "auto":
                    raise SweepError(f"{source}: variants[{i}]: unknown variant {raw!r}; use auto, one of {sorted(VARIANTS)}, "
                                     "or a mapping {name: ..., variant: ..., <TrainConfig keys>} for a custom one")
                raw = {"name": raw}
            if not isinstance(raw, dict) or not raw.get("name"):
                raise SweepError(f"{source}: variants[{i}] must be a variant name or a mapping with `name`")
            raw = dict(raw)
            name = str(raw.pop("name"))
            steps = raw.pop("steps", None)
            _check_steps(steps, f"{source}: variant {name!r} steps")
            if "variant" not in raw:
                raw["variant"] = name if name in VARIANTS or name == "auto" else "custom"
            variants.append(VariantSpec(name=name, config=check_overrides(f"variant {name!r}", raw), steps=steps))

        sample = data.pop("sample", None) or {}
        if not isinstance(sample, dict) or set(sample) - {"steps", "size", "guidance"}:
            raise SweepError(f"{source}: `sample` takes steps, size and guidance")
        spec = cls(boards=boards, variants=variants, base=base, sample=SampleSpec(**sample), **data)
        spec.validate(source)
        return spec

    def validate(self, source: str = "sweep") -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise SweepError(f"{source}: name {self.name!r}: use 1–40 lowercase letters, digits, '-' or '_'")
        for what, items in (("board", [b.name for b in self.boards]), ("variant", [v.name for v in self.variants])):
            dupes = sorted({n for n in items if items.count(n) > 1})
            if dupes:
                raise SweepError(f"{source}: {what} names must be unique; repeated: {dupes}")
        if self.judge not in JUDGES:
            raise SweepError(f"{source}: judge {self.judge!r}: choose one of {JUDGES}")
        if self.judge == "world":
            # The exact judge knows the world's 12 subjects and 20 styles, as the mini model draws them: on other
            # models or other boards its numbers would mean nothing.
            if self.model != "mini":
                raise SweepError(f"{source}: judge: world measures in the procedural world that the mini model draws; "
                                 f"set model: mini (got {self.model!r}), or use judge: auto")
            not_world = [b.name for b in self.boards if b.make is None or board_kind(b.make, source) != "world"]
            if not_world:
                raise SweepError(f"{source}: judge: world needs every board made from a world style "
                                 f"(make: {{style: <one of {', '.join(world.HELDOUT_STYLES)}, ...>, n: ...}}); "
                                 f"not world boards: {not_world}")
        if self.concurrency is not None and (not isinstance(self.concurrency, int) or self.concurrency < 1):
            raise SweepError(f"{source}: concurrency must be a positive integer or null, got {self.concurrency!r}")
        _check_steps(self.steps, f"{source}: steps")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise SweepError(f"{source}: prompts must be a non-empty list of non-empty strings")
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"{source}: seeds must be a non-empty list of distinct integers >= 0")
        s = self.sample
        if not isinstance(s.steps, int) or not 1 <= s.steps <= 200:
            raise SweepError(f"{source}: sample.steps must be in [1, 200], got {s.steps!r}")
        if s.size is not None and (not isinstance(s.size, int) or s.size % 16 or not 64 <= s.size <= 2048):
            raise SweepError(f"{source}: sample.size must be a multiple of 16 in [64, 2048] or null, got {s.size!r}")

        for board in self.boards:
            try:
                check_trigger(self.trigger(board))
            except TriggerError as e:
                raise SweepError(f"{source}: board {board.name!r}: {e}") from e
        for cell in self.cells():  # every cell's TrainConfig must be valid before anything starts
            self.train_config(cell)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- cells -----------------------------------------------------------------------------------------
    def cells(self) -> list["Cell"]:
        return [Cell(board, variant, cell_job_id(self.name, board.name, variant.name))
                for board in self.boards for variant in self.variants]

    def sample_size(self) -> int:
        return self.sample.size or native_resolution(self.model)

    def trigger(self, board: BoardSpec) -> str:
        return board.trigger or "zxy_" + re.sub(r"[^a-z0-9_]", "_", board.name.lower())

    def train_config(self, cell: "Cell", storage_uri: str | None = None):
        """The cell's `TrainConfig` (not yet resolved against its dataset size)."""
        data = {**self.base, **cell.board.config, **cell.variant.config}
        steps = next((s for s in (cell.variant.steps, cell.board.steps, self.steps) if s is not None), data.get("steps"))
        data.update(trigger=self.trigger(cell.board), model=self.model, tenant=self.tenant, job_id=cell.job_id,
                    steps=steps, sample_prompts=list(self.prompts))
        # the job's own contact sheet follows `sample:` unless base/board/variant set it: what the user wrote wins
        data.setdefault("sample_steps", self.sample.steps)
        data.setdefault("sample_size", self.sample_size())
        if storage_uri is not None:
            data["storage"] = storage_uri
        try:
            return TrainConfig.from_dict(data, source=f"cell {cell.label}")
        except ConfigError as e:
            raise SweepError(str(e)) from e


def _check_steps(value, where: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise SweepError(f"{where} must be a positive integer or null, got {value!r}")


@dataclass
class Cell:
    board: BoardSpec
    variant: VariantSpec
    job_id: str

    @property
    def label(self) -> str:
        return f"{self.board.name} × {self.variant.name}"


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (slug or "x")[:limit].strip("-") or "x"


def cell_job_id(sweep: str, board: str, variant: str) -> str:
    """Deterministic, valid job id of a cell: readable slugs plus a hash of the exact names."""
    digest = hashlib.sha256(json.dumps([sweep, board, variant]).encode()).hexdigest()[:8]
    return f"sw-{_slug(sweep, 16)}-{_slug(board, 14)}-{_slug(variant, 12)}-{digest}"


def board_kind(make: dict, where: str) -> str:
    """`scene` or `world`: `make.kind` when given, else what the style's name is (scene for the shared names)."""
    style, kind = make.get("style"), make.get("kind")
    if kind is not None and kind not in BOARD_KINDS:
        raise SweepError(f"{where}: make.kind {kind!r}: use one of {BOARD_KINDS}")
    if kind is None:
        kind = "scene" if style in BOARD_STYLES else "world"
    known = BOARD_STYLES if kind == "scene" else world.STYLES
    if style not in known:
        raise SweepError(f"{where}: make needs style (scene boards: {', '.join(sorted(BOARD_STYLES))}; world: "
                         f"{', '.join(sorted(world.STYLES))}), got {style!r}"
                         + (f" for make.kind {kind}" if make.get("kind") else ""))
    return kind


def load_sweep(path: str | os.PathLike, **overrides) -> SweepSpec:
    return SweepSpec.from_yaml(path, **overrides)


def size_band(n_refs: int) -> str:
    """The seeds' dataset-size band of `n_refs` (as `train.recipe.choose_variant` groups sizes)."""
    if n_refs <= 3:
        return BANDS[0]
    if n_refs <= 7:
        return BANDS[1]
    if n_refs < 30:
        return BANDS[2]
    return BANDS[3]


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- Ray: connect, pools ------------------------------------------------------------------------------------
def connect_ray(address: str | None = None, *, train_slots: int = 1) -> str:
    """Join the cluster this process runs in, or start a local one that advertises both pools.

    `address` (or RAY_ADDRESS, which `ray job submit` gives its entrypoint) joins that cluster; without
    either, `cluster.pools.init_local_ray` starts a private instance (address="local", never a stray
    `ray start` head) with `train_slots` training slots.
    """
    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
        return address

    init_local_ray(num_cpus=max(2, os.cpu_count() or 2), object_store_memory=300 * 1024 * 1024,
                   train_slots=train_slots, log_to_driver=False)
    return "local"


def training_concurrency(spec: SweepSpec, resources: dict | None = None) -> tuple[int, str]:
    """How many cells train at once: the YAML's `concurrency`, else the pool's `train_gpu` ÷ GPUs per job.

    Raises SweepError when the cluster advertises no training or inference pool and the YAML does not
    say how many jobs to run (a pool that autoscales from zero advertises nothing until it grows).
    """
    resources = resources if resources is not None else ray.cluster_resources()
    per_job = max(spec.train_config(c).num_workers for c in spec.cells())
    missing = [r for r in (TRAIN_RESOURCE, INFER_RESOURCE) if resources.get(r, 0) <= 0]
    if spec.concurrency is not None:
        note = f"concurrency {spec.concurrency} (from the sweep file)"
        if missing:
            note += f"; the cluster advertises no {', '.join(missing)} yet (autoscaling from zero?)"
        return spec.concurrency, note
    if missing:
        raise SweepError(
            f"the Ray cluster advertises no {' or '.join(missing)}: a sweep trains on the `{TRAIN_RESOURCE}` pool and "
            f"samples on the `{INFER_RESOURCE}` pool (cluster/pools.py). Start the nodes with those resources, or set "
            "`concurrency:` in the sweep file when the pools autoscale from zero")
    slots = resources[TRAIN_RESOURCE]
    n = max(1, int(slots // per_job))
    return n, f"concurrency {n} = {slots:g} {TRAIN_RESOURCE} ÷ {per_job} GPU(s) per job"


# -- samples on the inference pool ---------------------------------------------------------------------------
def sample_name(step: int | None, prompt_index: int, seed: int) -> str:
    return f"{'base' if step is None else f'step_{step:06d}'}/p{prompt_index}_s{seed}.png"


def render_samples(model: str, storage_uri: str, lora_keys: dict[int, str] | None, prompts: list[str],
                   seeds: list[int], size: int, steps: int, guidance: float, use_gpu: bool) -> dict[str, bytes]:
    """PNG bytes per (checkpoint, prompt, seed) — or of the base model when `lora_keys` is None.

    `lora_keys` maps a checkpoint's step to its LoRA's key in the storage (read here, on the inference node).
    `prompts` are full prompts (trigger included). Keys of the result are `sample_name(step, i, seed)`.
    """
    pipe = cached_pipeline(model, "cuda" if use_gpu else "cpu")
    storage = Storage.from_uri(storage_uri)
    cells = [(p_idx, prompt, seed) for p_idx, prompt in enumerate(prompts) for seed in seeds]
    requests = [GenerateRequest(prompt=prompt, seed=seed, steps=steps, width=size, height=size, guidance=guidance)
                for _, prompt, seed in cells]
    out: dict[str, bytes] = {}
    checkpoints: list[tuple[int | None, str | None]] = [(None, None)] if lora_keys is None else sorted(lora_keys.items())
    for step, key in checkpoints:
        images = render_with_lora(pipe, None if key is None else storage.read_bytes(key), requests)
        for (p_idx, _, seed), image in zip(cells, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out[sample_name(step, p_idx, seed)] = buf.getvalue()
    return out


def _render_task(use_gpu: bool):
    return ray.remote(render_samples).options(**sample_task_options(use_gpu))


def judge_in_world(model: str, storage_uri: str, lora_key: str | None, trigger: str, style: str, contents: list[str],
                   seeds: list[int], use_gpu: bool) -> dict:
    """The exact world judge's figures for one side (`evaluation.quality.side_quality`): the LoRA stored at
    `lora_key` (None: the base model) draws every (content, seed) from world captions behind `trigger`, at the
    mini quality settings; returns content_ok, style_prob of `style`, n and the images as PNG bytes."""
    # checked before anything is drawn: the judge would only refuse them after the images were made
    unknown = [c for c in contents if c not in world.CONTENT_CLASSES]
    if style not in world.STYLES or unknown:
        raise ValueError(f"the world judge knows the world's styles ({', '.join(world.STYLES)}) and contents "
                         f"({', '.join(world.CONTENT_CLASSES)}); got style {style!r}, unknown contents {unknown}")
    pipe = cached_pipeline(model, "cuda" if use_gpu else "cpu")
    lora = None if lora_key is None else read_lora(Storage.from_uri(storage_uri).read_bytes(lora_key))
    side = side_quality(pipe, lora, trigger, style, contents=contents, seeds=seeds)
    return {"content_ok": side.content_ok, "style_prob": side.style_prob, "n": len(side.images),
            "pngs": [_png_bytes(image) for image in side.images]}


def _world_task(use_gpu: bool):
    return ray.remote(judge_in_world).options(**sample_task_options(use_gpu))


# -- scores ------------------------------------------------------------------------------------------------
def _edge_map(image, side: int = 32):
    grey = image.convert("L").filter(ImageFilter.GaussianBlur(max(0.5, image.width / 64))).resize((side, side))
    g = np.asarray(grey, dtype=np.float64)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
    gy[1:-1] = g[2:] - g[:-2]
    return np.hypot(gx, gy).ravel()


def content_proxy(sample, base) -> float:
    """Does `sample` still show what the base model drew for the same prompt and seed? The correlation of
    their edge maps (gradient magnitude of the blurred 32×32 grey image): it follows the layout and ignores
    palette and brightness, so the same scene in another style scores ~0.4–0.9 and another scene ~0."""
    a, b = _edge_map(sample), _edge_map(base)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    if denom < 1e-9:  # a flat image has no layout: only another flat image matches it
        return 1.0 if float(abs(a).max() + abs(b).max()) < 1e-9 else 0.0
    return float((a * b).sum() / denom)


def _png(data: bytes):
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- boards ------------------------------------------------------------------------------------------------
@dataclass
class PreparedBoard:
    spec: BoardSpec
    source: str
    refs: list  # PIL images
    n_refs: int
    dataset_hash: str
    scorer: Any = None
    world_style: str | None = None  # the world style of a world board (what the world judge measures)

    @property
    def band(self) -> str:
        return size_band(self.n_refs)


def prepare_board(board: BoardSpec, workdir: Path) -> PreparedBoard:
    """Materialise a procedural board (deterministic) and load the refs the scores compare against."""
    source, world_style = board.refs, None
    if board.make is not None:
        folder = workdir / "boards" / _slug(board.name, 40)
        size, seed = int(board.make.get("size", 256)), int(board.make.get("seed", 0))
        if board_kind(board.make, f"board {board.name!r}") == "world":
            world_style = board.make["style"]
            world.make_world_board(world_style, int(board.make["n"]), folder, seed=seed, size=size)
        else:
            make_board(board.make["style"], int(board.make["n"]), folder, size=size, seed=seed)
        source = str(folder)
    ref_set = load_refs(source)
    images = [r.image for r in ref_set.refs]
    return PreparedBoard(board, source, images, len(images), ref_set.dataset_hash, StyleScorer(images), world_style)


# -- running a sweep -------------------------------------------------------------------------------------------
@dataclass
class SweepRun:
    spec: SweepSpec
    storage: Any
    boards: dict[str, PreparedBoard]
    use_gpu: bool
    log: Callable[[str], None]
    base_refs: dict[str, Any] = field(default_factory=dict)  # board name -> ObjectRef of base images (None: stored)
    base_locks: dict[str, threading.Lock] = field(default_factory=dict)

    def __post_init__(self):
        self.base_locks = {name: threading.Lock() for name in self.boards}

    @property
    def prefix(self) -> str:
        return f"sweeps/{self.spec.name}"

    def cell_prefix(self, cell: Cell) -> str:
        return f"{self.prefix}/cells/{cell.job_id}"

    def base_prefix(self, board: str) -> str:
        return f"{self.prefix}/base/{_slug(board, 40)}-{hashlib.sha256(board.encode()).hexdigest()[:6]}"

    def prompts_for(self, board: PreparedBoard) -> list[str]:
        trigger = self.spec.trigger(board.spec)
        return [with_trigger(trigger, p) for p in self.spec.prompts]

    def world_settings(self, board: PreparedBoard) -> dict:
        """What the world judge draws for `board`: its own content classes × the sweep's seeds, behind its trigger."""
        return {"style": board.world_style, "contents": world.board_contents(board.n_refs), "seeds": list(self.spec.seeds),
                "trigger": self.spec.trigger(board.spec), "size": MINI_RESOLUTION, "steps": MINI_STEPS,
                "guidance": MINI_GUIDANCE, "judge": "exact world judge (evaluation.world_judge)"}

    def sample_fingerprint(self, board: PreparedBoard) -> dict:
        s = self.spec.sample
        return {"model": self.spec.model, "prompts": self.prompts_for(board), "seeds": self.spec.seeds,
                "size": self.spec.sample_size(), "steps": s.steps, "guidance": s.guidance}


def run_sweep(spec: SweepSpec, storage_uri: str | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a sweep on the connected Ray cluster; returns the report (also stored and printed by the CLI).

    Cells that fail are listed in the report's `failed` and do not stop the others.
    """
    if not ray.is_initialized():
        raise SweepError("connect to Ray first (evaluation.sweep.connect_ray)")
    storage_uri = storage_uri or spec.storage or TrainConfig().storage
    storage = Storage.from_uri(storage_uri)
    resources = ray.cluster_resources()
    concurrency, why = training_concurrency(spec, resources)
    use_gpu = bool(spec.base["use_gpu"]) if spec.base.get("use_gpu") is not None else cluster_has_gpus(resources)
    started = time.time()
    cells = spec.cells()
    log(f"sweep {spec.name}: {len(spec.boards)} board(s) × {len(spec.variants)} variant(s) = {len(cells)} cells; "
        f"{why}; storage {storage.uri_of(f'sweeps/{spec.name}')}")
    storage.write_json(f"sweeps/{spec.name}/sweep.json", {**spec.to_dict(), "storage": storage.uri})

    with tempfile.TemporaryDirectory(prefix="klein-sweep-") as tmp:
        boards = {b.name: prepare_board(b, Path(tmp)) for b in spec.boards}
        run = SweepRun(spec, storage, boards, use_gpu, log)
        for board in boards.values():
            log(f"  board {board.spec.name}: {board.n_refs} refs (band {board.band}), trigger {spec.trigger(board.spec)}")
        results: dict[str, dict] = {}
        failed: dict[str, str] = {}
        with ThreadPoolExecutor(concurrency, thread_name_prefix="sweep-train") as train_pool, \
                ThreadPoolExecutor(max(2, concurrency), thread_name_prefix="sweep-sample") as sample_pool:
            train_futures = {train_pool.submit(_train_cell, run, cell): cell for cell in cells}
            sample_futures = {}
            for fut in as_completed(train_futures):
                cell = train_futures[fut]
                try:
                    outcome = fut.result()
                except Exception as e:  # one failed cell must not stop the sweep
                    log(f"  cell {cell.label} failed in training: {e}")
                    failed[cell.job_id] = f"training: {e}"
                    continue
                if outcome["state"] == "finished":
                    results[cell.job_id] = outcome["manifest"]
                    continue
                sample_futures[sample_pool.submit(_sample_cell, run, cell, outcome)] = cell
            for fut in as_completed(sample_futures):
                cell = sample_futures[fut]
                try:
                    results[cell.job_id] = fut.result()
                except Exception as e:
                    log(f"  cell {cell.label} failed in sampling: {e}")
                    failed[cell.job_id] = f"sampling: {e}"
        report = build_report(run, [results[c.job_id] for c in cells if c.job_id in results], failed,
                              elapsed_s=time.time() - started)
    return report


def _train_cell(run: SweepRun, cell: Cell) -> dict:
    """Training part of a cell (in one of the `concurrency` driver threads). Skips what is already done."""
    board = run.boards[cell.board.name]
    cfg = run.spec.train_config(cell, run.storage.uri)
    cfg.use_gpu = run.use_gpu
    fingerprint = _cell_fingerprint(run, cell, board, cfg)
    cell_manifest = f"{run.cell_prefix(cell)}/manifest.json"
    if run.storage.exists(cell_manifest):
        manifest = run.storage.read_json(cell_manifest)
        if manifest.get("fingerprint") == fingerprint:
            run.log(f"  cell {cell.label} ({cell.job_id}): finished earlier, skipped")
            return {"state": "finished", "manifest": manifest}
        run.log(f"  cell {cell.label}: its manifest has other settings; redoing what changed")
    lora_key = manifest_key(cfg.tenant, cfg.job_id)
    lora = run.storage.read_json(lora_key) if run.storage.exists(lora_key) else None
    if lora is not None:
        _check_same_training(cell, cfg, board, lora)
    _submit_base(run, board)  # base images render on the inference pool while the cell trains
    if lora is not None:
        run.log(f"  cell {cell.label}: LoRA {cell.job_id} trained earlier, reused")
    else:
        run.log(f"  cell {cell.label}: training job {cell.job_id} ({cfg.variant}, {cfg.steps or 'formula'} steps)")
        t0 = time.time()
        lora = run_training_job(board.source, cfg)
        run.log(f"  cell {cell.label}: trained in {time.time() - t0:.0f} s (best val step {lora['best_step']})")
    return {"state": "trained", "lora": lora, "fingerprint": fingerprint}


def _cell_fingerprint(run: SweepRun, cell: Cell, board: PreparedBoard, cfg) -> str:
    train = {k: v for k, v in cfg.to_dict().items() if k not in _TRAIN_CONFIG_KEYS_NOT_COMPARED}
    judged = {"world": run.world_settings(board)} if run.spec.judge == "world" else {}
    return _fingerprint({"train": train, "dataset": board.dataset_hash, "sample": run.sample_fingerprint(board),
                         "use_gpu": run.use_gpu, **judged})


def _check_same_training(cell: Cell, cfg, board: PreparedBoard, lora: dict) -> None:
    """A stored LoRA with this cell's job id must have been trained with this cell's settings."""
    resolved, _ = cfg.resolved(board.n_refs, on_gpu=bool(lora["config"].get("use_gpu")))
    ours = {k: v for k, v in resolved.to_dict().items() if k not in _TRAIN_CONFIG_KEYS_NOT_COMPARED}
    theirs = {k: v for k, v in lora["config"].items() if k not in _TRAIN_CONFIG_KEYS_NOT_COMPARED}
    differ = sorted(k for k in ours if k in theirs and ours[k] != theirs[k])
    if lora.get("dataset", {}).get("hash") not in (None, board.dataset_hash):
        differ.append("dataset (the refs changed)")
    if differ:
        raise SweepError(
            f"cell {cell.label}: LoRA {cell.job_id} exists with other settings ({', '.join(differ)}); "
            "give the sweep a new name, or delete the cell's LoRA to retrain it")


def _submit_base(run: SweepRun, board: PreparedBoard):
    """The base model's images for a board (stored once; rendered on the inference pool when missing)."""
    with run.base_locks[board.spec.name]:
        if board.spec.name in run.base_refs:
            return run.base_refs[board.spec.name]
        prefix = run.base_prefix(board.spec.name)
        fp = _fingerprint(run.sample_fingerprint(board))
        ref = None
        if not (run.storage.exists(f"{prefix}/manifest.json") and run.storage.read_json(f"{prefix}/manifest.json").get("fingerprint") == fp):
            s = run.spec.sample
            ref = _render_task(run.use_gpu).remote(run.spec.model, run.storage.uri, None, run.prompts_for(board),
                                                   run.spec.seeds, run.spec.sample_size(), s.steps, s.guidance, run.use_gpu)
        run.base_refs[board.spec.name] = ref
        return ref


def _base_images(run: SweepRun, board: PreparedBoard) -> dict[str, Any]:
    """{sample name: PIL image} of the base model for `board`, waiting for (and storing) the render if needed."""
    ref = _submit_base(run, board)
    prefix = run.base_prefix(board.spec.name)
    with run.base_locks[board.spec.name]:
        if ref is not None and run.base_refs.get(board.spec.name) is ref:
            pngs = ray.get(ref)
            hashes = {name: run.storage.write_bytes(f"{prefix}/{name}", data) for name, data in pngs.items()}
            run.storage.write_json(f"{prefix}/manifest.json", {"fingerprint": _fingerprint(run.sample_fingerprint(board)),
                                                             "files": hashes})
            run.base_refs[board.spec.name] = None
        files = run.storage.read_json(f"{prefix}/manifest.json")["files"]
    return {name: _png(run.storage.read_verified(f"{prefix}/{name}", sha)) for name, sha in files.items()}


def _sample_cell(run: SweepRun, cell: Cell, outcome: dict) -> dict:
    """Samples of every checkpoint on the inference pool, their scores, and the cell manifest (written last)."""
    lora, board = outcome["lora"], run.boards[cell.board.name]
    s = run.spec.sample
    checkpoints = list(lora["checkpoints"])
    keys = {step: checkpoint_key(cell.job_id, step) for step in checkpoints}
    t0 = time.time()
    pngs = ray.get(_render_task(run.use_gpu).remote(run.spec.model, run.storage.uri, keys, run.prompts_for(board),
                                                    run.spec.seeds, run.spec.sample_size(), s.steps, s.guidance, run.use_gpu))
    base = _base_images(run, board)
    prefix = run.cell_prefix(cell)
    files = {f"samples/{name}": run.storage.write_bytes(f"{prefix}/samples/{name}", data) for name, data in pngs.items()}
    val = {v["step"]: v["val_loss"] for v in lora["metrics"]["val_curve"]}
    samples = []
    for step in checkpoints:
        for p_idx, prompt in enumerate(run.spec.prompts):
            for seed in run.spec.seeds:
                name = sample_name(step, p_idx, seed)
                image = _png(pngs[name])
                samples.append({
                    "step": step, "prompt_index": p_idx, "prompt": prompt, "seed": seed, "file": f"samples/{name}",
                    "style_distance": board.scorer.distance([image]),
                    "content_proxy": content_proxy(image, base[sample_name(None, p_idx, seed)]),
                    "val_loss": val.get(step),
                })
    base_style = {sample_name(None, p, sd): board.scorer.distance([base[sample_name(None, p, sd)]])
                  for p in range(len(run.spec.prompts)) for sd in run.spec.seeds}
    manifest = {
        "sweep": run.spec.name, "board": cell.board.name, "variant": cell.variant.name, "job_id": cell.job_id,
        "n_refs": board.n_refs, "band": board.band, "dataset_hash": board.dataset_hash,
        "decision": lora["decision"], "lora_manifest": manifest_key(lora["tenant"], lora["id"]),
        "steps": lora["metrics"]["steps"], "checkpoints": checkpoints, "delivered_step": lora["delivered_step"],
        "best_step": lora["best_step"], "val_curve": lora["metrics"]["val_curve"],
        "midpoint_jumps": lora.get("midpoint_jumps", []), "base_style_distance": base_style,
        "health": health_cell(lora.get("health")),
        "samples": samples, "files": files, "fingerprint": outcome["fingerprint"], "sample_s": time.time() - t0,
    }
    if run.spec.judge == "world":
        t1 = time.time()
        manifest["world"] = _judge_cell_in_world(run, cell, board, lora["delivered_step"], files)
        run.log(f"  cell {cell.label}: world judge style_prob {manifest['world']['lora']['style_prob']:.2f}, content_ok "
                f"{manifest['world']['lora']['content_ok']:.2f} (base {manifest['world']['base']['style_prob']:.2f}, "
                f"{manifest['world']['base']['content_ok']:.2f}) in {time.time() - t1:.0f} s")
    run.storage.write_json(f"{prefix}/manifest.json", manifest)
    run.log(f"  cell {cell.label}: {len(samples)} samples scored")
    return manifest


def _world_base(run: SweepRun, board: PreparedBoard) -> dict:
    """The base model's world-judge figures for `board` (computed once, stored beside its base images)."""
    settings = run.world_settings(board)
    key = f"{run.base_prefix(board.spec.name)}/world.json"
    with run.base_locks[board.spec.name]:
        if run.storage.exists(key):
            stored = run.storage.read_json(key)
            if stored.get("fingerprint") == _fingerprint(settings):
                return stored["figures"]
        figures = ray.get(_world_task(run.use_gpu).remote(
            run.spec.model, run.storage.uri, None, settings["trigger"], settings["style"], settings["contents"],
            settings["seeds"], run.use_gpu))
        figures.pop("pngs")
        run.storage.write_json(key, {"fingerprint": _fingerprint(settings), "figures": figures})
        return figures


def _judge_cell_in_world(run: SweepRun, cell: Cell, board: PreparedBoard, step: int, files: dict) -> dict:
    """The delivered LoRA's world-judge figures (its images stored under the cell's world/), with the base's."""
    settings = run.world_settings(board)
    lora_figures = ray.get(_world_task(run.use_gpu).remote(
        run.spec.model, run.storage.uri, checkpoint_key(cell.job_id, step), settings["trigger"], settings["style"],
        settings["contents"], settings["seeds"], run.use_gpu))
    prefix = run.cell_prefix(cell)
    for i, data in enumerate(lora_figures.pop("pngs")):
        files[f"world/{i:03d}.png"] = run.storage.write_bytes(f"{prefix}/world/{i:03d}.png", data)
    return {**settings, "step": step, "lora": lora_figures, "base": _world_base(run, board)}


# -- judging -------------------------------------------------------------------------------------------------
def _judge_client(mode: str):
    """The Gemini client for the pairwise judge, or None for the style-score judge."""
    if mode == "offline":
        return None

    client = GeminiClient(GeminiConfig.from_env())
    if not client.available:
        if mode == "gemini":
            raise SweepError("judge: gemini needs GEMINI_API_KEY (or GOOGLE_API_KEY); use judge: auto or offline")
        return None
    return client


def judge_cells(run: SweepRun, manifests: list[dict]) -> list[dict]:
    """Every pair of variants on the same (board, prompt, seed), at their delivered checkpoints; with the
    world judge, every pair of variants on the same board, by their world figures (`WORLD_RULE`)."""
    if run.spec.judge == "world":
        return world_pairs(run.spec, manifests)
    client = _judge_client(run.spec.judge)
    cache_key = f"{run.prefix}/judgements.json"
    cache = run.storage.read_json(cache_key) if run.storage.exists(cache_key) else {}
    by_board: dict[str, list[dict]] = {}
    for m in manifests:
        by_board.setdefault(m["board"], []).append(m)
    order = {v.name: i for i, v in enumerate(run.spec.variants)}
    pairs = []
    for board_name, cells in by_board.items():
        board = run.boards[board_name]
        cells = sorted(cells, key=lambda m: order.get(m["variant"], 0))
        for p_idx, prompt in enumerate(run.spec.prompts):
            for seed in run.spec.seeds:
                for a, b in itertools.combinations(cells, 2):
                    sa, sb = (_delivered_sample(m, p_idx, seed) for m in (a, b))
                    fa, fb = a["files"][sa["file"]], b["files"][sb["file"]]
                    key = _fingerprint([board_name, prompt, seed, a["variant"], b["variant"], fa, fb,
                                        "gemini" if client else "offline"])
                    verdict = cache.get(key)
                    if verdict is None:
                        img_a = _png(run.storage.read_verified(f"{run.prefix}/cells/{a['job_id']}/{sa['file']}", fa))
                        img_b = _png(run.storage.read_verified(f"{run.prefix}/cells/{b['job_id']}/{sb['file']}", fb))
                        verdict = judge_pair(board.refs, img_a, img_b, prompt, client, scorer=board.scorer).model_dump(mode="json")
                        cache[key] = verdict
                    pairs.append({
                        "board": board_name, "prompt_index": p_idx, "prompt": prompt, "seed": seed,
                        "a": a["variant"], "b": b["variant"], "step_a": sa["step"], "step_b": sb["step"],
                        "winner": a["variant"] if verdict["winner"] == "a" else b["variant"],
                        "judge": verdict["source"], "a_shows_content": verdict["a_shows_content"],
                        "b_shows_content": verdict["b_shows_content"], "reason": verdict["reason"],
                    })
    run.storage.write_json(cache_key, cache)
    return pairs


def _keeps_content(figures: dict) -> bool:
    return figures["content_ok"] >= WORLD_CONTENT_MIN


def world_pair_winner(a: dict, b: dict) -> tuple[str | None, str]:
    """`WORLD_RULE` between two cells' world figures ({style_prob, content_ok}): ("a" | "b" | None, reason)."""
    numbers = (f"style_prob {a['style_prob']:.3f} vs {b['style_prob']:.3f}, "
               f"content_ok {a['content_ok']:.2f} vs {b['content_ok']:.2f}")
    if _keeps_content(a) != _keeps_content(b):
        return ("a" if _keeps_content(a) else "b"), f"only one keeps the content ({numbers})"
    if abs(a["style_prob"] - b["style_prob"]) >= WORLD_STYLE_TIE:
        return ("a" if a["style_prob"] > b["style_prob"] else "b"), f"higher style_prob ({numbers})"
    if a["content_ok"] != b["content_ok"]:
        return ("a" if a["content_ok"] > b["content_ok"] else "b"), f"style within {WORLD_STYLE_TIE}, more content ({numbers})"
    return None, f"tie ({numbers})"


def world_board_leaders(figures: dict[str, dict]) -> tuple[list[str], bool]:
    """The board's winner(s) under `WORLD_RULE` from {variant: figures}, and whether any cell kept the content."""
    keepers = {v: f for v, f in figures.items() if _keeps_content(f)}
    pool = keepers or figures
    top = max(f["style_prob"] for f in pool.values())
    near = {v: f for v, f in pool.items() if f["style_prob"] > top - WORLD_STYLE_TIE}
    best_content = max(f["content_ok"] for f in near.values())
    return [v for v, f in near.items() if f["content_ok"] == best_content], bool(keepers)


def world_pairs(spec: SweepSpec, manifests: list[dict]) -> list[dict]:
    """Every pair of variants on the same board, judged by `WORLD_RULE` on the cells' world figures."""
    order = {v.name: i for i, v in enumerate(spec.variants)}
    missing = [f"{m['board']} × {m['variant']}" for m in manifests if "world" not in m]
    if missing:
        raise SweepError(f"judge: world, but these cells have no world figures: {', '.join(missing)}")
    pairs = []
    for board in spec.boards:
        cells = sorted((m for m in manifests if m["board"] == board.name), key=lambda m: order.get(m["variant"], 0))
        for a, b in itertools.combinations(cells, 2):
            side, reason = world_pair_winner(a["world"]["lora"], b["world"]["lora"])
            pairs.append({
                "board": board.name, "prompt_index": None, "prompt": f"{a['world']['lora']['n']} world images",
                "seed": None, "a": a["variant"], "b": b["variant"], "step_a": a["delivered_step"],
                "step_b": b["delivered_step"], "winner": {"a": a["variant"], "b": b["variant"], None: None}[side],
                "judge": "world", "a_shows_content": None, "b_shows_content": None, "reason": reason,
            })
    return pairs


def _delivered_sample(manifest: dict, prompt_index: int, seed: int) -> dict:
    return next(s for s in manifest["samples"] if s["step"] == manifest["delivered_step"]
                and s["prompt_index"] == prompt_index and s["seed"] == seed)


# -- tables -----------------------------------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def compute_tables(spec: SweepSpec, manifests: list[dict], pairs: list[dict]) -> dict[str, dict]:
    """The report's tables as {name: {"title", "columns", "rows"}}; rows are lists of display strings."""
    variants = [v.name for v in spec.variants if any(m["variant"] == v.name for m in manifests)]
    boards = [b.name for b in spec.boards if any(m["board"] == b.name for m in manifests)]
    cell = {(m["board"], m["variant"]): m for m in manifests}
    n_refs = {m["board"]: m["n_refs"] for m in manifests}

    def delivered(m):
        return [s for s in m["samples"] if s["step"] == m["delivered_step"]]

    def record(pair_list, v):
        comps = [p for p in pair_list if v in (p["a"], p["b"])]
        wins = sum(1 for p in comps if p["winner"] == v)
        return wins, len(comps), (wins / len(comps) if comps else None)

    def gemini_content(pair_list, v):
        seen = [p["a_shows_content"] if p["a"] == v else p["b_shows_content"] for p in pair_list if v in (p["a"], p["b"])]
        seen = [s for s in seen if s is not None]
        return (sum(seen) / len(seen)) if seen else None

    def best_style_step(m):
        by_step: dict[int, list[float]] = {}
        for s in m["samples"]:
            by_step.setdefault(s["step"], []).append(s["style_distance"])
        step = min(by_step, key=lambda k: (_mean(by_step[k]), k))
        return step, _mean(by_step[step])

    # the dataset-size × variant matrix and the auto policy per band
    bands = [b for b in BANDS if any(size_band(n_refs[bd]) == b for bd in boards)]
    band_winner, matrix_rows = {}, []
    for band in bands:
        band_boards = [bd for bd in boards if size_band(n_refs[bd]) == band]
        band_pairs = [p for p in pairs if p["board"] in band_boards]
        rates = {v: record(band_pairs, v) for v in variants}
        scored = {v: r[2] for v, r in rates.items() if r[2] is not None}
        if scored:
            top = max(scored.values())
            leaders = [v for v, r in scored.items() if r == top]
            winner = leaders[0] if len(leaders) == 1 else "tie: " + ", ".join(leaders)
        else:
            winner = "—"
        band_winner[band] = winner
        picks = sorted({choose_variant(n_refs[bd]).variant for bd in band_boards})
        if winner == "—" or winner.startswith("tie"):
            agree = "n/a (no single winner)"
        elif len(picks) > 1:
            agree = "agree" if winner in picks else "disagree"
        elif picks[0] not in variants:
            agree = f"n/a ({picks[0]} not in the sweep)"
        else:
            agree = "agree" if picks[0] == winner else "disagree"
        matrix_rows.append([band, ", ".join(f"{bd} ({n_refs[bd]})" for bd in band_boards)]
                           + [f"{_pct(rates[v][2])} ({rates[v][0]}/{rates[v][1]})" for v in variants]
                           + [winner, ", ".join(picks), agree])

    # the seeds' table
    seeds_rows = []
    for v in variants:
        wins, comps, rate = record(pairs, v)
        cells_v = [cell[(bd, v)] for bd in boards if (bd, v) in cell]
        style = _mean(s["style_distance"] for m in cells_v for s in delivered(m))
        base = _mean(d for m in cells_v for d in m["base_style_distance"].values())
        content = _mean(s["content_proxy"] for m in cells_v for s in delivered(m))
        notes = []
        won = [b for b in bands if band_winner.get(b) == v]
        if won:
            notes.append("wins band " + ", ".join(won))
        picked = [b for b in bands if v in next(r[-2] for r in matrix_rows if r[0] == b).split(", ")]
        if picked:
            notes.append("auto policy's pick for " + ", ".join(picked))
        best_val = sum(1 for bd in boards if (bd, v) in cell and all(
            min(x["val_loss"] for x in cell[(bd, v)]["val_curve"]) <= min(x["val_loss"] for x in cell[(bd, w)]["val_curve"])
            for w in variants if (bd, w) in cell))
        notes.append(f"lowest val loss on {best_val}/{len(cells_v)} boards")
        if style is not None and base is not None:
            notes.append(f"style distance {base:.3f} (base) → {style:.3f}")
        drifting = [m["board"] for m in cells_v if (_mean(s["content_proxy"] for s in delivered(m)) or 0.0) < CONTENT_KEPT_AT]
        if drifting:
            notes.append(f"content drifts from the base image on {', '.join(drifting)} (proxy < {CONTENT_KEPT_AT})")
        seeds_rows.append([v, str(wins), str(comps), _pct(rate), _fmt(style), _fmt(content), _pct(gemini_content(pairs, v)),
                           "; ".join(notes)])

    # per board × variant
    board_rows = []
    for bd in boards:
        bpairs = [p for p in pairs if p["board"] == bd]
        for v in variants:
            m = cell.get((bd, v))
            if m is None:
                continue
            wins, comps, rate = record(bpairs, v)
            ds = delivered(m)
            kept = _mean(1.0 if s["content_proxy"] >= CONTENT_KEPT_AT else 0.0 for s in ds)
            best_val = min(m["val_curve"], key=lambda x: x["val_loss"])
            board_rows.append([bd, str(m["n_refs"]), m["band"], v, m["decision"]["variant"], str(wins), str(comps), _pct(rate),
                               _fmt(_mean(s["style_distance"] for s in ds)), _fmt(_mean(m["base_style_distance"].values())),
                               _fmt(_mean(s["content_proxy"] for s in ds)), _pct(kept), _pct(gemini_content(bpairs, v)),
                               _fmt(best_val["val_loss"], 4), str(m["delivered_step"]), m.get("health", "—")])

    # convergence: best step per board and variant
    conv_rows, best_rows = [], []
    for bd in boards:
        options = []
        for v in variants:
            m = cell.get((bd, v))
            if m is None:
                continue
            style_step, style_value = best_style_step(m)
            val_best = min(m["val_curve"], key=lambda x: x["val_loss"])
            options.append((style_value, style_step, v, val_best))
            curve = " → ".join(f"{x['val_loss']:.3f}@{x['step']}" for x in m["val_curve"])
            jumps = "; ".join(f"{j['from_step']}→{j['to_step']} +{j['rise']:.0%}" for j in m["midpoint_jumps"]) or "none"
            conv_rows.append([bd, v, str(m["n_refs"]), str(m["steps"]), curve, str(val_best["step"]), str(style_step),
                              _fmt(style_value), str(m["delivered_step"]), jumps])
        if options:
            style_value, style_step, v, _ = min(options, key=lambda o: (o[0], o[1]))
            val_v = min(options, key=lambda o: o[3]["val_loss"])
            best_rows.append([bd, f"{v} @ step {style_step}", _fmt(style_value), f"{val_v[2]} @ step {val_v[3]['step']}",
                              _fmt(val_v[3]["val_loss"], 4)])

    pair_rows = [[p["board"], _fmt(p["prompt_index"]), _fmt(p["seed"]), p["a"], p["b"], p["winner"] or "tie", p["judge"],
                  _fmt(p["a_shows_content"]), _fmt(p["b_shows_content"]), p["reason"]] for p in pairs]
    sample_rows = [[m["board"], m["variant"], str(s["step"]), str(s["prompt_index"]), str(s["seed"]),
                    _fmt(s["style_distance"], 4), _fmt(s["content_proxy"], 4), _fmt(s["val_loss"], 4),
                    "yes" if s["step"] == m["delivered_step"] else ""]
                   for m in manifests for s in m["samples"]]
    world_judged = world_tables(spec, manifests, pairs) if any("world" in m for m in manifests) else {}
    return {
        **world_judged,
        "seeds_table": {"title": "Seeds' table (all boards)",
                        "columns": ["variant", "wins", "comparisons", "win rate", "style dist.", "content proxy",
                                    "content ok (Gemini)", "notes"], "rows": seeds_rows},
        "board_variant": {"title": "Per board × variant (delivered checkpoint)",
                          "columns": ["board", "refs", "band", "variant", "recipe", "wins", "comparisons", "win rate",
                                      "style dist.", "base style dist.", "content proxy", "content kept",
                                      "content ok (Gemini)", "best val loss", "delivered step", "health"],
                          "rows": board_rows},
        "size_matrix": {"title": "Dataset size × variant (win rate in the band) and the auto policy",
                        "columns": ["refs band", "boards (refs)", *variants, "winner", "auto policy", "auto vs winner"],
                        "rows": matrix_rows},
        "convergence": {"title": "Convergence: best step per board and variant",
                        "columns": ["board", "variant", "refs", "steps", "val loss by checkpoint", "best val step",
                                    "best style step", "style dist. there", "delivered step", "cosine-midpoint jumps"],
                        "rows": conv_rows},
        "best_step": {"title": "Best step per board", "columns": ["board", "best by style score", "style dist.",
                                                                 "best by val loss", "val loss"], "rows": best_rows},
        "pairs": {"title": "Pairwise judgements", "columns": ["board", "prompt", "seed", "a", "b", "winner", "judge",
                                                             "a shows content", "b shows content", "reason"], "rows": pair_rows},
        "samples": {"title": "Every sample", "columns": ["board", "variant", "step", "prompt", "seed", "style dist.",
                                                         "content proxy", "val loss", "delivered"], "rows": sample_rows},
    }


def health_cell(health: dict | None) -> str:
    """A cell's health report (train/health.py) in a few words: the overall verdict, the symptoms that are not ok,
    and the checkpoint it recommends when that is not the delivered one."""
    if not health or "symptoms" not in health:
        return "—" if not health else "no report"
    flagged = flagged_symptoms(health)
    text = health["overall"] + (f" ({', '.join(flagged)})" if flagged else "")
    if health["recommended_step"] != health["delivered_step"]:
        text += f"; use step {health['recommended_step']}"
    return text


def world_tables(spec: SweepSpec, manifests: list[dict], pairs: list[dict]) -> dict[str, dict]:
    """The world judge's tables: every cell's figures, the refs × variant matrix with the winner marked (★), and
    the `auto` policy row (choose_variant's pick at each ref count against the measured winner)."""
    variants = [v.name for v in spec.variants if any(m["variant"] == v.name for m in manifests)]
    cell = {(m["board"], m["variant"]): m for m in manifests if "world" in m}
    boards = sorted({m["board"] for m in cell.values()}, key=lambda bd: (next(m["n_refs"] for m in cell.values() if m["board"] == bd), bd))
    cell_rows, matrix_rows, policy_rows = [], [], []
    for bd in boards:
        here = {v: cell[(bd, v)] for v in variants if (bd, v) in cell}
        first = next(iter(here.values()))
        n, base = first["n_refs"], first["world"]["base"]
        leaders, kept = world_board_leaders({v: m["world"]["lora"] for v, m in here.items()})
        for v, m in here.items():
            fig = m["world"]["lora"]
            wins = sum(1 for p in pairs if p["board"] == bd and p["winner"] == v)
            comps = sum(1 for p in pairs if p["board"] == bd and v in (p["a"], p["b"]))
            style_dist = _mean(s["style_distance"] for s in m["samples"] if s["step"] == m["delivered_step"])
            cell_rows.append([bd, m["world"]["style"], str(n), v, m["decision"]["variant"], f"{fig['style_prob']:.3f}",
                              f"{fig['content_ok']:.2f}", "yes" if _keeps_content(fig) else "no",
                              f"{base['style_prob']:.3f}", f"{base['content_ok']:.2f}", _fmt(style_dist),
                              _fmt(_mean(m["base_style_distance"].values())), f"{wins}/{comps}", str(m["delivered_step"]),
                              "★" if v in leaders else ""])
        winner = leaders[0] if len(leaders) == 1 else "tie: " + ", ".join(leaders)
        if not kept:
            winner += " (no cell keeps the content)"
        matrix_rows.append([f"{n} ({bd}, {first['world']['style']})",
                            f"{base['style_prob']:.2f} / {base['content_ok']:.2f}"]
                           + [(f"{here[v]['world']['lora']['style_prob']:.2f} / {here[v]['world']['lora']['content_ok']:.2f}"
                               + (" ★" if v in leaders else "")) if v in here else "—" for v in variants]
                           + [winner])
        pick = choose_variant(n).variant
        if pick not in here:
            verdict = f"n/a ({pick} not in the sweep)"
        elif pick in leaders:
            verdict = "agree" if len(leaders) == 1 else f"agree (co-winner with {', '.join(v for v in leaders if v != pick)})"
        else:
            verdict = "disagree"
        policy_rows.append([str(n), bd, pick, winner, verdict])
    return {
        "world_cells": {"title": "World judge per cell (delivered checkpoint; base = the base model, same prompts)",
                        "columns": ["board", "style", "refs", "variant", "recipe", "style_prob", "content_ok",
                                    "keeps content", "base style_prob", "base content_ok", "style dist.",
                                    "base style dist.", "wins", "delivered step", "board winner"], "rows": cell_rows},
        "world_matrix": {"title": "Refs × variant: style_prob / content_ok (world judge; ★ = the board's winner)",
                         "columns": ["refs (board, style)", "base", *variants, "winner"], "rows": matrix_rows},
        "policy": {"title": "The seeds' policy (variant: auto, train.recipe.choose_variant) against the measured winner",
                   "columns": ["refs", "board", "auto picks", "measured winner", "auto vs winner"], "rows": policy_rows},
    }


def markdown_table(table: dict) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table["columns"]) + " |",
             "| " + " | ".join("---" for _ in table["columns"]) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def csv_table(table: dict) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table["columns"])
    writer.writerows(table["rows"])
    return buf.getvalue().encode("utf-8")


# -- pictures -----------------------------------------------------------------------------------------------------
_ASCII = str.maketrans({"—": "-", "–": "-", "×": "x", "→": "->", "…": "...", "≥": ">=", "≤": "<=", "÷": "/"})


def _ascii(text: str) -> str:
    """Pillow's built-in font has no dashes, arrows or ×: draw their ASCII stand-ins."""
    return str(text).translate(_ASCII)


def table_png(table: dict, max_col_chars: int = 48) -> bytes:
    """A table drawn as a grid (Pillow only), for the places Markdown does not render."""
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    rows = [table["columns"]] + table["rows"]
    rows = [[(c if len(c) <= max_col_chars else c[: max_col_chars - 3] + "...") for c in map(_ascii, r)] for r in rows]
    pad, row_h = 6, 20
    widths = [max(int(font.getlength(r[i])) for r in rows) + 2 * pad for i in range(len(rows[0]))]
    width, height = sum(widths) + 2, 28 + row_h * len(rows) + 2
    img = Image.new("RGB", (max(width, 320), height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 6), _ascii(table["title"]), fill="black", font=title_font)
    y = 28
    for r, row in enumerate(rows):
        if r == 0:
            draw.rectangle([0, y, width - 1, y + row_h], fill=(230, 234, 242))
        x = 0
        for i, text in enumerate(row):
            draw.text((x + pad, y + 4), text, fill="black", font=font)
            draw.rectangle([x, y, x + widths[i], y + row_h], outline=(180, 180, 180))
            x += widths[i]
        y += row_h
    return _png_bytes(img)


def win_rate_png(table: dict) -> bytes:
    """Bars of each variant's overall win rate."""
    font = ImageFont.load_default(size=12)
    rows = table["rows"]
    w, bar_h, left = 520, 22, 120
    img = Image.new("RGB", (w, 30 + bar_h * max(1, len(rows)) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), "win rate per variant (pairwise, all boards)", fill="black", font=font)
    for i, row in enumerate(rows):
        y = 30 + i * bar_h
        rate = float(row[3].rstrip("%")) / 100 if row[3] != "—" else 0.0
        draw.text((6, y + 4), _ascii(row[0])[:16], fill="black", font=font)
        draw.rectangle([left, y + 3, left + int(rate * (w - left - 60)), y + bar_h - 3], fill=(60, 110, 200))
        draw.text((left + int(rate * (w - left - 60)) + 4, y + 4), f"{row[3]} ({row[1]}/{row[2]})", fill="black", font=font)
    return _png_bytes(img)


def curves_png(manifests: list[dict]) -> bytes:
    """Style distance (left) and validation loss (right) against step, one line per cell."""
    font = ImageFont.load_default(size=11)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    pw, ph, pad = 420, 260, 40
    img = Image.new("RGB", (2 * pw, ph + 20 + 16 * len(manifests)), "white")
    draw = ImageDraw.Draw(img)
    series_sets = []
    for m in manifests:
        by_step: dict[int, list[float]] = {}
        for s in m["samples"]:
            by_step.setdefault(s["step"], []).append(s["style_distance"])
        style = sorted((k, _mean(v)) for k, v in by_step.items())
        val = [(x["step"], x["val_loss"]) for x in m["val_curve"]]
        series_sets.append((style, val))
    for panel, title in enumerate(("style distance to refs (lower = closer)", "validation loss")):
        x0 = panel * pw
        points = [p for s in series_sets for p in s[panel]]
        draw.text((x0 + pad, 4), title, fill="black", font=font)
        draw.rectangle([x0 + pad, 20, x0 + pw - 10, ph - 20], outline="black")
        if not points:
            continue
        smin, smax = min(p[0] for p in points), max(p[0] for p in points)
        vmin, vmax = min(p[1] for p in points), max(p[1] for p in points)
        smax, vmax = (smax if smax > smin else smin + 1), (vmax if vmax > vmin else vmin + 1e-6)

        def xy(step, value, x0=x0, smin=smin, smax=smax, vmin=vmin, vmax=vmax):
            return (x0 + pad + (step - smin) / (smax - smin) * (pw - pad - 10),
                    20 + (1 - (value - vmin) / (vmax - vmin)) * (ph - 40))

        for i, series in enumerate(series_sets):
            pts = [xy(*p) for p in series[panel]]
            if len(pts) > 1:
                draw.line(pts, fill=colours[i % len(colours)], width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[i % len(colours)])
        draw.text((x0 + 2, 20), f"{vmax:.3f}", fill="black", font=font)
        draw.text((x0 + 2, ph - 32), f"{vmin:.3f}", fill="black", font=font)
        draw.text((x0 + pad, ph - 16), f"step {smin}", fill="black", font=font)
        draw.text((x0 + pw - 70, ph - 16), f"step {smax}", fill="black", font=font)
    for i, m in enumerate(manifests):
        draw.text((pad, ph + 4 + 16 * i), f"-- {m['board']} x {m['variant']}", fill=colours[i % len(colours)], font=font)
    return _png_bytes(img)


def board_contact_sheet(run: SweepRun, board: PreparedBoard, manifests: list[dict]) -> bytes:
    """Refs on top; then one row per (prompt, seed): the base model, then every variant at every checkpoint."""
    base = _base_images(run, board)
    size = run.spec.sample_size()
    columns = [("base", None, None)] + [(f"{m['variant']}@{step}{'*' if step == m['delivered_step'] else ''}", m, step)
                                       for m in manifests for step in m["checkpoints"]]
    refs_row = [r.resize((size, size)) for r in board.refs[: len(columns)]]
    rows, labels = [refs_row], ["refs"]
    cache: dict[str, Any] = {}
    for p_idx, prompt in enumerate(run.spec.prompts):
        for seed in run.spec.seeds:
            row = []
            for _, m, step in columns:
                if m is None:
                    row.append(base[sample_name(None, p_idx, seed)])
                    continue
                rel = f"samples/{sample_name(step, p_idx, seed)}"
                key = f"{run.prefix}/cells/{m['job_id']}/{rel}"
                if key not in cache:
                    cache[key] = _png(run.storage.read_verified(key, m["files"][rel]))
                row.append(cache[key])
            rows.append(row)
            labels.append(f"s{seed} {prompt}")
    grid = image_grid(rows, col_labels=[_ascii(c[0]) for c in columns], row_labels=[_ascii(label) for label in labels])
    return _png_bytes(grid)


# -- the report -------------------------------------------------------------------------------------------------
def build_report(run: SweepRun, manifests: list[dict], failed: dict[str, str], elapsed_s: float = 0.0) -> dict:
    """Judge, tabulate, draw; store everything under sweeps/<name>/report/ (its manifest last)."""
    pairs = judge_cells(run, manifests) if manifests else []
    tables = compute_tables(run.spec, manifests, pairs)
    judge_source = sorted({p["judge"] for p in pairs}) or ["none (fewer than two variants per board)"]
    gemini_used = "gemini" in judge_source
    world_used = "world" in judge_source
    if world_used:
        judge_line = f"- Pairwise judge: {WORLD_RULE}. This is a proxy world, not Klein's own quality."
    else:
        judge_line = (f"- Pairwise judge: {', '.join(judge_source)}"
                      + (" (Gemini judge: style winner and whether each image still shows the prompt)" if gemini_used else
                         " (offline: the lower style distance to the board's refs wins; Gemini judges when GEMINI_API_KEY is set)"))
    header = [
        f"# Sweep `{run.spec.name}`",
        "",
        f"{len(manifests)} of {len(run.spec.cells())} cells finished"
        + (f"; failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else "")
        + f"; model `{run.spec.model}`; {len(run.spec.prompts)} prompt(s) × {len(run.spec.seeds)} seed(s); "
        + f"{run.spec.sample.steps} sampling steps at {run.spec.sample_size()} px.",
        "",
        judge_line,
        "- Style distance: klein.style_score (palette + Gram distance to the board's refs; lower = closer).",
        f"- Content check: {CONTENT_PROXY}; 'content kept' = share of samples with proxy ≥ {CONTENT_KEPT_AT}."
        + (" 'content ok (Gemini)' = share of the judge's verdicts saying the image still shows the prompt."
           if gemini_used else " The Gemini content verdict ('content ok (Gemini)') needs GEMINI_API_KEY."),
        "- Validation loss: per checkpoint from each job manifest's metrics.val_curve.",
        "- Bands: 4 refs count with 5–7 and 8–29 with 10–15, as train.recipe.choose_variant groups sizes; "
        "'auto policy' is choose_variant's pick for the band's boards.",
    ]
    order = (["world_matrix", "policy", "world_cells"] if world_used else []) + [
        "seeds_table", "size_matrix", "board_variant", "convergence", "best_step"]
    sections = [f"## {tables[k]['title']}\n\n{markdown_table(tables[k])}" for k in order]
    report_prefix = f"{run.prefix}/report"
    files: dict[str, bytes] = {}
    sheet_names = []
    for board_name, board in run.boards.items():
        cells = [m for m in manifests if m["board"] == board_name]
        if cells:
            name = f"contact_sheets/{_slug(board_name, 40)}.png"
            files[name] = board_contact_sheet(run, board, cells)
            sheet_names.append((board_name, name))
    for key, table in tables.items():
        files[f"{key}.csv"] = csv_table(table)
    for key in order:
        files[f"{key}.png"] = table_png(tables[key])
    files["win_rates.png"] = win_rate_png(tables["seeds_table"])
    if manifests:
        files["curves.png"] = curves_png(manifests)
    pictures = ["## Pictures", ""] + [f"- contact sheet {b}: `{n}` (refs; base; variant@step, * = delivered)" for b, n in sheet_names]
    pictures += ["- win rates: `win_rates.png`; style distance and val loss against step: `curves.png`",
                 "- every table also as `<table>.csv` and `<table>.png`; every sample in `samples.csv`, "
                 "every judgement in `pairs.csv`"]
    markdown = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n\n" + "\n".join(pictures) + "\n"
    files["report.md"] = markdown.encode("utf-8")
    report = {
        "name": run.spec.name, "cells": len(run.spec.cells()), "finished": len(manifests), "failed": failed,
        "judge": judge_source, "judge_rule": WORLD_RULE if world_used else None, "content_check": CONTENT_PROXY,
        "tables": tables, "pairs": pairs,
        "elapsed_s": elapsed_s, "markdown": markdown,
    }
    files["report.json"] = json.dumps(report, indent=1, default=str).encode("utf-8")
    hashes = {name: run.storage.write_bytes(f"{report_prefix}/{name}", data) for name, data in files.items()}
    run.storage.write_json(f"{report_prefix}/manifest.json", {"sweep": run.spec.name, "files": hashes,
                                                              "finished": len(manifests), "failed": failed})
    report["files"] = {name: run.storage.uri_of(f"{report_prefix}/{name}") for name in hashes}
    report["uri"] = run.storage.uri_of(report_prefix)
    return report


# -- command line -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", nargs="?", help="sweep YAML (boards, variants, prompts, seeds, steps overrides)")
    p.add_argument("--example", action="store_true", help=f"run the built-in sweep ({EXAMPLE_SWEEP.name}: 2 procedural "
                   "boards × 2 variants on the tiny model)")
    p.add_argument("--name", default=None, help="sweep name (overrides the file's; outputs under sweeps/<name>/)")
    p.add_argument("--storage", default=None, help="storage URI (overrides the file's; default KLEIN_STORAGE)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, as `ray job submit` "
                   "sets it, else a private local cluster)")
    p.add_argument("--concurrency", type=int, default=None, help="training jobs at once (default: the pool's "
                   "train_gpu ÷ GPUs per job)")
    p.add_argument("--judge", choices=JUDGES, default=None, help="pairwise judge (default: the file's, else auto)")


def cmd_sweep(args: argparse.Namespace) -> int:
    if bool(args.sweep) == bool(args.example):
        print("error: give a sweep YAML or --example (not both)", file=sys.stderr)
        return 2
    path = EXAMPLE_SWEEP if args.example else Path(args.sweep)
    try:
        spec = load_sweep(path, name=args.name, storage=args.storage, concurrency=args.concurrency, judge=args.judge)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # a private local cluster (no address): two training slots, or what the file says
    where = connect_ray(args.address, train_slots=spec.concurrency or min(2, os.cpu_count() or 1))
    print(f"Ray: {where}", flush=True)

    # `ray job stop` (SIGTERM) or Ctrl-C: the cells training in this driver's threads end as "stopped"
    try:
        with stop_jobs_on_signals():
            report = run_sweep(spec, log=lambda line: print(line, flush=True))
    except (SweepError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(report["markdown"])
    print(f"report: {report['uri']}")
    for name, uri in sorted(report["files"].items()):
        if name.endswith((".md", ".png", ".csv")):
            print(f"  {uri}")
    return 0 if not report["failed"] and report["finished"] == report["cells"] else 1


def register(sub) -> None:
    p = sub.add_parser("sweep", help="evaluation sweep: boards × variants on Ray Train, samples, scores, tables")
    add_arguments(p)
    p.set_defaults(func=cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.sweep", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cmd_sweep(args)


if __name__ == "__main__":
    # Run the importable module's code, not this __main__ copy: Ray pickles __main__ functions by value.
    from evaluation import sweep as _sweep

    sys.exit(_sweep.main())

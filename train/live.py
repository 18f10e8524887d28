"""Training you can watch: TensorBoard event files under the job's storage, and sample columns rendered while training
continues.

- `EventLog`: the rank-0 worker writes every step's loss, learning rate, gradient norm and seconds per step (and the
  validation loss at each checkpoint); the driver writes the sample images as they come. Both write into
  `jobs/<job_id>/tensorboard/` (`tensorboard --logdir` that folder). On local storage the files are written in place,
  so TensorBoard shows a run live; elsewhere (s3://, gs://) they are written to a local folder and copied to storage at
  every `sync()` (each checkpoint, each sample column, the end).
- `SampleColumns`: what the job draws of each checkpoint, one inference-pool task per column: the contact sheet's
  (every sample prompt) and the health report's probe (train/health.py). The driver submits the base model's columns
  when training starts and each checkpoint's as soon as its LoRA is in storage (`watching()`), so they render while the
  steps go on; after training the contact sheet is assembled from the stored columns and the health report measured on
  the stored probe, and only what is missing renders then. Columns are stored under a digest of the model and the
  requests, so a resubmitted job reuses what an earlier driver rendered.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cluster.storage import Storage
from contracts import checkpoint_key, sample_column_prefix, tensorboard_key, with_trigger
from klein.generate import GenerateRequest
from klein.model import native_resolution
from train.recipe import TrainConfig
from train.report import image_grid
from train.samples import cached_pipeline, render_with_lora, sample_task_options

log = logging.getLogger("klein.train")

WATCH_POLL_S = 1.0  # how often the driver looks for a new checkpoint's LoRA while training runs


class EventLog:
    """One writer's TensorBoard event file in the job's log folder (`tensorboard_key`).

    `purge_step`: a resumed worker passes its first step, so TensorBoard drops what a killed attempt logged from there on.
    """

    def __init__(self, storage: Storage, job_id: str, role: str, purge_step: int | None = None):
        self.storage = storage
        self.key = tensorboard_key(job_id)
        if storage.is_local:
            self.dir, self._staging = storage.local_path(self.key), None
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self._staging = Path(tempfile.mkdtemp(prefix="klein-tb-"))
            self.dir = self._staging
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step, filename_suffix=f".{role}")

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"train/{name}", float(value), step)

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def sync(self) -> None:
        self.writer.flush()
        if self._staging is not None:
            for path in sorted(self._staging.iterdir()):
                self.storage.write_bytes(f"{self.key}/{path.name}", path.read_bytes())

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def event_log(cfg: TrainConfig, storage: Storage, role: str, purge_step: int | None = None) -> EventLog | None:
    """The job's event log for `role` ("worker" or "driver"), or None under `report_to: none`."""
    return None if cfg.report_to == "none" else EventLog(storage, cfg.job_id, role, purge_step)


def logdir_of(cfg: TrainConfig) -> str:
    """Where to point `tensorboard --logdir` for this job."""
    return Storage.from_uri(cfg.storage).uri_of(tensorboard_key(cfg.job_id))


# -- sample columns --------------------------------------------------------------------------------------------------
def sample_size(cfg: TrainConfig) -> int:
    return cfg.sample_size or native_resolution(cfg.model)


def planned_save_steps(cfg: TrainConfig) -> list[int]:
    """The checkpoints training will save (train/worker.py): every `save_every` and the last step."""
    return sorted(set(range(cfg.save_every, cfg.steps + 1, cfg.save_every)) | {cfg.steps})


def planned_sample_steps(cfg: TrainConfig) -> list[int]:
    """The steps whose LoRA a checkpoint or a sample step writes (train/worker.py), before training says which it
    reached: every `save_every`, every `sample_every`, the last step."""
    steps = set(planned_save_steps(cfg))
    if cfg.sample_every:
        steps |= set(range(cfg.sample_every, cfg.steps + 1, cfg.sample_every))
    return sorted(steps)


def sheet_requests(cfg: TrainConfig) -> list[GenerateRequest]:
    """A contact-sheet column: every sample prompt behind the trigger, seed + the prompt's index."""
    return [GenerateRequest(prompt=with_trigger(cfg.trigger, prompt), seed=cfg.seed + i, steps=cfg.sample_steps,
                            width=sample_size(cfg), height=sample_size(cfg)) for i, prompt in enumerate(cfg.sample_prompts)]


def render_column(model: str, lora_bytes: bytes | None, requests: list[GenerateRequest], use_gpu: bool) -> list[bytes]:
    """`requests` drawn with `lora_bytes` active (None: the base model), as PNG bytes. Runs on the inference pool."""
    pipe = cached_pipeline(model, "cuda" if use_gpu else "cpu")
    out = []
    for image in render_with_lora(pipe, lora_bytes, requests):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


SHEET, PROBE = "sheet", "probe"


class SampleColumns:
    """What a job draws of its checkpoints, rendered on the inference pool as their LoRAs appear (module doc).

    Two families of columns: `sheet` (the contact sheet: the sample prompts, at the base model and every sampled step)
    and, when the job has a health report, `probe` (train/health.py's probe: at the base model and every checkpoint).
    One task per (family, step); the images are stored under a digest of the model and the requests."""

    def __init__(self, cfg: TrainConfig, storage: Storage, probe: list[GenerateRequest] | None = None):
        self.cfg, self.storage = cfg, storage
        self.requests = {SHEET: sheet_requests(cfg)}
        self.planned = {SHEET: planned_sample_steps(cfg)}
        if probe:
            self.requests[PROBE], self.planned[PROBE] = list(probe), planned_save_steps(cfg)
        settings = {"model": cfg.model, "requests": {f: [asdict(r) for r in rs] for f, rs in self.requests.items()}}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.prefix = sample_column_prefix(cfg.job_id, digest)
        self._task = ray.remote(render_column).options(**sample_task_options(bool(cfg.use_gpu)))
        self._pending: dict[tuple[str, int | None], ray.ObjectRef] = {}  # (family, step; None: the base) -> render
        self._lock = threading.Lock()
        self._log: EventLog | None = None

    def column_key(self, family: str, step: int | None, index: int) -> str:
        return f"{self.prefix}/{family}/{'base' if step is None else f'step_{step:06d}'}/{index:02d}.png"

    def stored(self, family: str, step: int | None) -> bool:
        return self.storage.exists(self.column_key(family, step, len(self.requests[family]) - 1))

    def submit(self, family: str, step: int | None) -> None:
        """Render `step`'s column of `family` (None: the base model's) unless it is stored or on its way."""
        with self._lock:
            if (family, step) in self._pending or self.stored(family, step):
                return
            lora = None if step is None else self.storage.read_bytes(checkpoint_key(self.cfg.job_id, step))
            self._pending[family, step] = self._task.remote(self.cfg.model, lora, self.requests[family], bool(self.cfg.use_gpu))

    def collect(self, wait_for: list[tuple[str, int | None]] | None = None) -> None:
        """Store the columns that finished, after waiting for those in `wait_for`; log the sheet's to TensorBoard."""
        with self._lock:
            awaited = [self._pending[k] for k in wait_for or () if k in self._pending]
            if awaited:
                ray.wait(awaited, num_returns=len(awaited))
            refs = list(self._pending.values())
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            for family, step in [k for k, ref in self._pending.items() if ref in ready]:
                pngs = ray.get(self._pending.pop((family, step)))
                for index, png in enumerate(pngs):  # the last image is written last: `stored` looks for it
                    self.storage.write_bytes(self.column_key(family, step, index), png)
                if self._log is not None and family == SHEET:
                    for index, png in enumerate(pngs):
                        self._log.image(f"samples/prompt_{index}", 0 if step is None else step, Image.open(io.BytesIO(png)))
                    self._log.sync()

    @contextlib.contextmanager
    def watching(self):
        """While the block trains, one column at a time, the sheet's before the probe's: the base model's once the first
        checkpoint is stored, each step's once its LoRA is.

        One at a time and only once training holds its resources: where the inference pool shares the training GPU
        (a one-GPU machine), a render asked for earlier would take the GPU before training does, and a queue of them
        would make the contact sheet wait behind the probe when training ends."""
        self._log = event_log(self.cfg, self.storage, "driver")
        waiting = sorted(((family, step) for family, steps in self.planned.items() for step in (None, *steps)),
                         key=lambda k: (k[0] != SHEET, k[1] or 0))
        stop = threading.Event()

        def ready(step: int | None) -> bool:
            steps = self.planned[SHEET] if step is None else [step]
            return any(self.storage.exists(checkpoint_key(self.cfg.job_id, s)) for s in steps)

        def watch() -> None:
            while waiting and not stop.is_set():
                try:
                    self.collect()
                    if not self._pending:
                        key = next((k for k in waiting if ready(k[1])), None)
                        if key is not None:
                            waiting.remove(key)
                            self.submit(*key)
                except Exception as e:  # what is missing renders after training; say why here
                    log.warning("job %s: a sample column could not be rendered during training: %s", self.cfg.job_id, e)
                stop.wait(WATCH_POLL_S)
            self.collect()

        thread = threading.Thread(target=watch, name=f"samples-{self.cfg.job_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        """Close the driver's event log (the sheet does; a failed job's driver too)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def images(self, family: str, steps: list[int]) -> dict[int | None, list[bytes]]:
        """PNG bytes of `family`'s columns at the base model (key None) and at `steps`; missing ones render now."""
        keys = [(family, step) for step in (None, *steps)]
        for key in keys:
            self.submit(*key)
        self.collect(wait_for=keys)
        n = len(self.requests[family])
        return {step: [self.storage.read_bytes(self.column_key(family, step, i)) for i in range(n)] for _, step in keys}

    def sheet(self, steps: list[int]) -> bytes:
        """The contact sheet: one row per prompt, the base model in the first column, then one column per step in
        `steps`; missing columns are rendered now."""
        columns = self.images(SHEET, steps)
        self.close()
        images = [[Image.open(io.BytesIO(png)) for png in columns[step]] for step in (None, *steps)]
        png = io.BytesIO()
        image_grid([list(row) for row in zip(*images)], col_labels=["base"] + [f"step {s}" for s in steps],
                   row_labels=list(self.cfg.sample_prompts)).save(png, format="PNG")
        return png.getvalue()

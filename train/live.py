"""Training you can watch: TensorBoard event files under the job's storage, and sample columns rendered while training
continues.

- `EventLog`: the rank-0 worker writes every step's loss, learning rate, gradient norm and seconds per step (and the
  validation loss at each checkpoint); the driver writes the sample images as they come. Both write into
  `jobs/<job_id>/tensorboard/` (`tensorboard --logdir` that folder). On local storage the files are written in place,
  so TensorBoard shows a run live; elsewhere (s3://, gs://) they are written to a local folder and copied to storage at
  every `sync()` (each checkpoint, each sample column, the end).
- `SampleColumns`: one contact-sheet column (every sample prompt at one checkpoint, or the base model) per inference-pool
  task. The driver submits the base column when training starts and each checkpoint's column as soon as its LoRA is in
  storage (`watching()`), so the samples render while the steps go on; the contact sheet is then assembled from the
  stored columns and only what is missing is rendered after training. Columns are stored under a key of the sample
  settings, so a resumed job reuses what an earlier driver rendered.
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


def planned_sample_steps(cfg: TrainConfig) -> list[int]:
    """The steps whose LoRA a checkpoint or a sample step writes (train/worker.py), before training says which it
    reached: every `save_every`, every `sample_every`, the last step."""
    steps = set(range(cfg.save_every, cfg.steps + 1, cfg.save_every)) | {cfg.steps}
    if cfg.sample_every:
        steps |= set(range(cfg.sample_every, cfg.steps + 1, cfg.sample_every))
    return sorted(steps)


def render_sample_column(model: str, lora_bytes: bytes | None, prompts: list[str], trigger: str, size: int,
                         sample_steps: int, seed: int, use_gpu: bool) -> list[bytes]:
    """Every sample prompt (behind the trigger, seed + its index) with `lora_bytes` active (None: the base model), as
    PNG bytes: one column of the contact sheet. Runs on the inference pool."""
    pipe = cached_pipeline(model, "cuda" if use_gpu else "cpu")
    requests = [GenerateRequest(prompt=with_trigger(trigger, prompt), seed=seed + i, steps=sample_steps, width=size,
                                height=size) for i, prompt in enumerate(prompts)]
    out = []
    for image in render_with_lora(pipe, lora_bytes, requests):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class SampleColumns:
    """The contact sheet's columns of one job, rendered on the inference pool as their LoRAs appear (module doc)."""

    def __init__(self, cfg: TrainConfig, storage: Storage):
        self.cfg, self.storage = cfg, storage
        settings = {"model": cfg.model, "prompts": list(cfg.sample_prompts), "trigger": cfg.trigger,
                    "size": sample_size(cfg), "steps": cfg.sample_steps, "seed": cfg.seed}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.prefix = sample_column_prefix(cfg.job_id, digest)
        self._task = ray.remote(render_sample_column).options(**sample_task_options(bool(cfg.use_gpu)))
        self._pending: dict[int | None, ray.ObjectRef] = {}  # step (None: the base model) -> its render
        self._lock = threading.Lock()
        self._log: EventLog | None = None

    def column_key(self, step: int | None, index: int) -> str:
        return f"{self.prefix}/{'base' if step is None else f'step_{step:06d}'}/{index:02d}.png"

    def stored(self, step: int | None) -> bool:
        return self.storage.exists(self.column_key(step, len(self.cfg.sample_prompts) - 1))

    def submit(self, step: int | None) -> None:
        """Render `step`'s column (None: the base model's) unless it is stored or on its way."""
        with self._lock:
            if step in self._pending or self.stored(step):
                return
            lora = None if step is None else self.storage.read_bytes(checkpoint_key(self.cfg.job_id, step))
            cfg = self.cfg
            self._pending[step] = self._task.remote(cfg.model, lora, list(cfg.sample_prompts), cfg.trigger, sample_size(cfg),
                                                    cfg.sample_steps, cfg.seed, bool(cfg.use_gpu))

    def collect(self, timeout: float | None = 0) -> None:
        """Store the columns that finished (with `timeout=None`, all of them) and log them to TensorBoard."""
        with self._lock:
            refs = list(self._pending.values())
            if not refs:
                return
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for step in [s for s, ref in self._pending.items() if ref in ready]:
                pngs = ray.get(self._pending.pop(step))
                for index, png in enumerate(pngs):  # the last image is written last: `stored` looks for it
                    self.storage.write_bytes(self.column_key(step, index), png)
                if self._log is not None:
                    for index, png in enumerate(pngs):
                        self._log.image(f"samples/prompt_{index}", 0 if step is None else step, Image.open(io.BytesIO(png)))
                    self._log.sync()

    @contextlib.contextmanager
    def watching(self):
        """While the block trains: the base column at once, then each planned step's column when its LoRA is stored."""
        self._log = event_log(self.cfg, self.storage, "driver")
        waiting = [None, *planned_sample_steps(self.cfg)]
        stop = threading.Event()

        def watch() -> None:
            while waiting and not stop.is_set():
                try:
                    for step in [s for s in waiting if s is None or self.storage.exists(checkpoint_key(self.cfg.job_id, s))]:
                        self.submit(step)
                        waiting.remove(step)
                    self.collect(timeout=0)
                except Exception as e:  # the contact sheet renders what is missing after training; say why here
                    log.warning("job %s: a sample column could not be rendered during training: %s", self.cfg.job_id, e)
                stop.wait(WATCH_POLL_S)

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

    def sheet(self, steps: list[int]) -> bytes:
        """The contact sheet: one row per prompt, the base model in the first column, then one column per step in
        `steps`; missing columns are rendered now (renders for steps the sheet leaves out are waited for, and stored)."""
        for step in [None, *steps]:
            self.submit(step)
        self.collect(timeout=None)
        self.close()
        n = len(self.cfg.sample_prompts)
        columns = [[Image.open(io.BytesIO(self.storage.read_bytes(self.column_key(s, i)))) for i in range(n)]
                   for s in [None, *steps]]
        png = io.BytesIO()
        image_grid([list(row) for row in zip(*columns)], col_labels=["base"] + [f"step {s}" for s in steps],
                   row_labels=list(self.cfg.sample_prompts)).save(png, format="PNG")
        return png.getvalue()

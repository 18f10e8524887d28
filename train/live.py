"""Training you can watch: TensorBoard event files under the job's storage, and sample columns rendered while training
continues.

- `EventLog`: the rank-0 worker writes every step's loss, learning rate, gradient norm and seconds per step (and the
  validation loss at each checkpoint); the driver writes the sample images as they come. Both write into
  `jobs/<job_id>/tensorboard/` (`tensorboard --logdir` that folder). On local storage the files are written in place,
  so TensorBoard shows a run live; elsewhere (s3://, gs://) they are written to a local folder and copied to storage at
  every `sync()` (each checkpoint, each sample column, the end).
- `MlflowLog` (`report_to: mlflow`, the `mlflow` extra): the same, to an MLflow run named after the job. Its scalars come
  through Ray Train's own reporting: every `log_every` steps and at each checkpoint the workers call `ray.train.report`
  with the step's metrics, and `MlflowReports`, a `ray.train.UserCallback` on the Train controller, logs rank 0's; the
  driver logs the sample images. MLflow is configured as MLflow always is, by its `MLFLOW_*` environment variables in
  the driver (`MLFLOW_TRACKING_URI` is required: without it each process would write its own `./mlruns`); the driver
  hands them to the controller with the callback.
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
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray.train import UserCallback
from torch.utils.tensorboard import SummaryWriter

from cluster.storage import Storage
from contracts import checkpoint_key, sample_column_prefix, tensorboard_key, with_trigger
from klein.generate import GenerateRequest
from klein.model import native_resolution
from train.errors import ConfigError
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

    def callbacks(self) -> list:
        return []  # the worker writes its own scalars (every step, in its event file)

    def close(self, delivered: bool = True) -> None:
        self.sync()
        self.writer.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def event_log(cfg: TrainConfig, storage: Storage, role: str, purge_step: int | None = None) -> EventLog | None:
    """The job's event log for `role` ("worker" or "driver"), or None unless `report_to: tensorboard`."""
    return EventLog(storage, cfg.job_id, role, purge_step) if cfg.report_to == "tensorboard" else None


def driver_log(cfg: TrainConfig, storage: Storage, params: dict):
    """Where the driver logs the samples (and, for MLflow, what takes the workers' Ray Train reports); `params`: the
    job's public config (an MLflow run's parameters)."""
    if cfg.report_to == "mlflow":
        return MlflowLog(cfg.job_id, params)
    return event_log(cfg, storage, "driver")


# -- MLflow ----------------------------------------------------------------------------------------------------------
MLFLOW_EXPERIMENT = "klein-style"  # unless MLFLOW_EXPERIMENT_NAME names one
REPORTED = ("loss", "lr", "grad_norm", "s_per_step", "val_loss")  # the workers' ray.train.report metrics, as train/<name>


def _mlflow():
    """mlflow's client and entities, imported on use, not at the top: the import takes 1.1 s (2 cores), which every
    `klein-style` start and every Ray Train worker would pay without ever logging to MLflow. The `mlflow` extra
    (mlflow-skinny) provides it; None when it is not installed."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        return None
    return MlflowClient, Metric, Param


def mlflow_settings() -> dict[str, str]:
    """The driver's MLflow settings (its `MLFLOW_*` environment variables), or ConfigError saying what is missing."""
    if _mlflow() is None:
        raise ConfigError("report_to: mlflow needs the mlflow package: pip install 'klein-style[mlflow]' "
                          "(or mlflow / mlflow-skinny)")
    settings = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    if not settings.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("report_to: mlflow needs MLFLOW_TRACKING_URI (a tracking server, http://host:5000, or a "
                          "database such as sqlite:////shared/mlflow.db): without it every Ray process would write "
                          "its own ./mlruns")
    return settings


def _mlflow_client(settings: dict[str, str]):
    # MLflow reads the rest of its settings (credentials, the file store's opt-in) from the environment: in the
    # controller's process they are the driver's, unless that process has its own
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    client_class, _, _ = _mlflow()
    return client_class(tracking_uri=settings["MLFLOW_TRACKING_URI"])


def mlflow_run_id(settings: dict[str, str], job_id: str, params: dict) -> str:
    """The job's MLflow run: found by its `klein.job_id` tag (a resubmitted job goes on in the run it started), else
    created with the job id as its name and the public config as its parameters."""
    client = _mlflow_client(settings)
    name = settings.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`klein.job_id` = '{job_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=job_id, tags={"klein.job_id": job_id})
    _, _, Param = _mlflow()
    client.log_batch(run.info.run_id, params=[Param(k, json.dumps(v)[:500]) for k, v in sorted(params.items())])
    return run.info.run_id


class MlflowReports(UserCallback):
    """On the Ray Train controller: rank 0's metrics of every `ray.train.report` into the job's MLflow run, as
    `train/<name>` at the reported step. A tracking server that fails is logged, never fails the training."""

    def __init__(self, settings: dict[str, str], run_id: str):
        self.settings, self.run_id = settings, run_id
        self._client = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        reported = metrics[0] if metrics else {}
        if "step" not in reported:
            return
        _, Metric, _ = _mlflow()
        now = int(time.time() * 1000)
        batch = [Metric(f"train/{name}", float(reported[name]), now, int(reported["step"]))
                 for name in REPORTED if reported.get(name) is not None]
        try:
            self._client = self._client or _mlflow_client(self.settings)
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # noqa: BLE001 — a tracking server's failure is not the job's
            log.warning("MLflow run %s: step %s not logged: %s", self.run_id, reported["step"], e)


class MlflowLog:
    """The driver's side of `report_to: mlflow`: the run (`mlflow_run_id`), the sample images, the run's end."""

    def __init__(self, job_id: str, params: dict):
        self.settings = mlflow_settings()
        self.client = _mlflow_client(self.settings)
        self.run_id = mlflow_run_id(self.settings, job_id, params)

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        try:
            self.client.log_image(self.run_id, image.convert("RGB"), key=tag, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow run %s: image %s at step %s not logged: %s", self.run_id, tag, step, e)

    def sync(self) -> None:
        pass  # each call above is written through

    def callbacks(self) -> list:
        return [MlflowReports(self.settings, self.run_id)]

    def close(self, delivered: bool = True) -> None:
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if delivered else "FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow run %s not ended: %s", self.run_id, e)


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


def render_column(model: str, lora_bytes: bytes | None, requests: list[GenerateRequest], use_gpu: bool,
                  fail: bool = False) -> list[bytes]:
    """`requests` drawn with `lora_bytes` active (None: the base model), as PNG bytes. Runs on the inference pool.
    `fail`: the testing hook `fail_samples` (the inference GPU too small for the samples)."""
    if fail:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (testing hook fail_samples)")
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

    def __init__(self, cfg: TrainConfig, storage: Storage, probe: list[GenerateRequest] | None = None,
                 log=None):
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
        self._log = log  # where the sheet's columns are logged as they come (driver_log)

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
            self._pending[family, step] = self._task.remote(self.cfg.model, lora, self.requests[family], bool(self.cfg.use_gpu),
                                                            family == SHEET and self.cfg.fail_samples)

    def collect(self, wait_for: list[tuple[str, int | None]] | None = None) -> None:
        """Store the columns that finished, after waiting for those in `wait_for`; log the sheet's (TensorBoard, MLflow).

        A column whose render failed is dropped (a later `images` renders it again): its error is raised here if it is
        in `wait_for`, else logged, so that one family's failure (the sheet's) never fails the other's (the probe's)."""
        failed: dict[tuple[str, int | None], Exception] = {}
        with self._lock:
            awaited = [self._pending[k] for k in wait_for or () if k in self._pending]
            if awaited:
                ray.wait(awaited, num_returns=len(awaited))
            refs = list(self._pending.values())
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            for family, step in [k for k, ref in self._pending.items() if ref in ready]:
                try:
                    pngs = ray.get(self._pending.pop((family, step)))
                except Exception as e:  # noqa: BLE001 — the render's own error, raised or logged below
                    failed[family, step] = e
                    continue
                for index, png in enumerate(pngs):  # the last image is written last: `stored` looks for it
                    self.storage.write_bytes(self.column_key(family, step, index), png)
                if self._log is not None and family == SHEET:
                    for index, png in enumerate(pngs):
                        self._log.image(f"samples/prompt_{index}", 0 if step is None else step, Image.open(io.BytesIO(png)))
                    self._log.sync()
        for key, error in failed.items():
            if key not in (wait_for or ()):
                log.warning("job %s: the %s column at step %s could not be rendered: %s", self.cfg.job_id, *key, error)
        wanted = [key for key in wait_for or () if key in failed]
        if wanted:
            raise failed[wanted[0]]

    @contextlib.contextmanager
    def watching(self):
        """While the block trains, one column at a time, the sheet's before the probe's: the base model's once the first
        checkpoint is stored, each step's once its LoRA is.

        One at a time and only once training holds its resources: where the inference pool shares the training GPU
        (a one-GPU machine), a render asked for earlier would take the GPU before training does, and a queue of them
        would make the contact sheet wait behind the probe when training ends."""
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
            try:
                self.collect()
            except Exception as e:  # noqa: BLE001 — as above
                log.warning("job %s: a sample column could not be rendered during training: %s", self.cfg.job_id, e)

        thread = threading.Thread(target=watch, name=f"samples-{self.cfg.job_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def close(self, delivered: bool = True) -> None:
        """Close the driver's log (the sheet does; the job's driver whatever happens). A log that cannot be closed
        (its storage or tracking server gone) is a warning, never the job's failure."""
        if self._log is not None:
            log_, self._log = self._log, None
            try:
                log_.close(delivered)
            except Exception as e:  # noqa: BLE001
                log.warning("job %s: the driver's log not closed: %s", self.cfg.job_id, e)

    def _wait_for_pending(self) -> None:
        """Until every column on its way has finished (or failed); `collect` then stores or reports it."""
        with self._lock:
            refs = list(self._pending.values())
        if refs:
            ray.wait(refs, num_returns=len(refs))

    def images(self, family: str, steps: list[int]) -> dict[int | None, list[bytes]]:
        """PNG bytes of `family`'s columns at the base model (key None) and at `steps`; missing ones render now."""
        keys = [(family, step) for step in (None, *steps)]
        for key in keys:
            # one column at a time, after whatever is still rendering (the watcher's last column, the other family's):
            # a second render at once would start a second inference-pool process and load the model into it again
            # (on two CPU cores that start-up, ~8 CPU-s, costs more than the column; on a GPU pool, a model load), where
            # the warm process draws each column in a fraction of that
            self._wait_for_pending()
            self.submit(*key)
            self.collect(wait_for=[key])
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

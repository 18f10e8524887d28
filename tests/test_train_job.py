"""Style LoRA jobs through real Ray Train on a local cluster: outputs, learning, and the training faults of
issue 8 — a worker killed mid-step, a worker killed in the middle of a checkpoint write, a driver killed and
its job resubmitted — each of which must end in the LoRA an uninterrupted run makes, with no step trained
twice. Every job shares one storage root (the latent cache is built once) and the clean run is the baseline.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.train import UserCallback

from cluster.storage import Storage
from formula_reference import rectified_flow_loss  # tests/ is on sys.path
from klein.generate import GenerateRequest, generate_image, set_active_loras
from klein.lora import read_lora
from klein.model import load_pipeline
from klein.style_score import style_distance
from evaluation.board import make_board
from train.cache import load_cache
from train.health import SYMPTOMS
from train.health import render_health
from train.job import checkpoint_key, health_task_args, lora_prefix, prepare_dataset, run_training_job
from train.recipe import TrainConfig
from train.report import image_grid
from contracts import CONTACT_SHEET, tensorboard_key
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import reliability  # the ledger plugin's own module (tests/ is on sys.path), also the workers' fault hook


@pytest.fixture(scope="module")
def fault_plan(tmp_path_factory):
    """Where a test tells the workers' fault hook what to break (tests/reliability.py: install_fault_hooks)."""
    return tmp_path_factory.mktemp("faults") / "plan.json"


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir, fault_plan):
    from cluster.pools import init_local_ray

    root = str(Path(__file__).resolve().parents[1])  # workers import the hook as tests.reliability
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    init_local_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024, runtime_env={
        "worker_process_setup_hook": "tests.reliability.install_fault_hooks",
        # the Train controller polls its workers every 0.1 s (default 2 s), so a reported checkpoint is
        # registered, and a dead worker noticed, within a step or two: the resume points below are deterministic
        "env_vars": {reliability.FAULT_PLAN_ENV: str(fault_plan), "PYTHONPATH": pythonpath,
                     "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"},
    })
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    make_board("neon", 8, out, size=256, seed=0)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


def _cfg(storage, job_id, **kw):
    # rank 16 + adamw set explicitly: under `variant: auto` (GEM+A for 8 refs: rank 32, adafactor) they must win
    base = dict(trigger="zxy_neon", storage=str(storage), resolution=64, steps=20, save_every=5, job_id=job_id,
                lr=2e-3, sample_prompts=["a house"], sample_steps=4, seed=0, rank=16, optimizer="adamw")
    base.update(kw)
    return TrainConfig(**base)


# fault runs train exactly as the clean run does; only their contact sheets are cheaper (1 sampling step)
FAULT_RUN = {"sample_steps": 1}


@pytest.fixture(scope="module")
def clean(ray_cluster, board, store):
    """The uninterrupted run every fault test must reproduce exactly."""
    statuses = []
    manifest = run_training_job(board, _cfg(store, "job-e2e"), progress=lambda s: statuses.append(s["state"]))
    return {"manifest": manifest, "statuses": statuses}


def _lora(storage: Storage, job_id: str):
    return read_lora(storage.read_bytes(f"{lora_prefix('default', job_id)}/lora.safetensors"))


def _assert_same_run(storage: Storage, clean: dict, manifest: dict, job_id: str) -> None:
    """The faulty run equals the clean one: every step trained once, the same losses, the same LoRA."""
    m = manifest["metrics"]
    assert m["steps_trained_once"] and [e["step"] for e in m["loss_curve"]] == list(range(1, 21))
    clean_losses = [e["loss"] for e in clean["manifest"]["metrics"]["loss_curve"]]
    assert np.allclose(clean_losses, [e["loss"] for e in m["loss_curve"]], atol=1e-5)
    a, b = _lora(storage, "job-e2e"), _lora(storage, job_id)
    assert set(a.layers) == set(b.layers)
    for name in a.layers:
        assert torch.allclose(a.layers[name].up, b.layers[name].up, atol=1e-5)
        assert torch.allclose(a.layers[name].down, b.layers[name].down, atol=1e-5)


def _open_event_writers() -> int:
    """TensorBoard writers this process has not closed: each keeps its writer thread until `close()` (it reopens its
    file for every write, so no file stays open to look for)."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


def test_job_writes_a_complete_verified_lora(clean, store):
    manifest, statuses = clean["manifest"], clean["statuses"]
    storage = Storage.from_uri(store)
    prefix = lora_prefix("default", "job-e2e")
    assert storage.read_json(f"{prefix}/manifest.json") == json.loads(json.dumps(manifest, default=str))
    for name, sha in manifest["files"].items():
        storage.read_verified(f"{prefix}/{name}", sha)  # every file present and matching its sha256
    lora = read_lora(storage.read_bytes(f"{prefix}/lora.safetensors"))
    assert lora.meta["trigger"] == "zxy_neon" and lora.rank == 16 and lora.meta["base_model"].startswith("tiny")
    # the ComfyUI export is named after the job and its trigger (ComfyUI's models/loras folder is flat)
    assert manifest["comfyui_file"] == "job-e2e_zxy_neon.safetensors" and manifest["comfyui_file"] in manifest["files"]
    comfy = read_lora(storage.read_bytes(f"{prefix}/job-e2e_zxy_neon.safetensors"))
    assert comfy.meta["source_format"] == "comfyui" and set(comfy.layers) == set(lora.layers)
    # ... and the LoRA itself under the job's name (no `name` set: the job id), the same bytes as lora.safetensors
    assert (manifest["name"], manifest["lora_file"]) == ("job-e2e", "job-e2e.safetensors")
    assert manifest["files"]["job-e2e.safetensors"] == manifest["files"]["lora.safetensors"]
    assert manifest.get("contact_sheet") is None and "samples/contact_sheet.png" in manifest["files"]
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{prefix}/samples/contact_sheet.png")))
    assert sheet.width > sheet.height  # base + 4 checkpoints side by side
    Image.open(io.BytesIO(storage.read_bytes(f"{prefix}/samples/loss.png"))).verify()
    m = manifest["metrics"]
    assert m["steps"] == 20 and m["steps_trained_once"] and m["attempts"] == 1
    assert [v["step"] for v in m["val_curve"]] == [5, 10, 15, 20]
    assert manifest["checkpoints"] == [5, 10, 15, 20] and manifest["best_step"] in manifest["checkpoints"]
    assert manifest["decision"]["variant"] == "GEM+A"  # 8 refs
    # the user's keys won over GEM+A's and the manifest says where every value came from
    assert (manifest["config"]["rank"], manifest["config"]["optimizer"]) == (16, "adamw")
    sources = manifest["config_sources"]
    assert sources["rank"] == sources["optimizer"] == "user" and sources["use_gemini"] == "variant"
    assert sources["steps"] == "user" and sources["linear_alpha"] == "formula" and sources["targets"] == "default"
    assert any(w.startswith("rank: 16 is set explicitly where GEM+A") for w in manifest["warnings"])
    assert manifest["style_profile"]["source"] == "offline"
    assert manifest["captions"] and all(not k.startswith("/") for k in manifest["dataset"]["refs"][0])
    assert statuses[0] == "preparing" and statuses[-1] == "done"
    assert storage.read_json("jobs/job-e2e/status.json")["state"] == "done"
    assert "contact_sheet" not in storage.read_json("jobs/job-e2e/status.json")
    assert any(p.name.endswith(".driver") for p in storage.local_path(tensorboard_key("job-e2e")).iterdir())
    # the health report came after delivery (train/health.py): every symptom of the seeds' table, with evidence
    assert statuses.index("checking health") == len(statuses) - 2
    health = manifest["health"]
    assert [s["id"] for s in health["symptoms"]] == [key for key, _, _ in SYMPTOMS]
    assert all(s["verdict"] in ("ok", "warn", "fail") and s["evidence"] for s in health["symptoms"])
    assert [m["step"] for m in health["checkpoints"]] == [5, 10, 15, 20] and health["recommended_step"] in manifest["checkpoints"]
    assert health["probe"]["prompts"] == ["a house"] and health["dataset"]["refs"] == 8
    assert "samples/health.png" in manifest["files"] and "samples/health.md" in manifest["files"]
    md = storage.read_verified(f"{prefix}/samples/health.md", manifest["files"]["samples/health.md"]).decode()
    assert md.startswith("# Health of LoRA `job-e2e`") and "the trigger word has no effect" in md


def test_the_job_logs_every_step_and_its_samples_for_tensorboard(clean, store, board):
    """TensorBoard event files under jobs/<id>/tensorboard: the worker's loss, lr, grad norm and s/step at every step
    and the validation loss at each checkpoint, as the manifest has them; the driver's sample images for the base and
    every checkpoint; the contact sheet is exactly those stored columns side by side; and the health report made from
    the probe drawn during training is the one drawing the whole probe afterwards gives."""
    manifest = clean["manifest"]
    storage = Storage.from_uri(store)
    events = EventAccumulator(str(storage.local_path(tensorboard_key("job-e2e"))), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 21))
    assert np.allclose([e.value for e in loss], [e["loss"] for e in manifest["metrics"]["loss_curve"]], rtol=1e-6)
    val = events.Scalars("train/val_loss")
    assert [(e.step, round(e.value, 5)) for e in val] == [(v["step"], round(v["val_loss"], 5)) for v in manifest["metrics"]["val_curve"]]
    for tag in ("train/lr", "train/grad_norm", "train/s_per_step"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 20 and all(np.isfinite(v) and v >= 0 for v in values) and max(values) > 0, tag
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] <= 2e-3 and lrs[-1] < lrs[0]  # the cosine schedule from the config's lr
    images = events.Images("samples/prompt_0")
    assert [e.step for e in images] == [0, 5, 10, 15, 20]  # 0: the base model
    # the sheet is assembled from the columns rendered during training, pixel for pixel
    keys = sorted(k for k in storage.list("jobs/job-e2e/samples", recursive=True)
                  if k.endswith("/00.png") and "/sheet/" in k)  # base, then the steps
    assert [k.split("/")[-2] for k in keys] == ["base", "step_000005", "step_000010", "step_000015", "step_000020"]
    stored = [Image.open(io.BytesIO(storage.read_bytes(k))) for k in keys]
    expected = image_grid([stored], col_labels=["base"] + [f"step {s}" for s in (5, 10, 15, 20)], row_labels=["a house"])
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{lora_prefix('default', 'job-e2e')}/samples/contact_sheet.png")))
    assert np.array_equal(np.asarray(sheet.convert("RGB")), np.asarray(expected.convert("RGB")))

    cfg = _cfg(store, "job-e2e")
    prepared, resolved = prepare_dataset(board, cfg, on_gpu=False)
    checkpoints = [(step, storage.read_bytes(checkpoint_key("job-e2e", step))) for step in manifest["checkpoints"]]
    # drawn with the thread count of the 1-CPU inference task that drew the probe during training: CPU matmuls sum
    # in another order with another count, and a rounded measure can then differ in its last digit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        drawn_afterwards, _, _ = render_health(**health_task_args(resolved, prepared, checkpoints, manifest["delivered_step"], True))
    finally:
        torch.set_num_threads(threads)
    assert drawn_afterwards == manifest["health"]


class ReportsToFile(UserCallback):
    """Ray Train's public callback, run on the Train controller: every report the workers make, one JSON line each."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint is not None}) + "\n")


# the controller is another process, which cannot import this test module: the callback travels by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WATCHED_REPORTS = [3, 5, 6, 9, 10, 12, 15, 18, 20]  # every log_every (3) and every checkpoint (5, 10, 15, 20)


@pytest.fixture(scope="module")
def watched(ray_cluster, board, store, tmp_path_factory, monkeypatch_module):
    """A job that reports to MLflow (a local file store: MLflow's file backend, opted in), with a name of its own and
    Ray Train reports every 3 steps, seen through Ray Train's public UserCallback too."""
    folder = tmp_path_factory.mktemp("watched")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"file://{folder / 'mlruns'}")
    monkeypatch_module.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch_module.setenv("MLFLOW_EXPERIMENT_NAME", "klein-test")
    reports = folder / "reports.jsonl"
    manifest = run_training_job(board, _cfg(store, "job-watched", report_to="mlflow", log_every=3, name="neon_v1",
                                            health=False, **FAULT_RUN), callbacks=[ReportsToFile(str(reports))])
    return {"manifest": manifest, "reports": [json.loads(line) for line in reports.read_text().splitlines()],
            "mlflow": MlflowClient(tracking_uri=f"file://{folder / 'mlruns'}")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_ray_train_reports_the_step_metrics_every_log_every_steps(watched):
    """The workers' `ray.train.report` reaches Ray Train's callbacks on every `log_every` step and every checkpoint, with
    the step's loss (the manifest's), lr, grad norm and s/step; the checkpoints' reports carry the validation loss."""
    manifest, reports = watched["manifest"], watched["reports"]
    rank0 = [r["metrics"][0] for r in reports]
    assert [m["step"] for m in rank0] == WATCHED_REPORTS
    losses = {e["step"]: e["loss"] for e in manifest["metrics"]["loss_curve"]}
    assert all(np.isclose(m["loss"], losses[m["step"]], rtol=1e-6) for m in rank0)
    assert all(m["lr"] >= 0 and m["grad_norm"] > 0 and m["s_per_step"] > 0 for m in rank0), rank0
    assert rank0[0]["lr"] > rank0[-1]["lr"]  # the cosine schedule, down to 0 at the last step
    assert [(m["step"], r["checkpoint"]) for m, r in zip(rank0, reports) if "val_loss" in m] == [(5, True), (10, True), (15, True), (20, True)]
    assert [round(m["val_loss"], 6) for m in rank0 if "val_loss" in m] == [round(v["val_loss"], 6) for v in manifest["metrics"]["val_curve"]]


def test_report_to_mlflow_logs_the_run_through_ray_train_and_the_driver(watched, store):
    """`report_to: mlflow`: one run named after the job, read back through MLflow's own client: the config as its
    parameters, Ray Train's reports as `train/*` metrics at their steps, the sample columns as images, ended FINISHED
    (the driver closed it); no TensorBoard files."""
    client, manifest = watched["mlflow"], watched["manifest"]
    experiment = client.get_experiment_by_name("klein-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "job-watched" and run.data.tags["klein.job_id"] == "job-watched"
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["rank"]) == 16 and json.loads(run.data.params["name"]) == "neon_v1"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == WATCHED_REPORTS
    losses = {e["step"]: e["loss"] for e in manifest["metrics"]["loss_curve"]}
    assert all(np.isclose(m.value, losses[m.step], rtol=1e-6) for m in loss)
    val = client.get_metric_history(run.info.run_id, "train/val_loss")
    assert [(m.step, round(m.value, 5)) for m in val] == [(v["step"], round(v["val_loss"], 5)) for v in manifest["metrics"]["val_curve"]]
    for name in ("train/lr", "train/grad_norm", "train/s_per_step"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == WATCHED_REPORTS, name
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [0, 5, 10, 15, 20]  # 0: the base model
    assert not Storage.from_uri(store).exists(tensorboard_key("job-watched"))


def test_the_lora_is_delivered_under_the_jobs_name_beside_its_old_name(watched, store):
    """`name`: the LoRA is also `<name>.safetensors` (the same bytes, in the manifest's files with its sha256), and the
    fixed `lora.safetensors` stays for the readers that load it (serving, the stock diffusers loader)."""
    manifest = watched["manifest"]
    storage = Storage.from_uri(store)
    prefix = lora_prefix("default", "job-watched")
    assert (manifest["name"], manifest["lora_file"]) == ("neon_v1", "neon_v1.safetensors")
    named = storage.read_verified(f"{prefix}/neon_v1.safetensors", manifest["files"]["neon_v1.safetensors"])
    assert named == storage.read_verified(f"{prefix}/lora.safetensors", manifest["files"]["lora.safetensors"])
    assert read_lora(named).meta["job_id"] == "job-watched"
    assert manifest["comfyui_file"] == "job-watched_zxy_neon.safetensors" and manifest["comfyui_file"] in manifest["files"]


@pytest.fixture(scope="module")
def killed(ray_cluster, board, store):
    """A job whose worker process is killed mid-step (after the step-10 checkpoint) and whose every contact-sheet render
    fails on the inference pool (the fail_samples hook raises CUDA's out-of-memory error there). Two faults of one job,
    checked by two tests: the sheet is made on the driver after delivery, the kill is survived on the workers before it,
    so neither fault touches what the other test checks, and the suite runs one Ray Train job fewer."""
    statuses = []
    writers_before = _open_event_writers()
    manifest = run_training_job(board, _cfg(store, "job-killed", fail_at_step=11, fail_samples=True, **FAULT_RUN),
                                progress=lambda s: statuses.append(s))
    return {"manifest": manifest, "statuses": statuses, "writers_before": writers_before,
            "writers_after": _open_event_writers()}


def test_a_contact_sheet_that_fails_after_delivery_leaves_the_job_delivered(killed, store):
    """Every contact-sheet render fails on the inference pool: the LoRA stays delivered, the job ends done, its manifest
    and status say why it has no sheet, the health report is still made, and the driver's TensorBoard log is closed
    all the same."""
    manifest, statuses = killed["manifest"], killed["statuses"]
    storage = Storage.from_uri(store)
    prefix = lora_prefix("default", "job-killed")
    error = manifest["contact_sheet"]["error"]
    assert error.startswith("no contact sheet: OutOfMemoryError: CUDA out of memory") and "fail_samples" in error
    assert CONTACT_SHEET not in manifest["files"] and not storage.exists(f"{prefix}/{CONTACT_SHEET}")
    assert storage.read_json(f"{prefix}/manifest.json") == json.loads(json.dumps(manifest, default=str))
    for name, sha in manifest["files"].items():
        storage.read_verified(f"{prefix}/{name}", sha)  # what it names is there
    status = storage.read_json("jobs/job-killed/status.json")
    assert status["state"] == "done" and status["contact_sheet"]["error"] == error
    assert [s["state"] for s in statuses][-3:] == ["rendering samples", "checking health", "done"]
    assert manifest["health"]["symptoms"] and "samples/health.png" in manifest["files"]
    assert any(p.name.endswith(".driver") for p in storage.local_path(tensorboard_key("job-killed")).iterdir())
    assert killed["writers_after"] == killed["writers_before"]  # the driver's writer was closed, though the sheet never was made


@pytest.mark.reliability("faults")
def test_a_killed_worker_resumes_exactly(killed, clean, store):
    """Kill the worker process mid-step (after the step-10 checkpoint); Ray Train restarts it from that
    checkpoint; the final LoRA equals an uninterrupted run with the same seed and no step ran twice."""
    storage = Storage.from_uri(store)
    assert storage.exists("jobs/job-killed/fault_injected_11")
    assert killed["manifest"]["metrics"]["attempts"] == 2 and clean["manifest"]["metrics"]["attempts"] == 1
    _assert_resumed_from(store, "job-killed", (10,))  # the hook waits for Ray Train to register step 10 first
    _assert_same_run(storage, clean, killed["manifest"], "job-killed")


def _assert_resumed_from(store, job_id: str, checkpoints: tuple[int, ...]) -> None:
    """Steps up to a checkpoint were trained by the first attempt and all later ones by the second: the run
    resumed from that checkpoint (the latest one Ray Train had registered when the fault hit)."""
    attempts = [e["attempt"] for e in _step_log(store, job_id)]
    resumed_at = attempts.index(1) if 1 in attempts else None
    assert resumed_at in checkpoints and attempts == [0] * resumed_at + [1] * (20 - resumed_at), attempts


def _step_log(store, job_id: str) -> list[dict]:
    """The final checkpoint's step log (step, loss, lr, attempt per trained step), from Ray Train's storage."""
    runs = Path(store) / "ray_train" / job_id
    states = sorted(runs.glob("checkpoint_*/state.json"), key=lambda p: json.loads(p.read_text())["step"])
    assert states, f"no Ray Train checkpoint under {runs}"
    return json.loads(states[-1].read_text())["log"]


@pytest.mark.reliability("faults")
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(clean, board, store, fault_plan, tmp_path):
    """The worker is killed half-way through writing its step-10 checkpoint (the bytes it had written are on
    disk). The step-5 checkpoint is intact, the half-written file is never visible under its name or in a
    listing, Ray Train resumes from step 5, and the job ends with the clean run's LoRA."""
    storage = Storage.from_uri(store)
    key = checkpoint_key("job-ckptkill", 10)
    fired = tmp_path / "fired"
    fault_plan.write_text(json.dumps({"kill_during_write": key, "fired": str(fired), "delay_s": 1.0}))
    try:
        manifest = run_training_job(board, _cfg(store, "job-ckptkill", **FAULT_RUN))
    finally:
        fault_plan.unlink()
    assert fired.exists(), "the fault was not injected"
    folder = storage.local_path("jobs/job-ckptkill/checkpoints")
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".tmp-") and p.name.endswith("step_000010.safetensors")]
    full = storage.read_bytes(key)
    assert leftovers and all(0 < p.stat().st_size < len(full) for p in leftovers)  # the crash left half a file...
    assert storage.list("jobs/job-ckptkill/checkpoints") == [  # ...which no reader ever sees
        f"jobs/job-ckptkill/checkpoints/step_{s:06d}.safetensors" for s in (5, 10, 15, 20)]
    for step in (5, 10):  # the previous checkpoint intact, the rewritten one complete: both as in the clean run
        a = read_lora(storage.read_bytes(checkpoint_key("job-ckptkill", step)))
        b = read_lora(storage.read_bytes(checkpoint_key("job-e2e", step)))
        assert a.meta["step"] == step and set(a.layers) == set(b.layers)
        assert all(torch.allclose(a.layers[n].up, b.layers[n].up, atol=1e-6)
                   and torch.allclose(a.layers[n].down, b.layers[n].down, atol=1e-6) for n in a.layers)
    _assert_resumed_from(store, "job-ckptkill", (5,))  # the step-10 checkpoint was never reported
    assert manifest["metrics"]["attempts"] == 2
    _assert_same_run(storage, clean, manifest, "job-ckptkill")


def _columns(storage: Storage, job_id: str) -> set:
    """The contact-sheet columns stored for a job: "base" and checkpoint steps."""
    keys = [k for k in storage.list(f"jobs/{job_id}/samples", recursive=True) if k.endswith(".png") and "/sheet/" in k]
    return {("base" if k.split("/")[-2] == "base" else int(k.split("/")[-2].split("_")[1])) for k in keys}


DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from train.job import run_training_job
    from train.recipe import TrainConfig

    address, board, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ray.init(address=address)
    run_training_job(board, TrainConfig.from_dict(cfg))  # the explicit keys only: they still win
""")


@pytest.mark.reliability("faults")
def test_resubmitting_a_job_after_its_driver_died_resumes_it(clean, board, store):
    """A driver process runs the job and is killed (SIGKILL) once the step-10 checkpoint is saved; submitting
    the same job id again resumes from the latest checkpoint Ray Train registered and ends with the clean
    run's LoRA."""
    storage = Storage.from_uri(store)
    # slow steps (sleeps, no CPU): a window of ~12 s between the step-5 column and the last step to kill the driver
    # in, also when a loaded machine is slow to start the render worker that draws the columns
    cfg = _cfg(store, "job-driver", step_delay_s=0.8, **FAULT_RUN)
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, address, str(board), json.dumps(cfg.explicit())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            status = storage.read_json("jobs/job-driver/status.json") if storage.exists("jobs/job-driver/status.json") else {}
            # ...and once the step-5 checkpoint's samples are stored: they render while training goes on
            if status.get("state") == "training" and status.get("step", 0) >= 10 and _columns(storage, "job-driver") >= {"base", 5}:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert status.get("step", 0) >= 10, status
    finally:
        driver.kill()  # the driver dies; Ray ends its job: the trainer and its workers go with it
        driver.wait()
    assert not storage.exists(f"{lora_prefix('default', 'job-driver')}/manifest.json")
    rendered_before = _columns(storage, "job-driver")
    assert rendered_before >= {"base", 5}, rendered_before  # during training: the driver never got past it
    manifest = run_training_job(board, _cfg(store, "job-driver", **FAULT_RUN))
    # the resubmitted driver rendered only what the first one had not: its images in TensorBoard start after those
    logdir = storage.local_path(tensorboard_key("job-driver"))
    second = max(logdir.glob("*.driver"), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(second), size_guidance={"images": 0})
    events.Reload()
    assert {e.step for e in events.Images("samples/prompt_0")} == {5, 10, 15, 20} - rendered_before
    assert _columns(storage, "job-driver") >= {"base", 5, 10, 15, 20}
    _assert_resumed_from(store, "job-driver", (5, 10, 15))  # the resubmission trained only what was left
    assert manifest["metrics"]["attempts"] == 2
    _assert_same_run(storage, clean, manifest, "job-driver")


WRITER = textwrap.dedent("""
    import sys, time
    from cluster.storage import Storage

    def chunks():
        for i in range(400):
            yield bytes([i % 251]) * (256 * 1024)
            if i == 3:
                print("writing", flush=True)
            time.sleep(0.01)

    Storage.from_uri(sys.argv[1]).write_chunks("jobs/j/checkpoints/step_000010.safetensors", chunks())
    print("finished", flush=True)
""")


@pytest.mark.reliability("faults")
def test_storage_writes_survive_a_sigkill(tmp_path):
    """A process killed (SIGKILL) while streaming a 100 MB checkpoint over an existing one: readers still get
    the old file, whole, and the half-written bytes never appear under the name or in a listing."""
    storage = Storage.from_uri(tmp_path)
    key = "jobs/j/checkpoints/step_000010.safetensors"
    old = b"previous checkpoint " * 5000
    storage.write_bytes(key, old)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        # killed once more than 1 MiB is on disk, however slowly a loaded machine lets the writer go
        folder, deadline = storage.local_path("jobs/j/checkpoints"), time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                p.name.startswith(".tmp-") and p.stat().st_size > 1024 * 1024 for p in folder.iterdir()):
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    leftovers = [p for p in storage.local_path("jobs/j/checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and leftovers[0].stat().st_size > 1024 * 1024  # it was killed mid-write
    assert storage.read_bytes(key) == old
    assert storage.list("jobs/j/checkpoints") == [key]


def test_bad_refs_fail_before_anything_is_stored(ray_cluster, tmp_path):
    from train.dataset import DatasetError

    empty = tmp_path / "refs"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="a.png"):
        run_training_job(empty, _cfg(tmp_path / "store", "job-bad"))
    storage = Storage.from_uri(tmp_path / "store")
    assert storage.read_json("jobs/job-bad/status.json")["state"] == "failed"
    assert not storage.exists(lora_prefix("default", "job-bad"))


def test_a_worker_error_fails_the_job_with_its_reason_and_stores_no_lora(clean, board, store):
    """A worker that raises (adamw8bit asked for explicitly on a CPU-only run) fails the job after its retries:
    the job's own status says failed at the training stage with the worker's reason, nothing is delivered."""
    from train.job import JobError

    statuses = []
    with pytest.raises(JobError, match="adamw8bit runs only on CUDA"):
        run_training_job(board, _cfg(store, "job-worker-error", variant="custom", optimizer="adamw8bit", max_failures=0),
                         progress=lambda s: statuses.append(s))
    status = Storage.from_uri(store).read_json("jobs/job-worker-error/status.json")
    assert (status["state"], status["stage"], status["tenant"]) == ("failed", "training", "default")
    assert "adamw8bit runs only on CUDA" in status["error"] and statuses[-1]["state"] == "failed"
    assert status["error"].endswith("rank 0: ConfigError: optimizer: adamw8bit runs only on CUDA GPUs (bitsandbytes); use adamw or adafactor on CPU")
    assert not Storage.from_uri(store).exists(lora_prefix("default", "job-worker-error"))


def test_an_out_of_memory_job_fails_with_the_seeds_fix_for_its_settings(clean, board, store):
    """A worker that runs out of GPU memory (torch.OutOfMemoryError, raised by the oom_at_step hook as CUDA raises
    it) fails the job in one line that names the fix not yet on (at batch 1: gradient checkpointing; the order of
    the fixes is tests/test_health.py's)."""
    from train.job import JobError

    with pytest.raises(JobError, match="out of memory: set gradient_checkpointing: true$"):
        run_training_job(board, _cfg(store, "job-oom", oom_at_step=2, max_failures=0))
    status = Storage.from_uri(store).read_json("jobs/job-oom/status.json")
    assert status["state"] == "failed" and "OutOfMemoryError" in status["error"]
    assert status["error"].endswith("out of memory: set gradient_checkpointing: true")


def test_a_model_the_cache_task_cannot_load_fails_the_job_at_caching_in_one_line(ray_cluster, board, store):
    """The model folder is read where the cache task runs (a worker, not the driver): its ModelLoadError comes
    back through Ray as the job's reason, without Ray's wrapping, and the status names the stage."""
    from train.job import JobError

    with pytest.raises(JobError, match="failed while caching: ModelLoadError: model folder /nonexistent/klein does not exist"):
        run_training_job(board, _cfg(store, "job-bad-model", model="/nonexistent/klein"))
    status = Storage.from_uri(store).read_json("jobs/job-bad-model/status.json")
    assert (status["state"], status["stage"]) == ("failed", "caching")
    assert "Traceback" not in status["error"] and "ray::" not in status["error"]
    assert not Storage.from_uri(store).exists(lora_prefix("default", "job-bad-model"))


# The clean run's LoRA must draw closer to the board than the base model does, and denoise the board's own
# latents better. Measured on the tiny preset (2 cores): the 20-step LoRA draws 0.8-1.2 % closer (style distance
# 0.979 -> 0.967-0.971) and its velocity error on the refs drops 1.1 % (3.005 -> 2.972); the same run with the
# flow-matching target flipped (x0 - noise) draws 1.2 % further away (0.991) and its error rises 0.9 % (3.031).
STYLE_PROMPTS = ["a lighthouse on a cliff", "a house"]
MIN_GAIN = 0.002  # the run (rank 16, AdamW, 8 refs) lowers both by 0.46-0.47%; a flipped objective raises both ~1%


def test_training_moves_generated_images_toward_the_refs(clean, board, store):
    """What training is for, end to end: the clean run's delivered LoRA on the tiny pipeline draws the same
    prompts and seeds at least MIN_GAIN closer to the board (klein.style_score) than the base model, and its
    velocity error on the board's cached latents (the objective as written in tests/formula_reference.py, not
    the product's loss) is at least MIN_GAIN lower."""
    storage = Storage.from_uri(store)
    manifest = clean["manifest"]
    prefix = lora_prefix("default", "job-e2e")
    lora = read_lora(storage.read_verified(f"{prefix}/lora.safetensors", manifest["files"]["lora.safetensors"]))
    data = load_cache(str(store), manifest["cache_key"])
    pipe = load_pipeline("tiny")
    requests = [GenerateRequest(prompt=f"zxy_neon. {p}", seed=i, steps=8, width=64, height=64)
                for i, p in enumerate(STYLE_PROMPTS)]
    refs = [Image.open(p).convert("RGB").resize((64, 64)) for p in sorted(board.glob("*.png"))]

    def velocity_error() -> float:  # fixed σ and noise per ref: the same numbers with and without the LoRA
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return float(np.mean([rectified_flow_loss(pipe.transformer, item.latents[None], item.embeds[None],
                                                      torch.tensor([sigma]), torch.randn((1, *item.latents.shape), generator=gen)).item()
                                  for item in data.items for sigma in (0.25, 0.5, 0.75)]))

    set_active_loras(pipe, [])
    before, error_before = [generate_image(pipe, r) for r in requests], velocity_error()
    set_active_loras(pipe, [("trained", lora, 1.0)])
    after, error_after = [generate_image(pipe, r) for r in requests], velocity_error()
    d_before, d_after = style_distance(before, refs), style_distance(after, refs)
    # On tiny's random base the gains are small but fully seeded (see MIN_GAIN); the mini demo test measures a style
    # being learnt with the exact judge.
    assert d_after < (1 - MIN_GAIN) * d_before, (d_before, d_after)
    assert error_after < (1 - MIN_GAIN) * error_before, (error_before, error_after)

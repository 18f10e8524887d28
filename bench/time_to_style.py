"""Time to a style, measured from outside the product: `klein-style train` (and `klein-style serve`) as subprocesses.

    python bench/time_to_style.py --model FOLDER --out $OUT --steps 500 [--serve] [--budget-s 540]
    python bench/time_to_style.py --model FOLDER --out $OUT --skip-train --random-lora --serve --text-encoder

1. board: a 12-image procedural board at 1024² (`evaluation.board.make_board`, what `klein-style make-board` runs).
2. train: `klein-style train REFS --trigger zxy_style --model FOLDER --storage ... --config CFG` as a
   subprocess (defaults: rank 32, `steps`, checkpoints every `--save-every`, contact sheet; Gemini offline:
   the keys are removed from its environment). The job's `status.json` is polled every 0.2 s to time each
   stage transition; checkpoint and delivered files are watched the same way; `nvidia-smi` is sampled every
   second for the GPU's busy fraction and memory; Ray start comes from the CLI's first `[preparing]` line.
   Stages: cli_import (process start → the CLI's `[starting ray]`), ray_start (→ `[preparing]`),
   captions (preparing), cache (VAE latents + Qwen3 embeddings), model_load_and_compile (the driver's
   `training` status → the worker's first step: worker start, transformer load, compile, step 1), steps,
   checkpoints (each save's extra time over the steady step rate), samples (last step → the delivered files:
   Ray Train shutdown + contact sheet), finish (files → `done`) and the process exit.
3. serve (`--serve`): `klein-style serve` on the same folder and storage; cold start to ready, first image,
   then p50/p99 latency and images/hour at each `--concurrency` with the trained LoRA alone and with it and 9
   imported copies of it (each scaled by a different factor, so they are 10 distinct LoRAs) in round-robin.
   `--skip-train --random-lora` serves without training: a random rank-32 LoRA at the model's shapes is
   imported through `POST /v1/loras/import` once the service is ready (files uploaded as `--upload-dtype`,
   bf16 by default: a full-size rank-32 LoRA is ~350 MB in fp32, past the default 200 MiB upload limit).
   The round-robin set is that LoRA and 9 copies (10 adapter sets: all resident at max_loras_per_replica 10),
   warmed (`--warm-steps`: one short request each, timed as each LoRA's first use) so the round-robin phases
   see resident LoRAs; `--phase-images 1:3,4:8` caps the images of each phase.
4. text encoder (`--text-encoder`): after the service stops, the Qwen3 encoder alone in this process: its
   weights' memory, the peak while encoding one prompt, and the time per call (what each request pays).

Every phase has a time budget inside `--budget-s` and is guarded: a failure is recorded in the JSON and the
script goes on. `$OUT/time_to_style.json` and `$OUT/time_to_style.md` are rewritten after every phase, so a
run killed at its wall-clock limit still leaves what it measured. A job cut short resumes when the script is
run again with the same `--storage` and `--job-id` (the job resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cluster.storage import Storage, StorageError  # noqa: E402
from klein.lora import LoraLayer, LoraWeights, lora_to_bytes, read_lora  # noqa: E402
from klein.model import resolve_model_source  # noqa: E402
from serve.tenants import create_api_key  # noqa: E402
from serve.testing import random_lora  # noqa: E402
from evaluation.board import make_board  # noqa: E402
from train.job import checkpoint_key, lora_prefix  # noqa: E402

TRIGGER = "zxy_style"
TENANT = "default"
GEMINI_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL")
NOISE = re.compile(r"^training:|-- (CALL|POST|GET) |Deregistering|Removing 1 replica|is stopped\.")
PROMPTS = ["a lighthouse on a cliff at dawn", "a cat sitting on a chair", "a city street in the rain",
           "a boat on a calm sea", "a castle on a hill"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(repo: Path = REPO, gemini: bool = False) -> dict:
    """The environment of the product's subprocesses: this checkout first on PYTHONPATH, offline hubs,
    and (unless `gemini`) no Gemini key, so every text stage takes its offline fallback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if not gemini:
        for key in GEMINI_KEYS:
            env.pop(key, None)
    return env


def cli_command(*args: str) -> list[str]:
    """`klein-style ARGS` through this interpreter (the GPU image has the packages but not the entry point)."""
    return [sys.executable, "-m", "cli.main", *args]


# -- results ------------------------------------------------------------------------------------------------
class Results:
    """The JSON being built; written (with its Markdown table) after every phase."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out = out
        self.data: dict = {"what": "time to a style through the product's CLI (bench/time_to_style.py)",
                           "args": {k: v for k, v in vars(args).items()}, "started_utc": _utc(), "phases": {},
                           "errors": []}

    def phase(self, name: str, payload: dict) -> None:
        self.data["phases"][name] = payload
        self.write()

    def error(self, phase: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.data["errors"].append({"phase": phase, "error": text,
                                    "traceback": None if isinstance(error, str) else traceback.format_exc()[-3000:]})
        log(f"{phase} failed: {text}")
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["updated_utc"] = _utc()
        tmp = self.out / "time_to_style.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out / "time_to_style.json")
        (self.out / "time_to_style.md").write_text(markdown(self.data))


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(data: dict) -> str:
    env = data.get("environment") or {}
    lines = [f"# Time to a style ({data['args'].get('model')}, {data['started_utc']})", "",
             f"{', '.join(env.get('gpus') or ['no GPU'])}; torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
             f"ray {env.get('ray')}", ""]
    for phase_name, train in data["phases"].items():
        if not phase_name.startswith("train"):
            continue
        lines += [f"## Training through `klein-style train` ({phase_name}: {(train.get('config') or {}).get('steps')} steps)", "",
                  "| stage | s | GPU busy | peak GPU MiB |", "| --- | ---: | ---: | ---: |"]
        for name, st in train.get("stages", {}).items():
            lines.append(f"| {name} | {_fmt(st.get('seconds'))} | {_fmt(st.get('gpu_busy'), 2)} | {_fmt(st.get('gpu_peak_mib'))} |")
        s = train.get("summary", {})
        lines += ["", "| figure | value |", "| --- | ---: |"]
        for key in ("refs_to_lora_s", "refs_to_sheet_s", "s_per_step", "bench_train_step_s", "checkpoint_s_each",
                    "gpu_busy_during_steps", "gpu_peak_mib", "state", "returncode"):
            if key in s:
                lines.append(f"| {key} | {_fmt(s[key], 3)} |")
        worker = train.get("worker") or {}
        if worker.get("startup"):
            lines += ["", "worker start-up (s): " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in worker["startup"].items())]
        for save in worker.get("saves", []):
            lines.append(f"- checkpoint at step {save.get('step')}: " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in save.items() if k != "step"))
        lines.append("")
    serve = data["phases"].get("serve")
    if serve:
        args = data["args"]
        lines += ["## Serving through `klein-style serve`", "",
                  f"{args.get('serve_size')}² px, {args.get('serve_steps')} steps, CFG, accel {args.get('accel')}; "
                  f"cold start to ready: {_fmt(serve.get('ready_s'))} s; first image: {_fmt(serve.get('first_image_s'))} s "
                  f"(cold start to first image {_fmt(serve.get('cold_to_first_image_s'))} s); peak GPU memory while "
                  f"serving {_fmt((serve.get('serve_gpu') or {}).get('gpu_peak_mib'), 0)} MiB (nvidia-smi)", ""]
        rl, ci, warm = serve.get("random_lora"), serve.get("copies_import"), serve.get("lora_warmup")
        if rl:
            lines += [f"random rank-{rl['rank']} LoRA ({rl['layers']} layers, {rl['parameters'] / 1e6:.1f} M parameters; "
                      f"{rl['file_bytes'] / 2**20:.0f} MiB as {rl['file_dtype']}, {rl['fp32_bytes'] / 2**20:.0f} MiB as fp32) "
                      f"imported in {rl['import_s']} s", ""]
        if ci:
            how = "imported" if ci.get("via", "api") == "api" else "written into storage"
            lines += [f"{ci['n']} distinct copies ({ci['file_bytes'] / 2**20:.0f} MiB {ci['file_dtype']} each) {how} "
                      f"{ci['parallel']} at a time in {ci['wall_s']} s (each {ci['import_s_each']} s)", ""]
        if warm:
            lines += [f"first use of each LoRA ({warm['steps']}-step requests): {warm['first_use_s']} s, against "
                      f"{warm['resident_s']} s with a resident LoRA (median extra {warm['first_use_extra_s_median']} s)", ""]
        lines += ["| phase | concurrency | LoRAs | images | p50 s | p99 s | mean s | images/hour | errors | GPU busy | peak GPU MiB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, ph in serve.get("load", {}).items():
            lines.append(f"| {name} | {ph.get('concurrency')} | {ph.get('loras')} | {ph.get('ok')} | {_fmt(ph.get('p50_s'), 2)} | "
                         f"{_fmt(ph.get('p99_s'), 2)} | {_fmt(ph.get('mean_s'), 2)} | {_fmt(ph.get('images_per_hour'), 0)} | "
                         f"{ph.get('errors')} | {_fmt(ph.get('gpu_busy'), 2)} | {_fmt(ph.get('gpu_peak_mib'), 0)} |")
        lines.append("")
    te = data["phases"].get("text_encoder")
    if te:
        lines += ["## Text encoder (in-process, as the generator calls it once per request)", "",
                  f"{te['layers']} layers x {te['hidden']}, {te['dtype']}: weights {te['weights_gib']} GiB, peak "
                  f"{_fmt(te.get('peak_allocated_gib'), 2)} GiB allocated while encoding (activations "
                  f"{_fmt(te.get('activation_peak_gib'), 2)} GiB); one prompt at max_sequence_length "
                  f"{te['max_sequence_length']}: median {te['median_s']} s, max {te['max_s']} s over {te['calls']} calls "
                  f"(first call {te['first_call_s']} s); loaded in {te['load_s']} s", ""]
    for err in data.get("errors", []):
        lines.append(f"- **{err['phase']} failed**: {err['error']}")
    return "\n".join(lines) + "\n"


# -- GPU sampling -------------------------------------------------------------------------------------------
class GpuSampler:
    """`nvidia-smi --query-gpu=utilization.gpu,memory.used` every `period_s` in a thread: (t, util %, MiB) summed
    over GPUs (memory) and averaged (utilisation). Without nvidia-smi it records why and samples nothing."""

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.samples: list[tuple[float, float, float]] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            self.unavailable = "nvidia-smi not found"
        else:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                rows = [[float(v) for v in line.split(",")] for line in out.strip().splitlines() if line.strip()]
                if rows:
                    self.samples.append((t, sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows)))
            except (subprocess.SubprocessError, ValueError, OSError) as e:
                self.unavailable = f"nvidia-smi failed: {e}"
            self._stop.wait(max(0.0, self.period_s - (time.time() - t)))

    def window(self, start: float | None, end: float | None) -> dict:
        if start is None or end is None:
            return {}
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"gpu_samples": 0}
        return {"gpu_samples": len(inside), "gpu_busy": round(statistics.mean(s[1] for s in inside) / 100, 3),
                "gpu_peak_mib": max(s[2] for s in inside)}


# -- the training run ---------------------------------------------------------------------------------------
class LineReader:
    """A subprocess's merged output, line by line with arrival times, echoed and kept."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, prefix: str):
        self.proc, self.lines, self.prefix = proc, [], prefix
        self._log = open(log_path, "a")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self.proc.stdout.readline, ""):
            line = raw.rstrip("\n")
            self.lines.append((time.time(), line))
            self._log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self._log.flush()
            if line.strip() and not NOISE.search(line):  # tqdm redraws and Serve's access lines: log only
                print(f"  {self.prefix}| {line}", flush=True)
        self._log.close()

    def first(self, pattern: str) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        return next(((t, line) for t, line in list(self.lines) if rx.search(line)), None)

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout=timeout)


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0, first_signal=signal.SIGINT) -> None:
    """Stop a process this script started (its own session): `first_signal`, then SIGTERM, then SIGKILL
    to its process group, so the Ray processes it started go with it."""
    if proc.poll() is not None:
        return
    for sig, wait in ((first_signal, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def train_config(args: argparse.Namespace) -> dict:
    """The YAML handed to `klein-style train --config`: only what this run sets; everything else is the
    product's default (rank 32, Adafactor, cosine, ...)."""
    cfg = {"steps": args.steps, "save_every": args.save_every or args.steps, "resolution": args.resolution}
    for key in ("sample_every", "sample_size", "sample_steps", "variant", "rank"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.train_extra:
        cfg.update(yaml.safe_load(args.train_extra) or {})
    return cfg


def run_training(args, results: Results, gpu: GpuSampler, refs: Path, deadline: float, phase: str = "train") -> dict:
    """One `klein-style train` job, timed stage by stage; `phase` names it in the results (and its log files).
    With `--fresh-compile-dirs` the job's processes get their own empty inductor and Triton cache folders, as a
    fresh node would: then the only compiled code a job can reuse is what the job storage holds."""
    storage = Storage.from_uri(args.storage)
    env = child_env(REPO, gemini=args.gemini)
    if args.fresh_compile_dirs:
        for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            env[var] = str(Path(args.fresh_compile_dirs) / f"{phase}-{name}")
    cfg = train_config(args)
    cfg_path = args.out / f"{phase}_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    status_key = f"jobs/{args.job_id}/status.json"
    prefix = lora_prefix(TENANT, args.job_id)
    delivered_key = f"{prefix}/lora.safetensors"
    sheet_key = f"{prefix}/samples/contact_sheet.png"
    manifest_key = f"{prefix}/manifest.json"
    save_steps = sorted(set(range(cfg["save_every"], args.steps + 1, cfg["save_every"])) | {args.steps})
    cmd = cli_command("train", str(refs), "--trigger", TRIGGER, "--model", str(args.model), "--storage", args.storage,
                      "--job-id", args.job_id, "--config", str(cfg_path))
    log("train: " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True, bufsize=1)
    reader = LineReader(proc, args.out / f"{phase}.log", phase)
    transitions: list[dict] = []  # every change of (state, step) seen in status.json, with the poll's time
    statuses: list[dict] = []
    files_seen: dict[str, float] = {}
    watched = {**{f"checkpoint_{s}": checkpoint_key(args.job_id, s) for s in save_steps},
               "lora": delivered_key, "contact_sheet": sheet_key, "manifest": manifest_key}
    # a resubmitted job id finds its previous run's status and files: those are not this run's transitions
    stale_status = _read_status(storage, status_key)
    existed = sorted(name for name, k in watched.items() if storage.exists(k))
    last = None
    timed_out = False

    def poll(now: float) -> None:
        nonlocal stale_status, last
        st = _read_status(storage, status_key)
        if st is not None and stale_status is not None:
            if st == stale_status:
                st = None
            else:
                stale_status = None
        if st is not None:
            key = (st.get("state"), st.get("step"), st.get("updated"))
            if key != last:
                last = key
                transitions.append({"t": now, "state": st.get("state"), "step": st.get("step"),
                                    "s_per_step": st.get("s_per_step"), "updated": st.get("updated")})
                statuses.append(st)
        for name, k in watched.items():
            if name not in files_seen and name not in existed and storage.exists(k):
                files_seen[name] = now

    written = t0
    while True:
        now = time.time()
        poll(now)
        if proc.poll() is not None:
            break
        if now - written > 10:  # what is known so far, in case this run is killed from outside (a call's limit)
            written = now
            results.phase(phase, {**analyse_training(t0, now, transitions, files_seen, reader, save_steps, gpu, args),
                                  "in_progress": True, "command": cmd, "config": cfg,
                                  "worker": worker_timings(statuses, transitions, t0)})
        if now > deadline:
            timed_out = True
            log("train: the time budget is spent; stopping the job (rerun with the same --job-id to resume)")
            stop_process(proc, grace_s=20)
            break
        time.sleep(0.2)
    t_exit = time.time()
    poll(t_exit)  # what the last 0.2 s (or a stop at the budget's end) left unseen
    reader.join()
    payload = analyse_training(t0, t_exit, transitions, files_seen, reader, save_steps, gpu, args)
    payload.update(command=cmd, config=cfg, returncode=proc.returncode, timed_out=timed_out, existed_before=existed,
                   last_status=statuses[-1] if statuses else None, output_tail=[l for _, l in reader.lines[-15:]],
                   worker=worker_timings(statuses, transitions, t0))
    try:
        manifest = storage.read_json(manifest_key)
        m = manifest["metrics"]
        payload["manifest"] = {"steps": m["steps"], "final_loss": m["final_loss"], "val_curve": m["val_curve"],
                               "steps_trained_once": m.get("steps_trained_once"), "elapsed_s": manifest["elapsed_s"],
                               "variant": manifest["decision"]["variant"], "rank": manifest["config"].get("rank"),
                               "delivered_step": manifest["delivered_step"], "checkpoints": manifest["checkpoints"],
                               "files": sorted(manifest["files"])}
    except (StorageError, KeyError) as e:
        payload["manifest"] = None
        payload["manifest_error"] = str(e)
    payload["summary"].update(returncode=proc.returncode, state=transitions[-1]["state"] if transitions else None)
    return payload


def worker_timings(statuses: list[dict], transitions: list[dict], t0: float) -> dict:
    """The worker's own account (train/worker.py writes it into status.json): where its start-up went (cache load,
    transformer load, setup, compile-cache load, first step = compile + one step) and each checkpoint's cost on the
    step path (validation, LoRA + state written, Ray Train report). `ray_train_start_s`: the driver's `training`
    status to the worker function's first line (TorchTrainer's controller, placement group, worker processes)."""
    last = next((st for st in reversed(statuses) if st.get("startup")), None)
    if last is None:
        return {}
    startup = dict(last["startup"])
    entered = startup.pop("worker_entered", None)
    t_train0 = _first(transitions, lambda tr: tr["state"] == "training")
    if entered is not None and t_train0 is not None:
        startup["ray_train_start_s"] = round(entered - t_train0, 2)
        startup["worker_entered_s"] = _rel(entered, t0)
    return {"startup": startup, "saves": last.get("saves", [])}


def _read_status(storage: Storage, key: str) -> dict | None:
    try:
        return storage.read_json(key)
    except StorageError:
        return None


def _first(transitions: list[dict], pred) -> float | None:
    return next((tr["t"] for tr in transitions if pred(tr)), None)


def analyse_training(t0, t_exit, transitions, files_seen, reader, save_steps, gpu, args) -> dict:
    preparing_line = reader.first(r"^\[preparing\]")
    t_prep = preparing_line[0] if preparing_line else _first(transitions, lambda tr: tr["state"] == "preparing")
    t_cache = _first(transitions, lambda tr: tr["state"] == "caching")
    t_train0 = _first(transitions, lambda tr: tr["state"] == "training")
    t_step1 = _first(transitions, lambda tr: tr["state"] == "training" and (tr["step"] or 0) >= 1)
    t_last = _first(transitions, lambda tr: tr["state"] == "training" and tr["step"] == args.steps)
    t_done = _first(transitions, lambda tr: tr["state"] in ("done", "failed"))
    t_files = files_seen.get("lora")
    steps_seen = [tr for tr in transitions if tr["state"] == "training" and (tr["step"] or 0) >= 1]
    # the steady rate: 10-step status intervals that contain no save (a save adds validation + checkpoint)
    intervals = []
    for a, b in zip(steps_seen, steps_seen[1:]):
        if b["step"] > a["step"] and not any(a["step"] < s <= b["step"] for s in save_steps):
            intervals.append((b["t"] - a["t"]) / (b["step"] - a["step"]))
    s_per_step = statistics.median(intervals) if intervals else (steps_seen[-1]["s_per_step"] if steps_seen else None)
    checkpoints = []
    for s in save_steps:
        at = next((tr for tr in steps_seen if tr["step"] == s), None)
        before = next((tr for tr in reversed(steps_seen) if tr["step"] < s), None)
        if at and before and s_per_step:
            extra = (at["t"] - before["t"]) - (s - before["step"]) * s_per_step
            checkpoints.append({"step": s, "extra_s": round(extra, 2), "file_seen_s": _rel(files_seen.get(f"checkpoint_{s}"), t0)})
        else:
            checkpoints.append({"step": s, "extra_s": None, "file_seen_s": _rel(files_seen.get(f"checkpoint_{s}"), t0)})
    # the CLI says "[starting ray]" (or "[joining ray]") once its imports are done and before it waits on Ray
    ray_line = reader.first(r"^\[(starting|joining) ray\]")
    t_ray = ray_line[0] if ray_line else None
    bounds = {
        "cli_import": (t0, t_ray),
        "ray_start": (t_ray, t_prep),
        "captions": (t_prep, t_cache),
        "cache": (t_cache, t_train0),
        "model_load_and_compile": (t_train0, t_step1),
        "steps": (t_step1, t_last),
        "samples": (t_last, t_files),
        "finish": (t_files, t_done),
        "exit": (t_done, t_exit if t_done else None),
    }
    stages = {}
    for name, (a, b) in bounds.items():
        stages[name] = {"start_s": _rel(a, t0), "end_s": _rel(b, t0), "seconds": round(b - a, 2) if a is not None and b is not None else None,
                        **gpu.window(a, b)}
    stages["checkpoints"] = {"seconds": round(sum(c["extra_s"] for c in checkpoints if c["extra_s"] is not None), 2)
                             if any(c["extra_s"] is not None for c in checkpoints) else None, "each": checkpoints}
    whole = gpu.window(t0, t_exit)
    summary = {
        "refs_to_lora_s": _rel(t_files, t0),
        "refs_to_sheet_s": _rel(files_seen.get("contact_sheet"), t0),
        "refs_to_done_s": _rel(t_done, t0),
        "process_s": round(t_exit - t0, 2),
        "s_per_step": round(s_per_step, 4) if s_per_step else None,
        "steps_reached": steps_seen[-1]["step"] if steps_seen else 0,
        "checkpoint_s_each": round(statistics.mean(c["extra_s"] for c in checkpoints if c["extra_s"] is not None), 2)
        if any(c["extra_s"] is not None for c in checkpoints) else None,
        "gpu_busy_during_steps": stages["steps"].get("gpu_busy"),
        "gpu_busy_whole": whole.get("gpu_busy"),
        "gpu_peak_mib": whole.get("gpu_peak_mib"),
        "cli_import_s": stages["cli_import"]["seconds"],
    }
    summary.update(bench_reference())
    return {"stages": stages, "summary": summary,
            "transitions": [{**tr, "t": _rel(tr["t"], t0)} for tr in transitions],
            "files_seen_s": {k: _rel(v, t0) for k, v in files_seen.items()},
            "gpu_sampler": gpu.unavailable or "nvidia-smi every 1 s"}


def _rel(t: float | None, t0: float) -> float | None:
    return round(t - t0, 2) if t is not None else None


def bench_reference() -> dict:
    """`bench/train_step.py`'s product step (and stock) from the newest committed H200 results, for comparison."""
    for path in sorted((REPO / "bench" / "results").glob("*.json"), reverse=True):
        try:
            section = json.loads(path.read_text()).get("train_step") or {}
            variants = section.get("variants", {})
            if "ours" in variants:
                return {"bench_train_step_s": variants["ours"]["median_s"],
                        "bench_stock_step_s": variants.get("stock_nogc", {}).get("median_s"), "bench_file": path.name}
        except (OSError, ValueError, AttributeError):
            continue
    return {}


# -- serving ------------------------------------------------------------------------------------------------
def serve_config_file(args, path: Path, on_gpu: bool) -> Path:
    """serve/serve_config.yaml with this run's model, storage and device; on a GPU the Generator holds it."""
    data = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    app = data["applications"][0]
    app["args"].update(model=str(args.model), storage=args.storage, device="cuda" if on_gpu else "cpu", accel=args.accel,
                       max_loras_per_replica=args.max_loras_per_replica, rate_limit_per_s=1000, rate_limit_burst=1000,
                       downstream_timeout_s=args.request_timeout_s)
    data["http_options"]["request_timeout_s"] = args.request_timeout_s + 30
    for d in app["deployments"]:
        if d["name"] == "Generator":
            d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}  # one GPU, one pipeline
            if on_gpu:
                d["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1, "resources": {"infer_gpu": 1}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def perturbed_copies(lora_bytes: bytes, n: int, dtype=None, first: int = 0) -> list[bytes]:
    """`n` distinct LoRAs from one: every up-projection scaled by 1 + i/100 (i from `first`), so each copy has
    its own bytes (and sha256), as 10 tenants' styles would; the cost of loading and switching is what is
    measured. `dtype` is the files' tensor type (default float32, ours; bfloat16 halves an upload)."""
    import torch

    base = read_lora(lora_bytes)
    return [lora_to_bytes(LoraWeights(layers={name: LoraLayer(down=layer.down, up=layer.up * (1.0 + i / 100), alpha=layer.alpha)
                                              for name, layer in base.layers.items()}, meta=dict(base.meta)),
                          dtype=dtype or torch.float32)
            for i in range(first, first + n)]


def store_copy(storage: Storage, data: bytes, lora_id: str) -> tuple[str, float]:
    """A copy written into storage as the import endpoint writes one (`lora.safetensors`, then the manifest):
    faster than uploading it when what is measured is serving, not importing."""
    t = time.time()
    prefix = lora_prefix(TENANT, lora_id)
    sha = storage.write_bytes(f"{prefix}/lora.safetensors", data)
    storage.write_json(f"{prefix}/manifest.json", {"id": lora_id, "tenant": TENANT, "trigger": TRIGGER,
                                                   "files": {"lora.safetensors": sha}, "style_profile": None,
                                                   "decision": {"variant": "imported", "reason": "bench copy"}})
    return lora_id, round(time.time() - t, 2)


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def random_lora_bytes(model: str, rank: int, dtype_name: str, seed: int = 0) -> tuple[bytes, dict]:
    """A random rank-`rank` LoRA on every Linear of the served blocks at `model`'s shapes (the transformer
    built on the `meta` device from the folder's config: no weights read), as .safetensors bytes."""
    import torch
    from diffusers import Flux2Transformer2DModel

    config = Flux2Transformer2DModel.load_config(str(resolve_model_source(model) / "transformer"))
    with torch.device("meta"):
        skeleton = Flux2Transformer2DModel.from_config(config)
    # scale 0.02, as the random base weights: the adapter changes the output without overflowing it
    lora = random_lora(skeleton, rank=rank, scale=0.02, seed=seed)
    lora.meta["trigger"] = TRIGGER
    data = lora_to_bytes(lora, dtype=_dtype(dtype_name))
    params = sum(layer.down.numel() + layer.up.numel() for layer in lora.layers.values())
    return data, {"rank": rank, "layers": len(lora.layers), "parameters": params, "file_dtype": dtype_name,
                  "file_bytes": len(data), "fp32_bytes": params * 4}


def import_lora(client: httpx.Client, data: bytes, name: str) -> tuple[str, float]:
    """POST /v1/loras/import (the product's bring-your-own-LoRA path); (id, seconds)."""
    t = time.time()
    r = client.post("/v1/loras/import", files={"lora": (name, data)}, data={"trigger": TRIGGER})
    if r.status_code != 201:
        raise RuntimeError(f"import {name} ({len(data)} bytes): HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["id"], round(time.time() - t, 2)


def measure_text_encoder(args, n: int = 10) -> dict:
    """The Qwen3 text encoder alone, as the generator runs it once per request (`pipe.encode_prompt` of the
    prompt at the model's max_sequence_length; the empty negative is cached): its weights' memory, the peak
    while encoding, and the time of each call. In this process, after the service is stopped (GPU free)."""
    import torch

    from klein.model import load_pipeline, max_sequence_length

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    t = time.time()
    pipe = load_pipeline(args.model, device=device, components=("text_encoder", "tokenizer"))
    if on_gpu:
        torch.cuda.synchronize()
    load_s = time.time() - t
    weights = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
    msl = max_sequence_length(args.model)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    times = []
    with torch.no_grad():
        for i in range(n + 2):  # two warm-ups
            if on_gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            embeds, _ = pipe.encode_prompt(prompt=f"{TRIGGER}. {PROMPTS[i % len(PROMPTS)]}", device=device,
                                           max_sequence_length=msl)
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    out = {"load_s": round(load_s, 2), "weights_gib": round(weights / 2**30, 2), "dtype": str(pipe.text_encoder.dtype),
           "layers": pipe.text_encoder.config.num_hidden_layers, "hidden": pipe.text_encoder.config.hidden_size,
           "max_sequence_length": msl, "embeds_shape": list(embeds.shape), "calls": n,
           "first_call_s": round(times[0], 4), "median_s": round(statistics.median(times[2:]), 4),
           "max_s": round(max(times[2:]), 4)}
    if on_gpu:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["activation_peak_gib"] = round((torch.cuda.max_memory_allocated() - resident) / 2**30, 2)
    del pipe, embeds
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def run_serve(args, results: Results, gpu: GpuSampler, deadline: float, lora_id: str | None) -> dict:
    payload: dict = {"load": {}}
    # Ray Serve's own dependencies are not in every image (the GPU image had none): say so at once, not after
    # a cold start's worth of waiting on a server that cannot come up
    check = subprocess.run([sys.executable, "-c", "import ray.serve, fastapi, starlette, uvicorn, prometheus_client, python_multipart"],
                           capture_output=True, text=True, env=child_env(REPO), cwd=REPO, timeout=300)
    if check.returncode != 0:
        raise RuntimeError("klein-style serve cannot start here: Ray Serve's dependencies do not import "
                           f"({check.stderr.strip().splitlines()[-1] if check.stderr.strip() else 'no detail'}); "
                           "install ray[serve]'s packages (fastapi, starlette, uvicorn, prometheus_client, python-multipart)")
    storage = Storage.from_uri(args.storage)
    api_key = create_api_key(storage, TENANT)  # our own key: the server then prints none, and we need not parse it
    on_gpu = args.device == "cuda"
    cfg_path = serve_config_file(args, args.out / "serve_config.yaml", on_gpu)
    cmd = cli_command("serve", "--config", str(cfg_path), "--port", str(args.port), "--num-cpus", str(args.serve_cpus))
    log("serve: " + " ".join(cmd))
    url = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(REPO, args.gemini),
                            cwd=REPO, start_new_session=True, bufsize=1)
    reader = LineReader(proc, args.out / "serve.log", "serve")
    payload["command"] = cmd
    try:
        ready_deadline = min(deadline, t0 + args.serve_start_timeout_s)
        while time.time() < ready_deadline and proc.poll() is None and reader.first(r"is serving at") is None:
            time.sleep(0.2)
        serving = reader.first(r"is serving at")
        if serving is None:
            raise RuntimeError(f"klein-style serve was not ready after {time.time() - t0:.0f} s (exit code {proc.poll()}); "
                               f"last lines: {[l for _, l in reader.lines[-5:]]}")
        payload["ready_s"] = round(serving[0] - t0, 2)
        payload["startup_gpu"] = gpu.window(t0, serving[0])
        with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(args.request_timeout_s + 60, connect=10)) as client:
            health = client.get("/healthz")
            payload["healthz"] = health.json() if health.status_code == 200 else health.text[:300]
            results.phase("serve", payload)
            if lora_id is None and args.random_lora:
                t1 = time.time()
                data, info = random_lora_bytes(args.model, args.random_lora_rank, args.upload_dtype)
                info["make_s"] = round(time.time() - t1, 2)
                lora_id, info["import_s"] = import_lora(client, data, "random.safetensors")
                info["id"] = lora_id
                payload["random_lora"] = info
                log(f"serve: imported a random rank-{info['rank']} LoRA ({info['file_bytes'] / 2**20:.0f} MiB "
                    f"{args.upload_dtype}) in {info['import_s']} s: {lora_id}")
                results.phase("serve", payload)
            body = request_body(args, 0, lora_id)
            t1 = time.time()
            r = client.post("/v1/generate", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"first image: HTTP {r.status_code}: {r.text[:300]}")
            payload["first_image_s"] = round(time.time() - t1, 2)
            payload["cold_to_first_image_s"] = round(time.time() - t0, 2)
            payload["first_image_lora"] = lora_id
            results.phase("serve", payload)
            lora_sets = {"no_lora": [None]} if lora_id is None else {"1_lora": [lora_id]}
            if lora_id is not None and args.n_loras > 1:
                try:
                    t1 = time.time()
                    lora_bytes = storage.read_bytes(f"{lora_prefix(TENANT, lora_id)}/lora.safetensors")
                    # the round-robin set is the served LoRA and n-1 copies: n adapter sets in all, so with
                    # max_loras_per_replica >= n every one stays resident (n copies besides it would be n+1
                    # sets, and an LRU of n would evict one at every request of the round: each a cold load).
                    # Uploaded in `--upload-dtype` (bf16 by default): a full-size rank-32 LoRA is ~350 MB in
                    # fp32, past the service's default upload limit (max_upload_bytes, 200 MiB)
                    via_api = args.copies_via == "api"
                    copies = perturbed_copies(lora_bytes, args.n_loras - 1, first=1,
                                              dtype=_dtype(args.upload_dtype) if via_api else None)
                    made_s = time.time() - t1
                    with ThreadPoolExecutor(min(4, len(copies))) as pool:
                        if via_api:
                            imported = list(pool.map(lambda ic: import_lora(client, ic[1], f"copy{ic[0]}.safetensors"),
                                                     enumerate(copies)))
                        else:
                            imported = list(pool.map(lambda ic: store_copy(storage, ic[1], f"copy{ic[0] + 1}-{lora_id}"),
                                                     enumerate(copies)))
                    ids = [i for i, _ in imported]
                    payload["copies_import"] = {"n": len(ids), "via": args.copies_via, "file_bytes": len(copies[0]),
                                                "file_dtype": args.upload_dtype if via_api else "fp32",
                                                "make_s": round(made_s, 2), "import_s_each": [s for _, s in imported],
                                                "wall_s": round(time.time() - t1, 2), "parallel": min(4, len(copies))}
                    del copies
                    lora_sets[f"{args.n_loras}_loras"] = [lora_id] + ids
                    results.phase("serve", payload)
                    if args.warm_steps > 0:
                        payload["lora_warmup"] = warm_loras(client, args, lora_id, ids)
                        results.phase("serve", payload)
                except Exception as e:  # noqa: BLE001 - the 1-LoRA phases still run
                    results.error("serve.import", e)
            phases = [(c, set_name, ids) for c in args.concurrency for set_name, ids in lora_sets.items()]
            for k, (concurrency, set_name, ids) in enumerate(phases):
                name = f"c{concurrency}_{set_name}"
                # what is left (less the shutdown's 40 s) shared by the phases still to run
                budget = min(args.phase_budget_s, (deadline - time.time() - 40) / (len(phases) - k))
                if budget < min(5.0, args.phase_budget_s):
                    results.error(f"serve.{name}", f"skipped: {max(0.0, deadline - time.time()):.0f} s of the budget left")
                    continue
                try:
                    payload["load"][name] = load_phase(client, args, ids, concurrency, budget, gpu,
                                                       max_images=args.phase_images.get(concurrency))
                except Exception as e:  # noqa: BLE001
                    results.error(f"serve.{name}", e)
                results.phase("serve", payload)
    finally:
        t_stop = time.time()
        stop_process(proc, grace_s=30)
        reader.join()
        payload["stop_s"] = round(time.time() - t_stop, 2)
        payload["serve_gpu"] = gpu.window(t0, time.time())
        payload["output_tail"] = [l for _, l in reader.lines[-15:]]
    return payload


def warm_loras(client: httpx.Client, args, resident_id: str, ids: list[str]) -> dict:
    """One `--warm-steps` request per LoRA of the round-robin set, in turn, so its phases measure LoRAs that
    are resident (as 10 tenants' styles in steady use are): each one's first use (read from storage, checked,
    made resident on the GPU, fused) costs its request's time over the same request with a resident LoRA."""
    def timed(lora: str, i: int) -> float:
        t = time.time()
        r = client.post("/v1/generate", json=request_body(args, i, lora, steps=args.warm_steps))
        if r.status_code != 200:
            raise RuntimeError(f"warm-up with {lora}: HTTP {r.status_code}: {r.text[:300]}")
        return round(time.time() - t, 3)

    resident = [timed(resident_id, i) for i in range(2)]
    first_use = [timed(lora, i) for i, lora in enumerate(ids)]
    return {"steps": args.warm_steps, "resident_s": resident, "first_use_s": first_use,
            "first_use_extra_s_median": round(statistics.median(first_use) - min(resident), 3)}


def request_body(args, i: int, lora_id: str | None, steps: int | None = None) -> dict:
    body = {"prompt": f"{TRIGGER}. {PROMPTS[i % len(PROMPTS)]}", "seed": i, "steps": steps or args.serve_steps,
            "width": args.serve_size, "height": args.serve_size, "response": "png"}
    if lora_id is not None:
        body["lora_id"] = lora_id
    return body


def load_phase(client: httpx.Client, args, lora_ids: list, concurrency: int, budget_s: float, gpu: GpuSampler,
               max_images: int | None = None) -> dict:
    """`concurrency` clients loop until `budget_s` is spent (no request starts after it) or `max_images`
    requests have started, LoRAs round-robin."""
    counter = iter(range(10**9))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    start = time.time()
    stop_at = start + budget_s

    def worker() -> None:
        while time.time() < stop_at:
            with lock:
                i = next(counter)
            if max_images is not None and i >= max_images:
                return
            t = time.time()
            try:
                r = client.post("/v1/generate", json=request_body(args, i, lora_ids[i % len(lora_ids)]))
                ok = r.status_code == 200
                detail = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, detail = False, f"{type(e).__name__}: {e}"
            with lock:
                (latencies.append(time.time() - t) if ok else errors.append(detail))

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.time() - start
    lat = sorted(latencies)
    return {"concurrency": concurrency, "loras": len(lora_ids), "ok": len(lat), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 2),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            "mean_s": round(statistics.mean(lat), 3) if lat else None,
            "images_per_hour": round(len(lat) / wall * 3600, 1) if lat and wall > 0 else None,
            "budget_s": round(budget_s, 1), "max_images": max_images, **gpu.window(start, time.time())}


# -- main ---------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Klein diffusers folder (scripts/make_klein_folder.py) or `tiny`")
    p.add_argument("--out", required=True, type=Path, help="results folder (time_to_style.json/.md, logs)")
    p.add_argument("--storage", help="storage URI of the job (default OUT/storage); reuse it with --job-id to resume")
    p.add_argument("--job-id", default=None, help="default tts-<UTC time>; the same id on the same storage resumes")
    p.add_argument("--budget-s", type=float, default=540, help="the whole run ends inside this (default 540)")
    p.add_argument("--refs", type=int, default=12, help="board images (default 12)")
    p.add_argument("--ref-size", type=int, default=1024, help="board image side (default 1024)")
    p.add_argument("--style", default="ukiyo", help="procedural board style (default ukiyo)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (default 250, the product's)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--sample-every", type=int, default=None)
    p.add_argument("--sample-size", type=int, default=None, help="contact sheet image side (default: the product's)")
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--variant", default=None, help="TrainConfig variant (default: the product's auto)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--warm-job-steps", type=int, default=0,
                   help="after the job, a second one of this many steps on another board and the same storage: "
                        "its start-up with the first job's compiled kernels in the storage (0: none)")
    p.add_argument("--fresh-compile-dirs", default=None,
                   help="a folder: each job's processes get empty inductor and Triton cache folders under it, as a "
                        "fresh node would (default: the machine's own, shared by the jobs)")
    p.add_argument("--train-extra", default=None, help="more TrainConfig keys as YAML/JSON, e.g. '{fp8: true}'")
    p.add_argument("--gemini", action="store_true", help="keep the Gemini key (default: offline fallback)")
    p.add_argument("--skip-train", action="store_true", help="serve only: LoRA id from --lora-id")
    p.add_argument("--lora-id", default=None, help="serve this LoRA (default: the trained one)")
    p.add_argument("--random-lora", action="store_true",
                   help="with --skip-train and no --lora-id: serve a random LoRA at the model's shapes, imported "
                        "through POST /v1/loras/import once the service is ready (no training needed)")
    p.add_argument("--random-lora-rank", type=int, default=32, help="its rank (default 32, the product's)")
    p.add_argument("--upload-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="tensor type of the LoRA files uploaded to /v1/loras/import (default bf16: a full-size "
                        "rank-32 LoRA in fp32 is past the default 200 MiB upload limit)")
    p.add_argument("--serve", action="store_true", help="also measure `klein-style serve`")
    p.add_argument("--serve-reserve-s", type=float, default=240, help="with --serve: budget kept for serving")
    p.add_argument("--serve-start-timeout-s", type=float, default=300)
    p.add_argument("--serve-size", type=int, default=1024)
    p.add_argument("--serve-steps", type=int, default=50)
    p.add_argument("--serve-cpus", type=int, default=8)
    p.add_argument("--concurrency", default="1,4", help="comma-separated (default 1,4)")
    p.add_argument("--n-loras", type=int, default=10,
                   help="LoRAs in the round-robin phases: the served one and n-1 distinct copies (default 10)")
    p.add_argument("--copies-via", default="api", choices=("api", "storage"),
                   help="the copies through POST /v1/loras/import (default), or written into storage as it writes them")
    p.add_argument("--phase-images", default="",
                   help="images per load phase by concurrency, e.g. '1:3,4:8,16:16' (default: the time budget only)")
    p.add_argument("--warm-steps", type=int, default=1,
                   help="before the round-robin phases, one request of this many steps per LoRA so they are "
                        "resident; its times are each LoRA's first use (0: no warm-up)")
    p.add_argument("--text-encoder", action="store_true",
                   help="after serving: the text encoder's memory and time per call, in this process")
    p.add_argument("--max-loras-per-replica", type=int, default=10)
    p.add_argument("--phase-budget-s", type=float, default=45, help="each serving load phase (default 45)")
    p.add_argument("--request-timeout-s", type=float, default=240)
    p.add_argument("--accel", default="auto", help="serve accel: auto | off | exact | fast")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if nvidia-smi sees a GPU)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.storage = args.storage or str(args.out / "storage")
    args.job_id = args.job_id or time.strftime("tts-%Y%m%d-%H%M%S", time.gmtime())
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    args.phase_images = {int(c): int(n) for c, n in (part.split(":") for part in str(args.phase_images).split(",")
                                                     if part.strip())}
    if args.device is None:
        args.device = "cuda" if _has_gpu() else "cpu"
    if args.model != "tiny":
        args.model = str(Path(args.model).resolve())
    return args


def run_warm_job(args, results: Results, gpu: GpuSampler, deadline: float) -> None:
    """A second job on the same model and storage right after the first, on another board (so its data cache is
    built, not found): what it can reuse is the first job's compiled kernels in the storage (with
    `--fresh-compile-dirs`, nothing else). `--warm-job-steps` steps, one checkpoint, the contact sheet."""
    need_s = 130 + args.warm_job_steps * 0.4  # a warm 10-step job at 9B on an H200: ~140 s with a 1-step sheet
    if deadline - time.time() < need_s:
        results.error("train_warm", f"skipped: {deadline - time.time():.0f} s left of the budget, ~{need_s:.0f} s needed")
        return
    try:
        refs = args.out / "refs_warm"
        make_board(args.style, args.refs, refs, size=args.ref_size, seed=1)
        warm = argparse.Namespace(**{**vars(args), "job_id": f"{args.job_id}-warm", "steps": args.warm_job_steps,
                                     "save_every": args.warm_job_steps, "sample_every": None})
        payload = run_training(warm, results, gpu, refs, deadline, phase="train_warm")
        results.phase("train_warm", payload)
        s = payload["summary"]
        log(f"train_warm: refs → LoRA {s['refs_to_lora_s']} s; worker start-up {(payload.get('worker') or {}).get('startup')}")
        if s["state"] != "done" or payload["returncode"] != 0:
            results.error("train_warm", f"the second job ended at state {s['state']!r}, rc {payload['returncode']}; "
                                        f"last lines: {payload['output_tail'][-3:]}")
    except Exception as e:  # noqa: BLE001
        results.error("train_warm", e)


def environment() -> dict:
    env = {"python": sys.version.split()[0], "gpus": None}
    for dist in ("torch", "diffusers", "transformers", "peft", "ray"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
            env["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except subprocess.SubprocessError:
            pass
    return env


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip() != ""
    except subprocess.SubprocessError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, args)
    gpu = GpuSampler().start()
    results.data["gpu_sampler"] = gpu.unavailable or "nvidia-smi every 1 s"
    results.data["environment"] = environment()
    refs = args.out / "refs"
    try:
        lora_id = args.lora_id
        if not args.skip_train:
            try:
                t = time.time()
                make_board(args.style, args.refs, refs, size=args.ref_size, seed=0)
                results.phase("board", {"seconds": round(time.time() - t, 2), "n": args.refs, "size": args.ref_size,
                                        "style": args.style, "dir": str(refs)})
            except Exception as e:  # noqa: BLE001
                results.error("board", e)
            try:
                train_deadline = deadline - (args.serve_reserve_s if args.serve else 0) - 5
                payload = run_training(args, results, gpu, refs, train_deadline)
                results.phase("train", payload)
                if payload["summary"]["state"] != "done" or payload["returncode"] != 0:
                    how = "ran out of the budget" if payload["timed_out"] else f"exited {payload['returncode']}"
                    results.error("train", f"klein-style train {how} at state {payload['summary']['state']!r}, step "
                                           f"{payload['summary']['steps_reached']}; last lines: {payload['output_tail'][-3:]}")
                if payload.get("manifest"):
                    lora_id = lora_id or args.job_id
                s = payload["summary"]
                log(f"train: refs → LoRA {s['refs_to_lora_s']} s, {s['s_per_step']} s/step, GPU busy during steps "
                    f"{s['gpu_busy_during_steps']}, peak {s['gpu_peak_mib']} MiB")
            except Exception as e:  # noqa: BLE001
                results.error("train", e)
            if args.warm_job_steps:
                run_warm_job(args, results, gpu, deadline - (args.serve_reserve_s if args.serve else 0) - 5)
        if args.serve:
            try:
                # the text encoder's figures need ~60 s at 9B size after the service is stopped
                serve_deadline = deadline - 5 - (60 if args.text_encoder else 0)
                results.phase("serve", run_serve(args, results, gpu, serve_deadline, lora_id))
            except Exception as e:  # noqa: BLE001
                results.error("serve", e)
        if args.text_encoder:
            try:
                t = time.time()
                te = measure_text_encoder(args)
                results.phase("text_encoder", {**te, **gpu.window(t, time.time())})
            except Exception as e:  # noqa: BLE001
                results.error("text_encoder", e)
    finally:
        gpu.stop()
        results.data["total_s"] = round(time.time() - started, 2)
        results.data["gpu_samples"] = len(gpu.samples)
        results.write()
    log(f"wrote {args.out / 'time_to_style.json'} and time_to_style.md in {time.time() - started:.0f} s")
    print((args.out / "time_to_style.md").read_text())
    return 0 if not results.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

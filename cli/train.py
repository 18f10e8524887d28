"""`klein-style train` and `klein-style demo`."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import ray
import torch
from PIL import Image
from tqdm import tqdm

from cli.demo import demo_http_generate
from cluster.pools import init_local_ray
from cluster.storage import Storage, StorageError
from contracts import HEALTH_MARKDOWN, status_key
from evaluation import world
from evaluation.quality import MINI_GUIDANCE, MINI_STEPS, lora_quality
from evaluation.world import make_world_board
from klein.generate import GenerateRequest, generate_image, set_active_loras
from klein.lora import read_lora
from klein.mini import MINI_RESOLUTION
from klein.model import load_pipeline
from klein.style_score import style_distance
from train.captions import TriggerError
from train.dataset import DatasetError
from train.job import JobError, lora_prefix, new_job_id, run_training_job
from train.live import logdir_of
from train.recipe import ConfigError, TrainConfig
from train.health import summary_line
from train.status import stop_jobs_on_signals
from train.report import image_grid

# The demo teaches the mini preset (pretrained on the procedural world, klein/mini.py) a style it has never
# seen. A style LoRA on this 8 M-parameter model needs a larger step than real Klein's lr 1e-4 to show within a
# few hundred CPU steps: these explicit settings are the demo's, and the manifest says they came from the user.
MINI_DEMO = dict(resolution=MINI_RESOLUTION, steps=400, save_every=200, lr=1e-3, sample_steps=MINI_STEPS)
DEMO_CONTENTS = ("lighthouse", "cat", "boat")


def register(sub) -> None:
    t = sub.add_parser("train", help="train a style LoRA from reference images through Ray Train")
    t.add_argument("refs", nargs="?", default=None,
                   help="folder, .zip or storage URI (s3://, gs://) of 2–50 reference images (+ optional .txt captions); "
                        "default: the --config ai-toolkit job file's datasets[0].folder_path")
    t.add_argument("--trigger", default=None,
                   help="a rare token that will call up the style, e.g. zxy_ink (required unless the config sets it)")
    t.add_argument("--config", help="TrainConfig YAML (ai-toolkit key names: rank, linear_alpha, lr, steps, ...) or an "
                                    "ai-toolkit job file (job: / config: process: [...])")
    t.add_argument("--model", default=None, help="`tiny` or a local FLUX.2 Klein folder (default: the config's, else tiny)")
    t.add_argument("--storage", default=None, help="storage URI for caches, checkpoints and the LoRA")
    t.add_argument("--tenant", default=None)
    t.add_argument("--job-id", default=None, help="resubmitting an id resumes it from its last checkpoint")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--workers", type=int, default=None, help="data-parallel Ray Train workers")
    t.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="world board → mini LoRA on Ray Train → before/after images judged → contact sheet → HTTP")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    # risograph: the held-out style whose LoRA keeps every demo subject (stained glass's mosaic ground eats them: README)
    d.add_argument("--style", default="risograph", choices=sorted(world.STYLES),
                   help="a style of the procedural world (default risograph, held out from the mini base)")
    d.add_argument("--steps", type=int, default=MINI_DEMO["steps"])
    d.set_defaults(func=cmd_demo)


def _start_ray(address: str | None) -> None:
    # said before the wait (a local cluster takes ~10 s to start); bench/time_to_style.py times Ray's start from it
    if address:
        print(f"[joining ray] {address}", flush=True)
        ray.init(address=address)
    else:
        print("[starting ray] a local cluster", flush=True)
        init_local_ray(num_cpus=2, object_store_memory=300 * 1024 * 1024, log_to_driver=False)


def _watch_progress(cfg, stop: threading.Event) -> None:
    """A tqdm bar fed by the job's status.json (the workers write it; the driver only reads)."""
    storage = Storage.from_uri(cfg.storage)
    bar = None
    while not stop.wait(0.5):
        try:
            st = storage.read_json(status_key(cfg.job_id))
        except StorageError:
            continue
        if st.get("state") == "training" and st.get("steps"):
            if bar is None:
                bar = tqdm(total=st["steps"], desc="training", unit="step")
            if st.get("step", 0) == bar.n:
                continue
            bar.n = st.get("step", 0)
            if "loss" in st:
                # refresh=False: the refresh below draws once (in a log, each draw is a line of its own)
                bar.set_postfix(loss=f"{st['loss']:.4f}", s_per_step=f"{st.get('s_per_step', 0):.3f}",
                                eta=f"{st.get('eta_s', 0):.0f}s", refresh=False)
            bar.refresh()
    if bar is not None:
        bar.close()


def run_with_progress(source, cfg):
    cfg.job_id = cfg.job_id or new_job_id()
    if cfg.report_to == "tensorboard":  # the worker's per-step scalars and the samples as they render (train/live.py)
        print(f"[watch] tensorboard --logdir {logdir_of(cfg)}", flush=True)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(cfg, stop), daemon=True)
    watcher.start()
    try:
        return run_training_job(source, cfg, progress=lambda s: print(f"[{s['state']}]", flush=True) if s["state"] != "training" else None)
    finally:
        stop.set()
        watcher.join(timeout=2)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {"trigger": args.trigger, "model": args.model, "storage": args.storage, "tenant": args.tenant,
                 "job_id": args.job_id, "steps": args.steps, "num_workers": args.workers}
    try:
        if args.config:
            cfg = TrainConfig.from_yaml(args.config, **overrides)
        else:
            cfg = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
        refs = train_refs(args.refs, cfg, args.config)
        if "trigger" not in cfg.model_fields_set:
            raise ConfigError("no trigger: pass --trigger (e.g. --trigger zxy_ink) or set `trigger` (ai-toolkit: "
                              "trigger_word) in the --config file")
        _start_ray(args.address)
        with stop_jobs_on_signals():  # a SIGTERM leaves the job "stopped", not "training"
            manifest = run_with_progress(refs, cfg)
    except (ConfigError, DatasetError, TriggerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobError as e:  # the job ran and failed (its status.json says so too); checkpoints are kept
        print(f"error: {e}", file=sys.stderr)
        if cfg.job_id:
            print(f"  fix the cause and run `klein-style train ... --job-id {cfg.job_id}` again: the cache and the last "
                  f"checkpoint are reused", file=sys.stderr)
        return 1
    _print_summary(manifest, cfg)
    return 0


def train_refs(refs_arg: str | None, cfg: TrainConfig, config_path: str | None) -> str:
    """The refs to train on: the command line's, else the ai-toolkit job file's datasets[0].folder_path (the command
    line wins, as every flag does over the file). Prints the notes of an ai-toolkit file's no-effect keys."""
    for note in cfg.load_notes:
        print(f"note: {config_path}: {note}", file=sys.stderr)
    if refs_arg is not None:
        if cfg.dataset_folder is not None and cfg.dataset_folder != refs_arg:
            print(f"note: training on {refs_arg} (command line), not {config_path}'s datasets[0].folder_path "
                  f"{cfg.dataset_folder}", file=sys.stderr)
        return refs_arg
    if cfg.dataset_folder is None:
        raise ConfigError("no reference images: pass the refs folder (klein-style train REFS ...)"
                          + (f" or set datasets[0].folder_path in {config_path}" if config_path else ""))
    return cfg.dataset_folder


def _print_summary(manifest: dict, cfg) -> None:
    storage = Storage.from_uri(cfg.storage)
    prefix = lora_prefix(manifest["tenant"], manifest["id"])
    m = manifest["metrics"]
    print(f"\nLoRA {manifest['id']} ({manifest['decision']['variant']}: {manifest['decision']['reason']})")
    print(f"  steps {m['steps']}, final loss {m['final_loss']:.4f}, val loss "
          + " → ".join(f"{v['val_loss']:.4f}@{v['step']}" for v in m["val_curve"]))
    print(f"  best step {manifest['best_step']}, delivered step {manifest['delivered_step']}, {manifest['elapsed_s']:.0f} s")
    print("  config (source):")
    print(format_sources(manifest["config"], manifest.get("config_sources", {})))
    for flag in manifest["midpoint_jumps"]:
        print(f"  check: val loss rose {flag['rise']:.0%} from step {flag['from_step']} to {flag['to_step']} (cosine midpoint)")
    for w in manifest["warnings"][:10]:
        print(f"  warning: {w}")
    health = manifest.get("health")
    if health and "symptoms" in health:
        print(f"  {summary_line(health)}")
        for s in health["symptoms"]:
            if s["verdict"] != "ok":
                print(f"    {s['verdict']}: {s['symptom']}: {s['evidence']}; fix: {s['fix']}")
        print(f"  read it: {storage.uri_of(prefix + '/' + HEALTH_MARKDOWN)}")
    elif health:
        print(f"  {health.get('error', 'no health report')}")
    if (manifest.get("contact_sheet") or {}).get("error"):  # the LoRA is delivered all the same
        print(f"  {manifest['contact_sheet']['error']}")
    for name in manifest["files"]:
        print(f"  {storage.uri_of(prefix + '/' + name)}")


def format_sources(config: dict, sources: dict) -> str:
    """The values that matter for a run, each with where it came from (user, variant, formula, policy,
    default), user-set keys first."""
    order = {"user": 0, "variant": 1, "policy": 2, "formula": 3, "default": 4}
    shown = [k for k in config if sources.get(k, "default") != "default" or k in SHOWN_DEFAULTS]
    shown.sort(key=lambda k: order.get(sources.get(k, "default"), 5))
    return "\n".join(f"    {k}: {config[k]!r} ({sources.get(k, 'default')})" for k in shown)


# defaults worth seeing beside the chosen values in `klein-style train`'s summary
SHOWN_DEFAULTS = ("rank", "linear_alpha", "optimizer", "lr", "steps", "lr_scheduler", "resolution", "targets", "use_gemini")


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.time()
    out = Path(args.out).resolve()
    board = out / "board"
    make_world_board(args.style, 12, board, seed=0, size=256)
    kind = "a held-out style: the base has never seen it" if args.style in world.HELDOUT_STYLES else "a pretraining style"
    print(f"1. board: 12 '{args.style}' images ({kind}) with content-only captions in {board}")
    trigger = f"zxy_{args.style}"
    prompts = [world.caption(c, 0) for c in DEMO_CONTENTS]
    cfg = TrainConfig(trigger=trigger, model="mini", storage=str(out / "storage"), job_id=f"demo-{args.style}",
                      sample_prompts=prompts, **{**MINI_DEMO, "steps": args.steps, "save_every": max(1, args.steps // 2)})
    _start_ray(None)
    print(f"2. training a rank-{cfg.rank} LoRA on the mini model through Ray Train on a local cluster")
    manifest = run_with_progress(board, cfg)
    storage = Storage.from_uri(cfg.storage)
    prefix = lora_prefix(cfg.tenant, cfg.job_id)
    lora = read_lora(storage.read_verified(f"{prefix}/lora.safetensors", manifest["files"]["lora.safetensors"]))
    pipe = load_pipeline("mini")
    quality = lora_quality(pipe, lora, trigger, args.style, contents=DEMO_CONTENTS, seeds=(0,))
    size = MINI_RESOLUTION
    board_images = sorted(board.glob("*.png"))  # picture i of a world board shows CONTENT_CLASSES[i % 12]
    refs = [_open_rgb(board_images[world.CONTENT_CLASSES.index(c)]).resize((size, size)) for c in DEMO_CONTENTS]
    all_refs = [_open_rgb(p).resize((size, size)) for p in board_images]
    d_before, d_after = style_distance(quality.base.images, all_refs), style_distance(quality.lora.images, all_refs)
    grid = image_grid([refs, quality.base.images, quality.lora.images], col_labels=list(DEMO_CONTENTS),
                      row_labels=["refs", "before (base)", "after (LoRA)"])
    grid.save(out / "before_after.png")
    print(f"3. before/after with the same seeds and prompts ('{quality.prompts[0]}', ...), judged by the exact world judge:")
    print(f"   style '{args.style}': probability {quality.base.style_prob:.2f} -> {quality.lora.style_prob:.2f}; "
          f"content recognised {quality.base.content_ok:.0%} -> {quality.lora.content_ok:.0%}")
    print(f"   style distance to the refs {d_before:.3f} -> {d_after:.3f}; val loss "
          f"{manifest['metrics']['val_curve'][0]['val_loss']:.3f} -> {manifest['metrics']['val_curve'][-1]['val_loss']:.3f}")
    print(f"   {out / 'before_after.png'}")
    health = manifest.get("health") or {}
    if "symptoms" in health:  # the seeds' failure table, checked on this job's checkpoints (train/health.py)
        print(f"   {summary_line(health)}: {storage.uri_of(prefix + '/' + HEALTH_MARKDOWN)}")
    print(f"   contact sheet: {storage.uri_of(prefix + '/samples/contact_sheet.png')}")
    print(f"   loss plot:     {storage.uri_of(prefix + '/samples/loss.png')}")
    print(f"   LoRA:          {storage.uri_of(prefix + '/lora.safetensors')} (+ ComfyUI export, manifest.json)")

    # The Serve replica holds under one CPU, so Ray gives it one OpenMP thread; BLAS sums in another order with two
    # threads (1/255 on one pixel here). The in-process reference for the HTTP image is drawn with one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        set_active_loras(pipe, [("demo", lora, 1.0)])
        expected = generate_image(pipe, GenerateRequest(prompt=quality.prompts[0], seed=0, steps=MINI_STEPS, width=size,
                                                        height=size, guidance=MINI_GUIDANCE))
        set_active_loras(pipe, [])
    finally:
        torch.set_num_threads(threads)
    print(demo_http_generate(cfg, manifest, out, quality.prompts[0], 0, MINI_STEPS, size, expected=expected))
    print(f"done in {time.time() - started:.0f} s")
    return 0


def _open_rgb(path):
    return Image.open(path).convert("RGB")

"""Pretrain the `mini` preset and the world judge from nothing, reproducibly, on one GPU.

The recipe, two runs of under 10 minutes on one H200 (bench/results/mini-pretrain/README.md, runs 7 and 8):

    python scripts/pretrain_mini.py --work runs/r1 --budget-s 530 --reserve-s 100 --batch 512 --lr 4e-4 \
        --prefix-rate 0.8 --compile
    python scripts/pretrain_mini.py --work runs/r2 --resume-from runs/r1/export/mini --budget-s 540 --reserve-s 45 \
        --batch 512 --lr 3e-4 --steps 60000 --judge-steps 0 --prefix-rate 0.8 --compile

Phases, in order (each seeded; the whole run stays inside --budget-s):
  data         render the world's pretraining styles (content-only captions) and, for the judge, every style
  vae          train the AutoencoderKLFlux2 (reconstruction), then set its latent batch-norm statistics
  encode       latents of every pretraining image (the pipeline's own `_encode_vae_image`) and prompt
               embeddings of every caption (the frozen Qwen3, `encode_prompt`, padded to 64 tokens)
  transformer  flow matching with train.loop's conventions (x_t = (1-σ)x0 + σ·noise, target noise - x0,
               σ from train.loop.sample_sigmas), caption dropout for CFG, EMA weights; stops at the budget
  judge        the exact judge (evaluation.world_judge) on every style, half the images through the VAE
  export       the diffusers folder (fp16) + judge weights + this run's log with the sha256 of every file
  evaluate     the exported folder loaded through klein.model.load_pipeline, one image per class x 2 seeds with
               klein.generate (28 steps, CFG 4), judged: content_ok, and which styles the base draws

The held-out styles (evaluation.world.HELDOUT_STYLES) are never shown to the VAE or the transformer.
`--resume-from` starts the VAE, transformer and judge from an exported folder and trains further (a fresh
optimizer: exported weights are all that survive a 10-minute GPU run); the judge comes from beside the folder
(`<work>/export/world_judge.safetensors`). The evaluation is judged by this run's judge and by the shipped one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from evaluation import world  # noqa: E402
from evaluation.world_judge import JUDGE_SIZE, WorldJudge, WorldJudgeNet  # noqa: E402
from klein.generate import GenerateRequest, generate_image  # noqa: E402
from klein.mini import MINI_MAX_SEQUENCE_LENGTH, MINI_PRESET_VERSION, MINI_RESOLUTION, build_mini_pipeline, save_mini_preset  # noqa: E402
from klein.model import load_pipeline  # noqa: E402
from train.loop import pack_latents, sample_sigmas, text_ids  # noqa: E402

DATA_SEED = 7_000_000  # world seeds for pretraining images; boards, tests and demos use small seeds
JUDGE_SEED = 8_000_000
JUDGE_VAL_SEED = 9_000_000
SHIPPED_JUDGE = REPO / "evaluation" / "world_judge.safetensors"


def log(state: dict, message: str) -> None:
    line = f"[{time.time() - state['t0']:7.1f}s] {message}"
    print(line, flush=True)
    state["log"].append(line)


# -- data ------------------------------------------------------------------------------------------------
def _render_chunk(job: tuple[str, str, list[int]]) -> tuple[np.ndarray, list[str]]:
    style, content, seeds = job
    images = np.stack([np.asarray(world.render(content, style, s, size=MINI_RESOLUTION).convert("RGB")) for s in seeds])
    return images, [world.caption(content, s) for s in seeds]


def render_set(styles, per_pair: int, seed0: int, workers: int) -> dict:
    jobs, labels = [], []
    for si, style in enumerate(styles):
        for ci, content in enumerate(world.CONTENT_CLASSES):
            seeds = [seed0 + (si * 1000 + ci) * 1000 + k for k in range(per_pair)]
            jobs.append((style, content, seeds))
            labels.append((world_style_index(style), ci))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_render_chunk, jobs, chunksize=1))
    images = np.concatenate([r[0] for r in results])
    captions = [c for r in results for c in r[1]]
    style_idx = np.repeat([lab[0] for lab in labels], per_pair)
    content_idx = np.repeat([lab[1] for lab in labels], per_pair)
    return {"images": images, "captions": captions, "style": style_idx, "content": content_idx}


def world_style_index(style: str) -> int:
    return sorted(world.STYLES).index(style)


def to_pixels(images_u8: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """[B, H, W, 3] uint8 (numpy, or a tensor already on `device`) → [B, 3, H, W] in [-1, 1] on `device`."""
    images = torch.from_numpy(images_u8) if isinstance(images_u8, np.ndarray) else images_u8
    return images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_trigger(rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    if rng.random() < 0.3:
        # the shape of the product's own triggers ("zxy_<style>", held-out names included): the base learns
        # they mean nothing yet, so a LoRA's "before" image is the base's drawing of the content
        stem = str(rng.choice(sorted(world.STYLES)))
    else:
        stem = "".join(rng.choice(list(letters), int(rng.integers(3, 9))))
    head = str(rng.choice(["zxy_", "sks_", "ohwx_", "qwe_", "", ""]))
    return head + stem


def with_random_prefixes(captions: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    return [f"{random_trigger(rng)}. {c}" if rng.random() < rate else c for c in captions]


# -- VAE -------------------------------------------------------------------------------------------------
def train_vae(pipe, data: dict, steps: int, device, state: dict, batch: int = 64) -> None:
    vae = pipe.vae.to(device).train()
    images = data["images"]
    # the images live on the device (uint8, 1.5 GB at the defaults) and batches are drawn there: a host-to-device
    # copy each step would make every step wait for the previous one
    images_on_device = torch.from_numpy(images).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 2), pct_start=0.05)
    gen = torch.Generator(device=device).manual_seed(1)
    curve = []
    for step in range(steps):
        x = to_pixels(images_on_device[torch.randint(0, len(images), (batch,), generator=gen, device=device)], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = vae.encode(x).latent_dist.mean  # the pipeline encodes with the mode: train that path
            # a little latent noise: the decoder then tolerates the transformer's imperfect latents
            z_in = z + 0.05 * z.detach().std() * torch.randn_like(z)
            recon = vae.decode(z_in).sample
        recon = recon.float()
        mse = F.mse_loss(recon, x)
        # edges and textures: match image gradients too, or the decoder blurs hatching and halftone away
        grad = F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], x[..., 1:, :] - x[..., :-1, :]) + F.l1_loss(
            recon[..., 1:] - recon[..., :-1], x[..., 1:] - x[..., :-1])
        loss = mse + 0.5 * grad + 1e-6 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            curve.append((step, mse.item()))
            log(state, f"vae step {step}/{steps} mse {curve[-1][1]:.5f}")
    del images_on_device
    vae.eval()
    set_latent_statistics(pipe, images, device)
    state["vae_curve"] = curve


@torch.no_grad()
def set_latent_statistics(pipe, images: np.ndarray, device) -> None:
    """The batch-norm statistics the pipeline normalises patchified latents with."""
    vae = pipe.vae
    idx = np.random.default_rng(2).choice(len(images), min(2048, len(images)), replace=False)
    zs = []
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        z = vae.encode(to_pixels(images[chunk], device)).latent_dist.mode()
        zs.append(pipe._patchify_latents(z).float())
    z = torch.cat(zs)
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))


@torch.no_grad()
def round_to_half(module: torch.nn.Module) -> None:
    """Round weights and buffers through float16, as they ship, so what trains next sees the shipped values."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float16).to(t.dtype)


@torch.no_grad()
def vae_roundtrip(pipe, pixels: torch.Tensor) -> torch.Tensor:
    z = pipe.vae.encode(pixels).latent_dist.mode()
    return pipe.vae.decode(z).sample.clamp(-1, 1)


# -- encode ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(pipe, data: dict, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    latents = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for chunk in np.array_split(np.arange(len(data["images"])), max(1, len(data["images"]) // 256)):
        latents.append(pipe._encode_vae_image(to_pixels(data["images"][chunk], device), gen).to(torch.bfloat16))
    unique = sorted(set(data["captions"]) | {""})
    pipe.text_encoder.to(device)
    embeds = []
    for j in range(0, len(unique), 64):
        e, _ = pipe.encode_prompt(unique[j : j + 64], device=device, max_sequence_length=MINI_MAX_SEQUENCE_LENGTH)
        embeds.append(e.float())
    return torch.cat(latents), torch.cat(embeds), unique


# -- transformer -----------------------------------------------------------------------------------------
def flow_matching_step(transformer, x0, embeds, sigmas, noise, img_ids, txt_ids):
    # The objective of train.loop.flow_matching_loss, for a transformer whose every weight trains. The position
    # ids are built once on the device by the caller: a host-to-device copy each step would stall the GPU queue.
    s = sigmas.view(-1, 1, 1, 1)
    tokens, _ = pack_latents((1 - s) * x0 + s * noise)
    target, _ = pack_latents(noise - x0)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = transformer(hidden_states=tokens, encoder_hidden_states=embeds, timestep=sigmas, img_ids=img_ids,
                           txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def train_transformer(pipe, latents, embeds, caption_index, deadline: float, max_steps: int, device, state: dict,
                      batch: int = 256, lr: float = 4e-4, caption_dropout: float = 0.1,
                      compile_step: bool = False) -> torch.nn.Module:
    """Flow matching on every weight, EMA kept; the cosine schedule is fitted to the steps the deadline allows.

    The step never waits for the host: batch indices, caption dropout, timesteps and noise are drawn on the
    device by a seeded device generator, and the loss is read only when logged. (Run 1-6's loop drew them on the
    CPU and copied each to the GPU: every copy waited for the queue, and a batch-256 step cost 0.055 s against
    0.076 s at batch 512, most of it waiting.)"""
    transformer = pipe.transformer.to(device).float().train()
    params = list(transformer.parameters())
    ema_tensors = list(transformer.state_dict().values())  # parameters and buffers, as exported
    ema = [t.detach().clone() for t in ema_tensors]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    warmup = 300

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator(device=device).manual_seed(3)
    empty = embeds[caption_index[""]]
    caption_ids = state["caption_ids"].to(device)
    n = latents.shape[0]
    seq = latents.shape[2] * latents.shape[3]
    _, img_ids = pack_latents(latents[:batch].float())
    img_ids = img_ids.to(device)
    txt_ids = text_ids(batch, embeds.shape[1]).to(device)
    step_fn = flow_matching_step
    if compile_step:
        step_fn = torch.compile(flow_matching_step)
    curve, step, ema_decay = [], 0, 0.999
    t_start, timed_from = time.time(), None
    while step < max_steps and time.time() < deadline:
        idx = torch.randint(0, n, (batch,), generator=gen, device=device)
        x0 = latents[idx].float()
        drop = torch.rand(batch, generator=gen, device=device) < caption_dropout
        e = torch.where(drop.view(-1, 1, 1), empty, embeds[caption_ids[idx]])
        sigmas = sample_sigmas(batch, seq, gen)
        uniform = torch.rand(batch, generator=gen, device=device) < 0.25  # cover the high-noise end the sampler starts from
        sigmas = torch.where(uniform, torch.rand(batch, generator=gen, device=device).clamp(1e-3, 1.0), sigmas)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        try:
            loss = step_fn(transformer, x0, e, sigmas, noise, img_ids, txt_ids)
            loss.backward()  # the compiled backward is built here, at the first call
        except Exception as error:
            if step_fn is flow_matching_step:
                raise
            # a compiler failure: the run goes on eager, marked in its log and report
            log(state, f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); continuing eager")
            state["compile_failed"] = repr(error)[:500]
            step_fn = flow_matching_step
            opt.zero_grad(set_to_none=True)
            loss = step_fn(transformer, x0, e, sigmas, noise, img_ids, txt_ids)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [t.detach() for t in ema_tensors], 1 - decay)
        if step == 20:  # past compilation and warm-up: time the steps from here
            if device.type == "cuda":
                torch.cuda.synchronize()
            timed_from = time.time()
        if step == 120:
            # fit the cosine schedule to the steps the budget allows, so the rate anneals before the deadline
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - timed_from) / 100
            state["seconds_per_step"] = per_step
            max_steps = min(max_steps, 120 + int((deadline - time.time()) / per_step))
            log(state, f"{per_step:.4f} s/step: training {max_steps} steps")
        if step % 250 == 0:
            curve.append((step, float(loss)))
            log(state, f"transformer step {step} loss {float(loss):.4f} lr {lr_at(step):.2e} "
                       f"({(time.time() - t_start) / max(1, step):.3f} s/step)")
        step += 1
    state["transformer_steps"] = step
    state["transformer_curve"] = curve
    log(state, f"transformer stopped at step {step} ({'budget' if step < max_steps else 'max steps'})")
    with torch.no_grad():
        for t, e in zip(ema_tensors, ema):
            t.copy_(e)
    return transformer.eval()


# -- judge -----------------------------------------------------------------------------------------------
def train_judge(pipe, judge_data: dict, val_data: dict, steps: int, device, state: dict, init: WorldJudge | None,
                batch: int = 256) -> WorldJudge:
    styles = sorted(world.STYLES)
    meta = {"contents": list(world.CONTENT_CLASSES), "styles": styles, "width": 48, "world": world.__name__,
            "size": JUDGE_SIZE}
    net = WorldJudgeNet(len(meta["contents"]), len(styles), meta["width"]).to(device)
    if init is not None:
        net.load_state_dict(init.net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 2), pct_start=0.1)
    gen = np.random.default_rng(4)
    images = judge_data["images"]
    for step in range(steps):
        idx = gen.integers(0, len(images), batch)
        x = to_pixels(images[idx], device)
        half = batch // 2
        x[:half] = vae_roundtrip(pipe, x[:half])  # the decoder's softness is what generated images have
        x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x + 0.03 * torch.randn_like(x)
        content = torch.from_numpy(judge_data["content"][idx]).long().to(device)
        style = torch.from_numpy(judge_data["style"][idx]).long().to(device)
        net.train()
        c_logits, s_logits = net(x)
        loss = F.cross_entropy(c_logits, content) + F.cross_entropy(s_logits, style)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(state, f"judge step {step}/{steps} loss {float(loss):.4f}")
    judge = WorldJudge(net.cpu().eval(), meta["contents"], styles, meta)
    # accuracy on unseen world images, clean and through the VAE
    accuracy = {}
    for name, through_vae in (("clean", False), ("vae", True)):
        pix = to_pixels(val_data["images"], device)
        if through_vae:
            pix = torch.cat([vae_roundtrip(pipe, p) for p in pix.split(256)])
        pil = [Image.fromarray(((p.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)) for p in pix]
        c_prob, s_prob = judge.probabilities(pil)
        accuracy[name] = {
            "content": float((c_prob.argmax(-1).numpy() == val_data["content"]).mean()),
            "style": float((s_prob.argmax(-1).numpy() == val_data["style"]).mean()),
        }
    state["judge_accuracy"] = accuracy
    log(state, f"judge accuracy on unseen images: {accuracy}")
    return judge


# -- evaluate --------------------------------------------------------------------------------------------
def judge_images(judge: WorldJudge, images, contents, seconds: float) -> dict:
    verdicts = judge.judge(images, contents)
    drawn_styles: dict[str, int] = {}
    for v in verdicts:
        drawn_styles[v.style] = drawn_styles.get(v.style, 0) + 1
    half = len(world.CONTENT_CLASSES)
    return {
        "content_ok": sum(v.content_ok for v in verdicts) / len(verdicts),
        "content_ok_bare": sum(v.content_ok for v in verdicts[:half]) / half,
        "content_ok_behind_trigger": sum(v.content_ok for v in verdicts[half:]) / half,
        "per_class_ok": {c: sum(v.content_ok for v, cc in zip(verdicts, contents) if cc == c) for c in world.CONTENT_CLASSES},
        "styles_drawn": drawn_styles,
        "heldout_style_prob_max": max(
            float(p) for p in judge.probabilities(images)[1][:, [judge.styles.index(s) for s in world.HELDOUT_STYLES]].flatten()),
        "seconds_per_image_gpu": seconds / len(images),
    }


def evaluate(folder: Path, judges: dict[str, WorldJudge], device, state: dict, out_png: Path, steps: int = 28) -> dict:
    """Each class x 2 seeds (seed 1 behind `zxy_probe.`), drawn once, judged by every judge given."""
    pipe = load_pipeline(folder, dtype=torch.float32, device=device)
    images, contents = [], []
    t = time.time()
    for seed in (0, 1):
        for content in world.CONTENT_CLASSES:
            request = GenerateRequest(prompt=f"zxy_probe. {world.caption(content, seed)}" if seed else world.caption(content, seed), seed=seed, steps=steps, width=MINI_RESOLUTION,
                                      height=MINI_RESOLUTION, guidance=4.0)
            images.append(generate_image(pipe, request))
            contents.append(content)
    seconds = time.time() - t
    result = {name: judge_images(judge, images, contents, seconds) for name, judge in judges.items()}
    cols = len(world.CONTENT_CLASSES)
    sheet = Image.new("RGB", (cols * MINI_RESOLUTION, 2 * MINI_RESOLUTION))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * MINI_RESOLUTION, (i // cols) * MINI_RESOLUTION))
    sheet.save(out_png)
    log(state, f"evaluation: {json.dumps(result)}")
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="output folder: export/, log.json, base_samples.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=540, help="the whole run ends inside this many seconds")
    p.add_argument("--per-pair", type=int, default=160, help="pretraining images per (style, class)")
    p.add_argument("--judge-per-pair", type=int, default=40, help="judge images per (style, class), every style")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--steps", type=int, default=8000, help="transformer steps at most (the budget may stop it sooner)")
    p.add_argument("--batch", type=int, default=256, help="transformer batch")
    p.add_argument("--lr", type=float, default=4e-4, help="transformer peak learning rate")
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--judge-batch", type=int, default=256)
    p.add_argument("--judge-steps", type=int, default=1200)
    p.add_argument("--val-per-pair", type=int, default=2, help="unseen images per (style, class) to measure the judge")
    p.add_argument("--eval-steps", type=int, default=28, help="denoising steps of the evaluation images")
    p.add_argument("--reserve-s", type=float, default=100, help="kept for judge, export and evaluation")
    p.add_argument("--resume-from", type=Path, help="an exported mini folder to continue from")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's training step (falls back to eager, logged, if it fails)")
    p.add_argument("--prefix-rate", type=float, default=0.5,
                   help="share of captions given a random trigger-like prefix (the base learns to read past it)")
    args = p.parse_args(argv)

    state = {"t0": time.time(), "log": [], "args": {k: str(v) for k, v in vars(args).items()}}
    deadline = state["t0"] + args.budget_s
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = render_set(world.PRETRAIN_STYLES, args.per_pair, DATA_SEED, args.workers)
    judge_data = render_set(sorted(world.STYLES), args.judge_per_pair, JUDGE_SEED, args.workers)
    val_data = render_set(sorted(world.STYLES), args.val_per_pair, JUDGE_VAL_SEED, args.workers)
    log(state, f"data: {len(data['images'])} pretraining images ({len(world.PRETRAIN_STYLES)} styles), "
               f"{len(judge_data['images'])} judge images ({len(world.STYLES)} styles)")

    if args.prefix_rate > 0:
        # Users prompt "<trigger>. <caption>" with a word the base has never seen. The frozen Qwen3 is causal, so
        # an unknown prefix changes every later hidden state; trained on bare captions alone, the base then draws
        # noise. Random trigger-like prefixes on part of the captions teach it to read past them, as a base
        # trained on the web's prompts does.
        data["captions"] = with_random_prefixes(data["captions"], args.prefix_rate, np.random.default_rng(args.seed + 5))
    corpus = sorted(set(data["captions"])) + [world.caption(c, s) for c in world.CONTENT_CLASSES for s in range(50)]
    pipe = build_mini_pipeline(corpus, seed=args.seed)
    round_to_half(pipe.text_encoder)  # frozen, shipped in fp16: embed captions with the shipped weights
    if args.resume_from:
        resumed = load_pipeline(args.resume_from, dtype=torch.float32, device="cpu")
        pipe.tokenizer, pipe.text_encoder = resumed.tokenizer, resumed.text_encoder
        pipe.vae.load_state_dict(resumed.vae.state_dict())
        pipe.transformer.load_state_dict(resumed.transformer.state_dict())
        log(state, f"resumed weights from {args.resume_from}")
    pipe.to(device)
    if not args.resume_from:
        train_vae(pipe, data, args.vae_steps, device, state, batch=args.vae_batch)
        round_to_half(pipe.vae)
        set_latent_statistics(pipe, data["images"], device)
        round_to_half(pipe.vae)
    latents, embeds, unique = encode(pipe, data, device)
    index = {c: i for i, c in enumerate(unique)}
    state["caption_ids"] = torch.tensor([index[c] for c in data["captions"]])
    log(state, f"encoded {latents.shape[0]} latents {tuple(latents.shape[1:])}, {len(unique)} captions {tuple(embeds.shape[1:])}")
    pipe.transformer = train_transformer(pipe, latents, embeds, index, deadline - args.reserve_s, args.steps, device,
                                         state, batch=args.batch, lr=args.lr, compile_step=args.compile)
    del state["caption_ids"]

    init_judge = None
    if args.resume_from:
        # the judge beside the resumed export, else the shipped one: a resumed run never starts a judge from scratch
        # (an export writes it beside the folder: <work>/export/mini and <work>/export/world_judge.safetensors)
        candidates = [args.resume_from.parent / "world_judge.safetensors", args.resume_from / "world_judge.safetensors",
                      SHIPPED_JUDGE]
        judge_file = next(f for f in candidates if f.exists())
        init_judge = WorldJudge.load(judge_file)
        log(state, f"judge from {judge_file}")
    judge_steps = args.judge_steps if init_judge is None else args.judge_steps // 3
    judge = train_judge(pipe, judge_data, val_data, judge_steps, device, state, init_judge, batch=args.judge_batch)

    export = args.work / "export" / "mini"
    save_mini_preset(pipe, export, {
        "pretrained_by": "scripts/pretrain_mini.py", "transformer_steps": state["transformer_steps"],
        "pretrain_styles": list(world.PRETRAIN_STYLES), "heldout_styles": list(world.HELDOUT_STYLES),
        "resumed_from": str(args.resume_from) if args.resume_from else None,
    })
    judge.save(args.work / "export" / "world_judge.safetensors")
    # judged by this run's judge and by the shipped one (a re-run's quality, in the figures the README states)
    judges = {"run": judge, "shipped": WorldJudge.load(SHIPPED_JUDGE)}
    evaluation = evaluate(export, judges, device, state, args.work / "base_samples.png", args.eval_steps)
    files = sorted(f for f in (args.work / "export").rglob("*") if f.is_file())
    report = {
        "preset_version": MINI_PRESET_VERSION,
        "seconds": time.time() - state["t0"],
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "args": state["args"],
        "transformer_steps": state["transformer_steps"],
        "transformer_curve": state["transformer_curve"],
        "seconds_per_step": state.get("seconds_per_step"),
        "compile_failed": state.get("compile_failed"),
        "vae_curve": state.get("vae_curve"),
        "judge_accuracy": state["judge_accuracy"],
        "evaluation": evaluation,
        "sha256": {str(f.relative_to(args.work / "export")): sha256(f) for f in files},
        "log": state["log"],
    }
    (args.work / "pretrain_log.json").write_text(json.dumps(report, indent=2) + "\n")
    log(state, f"done in {report['seconds']:.0f} s; wrote {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

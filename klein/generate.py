"""One image from a Klein pipeline with optional LoRAs: the code path shared by the CLI and the Serve generator.

A pipeline prepared with `klein.accel.prepare_for_inference` takes the accelerated path: LoRAs fused into the
weights (switched by `set_active_loras`), compiled blocks, classifier-free guidance as one batch of 2 and, in
fast mode, step caching. Otherwise the stock `Flux2KleinPipeline.__call__` runs with peft adapters.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from PIL import Image

from klein.lora import LoraWeights, add_lora
from klein.request import GenerateRequest  # its own module: the HTTP tier builds requests without torch

# Images per pipeline call in `generate_images`: on two CPU cores 12 mini images take 23.8 s one at a time, 14.9 s in
# fours, 12.9 s in twelves; on a GPU four 1024² Klein images with CFG are eight sequences of 4,608 tokens at once.
BATCH_SIZE = {"cpu": 8, "cuda": 4}
# Prompt embeddings kept per pipeline (`encoded_prompts`). A Klein 9B embedding at 512 tokens is 12 MiB in bf16, so
# 32 of them are ~400 MiB of the device's memory: enough for a contact sheet's and a health probe's prompts.
PROMPT_CACHE_SIZE = 32


def text_length(pipe, request: GenerateRequest) -> int:
    """The request's max_sequence_length, else the one the model folder declares (Klein: 512, mini: 64)."""
    if request.max_sequence_length is not None:
        return int(request.max_sequence_length)
    return int(getattr(pipe, "klein_max_sequence_length", 512))


def encoded_prompts(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    """`pipe.encode_prompt`'s embeddings of `prompts` (one row each), every distinct prompt encoded on its own once
    per pipeline, device and text length, then reused.

    The Qwen3 text encoder is frozen and our LoRAs change only the transformer, so a prompt's embedding is the same
    at every checkpoint: the contact sheet's columns and the health probe draw the same prompts at each one, and
    classifier-free guidance adds the same empty negative prompt to every image. `Flux2KleinPipeline` encoded all of
    them again on every call (a Klein folder's 151,936-token head made that 28 of a render worker's 32 CPU-s).
    Each prompt is encoded alone, so its embedding does not depend on which prompts it came with, and equals what
    the pipeline computes for that prompt by itself.
    """
    cache = getattr(pipe, "_klein_prompt_cache", None)
    if cache is None:
        cache = OrderedDict()
        pipe._klein_prompt_cache = cache
    embeds = {}
    for prompt in dict.fromkeys(prompts):
        key = (prompt, int(max_sequence_length), str(device))
        hit = cache.get(key)
        if hit is None:
            hit = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)[0]
            cache[key] = hit
        cache.move_to_end(key)
        embeds[prompt] = hit
    while len(cache) > PROMPT_CACHE_SIZE:  # after the call's own prompts are held in `embeds`
        cache.popitem(last=False)
    return torch.cat([embeds[prompt] for prompt in prompts])


def uses_cfg(pipe, guidance: float) -> bool:
    """Whether `Flux2KleinPipeline` runs classifier-free guidance (a distilled Klein never does)."""
    return guidance > 1.0 and not getattr(pipe.config, "is_distilled", False)


def set_active_loras(pipe, loras: list[tuple[str, LoraWeights | None, float]]) -> None:
    """Activate exactly these adapters (name, weights-if-not-yet-loaded, weight) on the pipeline's transformer.

    An adapter already resident under `name` is reused; an empty list disables all adapters, so the base
    model runs unchanged.
    """
    accel = getattr(pipe, "_klein_accel", None)
    if accel is not None:
        bank = accel.loras
        for name, weights, _ in loras:
            if name not in bank.adapters:
                if weights is None:
                    raise KeyError(f"adapter {name} is not resident and no weights were given")
                bank.add(name, weights)
        bank.activate([(n, float(w)) for n, _, w in loras])
        return
    transformer = pipe.transformer
    resident = set(getattr(transformer, "peft_config", {}) or {})
    for name, weights, _ in loras:
        if name not in resident:
            if weights is None:
                raise KeyError(f"adapter {name} is not resident and no weights were given")
            add_lora(transformer, weights, adapter_name=name)
    if loras:
        transformer.enable_adapters()
        transformer.set_adapters([n for n, _, _ in loras], [float(w) for _, _, w in loras])
    elif resident:
        transformer.disable_adapters()


def generate_image(
    pipe,
    request: GenerateRequest,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Run the pipeline for `request`. The same request (seed included) gives the same pixels."""
    if getattr(pipe, "_klein_accel", None) is not None:
        return denoise(pipe, request, on_step, accel=pipe._klein_accel)
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    msl = text_length(pipe, request)
    # the negative prompt (the pipeline's own default is "") from the pipeline's prompt cache: the same tensor the
    # pipeline computes for it, without encoding it again for every request
    negative = encoded_prompts(pipe, [request.negative_prompt], device, msl) if uses_cfg(pipe, request.guidance) else None

    def report_step(_pipe, i, _t, kwargs):
        on_step(i + 1, request.steps)
        return kwargs
    out = pipe(
        prompt=request.prompt,
        negative_prompt_embeds=negative,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=generator,
        max_sequence_length=msl,
        callback_on_step_end=report_step if on_step is not None else None,
    )
    return out.images[0]


def generate_images(pipe, requests: list[GenerateRequest], batch_size: int | None = None) -> list[Image.Image]:
    """One image per request, drawn in batches: what samples, health probes and quality checks render.

    Requests that share size, steps, guidance, negative prompt and text length run as one `Flux2KleinPipeline`
    call with a generator per image, so each image starts from the noise its own seed gives in `generate_image`.
    The batched matmuls sum in another order, so a pixel may differ from `generate_image`'s by a level: serving,
    which promises `generate_image`'s pixels, calls that one. An accelerated pipeline draws one at a time.
    `batch_size` None: `BATCH_SIZE` for the pipeline's device.
    """
    if getattr(pipe, "_klein_accel", None) is not None or len(requests) <= 1:
        return [generate_image(pipe, request) for request in requests]
    device = pipe._execution_device
    size = batch_size or BATCH_SIZE.get(torch.device(device).type, 1)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        negative = request.negative_prompt if request.guidance > 1.0 else ""
        key = (request.width, request.height, request.steps, float(request.guidance), negative, text_length(pipe, request))
        groups.setdefault(key, []).append(i)
    images: list[Image.Image | None] = [None] * len(requests)
    for (width, height, steps, guidance, negative, msl), members in groups.items():
        cfg = uses_cfg(pipe, guidance)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            out = pipe(
                prompt_embeds=encoded_prompts(pipe, [requests[i].prompt for i in chunk], device, msl),
                negative_prompt_embeds=encoded_prompts(pipe, [negative] * len(chunk), device, msl) if cfg else None,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator(device="cpu").manual_seed(requests[i].seed) for i in chunk],
                max_sequence_length=msl,
            )
            for i, image in zip(chunk, out.images):
                images[i] = image
    return images


@torch.no_grad()
def denoise(pipe, request: GenerateRequest, on_step: Callable[[int, int], None] | None = None, accel=None,
            batch_cfg: bool | None = None, step_cache=None, output_type: str = "pil"):
    """`Flux2KleinPipeline.__call__` (text-to-image) as our own loop, so that CFG runs as one batch of 2 and
    steps can be cached. With `batch_cfg=False` and no step cache it computes what the pipeline computes,
    operation for operation (tests/test_accel.py checks the pixels are equal)."""
    if batch_cfg is None:
        batch_cfg = accel.batch_cfg if accel is not None else True
    if step_cache is None and accel is not None:
        step_cache = accel.step_cache
    transformer = pipe.transformer
    device = pipe._execution_device
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    msl = text_length(pipe, request)
    prompt_embeds, text_ids = pipe.encode_prompt(prompt=request.prompt, device=device, max_sequence_length=msl)
    do_cfg = uses_cfg(pipe, request.guidance)
    if do_cfg:
        neg_embeds = encoded_prompts(pipe, [request.negative_prompt or ""], device, msl)  # the same for every request: kept
        neg_ids = pipe._prepare_text_ids(neg_embeds).to(device)  # what encode_prompt returns beside its embeds
        if neg_embeds.shape != prompt_embeds.shape:  # text ids are a function of the shape: equal shapes, equal ids
            batch_cfg = False  # one batch needs equal text lengths (Klein pads both to max_sequence_length)
    latents, latent_ids = pipe.prepare_latents(
        batch_size=1, num_latents_channels=transformer.config.in_channels // 4, height=request.height,
        width=request.width, dtype=prompt_embeds.dtype, device=device, generator=generator)
    steps = request.steps
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
    timesteps, steps = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    if do_cfg and batch_cfg:
        both_embeds = torch.cat([prompt_embeds, neg_embeds], dim=0)
    history: list[tuple[int, torch.Tensor]] = []  # (step index, guided velocity) of computed steps
    for i, t in enumerate(timesteps):
        if step_cache is not None and history and not step_cache.computes(i, steps):
            noise_pred = _extrapolate(history, i, step_cache.order)
        else:
            x = latents.to(transformer.dtype)
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            if do_cfg and batch_cfg:
                out = transformer(hidden_states=torch.cat([x, x], dim=0), timestep=torch.cat([timestep, timestep]) / 1000,
                                  guidance=None, encoder_hidden_states=both_embeds, txt_ids=text_ids, img_ids=latent_ids,
                                  return_dict=False)[0][:, : latents.size(1)]
                cond, uncond = out.chunk(2)
                noise_pred = uncond + request.guidance * (cond - uncond)
            else:
                noise_pred = transformer(hidden_states=x, timestep=timestep / 1000, guidance=None,
                                         encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=latent_ids,
                                         return_dict=False)[0][:, : latents.size(1):]
                if do_cfg:
                    uncond = transformer(hidden_states=x, timestep=timestep / 1000, guidance=None,
                                         encoder_hidden_states=neg_embeds, txt_ids=neg_ids, img_ids=latent_ids,
                                         return_dict=False)[0][:, : latents.size(1):]
                    noise_pred = uncond + request.guidance * (noise_pred - uncond)
            if step_cache is not None:
                history = (history + [(i, noise_pred)])[-2:]
        latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, steps)
    vae_scale = pipe.vae_scale_factor
    latent_h, latent_w = 2 * (int(request.height) // (vae_scale * 2)), 2 * (int(request.width) // (vae_scale * 2))
    latents = pipe._unpack_latents_with_ids(latents, latent_ids, latent_h // 2, latent_w // 2)
    bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    latents = pipe._unpatchify_latents(latents * bn_std + bn_mean)
    if output_type == "latent":
        return latents
    image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)[0]


def _extrapolate(history: list[tuple[int, torch.Tensor]], i: int, order: int) -> torch.Tensor:
    """The guided velocity at step i from the last computed ones: reuse (order 0) or linear in the step index."""
    j, v = history[-1]
    if order < 1 or len(history) < 2:
        return v
    k, u = history[-2]
    return v + (v - u) * ((i - j) / (j - k))

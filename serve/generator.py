"""The generator: one Klein pipeline per replica, LoRA adapters multiplexed by id, requests batched.

`KleinGenerator` is the plain part (tests call it without Ray); `Generator` is the Serve deployment.

An "adapter set" is what one request needs resident: one trained LoRA, one linearly fused LoRA, or the
2–3 LoRAs of a K-LoRA fusion. Its multiplexed model id lists the storage keys and sha256s of its files
(`key#sha|key#sha`), so any replica can load it from storage, checked, with nothing else to look up.
Serve keeps at most `max_loras_per_replica` sets per replica (LRU); on eviction the set's adapters are
deleted from the transformer, which frees their parameters.

On a GPU the replica's pipeline is prepared by `klein.accel.prepare_for_inference` (accel "auto" = "exact"
on CUDA): adapters are resident as low-rank factors and fused into the weights of the set a group needs
(switching costs one addmm per layer from pristine base copies, milliseconds), blocks are compiled and CFG
runs as a batch of 2. On CPU ("auto" = "off") adapters are peft adapters, as the stock pipeline runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ray import serve

from cluster.storage import Storage
from klein.accel import INFERENCE_MODES, prepare_for_inference
from klein.fp8 import Float8Linear
from klein.fusion import KLORA_DEFAULTS, KLoraSchedule, apply_klora_step, klora_layer_scores
from klein.generate import GenerateRequest, encoded_prompts, generate_image, set_active_loras, text_length, uses_cfg
from klein.lora import add_lora, extract_lora, read_lora
from klein.model import load_pipeline
from serve.config import ServeConfig
from serve.adapter_sets import GeneratorError, NonFiniteOutput, parse_adapter_set_id
from serve.fusion import LruCache

log = logging.getLogger("klein.serve.generator")

BASE_MODEL_ID = ""  # no adapters: the base model


def _check_finite_output(_module, _inputs, output) -> None:
    """Forward hook on the transformer: a non-finite prediction stops the image (never a black 200).

    One `isfinite().all()` per step: a device sync of one bool, small next to the step itself."""
    tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteOutput("the denoiser's output went NaN or infinite (a LoRA's weights or scale overflow the "
                              "model at this size); no image was made")


# -- adapter names -----------------------------------------------------------------------------------------
def adapter_names(model_id: str, count: int) -> list[str]:
    # peft adapter names become ModuleDict keys: no dots or slashes, so hash the id
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:16]
    return [f"set_{digest}_{i}" for i in range(count)]


# -- the plain generator -----------------------------------------------------------------------------------
@dataclass
class GenerateItem:
    """One image to make. `adapter_weights` has one weight per adapter of the set; `klora` holds the K-LoRA
    per-layer scores when the set is a K-LoRA fusion."""

    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance: float
    negative_prompt: str = ""
    model_id: str = BASE_MODEL_ID
    adapter_weights: list = field(default_factory=list)
    klora: dict | None = None

    def request(self) -> GenerateRequest:
        return GenerateRequest(prompt=self.prompt, seed=self.seed, steps=self.steps, width=self.width,
                               height=self.height, guidance=self.guidance, negative_prompt=self.negative_prompt)

    def group_key(self) -> tuple:
        """Items with the same key can share one adapter activation (and one batched pipeline call)."""
        klora = None if self.klora is None else id(self.klora.get("scores"))
        return (self.model_id, tuple(self.adapter_weights), self.width, self.height, self.steps,
                float(self.guidance), self.negative_prompt, klora)


class KleinGenerator:
    """A Klein pipeline and the adapters resident in its transformer. Thread-safe: one pipeline call at a time."""

    def __init__(self, model: str = "tiny", device: str = "cpu", max_side: int = 2048, storage=None,
                 klora_constants: tuple[float, float, float] = KLORA_DEFAULTS, accel: str = "auto",
                 compile: bool | None = None, pipe=None):
        """`accel`: "auto" ("exact" on CUDA, "off" on CPU), "off" (peft adapters, stock pipeline call),
        "exact" (fused LoRAs, compiled blocks, CFG batch 2) or "fast" (also fp8 base and step caching).
        `compile=None` compiles on CUDA only. `pipe` replaces loading `model` (benchmarks, tests)."""
        self.model = model
        self.max_side = max_side
        self.storage = storage
        self.klora_constants = klora_constants
        self.pipe = pipe if pipe is not None else load_pipeline(model, device=device)
        if accel == "auto":
            accel = "exact" if self.pipe._execution_device.type == "cuda" else "off"
        if accel not in ("off",) + INFERENCE_MODES:
            raise GeneratorError(f"unknown accel mode {accel!r}; choose auto, off, exact or fast")
        self.accel = None if accel == "off" else prepare_for_inference(self.pipe, mode=accel, compile=compile)
        self.lock = threading.Lock()
        self.last_ok = time.monotonic()
        self._klora_scores = LruCache(8)
        self.pipe.transformer.register_forward_hook(_check_finite_output)

    # -- adapters --------------------------------------------------------------------------------------
    def resident_adapters(self) -> list[str]:
        if self.accel is not None:
            return self.accel.loras.names()
        return sorted(getattr(self.pipe.transformer, "peft_config", {}) or {})

    def parameter_count(self) -> int:
        """The transformer's parameters plus the resident adapters' (fused adapters are kept as factors)."""
        base = sum(p.numel() for p in self.pipe.transformer.parameters())
        if self.accel is not None:
            base += sum(m.weight_fp8.numel() for m in self.pipe.transformer.modules() if isinstance(m, Float8Linear))
            return base + self.accel.loras.parameter_count()
        return base

    def load_adapter_set(self, model_id: str) -> list[str]:
        """Read the set's files from storage (sha256-checked, validated) and add them as adapters; returns names."""
        files = parse_adapter_set_id(model_id)
        names = adapter_names(model_id, len(files))
        loras = [read_lora(self.storage.read_verified(f["key"], f["sha256"]), name=f["key"]) for f in files]
        with self.lock:
            resident = set(self.resident_adapters())
            for name, lora in zip(names, loras):
                if name not in resident:
                    if self.accel is not None:
                        self.accel.loras.add(name, lora)
                    else:
                        add_lora(self.pipe.transformer, lora, adapter_name=name)
        return names

    def delete_adapters(self, names: list[str]) -> None:
        """Remove adapters from the transformer and free their memory."""
        with self.lock:
            present = [n for n in names if n in set(self.resident_adapters())]
            if present and self.accel is not None:
                self.accel.loras.delete(present)
            elif present:
                self.pipe.transformer.delete_adapters(present)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------------------
    def validate(self, item: GenerateItem) -> None:
        item.request().validate(self.max_side)

    def run_group(self, items: list[GenerateItem], names: list[str], batch_forward: bool = False) -> list[bytes]:
        """Generate every item of one group (same adapters, weights, size, steps) as PNG bytes."""
        first = items[0]
        with self.lock:
            set_active_loras(self.pipe, [(n, None, w) for n, w in zip(names, first.adapter_weights)])
            if first.klora is not None:
                images = [self._run_klora(item, names) for item in items]
            elif batch_forward and len(items) > 1:
                images = self._run_batched(items)
            else:
                images = [generate_image(self.pipe, item.request()) for item in items]
            self.last_ok = time.monotonic()
        return [_png(image) for image in images]

    def _run_batched(self, items: list[GenerateItem]):
        # One pipeline call for the group: a list of prompts and one generator per item. On CPU BLAS the
        # batched forward is not bit-identical to single calls (±1/255), hence opt-in (`batch_forward`).
        first = items[0]
        generators = [torch.Generator(device="cpu").manual_seed(i.seed) for i in items]
        msl = text_length(self.pipe, first.request())  # the model's prompt length (mini: 64), as single calls use
        negative = None
        if uses_cfg(self.pipe, first.guidance):  # the pipeline's prompt cache: "" is encoded once, not per item
            negative = encoded_prompts(self.pipe, [first.negative_prompt] * len(items), self.pipe._execution_device, msl)
        out = self.pipe(prompt=[i.prompt for i in items], negative_prompt_embeds=negative, height=first.height,
                        width=first.width, num_inference_steps=first.steps, guidance_scale=first.guidance,
                        generator=generators, max_sequence_length=msl)
        return out.images

    def klora_scores(self, names: list[str]) -> dict[str, list[float]]:
        """K-LoRA's per-layer scores of resident adapters, computed here (on this replica's GPU, from the
        resident factors) for items that come without them; cached per adapter set."""
        key = tuple(names)
        scores = self._klora_scores.get(key)
        if scores is None:
            if self.accel is not None:  # the factors as resident on the device
                loras = [self.accel.loras.resident_lora(n) for n in names]
            else:
                loras = [extract_lora(self.pipe.transformer, n) for n in names]
            scores = klora_layer_scores(loras, self.pipe._execution_device)
            self._klora_scores.put(key, scores)
        return scores

    def _run_klora(self, item: GenerateItem, names: list[str]):
        alpha, beta, gamma = self.klora_constants
        scores = item.klora.get("scores") or self.klora_scores(names)
        schedule = KLoraSchedule.build(scores, item.steps, alpha, beta, gamma)
        if self.accel is not None:  # the chosen LoRA of each layer fused into it, re-fused where the choice changes
            bank = self.accel.loras

            def apply(step: int) -> None:
                bank.set_layers({layer: list(zip(names, weights))
                                 for layer, weights in schedule.weights_at(step, item.adapter_weights).items()})
        else:
            modules = _lora_modules(self.pipe.transformer, schedule.layers)

            def apply(step: int) -> None:
                apply_klora_step(modules, names, schedule, step, item.adapter_weights)

        apply(0)

        def on_step(i: int, total: int) -> None:
            if i < total:  # after step i-1 finished: set up step i
                apply(i)

        return generate_image(self.pipe, item.request(), on_step=on_step)

    def probe(self) -> None:
        """A real 1-step forward at the smallest size; raises if the pipeline is broken."""
        if not self.lock.acquire(blocking=False):
            return  # busy generating: the pipeline is evidently alive
        try:
            with _eager():  # a compiled pipeline must not compile (or recompile) for the probe's size
                out = self.pipe(prompt="health check", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
                                generator=torch.Generator(device="cpu").manual_seed(0), output_type="np")
            image = np.asarray(out.images[0])
            if image.shape[:2] != (64, 64) or not np.isfinite(image).all():
                raise GeneratorError(f"the health probe produced an invalid image (shape {image.shape})")
            self.last_ok = time.monotonic()
        finally:
            self.lock.release()


def _eager():
    """Run compiled modules eagerly inside the block (torch.compiler.set_stance), where torch has it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _lora_modules(transformer, layer_names: list[str]) -> dict:
    modules = dict(transformer.named_modules())
    return {name: modules[name] for name in layer_names if name in modules}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- the Serve deployment ----------------------------------------------------------------------------------

class ResidentAdapterSet:
    """What `@serve.multiplexed` keeps per model id. Serve calls `__del__` on LRU eviction (and Python may
    call it again at garbage collection), so deleting is idempotent."""

    def __init__(self, generator: KleinGenerator, model_id: str, names: list[str]):
        self.generator = generator
        self.model_id = model_id
        self.names = names
        self._deleted = False

    def __del__(self):
        if not self._deleted:
            self._deleted = True
            log.info("evicting adapter set %s (%s)", self.model_id[:60], self.names)
            self.generator.delete_adapters(self.names)


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, config: dict):
        self.config = ServeConfig.from_any(config)
        storage = Storage.from_uri(self.config.storage)
        self.core = KleinGenerator(self.config.model, self.config.device, self.config.max_side, storage,
                                   (self.config.klora_alpha, self.config.klora_beta, self.config.klora_gamma),
                                   accel=self.config.accel)
        # the batch decorator's numbers are placeholders: the config decides
        self.generate_batch.set_max_batch_size(self.config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        core = self.core

        async def load_adapter_set(model_id: str) -> ResidentAdapterSet:
            names = await asyncio.to_thread(core.load_adapter_set, model_id)
            return ResidentAdapterSet(core, model_id, names)

        # multiplexing wired up at init (a public form Serve detects on the instance), so that the configured
        # limit holds from the first load
        self.get_adapter_set = serve.multiplexed(
            max_num_models_per_replica=self.config.max_loras_per_replica)(load_adapter_set)

    async def generate(self, item: dict) -> bytes:
        """One image. The adapter set is the request's multiplexed model id (sent once, by the handle's
        `options(multiplexed_model_id=...)`): the item itself does not carry it."""
        item = {**item, "model_id": serve.get_multiplexed_model_id() or BASE_MODEL_ID}
        result = await self.generate_batch(GenerateItem(**item))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[GenerateItem]) -> list:
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.group_key(), []).append(index)
        for indices in groups.values():
            group = [items[i] for i in indices]
            try:
                names: list[str] = []
                if group[0].model_id:
                    # resolve adapters before taking the pipeline lock: an eviction triggered here needs it
                    adapter_set = await self.get_adapter_set(group[0].model_id)
                    names = adapter_set.names
                pngs = await asyncio.to_thread(self.core.run_group, group, names, self.config.batch_forward)
                for i, png in zip(indices, pngs):
                    results[i] = png
            except Exception as e:  # noqa: BLE001 — one group's failure must not fail the others
                log.exception("generation failed for a group of %d", len(group))
                for i in indices:
                    results[i] = e
        return results

    async def stats(self) -> dict:
        return {"resident_adapters": self.core.resident_adapters(), "parameters": self.core.parameter_count()}

    async def check_health(self) -> None:
        await asyncio.to_thread(self.core.probe)

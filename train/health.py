"""The health report of a LoRA: the seeds' failure table (symptom → cause → fix), each symptom measured.

The table users of style LoRAs live by:

    output looks "deep fried" / molten          learning rate too high         lower it (5e-5, 4e-5)
    the trigger word has no effect              captions too long / trigger    a unique trigger, 2–5-word captions
                                                too common
    style learnt but quality terrible           poor training images           curate the best 15
    style works, the model forgot the rest      too many steps                 300–500 steps, an earlier checkpoint
    only one composition comes out              too little variety in the refs more diverse subjects and angles
    out of memory despite checkpointing         batch or resolution too high   batch 1, 768 px

After a job has delivered its LoRA, `render_health` runs on the inference pool (train/job.py) on a fixed probe of
every checkpoint, which the job draws while it trains (train/live.py; what is missing is drawn here): the job's sample prompts × 2 seeds, with and without the trigger, beside the base
model's images of the same prompts and seeds. `diagnose` turns what those images and the refs measure into one
verdict (ok / warn / fail) per symptom, with its evidence in numbers and the seed's fix made concrete for this
job, and recommends a checkpoint. No Gemini and no judge of any world: only image statistics that exist for real
weights too. The `mini` world checks them (scripts/health_cases.py induces each failure; its exact judge says
what really happened; the thresholds below come from those runs: bench/results/health/).

The measures, each on the probe images:
- style gain: how much closer (style distance: klein.style_score, palette + Gram) the triggered images are to
  the refs than the base model's, and the same without the trigger (LoRA on);
- drift: how far the LoRA moves the base model's compositions for prompts *without* the trigger (1 − the
  correlation of z-normalised 16×16 grey thumbnails, against the same distance between unrelated base images);
  a LoRA that learnt nothing moves nothing, one that forgot the rest moves everything;
- seed spread: how much the triggered images of one prompt differ from seed to seed, against the base model's
  (an over-trained or single-picture LoRA draws one picture whatever the seed);
- over-cooking: fry (fine detail against shapes) and shape contrast of the triggered images against the base
  model's, saturation against the refs', and whether the training loss stayed finite;
- the dataset: refs with less detail than the training resolution (small, upscaled, blurred or over-compressed:
  `detail_side`), near-duplicates, one subject in most captions, caption length, and the trigger appearing as an
  ordinary word in the user's captions.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from contracts import with_trigger
from klein.generate import GenerateRequest
from klein.style_score import StyleScorer
from train.report import image_grid
from train.samples import cached_pipeline, render_with_lora

HEALTH_VERSION = 1
PROBE_SEEDS = 2  # seeds per prompt: the seed spread needs more than one image per prompt
PROBE_PROMPTS = 3  # the job's first sample prompts
THUMB = 16  # the side of the grey thumbnails compositions are compared on

VERDICTS = ("ok", "warn", "fail")

# (id, the symptom in the user's words, the seed's cause)
SYMPTOMS = (
    ("deep_fried", "output looks deep fried / molten", "learning rate too high"),
    ("trigger_no_effect", "the trigger word has no effect", "captions too long or the trigger too common"),
    ("poor_refs", "style learnt but quality terrible", "poor training images"),
    ("forgot_the_rest", "style works but the model forgot everything else", "too many steps"),
    ("one_composition", "only one composition comes out", "too little variety in the refs"),
    ("out_of_memory", "out of memory despite gradient checkpointing", "batch or resolution too high"),
)

# Thresholds, from the mini world's induced failures and healthy jobs (bench/results/health/README.md).
FRY_WARN, FRY_FAIL = 1.6, 2.5  # detail-to-shape ratio of the triggered images / the base model's
SHAPE_WARN, SHAPE_FAIL = 0.6, 0.4  # shape contrast of the triggered images / the base model's
SATURATION_RATIO_WARN = 1.6  # saturation of the triggered images / the refs' (not induced in mini: warn only)
STYLE_GAIN_MIN = 0.05  # below: the trigger calls up (almost) nothing of the refs' style
CHANGE_MIN = 0.06  # drift below which the LoRA changes (almost) nothing: lr / 50 gave 0.02, a weak healthy job 0.13
DRIFT_WARN, DRIFT_FAIL = 0.35, 0.6  # composition drift of trigger-less prompts, 1 = as far as unrelated images
SEED_SPREAD_WARN, SEED_SPREAD_FAIL = 0.4, 0.25  # how much the seeds of one prompt differ, against the base's
SUBJECT_SHARE_WARN = 0.5  # of the captions that name a subject, the share naming the most common one
SMALL_REF_FRACTION_FAIL = 0.5  # of the refs with less detail than SMALL_REF_SIDE x the training resolution
SMALL_REF_SIDE = 0.75
# a picture that shrinks and grows back within this mean grey error (about 2/255) had no more detail than the
# shrunk size: sharp 256 px world pictures come back 0.03 off at 3/4, a 256 px blow-up of 40 px within 0.008 at 1/8
DETAIL_ERROR = 0.008
LONG_CAPTION_WORDS = 20  # median caption words (trigger excluded) above which the trigger has competition


# -- image measures -------------------------------------------------------------------------------------------
def _grey(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0


def composition_vectors(images: list[Image.Image]) -> np.ndarray:
    """(N, THUMB²) z-normalised grey thumbnails: where light and dark sit, not colours or fine texture."""
    rows = []
    for image in images:
        v = _grey(image, THUMB).ravel()
        v = v - v.mean()
        rows.append(v / (np.linalg.norm(v) + 1e-8))
    return np.stack(rows)


def composition_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 − correlation between every row of `a` and every row of `b`."""
    return 1.0 - a @ b.T


def seed_spread(vectors: np.ndarray, seeds: int) -> float:
    """Mean composition distance between the seeds of each prompt (vectors prompt-major, `seeds` per prompt)."""
    groups = vectors.reshape(-1, seeds, vectors.shape[1])
    return float(np.mean([mean_pairwise(g) for g in groups]))


def shape_contrast(images: list[Image.Image]) -> float:
    """Mean standard deviation of the grey thumbnails: how strongly shapes stand out at a glance."""
    return float(np.mean([_grey(image, THUMB).std() for image in images]))


def mean_pairwise(vectors: np.ndarray) -> float:
    """Mean composition distance between distinct images of one set."""
    d = composition_distance(vectors, vectors)
    n = len(vectors)
    return float(d[~np.eye(n, dtype=bool)].mean()) if n > 1 else 0.0


def high_frequency(images: list[Image.Image], side: int = 128) -> float:
    """Mean absolute Laplacian of the grey image at `side` px: fine detail, noise and speckle raise it."""
    return float(np.mean([_laplacian_energy(_grey(image, side)) for image in images]))


def detail_side(image: Image.Image, file_side: int | None = None) -> int:
    """The side the picture's detail really has: the smallest shrink (BOX down, BICUBIC back up) after which the
    picture comes back within DETAIL_ERROR (mean absolute grey error). A 1024 px upscale of a 200 px picture has
    about 200 px of detail; a blurred one less than its size. `file_side`: the file's shorter side when `image`
    was downscaled on loading."""
    grey = image.convert("L")
    w, h = grey.size
    pixels = np.asarray(grey, dtype=np.float64) / 255.0
    found = 1.0
    for scale in (0.75, 0.5, 0.375, 0.25, 0.1875, 0.125):
        small = grey.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BOX)
        back = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        if float(np.abs(back - pixels).mean()) > DETAIL_ERROR:
            break
        found = scale
    return round((file_side or min(w, h)) * found)


def _laplacian_energy(g: np.ndarray) -> float:
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


def saturation(images: list[Image.Image]) -> float:
    """Mean HSV saturation in [0, 1]."""
    return float(np.mean([np.asarray(im.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0 for im in images]))


# -- the probe ------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """The probe's prompts (content only) and the images drawn from them."""

    prompts: list[str]
    seeds: list[int]
    trigger: str
    base_triggered: list[Image.Image] = field(default_factory=list)
    base_plain: list[Image.Image] = field(default_factory=list)
    triggered: dict[int, list[Image.Image]] = field(default_factory=dict)  # step -> images, LoRA on
    plain: dict[int, list[Image.Image]] = field(default_factory=dict)

    def requests(self, triggered: bool, size: int, steps: int) -> list[GenerateRequest]:
        return [GenerateRequest(prompt=with_trigger(self.trigger, p) if triggered else p, seed=s, steps=steps,
                                width=size, height=size)
                for p in self.prompts for s in self.seeds]


def probe_prompts(sample_prompts: list[str], trigger: str) -> list[str]:
    """The first sample prompts without their trigger (a sample prompt may carry it already)."""
    pattern = re.compile(r"^\s*" + re.escape(trigger) + r"[\s.,;:]*", flags=re.IGNORECASE)
    return [pattern.sub("", p).strip() or p for p in sample_prompts[:PROBE_PROMPTS]]


# the base model's probe images per (pipeline, requests): jobs with the same prompts, trigger, seeds and size (every
# cell of a sweep, every job of a tenant who keeps the defaults) draw them once per inference-pool process
_BASE_IMAGES: dict[tuple, list[Image.Image]] = {}
_BASE_IMAGES_MAX = 16


def _base_images(pipe, requests: list[GenerateRequest]) -> list[Image.Image]:
    key = (id(pipe), tuple((r.prompt, r.seed, r.steps, r.width, r.height, r.guidance) for r in requests))
    if key not in _BASE_IMAGES:
        if len(_BASE_IMAGES) >= _BASE_IMAGES_MAX:
            _BASE_IMAGES.pop(next(iter(_BASE_IMAGES)))
        _BASE_IMAGES[key] = render_with_lora(pipe, None, requests)
    return _BASE_IMAGES[key]


def probe_requests(prompts: list[str], trigger: str, seed: int, size: int, steps: int) -> list[GenerateRequest]:
    """The probe's requests at one checkpoint: every prompt x seed with the trigger, then the same without it."""
    probe = Probe(prompts=prompts, seeds=[seed + k for k in range(PROBE_SEEDS)], trigger=trigger)
    return probe.requests(True, size, steps) + probe.requests(False, size, steps)


def render_probe(pipe_of: Callable[[], object], checkpoints: list[tuple[int, bytes]], prompts: list[str], trigger: str,
                 seed: int, size: int, steps: int, drawn: dict[int | None, list[bytes]] | None = None) -> Probe:
    """Every probe image: the base model's (once per process for the same requests), then each checkpoint's, with
    and without the trigger. `drawn`: PNGs of `probe_requests` already rendered (the job renders them during
    training, train/live.py), by step (None: the base model); the pipeline (`pipe_of()`) draws only what is missing."""
    probe = Probe(prompts=prompts, seeds=[seed + k for k in range(PROBE_SEEDS)], trigger=trigger)
    both = probe_requests(prompts, trigger, seed, size, steps)
    n = len(both) // 2
    drawn = drawn or {}

    def images_at(step: int | None, data: bytes | None) -> list[Image.Image]:
        if step in drawn:
            return [Image.open(io.BytesIO(png)).convert("RGB") for png in drawn[step]]
        return _base_images(pipe_of(), both) if data is None else render_with_lora(pipe_of(), data, both)

    images = images_at(None, None)
    probe.base_triggered, probe.base_plain = images[:n], images[n:]
    for step, data in checkpoints:
        images = images_at(step, data)
        probe.triggered[step], probe.plain[step] = images[:n], images[n:]
    return probe


# -- measures -------------------------------------------------------------------------------------------------
# words before a caption's subject: articles, counts, sizes, places ("a large cat on the right" -> "cat")
_NOT_SUBJECTS = frozenset("""a an the one two three four some several many small large big little tiny huge tall
    short old young left right top bottom middle centre center of on in at with and single lone""".split())


def main_subject(captions: list[str]) -> tuple[str | None, float]:
    """The most common subject (first word that is not an article, count, size or place) of the captions that
    name one, and the share of those captions it is; (None, 0.0) when fewer than 4 captions name a subject
    (trigger-only captions from the offline fallback name none)."""
    subjects = []
    for caption in captions:
        words = [w for w in re.findall(r"[a-z][a-z-]*", caption.lower()) if w not in _NOT_SUBJECTS]
        if words:
            subjects.append(words[0])
    if len(subjects) < 4:
        return None, 0.0
    top = max(set(subjects), key=lambda w: (subjects.count(w), w))
    return top, round(subjects.count(top) / len(subjects), 4)


def dataset_measures(refs: list[Image.Image], detail_sides: list[int], captions: list[str],
                     source_captions: list[str], trigger: str, resolution: int, near_duplicates: int) -> dict:
    """What the refs and captions themselves say, before any image is drawn. `detail_sides`: each ref's
    `detail_side`; `captions` are the trained ones (trigger first); `source_captions` the user's own (sidecars),
    where the trigger may be an ordinary word."""
    small = [i for i, side in enumerate(detail_sides) if side < SMALL_REF_SIDE * resolution]
    words = [len(re.sub(re.escape(trigger), " ", c, flags=re.IGNORECASE).split()) for c in captions]
    word_re = re.compile(r"(?<![A-Za-z0-9_-])" + re.escape(trigger) + r"(?![A-Za-z0-9_-])", flags=re.IGNORECASE)
    inside = sum(1 for c in source_captions if word_re.search(c))
    subject, share = main_subject([word_re.sub(" ", c) for c in captions])
    return {
        "refs": len(refs),
        "small_refs": len(small),
        "least_detail_side": min(detail_sides) if detail_sides else 0,
        "resolution": resolution,
        "near_duplicate_pairs": near_duplicates,
        "caption_words_median": float(np.median(words)) if words else 0.0,
        "main_subject": subject,
        "main_subject_share": share,
        "trigger_inside_captions": inside,
        "refs_saturation": round(saturation(refs), 4),
    }


def checkpoint_measures(probe: Probe, step: int, scorer: StyleScorer, base_style: dict, dataset: dict) -> dict:
    triggered, plain = probe.triggered[step], probe.plain[step]
    d_t, d_p = scorer.distance(triggered), scorer.distance(plain)
    gain_t = 1 - d_t / base_style["triggered"]
    gain_p = 1 - d_p / base_style["plain"]
    base_plain_v = composition_vectors(probe.base_plain)
    plain_v, trig_v = composition_vectors(plain), composition_vectors(triggered)
    unrelated = mean_pairwise(base_plain_v)
    drift = float(np.mean(np.diag(composition_distance(plain_v, base_plain_v)))) / max(unrelated, 1e-6)
    base_trig_v = composition_vectors(probe.base_triggered)
    base_spread = seed_spread(base_trig_v, len(probe.seeds))
    spread = seed_spread(trig_v, len(probe.seeds)) / max(base_spread, 1e-6)
    shape_t, shape_b = shape_contrast(triggered), shape_contrast(probe.base_triggered)
    fry = (high_frequency(triggered) / max(shape_t, 1e-4)) / (high_frequency(probe.base_triggered) / max(shape_b, 1e-4))
    return {
        "step": step,
        "style_gain": round(gain_t, 4),
        "style_gain_without_trigger": round(gain_p, 4),
        "drift": round(drift, 4),
        "seed_spread": round(spread, 4),
        "fry": round(fry, 4),
        "shape_contrast": round(shape_t / max(shape_b, 1e-4), 4),
        "saturation_ratio": round(saturation(triggered) / max(dataset["refs_saturation"], 1e-3), 4),
    }


# -- verdicts -------------------------------------------------------------------------------------------------
def _worst(*verdicts: str) -> str:
    return max(verdicts, key=VERDICTS.index)


def _is_fried(m: dict) -> bool:
    return m["fry"] >= FRY_FAIL or m["shape_contrast"] <= SHAPE_FAIL


def _deep_fried(m: dict, loss_finite: bool, cfg: dict) -> tuple[str, str, str]:
    fry, shape, sat = m["fry"], m["shape_contrast"], m["saturation_ratio"]
    if not loss_finite or _is_fried(m):
        verdict = "fail"
    elif fry >= FRY_WARN or shape <= SHAPE_WARN or sat >= SATURATION_RATIO_WARN:
        verdict = "warn"
    else:
        verdict = "ok"
    evidence = (f"fine detail against shapes is {fry:.2f}x the base model's (warn at {FRY_WARN}, fail at {FRY_FAIL}); "
                f"shapes stand out {shape:.2f}x as much (warn under {SHAPE_WARN}, fail under {SHAPE_FAIL}); saturation "
                f"{sat:.2f}x the refs' (warn at {SATURATION_RATIO_WARN})" + ("" if loss_finite else "; the training loss went NaN/inf"))
    lr = cfg.get("lr")
    fix = f"retrain with lr {lr / 5:.1e} (this job: {lr:.1e})" if lr else "retrain with a 5x lower learning rate"
    return verdict, evidence, fix


def _trigger(m: dict, dataset: dict, trigger: str) -> tuple[str, str, str]:
    gain, change = m["style_gain"], m["drift"]
    if gain < STYLE_GAIN_MIN:
        # no closer to the refs: a LoRA that changes (almost) nothing fails; one that changes the pictures, but
        # not toward the refs' colours and textures, may still carry the style (the style distance misses some)
        verdict = "fail" if change < CHANGE_MIN else "warn"
    else:
        verdict = "ok"
    # a LoRA at weight 1 carries its style without the trigger too (measured on every healthy mini job): the
    # figure is evidence for the user (lower the weight to use the style selectively), not a verdict
    evidence = (f"with `{trigger}` the images are {gain:.0%} closer in style to the refs than the base model's "
                f"(under {STYLE_GAIN_MIN:.0%}: warn, and fail if the LoRA moves the pictures less than {CHANGE_MIN}; it "
                f"moves them {change:.2f}); without the trigger, LoRA on: {m['style_gain_without_trigger']:.0%} closer")
    causes = []
    if dataset["caption_words_median"] > LONG_CAPTION_WORDS:
        causes.append(f"captions have {dataset['caption_words_median']:.0f} words (median): cut them to 2–5 words "
                      f"naming the subject only")
    if dataset["trigger_inside_captions"]:
        causes.append(f"your trigger `{trigger}` is an ordinary word in {dataset['trigger_inside_captions']} of your "
                      f"captions: use a unique token such as `zxy_{trigger.lower()}`")
    if causes and verdict == "ok":
        verdict = "warn"
    fix = "; ".join(causes) or (f"train longer or with a higher learning rate (the trigger `{trigger}` is unique and "
                                f"the captions short: the LoRA learnt too little)")
    return verdict, evidence, fix


def _poor_refs(dataset: dict) -> tuple[str, str, str]:
    n = max(dataset["refs"], 1)
    small, dups = dataset["small_refs"], dataset["near_duplicate_pairs"]
    verdict = "fail" if small / n >= SMALL_REF_FRACTION_FAIL else ("warn" if small or dups else "ok")
    evidence = (f"{small} of {n} refs have less detail than {SMALL_REF_SIDE:.0%} of the training resolution "
                f"({dataset['resolution']} px): small, upscaled, blurred or over-compressed (the least: "
                f"{dataset['least_detail_side']} px of detail); {dups} near-duplicate pair(s)")
    keep = max(1, min(15, n - small - dups))
    fix = (f"replace the {small} soft or small ref(s) with sharp ones at {dataset['resolution']} px or more" if small else
           "drop the near-duplicates") + f"; curate the best {keep} images"
    return verdict, evidence, fix


def _forgetting(m: dict, recommended: int, delivered: int, cfg: dict) -> tuple[str, str, str]:
    drift = m["drift"]
    verdict = "fail" if drift >= DRIFT_FAIL else ("warn" if drift >= DRIFT_WARN else "ok")
    evidence = (f"prompts without the trigger drift {drift:.2f} from the base model's compositions (0 = unchanged, "
                f"1 = as different as an unrelated image; warn at {DRIFT_WARN}, fail at {DRIFT_FAIL})")
    steps = cfg.get("steps") or delivered
    fix = (f"use checkpoint {recommended}" if recommended != delivered else
           f"retrain with fewer steps ({max(1, steps // 2)}; this job: {steps}) or save more often to choose an earlier one")
    return verdict, evidence, fix


def _one_composition(m: dict, dataset: dict, measures: list[dict]) -> tuple[str, str, str]:
    spread, subject, share = m["seed_spread"], dataset["main_subject"], dataset["main_subject_share"]
    verdict = "fail" if spread < SEED_SPREAD_FAIL else ("warn" if spread < SEED_SPREAD_WARN else "ok")
    one_subject = subject is not None and share >= SUBJECT_SHARE_WARN
    if verdict == "ok" and one_subject:
        verdict = "warn"
    evidence = (f"the seeds of one prompt differ {spread:.2f}x as much as the base model's (warn under "
                f"{SEED_SPREAD_WARN}, fail under {SEED_SPREAD_FAIL})")
    if subject is not None:
        evidence += f"; {share:.0%} of the captions are of one subject (`{subject}`; warn at {SUBJECT_SHARE_WARN:.0%})"
    # an earlier checkpoint whose seeds still differ: the steps, not the refs, made one picture of every seed
    varied = [e["step"] for e in measures if e["step"] < m["step"] and e["seed_spread"] >= SEED_SPREAD_WARN
              and not _is_fried(e)]
    if spread < SEED_SPREAD_WARN and varied:
        evidence += f"; checkpoint {max(varied)} still varied with the seed"
        fix = f"use checkpoint {max(varied)} or retrain with fewer steps (later checkpoints draw one picture whatever the seed)"
    else:
        fix = (f"add refs of other subjects than `{subject}`, " if one_subject else "add refs with ") + \
            "other framings and angles (the style, not one picture, is what should repeat)"
    return verdict, evidence, fix


def out_of_memory_fix(cfg: dict) -> str:
    """The seed's fix for an out-of-memory job, made concrete: the first of its remedies not yet on."""
    if cfg.get("batch_size", 1) > 1:
        return f"set batch_size: 1 (this job: {cfg['batch_size']}) and gradient_accumulation_steps: {cfg['batch_size']}"
    if not cfg.get("gradient_checkpointing"):
        return "set gradient_checkpointing: true"
    if cfg.get("resolution", 0) > 768:
        return f"set resolution: 768 (this job: {cfg['resolution']})"
    if not cfg.get("deepspeed_stage"):
        return "set deepspeed_stage: 3 with num_workers: 2 or more (shards the base model) or deepspeed_offload: true"
    return "use a GPU with more memory"


def is_out_of_memory(reason: str) -> bool:
    return bool(re.search(r"OutOfMemoryError|out of memory|CUBLAS_STATUS_ALLOC_FAILED", reason, flags=re.IGNORECASE))


def recommend(measures: list[dict], delivered: int) -> int:
    """The checkpoint to use: the delivered one if it neither fries, forgets nor collapses; else, of those that
    do not, the one with the most style gain; if every one does, the earliest (the least trained)."""
    def clean(m):
        return not _is_fried(m) and m["drift"] < DRIFT_FAIL and m["seed_spread"] >= SEED_SPREAD_FAIL

    by_step = {m["step"]: m for m in measures}
    if delivered in by_step and clean(by_step[delivered]):
        return delivered
    healthy = [m for m in measures if clean(m)]
    if not healthy:
        return min(by_step) if by_step else delivered
    return max(healthy, key=lambda m: (m["style_gain"], -m["step"]))["step"]


def diagnose(dataset: dict, measures: list[dict], delivered_step: int, cfg: dict, trigger: str,
             loss_finite: bool = True) -> dict:
    """The report: one verdict per symptom of the seeds' table, on the delivered checkpoint, and the checkpoint
    to use."""
    by_step = {m["step"]: m for m in measures}
    m = by_step[delivered_step]
    recommended = recommend(measures, delivered_step)
    rows = {
        "deep_fried": _deep_fried(m, loss_finite, cfg),
        "trigger_no_effect": _trigger(m, dataset, trigger),
        "poor_refs": _poor_refs(dataset),
        "forgot_the_rest": _forgetting(m, recommended, delivered_step, cfg),
        "one_composition": _one_composition(m, dataset, measures),
        "out_of_memory": ("ok", "the job finished within its memory", out_of_memory_fix(cfg)),
    }
    symptoms = []
    for key, symptom, cause in SYMPTOMS:
        verdict, evidence, fix = rows[key]
        symptoms.append({"id": key, "symptom": symptom, "cause": cause, "verdict": verdict, "evidence": evidence,
                         "fix": fix if verdict != "ok" else ""})
    overall = _worst(*(s["verdict"] for s in symptoms))
    return {
        "version": HEALTH_VERSION,
        "judge": "image statistics of a fixed probe (no Gemini)",
        "overall": overall,
        "delivered_step": delivered_step,
        "recommended_step": recommended,
        "symptoms": symptoms,
        "checkpoints": measures,
        "dataset": dataset,
    }


def flagged_symptoms(report: dict) -> list[str]:
    """`<id> <verdict>` of each symptom that is not ok."""
    return [f"{s['id']} {s['verdict']}" for s in report["symptoms"] if s["verdict"] != "ok"]


def summary_line(report: dict) -> str:
    """One line: overall verdict, each symptom that is not ok, the checkpoint to use."""
    flagged = flagged_symptoms(report)
    line = f"health: {report['overall']}" + (f" ({', '.join(flagged)})" if flagged else " on every symptom")
    if report["recommended_step"] != report["delivered_step"]:
        line += f"; use checkpoint {report['recommended_step']} (delivered: {report['delivered_step']})"
    return line


def markdown(report: dict, job_id: str) -> str:
    lines = [f"# Health of LoRA `{job_id}`", "",
             f"Overall: **{report['overall']}**. Measured by {report['judge']} on checkpoint {report['delivered_step']} "
             f"(delivered); recommended checkpoint: **{report['recommended_step']}**.", "",
             "| symptom | verdict | evidence | fix |", "| --- | --- | --- | --- |"]
    for s in report["symptoms"]:
        lines.append(f"| {s['symptom']} ({s['cause']}) | {s['verdict']} | {s['evidence']} | {s['fix'] or '—'} |")
    lines += ["", "| step | style gain | without trigger | drift | seed spread | fry | shape contrast | saturation |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["checkpoints"]:
        lines.append(f"| {m['step']} | {m['style_gain']:.2f} | {m['style_gain_without_trigger']:.2f} | {m['drift']:.2f} "
                     f"| {m['seed_spread']:.2f} | {m['fry']:.2f} | {m['shape_contrast']:.2f} | {m['saturation_ratio']:.2f} |")
    lines += ["", "How to read it: `samples/health.png` shows the refs, the base model's probe images with the trigger, "
              "then each checkpoint's with the trigger and the delivered one's without it; the README's \"Health report\" "
              "section explains each measure."]
    return "\n".join(lines) + "\n"


def health_png(report: dict, probe: Probe, refs: list[Image.Image]) -> bytes:
    n = len(probe.base_triggered)
    rows = [list(refs[:n]), probe.base_triggered]
    labels = ["refs", "base + trigger"]
    for step in sorted(probe.triggered):
        rows.append(probe.triggered[step])
        labels.append(f"step {step} + trigger")
    rows.append(probe.plain[report["delivered_step"]])
    labels.append(f"step {report['delivered_step']} no trigger")
    rows.append(probe.base_plain)
    labels.append("base no trigger")
    cell = max(64, probe.base_triggered[0].width)
    grid = image_grid(rows, row_labels=labels, cell=cell)
    banner_h = 14 * (len(report["symptoms"]) + 1)
    sheet = Image.new("RGB", (grid.width, grid.height + banner_h), "white")
    sheet.paste(grid, (0, banner_h))
    draw = ImageDraw.Draw(sheet)
    colours = {"ok": (0, 120, 0), "warn": (190, 120, 0), "fail": (200, 0, 0)}
    draw.text((2, 1), f"overall {report['overall']}; use checkpoint {report['recommended_step']}", fill="black")
    for k, s in enumerate(report["symptoms"]):
        draw.text((2, 14 * (k + 1) + 1), f"{s['verdict']:>4}  {s['symptom']}", fill=colours[s["verdict"]])
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def render_health(model: str, checkpoints: list[tuple[int, bytes]], delivered_step: int, refs: list[Image.Image],
                  detail_sides: list[int], captions: list[str], source_captions: list[str], trigger: str, cfg: dict,
                  near_duplicates: int, size: int, sample_steps: int, loss_finite: bool, use_gpu: bool,
                  job_id: str, probe_images: dict[int | None, list[bytes]] | None = None) -> tuple[dict, bytes, str]:
    """The whole report (manifest dict, health.png, health.md): what the inference-pool task runs. `probe_images`:
    the probe's images the job rendered during training (render_probe's `drawn`)."""
    prompts = probe_prompts(cfg.get("sample_prompts") or [], trigger)
    if not prompts:
        raise ValueError("the health probe needs at least one sample prompt")
    probe = render_probe(lambda: cached_pipeline(model, "cuda" if use_gpu else "cpu"), checkpoints, prompts, trigger,
                         int(cfg.get("seed", 0)), size, sample_steps, drawn=probe_images)
    dataset = dataset_measures(refs, detail_sides, captions, source_captions, trigger, int(cfg.get("resolution", size)),
                               near_duplicates)
    scorer = StyleScorer(refs)
    base_style = {"triggered": scorer.distance(probe.base_triggered), "plain": scorer.distance(probe.base_plain)}
    measures = [checkpoint_measures(probe, step, scorer, base_style, dataset) for step, _ in checkpoints]
    report = diagnose(dataset, measures, delivered_step, cfg, trigger, loss_finite=loss_finite)
    report["probe"] = {"prompts": prompts, "seeds": probe.seeds, "size": size, "steps": sample_steps}
    return report, health_png(report, probe, refs), markdown(report, job_id)


def loss_is_finite(log: list[dict]) -> bool:
    return all(math.isfinite(e["loss"]) for e in log)

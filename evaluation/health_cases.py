"""The cases of the health report's proof in the `mini` world: a healthy job and one job per failure of the seeds'
table, each made by changing one thing (scripts/health_cases.py trains them; tests/test_health.py checks the
report on the LoRAs they delivered, shipped in tests/data/health/).

Cases (the healthy settings are the demo's, `cli/train.py`, at half its steps):
  healthy_s<k>          board seed k, training seed k: the false-alarm rate is measured over these
  lr_x50                the learning rate x 50                          -> over-cooked ("deep fried")
  long_captions         the trigger `left` (a word in half the captions) and 40-word captions that describe the
                        style                                           -> the trigger has no effect
  lr_div50              the learning rate / 50: the style is barely learnt -> the trigger has no effect
  steps_x10             10x the steps                                   -> forgetting, an earlier checkpoint
  one_composition       12 refs of one subject (lighthouses)            -> one composition comes out
  poor_refs             12 refs blown up from 40 px, JPEG quality 8     -> poor training images
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from evaluation import world
from train.recipe import TrainConfig

STYLE = "risograph"
N_REFS = 12
PROBE_CONTENTS = ("lighthouse", "cat", "boat")  # the demo's subjects: the health probe's prompts
HEALTHY = dict(model="mini", resolution=128, rank=32, lr=1e-3, steps=200, save_every=100, sample_steps=28,
               use_gemini=False, sample_prompts=[world.caption(c, 0) for c in PROBE_CONTENTS])
LONG_CAPTION_TAIL = (", printed in grainy risograph inks with misregistered colour layers, bold flat fluorescent pink "
                     "and teal fills, visible paper texture, halftone speckle, rough edges, a retro zine poster look "
                     "with vivid saturated ink and a soft off-white paper background")


def write_board(case: str, out: Path) -> None:
    """The refs (and their sidecar captions) of one case."""
    out.mkdir(parents=True, exist_ok=True)
    seed = int(case.rsplit("_s", 1)[1]) if case.startswith("healthy_s") else 0
    if case == "one_composition":
        for i in range(N_REFS):
            s = world.layout_seed(seed, i * len(world.CONTENT_CLASSES))  # one class, a different layout seed each
            world.render("lighthouse", STYLE, s, 256).save(out / f"{i:03d}.png")
            (out / f"{i:03d}.txt").write_text(world.caption("lighthouse", s) + "\n")
        return
    world.make_world_board(STYLE, N_REFS, out, seed=seed, size=256)
    if case == "long_captions":
        for txt in sorted(out.glob("*.txt")):
            txt.write_text(txt.read_text().strip() + LONG_CAPTION_TAIL + "\n")
    if case == "poor_refs":  # 40 px pictures, crushed by JPEG and blown up to 256 px (the loader's minimum)
        for png in sorted(out.glob("*.png")):
            image = Image.open(png).convert("RGB")
            crushed = io.BytesIO()
            image.resize((40, 40), Image.Resampling.BILINEAR).save(crushed, "JPEG", quality=8)
            blown_up = Image.open(crushed).convert("RGB").resize(image.size, Image.Resampling.BICUBIC)
            out_bytes = io.BytesIO()
            blown_up.save(out_bytes, "JPEG", quality=90)
            png.with_suffix(".jpg").write_bytes(out_bytes.getvalue())
            png.unlink()


def case_config(case: str, storage: Path) -> TrainConfig:
    settings = dict(HEALTHY, trigger=f"zxy_{STYLE}", storage=str(storage), job_id=case.replace("_", "-"))
    if case.startswith("healthy_s"):
        settings["seed"] = int(case.rsplit("_s", 1)[1])
    elif case == "lr_x50":
        settings["lr"] = HEALTHY["lr"] * 50
    elif case == "lr_div50":
        settings["lr"] = HEALTHY["lr"] / 50
    elif case == "long_captions":
        settings["trigger"] = "left"
    elif case == "steps_x10":
        settings.update(steps=HEALTHY["steps"] * 10, save_every=HEALTHY["steps"] * 2)
    return TrainConfig(**settings)


CASES = ("healthy_s0", "healthy_s1", "healthy_s2", "lr_x50", "lr_div50", "long_captions", "steps_x10", "one_composition", "poor_refs")

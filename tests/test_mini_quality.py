"""The mini preset draws, and a style LoRA trained through the product visibly learns a held-out style.

Quality here is measured by the exact world judge (evaluation.world_judge) in the procedural world, on CPU: a
proxy for the method, not for Klein's own quality. Thresholds sit below what was measured (README, "The mini
preset") with a margin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3ForCausalLM

from contracts import with_trigger
from evaluation import world
from evaluation.quality import MINI_GUIDANCE, MINI_STEPS, draw
from evaluation.world_judge import WorldJudge
from klein.mini import MINI_PRESET_DIR, MINI_RESOLUTION
from klein.model import load_pipeline, max_sequence_length, model_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini_pipe():
    return load_pipeline("mini")


@pytest.fixture(scope="module")
def judge():
    return WorldJudge.load()


def test_mini_is_klein_classes_loaded_from_the_shipped_folder_within_budget(mini_pipe):
    assert isinstance(mini_pipe, Flux2KleinPipeline)
    assert isinstance(mini_pipe.transformer, Flux2Transformer2DModel)
    assert isinstance(mini_pipe.vae, AutoencoderKLFlux2)
    assert isinstance(mini_pipe.text_encoder, Qwen3ForCausalLM)
    assert mini_pipe.transformer.config.in_channels == 128 and not mini_pipe.transformer.config.guidance_embeds
    size = sum(f.stat().st_size for f in MINI_PRESET_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"the shipped mini preset is {size / 2**20:.1f} MiB, over the 25 MB budget"
    judge_size = (REPO / "evaluation" / "world_judge.safetensors").stat().st_size
    assert judge_size <= 5 * 2**20
    # (tiny's 512 is checked in test_model.py: asking here would build tiny while this module's worker waits on it)
    assert max_sequence_length("mini") == 64 == mini_pipe.klein_max_sequence_length
    assert model_id("mini") == "mini-v2"


def test_the_base_draws_the_prompted_content_bare_and_behind_an_unseen_trigger(mini_pipe, judge):
    """Every class x 2 seeds at 28 steps with CFG: seed 0 with the bare caption, seed 1 behind a trigger word the
    base never saw (`zxy_probe. <caption>`, as every LoRA prompt starts). The judge recognises the prompted content
    in both (README, "The mini preset": run 6 of the pretraining taught the base to read past such prefixes)."""
    contents = [c for _ in (0, 1) for c in world.CONTENT_CLASSES]
    seeds = [s for s in (0, 1) for _ in world.CONTENT_CLASSES]
    prompts = [with_trigger("zxy_probe", world.caption(c, s)) if s else world.caption(c, s) for c, s in zip(contents, seeds)]
    images = draw(mini_pipe, prompts, seeds, MINI_RESOLUTION, MINI_STEPS, MINI_GUIDANCE)
    n = len(world.CONTENT_CLASSES)
    bare = judge.summary(images[:n], contents[:n])
    behind_trigger = judge.summary(images[n:], contents[n:])
    assert bare["content_ok"] >= 0.8, bare  # measured 1.00 on CPU (README)
    assert behind_trigger["content_ok"] >= 0.7, behind_trigger  # measured 1.00 on CPU (README); run 3's base: ~0
    verdicts = judge.judge(images, contents)
    held_out = [v.style for v in verdicts if v.style in world.HELDOUT_STYLES]
    assert not held_out, f"the base drew held-out styles it never saw: {held_out}"


def test_the_demo_learns_a_held_out_style_through_ray_train_and_serves_it_over_http(tmp_path):
    """README command 1, as a user runs it: a risograph board, a LoRA through Ray Train, the exact judge's
    before/after (the style learnt, the lighthouse, cat and boat kept), and the same pixels over HTTP."""
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    run = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--out", str(tmp_path / "demo")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    match = re.search(r"probability ([\d.]+) -> ([\d.]+); content recognised (\d+)% -> (\d+)%", run.stdout)
    assert match, run.stdout
    before, after = float(match.group(1)), float(match.group(2))
    content_before, content_after = int(match.group(3)), int(match.group(4))
    assert before < 0.05, run.stdout  # the base has never seen the style
    assert after >= 0.6 and after > 10 * before, run.stdout  # measured 0.00 -> 1.00 (README)
    # the subjects survive the style: measured 100% -> 100% of 3 (README); one of three may go
    assert content_before >= 66 and content_after >= 66, run.stdout
    assert "the same pixels as the in-process pipeline" in run.stdout, run.stdout
    assert (tmp_path / "demo" / "before_after.png").exists()

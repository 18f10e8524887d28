"""The health report (train/health.py): each symptom of the seeds' table fires on a LoRA that has the failure and
stays quiet on a healthy one, in the `mini` world.

The LoRAs are what real jobs delivered (scripts/health_cases.py: the product's own run_training_job on the mini
preset, one setting changed per case, evaluation/health_cases.py), shipped in fp16 under tests/data/health/. Each
test runs `render_health`, the function the job's inference-pool task runs, on the case's refs and checkpoints.
The exact world judge's view of the same LoRAs is in bench/results/health/ (the report never sees it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from evaluation.health_cases import case_config, write_board
from klein.lora import lora_to_bytes, read_lora
from train.dataset import load_refs, near_duplicate_pairs
from train.health import diagnose, out_of_memory_fix, recommend, render_health
from train.job import HEALTH_MAX_STEPS, _probe_ref, prepare_dataset, public_config

DATA = Path(__file__).parent / "data" / "health"


def _verdicts(report: dict) -> dict[str, str]:
    return {s["id"]: s["verdict"] for s in report["symptoms"]}


# -- the parts that need no image ------------------------------------------------------------------------------
def test_out_of_memory_fix_names_the_first_remedy_not_yet_on():
    cfg = {"batch_size": 4, "gradient_checkpointing": False, "resolution": 1024, "deepspeed_stage": None}
    assert out_of_memory_fix(cfg) == "set batch_size: 1 (this job: 4) and gradient_accumulation_steps: 4"
    cfg["batch_size"] = 1
    assert out_of_memory_fix(cfg) == "set gradient_checkpointing: true"
    cfg["gradient_checkpointing"] = True
    assert out_of_memory_fix(cfg) == "set resolution: 768 (this job: 1024)"
    cfg["resolution"] = 768
    assert out_of_memory_fix(cfg).startswith("set deepspeed_stage: 3")
    cfg["deepspeed_stage"] = 3
    assert out_of_memory_fix(cfg) == "use a GPU with more memory"


def _measures(step: int, **kw) -> dict:
    m = {"step": step, "style_gain": 0.25, "style_gain_without_trigger": 0.25, "drift": 0.3, "diversity": 0.9,
         "fry": 0.7, "shape_contrast": 1.2, "saturation_ratio": 1.0}
    m.update(kw)
    return m


DATASET_OK = {"refs": 12, "small_refs": 0, "smallest_side": 256, "resolution": 128, "near_duplicate_pairs": 0,
              "refs_variety": 0.17, "caption_words_median": 5.0, "trigger_inside_captions": 0, "main_subject": "cat",
              "main_subject_share": 0.1}


def test_the_checkpoint_recommended_is_the_strongest_that_neither_fries_forgets_nor_collapses():
    measures = [_measures(100, style_gain=0.20), _measures(200, style_gain=0.30),
                _measures(300, style_gain=0.40, drift=0.9), _measures(400, style_gain=0.45, fry=4.0)]
    assert recommend(measures, delivered=400) == 200
    report = diagnose(DATASET_OK, measures, 300, {"steps": 400, "lr": 1e-4}, "zxy_a")
    forgot = next(s for s in report["symptoms"] if s["id"] == "forgot_the_rest")
    assert forgot["verdict"] == "fail" and forgot["fix"] == "use checkpoint 200"
    assert report["recommended_step"] == 200 and report["overall"] == "fail"
    # every checkpoint broken: the least trained one
    assert recommend([_measures(100, drift=0.9), _measures(200, diversity=0.1)], delivered=200) == 100


# -- the mini world: a job per failure, its delivered LoRA -----------------------------------------------------
@pytest.fixture(scope="module")
def mini_cases(tmp_path_factory):
    """The refs each case trained on (rebuilt: the world is deterministic), read as the job reads them."""
    root = tmp_path_factory.mktemp("health-boards")
    return root


def _report(case: str, root: Path, steps: list[int], delivered: int) -> dict:
    board = root / case
    write_board(case, board)
    cfg = case_config(case, root / "storage")
    prepared, resolved = prepare_dataset(board, cfg, on_gpu=False)
    refs = prepared.ref_set.refs
    checkpoints = [(step, lora_to_bytes(read_lora((DATA / f"{case}_step{step}.safetensors").read_bytes())))
                   for step in steps]
    report, png, md = render_health(resolved.model, checkpoints, delivered, [_probe_ref(r.image) for r in refs],
                                    [(r.width, r.height) for r in refs], prepared.captions,
                                    [r.sidecar_caption or "" for r in refs], resolved.trigger, public_config(resolved),
                                    len(near_duplicate_pairs(refs)), 128, min(resolved.sample_steps, HEALTH_MAX_STEPS),
                                    True, False, case)
    assert Image.open(__import__("io").BytesIO(png)).size[0] > 0 and md.startswith(f"# Health of LoRA `{case}`")
    return report

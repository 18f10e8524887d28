"""DeepSpeed ZeRO-2 and ZeRO-3 through real Ray Train: two CPU workers (gloo) on the tiny model.

The oracle is the same one the DDP test uses (tests/formula_reference.py): the loss, the mean of both ranks'
gradients and the AdamW update written from their formulas, in one process. ZeRO shards gradients, optimizer state and (ZeRO-3) the parameters, but the arithmetic is the
same, so a ZeRO-3 run whose worker is killed mid-run and resumed from DeepSpeed's shards still gives the
replay's LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from cluster.ports import free_port
from cluster.storage import Storage
from klein.lora import read_lora
from evaluation.board import make_board
from formula_reference import formula_reference  # tests/ is on sys.path
from train.job import lora_prefix, run_training_job
from train.recipe import ConfigError, TrainConfig

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir):
    from cluster.pools import init_local_ray

    # one job of two workers; the controller polls every 0.1 s so a reported checkpoint is registered, and a
    # killed worker noticed, within a step (see tests/test_train_job.py)
    init_local_ray(num_cpus=3, object_store_memory=300 * 1024 * 1024, train_slots=2,
                   runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    make_board("sepia", 6, out, size=256, seed=1)
    return out


def _cfg(storage, job_id, **kw):
    base = dict(trigger="zxy_sepia", storage=str(storage), resolution=64, steps=6, save_every=3, job_id=job_id,
                lr=2e-3, sample_prompts=["a house"], sample_steps=2, seed=3, variant="custom", optimizer="adamw",
                num_workers=2)
    base.update(kw)
    return TrainConfig(**base)


def _worst_difference(a, b) -> float:
    assert set(a.layers) == set(b.layers)
    return max(max((a.layers[n].up - b.layers[n].up).abs().max().item(), (a.layers[n].down - b.layers[n].down).abs().max().item())
               for n in a.layers)


@pytest.mark.reliability("faults")
def test_zero3_worker_killed_mid_run_resumes_to_what_data_parallel_training_computes(ray_cluster, board, tmp_path):
    """ZeRO-3 shards the LoRA's gradients, optimizer state and parameters, the frozen base included. Rank 0 is
    killed mid-step 4 (after the step-3 checkpoint); both workers restart from DeepSpeed's shards, which Ray
    Train merged into one checkpoint, and the final LoRA equals the single-process replay of the whole run.
    With gradient checkpointing ZeRO-3 gathers a whole transformer block at a time (deepspeed_gather: auto).
    (ZeRO-2 runs the same code with stage 2; it is checked on GPUs by bench/zero_job.py.)"""
    manifest = run_training_job(board, _cfg(tmp_path, "job-zero3", deepspeed_stage=3, fail_at_step=4,
                                            gradient_checkpointing=True))
    storage = Storage.from_uri(tmp_path)
    assert storage.exists("jobs/job-zero3/fault_injected_4")
    assert manifest["config"]["deepspeed_stage"] == 3 and manifest["metrics"]["effective_batch"] == 2
    assert manifest["metrics"]["attempts"] == 2 and manifest["metrics"]["steps_trained_once"]
    lora = read_lora(storage.read_bytes(f"{lora_prefix('default', 'job-zero3')}/lora.safetensors"))
    cfg = TrainConfig.from_dict(manifest["config"])
    worst = _worst_difference(lora, formula_reference(cfg, manifest["cache_key"], world=2))
    assert worst < 1e-5, f"the resumed ZeRO-3 run differs from the single-process replay by {worst}"
    assert max(lora.layers[n].up.abs().max().item() for n in lora.layers) > 1e-3  # it did train
    # the checkpoint Ray Train kept holds both workers' DeepSpeed shards, merged into one directory
    runs = Path(tmp_path) / "ray_train" / "job-zero3"
    last = sorted(p for p in runs.glob("checkpoint_*") if p.is_dir())[-1]
    shards = sorted(p.name for p in (last / "zero").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], shards
    assert (last / "state.json").exists() and not (last / "trainer_state.pt").exists()
    # the frozen base is not in the checkpoint: only LoRA-sized files
    assert sum(p.stat().st_size for p in last.rglob("*") if p.is_file()) < 20 * 2**20


def test_zero3_gathers_blocks_or_lora_linears_and_trains_exactly_as_with_deepspeeds_per_module_hooks(tiny_dir):
    """The same three ZeRO-3 steps with each gather unit (tests/zero3_gather_run.py, its own process): the
    losses and the LoRA equal those of DeepSpeed's default of hooking every module (to float rounding: a
    block sums its gradients in another order), so a unit whose LoRA gradients were reduced before they all
    existed would show here as a different LoRA."""
    port = free_port()
    specs = ["module:gc", "block:gc", "linear:gc", "linear:no"]
    root = Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("zero3_gather_run.py")), str(port), *specs],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["unit"], r["checkpointing"]) for r in runs] == [("module", True), ("block", True), ("linear", True), ("linear", False)]
    leaves = {r["unit"]: r["leaves"] for r in runs}
    assert leaves == {"module": [], "block": ["Flux2SingleTransformerBlock", "Flux2TransformerBlock"], "linear": ["Linear"]}
    reference = runs[0]
    assert reference["losses"][0] != reference["losses"][-1]
    for run in runs[1:]:
        assert run["losses"] == pytest.approx(reference["losses"], abs=1e-6), (run["unit"], run["losses"], reference["losses"])
        worst = max(abs(a - b) for name, values in reference["lora"].items() for a, b in zip(values, run["lora"][name]))
        assert worst < 1e-6, f"{run['unit']}: the LoRA differs from per-module gathering by {worst}"


def test_zero_options_are_checked():
    with pytest.raises(ConfigError, match="optimizer: cannot run under deepspeed_stage 2.*adamw"):
        TrainConfig(deepspeed_stage=2, optimizer="adafactor", variant="custom").validate()
    with pytest.raises(ConfigError, match="deepspeed_offload: needs deepspeed_stage: 3"):
        TrainConfig(deepspeed_stage=2, deepspeed_offload=True, optimizer="adamw").validate()
    with pytest.raises(ConfigError, match="fp8: the float8 base cannot be sharded"):
        TrainConfig(deepspeed_stage=3, optimizer="adamw", fp8=True).validate()
    with pytest.raises(ConfigError, match="compile: ZeRO"):
        TrainConfig(deepspeed_stage=3, optimizer="adamw", compile=True).validate()
    with pytest.raises(ConfigError, match="deepspeed_stage: 2, 3 or null"):
        TrainConfig(deepspeed_stage=1).validate()
    with pytest.raises(ConfigError, match="deepspeed_gather: choose one of"):
        TrainConfig(deepspeed_stage=3, optimizer="adamw", deepspeed_gather="layer").validate()
    with pytest.raises(ConfigError, match="deepspeed_gather: needs deepspeed_stage: 3"):
        TrainConfig(deepspeed_stage=2, optimizer="adamw", deepspeed_gather="linear").validate()
    with pytest.raises(ConfigError, match="deepspeed_gather: block needs gradient_checkpointing: true"):
        TrainConfig(deepspeed_stage=3, optimizer="adamw", deepspeed_gather="block").validate()
    TrainConfig(deepspeed_stage=3, optimizer="adamw", deepspeed_gather="block", gradient_checkpointing=True).validate()
    # the policy's own choice of optimizer gives way to adamw under ZeRO, and says so
    resolved, decision = TrainConfig(deepspeed_stage=3).resolved(12)
    assert decision.variant == "GEM+A" and resolved.optimizer == "adamw" and decision.sources["optimizer"] == "policy"
    assert any("adamw under deepspeed_stage 3" in w for w in decision.warnings)
    assert any("without gradient_checkpointing gathers one Linear" in w for w in decision.warnings)
    _, decision = TrainConfig(deepspeed_stage=3, optimizer="adamw", gradient_checkpointing=True).resolved(12)
    assert not any("gradient_checkpointing" in w for w in decision.warnings)

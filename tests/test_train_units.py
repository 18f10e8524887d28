"""Training pieces without Ray: config, policy, objective, data order, optimisers, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from train.loop import (
    StepPlan, TrainState, flow_matching_loss, load_checkpoint, lora_parameters, make_batch, make_lr_scheduler,
    make_optimizer, sample_sigmas, save_checkpoint, setup_transformer, shift_mu,
)
from train.cache import CachedItem, TrainingData
from train.job import midpoint_jumps, run_training_job
from train.recipe import ConfigError, TrainConfig, choose_variant, default_steps
from cluster.storage import Storage
from contracts import compile_cache_key
from klein.accel import compile_fingerprint
from klein.model import load_transformer
from train.step import Trainer
from train.worker import CompileCache, midpoint_steps


def test_yaml_uses_ai_toolkit_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("rank: 16\nlinear_alpha: 8\noptimizer: adamw\nlr: 0.0002\nsteps: 40\ncaption_dropout_rate: 0.1\n"
                    "resolution: 512\nsave_every: 10\nsample_every: 20\nnetwork_dim: 16\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.rank, cfg.linear_alpha, cfg.optimizer, cfg.lr, cfg.steps) == (16, 8, "adamw", 2e-4, 40)
    assert cfg.caption_dropout_rate == 0.1 and cfg.resolution == 512 and cfg.save_every == 10


def test_unknown_key_and_bad_value_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rat'\] \(did you mean 'learning_rat' → 'learning_rate'\?\)") as e:
        TrainConfig.from_dict({"learning_rat": 1e-4})
    assert "'lr'" in str(e.value) and "fail_at_step" not in str(e.value)  # testing hooks are not offered
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]; known keys") as e:
        TrainConfig.from_dict({"colour": "red"})
    assert "did you mean" not in str(e.value)
    with pytest.raises(ConfigError, match="optimizer: choose one of"):
        TrainConfig.from_dict({"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="resolution"):
        TrainConfig.from_dict({"resolution": 1000})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("line, message", [
    ("rank: true", r"rank: expected an integer \(got True, of type bool\)"),
    ("sample_prompts: a house", r"sample_prompts: expected a list of strings \(got 'a house'"),
    ("lr: 1e-x", r"lr: expected a number \(got '1e-x'"),
    ("trigger: 5", "trigger: expected a string"),
    ("use_gpu: maybe", "use_gpu: expected true or false or null"),
])
def test_values_of_the_wrong_type_are_named(tmp_path, line, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(path)


def test_yaml_floats_written_without_a_dot_are_numbers(tmp_path):
    """ai-toolkit configs say `lr: 1e-4`; PyYAML (YAML 1.1) reads that as a string, YAML 1.2 as a float."""
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 1e-2\nlinear_alpha: 16\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lr, cfg.weight_decay, cfg.linear_alpha) == (1e-4, 1e-2, 16)


def test_formerly_refused_options_are_accepted():
    zero = TrainConfig(deepspeed_stage=2, optimizer="adamw")
    zero.validate()  # tests/test_train_zero.py trains with it
    consis = TrainConfig(consis_lora=True, content_steps=10)
    consis.validate()
    # and they reach the workers unchanged (the job hands them the config as a dict)
    assert (TrainConfig.from_dict(zero.to_dict()).deepspeed_stage, TrainConfig.from_dict(zero.to_dict()).optimizer) == (2, "adamw")
    assert (TrainConfig.from_dict(consis.to_dict()).consis_lora, TrainConfig.from_dict(consis.to_dict()).content_steps) == (True, 10)


def test_seed_defaults():
    cfg = TrainConfig()
    assert (cfg.rank, cfg.linear_alpha, cfg.optimizer, cfg.lr, cfg.weight_decay) == (32, 32, "adafactor", 1e-4, 1e-4)
    assert cfg.lr_scheduler == "cosine" and cfg.caption_dropout_rate == 0.05 and cfg.resolution == 1024


@pytest.mark.parametrize("n,variant", [(2, "B_r128"), (3, "B_r128"), (5, "GEM+B"), (7, "GEM+B"), (12, "GEM+A"), (40, "GEM+A")])
def test_dataset_size_policy(n, variant):
    assert choose_variant(n).variant == variant


def test_one_ref_is_allowed_with_a_warning_and_none_is_refused():
    """The seeds' 1–3 band: B_r128; 1 and 2 refs train with a warning."""
    for n in (1, 2):
        decision = choose_variant(n)
        assert decision.variant == "B_r128" and "nothing works reliably" in decision.warnings[0]
    with pytest.raises(ConfigError, match="at least 1"):
        choose_variant(0)


def test_explicit_keys_win_over_the_variant_and_sources_are_recorded():
    """The user's rank 16 + adamw under `variant: auto` on 12 refs (GEM+A: rank 32, adafactor) are obeyed."""
    cfg, decision = TrainConfig.from_dict({"rank": 16, "optimizer": "adamw"}).resolved(12)
    assert decision.variant == "GEM+A" and (cfg.rank, cfg.optimizer) == (16, "adamw")
    assert decision.sources["rank"] == "user" and decision.sources["optimizer"] == "user"
    assert decision.sources["use_gemini"] == "variant" and decision.sources["steps"] == "formula"
    assert decision.sources["lr"] == "default" and set(decision.sources.values()) <= {
        "user", "variant", "formula", "policy", "default"}
    assert cfg.linear_alpha == 16 and decision.sources["linear_alpha"] == "formula"  # alpha follows the user's rank
    # the same through YAML and CLI-style overrides, and after the trip to another process (explicit())
    again, _ = TrainConfig.from_dict(TrainConfig(rank=16, optimizer="adamw").explicit()).resolved(12)
    assert (again.rank, again.optimizer) == (16, "adamw")
    # unset keys still take the variant's values
    cfg, decision = TrainConfig().resolved(12)
    assert (cfg.rank, cfg.optimizer) == (32, "adafactor") and decision.sources["rank"] == "variant"


def test_explicit_key_against_the_seeds_advice_warns_and_is_obeyed(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("rank: 128\n")
    cfg, decision = TrainConfig.from_yaml(path).resolved(20)
    assert cfg.rank == 128 and decision.sources["rank"] == "user"
    assert any(w.startswith("rank: 128 is set explicitly where GEM+A") and "advises 32" in w for w in decision.warnings)
    assert cfg.steps == default_steps(128, 20)  # the formula follows the rank actually trained
    _, quiet = TrainConfig.from_dict({"rank": 32}).resolved(20)
    assert not any(w.startswith("rank:") for w in quiet.warnings)  # agreeing with the advice says nothing


def test_a_policy_picked_adamw8bit_falls_back_on_cpu_but_an_explicit_one_does_not():
    cfg, decision = TrainConfig().resolved(5, on_gpu=False)
    assert cfg.optimizer == "adamw" and decision.sources["optimizer"] == "policy"
    cfg, decision = TrainConfig(optimizer="adamw8bit").resolved(5, on_gpu=False)
    assert cfg.optimizer == "adamw8bit" and decision.sources["optimizer"] == "user"


def test_steps_formula_and_resolution():
    assert default_steps(32, 10) == 500 and default_steps(32, 30) == 900
    assert default_steps(128, 10) == 500 and default_steps(128, 40) == 800
    cfg, decision = TrainConfig().resolved(5, on_gpu=False)
    assert decision.variant == "GEM+B" and cfg.rank == 128 and cfg.steps == 500 and cfg.early_stopping
    assert cfg.optimizer == "adamw" and "adamw8bit needs a GPU" in decision.warnings[0]
    cfg, _ = TrainConfig().resolved(3, on_gpu=True)
    assert cfg.use_gemini is False and cfg.optimizer == "adamw8bit"
    cfg, _ = TrainConfig(variant="custom", rank=8, steps=7).resolved(12)
    assert cfg.rank == 8 and cfg.steps == 7


def test_adamw8bit_on_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="adamw8bit runs only on CUDA"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))


def test_shift_grows_with_resolution():
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    small, large = sample_sigmas(4000, 256, g()), sample_sigmas(4000, 4096, g())
    assert ((small > 0) & (small < 1)).all()
    assert large.mean() > small.mean()  # larger images train at higher noise


def _data(n=5, buckets=((64, 64), (80, 48))):
    items = [CachedItem(f"{i}.png", f"t. item {i}", buckets[i % len(buckets)], torch.randn(128, 4, 4) if i % 2 == 0 else torch.randn(128, 3, 5),
                        torch.randn(16, 48)) for i in range(n)]
    return TrainingData("k", items, torch.zeros(16, 48), "tiny", 64)


def test_step_plan_is_deterministic_and_covers_every_item():
    data = _data()
    plan, again = StepPlan(data.items, 1, 1, seed=3), StepPlan(data.items, 1, 1, seed=3)
    seen = [plan.batch(s, 0)[0] for s in range(1, 6)]
    assert sorted(seen) == list(range(5))  # one epoch visits every item once
    assert seen == [again.batch(s, 0)[0] for s in range(1, 6)]
    many = _data(20).items
    assert [StepPlan(many, 1, 1, seed=3).batch(s, 0)[0] for s in range(1, 21)] != [StepPlan(many, 1, 1, seed=4).batch(s, 0)[0] for s in range(1, 21)]
    # two workers split each step's global batch
    two = StepPlan(data.items, 1, 2, seed=3)
    assert {two.batch(1, 0)[0], two.batch(1, 1)[0]} == set(seen[:2])


def test_batches_stay_within_one_bucket():
    data = _data(8)
    plan = StepPlan(data.items, 2, 1, seed=0)
    for step in range(1, 9):
        idx = plan.batch(step, 0)
        assert len({data.items[i].bucket for i in idx}) == 1


def test_caption_dropout_replaces_the_whole_caption():
    data = _data()
    plan = StepPlan(data.items, 1, 1, seed=0)
    drops = 0
    for step in range(1, 200):
        _, embeds, _, _, dropped = make_batch(plan, data, step, 0, caption_dropout_rate=0.3)
        if dropped[0]:
            drops += 1
            assert torch.equal(embeds[0], data.empty_embeds)
    assert 30 < drops < 90


def test_flow_matching_target_is_noise_minus_x0():
    class Oracle(torch.nn.Module):
        """Predicts exactly noise - x0 from what it is given, to check the objective's algebra."""

        def __init__(self, x0, noise):
            super().__init__()
            self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
            self.x0, self.noise = x0, noise

        def forward(self, hidden_states, timestep, **kw):
            from train.loop import pack_latents

            sigma = timestep.view(-1, 1, 1)
            packed_x0, _ = pack_latents(self.x0)
            packed_noise, _ = pack_latents(self.noise)
            assert torch.allclose(hidden_states, (1 - sigma) * packed_x0 + sigma * packed_noise, atol=1e-6)
            return (packed_noise - packed_x0,)

    x0, noise = torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4)
    loss = flow_matching_loss(Oracle(x0, noise), x0, torch.randn(2, 8, 48), torch.tensor([0.3, 0.8]), noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", ["cosine", "cosine_with_restarts", "constant_with_warmup"])
def test_lr_schedulers(name):
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr_scheduler=name, steps=10, lr_warmup_steps=2 if name == "constant_with_warmup" else 0)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = make_lr_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    if name == "cosine":
        assert lrs[-1] < lrs[0] and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    elif name == "constant_with_warmup":
        assert lrs[-1] == pytest.approx(cfg.lr)
    else:  # cfg.lr_restarts hard restarts: lr·½(1 + cos(π·(cycles·t mod 1))), t = step/steps, 0 at the end
        cycles = cfg.lr_restarts
        expected = [cfg.lr * 0.5 * (1 + math.cos(math.pi * ((cycles * s / 10) % 1.0))) if s < 10 else 0.0 for s in range(1, 11)]
        assert cycles == 2 and lrs == pytest.approx(expected, abs=1e-12)
        assert lrs[4] > lrs[3]  # the restart


def test_checkpoint_round_trip_restores_lora_optimizer_and_schedule(tmp_path, tiny_dir):
    cfg = TrainConfig(steps=10, rank=4, linear_alpha=4, targets="single_blocks", lr=1e-3, optimizer="adamw")
    tr = setup_transformer(cfg, torch.device("cpu"))
    params = list(lora_parameters(tr).values())
    opt, sched = make_optimizer(params, cfg, torch.device("cpu")), None
    sched = make_lr_scheduler(opt, cfg)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    state = TrainState(step=1, log=[{"step": 1, "loss": 0.5}], val=[])
    save_checkpoint(tmp_path, tr, opt, sched, state, b"lora")
    tr2 = setup_transformer(TrainConfig(**{**cfg.to_dict(), "seed": 9}), torch.device("cpu"))
    params2 = list(lora_parameters(tr2).values())
    opt2 = make_optimizer(params2, cfg, torch.device("cpu"))
    sched2 = make_lr_scheduler(opt2, cfg)
    restored = load_checkpoint(tmp_path, tr2, opt2, sched2)
    assert restored.step == 1 and restored.attempt == 1
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert math.isclose(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])


def test_the_midpoint_check_fires_at_the_defaults():
    """1000 steps, saves every 250: no two checkpoints fall in the 40–65 % window, so the validation loss is also
    measured at 500 and 600 (train.worker.midpoint_steps) and a jump between them is flagged."""
    assert midpoint_steps(1000) == (500, 600) and midpoint_steps(20) == (10, 12)
    val = [{"step": s, "val_loss": 1.0} for s in (250, 500, 750, 1000)]
    probes = [{"step": 599, "loss": 0.9}, {"step": 600, "loss": 0.9, "val_loss": 1.3}]
    assert midpoint_jumps(val, 1000) == []  # the checkpoints alone never see it
    (flag,) = midpoint_jumps(val, 1000, probes=probes)
    assert (flag["from_step"], flag["to_step"]) == (500, 600) and flag["rise"] == pytest.approx(0.3)


def test_trainer_step_is_the_plain_training_step(tiny_dir):
    """`train.step.Trainer.step` (the worker's and the benchmarks' step) does what one optimizer step by hand does:
    the same losses and the same LoRA, with gradient accumulation."""
    cfg = TrainConfig(steps=4, rank=4, linear_alpha=4, targets="single_blocks", lr=1e-3, optimizer="adamw",
                      gradient_accumulation_steps=2, compile=False)
    gen = torch.Generator().manual_seed(0)
    items = [CachedItem(f"r{i}", "zxy. a", (64, 64), torch.randn(128, 4, 4, generator=gen), torch.randn(8, 48, generator=gen))
             for i in range(3)]
    data = TrainingData("k", items, torch.zeros(8, 48), "tiny", 64)
    plan = StepPlan(data.items, 1, 1, 0)

    def batch(step, micro):
        return make_batch(plan, data, (step - 1) * 2 + micro + 1, 0, 0.0)

    trainer, state = Trainer.setup(cfg, torch.device("cpu"))
    assert state.step == 0 and trainer.zero is None and trainer.model is trainer.transformer
    ours = [trainer.step(lambda micro, s=s: batch(s, micro)) for s in (1, 2)]

    tr = setup_transformer(cfg, torch.device("cpu"))
    params = list(lora_parameters(tr).values())
    opt = make_optimizer(params, cfg, torch.device("cpu"))
    sched = make_lr_scheduler(opt, cfg)
    by_hand = []
    for s in (1, 2):
        total = 0.0
        for micro in range(2):
            x0, embeds, sigmas, noise, _ = batch(s, micro)
            loss = flow_matching_loss(tr, x0, embeds, sigmas, noise) / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        by_hand.append(total)
    assert ours == pytest.approx(by_hand, rel=1e-6, abs=1e-7)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(trainer.params, params))


def test_the_compile_cache_key_names_the_model_and_the_settings_the_graphs_depend_on(tiny_dir):
    transformer = load_transformer("tiny")
    same = compile_fingerprint(transformer, "cpu", rank=32, resolution=1024)
    assert same == compile_fingerprint(load_transformer("tiny"), "cpu", rank=32, resolution=1024)
    assert same != compile_fingerprint(transformer, "cpu", rank=16, resolution=1024)
    assert same != compile_fingerprint(transformer, "cpu", rank=32, resolution=512)
    cfg = TrainConfig(model="tiny", trigger="zxy_style", rank=4, linear_alpha=4, steps=2)
    key = CompileCache(Storage.from_uri("/tmp"), transformer, cfg, torch.device("cpu"), compiled=True).key
    assert key.startswith("compile_cache/") and key == compile_cache_key(key.split("/")[1].removesuffix(".bin"))
    assert CompileCache(Storage.from_uri("/tmp"), transformer, cfg, torch.device("cpu"), compiled=False).load() == 0


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~1 min on two shared cores
def test_compiled_kernels_go_to_the_job_storage_and_come_back(tiny_dir, tmp_path):
    """The first job's compiled code is written to the storage after its first step; the next job's cache loads it."""
    storage = Storage.from_uri(str(tmp_path))
    transformer = load_transformer("tiny")
    cfg = TrainConfig(model="tiny", trigger="zxy_style", rank=4, linear_alpha=4, steps=2)
    first = CompileCache(storage, transformer, cfg, torch.device("cpu"), compiled=True)
    assert first.load() == 0 and not storage.exists(first.key)
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(x) * 3 + 1)
    compiled(torch.randn(16))
    first.save_in_background()
    first.close()
    assert storage.exists(first.key) and first.saved_bytes == len(storage.read_bytes(first.key)) > 0
    second = CompileCache(storage, transformer, cfg, torch.device("cpu"), compiled=True)
    assert second.key == first.key and second.load() > 0
    second.save_in_background()  # a loaded cache already holds these graphs: nothing is written again
    assert second.saved_bytes is None


def test_report_to_settings_are_checked_before_a_job_starts(tmp_path, monkeypatch):
    """wandb is refused by name with why; mlflow without MLFLOW_TRACKING_URI stops the job before anything is written
    (each Ray process would write its own ./mlruns); log_every must be a positive number of steps."""
    with pytest.raises(ConfigError, match=r"^report_to: choose one of \('tensorboard', 'mlflow', 'none'\); wandb is not supported"):
        TrainConfig(report_to="wandb")
    with pytest.raises(ConfigError, match=r"^log_every: a positive integer"):
        TrainConfig(log_every=0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"report_to: mlflow needs MLFLOW_TRACKING_URI"):
        run_training_job(tmp_path / "refs", TrainConfig(report_to="mlflow", job_id="job-mlflow", storage=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()

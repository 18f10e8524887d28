"""ai-toolkit job files read by `TrainConfig.from_yaml` (train/aitoolkit.py) and `klein-style train --config`."""

from __future__ import annotations

import textwrap

import pytest

from cli.main import main
from cli.train import train_refs
from train.recipe import ConfigError, TrainConfig

# ai-toolkit's own FLUX LoRA example, trimmed of its comments, with the keys we map set away from our defaults
AITOOLKIT_JOB = """\
job: extension
config:
  name: my_first_klein_lora
  process:
    - type: sd_trainer
      training_folder: output
      performance_log_every: 1000
      device: cuda:0
      trigger_word: zxy_ink
      network:
        type: lora
        linear: 16
        linear_alpha: 8
      save:
        dtype: float16
        save_every: 125
        max_step_saves_to_keep: 5
        push_to_hub: false
      datasets:
        - folder_path: {folder}
          caption_ext: txt
          caption_dropout_rate: 0.1
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [512, 768, 1024]
      train:
        batch_size: 2
        steps: 1500
        gradient_accumulation_steps: 3
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: flowmatch
        optimizer: adamw
        lr: 2e-4
        lr_scheduler: constant_with_warmup
        seed: 7
      sample:
        sampler: flowmatch
        sample_every: 250
        width: 512
        height: 512
        prompts:
          - "[trigger] a lighthouse at dawn"
          - a cat on a chair
        neg: ""
        seed: 42
        guidance_scale: 4
        sample_steps: 12
meta:
  name: "[name]"
"""

EXPECTED = dict(trigger="zxy_ink", rank=16, linear_alpha=8, save_every=125, keep_checkpoints=5, caption_dropout_rate=0.1,
                resolution=1024, batch_size=2, steps=1500, gradient_accumulation_steps=3, gradient_checkpointing=True,
                optimizer="adamw", lr=2e-4, lr_scheduler="constant_with_warmup", seed=7, sample_every=250,
                sample_size=512, sample_prompts=["zxy_ink a lighthouse at dawn", "a cat on a chair"], sample_steps=12,
                name="my_first_klein_lora")  # config.name: the LoRA's file name, as ai-toolkit names its output


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_ai_toolkit_job_file_maps_to_our_keys_as_the_users_settings(tmp_path):
    cfg = TrainConfig.from_yaml(write(tmp_path, AITOOLKIT_JOB.format(folder=tmp_path / "refs")))
    assert {key: getattr(cfg, key) for key in EXPECTED} == EXPECTED
    assert cfg.dataset_folder == str(tmp_path / "refs")
    # every mapped value is the user's: a variant / the size policy does not replace it (config_sources 'user')
    resolved, decision = cfg.resolved(12)
    assert {key: decision.sources[key] for key in EXPECTED} == {key: "user" for key in EXPECTED}
    assert (resolved.rank, resolved.linear_alpha, resolved.optimizer) == (16, 8, "adamw")
    notes = "\n".join(cfg.load_notes)
    for key in ("device", "training_folder", "performance_log_every", "network.type", "save.dtype"):
        assert key in notes
    assert "using the largest, 1024" in notes  # the resolution list is reduced and says so
    # command-line flags still win over the file
    again = TrainConfig.from_yaml(write(tmp_path, AITOOLKIT_JOB.format(folder="refs")), steps=9, trigger="zxy_oil")
    assert again.steps == 9 and again.sample_prompts[0] == "zxy_oil a lighthouse at dawn"  # [trigger] is the final one


@pytest.mark.parametrize("change, message", [
    (("        type: lora", "        type: lokr"), r"config\.process\[0\]\.network\.type: 'lokr' is not supported; .*LoRA only"),
    (("        linear_alpha: 8", "        linear_alpha: 8\n        conv: 4"), r"config\.process\[0\]\.network\.conv is not supported: .*Linear layers only"),
    (("        seed: 7", "        seed: 7\n        ema_config:\n          use_ema: true"), r"train\.ema_config is not supported: EMA"),
    (("        seed: 7", "        seed: 7\n        timestep_type: sigmoid"), r"config\.process\[0\]\.train\.timestep_type is not supported: .*remove it"),
    (("        push_to_hub: false", "        push_to_hub: true"), r"save\.push_to_hub: True is not supported; .*uploads nothing"),
    (("        width: 512", "        width: 768"), r"sample\.(width|height): .* contradicts .*sample_size"),
    (("        lr_scheduler: constant_with_warmup", "        lr_scheduler: linear"), r"config\.process\[0\]\.train\.lr_scheduler \(our `lr_scheduler`\): choose one of"),
    (("          shuffle_tokens: false", "          shuffle_tokens: false\n        - folder_path: more"), r"datasets has 2 entries; one dataset per job"),
    # the name becomes a file name: one that is not safe as one is refused where the file sets it
    (("  name: my_first_klein_lora", "  name: ../my lora"), r"job\.yaml: config\.name \(our `name`\): the LoRA's file name: use .* \(got '\.\./my lora'\)"),
])
def test_unsupported_ai_toolkit_keys_are_refused_by_name(tmp_path, change, message):
    old, new = change
    text = AITOOLKIT_JOB.format(folder="refs")
    assert old in text
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(write(tmp_path, text.replace(old, new, 1)))


def test_flattened_ai_toolkit_names_are_aliases_in_our_yaml(tmp_path):
    cfg = TrainConfig.from_yaml(write(tmp_path, "linear: 8\ntrigger_word: zxy_ink\nprompts: [a boat]\n"
                                                "max_step_saves_to_keep: 2\n"))
    assert (cfg.rank, cfg.trigger, cfg.sample_prompts, cfg.keep_checkpoints) == (8, "zxy_ink", ["a boat"], 2)
    assert {"rank", "trigger", "sample_prompts", "keep_checkpoints"} <= cfg.model_fields_set
    with pytest.raises(ConfigError, match=r"'rank' \(16\) and 'linear' \(8\) both set 'rank'"):
        TrainConfig.from_dict({"rank": 16, "linear": 8})


def test_the_refs_come_from_the_command_line_else_the_job_files_folder(tmp_path, capsys):
    path = write(tmp_path, AITOOLKIT_JOB.format(folder="from_file"))
    cfg = TrainConfig.from_yaml(path)
    assert train_refs(None, cfg, str(path)) == "from_file"
    assert train_refs("from_cli", cfg, str(path)) == "from_cli"
    assert "training on from_cli (command line), not" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no reference images: pass the refs folder"):
        train_refs(None, TrainConfig.from_dict({}), None)


def test_klein_style_train_without_a_trigger_says_where_to_set_it(tmp_path, capsys):
    path = write(tmp_path, textwrap.dedent(AITOOLKIT_JOB.format(folder="refs")).replace("      trigger_word: zxy_ink\n", ""))
    assert main(["train", "--config", str(path)]) == 2
    assert "no trigger: pass --trigger" in capsys.readouterr().err

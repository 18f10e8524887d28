"""The names of a trained LoRA's files: the ComfyUI export is named after its job, the LoRA itself after the job's name,
and the download route lists both."""

from __future__ import annotations

import pytest

from contracts import LEGACY_COMFYUI_FILE, comfyui_file_name, named_lora_file
from serve.jobs import public_files
from train.job import JobError, run_training_job
from train.recipe import ConfigError, TrainConfig


def test_the_comfyui_export_is_named_after_the_job_and_safe_on_any_filesystem():
    # two jobs of one trigger (and one job's two triggers) never share a name in ComfyUI's flat models/loras folder
    assert comfyui_file_name("lora-1a2b", "zxy_ink") == "lora-1a2b_zxy_ink.safetensors"
    assert len({comfyui_file_name(j, t) for j in ("job-a", "job-b") for t in ("zxy_ink", "zxy_oil")}) == 4
    assert comfyui_file_name("job-a", "zxy/../ink ä") == "job-a_zxy____ink.safetensors"
    assert comfyui_file_name("job-a", "zxy_ink") != "lora.safetensors"


def test_public_files_list_the_jobs_comfyui_export_and_old_lora_folders_keep_theirs():
    files = {"lora.safetensors": "a", "job-a_zxy_ink.safetensors": "b", "samples/loss.png": "c", "manifest.json": "d"}
    listed = public_files({"files": files, "comfyui_file": "job-a_zxy_ink.safetensors"})
    assert listed == {"lora.safetensors": "lora.safetensors", "job-a_zxy_ink.safetensors": "job-a_zxy_ink.safetensors",
                      "loss.png": "samples/loss.png"}
    legacy = public_files({"files": {"lora.safetensors": "a", LEGACY_COMFYUI_FILE: "b"}})
    assert legacy == {"lora.safetensors": "lora.safetensors", LEGACY_COMFYUI_FILE: LEGACY_COMFYUI_FILE}
    # a name the manifest does not hold is not offered (an imported LoRA has no ComfyUI export)
    assert public_files({"files": {"lora.safetensors": "a"}, "comfyui_file": "job-a_zxy_ink.safetensors"}) == {
        "lora.safetensors": "lora.safetensors"}


def test_the_lora_file_takes_the_jobs_name_and_a_name_unsafe_as_a_file_name_is_refused():
    assert named_lora_file("neon_v1.2") == "neon_v1.2.safetensors"
    assert TrainConfig(name="my-style_v2").name == "my-style_v2"
    for bad in ("../x", "a b", "", ".hidden", "x.safetensors", "ä", "x" * 101):
        with pytest.raises(ConfigError, match=r"^name: the LoRA's file name: use 1–100 ASCII letters"):
            TrainConfig(name=bad)
        with pytest.raises(ValueError):
            named_lora_file(bad)


def test_public_files_list_the_lora_under_its_name_beside_the_old_name():
    files = {"lora.safetensors": "a", "neon_v1.safetensors": "a", "job-a_zxy_ink.safetensors": "b"}
    listed = public_files({"files": files, "comfyui_file": "job-a_zxy_ink.safetensors", "lora_file": "neon_v1.safetensors"})
    assert listed == {"lora.safetensors": "lora.safetensors", "neon_v1.safetensors": "neon_v1.safetensors",
                      "job-a_zxy_ink.safetensors": "job-a_zxy_ink.safetensors"}


def test_a_name_that_would_overwrite_the_comfyui_export_stops_the_job_before_it_starts(tmp_path):
    cfg = TrainConfig(name="job-a_zxy_ink", job_id="job-a", trigger="zxy_ink", storage=str(tmp_path))
    with pytest.raises(JobError, match=r"name 'job-a_zxy_ink' would give the LoRA the ComfyUI export's file name"):
        run_training_job(tmp_path / "refs", cfg)
    assert not list(tmp_path.iterdir())  # nothing written

"""The names of a trained LoRA's files: the ComfyUI export is named after its job, and the download route lists it."""

from __future__ import annotations

from contracts import LEGACY_COMFYUI_FILE, comfyui_file_name
from serve.jobs import public_files


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

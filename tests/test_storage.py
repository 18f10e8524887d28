"""cluster/storage on the local filesystem and on a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import hashlib
import logging

import pyarrow.fs as pafs
import pytest

from cluster.ports import free_port
from cluster.storage import (
    MANIFEST_NAME,
    IntegrityError,
    Storage,
    StorageError,
    sha256_bytes,
    tenant_prefix,
)
from train.job import ray_run_config
from train.recipe import TrainConfig

BUCKET = "klein-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with dummy credentials; skipped if moto[server] is absent."""
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' to test on S3")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage.from_uri(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return Storage.from_uri(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}", s3_endpoint=endpoint)


def _raw_names(storage: Storage, prefix: str) -> list[str]:
    """Every object/file under prefix as the filesystem sees it (temporaries included)."""
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path(prefix), allow_not_found=True, recursive=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


# --- plain reads and writes ------------------------------------------------------------------------


def test_write_read_roundtrip_returns_sha256(storage):
    sha = storage.write_bytes("a/b/c.bin", b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert storage.read_bytes("a/b/c.bin") == b"hello"
    storage.write_json("a/meta.json", {"x": 1})
    assert storage.read_json("a/meta.json") == {"x": 1}
    assert "a/b/c.bin" in storage.list("a", recursive=True)
    storage.delete("a/b/c.bin")
    assert not storage.exists("a/b/c.bin")


def test_missing_key_and_bad_keys_have_clear_errors(storage):
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes("nope.bin")
    for bad in ["", "/abs", "a/../b", "a//b", "a\\b"]:
        with pytest.raises(StorageError, match="invalid storage key"):
            storage.path(bad)


def test_a_failure_mid_write_leaves_the_old_version_and_no_half_file(storage):
    storage.write_bytes("tenants/acme/loras/x/lora.safetensors", b"old version")

    def producer_that_dies():
        yield b"new version, first half"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        storage.write_chunks("tenants/acme/loras/x/lora.safetensors", producer_that_dies())

    assert storage.read_bytes("tenants/acme/loras/x/lora.safetensors") == b"old version"
    assert _raw_names(storage, "tenants/acme/loras/x") == ["lora.safetensors"]  # no temporary left behind


def test_a_first_write_that_fails_leaves_nothing(storage):
    def producer_that_dies():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError):
        storage.write_chunks("jobs/j1/new.bin", producer_that_dies())
    assert not storage.exists("jobs/j1/new.bin")
    assert _raw_names(storage, "jobs/j1") == []


def test_temporaries_of_a_writer_that_crashed_are_hidden(storage):
    # A writer killed hard (no except: clause ran) leaves its temporary; readers never see it.
    storage.write_bytes("jobs/j2/.tmp-deadbeef-out.bin", b"half")
    storage.write_bytes("jobs/j2/out.bin", b"whole")
    assert storage.list("jobs/j2") == ["jobs/j2/out.bin"]


def test_streaming_copy_in_and_out_with_sha_check(storage, tmp_path):
    big = bytes(range(256)) * 40_000  # ~10 MB, more than one chunk
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    sha = storage.write_from_path("blobs/big.bin", src)
    assert sha == sha256_bytes(big)
    out = tmp_path / "out" / "big.bin"
    assert storage.read_to_path("blobs/big.bin", out, expected_sha256=sha) == sha
    assert out.read_bytes() == big
    with pytest.raises(IntegrityError, match="corrupt"):
        storage.read_to_path("blobs/big.bin", tmp_path / "out2.bin", expected_sha256="0" * 64)
    assert not (tmp_path / "out2.bin").exists()


# --- manifests ---------------------------------------------------------------------------------------


def _write_artifact(storage: Storage, prefix: str) -> dict[str, str]:
    files = {"lora.safetensors": b"weights", "samples/contact_sheet.png": b"png", "samples/loss.png": b"plot"}
    return {name: storage.write_bytes(f"{prefix}/{name}", data) for name, data in files.items()}


def test_manifest_records_every_file_and_verifies(storage):
    prefix = tenant_prefix("acme", "loras", "job-1")
    hashes = _write_artifact(storage, prefix)
    manifest = storage.write_manifest(prefix, hashes, id="job-1", tenant="acme")
    assert manifest["files"] == hashes
    assert storage.read_manifest(prefix)["id"] == "job-1"
    assert storage.verify_manifest(prefix)["files"] == hashes
    assert storage.read_listed(prefix, "lora.safetensors") == b"weights"


def test_manifest_from_names_hashes_the_files(storage):
    prefix = "tenants/acme/datasets/d1"
    storage.write_bytes(f"{prefix}/refs.zip", b"zip")
    manifest = storage.write_manifest(prefix, ["refs.zip"])
    assert manifest["files"] == {"refs.zip": sha256_bytes(b"zip")}


def test_changed_or_missing_files_fail_verification_by_name(storage):
    prefix = tenant_prefix("acme", "loras", "job-2")
    storage.write_manifest(prefix, _write_artifact(storage, prefix))
    storage.write_bytes(f"{prefix}/lora.safetensors", b"tampered")
    storage.delete(f"{prefix}/samples/loss.png")
    with pytest.raises(IntegrityError) as err:
        storage.verify_manifest(prefix)
    assert "lora.safetensors: sha256" in str(err.value)
    assert "samples/loss.png: missing" in str(err.value)
    with pytest.raises(IntegrityError, match="corrupt"):
        storage.read_listed(prefix, "lora.safetensors")
    with pytest.raises(StorageError, match="not listed"):
        storage.read_listed(prefix, "other.bin")


def test_manifest_refuses_missing_files_and_unfinished_artifacts_have_none(storage):
    prefix = tenant_prefix("acme", "loras", "job-3")
    storage.write_bytes(f"{prefix}/lora.safetensors", b"w")
    with pytest.raises(StorageError, match="missing files"):
        storage.write_manifest(prefix, {"lora.safetensors": sha256_bytes(b"w"), "ghost.bin": "0" * 64})
    with pytest.raises(StorageError, match=f"no {MANIFEST_NAME}"):
        storage.verify_manifest(prefix)


# --- tenants ----------------------------------------------------------------------------------------


def test_listing_per_tenant_shows_only_finished_artifacts_of_that_tenant(storage):
    for tenant, job in [("acme", "job-a"), ("acme", "job-b"), ("globex", "job-c")]:
        prefix = tenant_prefix(tenant, "loras", job)
        storage.write_manifest(prefix, _write_artifact(storage, prefix), id=job)
    storage.write_bytes(f"{tenant_prefix('acme', 'loras', 'job-running')}/lora.safetensors", b"half-done job")

    assert storage.list_tenant("acme", "loras") == ["job-a", "job-b"]
    assert storage.list_tenant("acme", "loras", finished_only=False) == ["job-a", "job-b", "job-running"]
    assert storage.list_tenant("globex", "loras") == ["job-c"]
    assert storage.list_tenant("initech", "loras") == []
    assert storage.list_tenants() == ["acme", "globex"]


def test_tenant_and_kind_names_are_checked():
    assert tenant_prefix("acme", "loras", "j1") == "tenants/acme/loras/j1"
    for bad in ["", "..", "a/b", ".hidden", "x" * 200, "a b"]:
        with pytest.raises(StorageError, match="invalid tenant"):
            tenant_prefix(bad, "loras")


def test_unsupported_uri_is_rejected():
    with pytest.raises(StorageError, match="unsupported storage URI"):
        Storage.from_uri("ftp://host/path")


# --- Ray Train's own writes ------------------------------------------------------------------------
def test_ray_trains_run_goes_through_our_filesystem(storage):
    """Ray Train writes its run (checkpoints, state) through the RunConfig the job builds. On S3 that must be our
    endpoint's filesystem (KLEIN_S3_ENDPOINT: MinIO, here moto): from a bare s3:// URI Ray would make its own and
    write to AWS."""
    run_config = ray_run_config(TrainConfig(job_id="job-rc", storage=storage.uri), storage)
    assert run_config.storage_filesystem is storage.fs
    assert run_config.storage_path == storage.path("ray_train") and "://" not in run_config.storage_path
    # Ray's own first write (its storage check marker) lands in our storage, on our endpoint
    run_config.storage_context  # noqa: B018 — building it writes the marker
    assert _raw_names(storage, "ray_train/job-rc")


def test_a_jobs_tensorboard_log_lands_in_its_storage(storage, tmp_path):
    """train/live.py's EventLog: written in place on local storage, copied at every sync on S3; either way the job's
    tensorboard folder holds event files TensorBoard reads back, scalars and images, one file per writer."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from contracts import tensorboard_key
    from train.live import EventLog

    worker, driver = EventLog(storage, "job-tb", "worker"), EventLog(storage, "job-tb", "driver")
    for step in (1, 2, 3):
        worker.scalars(step, {"loss": 1.0 / step, "grad_norm": None})  # None: not measured, not logged
    worker.sync()
    driver.image("samples/prompt_0", 5, Image.new("RGB", (16, 8), (200, 10, 10)))
    driver.close()
    worker.scalars(4, {"loss": 0.2})
    worker.close()
    names = [k.rsplit("/", 1)[1] for k in storage.list(tensorboard_key("job-tb"))]
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["driver", "worker"]
    local = tmp_path / "tb"
    local.mkdir()
    for name in names:  # what `tensorboard --logdir` reads: the files as storage holds them
        (local / name).write_bytes(storage.read_bytes(f"{tensorboard_key('job-tb')}/{name}"))
    events = EventAccumulator(str(local), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.2)]
    assert "train/grad_norm" not in events.Tags()["scalars"]
    (image,) = events.Images("samples/prompt_0")
    assert (image.step, image.width, image.height) == (5, 16, 8)

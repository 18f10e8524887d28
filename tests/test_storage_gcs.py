"""cluster/storage on gs:// against a local GCS emulator (gcp-storage-emulator, from PyPI) on loopback.

The same checks tests/test_storage.py runs on local disk and S3: the test functions are imported from there
and collected here, where `storage` is a gs:// URI (KLEIN_GCS_ENDPOINT points pyarrow's GcsFileSystem at the
emulator, as it would at fake-gcs-server). Atomic writes go through the temporary-then-move path object
stores take (a rewrite, then a delete). Not run here: the per-tenant listing test, because the emulator
answers a delimited listing without its "prefixes" (the folders), which real GCS returns and pyarrow reads.
"""

from __future__ import annotations

import logging

import pytest

from cluster.ports import free_port
from cluster.storage import Storage

# the storage behaviours, collected again in this module with the gs:// `storage` fixture below
from test_storage import (  # noqa: F401  (tests/ is on sys.path)
    test_a_failure_mid_write_leaves_the_old_version_and_no_half_file,
    test_a_first_write_that_fails_leaves_nothing,
    test_changed_or_missing_files_fail_verification_by_name,
    test_manifest_from_names_hashes_the_files,
    test_manifest_records_every_file_and_verifies,
    test_manifest_refuses_missing_files_and_unfinished_artifacts_have_none,
    test_missing_key_and_bad_keys_have_clear_errors,
    test_streaming_copy_in_and_out_with_sha_check,
    test_temporaries_of_a_writer_that_crashed_are_hidden,
    test_write_read_roundtrip_returns_sha256,
)

BUCKET = "klein-gcs-test"


@pytest.fixture(scope="module")
def gcs_endpoint():
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="pip install gcp-storage-emulator")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KLEIN_GCS_ENDPOINT", f"http://127.0.0.1:{port}")
            yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def storage(request, gcs_endpoint):
    return Storage.from_uri(f"gs://{BUCKET}/{request.node.name}")


def test_the_uri_is_gcs_and_reaches_the_emulator(storage, gcs_endpoint):
    assert storage.uri.startswith(f"gs://{BUCKET}/") and not storage.is_local
    assert type(storage.fs).__name__ == "GcsFileSystem"
    storage.write_bytes("probe.txt", b"on the emulator")
    assert Storage.from_uri(storage.uri).read_bytes("probe.txt") == b"on the emulator"

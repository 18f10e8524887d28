"""Tenancy without Ray: hashed keys, constant-time checks, rate limits, ids."""

import json

import pytest

from cluster.storage import Storage
from serve.tenants import (KEYS_KEY, AuthError, KeyStore, TokenBucketLimiter, create_api_key, key_from_headers,
                           retry_after_header, tenant_has_key)


def test_keys_are_stored_hashed_and_resolve_to_their_tenant(tmp_path):
    storage = Storage.from_uri(tmp_path)
    key_a = create_api_key(storage, "acme")
    key_b = create_api_key(storage, "globex")
    raw = storage.read_bytes(KEYS_KEY).decode()
    assert key_a not in raw and key_b not in raw  # only salted hashes are stored
    records = json.loads(raw)
    assert all(len(r["salt"]) == 32 and len(r["hash"]) == 64 for r in records.values())
    store = KeyStore(storage)
    assert store.tenant_of(key_a) == "acme" and store.tenant_of(key_b) == "globex"
    assert tenant_has_key(storage, "acme") and not tenant_has_key(storage, "initech")


@pytest.mark.parametrize("bad", [None, "", "nope", "ks_abc_def", "ks_" + "0" * 12 + "_x"])
def test_unknown_or_malformed_keys_are_refused(tmp_path, bad):
    storage = Storage.from_uri(tmp_path)
    good = create_api_key(storage, "acme")
    store = KeyStore(storage)
    with pytest.raises(AuthError):
        store.tenant_of(bad)
    with pytest.raises(AuthError):
        store.tenant_of(good[:-1] + ("A" if good[-1] != "A" else "B"))  # right id, wrong secret


def test_a_new_key_works_at_once(tmp_path):
    storage = Storage.from_uri(tmp_path)
    store = KeyStore(storage, refresh_s=3600)
    create_api_key(storage, "acme")
    assert store.tenant_of(create_api_key(storage, "acme")) == "acme"


def test_tenant_names_are_checked(tmp_path):
    from cluster.storage import StorageError

    with pytest.raises(StorageError):
        create_api_key(Storage.from_uri(tmp_path), "../evil")


def test_key_from_headers():
    assert key_from_headers("Bearer abc", None) == "abc"
    assert key_from_headers("bearer  abc ", None) == "abc"
    assert key_from_headers(None, "xyz") == "xyz"
    assert key_from_headers("Basic Zm9v", None) is None


def test_token_bucket_allows_bursts_then_says_when_to_retry():
    now = [0.0]
    limiter = TokenBucketLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.try_acquire("a")
    assert wait == pytest.approx(0.5)
    assert limiter.try_acquire("b") == 0.0  # tenants do not share buckets
    now[0] += 0.5
    assert limiter.try_acquire("a") == 0.0
    assert retry_after_header(0.2) == {"Retry-After": "1"} and retry_after_header(2.1) == {"Retry-After": "3"}


def test_job_ids_refuse_path_traversal():
    from train.job import JobError, check_job_id

    for bad in ("../x", "a/b", "..", "A_B", "x" * 80, "lora-1/../../etc"):
        with pytest.raises(JobError):
            check_job_id(bad)

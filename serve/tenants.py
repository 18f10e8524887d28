"""Tenants: API keys (stored hashed, compared in constant time), ownership checks, rate limits.

Keys live in `auth/keys.json` in storage: {key_id: {tenant, salt, hash, created}}. A key looks like
`ks_<key_id>_<secret>`; the key id finds the record without scanning, and only the salted sha256 of the
whole key is stored, so a leaked keys.json does not leak keys. `create_api_key` prints nothing: the
caller shows the plaintext once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass

from ray import serve

from cluster.storage import Storage, StorageError, check_name
from serve.config import ServeConfig

log = logging.getLogger("klein.serve.tenants")

KEYS_KEY = "auth/keys.json"
KEY_PREFIX = "ks"
_KEY_ID_BYTES = 6
_SECRET_BYTES = 24


class AuthError(Exception):
    """The request carries no key, or a key we do not know."""


def _hash_key(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def _load_keys(storage: Storage) -> dict:
    return storage.read_json(KEYS_KEY) if storage.exists(KEYS_KEY) else {}


def create_api_key(storage: Storage, tenant: str) -> str:
    """Create a key for `tenant`, store its salted hash, and return the plaintext (show it once)."""
    check_name(tenant, "tenant")
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    salt = secrets.token_hex(16)
    keys = _load_keys(storage)
    keys[key_id] = {"tenant": tenant, "salt": salt, "hash": _hash_key(salt, key), "created": time.time()}
    storage.write_json(KEYS_KEY, keys)  # atomic: readers see the old list or the new one
    return key


def tenant_has_key(storage: Storage, tenant: str) -> bool:
    return any(rec.get("tenant") == tenant for rec in _load_keys(storage).values())


def revoke_tenant_keys(storage: Storage, tenant: str) -> int:
    keys = _load_keys(storage)
    kept = {k: v for k, v in keys.items() if v.get("tenant") != tenant}
    storage.write_json(KEYS_KEY, kept)
    return len(keys) - len(kept)


class KeyStore:
    """Resolves a presented key to its tenant. Re-reads keys.json at most every `refresh_s` seconds."""

    def __init__(self, storage: Storage, refresh_s: float = 2.0):
        self._storage = storage
        self._refresh_s = refresh_s
        self._keys: dict = {}
        self._loaded_at = -math.inf
        self._lock = threading.Lock()

    def _records(self, force: bool = False) -> dict:
        with self._lock:
            if force or time.monotonic() - self._loaded_at > self._refresh_s:
                try:
                    self._keys = _load_keys(self._storage)
                except StorageError:
                    pass  # keep the last good list rather than locking everyone out on a storage blip
                self._loaded_at = time.monotonic()
            return self._keys

    def tenant_of(self, key: str | None) -> str:
        if not key:
            raise AuthError("no API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        parts = key.split("_")
        key_id = parts[1] if len(parts) >= 3 and parts[0] == KEY_PREFIX else None
        record = self._records().get(key_id) if key_id else None
        if record is None and key_id:
            record = self._records(force=True).get(key_id)  # a key created a moment ago
        # Compare a hash even when the id is unknown, so timing does not tell which ids exist.
        salt = record["salt"] if record else "00" * 16
        expected = record["hash"] if record else "0" * 64
        if not hmac.compare_digest(_hash_key(salt, key), expected) or record is None:
            raise AuthError("the API key is not valid")
        return record["tenant"]


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key.strip() if x_api_key else None


# -- rate limits -------------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Per-tenant token bucket: `rate` requests per second on average, bursts up to `burst`.

    `overrides` gives some tenants their own limits: {tenant: {"per_s": ..., "burst": ...}}. One instance
    is the cluster-wide limit when it lives in the single `RateLimiter` replica below; an ingress replica
    keeps its own instance only as the fallback for when that replica cannot be reached.
    """

    def __init__(self, rate: float, burst: int, clock=time.monotonic, overrides: dict | None = None):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.overrides = {t: (float(v.get("per_s", rate)), float(v.get("burst", burst))) for t, v in (overrides or {}).items()}
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def limit_of(self, tenant: str) -> tuple[float, float]:
        return self.overrides.get(tenant, (self.rate, self.burst))

    def peek(self, tenant: str, cost: float = 1.0) -> float:
        """Like `try_acquire`, without taking anything: 0.0 when `cost` tokens are there, else the wait."""
        rate, burst = self.limit_of(tenant)
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                return 0.0
            tokens = min(burst, bucket.tokens + (self._clock() - bucket.updated) * rate)
            return 0.0 if tokens >= cost else (cost - tokens) / rate

    def try_acquire(self, tenant: str, cost: float = 1.0) -> float:
        """0.0 when allowed; otherwise the seconds until `cost` tokens are available (for Retry-After)."""
        rate, burst = self.limit_of(tenant)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= cost:
                bucket.tokens -= cost
                return 0.0
            return (cost - bucket.tokens) / rate


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# -- the cluster-wide limit ----------------------------------------------------------------------------------

@serve.deployment(name="RateLimiter", num_replicas=1, max_ongoing_requests=1000)
class RateLimiter:
    """The one place that holds every tenant's token bucket, so the limit holds across ingress replicas.

    It must run as exactly one replica (build_app pins it). A call costs one Serve round trip (about a
    few milliseconds on one node). If it dies, Serve starts a new one with full buckets: a restart forgives
    at most one burst per tenant, and ingress replicas use their own buckets until it is back.
    """

    def __init__(self, config: dict):
        cfg = ServeConfig.from_any(config)
        self.limiter = TokenBucketLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst, overrides=cfg.tenant_rate_limits)

    async def acquire(self, tenant: str, cost: float = 1.0) -> float:
        return self.limiter.try_acquire(tenant, cost)


class SharedRateLimit:
    """What an ingress replica calls: the `RateLimiter` deployment, or its own buckets when that is unreachable.

    Without a handle (shared_rate_limit off) it is the per-replica limiter: the cluster-wide limit is then
    `rate × ingress replicas`.
    """

    def __init__(self, handle, local: TokenBucketLimiter, timeout_s: float = 2.0, warn_every_s: float = 30.0,
                 retry_after_s: float = 5.0):
        self.handle = handle
        self.local = local
        self.timeout_s = timeout_s
        self.warn_every_s = warn_every_s
        self.retry_after_s = retry_after_s  # after a failure, limit locally this long before asking again
        self._warned_at = -math.inf
        self._down_until = -math.inf
        self.fallbacks = 0

    async def acquire(self, tenant: str) -> float:
        if self.handle is not None and time.monotonic() >= self._down_until:
            response = self.handle.acquire.remote(tenant)

            async def wait():
                return await response

            try:
                return float(await asyncio.wait_for(wait(), self.timeout_s))
            except Exception as e:  # noqa: BLE001 — the limiter is down or slow: limit locally, never fail the request
                response.cancel()
                self.fallbacks += 1
                self._down_until = time.monotonic() + self.retry_after_s
                if time.monotonic() - self._warned_at > self.warn_every_s:
                    self._warned_at = time.monotonic()
                    log.warning("the cluster-wide rate limiter did not answer (%s); this replica limits on its own "
                                "until it is back", type(e).__name__)
        return self.local.try_acquire(tenant)

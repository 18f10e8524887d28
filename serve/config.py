"""ServeConfig: every knob of the HTTP service in one object, built from the app's `args` (serve config YAML).

A pydantic dataclass: values are type-checked (an error names the key), an unknown key gets the closest known
one, and `sources()` says which keys the operator set (user) and which are defaults.
"""

from __future__ import annotations

from dataclasses import asdict, field, fields
from typing import Any

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from contracts import KLORA_ALPHA, KLORA_BETA, KLORA_GAMMA
from train.recipe import default_storage, unknown_keys_message, validation_message


class ServeConfigError(ValueError):
    """An unknown or invalid serve option; the message names it."""


ACCEL_MODES = ("auto", "off", "exact", "fast")  # "exact"/"fast" are klein.accel.INFERENCE_MODES
KLORA_SCORES_ON = ("auto", "fusion", "generator")


@dataclass(config=ConfigDict(extra="forbid"))
class ServeConfig:
    storage: str = field(default_factory=default_storage)
    model: str = "tiny"
    device: str = "cpu"
    # image limits and defaults (None: 64 on the tiny preset, 2048 on real weights)
    max_side: int = 2048
    default_side: int | None = None
    default_steps: int = 50
    default_guidance: float = 4.0
    # generator replica: adapters kept resident (LRU) and request batching
    # 10: ten rank-32 LoRAs of Klein 9B stay resident within 56.4 GiB peak on an H200 (bench/results/time-to-style);
    # with 4, ten tenants in round-robin paid a 1.4-1.9 s load on every request
    max_loras_per_replica: int = 10
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    # True: one pipeline call per batch group (faster on GPU, but not bit-identical to single calls on
    # CPU BLAS); False: the group shares one adapter activation and runs item by item (exact).
    batch_forward: bool = False
    # generator inference acceleration (klein.accel): "auto" ("exact" on CUDA, "off" on CPU), "off" (peft
    # adapters, stock pipeline), "exact" (fused LoRAs, compiled blocks, CFG batch 2), "fast" (also fp8 + step caching)
    accel: str = "auto"
    # tenancy. The rate limit is per tenant and cluster-wide: one `RateLimiter` replica holds the token
    # buckets for every ingress replica (serve/tenants.py); `tenant_rate_limits` overrides it per tenant,
    # {tenant: {"per_s": 2, "burst": 10}}. `shared_rate_limit: false` keeps buckets per ingress replica.
    rate_limit_per_s: float = 5.0
    rate_limit_burst: int = 20
    tenant_rate_limits: dict = field(default_factory=dict)
    shared_rate_limit: bool = True
    max_training_jobs_per_tenant: int = 1
    # overload: each ingress replica answers at most this many /v1 requests at once and refuses the rest
    # at once with 503 + Retry-After (JSON), before Serve's proxy would queue or refuse them itself
    max_inflight_requests: int = 48
    # every call from the ingress to another deployment (style, fusion, generator) is bounded: past it the
    # client gets 503 + Retry-After instead of waiting on. Keep it under http_options.request_timeout_s.
    downstream_timeout_s: float = 240.0
    overload_retry_after_s: int = 2
    # uploads and training sources
    # 512 MiB: our own rank-32 LoRA of Klein 9B is 332 MiB in fp32 and must import back
    max_upload_bytes: int = 512 * 1024 * 1024
    allow_local_source_uri: bool = False  # tests and single-user setups only: lets `source_uri` be a local path
    # training jobs launched by the service (overrides of TrainConfig fields, e.g. steps for tests)
    train_overrides: dict = field(default_factory=dict)
    train_task_num_cpus: float = 0.0  # the driver task only waits on Ray Train; its workers hold the CPUs
    # Gemini text stage: "auto" uses it when a key is configured
    gemini: str = "auto"
    # CORS: off unless origins are listed
    cors_origins: list = field(default_factory=list)
    # K-LoRA constants (the paper's alpha/beta; gamma balances content vs style)
    klora_alpha: float = KLORA_ALPHA
    klora_beta: float = KLORA_BETA
    klora_gamma: float = KLORA_GAMMA
    fusion_cache_size: int = 32
    # who computes K-LoRA's per-layer scores: "auto" = the Fusion replica if it holds a GPU or the generator
    # has none (`device` not cuda), else the generator on its GPU; "fusion" or "generator" force it
    klora_scores_on: str = "auto"

    @classmethod
    def from_any(cls, config: "ServeConfig | dict | None") -> "ServeConfig":
        if isinstance(config, ServeConfig):
            return config
        data = dict(config or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ServeConfigError(unknown_keys_message(unknown, known, {}, "serve config").replace(
                "unknown keys", "unknown serve option(s)"))
        try:
            cfg = cls(**data)
        except ValidationError as e:
            raise ServeConfigError(validation_message(e, {n: _Annotated(f.type) for n, f in known.items()})) from None
        object.__setattr__(cfg, "_explicit", frozenset(data))
        cfg.check()
        return cfg

    def sources(self) -> dict[str, str]:
        """Each option's source: `user` (the config file's args or a CLI flag) or `default`."""
        explicit = getattr(self, "_explicit", frozenset())
        return {f.name: "user" if f.name in explicit else "default" for f in fields(self)}

    def check(self) -> None:
        if self.max_side < 64 or self.max_side % 16:
            raise ServeConfigError(f"max_side must be a multiple of 16 and at least 64, got {self.max_side}")
        if self.max_loras_per_replica < 1:
            raise ServeConfigError("max_loras_per_replica must be at least 1")
        if self.gemini not in ("auto", "on", "off"):
            raise ServeConfigError(f"gemini must be auto, on or off, got {self.gemini!r}")
        if self.accel not in ACCEL_MODES:
            raise ServeConfigError(f"accel must be one of {', '.join(ACCEL_MODES)}, got {self.accel!r}")
        if self.klora_scores_on not in KLORA_SCORES_ON:
            raise ServeConfigError(f"klora_scores_on must be one of {', '.join(KLORA_SCORES_ON)}, "
                                   f"got {self.klora_scores_on!r}")
        if self.max_upload_bytes < 1:
            raise ServeConfigError("max_upload_bytes must be positive")
        if self.rate_limit_per_s <= 0 or self.rate_limit_burst < 1:
            raise ServeConfigError("rate_limit_per_s must be > 0 and rate_limit_burst >= 1")
        for tenant, limit in self.tenant_rate_limits.items():
            if not isinstance(limit, dict) or set(limit) - {"per_s", "burst"} or \
                    float(limit.get("per_s", 1)) <= 0 or int(limit.get("burst", 1)) < 1:
                raise ServeConfigError(f"tenant_rate_limits[{tenant!r}] must be {{per_s: > 0, burst: >= 1}}, got {limit!r}")
        if self.max_inflight_requests < 1:
            raise ServeConfigError("max_inflight_requests must be at least 1")
        if self.downstream_timeout_s <= 0:
            raise ServeConfigError("downstream_timeout_s must be positive")
        if self.overload_retry_after_s < 1:
            raise ServeConfigError("overload_retry_after_s must be at least 1 (seconds)")

    def rate_limit_of(self, tenant: str) -> tuple[float, int]:
        """(requests per second, burst) for `tenant`: its override, else the defaults."""
        limit = self.tenant_rate_limits.get(tenant) or {}
        return float(limit.get("per_s", self.rate_limit_per_s)), int(limit.get("burst", self.rate_limit_burst))

    @property
    def side_default(self) -> int:
        if self.default_side is not None:
            return self.default_side
        return 64 if self.model == "tiny" else 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Annotated:
    """A field's annotation, as `validation_message` reads it."""

    def __init__(self, annotation: Any):
        self.annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(str(annotation), annotation)

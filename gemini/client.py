"""The Gemini client: one `google.genai.Client`, structured JSON answers, retries, a cache, a concurrency cap.

Every stage of the text stage (captions, L1 profile, L2 rewrite, judge) calls `GeminiClient.generate`, which

- runs under ONE overall deadline per call (`deadlines`, per stage: the L2 rewrite on the request path gets
  20 s, well inside the request's own deadline; captions, L1 and the judge get longer), that retries, backoff
  sleeps, `Retry-After` waits and a trickling answer cannot extend: each HTTP attempt runs in a worker thread
  that the caller stops waiting for at the deadline (`GeminiDeadline`), and its concurrency slot is given
  back then;
- honours the upstream's `Retry-After` (and RetryInfo) when the wait fits the deadline, and gives up at once
  when it does not;
- opens a circuit breaker after `breaker_failures` auth (401/403) or quota (429 that outlasts its retries)
  failures in a row: for `breaker_cooldown_s` calls fail at once (`GeminiCircuitOpen`), so a bad key is not
  tried again for every image;
- refuses answers longer than the stage's `max_answer_chars` (oversize = malformed: asked once more),
  reads JSON even inside a fenced block with prose around it, and redacts secrets (the API key, anything
  shaped like a Google key or a bearer token) from every upstream text it logs or puts into an error;
- sends text and images (as `inline_data`) with a response schema built from a pydantic model,
- retries 408/429/5xx answers, time-outs and dropped connections with exponential backoff and jitter, at
  most `max_retries` times; an answer that is not valid JSON for the schema, or has no content, is asked
  for once more (`max_bad_answer_retries`); a safety block is not retried (the same input is blocked again),
- holds a semaphore around each HTTP request so that at most `max_concurrency` requests are in flight,
- caches validated answers under `cache_uri`, keyed by (stage, model, prompt version, schema, image hashes,
  text), so a re-run of a job costs nothing,
- logs latency and token counts of every call to the `klein.gemini` logger (never the API key).

Any failure surfaces as a `GeminiError`; the stages catch it and answer from the offline fallback, so a job
or a request never fails because Gemini did.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Sequence, TypeVar, Union

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image
from pydantic import BaseModel, Field, SecretStr, ValidationError

from cluster.storage import Storage

logger = logging.getLogger("klein.gemini")

Stage = Literal["caption", "profile", "rewrite", "judge"]
STAGES: tuple[str, ...] = ("caption", "profile", "rewrite", "judge")

# Best quality where a stage runs once per LoRA (captions, L1); `fast` switches every stage to the flash model.
DEFAULT_MODEL = "gemini-2.5-pro"
FAST_MODEL = "gemini-3-flash-preview"

# HTTP codes worth another try: request time-out, rate limit, server-side failures.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# Finish / block reasons that mean "the model refused", not "try again".
_BLOCK_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)

T = TypeVar("T", bound=BaseModel)
Part = Union[str, Image.Image]


# -- errors -------------------------------------------------------------------------------------------
class GeminiError(RuntimeError):
    """Gemini could not answer; callers fall back to the offline stage."""


class GeminiUnavailable(GeminiError):
    """No API key is configured."""


class GeminiBlocked(GeminiError):
    """The prompt or the answer was blocked (safety, recitation, ...); retrying would not help."""


class GeminiBadAnswer(GeminiError):
    """The answer was empty, not JSON, or did not fit the response schema."""


class GeminiRetriesExhausted(GeminiError):
    """Rate limits, server errors or time-outs outlasted the retry budget."""


class GeminiRequestError(GeminiError):
    """The request itself was refused (400, 401, 403, 404): a configuration problem, not retried."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class GeminiDeadline(GeminiError):
    """The call's overall deadline passed (a silent or trickling upstream, or retries that would outlast it)."""


class GeminiCircuitOpen(GeminiError):
    """Repeated auth or quota failures opened the circuit breaker: no call is made until it cools down."""


# -- secrets never leave in upstream text --------------------------------------------------------------
_SECRET_PATTERNS = (
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),  # Google API keys
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)((?:api[_-]?key|key|token|secret)[\"']?\s*[=:]\s*[\"']?)[A-Za-z0-9._~+/\-]{8,}"),
)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with every given secret and anything shaped like a key or token replaced by [REDACTED]."""
    text = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[REDACTED]")
    text = _SECRET_PATTERNS[0].sub("[REDACTED]", text)
    for pattern in _SECRET_PATTERNS[1:]:
        text = pattern.sub(lambda m: m.group(1) + "[REDACTED]", text)
    return text


# -- configuration ------------------------------------------------------------------------------------
class StageModels(BaseModel):
    caption: str = DEFAULT_MODEL
    profile: str = DEFAULT_MODEL
    rewrite: str = FAST_MODEL  # on the request path: the seed's production choice, Flash
    judge: str = DEFAULT_MODEL


class StageSeconds(BaseModel):
    """Each stage's overall deadline per call, in seconds (retries and waits included)."""

    caption: float = Field(180.0, gt=0)
    profile: float = Field(240.0, gt=0)
    rewrite: float = Field(20.0, gt=0)  # well inside a /v1/generate request's own deadline
    judge: float = Field(180.0, gt=0)


class StageChars(BaseModel):
    """Each stage's largest acceptable answer, in characters: past it the answer counts as malformed."""

    caption: int = Field(4_000, ge=100)
    profile: int = Field(32_000, ge=100)
    rewrite: int = Field(8_000, ge=100)
    judge: int = Field(16_000, ge=100)


class GeminiConfig(BaseModel):
    """How to reach Gemini and how hard to try. `GeminiConfig.from_env()` reads the environment."""

    api_key: SecretStr | None = None  # SecretStr: repr() and logs show '**********'
    base_url: str | None = None
    api_version: str = "v1beta"
    models: StageModels = Field(default_factory=StageModels)
    fast: bool = False  # production switch: every stage uses `fast_model`
    fast_model: str = FAST_MODEL
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)  # extra attempts after the first, for 429/5xx/time-outs
    max_bad_answer_retries: int = Field(1, ge=0)  # extra attempts for malformed or empty answers
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    backoff_jitter: float = Field(0.5, ge=0, le=1)  # fraction of each delay that is randomised
    max_concurrency: int = Field(4, ge=1)
    cache_uri: str | None = None
    temperature: float = 0.2
    max_image_side: int = Field(1024, ge=64)  # images are downscaled before upload; hashes use the originals
    deadlines: StageSeconds = Field(default_factory=StageSeconds)
    max_answer_chars: StageChars = Field(default_factory=StageChars)
    breaker_failures: int = Field(3, ge=1)  # auth/quota failures in a row that open the circuit
    breaker_cooldown_s: float = Field(60.0, gt=0)

    def model_for(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown Gemini stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.fast_model if self.fast else getattr(self.models, stage)

    def deadline_for(self, stage: str) -> float:
        self.model_for(stage)  # checks the stage name
        return float(getattr(self.deadlines, stage))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "GeminiConfig":
        """Read the configuration from environment variables.

        GEMINI_API_KEY (or GOOGLE_API_KEY), GEMINI_BASE_URL (or GOOGLE_GEMINI_BASE_URL), KLEIN_GEMINI_FAST=1,
        KLEIN_GEMINI_MODEL_{CAPTION,PROFILE,REWRITE,JUDGE}, KLEIN_GEMINI_FAST_MODEL, KLEIN_GEMINI_TIMEOUT_S,
        KLEIN_GEMINI_MAX_RETRIES, KLEIN_GEMINI_MAX_CONCURRENCY, KLEIN_GEMINI_CACHE_URI,
        KLEIN_GEMINI_DEADLINE_{CAPTION,PROFILE,REWRITE,JUDGE}_S, KLEIN_GEMINI_BACKOFF_INITIAL_S,
        KLEIN_GEMINI_BREAKER_FAILURES, KLEIN_GEMINI_BREAKER_COOLDOWN_S. Keyword arguments win.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        key = env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY")
        if key and key.strip():
            values["api_key"] = key.strip()
        base_url = env.get("GEMINI_BASE_URL") or env.get("GOOGLE_GEMINI_BASE_URL")
        if base_url:
            values["base_url"] = base_url
        if env.get("KLEIN_GEMINI_FAST"):
            values["fast"] = env["KLEIN_GEMINI_FAST"].strip().lower() in ("1", "true", "yes", "on")
        if env.get("KLEIN_GEMINI_FAST_MODEL"):
            values["fast_model"] = env["KLEIN_GEMINI_FAST_MODEL"]
        models = {
            s: env[f"KLEIN_GEMINI_MODEL_{s.upper()}"] for s in STAGES if env.get(f"KLEIN_GEMINI_MODEL_{s.upper()}")
        }
        if models:
            values["models"] = StageModels(**models)
        deadlines = {s: env[f"KLEIN_GEMINI_DEADLINE_{s.upper()}_S"] for s in STAGES
                     if env.get(f"KLEIN_GEMINI_DEADLINE_{s.upper()}_S")}
        if deadlines:
            values["deadlines"] = deadlines
        for name, var in (
            ("timeout_s", "KLEIN_GEMINI_TIMEOUT_S"),
            ("max_retries", "KLEIN_GEMINI_MAX_RETRIES"),
            ("max_concurrency", "KLEIN_GEMINI_MAX_CONCURRENCY"),
            ("cache_uri", "KLEIN_GEMINI_CACHE_URI"),
            ("backoff_initial_s", "KLEIN_GEMINI_BACKOFF_INITIAL_S"),
            ("breaker_failures", "KLEIN_GEMINI_BREAKER_FAILURES"),
            ("breaker_cooldown_s", "KLEIN_GEMINI_BREAKER_COOLDOWN_S"),
        ):
            if env.get(var):
                values[name] = env[var]
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as e:
            raise ValueError(f"invalid Gemini configuration from the environment: {e}") from e


# -- answers ------------------------------------------------------------------------------------------
@dataclass
class GeminiAnswer(Generic[T]):
    """A validated structured answer and what it cost."""

    value: T
    model: str
    stage: str
    from_cache: bool = False
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    attempts: int = 0


@dataclass
class _Encoded:
    """The request parts ready for the SDK, and what identifies them for the cache."""

    parts: list[Any]
    fingerprint: list[str] = field(default_factory=list)


def image_hash(image: Image.Image) -> str:
    """sha256 of the pixels (mode, size, raw bytes): stable across file formats and re-encodings."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _encode_image(image: Image.Image, max_side: int) -> tuple[bytes, str]:
    """JPEG for photographs (smaller uploads), PNG when there is transparency."""
    image = image.copy()
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image.convert("RGBA").save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


def _retry_delay_hint(error: Exception) -> float | None:
    """How long the upstream asked us to wait: a `Retry-After` header (seconds), or google.rpc.RetryInfo
    {retryDelay: "3s"} in a 429's details."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        try:
            value = headers.get("retry-after")
        except Exception:  # noqa: BLE001 — an SDK response object of another shape: no header hint
            value = None
        if value is not None and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", str(value)):
            return float(value)
    details = getattr(error, "details", None)
    payload = details.get("error", details) if isinstance(details, dict) else None
    for item in (payload or {}).get("details", []) if isinstance(payload, dict) else []:
        if isinstance(item, dict) and "retryDelay" in item:
            match = re.fullmatch(r"\s*([0-9.]+)s\s*", str(item["retryDelay"]))
            if match:
                return float(match.group(1))
    return None


def _transient_exception_types() -> tuple[type[BaseException], ...]:
    """Time-outs and dropped connections of whichever HTTP library the SDK uses (httpx or httpx2)."""
    types_: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TimeoutException", "NetworkError", "RemoteProtocolError"):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                types_.append(cls)
    try:
        import aiohttp  # optional: the SDK uses it only where it is installed

        types_.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types_)


_TRANSIENT_EXCEPTIONS = _transient_exception_types()


def _open_cache(uri: str):
    """The answer cache's storage, or None (with a warning) when it cannot be opened: no cache, but no failure."""
    try:
        return Storage.from_uri(uri)
    except Exception as e:
        logger.warning("gemini cache %s cannot be opened (%s); running without a cache", uri, e)
        return None


# -- the client ---------------------------------------------------------------------------------------
class GeminiClient:
    """A `google.genai.Client` with the retry, cache, concurrency and logging rules of the text stage."""

    def __init__(self, config: GeminiConfig | None = None):
        self.config = config if config is not None else GeminiConfig.from_env()
        self._semaphore = threading.BoundedSemaphore(self.config.max_concurrency)
        self._random = random.Random()
        self._genai = None
        self._genai_lock = threading.Lock()
        self._storage = None
        if self.config.cache_uri:
            self._storage = _open_cache(self.config.cache_uri)
        self._breaker_lock = threading.Lock()
        self._breaker_failures = 0
        self._breaker_open_until = -float("inf")
        self._breaker_reason = ""

    def __repr__(self) -> str:  # never shows the key
        return f"GeminiClient(available={self.available}, base_url={self.config.base_url!r}, fast={self.config.fast})"

    @property
    def available(self) -> bool:
        key = self.config.api_key
        return key is not None and bool(key.get_secret_value().strip())

    def model_for(self, stage: str) -> str:
        return self.config.model_for(stage)

    def _redact(self, text: str) -> str:
        key = self.config.api_key.get_secret_value().strip() if self.config.api_key is not None else ""
        return redact(text, [key])

    # -- circuit breaker -------------------------------------------------------------------------------
    def _check_breaker(self, stage: str) -> None:
        with self._breaker_lock:
            left = self._breaker_open_until - time.monotonic()
            if left > 0:
                raise GeminiCircuitOpen(f"{stage}: Gemini is not called for {left:.0f} s more after "
                                        f"{self._breaker_failures} failures in a row ({self._breaker_reason})")

    def _breaker_record(self, failure: str | None) -> None:
        """`failure`: why an auth or quota failure happened; None: a call succeeded (the count restarts)."""
        with self._breaker_lock:
            if failure is None:
                self._breaker_failures = 0
                return
            self._breaker_failures += 1
            self._breaker_reason = failure
            if self._breaker_failures >= self.config.breaker_failures:
                self._breaker_open_until = time.monotonic() + self.config.breaker_cooldown_s
                logger.warning("gemini circuit breaker open for %.0fs after %d failures in a row (%s)",
                               self.config.breaker_cooldown_s, self._breaker_failures, failure)

    # -- the SDK client, built on first use ------------------------------------------------------------
    def _sdk(self):
        if not self.available:
            raise GeminiUnavailable("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) to use Gemini")
        with self._genai_lock:
            if self._genai is None:
                http_options = types.HttpOptions(
                    base_url=self.config.base_url,
                    api_version=self.config.api_version,
                    timeout=max(1, int(self.config.timeout_s * 1000)),  # milliseconds
                )
                # vertexai=False: a stray GOOGLE_GENAI_USE_VERTEXAI must not send us to another API.
                self._genai = genai.Client(
                    api_key=self.config.api_key.get_secret_value().strip(),
                    vertexai=False,
                    http_options=http_options,
                )
            return self._genai

    # -- public API ------------------------------------------------------------------------------------
    def generate(
        self,
        stage: Stage,
        parts: Sequence[Part],
        schema: type[T],
        *,
        system_instruction: str,
        prompt_version: str,
        use_cache: bool = True,
        deadline_at: float | None = None,
    ) -> GeminiAnswer[T]:
        """Ask the stage's model for an answer in `schema`; raises `GeminiError` when none can be had.

        The call ends by `deadline_at` (a `time.monotonic()` instant; default: now + the stage's deadline),
        whatever happens upstream; a caller that asks several times (the L2 re-ask) passes one instant."""
        model = self.model_for(stage)
        if not self.available:
            raise GeminiUnavailable("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) to use Gemini")
        if deadline_at is None:
            deadline_at = time.monotonic() + self.config.deadline_for(stage)
        encoded = self._encode_parts(parts)
        cache_key = self._cache_key(stage, model, prompt_version, schema, system_instruction, encoded)
        if use_cache:
            cached = self._cache_read(cache_key, schema)
            if cached is not None:
                logger.info(
                    "gemini stage=%s model=%s cache=hit key=%s", stage, model, cache_key.rsplit("/", 1)[-1][:12]
                )
                return GeminiAnswer(value=cached, model=model, stage=stage, from_cache=True)
        self._check_breaker(stage)
        answer = self._call_with_retries(stage, model, encoded, schema, system_instruction, deadline_at)
        if use_cache:
            self._cache_write(cache_key, answer.value, model, stage, prompt_version)
        return answer

    # -- request building ------------------------------------------------------------------------------
    def _encode_parts(self, parts: Sequence[Part]) -> _Encoded:
        encoded = _Encoded(parts=[])
        for part in parts:
            if isinstance(part, Image.Image):
                data, mime = _encode_image(part, self.config.max_image_side)
                encoded.parts.append(types.Part.from_bytes(data=data, mime_type=mime))
                encoded.fingerprint.append("image:" + image_hash(part))
            elif isinstance(part, str):
                encoded.parts.append(types.Part.from_text(text=part))
                encoded.fingerprint.append("text:" + hashlib.sha256(part.encode()).hexdigest())
            else:
                raise TypeError(f"a Gemini request part must be str or PIL.Image.Image, not {type(part).__name__}")
        return encoded

    def _generation_config(self, schema: type[BaseModel], system_instruction: str, timeout_s: float):
        return types.GenerateContentConfig(
            system_instruction=system_instruction,
            temperature=self.config.temperature,
            response_mime_type="application/json",
            response_schema=schema,
            # each read waits at most what is left of the call's deadline
            http_options=types.HttpOptions(timeout=max(1, int(min(self.config.timeout_s, timeout_s) * 1000))),
        )

    # -- retries ---------------------------------------------------------------------------------------
    def _backoff_s(self, retry_index: int, hint_s: float | None) -> float:
        """Exponential backoff with jitter: the randomised part spreads out clients that failed together."""
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * (2**retry_index))
        jitter = self.config.backoff_jitter
        delay = base * (1 - jitter) + base * jitter * self._random.random()
        if hint_s is not None:  # honoured in full: the deadline check decides whether it can be waited for
            delay = max(delay, hint_s)
        return delay

    def _call_with_retries(self, stage, model, encoded, schema, system_instruction, deadline_at) -> GeminiAnswer:
        transient_failures = 0
        bad_answers = 0
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            hint_s: float | None = None
            left = deadline_at - time.monotonic()
            if left <= 0:
                raise GeminiDeadline(f"{stage}: no answer within the call's deadline ({attempt - 1} attempts)")
            try:
                answer = self._call_once_within(stage, model, encoded, schema, system_instruction, attempt, left)
                answer.attempts = attempt
                answer.latency_s = time.monotonic() - started
                self._breaker_record(None)
                return answer
            except GeminiBadAnswer as e:
                bad_answers += 1
                if bad_answers > self.config.max_bad_answer_retries:
                    raise GeminiBadAnswer(f"{stage}: {e} (after {attempt} attempts)") from e
                logger.warning(
                    "gemini stage=%s model=%s attempt=%d bad answer, asking again: %s", stage, model, attempt, e
                )
                continue  # a bad answer is not a load problem: no backoff
            except GeminiError:
                raise
            except genai_errors.APIError as e:
                message = self._redact(f"{e.message or ''}")[:300]
                if e.code not in RETRYABLE_STATUS:
                    if e.code in (401, 403):
                        self._breaker_record(f"HTTP {e.code}")
                    raise GeminiRequestError(
                        f"{stage}: Gemini refused the request with HTTP {e.code} {e.status or ''}: {message}; "
                        "check the API key, the model name and the base URL", code=e.code
                    ) from None
                reason = f"HTTP {e.code} {e.status or ''}".strip()
                hint_s = _retry_delay_hint(e)
                last_error: Exception = e
            except _TRANSIENT_EXCEPTIONS as e:
                reason = self._redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:300]
                last_error = e
            except Exception as e:  # the SDK raised something we did not foresee: fail over, do not crash
                raise GeminiError(f"{stage}: the Gemini SDK failed: {type(e).__name__}: {self._redact(str(e))[:300]}") from None
            transient_failures += 1
            quota = getattr(last_error, "code", None) == 429
            if transient_failures > self.config.max_retries:
                if quota:
                    self._breaker_record("HTTP 429: quota or rate limit")
                raise GeminiRetriesExhausted(
                    f"{stage}: Gemini still failing after {attempt} attempts ({reason})"
                ) from None
            delay = self._backoff_s(transient_failures - 1, hint_s)
            left = deadline_at - time.monotonic()
            if delay >= left:
                if quota:
                    self._breaker_record("HTTP 429: quota or rate limit")
                raise GeminiDeadline(
                    f"{stage}: Gemini failed ({reason}) and the next try (in {delay:.1f} s) would pass the call's "
                    f"deadline ({max(0.0, left):.1f} s left)"
                ) from None
            logger.warning(
                "gemini stage=%s model=%s attempt=%d failed (%s); retrying in %.2fs",
                stage,
                model,
                attempt,
                reason,
                delay,
            )
            time.sleep(delay)

    def _call_once_within(self, stage, model, encoded, schema, system_instruction, attempt, left_s) -> GeminiAnswer:
        """One attempt, given up at `left_s` seconds: the HTTP request runs in a daemon thread (a silent or
        trickling upstream cannot hold the caller, nor its concurrency slot, past the deadline)."""
        if not self._semaphore.acquire(timeout=left_s):
            raise GeminiDeadline(f"{stage}: no free Gemini slot within the call's deadline")
        outcome: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["answer"] = self._call_once(stage, model, encoded, schema, system_instruction, attempt, left_s)
            except BaseException as e:  # noqa: BLE001 — handed to the waiting caller
                outcome["error"] = e
            finally:
                done.set()

        try:
            threading.Thread(target=run, name=f"gemini-{stage}", daemon=True).start()
            finished = done.wait(left_s)
        finally:
            self._semaphore.release()  # the slot is the caller's: given back when it stops waiting
        if not finished:
            raise GeminiDeadline(f"{stage}: Gemini did not finish answering within the call's deadline "
                                 f"({left_s:.1f} s left at attempt {attempt})")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]

    def _call_once(self, stage, model, encoded, schema, system_instruction, attempt, left_s) -> GeminiAnswer:
        sdk = self._sdk()
        config = self._generation_config(schema, system_instruction, left_s)
        t0 = time.monotonic()
        response = sdk.models.generate_content(model=model, contents=encoded.parts, config=config)
        latency = time.monotonic() - t0
        usage = getattr(response, "usage_metadata", None)
        prompt_tokens = getattr(usage, "prompt_token_count", None)
        output_tokens = getattr(usage, "candidates_token_count", None)
        thinking_tokens = getattr(usage, "thoughts_token_count", None)
        logger.info(
            "gemini stage=%s model=%s attempt=%d latency_ms=%.0f prompt_tokens=%s output_tokens=%s thinking_tokens=%s",
            stage,
            model,
            attempt,
            latency * 1000,
            prompt_tokens,
            output_tokens,
            thinking_tokens,
        )
        text = _answer_text(response)
        limit = getattr(self.config.max_answer_chars, stage)
        if len(text) > limit:
            raise GeminiBadAnswer(f"Gemini's answer is {len(text)} characters; at most {limit} are accepted")
        value = _parse_answer(text, schema)
        return GeminiAnswer(
            value=value, model=model, stage=stage, prompt_tokens=prompt_tokens, output_tokens=output_tokens
        )

    # -- cache -----------------------------------------------------------------------------------------
    def _cache_key(self, stage, model, prompt_version, schema, system_instruction, encoded: _Encoded) -> str:
        identity = {
            "stage": stage,
            "model": model,
            "prompt_version": prompt_version,
            "schema": json.dumps(schema.model_json_schema(), sort_keys=True),
            "system": hashlib.sha256(system_instruction.encode()).hexdigest(),
            "parts": encoded.fingerprint,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        safe_model = re.sub(r"[^A-Za-z0-9._-]", "_", model)
        return f"gemini-cache/{stage}/{safe_model}/{digest}.json"

    def _cache_read(self, key: str, schema: type[T]) -> T | None:
        if self._storage is None:
            return None
        try:
            if not self._storage.exists(key):
                return None
            entry = self._storage.read_json(key)
            return schema.model_validate(entry["answer"])
        except Exception as e:  # a broken cache entry costs one call, never the job
            logger.warning("gemini cache entry %s unreadable (%s); calling Gemini", key, e)
            return None

    def _cache_write(self, key: str, value: BaseModel, model: str, stage: str, prompt_version: str) -> None:
        if self._storage is None:
            return
        entry = {
            "stage": stage,
            "model": model,
            "prompt_version": prompt_version,
            "answer": value.model_dump(mode="json"),
        }
        try:
            self._storage.write_json(key, entry)
        except Exception as e:
            logger.warning("gemini cache write %s failed (%s); the answer is still used", key, e)


# -- answer parsing -----------------------------------------------------------------------------------
def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value)).upper()


def _answer_text(response: Any) -> str:
    """The answer's text, or the reason there is none (blocked, empty)."""
    feedback = getattr(response, "prompt_feedback", None)
    block_reason = _enum_name(getattr(feedback, "block_reason", None))
    if block_reason and block_reason != "BLOCKED_REASON_UNSPECIFIED":
        raise GeminiBlocked(f"Gemini blocked the prompt ({block_reason})")
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        raise GeminiBadAnswer("Gemini answered with no candidates")
    candidate = candidates[0]
    finish = _enum_name(getattr(candidate, "finish_reason", None))
    if finish in _BLOCK_REASONS:
        raise GeminiBlocked(f"Gemini blocked the answer (finish reason {finish})")
    content = getattr(candidate, "content", None)
    parts = getattr(content, "parts", None) or []
    # Thinking models may add thought parts; only the answer parts carry the JSON.
    text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
    if not text.strip():
        raise GeminiBadAnswer(f"Gemini answered with an empty candidate (finish reason {finish})")
    if finish == "MAX_TOKENS":
        raise GeminiBadAnswer("Gemini's answer was cut off at the token limit")
    return text


def _strip_code_fence(text: str) -> str:
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, flags=re.DOTALL)
    return match.group(1) if match else text


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", flags=re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON value of an answer: the whole text, else the first fenced block that parses, else the first
    {...} object in the prose around it. Raises json.JSONDecodeError when there is none."""
    try:
        return json.loads(_strip_code_fence(text))
    except json.JSONDecodeError as first_error:
        for block in _FENCE.findall(text):
            try:
                return json.loads(block)
            except json.JSONDecodeError:
                continue
        decoder = json.JSONDecoder()
        for match in re.finditer(r"\{", text):
            try:
                value, _ = decoder.raw_decode(text, match.start())
                return value
            except json.JSONDecodeError:
                continue
        raise first_error


def _parse_answer(text: str, schema: type[T]) -> T:
    try:
        data = extract_json(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" ({e.msg} at char {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
        raise GeminiBadAnswer(f"Gemini's answer is not JSON{where}: {redact(text[:120])!r}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise GeminiBadAnswer(
            f"Gemini's answer does not fit {schema.__name__}: {e.error_count()} errors, first: {e.errors()[0]['msg']}"
        ) from e


def default_client() -> GeminiClient:
    """A client configured from the environment; `.available` is False without a key."""
    return GeminiClient(GeminiConfig.from_env())

"""The Gemini client: one `google.genai.Client`, structured JSON answers, retries, a cache, a concurrency cap.

Every stage of the text stage (captions, L1 profile, L2 rewrite, judge) calls `GeminiClient.generate`, which

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

from PIL import Image
from pydantic import BaseModel, Field, SecretStr, ValidationError

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


# -- configuration ------------------------------------------------------------------------------------
class StageModels(BaseModel):
    caption: str = DEFAULT_MODEL
    profile: str = DEFAULT_MODEL
    rewrite: str = DEFAULT_MODEL
    judge: str = DEFAULT_MODEL


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

    def model_for(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown Gemini stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.fast_model if self.fast else getattr(self.models, stage)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "GeminiConfig":
        """Read the configuration from environment variables.

        GEMINI_API_KEY (or GOOGLE_API_KEY), GEMINI_BASE_URL (or GOOGLE_GEMINI_BASE_URL), KLEIN_GEMINI_FAST=1,
        KLEIN_GEMINI_MODEL_{CAPTION,PROFILE,REWRITE,JUDGE}, KLEIN_GEMINI_FAST_MODEL, KLEIN_GEMINI_TIMEOUT_S,
        KLEIN_GEMINI_MAX_RETRIES, KLEIN_GEMINI_MAX_CONCURRENCY, KLEIN_GEMINI_CACHE_URI. Keyword arguments win.
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
        for name, var in (
            ("timeout_s", "KLEIN_GEMINI_TIMEOUT_S"),
            ("max_retries", "KLEIN_GEMINI_MAX_RETRIES"),
            ("max_concurrency", "KLEIN_GEMINI_MAX_CONCURRENCY"),
            ("cache_uri", "KLEIN_GEMINI_CACHE_URI"),
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
    """Gemini's 429 answers carry google.rpc.RetryInfo {retryDelay: "3s"}; honour it when present."""
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
        import aiohttp

        types_.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types_)


_TRANSIENT_EXCEPTIONS = _transient_exception_types()


def _open_cache(uri: str):
    """The answer cache's storage, or None (with a warning) when it cannot be opened: no cache, but no failure."""
    from cluster.storage import Storage

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

    def __repr__(self) -> str:  # never shows the key
        return f"GeminiClient(available={self.available}, base_url={self.config.base_url!r}, fast={self.config.fast})"

    @property
    def available(self) -> bool:
        key = self.config.api_key
        return key is not None and bool(key.get_secret_value().strip())

    def model_for(self, stage: str) -> str:
        return self.config.model_for(stage)

    # -- the SDK client, built on first use ------------------------------------------------------------
    def _sdk(self):
        if not self.available:
            raise GeminiUnavailable("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) to use Gemini")
        with self._genai_lock:
            if self._genai is None:
                from google import genai
                from google.genai import types

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
    ) -> GeminiAnswer[T]:
        """Ask the stage's model for an answer in `schema`; raises `GeminiError` when none can be had."""
        model = self.model_for(stage)
        if not self.available:
            raise GeminiUnavailable("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) to use Gemini")
        encoded = self._encode_parts(parts)
        cache_key = self._cache_key(stage, model, prompt_version, schema, system_instruction, encoded)
        if use_cache:
            cached = self._cache_read(cache_key, schema)
            if cached is not None:
                logger.info(
                    "gemini stage=%s model=%s cache=hit key=%s", stage, model, cache_key.rsplit("/", 1)[-1][:12]
                )
                return GeminiAnswer(value=cached, model=model, stage=stage, from_cache=True)
        answer = self._call_with_retries(stage, model, encoded, schema, system_instruction)
        if use_cache:
            self._cache_write(cache_key, answer.value, model, stage, prompt_version)
        return answer

    # -- request building ------------------------------------------------------------------------------
    def _encode_parts(self, parts: Sequence[Part]) -> _Encoded:
        from google.genai import types

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

    def _generation_config(self, schema: type[BaseModel], system_instruction: str):
        from google.genai import types

        return types.GenerateContentConfig(
            system_instruction=system_instruction,
            temperature=self.config.temperature,
            response_mime_type="application/json",
            response_schema=schema,
        )

    # -- retries ---------------------------------------------------------------------------------------
    def _backoff_s(self, retry_index: int, hint_s: float | None) -> float:
        """Exponential backoff with jitter: the randomised part spreads out clients that failed together."""
        base = min(self.config.backoff_max_s, self.config.backoff_initial_s * (2**retry_index))
        jitter = self.config.backoff_jitter
        delay = base * (1 - jitter) + base * jitter * self._random.random()
        if hint_s is not None:
            delay = max(delay, min(hint_s, self.config.backoff_max_s))
        return delay

    def _call_with_retries(self, stage, model, encoded, schema, system_instruction) -> GeminiAnswer:
        from google.genai import errors as genai_errors

        transient_failures = 0
        bad_answers = 0
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            hint_s: float | None = None
            try:
                answer = self._call_once(stage, model, encoded, schema, system_instruction, attempt)
                answer.attempts = attempt
                answer.latency_s = time.monotonic() - started
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
                if e.code not in RETRYABLE_STATUS:
                    raise GeminiRequestError(
                        f"{stage}: Gemini refused the request with HTTP {e.code} {e.status or ''}: {e.message or e}; "
                        "check the API key, the model name and the base URL"
                    ) from e
                reason = f"HTTP {e.code} {e.status or ''}".strip()
                hint_s = _retry_delay_hint(e)
                last_error: Exception = e
            except _TRANSIENT_EXCEPTIONS as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                last_error = e
            except Exception as e:  # the SDK raised something we did not foresee: fail over, do not crash
                raise GeminiError(f"{stage}: the Gemini SDK failed: {type(e).__name__}: {e}") from e
            transient_failures += 1
            if transient_failures > self.config.max_retries:
                raise GeminiRetriesExhausted(
                    f"{stage}: Gemini still failing after {attempt} attempts ({reason})"
                ) from last_error
            delay = self._backoff_s(transient_failures - 1, hint_s)
            logger.warning(
                "gemini stage=%s model=%s attempt=%d failed (%s); retrying in %.2fs",
                stage,
                model,
                attempt,
                reason,
                delay,
            )
            time.sleep(delay)

    def _call_once(self, stage, model, encoded, schema, system_instruction, attempt) -> GeminiAnswer:
        sdk = self._sdk()
        config = self._generation_config(schema, system_instruction)
        t0 = time.monotonic()
        with self._semaphore:  # only the HTTP request counts against the limit, not the backoff sleeps
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


def _parse_answer(text: str, schema: type[T]) -> T:
    try:
        data = json.loads(_strip_code_fence(text))
    except json.JSONDecodeError as e:
        raise GeminiBadAnswer(f"Gemini's answer is not JSON ({e.msg} at char {e.pos}): {text[:120]!r}") from e
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise GeminiBadAnswer(
            f"Gemini's answer does not fit {schema.__name__}: {e.error_count()} errors, first: {e.errors()[0]['msg']}"
        ) from e


def default_client() -> GeminiClient:
    """A client configured from the environment; `.available` is False without a key."""
    return GeminiClient(GeminiConfig.from_env())

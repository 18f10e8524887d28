"""Typed clients of the Klein Style HTTP API: `Client` (sync) and `AsyncClient` (asyncio), on httpx.

    from klein_style_client import Client

    with Client("http://127.0.0.1:8000", api_key="ks_...") as client:
        png = client.generate_png("a lighthouse", lora_id="j-...", steps=28)

Every method sends one request and returns the response's model (`klein_style_client.models`), bytes or text.
A refusal the service marks as temporary (429 and 503, which carry `Retry-After`) and a connection that could not
be opened are retried, waiting what `Retry-After` says (else an exponential backoff), at most `max_retries` times
and never past the call's deadline (`timeout`: seconds for the whole call, retries and waits included). When the
next wait would end past the deadline the call fails at once with the last error: retries never extend it.
Any other failure raises `ApiError` (the service's `{error, detail, field}`) or `TransportError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from klein_style_client.models import (
    Deleted, ErrorBody, GenerateBody, GenerateResult, Health, ImportedLora, LoraList, LoraRef, LoraStatus,
    ProfileBody, ProfileResult, Submission, TrainSourceBody,
)

__all__ = ["Client", "AsyncClient", "KleinStyleError", "ApiError", "TransportError", "RETRY_STATUSES"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
RETRY_STATUSES = frozenset({429, 503})  # refused before any work was done; the answer says when to come back
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})
FileLike = bytes | str | os.PathLike


class KleinStyleError(Exception):
    """Base of the client's errors."""


class ApiError(KleinStyleError):
    """The service answered an error: its HTTP status and its JSON error body ({error, detail, field})."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None, *,
                 request_id: str | None = None, retry_after: float | None = None, body: Any = None):
        self.status, self.error, self.detail, self.field = status, error, detail, field
        self.request_id, self.retry_after, self.body = request_id, retry_after, body
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"HTTP {self.status} {self.error}: {self.detail}"
        if self.field:
            text += f" (field: {self.field})"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        if self.retry_after is not None:
            text += f"; retry after {self.retry_after:g} s"
        return text

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        retry_after = retry_after_s(response)
        try:
            body = ErrorBody.model_validate_json(response.content)
        except ValidationError:  # not ours (a proxy's plain-text answer, say): keep what there is
            text = response.text.strip()[:300] or response.reason_phrase
            return cls(response.status_code, f"http_{response.status_code}", text, retry_after=retry_after,
                       body=response.text)
        return cls(response.status_code, body.error, body.detail, body.field, request_id=body.request_id,
                   retry_after=retry_after, body=body)


class TransportError(KleinStyleError):
    """No answer: the connection failed, or the call's deadline passed while waiting for one."""


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (a number of seconds or an HTTP date), or None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Call(Generic[T]):
    """One request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict | None = None
    data: dict | None = None
    files: list | None = None
    idempotent: bool = False  # may be sent again after a connection broke mid-request
    retry: bool = True  # retry 429/503 (Retry-After) at all
    timeout: float | None = None  # this call's deadline, instead of the client's
    deadline_header: bool = False  # tell the service the time left (X-Request-Timeout)
    headers: dict = field(default_factory=dict)


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _file(value: FileLike, default_name: str) -> tuple[str, bytes]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return default_name, bytes(value)
    path = Path(value)
    return path.name, path.read_bytes()


def _lora_path(lora_id: str) -> str:
    if not lora_id or "/" in lora_id:
        raise ValueError(f"not a LoRA id: {lora_id!r}")
    return f"/v1/loras/{lora_id}"


class _Endpoints:
    """One method per endpoint; `Client` runs the calls, `AsyncClient` returns awaitables of the same results."""

    def _run(self, call: _Call[T]) -> T:  # pragma: no cover — each client defines it
        raise NotImplementedError

    # -- service ---------------------------------------------------------------------------------------------
    def health(self, *, wait: bool = False, timeout: float | None = None) -> Health:
        """GET /healthz. 503 (no Generator replica yet) raises ApiError, unless `wait`: then it is retried
        (Retry-After) until ready or until `timeout`."""
        return self._run(_Call("GET", "/healthz", _model(Health), idempotent=True, retry=wait, timeout=timeout))

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        return self._run(_Call("GET", "/metrics", lambda r: r.text, idempotent=True))

    # -- LoRAs ---------------------------------------------------------------------------------------------
    def list_loras(self) -> LoraList:
        """GET /v1/loras: the tenant's LoRAs and training jobs."""
        return self._run(_Call("GET", "/v1/loras", _model(LoraList), idempotent=True))

    def get_lora(self, lora_id: str) -> LoraStatus:
        """GET /v1/loras/{id}: status, progress, then metrics, health report and files once done."""
        return self._run(_Call("GET", _lora_path(lora_id), _model(LoraStatus), idempotent=True))

    def delete_lora(self, lora_id: str) -> Deleted:
        """DELETE /v1/loras/{id} (a running job is stopped)."""
        return self._run(_Call("DELETE", _lora_path(lora_id), _model(Deleted), idempotent=True))

    def download_file(self, lora_id: str, name: str) -> bytes:
        """GET /v1/loras/{id}/files/{name}: one of the names in `get_lora(id).files`."""
        return self._run(_Call("GET", f"{_lora_path(lora_id)}/files/{name}", lambda r: r.content, idempotent=True))

    def train(self, refs: FileLike, *, trigger: str = "zxy_style", variant: str | None = None,
              steps: int | None = None, rank: int | None = None, resolution: int | None = None) -> Submission:
        """POST /v1/loras (multipart): train a style LoRA on a zip of reference images (bytes or a path)."""
        name, data = _file(refs, "refs.zip")
        form = {"trigger": trigger, "variant": variant, "steps": steps, "rank": rank, "resolution": resolution}
        return self._run(_Call("POST", "/v1/loras", _model(Submission),
                               data={k: str(v) for k, v in form.items() if v is not None},
                               files=[("refs", (name, data, "application/zip"))]))

    def train_from_uri(self, source_uri: str, *, trigger: str = "zxy_style", variant: str | None = None,
                       steps: int | None = None, rank: int | None = None, linear_alpha: float | None = None,
                       optimizer: str | None = None, lr: float | None = None, resolution: int | None = None,
                       targets: str | None = None, seed: int | None = None) -> Submission:
        """POST /v1/loras (JSON): train on the reference images at an s3:// or gs:// URI."""
        body = TrainSourceBody(source_uri=source_uri, trigger=trigger, variant=variant, steps=steps, rank=rank,
                               linear_alpha=linear_alpha, optimizer=optimizer, lr=lr, resolution=resolution,
                               targets=targets, seed=seed)
        return self._run(_Call("POST", "/v1/loras", _model(Submission), json=body.model_dump(exclude_none=True)))

    def import_lora(self, lora: FileLike, *, trigger: str | None = None) -> ImportedLora:
        """POST /v1/loras/import: bring your own .safetensors LoRA (bytes or a path)."""
        name, data = _file(lora, "lora.safetensors")
        return self._run(_Call("POST", "/v1/loras/import", _model(ImportedLora),
                               data={"trigger": trigger} if trigger is not None else None,
                               files=[("lora", (name, data, "application/octet-stream"))]))

    # -- generate ------------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, lora_id: str | None = None, loras: Sequence[LoraRef | dict] | None = None,
                 fusion: Literal["linear", "klora"] = "linear", width: int | None = None, height: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 use_gemini: Literal["auto", "on", "off"] = "auto", negative_prompt: str = "") -> GenerateResult:
        """POST /v1/generate (`response: json`): the image (`.image_bytes()`) and what was drawn, with which LoRAs."""
        body = GenerateBody(prompt=prompt, lora_id=lora_id, loras=loras, fusion=fusion, width=width, height=height,
                            steps=steps, guidance=guidance, seed=seed, use_gemini=use_gemini,
                            negative_prompt=negative_prompt, response="json")
        return self._run(self._generate_call(body, _model(GenerateResult)))

    def generate_png(self, prompt: str, *, lora_id: str | None = None, loras: Sequence[LoraRef | dict] | None = None,
                     fusion: Literal["linear", "klora"] = "linear", width: int | None = None,
                     height: int | None = None, steps: int | None = None, guidance: float | None = None,
                     seed: int = 0, use_gemini: Literal["auto", "on", "off"] = "auto",
                     negative_prompt: str = "") -> bytes:
        """POST /v1/generate (`response: png`): the PNG's bytes."""
        body = GenerateBody(prompt=prompt, lora_id=lora_id, loras=loras, fusion=fusion, width=width, height=height,
                            steps=steps, guidance=guidance, seed=seed, use_gemini=use_gemini,
                            negative_prompt=negative_prompt, response="png")
        return self._run(self._generate_call(body, lambda r: r.content))

    @staticmethod
    def _generate_call(body: GenerateBody, parse: Callable[[httpx.Response], T]) -> _Call[T]:
        # a seeded image is the same image twice: safe to send again; the service learns the deadline left
        return _Call("POST", "/v1/generate", parse, json=body.model_dump(mode="json", exclude_none=True),
                     idempotent=True, deadline_header=True)

    # -- style profile -------------------------------------------------------------------------------------
    def style_profile(self, lora_id: str, *, use_gemini: Literal["auto", "on", "off"] = "auto") -> ProfileResult:
        """POST /v1/style-profile (JSON): the L1 style profile stored with a LoRA."""
        body = ProfileBody(lora_id=lora_id, use_gemini=use_gemini)
        return self._run(_Call("POST", "/v1/style-profile", _model(ProfileResult), json=body.model_dump(),
                               idempotent=True))

    def style_profile_from_images(self, images: Sequence[FileLike], *,
                                  use_gemini: Literal["auto", "on", "off"] = "auto") -> ProfileResult:
        """POST /v1/style-profile (multipart): a profile extracted from 1–10 pictures (bytes or paths)."""
        files = [("images", (*_file(image, f"image{i}.png"), "application/octet-stream"))
                 for i, image in enumerate(images)]
        return self._run(_Call("POST", "/v1/style-profile", _model(ProfileResult), data={"use_gemini": use_gemini},
                               files=files, idempotent=True))


class _Policy:
    """The retry rules both clients share."""

    def __init__(self, timeout: float, max_retries: int, backoff_s: float):
        if timeout <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError("timeout must be > 0, max_retries >= 0 and backoff_s >= 0")
        self.timeout, self.max_retries, self.backoff_s = timeout, max_retries, backoff_s

    def deadline(self, call: _Call) -> float:
        return time.monotonic() + (call.timeout if call.timeout is not None else self.timeout)

    def request_options(self, call: _Call, deadline: float) -> dict:
        left = deadline - time.monotonic()
        headers = dict(call.headers)
        if call.deadline_header:
            headers["X-Request-Timeout"] = f"{max(left, 0.001):.3f}"
        return {"json": call.json, "data": call.data, "files": call.files, "headers": headers,
                "timeout": httpx.Timeout(max(left, 0.001))}

    def wait_after_error(self, call: _Call, attempt: int, error: Exception) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, ApiError):
            if not call.retry or error.status not in RETRY_STATUSES:
                return None
            return error.retry_after if error.retry_after is not None else self.backoff_s * 2 ** attempt
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):  # the request never left
            return self.backoff_s * 2 ** attempt
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)) and \
                (call.idempotent or call.method in _IDEMPOTENT):
            return self.backoff_s * 2 ** attempt
        return None

    @staticmethod
    def result(call: _Call[T], response: httpx.Response) -> T:
        if response.is_success:
            return call.parse(response)
        raise ApiError.from_response(response)

    @staticmethod
    def no_answer(error: httpx.TransportError, deadline: float, call: _Call) -> TransportError:
        what = "no answer within the call's deadline" if time.monotonic() >= deadline - 0.01 else "no answer"
        return TransportError(f"{call.method} {call.path}: {what} ({type(error).__name__}: {error})")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Endpoints):
    """Synchronous client. `timeout`: seconds for a whole call, retries included; `max_retries`: retries of a
    call (429/503 after their Retry-After, connection failures after a backoff). Extra keyword arguments go to
    `httpx.Client` (e.g. `transport`, `event_hooks`, `verify`)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0, max_retries: int = 4,
                 backoff_s: float = 0.5, **httpx_options: Any):
        self._policy = _Policy(timeout, max_retries, backoff_s)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key), **httpx_options)

    def _run(self, call: _Call[T]) -> T:
        deadline = self._policy.deadline(call)
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **self._policy.request_options(call, deadline))
                return self._policy.result(call, response)
            except (ApiError, httpx.TransportError) as error:
                wait = self._policy.wait_after_error(call, attempt, error)
                if wait is None or time.monotonic() + wait >= deadline:  # retries never extend the deadline
                    if isinstance(error, ApiError):
                        raise
                    raise self._policy.no_answer(error, deadline, call) from error
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Endpoints):
    """The asyncio client: the same methods as `Client`, each returning an awaitable of the same result.

        async with AsyncClient(url, api_key=key) as client:
            result = await client.generate("a lighthouse", lora_id=lora_id)
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0, max_retries: int = 4,
                 backoff_s: float = 0.5, **httpx_options: Any):
        self._policy = _Policy(timeout, max_retries, backoff_s)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key), **httpx_options)

    async def _run(self, call: _Call[T]) -> T:  # type: ignore[override]
        deadline = self._policy.deadline(call)
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path,
                                                    **self._policy.request_options(call, deadline))
                return self._policy.result(call, response)
            except (ApiError, httpx.TransportError) as error:
                wait = self._policy.wait_after_error(call, attempt, error)
                if wait is None or time.monotonic() + wait >= deadline:
                    if isinstance(error, ApiError):
                        raise
                    raise self._policy.no_answer(error, deadline, call) from error
            await asyncio.sleep(wait)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

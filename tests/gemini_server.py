"""A local HTTP server that speaks Gemini's `generateContent` REST protocol, scriptable per test.

The real `google.genai` client talks to it through `base_url`: requests arrive as
`POST /v1beta/models/{model}:generateContent` with `contents[].parts[]` (text, or images as `inline_data`),
and answers go back as `candidates[].content.parts[]`. Tests queue what the server does next:

    server.push_json({"caption": "a cat on a sofa"})     # a normal answer
    server.push_status(429)                              # rate limit (google.rpc error body)
    server.push_delay(2.0)                               # sleep longer than the client's time-out
    server.push_silent()                                 # accept, then never answer (until stop)
    server.push_trickle(0.5, {"caption": "..."})         # send the answer one byte every 0.5 s
    server.push_status(429, retry_after=3)               # with a Retry-After header
    server.push_text("{not json")                        # malformed JSON
    server.push_empty_candidate() / push_blocked()       # no content / safety block

When the queue is empty, `responder(request)` answers (a callable set by the test), else HTTP 500.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

_PATH = re.compile(r"^/(?P<version>v1beta|v1)/models/(?P<model>[^/:]+):generateContent$")

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass
class RecordedRequest:
    path: str
    version: str
    model: str
    headers: dict[str, str]
    body: dict[str, Any]
    texts: list[str] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime type, decoded bytes)
    received_at: float = field(default_factory=time.monotonic)  # when its body was read (time.monotonic)

    @property
    def schema(self) -> dict[str, Any]:
        config = self.body.get("generationConfig", {})
        return config.get("responseSchema") or config.get("responseJsonSchema") or {}

    @property
    def schema_title(self) -> str:
        return str(self.schema.get("title", ""))

    @property
    def system_text(self) -> str:
        system = self.body.get("systemInstruction") or self.body.get("system_instruction") or {}
        return "".join(p.get("text", "") for p in system.get("parts", []))

    @property
    def prompt_text(self) -> str:
        return "\n".join(self.texts)


@dataclass
class Action:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> raw text
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    trickle_s: float = 0.0  # > 0: headers at once, then the body one byte at a time, this far apart
    silent: bool = False  # never answer (the connection stays open until the server stops)


Responder = Callable[[RecordedRequest], Any]


def candidate_answer(
    payload: Any, *, finish_reason: str = "STOP", prompt_tokens: int = 100, output_tokens: int = 20
) -> dict:
    """A successful `generateContent` body whose single text part is `payload` (JSON-encoded unless a str)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish_reason, "index": 0}
        ],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
        },
        "modelVersion": "local-protocol-server",
    }


def error_body(code: int, message: str | None = None, retry_delay: str | None = None) -> dict:
    status = _STATUS_NAMES.get(code, "UNKNOWN")
    error: dict[str, Any] = {"code": code, "message": message or f"scripted {status}", "status": status}
    if retry_delay is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return {"error": error}


class GeminiProtocolServer:
    """Start with `with GeminiProtocolServer() as server:` or `.start()` / `.stop()`."""

    def __init__(self, responder: Responder | None = None):
        self.responder = responder
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Action | Responder] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "GeminiProtocolServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self)

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="gemini-protocol-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a scripted delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> "GeminiProtocolServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start the server first"
        return f"http://127.0.0.1:{self._httpd.server_port}"

    # -- scripting -------------------------------------------------------------------------------------
    def push(self, action: Action | Responder) -> None:
        with self._lock:
            self._queue.append(action)

    def push_json(self, payload: Any, **kwargs: Any) -> None:
        self.push(Action(body=candidate_answer(payload, **kwargs)))

    def push_text(self, text: str) -> None:
        """An answer whose text part is `text` verbatim (e.g. malformed JSON)."""
        self.push(Action(body=candidate_answer(text)))

    def push_status(self, code: int, message: str | None = None, retry_delay: str | None = None,
                    retry_after: float | None = None) -> None:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        self.push(Action(status=code, body=error_body(code, message, retry_delay), headers=headers))

    def push_silent(self) -> None:
        """Read the request, then never answer: an upstream that stops talking."""
        self.push(Action(silent=True))

    def push_trickle(self, interval_s: float, then: Any = None) -> None:
        """Answer `then` (or {}) one byte every `interval_s`: each read gets data, the whole never comes in time."""
        self.push(Action(body=candidate_answer(then if then is not None else {}), trickle_s=interval_s))

    def push_delay(self, seconds: float, then: Any = None) -> None:
        """Sleep `seconds` before answering `then` (an answer payload) or an empty JSON object."""
        body = candidate_answer(then) if then is not None else candidate_answer({})
        self.push(Action(body=body, delay_s=seconds))

    def push_empty_candidate(self) -> None:
        self.push(Action(body={"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "STOP"}]}))

    def push_no_candidates(self) -> None:
        self.push(Action(body={"candidates": [], "usageMetadata": {"promptTokenCount": 10}}))

    def push_blocked(self, where: str = "prompt") -> None:
        """A safety block on the prompt (promptFeedback.blockReason) or on the answer (finishReason SAFETY)."""
        ratings = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]
        if where == "prompt":
            body = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": ratings}}
        else:
            body = {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": ratings}]}
        self.push(Action(body=body))

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- serving ---------------------------------------------------------------------------------------
    def _record(self, handler: BaseHTTPRequestHandler, raw: bytes) -> RecordedRequest | None:
        match = _PATH.match(handler.path.split("?", 1)[0])
        if match is None:
            return None
        body = json.loads(raw or b"{}")
        request = RecordedRequest(
            path=handler.path,
            version=match.group("version"),
            model=match.group("model"),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                if "text" in part:
                    request.texts.append(part["text"])
                inline = part.get("inline_data") or part.get("inlineData")
                if inline:
                    mime = inline.get("mime_type") or inline.get("mimeType")
                    request.images.append((mime, _b64decode(inline["data"])))
        with self._lock:
            self.requests.append(request)
        return request

    def _next_action(self, request: RecordedRequest) -> Action:
        with self._lock:
            item = self._queue.popleft() if self._queue else self.responder
        if item is None:
            return Action(status=500, body=error_body(500, "no scripted response left"))
        if isinstance(item, Action):
            return item
        result = item(request)
        return result if isinstance(result, Action) else Action(body=candidate_answer(result))

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        request = self._record(handler, raw)
        if request is None:
            self._send(handler, Action(status=404, body=error_body(404, f"unknown path {handler.path}")))
            return
        action = self._next_action(request)
        if action.silent:
            self._stopping.wait()
            return
        if action.delay_s and self._stopping.wait(action.delay_s):
            return
        self._send(handler, action, self._stopping)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, action: Action, stopping: threading.Event | None = None) -> None:
        data = action.body.encode() if isinstance(action.body, str) else json.dumps(action.body).encode()
        try:
            handler.send_response(action.status)
            handler.send_header("Content-Type", "application/json; charset=UTF-8")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in action.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            if action.trickle_s > 0:
                for i in range(len(data)):
                    handler.wfile.write(data[i : i + 1])
                    handler.wfile.flush()
                    if stopping is not None and stopping.wait(action.trickle_s):
                        return
            else:
                handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (time-out test): nothing to answer


TEST_API_KEY = "test-key-do-not-log-7f3a"


def client_for(server: GeminiProtocolServer, **overrides: Any):
    """A real `GeminiClient` pointed at `server`, with tiny backoffs so fault tests stay fast."""
    from gemini.client import GeminiClient, GeminiConfig

    settings: dict[str, Any] = dict(
        api_key=TEST_API_KEY,
        base_url=server.base_url,
        timeout_s=5,
        max_retries=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    settings.update(overrides)
    return GeminiClient(GeminiConfig(**settings))


def decode_image(data: bytes):
    """The PIL image a request carried."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _b64decode(data: str) -> bytes:
    """The SDK sends URL-safe base64; the REST docs show the standard alphabet. Accept both."""
    padded = data + "=" * (-len(data) % 4)
    return base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))

"""klein_style_client on its own: what importing it pulls in, and its retries, deadline and errors against a real
HTTP server on this machine that answers from a script (the live service's answers are in test_serve_http.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster.ports import free_port
from klein_style_client import ApiError, AsyncClient, Client, TransportError
from klein_style_client.models import LoraList

ROOT = Path(__file__).resolve().parents[1]
OURS_AND_HEAVY = {"torch", "ray", "diffusers", "transformers", "deepspeed", "numpy", "PIL", "google",
                  "serve", "klein", "cli", "train", "cluster", "gemini", "evaluation", "contracts"}
EMPTY_LIST = (200, {}, {"loras": []})


def test_the_client_imports_neither_torch_nor_ray_nor_the_service():
    code = "import json, sys, klein_style_client; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert {"klein_style_client", "httpx", "pydantic"} <= loaded
    assert not loaded & OURS_AND_HEAVY, sorted(loaded & OURS_AND_HEAVY)


class Scripted:
    """A local HTTP server answering each request with the next (status, headers, JSON or text body) of a script."""

    def __init__(self, answers: list[tuple[int, dict, object]]):
        self.answers, self.seen = list(answers), []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                scripted.seen.append({"at": time.monotonic(), "method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                status, headers, payload = scripted.answers.pop(0) if scripted.answers else (500, {}, "script ran out")
                data = payload if isinstance(payload, bytes) else \
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                kind = "application/json" if isinstance(payload, (dict, list)) else "text/plain"
                self.send_header("Content-Type", headers.pop("Content-Type", kind))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def gaps(self) -> list[float]:
        return [b["at"] - a["at"] for a, b in zip(self.seen, self.seen[1:])]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*answers):
        servers.append(Scripted(list(answers)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _error(error: str, detail: str = "try later", field=None) -> dict:
    return {"error": error, "detail": detail, "field": field}


def test_429_and_503_are_retried_after_their_retry_after(scripted):
    server = scripted((503, {"Retry-After": "1"}, _error("overloaded")),
                      (429, {"Retry-After": "1"}, _error("rate_limited")), EMPTY_LIST)
    with Client(server.url, api_key="ks_x", timeout=10, backoff_s=5) as client:  # a backoff would wait 5 s
        assert client.list_loras() == LoraList(loras=[])
    assert len(server.seen) == 3 and all(0.9 < gap < 2.5 for gap in server.gaps()), server.gaps()
    assert server.seen[0]["headers"]["Authorization"] == "Bearer ks_x"


def test_retries_never_extend_the_deadline(scripted):
    server = scripted((429, {"Retry-After": "30"}, _error("rate_limited")), EMPTY_LIST)
    started = time.monotonic()
    with Client(server.url, timeout=10) as client, pytest.raises(ApiError) as refused:
        client.list_loras()
    # 30 s would pass the deadline: no wait at all (waiting any of it, even up to the deadline, takes 10 s)
    assert time.monotonic() - started < 10 and len(server.seen) == 1
    assert refused.value.status == 429 and refused.value.retry_after == 30 and refused.value.error == "rate_limited"

    server = scripted(*[(503, {"Retry-After": "2"}, _error("overloaded"))] * 5)
    with Client(server.url, timeout=5.5, max_retries=10) as client, pytest.raises(ApiError, match="HTTP 503"):
        client.generate_png("a house")
    ended = time.monotonic()
    # attempts at 0, 2 and 4 s (and the round trips: half a second of slack for a loaded machine), each after the
    # Retry-After; the fourth would start past the 5.5 s deadline, so the call
    # ends on the third 503 without waiting its 2 s Retry-After (timed from that answer, not from the call's start,
    # so a loaded machine's slower round trips do not count)
    assert len(server.seen) == 3 and all(gap >= 1.9 for gap in server.gaps()), (len(server.seen), server.gaps())
    assert ended - server.seen[-1]["at"] < 2.0, ended - server.seen[-1]["at"]
    # the service hears how long the client will still wait, shorter on each attempt
    left = [float(seen["headers"]["X-Request-Timeout"]) for seen in server.seen]
    assert left[0] <= 5.5 and left[0] > left[1] > left[2] > 0, left


def test_errors_are_typed_and_not_retried(scripted):
    server = scripted((422, {}, _error("invalid_request", "width: must be a multiple of 16", "width")),
                      (502, {}, "Bad Gateway"), (404, {}, _error("not_found", "LoRA not found", "id")))
    with Client(server.url, backoff_s=0.01) as client:
        with pytest.raises(ApiError) as bad:
            client.generate("a house", width=70)
        assert (bad.value.status, bad.value.error, bad.value.field) == (422, "invalid_request", "width")
        assert str(bad.value) == "HTTP 422 invalid_request: width: must be a multiple of 16 (field: width)"
        with pytest.raises(ApiError) as proxy:  # not our JSON: the status and the text
            client.list_loras()
        assert proxy.value.error == "http_502" and proxy.value.detail == "Bad Gateway"
        with pytest.raises(ApiError, match="HTTP 404 not_found"):
            client.get_lora("j-nope")
        assert len(server.seen) == 3
        sent = json.loads(server.seen[0]["body"])  # unset options are left to the service's defaults
        assert sent["width"] == 70 and sent["response"] == "json" and "height" not in sent and "lora_id" not in sent


def test_a_refused_connection_is_retried_until_the_deadline():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", timeout=3.0, max_retries=50, backoff_s=0.5) as client, \
            pytest.raises(TransportError, match="GET /v1/loras"):
        client.list_loras()
    # retried after 0.5 and 1 s (sleeps never end early); the next backoff, 2 s, would end past the 3 s deadline, so
    # the call ends at about 1.5 s, with the rest of the deadline as room for a loaded machine's slower attempts
    assert 1.5 <= time.monotonic() - started < 3.0


def test_the_async_client_honours_retry_after_too(scripted):
    server = scripted((503, {"Retry-After": "1"}, _error("unavailable")), EMPTY_LIST,
                      (200, {"Content-Type": "image/png"}, b"\x89PNG..."))

    async def calls():
        async with AsyncClient(server.url, api_key="ks_x", timeout=10, backoff_s=5) as client:
            return await client.list_loras(), await client.generate_png("a house", seed=3)

    loras, png = asyncio.run(calls())
    assert loras.loras == [] and png == b"\x89PNG..."
    assert len(server.seen) == 3 and 0.9 < server.gaps()[0] < 2.5

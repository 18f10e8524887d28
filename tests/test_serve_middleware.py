"""The request limits' pure parts, without Ray: JSON depth, header-safe text, limits from the environment,
typed JSON bodies, the failed-auth bucket, and the body reader over a real uvicorn server (slow bodies)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request

from cluster.ports import free_port
from serve import middleware
from serve.errors import ApiError
from serve.middleware import Limits, header_safe, json_depth, parse_json_body
from serve.routers.generate import GenerateBody
from serve.tenants import TokenBucketLimiter


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[[[[\\\\"]]]"}') == 1  # brackets in strings, and escaped quotes, do not count
    assert json_depth(b"[" * 10_000 + b"]" * 10_000) == 10_000
    assert json_depth(b"") == 0


def test_header_safe_leaves_no_control_character():
    text = "a\r\nX-Evil: 1\x00\x1b[31m\x7f\x85é"
    safe = header_safe(text)
    assert all(32 <= ord(c) < 127 for c in safe), safe
    assert safe.startswith("a  X-Evil: 1") and safe.endswith("?")


def test_limits_from_the_environment_and_explicit_settings_win():
    limits = Limits.from_env({"body_idle_s": 3}, environ={"KLEIN_SERVE_BODY_TIMEOUT_S": "9",
                                                          "KLEIN_SERVE_BODY_IDLE_S": "7"})
    assert limits.body_timeout_s == 9 and limits.body_idle_s == 3
    with pytest.raises(ValueError, match="unknown request limits"):
        Limits.from_env({"body_timeout": 3}, environ={})
    with pytest.raises(ValueError, match="positive"):
        Limits.from_env({"max_json_depth": 0}, environ={})
    with pytest.raises(ValueError, match="KLEIN_SERVE_MAX_JSON_DEPTH must be a number"):
        Limits.from_env(environ={"KLEIN_SERVE_MAX_JSON_DEPTH": "deep"})


@pytest.mark.parametrize("body, field, match", [
    (b'{"prompt": "a", "steps": "1"}', "steps", "not a string"),
    (b'{"prompt": "a", "width": true}', "width", "not a boolean"),
    (b'{"prompt": "a", "lora_id": ""}', "lora_id", "at least 1 character"),
    (b'{"prompt": "a\\r\\nb"}', "prompt", "control characters"),
    (b'{"prompt": 5}', "prompt", "valid string"),
])
def test_strict_types_in_json_bodies(body, field, match):
    with pytest.raises(ApiError, match=match) as e:
        parse_json_body(body, GenerateBody)
    assert e.value.status == 422 and e.value.field == field


def test_json_bodies_that_are_not_json():
    with pytest.raises(ApiError) as e:
        parse_json_body(b'{"prompt": ', GenerateBody)
    assert e.value.status == 400 and e.value.error == "invalid_json"
    assert parse_json_body(b'{"prompt": "a", "steps": 2, "guidance": 1}', GenerateBody).steps == 2


def test_the_failed_auth_bucket_peeks_without_taking():
    now = [0.0]
    bucket = TokenBucketLimiter(1.0, 2, clock=lambda: now[0])
    assert bucket.peek("1.2.3.4") == 0.0
    assert bucket.try_acquire("1.2.3.4") == 0.0 and bucket.try_acquire("1.2.3.4") == 0.0
    assert bucket.peek("1.2.3.4") == pytest.approx(1.0) and bucket.peek("1.2.3.4") == pytest.approx(1.0)
    now[0] = 1.0
    assert bucket.peek("1.2.3.4") == 0.0


# -- the body reader over real HTTP (uvicorn, no Ray) -----------------------------------------------------------
@pytest.fixture(scope="module")
def echo_server():
    app = FastAPI()
    middleware.install(app)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        return {"bytes": len(body), "inflight": middleware.RUNTIME["inflight"]}

    saved = dict(middleware.RUNTIME)
    # the overall deadline well past the idle one, so that a loaded machine cannot blur which of them fired
    middleware.RUNTIME.update(limits=Limits(body_timeout_s=3.0, body_idle_s=0.7),
                              config=middleware.RUNTIME["config"].__class__(storage="/tmp", max_inflight_requests=2))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(5)
    middleware.RUNTIME.clear()
    middleware.RUNTIME.update(saved)


def _send(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
            if length and len(rest) >= length[0]:
                return data


def _post(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    length = len(body) if declared is None else declared
    return _send(port, f"POST /v1/echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
                       f"Content-Length: {length}\r\nConnection: close\r\n\r\n", body)


@pytest.mark.reliability("faults")
def test_a_stalled_body_gets_408_at_the_idle_deadline(echo_server):
    t0 = time.monotonic()
    answer = _answer(_post(echo_server, b"abc", declared=100))
    took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error":"timeout"' in answer and 0.6 < took < 2.5, took  # the idle deadline (0.7 s), not the overall (3 s)


@pytest.mark.reliability("faults")
def test_a_trickling_body_gets_408_at_the_overall_deadline(echo_server):
    sock = _post(echo_server, b"a", declared=100)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 5:
            sock.sendall(b"b")  # never idle for 0.7 s, never complete
            time.sleep(0.3)
    except OSError:
        pass  # the server answered and closed
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 5.5  # cut off at the overall deadline (3 s), not when the client stopped


@pytest.mark.reliability("faults")
def test_stalled_bodies_do_not_count_in_flight(echo_server):
    stalled = [_post(echo_server, b"x", declared=50) for _ in range(5)]  # more than max_inflight_requests=2
    time.sleep(0.2)
    answer = _answer(_post(echo_server, b"hello"))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"bytes":5' in answer and b'"inflight":1' in answer
    for sock in stalled:
        sock.close()


def test_a_complete_body_is_replayed_whole(echo_server):
    body = bytes(range(256)) * 12_000  # 3 MB: spooled to disk, replayed in chunks
    answer = _answer(_post(echo_server, body))
    assert answer.startswith(b"HTTP/1.1 200") and f'"bytes":{len(body)}'.encode() in answer

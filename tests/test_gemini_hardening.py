"""Gemini under hostile or unlucky upstreams (issue 20): every call ends by its deadline, Retry-After is
honoured only within it, repeated auth/quota failures open a circuit breaker, oversize answers count as
malformed, JSON is found inside fences with prose, secrets never reach errors or logs, and the L2 rewrite
falls back offline (marked) within its own deadline. The real google-genai client talks to the local
protocol server (tests/gemini_server.py); deadlines are a second or two, set through the config."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from pydantic import BaseModel

from gemini.client import (
    FAST_MODEL,
    GeminiBadAnswer,
    GeminiCircuitOpen,
    GeminiConfig,
    GeminiDeadline,
    GeminiError,
    GeminiRequestError,
    extract_json,
    redact,
)
from gemini.rewrite import reformulate

try:
    from tests.gemini_server import TEST_API_KEY, GeminiProtocolServer, client_for
    from tests.test_gemini_rewrite import TRIGGER, rose_profile
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from gemini_server import TEST_API_KEY, GeminiProtocolServer, client_for
    from test_gemini_rewrite import TRIGGER, rose_profile


class Caption(BaseModel):
    caption: str


@pytest.fixture
def server():
    with GeminiProtocolServer() as s:
        yield s


def ask(client, **kwargs):
    return client.generate("caption", ["caption this"], Caption, system_instruction="describe", prompt_version="h/1",
                           **kwargs)


def _slots_free(client) -> bool:
    """Every concurrency slot is back (acquire them all without waiting, then give them back)."""
    taken = 0
    try:
        while client._semaphore.acquire(blocking=False):
            taken += 1
    finally:
        for _ in range(taken):
            client._semaphore.release()
    return taken == client.config.max_concurrency


@pytest.mark.reliability("faults")
def test_a_silent_upstream_ends_at_the_deadline_and_frees_the_slot(server):
    for _ in range(4):
        server.push_silent()
    client = client_for(server, timeout_s=30, max_retries=4, deadlines={"caption": 1.5})
    t0 = time.monotonic()
    with pytest.raises(GeminiDeadline, match="deadline"):
        ask(client)
    took = time.monotonic() - t0
    assert took < 4.0, f"a silent upstream held the call {took:.1f} s past a 1.5 s deadline"
    assert _slots_free(client), "the abandoned attempt still holds a concurrency slot"


@pytest.mark.reliability("faults")
def test_a_trickling_upstream_is_cut_off_at_the_deadline(server):
    server.push_trickle(0.2, {"caption": "x" * 200})  # every read gets a byte: a per-read time-out never fires
    client = client_for(server, timeout_s=30, deadlines={"caption": 1.5})
    t0 = time.monotonic()
    with pytest.raises(GeminiDeadline):
        ask(client)
    assert time.monotonic() - t0 < 4.0  # the deadline and a loaded machine's slack; the trickle would go on for 40 s


@pytest.mark.reliability("faults")
def test_retries_cannot_extend_the_deadline(server):
    for _ in range(10):
        server.push_status(503)
    # A 3 s backoff against a 5 s deadline: the second 503 comes back with under 3 s left, so the client must give
    # up then rather than sleep past the deadline. Each answer has seconds to arrive (a 0.4 s backoff and a 1 s
    # deadline left a loaded machine's first answer arriving after the deadline: a different error).
    client = client_for(server, max_retries=10, backoff_initial_s=3.0, backoff_max_s=3.0, backoff_jitter=0,
                        deadlines={"caption": 5.0})
    t0 = time.monotonic()
    with pytest.raises(GeminiDeadline, match="would pass the call's deadline"):
        ask(client)
    assert time.monotonic() - t0 < 5.0  # gave up before the deadline instead of sleeping into it
    assert len(server.requests) <= 2


def test_retry_after_is_honoured_within_the_deadline(server):
    server.push_status(429, retry_after=1)
    server.push_json({"caption": "after the wait"})
    client = client_for(server, backoff_initial_s=0.01, backoff_max_s=0.05, deadlines={"caption": 5})
    t0 = time.monotonic()
    assert ask(client).value.caption == "after the wait"
    assert time.monotonic() - t0 >= 1.0, "the Retry-After header was not waited for"


@pytest.mark.reliability("faults")
def test_a_retry_after_past_the_deadline_gives_up_at_once(server):
    server.push_status(503, retry_after=30)
    server.push_json({"caption": "never asked"})
    client = client_for(server, deadlines={"caption": 10})
    t0 = time.monotonic()
    with pytest.raises(GeminiDeadline, match="would pass the call's deadline"):
        ask(client)
    assert time.monotonic() - t0 < 5 and len(server.requests) == 1  # not the 10 s deadline, nor the 30 s asked


@pytest.mark.reliability("faults")
def test_repeated_auth_failures_open_the_circuit_breaker(server):
    for _ in range(3):
        server.push_status(401, message="API key not valid")
    client = client_for(server, breaker_failures=3, breaker_cooldown_s=60)
    for _ in range(3):
        with pytest.raises(GeminiRequestError):
            ask(client)
    server.push_json({"caption": "would have worked"})
    with pytest.raises(GeminiCircuitOpen, match="3 failures in a row"):
        ask(client)
    assert len(server.requests) == 3, "a call went out while the breaker was open"


@pytest.mark.reliability("faults")
def test_quota_exhaustion_counts_towards_the_breaker_and_success_resets_it(server):
    client = client_for(server, max_retries=0, breaker_failures=2, breaker_cooldown_s=60)
    server.push_status(429)
    with pytest.raises(GeminiError):
        ask(client)
    server.push_json({"caption": "ok"})
    assert ask(client).value.caption == "ok"  # the count starts again
    server.push_status(429)
    with pytest.raises(GeminiError):
        ask(client)
    server.push_json({"caption": "still closed"})
    assert ask(client).value.caption == "still closed"
    for _ in range(2):
        server.push_status(429)
        with pytest.raises(GeminiError):
            ask(client)
    with pytest.raises(GeminiCircuitOpen):
        ask(client)


@pytest.mark.reliability("faults")
def test_an_oversize_answer_is_malformed_asked_once_more_then_refused(server):
    server.push_json({"caption": "x" * 1_000_000})
    server.push_json({"caption": "a short caption"})
    client = client_for(server)
    assert ask(client).value.caption == "a short caption" and len(server.requests) == 2
    server.push_json({"caption": "y" * 1_000_000})
    server.push_json({"caption": "z" * 1_000_000})
    with pytest.raises(GeminiBadAnswer, match="at most 4000"):
        ask(client)


def test_json_inside_a_fence_with_prose_around_it(server):
    server.push_text('Sure! Here is the caption:\n```json\n{"caption": "a lighthouse at dusk"}\n```\nHope it helps.')
    assert ask(client_for(server)).value.caption == "a lighthouse at dusk"
    assert extract_json('The answer is {"caption": "a boat"} as asked.') == {"caption": "a boat"}
    with pytest.raises(ValueError):
        extract_json("no json here at all")


@pytest.mark.reliability("faults")
def test_secrets_are_redacted_from_upstream_text(server, caplog):
    echo = f"API key {TEST_API_KEY} is invalid; also AIzaSyA1234567890abcdefghijklmnopqrstu and key=s3cr3tvalue99"
    server.push_status(400, message=echo)
    client = client_for(server)
    with caplog.at_level(logging.DEBUG), pytest.raises(GeminiRequestError) as info:
        ask(client)
    text = str(info.value) + "".join(r.getMessage() for r in caplog.records)
    for secret in (TEST_API_KEY, "AIzaSyA1234567890abcdefghijklmnopqrstu", "s3cr3tvalue99"):
        assert secret not in text
    assert "[REDACTED]" in str(info.value)
    assert redact("Bearer abcdefghijkl") == "Bearer [REDACTED]"


def test_l2_defaults_to_flash_and_captions_stay_on_pro():
    config = GeminiConfig()
    assert config.model_for("rewrite") == FAST_MODEL
    assert config.model_for("caption") != FAST_MODEL and config.model_for("profile") != FAST_MODEL
    assert config.deadline_for("rewrite") < config.deadline_for("caption")
    assert GeminiConfig.from_env({"KLEIN_GEMINI_DEADLINE_REWRITE_S": "1.5"}).deadline_for("rewrite") == 1.5


@pytest.mark.reliability("faults")
def test_a_silent_gemini_makes_l2_fall_back_offline_within_its_deadline(server):
    for _ in range(4):
        server.push_silent()
    client = client_for(server, timeout_s=30, deadlines={"rewrite": 1.5})
    t0 = time.monotonic()
    result = reformulate(rose_profile(), "a young woman by a window", trigger=TRIGGER, client=client)
    took = time.monotonic() - t0
    assert result.source == "offline" and result.checks.passed
    assert any("offline L2: Gemini failed" in w and "deadline" in w for w in result.warnings), result.warnings
    assert took < 4.0, f"L2 took {took:.1f} s with a 1.5 s deadline"


def test_the_l2_reask_shares_one_deadline(server):
    server.push_delay(3.0, {"prompt": "too short"})  # fails the checks: re-asked
    server.push_delay(3.0, {"prompt": "too short again"})
    profile = rose_profile()
    client = client_for(server, timeout_s=30, deadlines={"rewrite": 4.0})
    t0 = time.monotonic()
    result = reformulate(profile, "a young woman by a window", trigger=TRIGGER, client=client)
    assert result.source == "offline"
    # one shared deadline ends the re-ask at 4 s; a deadline of its own would let it answer at 6 s
    assert time.monotonic() - t0 < 5.5, "the re-ask got a deadline of its own"


@pytest.mark.reliability("faults")
def test_concurrent_callers_each_end_by_their_deadline(server):
    server.responder = lambda request: time.sleep(5) or {"caption": "late"}
    client = client_for(server, max_concurrency=1, deadlines={"caption": 1.0})
    errors: list[BaseException] = []

    def call():
        try:
            ask(client, use_cache=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 < 2.5 and len(errors) == 3 and all(isinstance(e, GeminiDeadline) for e in errors)

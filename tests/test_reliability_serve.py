"""Serving reliability and security over real HTTP: one local Ray cluster and one Serve app for this module.

Two ingress replicas (so the rate limit and the overload refusals are tested across replicas), Gemini
configured but down (a local Gemini-protocol server that answers 503, later stopped), small limits. The
tests feed the reliability ledger (tests/reliability.py), whose table pytest prints at the end:

- the HTTP/LoRA bad-input corpus (tests/bad_inputs_http.py): every case gets its specific error and
  nothing stored changes;
- tenant isolation on every endpoint (the OpenAPI route list must be covered);
- the cluster-wide rate limit; overload answered with JSON 503 + Retry-After; a request deadline;
- Gemini down -> offline fallback; a generator replica killed under load -> replaced, no request lost;
- a bounded load test (throughput, p50/p99, errors) and flat memory across 100 adapter switches;
- no secret in logs, storage or responses; only safetensors ever loaded from users; CORS off.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

# tests/ is on sys.path (pytest's rootdir conftest); `reliability` must be the very module conftest registered
# as a plugin, since its ledger is what the summary prints
import bad_inputs
import bad_inputs_http
import reliability
from gemini_server import Action, GeminiProtocolServer, error_body

from cluster.ports import free_port

APP = "klein-style-rel"
GEMINI_SECRET = "AIzaSy-test-secret-" + os.urandom(8).hex()  # a fake key that must never show up anywhere
DOWNSTREAM_TIMEOUT_S = 30.0
LOAD_REQUESTS, LOAD_CONCURRENCY = 120, 16  # the bounded load test (issue 8): 120 requests are 7.5 rounds of 16 (was 200: ~25 s more of CI)
INFLIGHT_PER_REPLICA = 24
CONFIG = {
    "max_loras_per_replica": 3,
    "max_upload_bytes": 2 * 1024 * 1024,
    "rate_limit_per_s": 50.0,
    "rate_limit_burst": 500,
    "tenant_rate_limits": {"hammer": {"per_s": 2, "burst": 20}},
    "max_inflight_requests": INFLIGHT_PER_REPLICA,
    "downstream_timeout_s": DOWNSTREAM_TIMEOUT_S,
    "max_training_jobs_per_tenant": 1,
}
DEPLOYMENTS = {"Ingress": {"num_replicas": 2}, "Generator": {"max_queued_requests": 16}}
# what every generation in these tests asks for: the tiny model, 64×64, few steps, no CFG (guidance 1 halves
# the work on CPU), no Gemini
GEN = {"prompt": "a house", "steps": 2, "guidance": 1.0, "use_gemini": "off"}
TENANTS = ("acme", "globex", "hammer", "loadtest", "burst")
RESPONSES: list[str] = []  # every answer body and header seen, for the secret scan at the end


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _seen(response: httpx.Response) -> httpx.Response:
    RESPONSES.append(json.dumps(dict(response.headers)) + "\n" + response.content[:20000].decode("utf-8", "replace"))
    return response


def _is_json_error(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and {"error", "detail", "field"} <= set(body) and "Traceback" not in response.text


def _answered(response: httpx.Response | None) -> bool:
    """A complete answer: an image, or our JSON error (with Retry-After when it is a 503 or 429)."""
    if response is None:
        return False
    if response.status_code == 200:
        return response.headers.get("content-type", "").startswith(("image/png", "application/json"))
    if response.status_code in (429, 503) and not response.headers.get("retry-after", "").isdigit():
        return False
    return _is_json_error(response)


# -- the service --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemini():
    """Gemini is configured (a key and a base URL) but down: every call is answered 503 UNAVAILABLE."""
    server = GeminiProtocolServer(responder=lambda request: Action(status=503, body=error_body(503, "down for the test")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, gemini, tiny_dir):
    import ray
    from ray import serve

    from cluster.pools import init_local_ray
    from cluster.storage import Storage
    from serve.app import build_app
    from serve.tenants import create_api_key

    root = tmp_path_factory.mktemp("rel-storage")
    storage = Storage.from_uri(root)
    port = free_port()
    env = {"GEMINI_API_KEY": GEMINI_SECRET, "GEMINI_BASE_URL": gemini.base_url, "KLEIN_GEMINI_MAX_RETRIES": "0",
           "KLEIN_GEMINI_TIMEOUT_S": "5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the Ray workers inherit it from the raylet started now; restored at once below
    try:
        init_local_ray(num_cpus=2)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({**CONFIG, "storage": str(root)}, replica_cpus=0.1, deployment_options=DEPLOYMENTS),
              name=APP, route_prefix="/")
    keys = {t: create_api_key(storage, t) for t in TENANTS}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
    yield {"client": client, "keys": keys, "storage": storage, "root": Path(root), "port": port,
           "url": f"http://127.0.0.1:{port}"}
    client.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def transformer(tiny_dir):
    from klein.model import load_pipeline

    return load_pipeline("tiny").transformer


@pytest.fixture(scope="module")
def loras(service, transformer):
    """Synthetic LoRAs stored where training puts them: 4 for acme, 1 for globex, 4 larger ones for the load
    and memory tests, and one with a style profile whose text stage uses Gemini."""
    from gemini.profile import extract_style_profile
    from klein.lora import lora_to_bytes
    from serve.testing import random_lora, store_lora

    storage = service["storage"]
    made = {}
    for i, (tenant, lora_id, rank) in enumerate([("acme", "rel-a1", 4), ("acme", "rel-a2", 4), ("acme", "rel-a3", 4),
                                                 ("acme", "rel-a4", 4), ("globex", "rel-b1", 4),
                                                 ("loadtest", "mem-1", 64), ("loadtest", "mem-2", 64),
                                                 ("loadtest", "mem-3", 64), ("loadtest", "mem-4", 64)]):
        made[lora_id] = random_lora(transformer, rank=rank, scale=0.04, seed=300 + i)
        store_lora(storage, tenant, lora_id, made[lora_id])
    # a LoRA whose policy lets Gemini rewrite prompts, with a real (offline) style profile
    profile = extract_style_profile([bad_inputs.good_image(5)], client=None).to_manifest()
    prefix = "tenants/acme/loras/rel-gem"
    sha = storage.write_bytes(f"{prefix}/lora.safetensors", lora_to_bytes(made["rel-a1"]))
    storage.write_json(f"{prefix}/manifest.json", {
        "id": "rel-gem", "tenant": "acme", "trigger": "zxy_gem", "files": {"lora.safetensors": sha},
        "style_profile": profile,
        "decision": {"variant": "GEM+A", "reason": "test", "text_stage": {"use_gemini": True, "reason": "test"}}})
    return made


def _generate(client, key, **body) -> httpx.Response:
    return _seen(client.post("/v1/generate", headers=_auth(key), json={**GEN, **body}))


def _generator_replicas() -> list[dict]:
    import ray

    # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<replica id>
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Generator#" in a["name"]]


def _processes_of(title: str) -> list:
    import psutil

    return [proc for proc in psutil.process_iter(["cmdline"]) if title in " ".join(proc.info.get("cmdline") or [])]


def _process_of(title: str):
    found = _processes_of(title)
    if not found:
        raise AssertionError(f"no process whose title contains {title!r}")
    return found[0]


def _fire(client, requests: list[dict], concurrency: int, timeout: float) -> list[dict]:
    """Send every request from a pool of `concurrency` threads; one result per request (None = no answer)."""

    def one(spec: dict) -> dict:
        started = time.perf_counter()
        try:
            response = client.request(timeout=timeout, **spec)
            _seen(response)
        except httpx.HTTPError as e:
            return {"response": None, "error": type(e).__name__, "latency": time.perf_counter() - started,
                    "sent_at": started}
        return {"response": response, "error": None, "latency": time.perf_counter() - started, "sent_at": started}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, requests))


# -- health, replicas, CORS -----------------------------------------------------------------------------------
def test_two_ingress_replicas_answer_and_cors_is_off_by_default(service):
    client = service["client"]
    replicas, deadline = set(), time.monotonic() + 30
    while len(replicas) < 2 and time.monotonic() < deadline:  # the proxy may hear of the second one a moment later
        replicas |= {client.get("/healthz").json()["replica"] for _ in range(10)}
    assert len(replicas) == 2, replicas  # the proxy spreads requests over both ingress replicas
    origin = {"Origin": "https://evil.example"}
    preflight = client.options("/v1/generate", headers={**origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in preflight.headers
    plain = client.get("/healthz", headers=origin)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    listed = client.get("/v1/loras", headers={**origin, **_auth(service["keys"]["acme"])})
    assert "access-control-allow-origin" not in listed.headers


# -- the bad-input corpus ---------------------------------------------------------------------------------------
def test_http_bad_input_corpus(service, loras, transformer, tmp_path):
    """Every case of tests/bad_inputs_http.py: its status, error code, field and detail, and not one stored
    file changed (sha256 of every file under the storage root, before and after each case)."""
    client, keys = service["client"], service["keys"]
    ctx = bad_inputs_http.Ctx(keys=keys, own_loras=["rel-a1", "rel-a2", "rel-a3", "rel-a4"], other_lora="rel-b1",
                              storage_uri=service["storage"].uri, max_upload_bytes=CONFIG["max_upload_bytes"],
                              scratch=tmp_path / "scratch", transformer=transformer,
                              pickle_marker=tmp_path / "PICKLE_WAS_LOADED")
    assert len(bad_inputs_http.CASES) >= 30 and len({c.name for c in bad_inputs_http.CASES}) == len(bad_inputs_http.CASES)
    failures = []
    for case in bad_inputs_http.CASES:
        spec = case.build(ctx)
        headers = dict(spec.pop("headers", {}))
        if case.tenant is not None:
            headers.update(_auth(keys[case.tenant]))
        before = reliability.storage_snapshot(service["root"])
        try:
            response = _seen(client.request(headers=headers, **spec))
        except httpx.HTTPError as e:
            failures.append(f"{case.name}: no answer ({type(e).__name__}: {e})")
            reliability.record(_category(case), 1, 0, case.name)
            continue
        problems = _check_case(case, response, str(service["root"]))
        if reliability.storage_snapshot(service["root"]) != before:
            problems.append("stored files changed")
        if case.check is not None:
            try:
                case.check(ctx, response)
            except AssertionError as e:
                problems.append(str(e))
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)} — got {response.status_code} {response.text[:300]}")
        reliability.record(_category(case), 1, not problems, case.name)
    assert not failures, "\n".join(failures)
    assert not ctx.pickle_marker.exists()


def _category(case) -> str:
    return {"bad": "bad_inputs", "unusual": "unusual_inputs", "cross_tenant": "cross_tenant"}[case.kind]


def _check_case(case, response: httpx.Response, storage_root: str) -> list[str]:
    problems = []
    if response.status_code != case.status:
        problems.append(f"status {response.status_code}, expected {case.status}")
    if case.status == 200:
        return problems
    if not _is_json_error(response):
        return problems + ["not a JSON {error, detail, field} body"]
    body = response.json()
    if body["error"] != case.error:
        problems.append(f"error {body['error']!r}, expected {case.error!r}")
    if body["field"] != case.field:
        problems.append(f"field {body['field']!r}, expected {case.field!r}")
    if not re.search(case.detail, body["detail"], re.S):
        problems.append(f"detail does not match {case.detail!r}")
    if storage_root in body["detail"] or "rel-storage" in body["detail"]:
        problems.append("the detail shows a server path")
    return problems


# -- tenant isolation -------------------------------------------------------------------------------------------
def test_tenant_isolation_on_every_endpoint(service, loras, transformer):
    """Every route of the OpenAPI schema is probed with another tenant's LoRA (or checked to show only the
    caller's own); a route added without a probe here fails the test."""
    from klein.lora import lora_to_bytes
    from serve.testing import random_lora

    client, keys = service["client"], service["keys"]
    a, b = _auth(keys["acme"]), _auth(keys["globex"])
    # acme imports a LoRA over HTTP: it is acme's alone
    upload = lora_to_bytes(random_lora(transformer, rank=4, seed=77))
    imported = _seen(client.post("/v1/loras/import", headers=a, files={"lora": ("mine.safetensors", upload)},
                                 data={"trigger": "zxy_mine"}))
    assert imported.status_code == 201, imported.text
    mine = imported.json()["id"]
    missing = "lora-000000000000"
    not_found = _seen(client.get(f"/v1/loras/{missing}", headers=b)).json()
    probes = {
        ("get", "/v1/loras/{lora_id}"): lambda: client.get(f"/v1/loras/{mine}", headers=b),
        ("delete", "/v1/loras/{lora_id}"): lambda: client.delete(f"/v1/loras/{mine}", headers=b),
        ("get", "/v1/loras/{lora_id}/files/{name}"): lambda: client.get(f"/v1/loras/{mine}/files/lora.safetensors", headers=b),
        ("post", "/v1/generate"): lambda: client.post("/v1/generate", headers=b, json={**GEN, "lora_id": mine}),
        ("post", "/v1/style-profile"): lambda: client.post("/v1/style-profile", headers=b, json={"lora_id": mine}),
        ("post", "/v1/loras"): lambda: client.post("/v1/loras", headers=b, json={
            "source_uri": f"{service['storage'].uri}/tenants/acme/loras/{mine}"}),
    }
    refused = 0
    for (method, path), probe in probes.items():
        response = _seen(probe())
        ok = response.status_code in (404, 422) and _is_json_error(response)
        if response.status_code == 404:
            ok = ok and response.json()["detail"] == not_found["detail"]  # same answer as a missing id
        reliability.record("cross_tenant", 1, ok, f"{method.upper()} {path}")
        refused += ok
        assert ok, (method, path, response.status_code, response.text)
    # the listing shows only the caller's own; an import lands under the caller only
    listed_b = {item["id"] for item in _seen(client.get("/v1/loras", headers=b)).json()["loras"]}
    listed_a = {item["id"] for item in _seen(client.get("/v1/loras", headers=a)).json()["loras"]}
    ok = mine in listed_a and not listed_b & listed_a and listed_b == {"rel-b1"}
    reliability.record("cross_tenant", 1, ok, "GET /v1/loras lists another tenant's LoRA")
    assert ok, (listed_a, listed_b)
    probes[("get", "/v1/loras")] = None
    probes[("post", "/v1/loras/import")] = None  # the import above: created under acme, invisible to globex
    # acme's LoRA is intact after globex's DELETE, and usable by acme
    assert _seen(client.get(f"/v1/loras/{mine}", headers=a)).json()["status"] == "done"
    assert _generate(client, keys["acme"], lora_id=mine).status_code == 200
    # every route of the API is covered
    schema = client.get("/openapi.json").json()["paths"]
    routes = {(method, path) for path, ops in schema.items() for method in ops if path.startswith("/v1/")}
    assert routes <= set(probes), f"routes without a tenant-isolation probe: {sorted(routes - set(probes))}"


# -- rate limit ---------------------------------------------------------------------------------------------------
def test_rate_limit_is_cluster_wide(service):
    """Tenant `hammer` may make 2 requests/s with bursts of 20, across both ingress replicas together: per
    replica buckets would let about twice as many through."""
    client, key = service["client"], service["keys"]["hammer"]
    started = time.monotonic()
    results = _fire(client, [{"method": "GET", "url": "/v1/loras", "headers": _auth(key)}] * 80, concurrency=8,
                    timeout=30)
    elapsed = time.monotonic() - started
    responses = [r["response"] for r in results]
    answered = sum(_answered(r) for r in responses)
    reliability.record("requests", len(results), answered, "rate limit burst")
    assert answered == len(results)
    allowed = sum(r.status_code == 200 for r in responses)
    limited = [r for r in responses if r.status_code == 429]
    assert allowed + len(limited) == len(responses)
    assert allowed <= 20 + 2 * elapsed + 1, (allowed, elapsed)  # one bucket for the whole cluster
    assert allowed >= 20
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "rate_limited" for r in limited)
    # other tenants are not affected
    assert _seen(client.get("/v1/loras", headers=_auth(service["keys"]["globex"]))).status_code == 200


@pytest.mark.reliability("faults")
def test_rate_limiter_replica_killed_requests_are_still_limited_and_answered(service):
    """The one RateLimiter replica is killed: ingress replicas limit on their own until Serve has replaced it
    (a request waits at most the 2 s limiter time-out), no request fails, and the shared limit comes back."""
    import ray
    from ray import serve

    client, key = service["client"], service["keys"]["globex"]
    (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#RateLimiter#" in a["name"]]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    results = _fire(client, [{"method": "GET", "url": "/v1/loras", "headers": _auth(key)}] * 12, concurrency=4, timeout=30)
    responses = [r["response"] for r in results]
    answered = sum(_answered(r) for r in responses)
    reliability.record("requests", len(results), answered, "rate limiter kill")
    assert answered == len(results) and all(r.status_code == 200 for r in responses), [r and r.status_code for r in responses]
    assert max(r["latency"] for r in results) < 10
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#RateLimiter#" in a["name"]]
        if now and now[0]["name"] != victim["name"] and \
                str(serve.status().applications[APP].deployments["RateLimiter"].status).endswith("HEALTHY"):
            break
        time.sleep(0.5)
    assert now and now[0]["name"] != victim["name"], now
    assert _seen(client.get("/v1/loras", headers=_auth(key))).status_code == 200


# -- Gemini down --------------------------------------------------------------------------------------------------
@pytest.mark.reliability("faults")
def test_gemini_answering_503_falls_back_to_offline(service, loras, gemini):
    client, key = service["client"], service["keys"]["acme"]
    calls = len(gemini.requests)
    r = _generate(client, key, lora_id="rel-gem", use_gemini="on", response="json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gemini_source"] == "offline" and "zxy_gem" in body["prompt"]
    assert any("offline" in w or "Gemini" in w for w in body["warnings"]), body["warnings"]
    assert len(gemini.requests) > calls  # Gemini was really asked, and answered 503
    assert gemini.requests[-1].headers.get("x-goog-api-key") == GEMINI_SECRET
    picture = bad_inputs.png_bytes(bad_inputs.good_image(41))
    r = _seen(client.post("/v1/style-profile", headers=_auth(key), data={"use_gemini": "on"},
                          files=[("images", ("p.png", picture, "image/png"))]))
    assert r.status_code == 200 and r.json()["profile"]["source"] == "offline", r.text


@pytest.mark.reliability("faults")
def test_gemini_unreachable_falls_back_to_offline(service, loras, gemini):
    gemini.stop()  # connection refused from now on
    client, key = service["client"], service["keys"]["acme"]
    started = time.monotonic()
    r = _generate(client, key, lora_id="rel-gem", use_gemini="auto", response="json")
    assert r.status_code == 200, r.text
    assert r.json()["gemini_source"] == "offline"
    assert time.monotonic() - started < 20


# -- load ---------------------------------------------------------------------------------------------------------
def test_load_requests_at_concurrency_16(service, loras):
    """Mixed LoRAs (base and three adapters) on the tiny model; every request answered, none lost."""
    client, key = service["client"], service["keys"]["loadtest"]
    choices = [None, "mem-1", "mem-2", "mem-3"]
    requests = []
    for i in range(LOAD_REQUESTS):
        body = {**GEN, "steps": 1, "seed": i}
        if choices[i % 4]:
            body["lora_id"] = choices[i % 4]
        requests.append({"method": "POST", "url": "/v1/generate", "headers": _auth(key), "json": body})
    started = time.perf_counter()
    results = _fire(client, requests, concurrency=LOAD_CONCURRENCY, timeout=DOWNSTREAM_TIMEOUT_S + 30)
    wall = time.perf_counter() - started
    responses = [r["response"] for r in results]
    answered = sum(_answered(r) for r in responses)
    ok = [r for r in results if r["response"] is not None and r["response"].status_code == 200]
    latencies = [r["latency"] for r in ok]
    errors: dict[str, int] = {}
    for r in results:
        code = r["error"] or str(r["response"].status_code)
        if code != "200":
            errors[code] = errors.get(code, 0) + 1
    p50, p99 = reliability.percentile(latencies, 50), reliability.percentile(latencies, 99)
    reliability.record("requests", len(results), answered, "load test")
    reliability.note(f"load test: {len(results)} requests at concurrency {LOAD_CONCURRENCY} (tiny model, 64×64, 1 step, no CFG, base + 3 "
                     f"LoRAs): {len(results) / wall:.1f} req/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                     f"errors {errors or 'none'}, lost {len(results) - answered}")
    assert answered == len(results), errors  # none lost: every refusal is a JSON 503 with Retry-After
    assert set(errors) <= {"503"}, errors
    # at design load (16 < 2 × 24 ingress slots, < the generator's queue) only a starved CPU refuses, on time-out
    assert len(ok) >= 0.9 * len(results), errors
    assert all(r["response"].content[:8] == b"\x89PNG\r\n\x1a\n" for r in ok)


def test_memory_stays_flat_across_100_adapter_switches(service, loras, transformer):
    """Four rank-64 LoRAs through an LRU of three, called on the generator deployment directly: every call
    loads one adapter set and evicts another. Its parameter count and resident set size stay flat."""
    from ray import serve

    from serve.adapter_sets import adapter_set_id

    storage = service["storage"]
    handle = serve.get_deployment_handle("Generator", app_name=APP)
    proc = _process_of(f"ServeReplica:{APP}:Generator")
    base = sum(p.numel() for p in transformer.parameters())
    per_lora = sum(l.down.numel() + l.up.numel() for l in loras["mem-1"].layers.values())
    model_ids = []
    for n in range(1, 5):
        manifest = storage.read_json(f"tenants/loadtest/loras/mem-{n}/manifest.json")
        model_ids.append(adapter_set_id([{"key": f"tenants/loadtest/loras/mem-{n}/lora.safetensors",
                                          "sha256": manifest["files"]["lora.safetensors"]}]))
    rss, params = [], []
    for i in range(100):
        item = {"prompt": "a house", "seed": i, "steps": 1, "width": 64, "height": 64, "guidance": 1.0,
                "negative_prompt": "", "model_id": model_ids[i % 4], "adapter_weights": [1.0], "klora": None}
        png = handle.options(multiplexed_model_id=model_ids[i % 4]).generate.remote(item).result(timeout_s=60)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if i % 10 == 9:
            stats = handle.stats.remote().result(timeout_s=60)
            params.append(stats["parameters"])
            rss.append(proc.memory_info().rss)
    growth = rss[-1] - rss[1]  # after the first 20 switches (allocator warm-up) to the end
    reliability.note(f"memory: generator RSS {rss[1] / 2**20:.0f} MiB after 20 adapter switches, "
                     f"{rss[-1] / 2**20:.0f} MiB after 100 ({growth / 2**20:+.1f} MiB); one adapter is "
                     f"{per_lora * 4 / 2**20:.2f} MiB, so 80 leaked ones would be {80 * per_lora * 4 / 2**20:.0f} MiB")
    assert len(set(params)) == 1 and params[0] == base + 3 * per_lora, params
    assert growth < 20 * per_lora * 4 + 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 80 switches"


# -- overload ------------------------------------------------------------------------------------------------------
def test_overload_gets_json_503_with_retry_after(service):
    """80 generations at once against 2 ingress replicas that take 24 each: the rest are refused at once with
    JSON 503 + Retry-After (by the ingress, or by the generator's queue bound through Serve back-pressure);
    none is answered by the proxy in plain text, none is lost, and the service serves normally afterwards."""
    client, key = service["client"], service["keys"]["burst"]
    barrier = threading.Barrier(80)
    requests = [{"method": "POST", "url": "/v1/generate", "headers": _auth(key), "json": {**GEN, "steps": 4, "seed": i}}
                for i in range(80)]

    def one(spec):
        barrier.wait()
        started = time.perf_counter()
        try:
            return _seen(client.request(timeout=DOWNSTREAM_TIMEOUT_S + 30, **spec)), time.perf_counter() - started
        except httpx.HTTPError as e:
            return e, time.perf_counter() - started

    with ThreadPoolExecutor(80) as pool:
        results = list(pool.map(one, requests))
    responses = [r for r, _ in results if isinstance(r, httpx.Response)]
    answered = sum(_answered(r) for r in responses)
    reliability.record("requests", len(results), answered, "overload burst")
    refused = [r for r in responses if r.status_code == 503]
    assert answered == len(results), [str(r)[:200] for r, _ in results if not isinstance(r, httpx.Response)]
    assert {r.status_code for r in responses} <= {200, 503}
    assert len(refused) >= 80 - 2 * INFLIGHT_PER_REPLICA  # at least what both replicas together cannot take
    for r in refused:
        body = r.json()
        assert body["error"] == "overloaded" and int(r.headers["Retry-After"]) >= 1, r.text
    by_ingress = sum("this server is handling" in r.json()["detail"] for r in refused)
    by_backpressure = sum("at capacity" in r.json()["detail"] for r in refused)
    reliability.note(f"overload: 80 at once -> {80 - len(refused)} served, {by_ingress} refused by the ingress cap, "
                     f"{by_backpressure} by the generator's queue bound (Serve back-pressure), 0 plain-text")
    assert by_ingress >= 1
    assert max(t for _, t in results) < DOWNSTREAM_TIMEOUT_S + 10
    assert _generate(client, key).status_code == 200  # and it recovers at once


def test_a_request_deadline_answers_503_not_a_hang(service):
    """A client that asks for a 1 s deadline gets 503 + Retry-After in about a second, not a hung request."""
    client, key = service["client"], service["keys"]["burst"]
    started = time.monotonic()
    r = _seen(client.post("/v1/generate", headers={**_auth(key), "X-Request-Timeout": "1"},
                          json={**GEN, "steps": 200, "width": 256, "height": 256}))
    elapsed = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"] == "timeout" and int(r.headers["Retry-After"]) >= 1, r.text
    assert elapsed < 10, elapsed
    bad = _seen(client.post("/v1/generate", headers={**_auth(key), "X-Request-Timeout": "soon"}, json=GEN))
    assert bad.status_code == 422 and bad.json()["field"] == "x-request-timeout"
    reliability.record("requests", 2, 2)


# -- a generator replica killed under load ---------------------------------------------------------------------
@pytest.mark.reliability("faults")
def test_generator_replica_killed_under_load_is_replaced(service, loras):
    import ray
    from ray import serve

    client, key = service["client"], service["keys"]["loadtest"]
    assert _generate(client, key).status_code == 200  # the pipeline is idle and warm
    (victim,) = _generator_replicas()
    requests = [{"method": "POST", "url": "/v1/generate", "headers": _auth(key),
                 "json": {**GEN, "steps": 2, "seed": i, **({"lora_id": "mem-1"} if i % 2 else {})}} for i in range(24)]
    client_timeout = DOWNSTREAM_TIMEOUT_S + 15
    killed_at = []

    def kill_soon():
        time.sleep(1.0)  # the first wave is in the generator now
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at.append(time.perf_counter())

    killer = threading.Thread(target=kill_soon)
    killer.start()
    results = _fire(client, requests, concurrency=8, timeout=client_timeout)
    killer.join()
    responses = [r["response"] for r in results]
    answered = sum(_answered(r) for r in responses)
    reliability.record("requests", len(results), answered, "replica kill")
    codes = [r.status_code if r is not None else r_["error"] for r, r_ in zip(responses, results)]
    assert answered == len(results), codes
    assert set(codes) <= {200, 503}, codes
    assert all(r["latency"] < DOWNSTREAM_TIMEOUT_S + 10 for r in results)
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"] in ("unavailable", "overloaded", "timeout") and int(r.headers["Retry-After"]) >= 1
    # Serve replaced the replica: a new actor, healthy, serving
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = _generator_replicas()
        status = serve.status().applications[APP].deployments["Generator"].status
        if now and now[0]["name"] != victim["name"] and str(status).endswith("HEALTHY"):
            break
        time.sleep(0.5)
    assert now and now[0]["name"] != victim["name"], (victim, now)
    served_after_kill = [r for r in results if r["response"] is not None and r["response"].status_code == 200
                         and r["sent_at"] > killed_at[0]]
    # the kill hit requests in flight: sent before it, answered after it (else this tested an idle replica)
    in_flight = [r for r in results if r["sent_at"] < killed_at[0] < r["sent_at"] + r["latency"]]
    assert in_flight, [(round(r["sent_at"] - killed_at[0], 2), round(r["latency"], 2)) for r in results]
    final = _generate(client, key, lora_id="mem-2")
    assert final.status_code == 200
    reliability.note(f"replica kill: {codes.count(200)} of {len(codes)} requests served, {codes.count(503)} answered "
                     f"503 + Retry-After, {len(served_after_kill)} served after the kill, 0 lost")


# -- security -----------------------------------------------------------------------------------------------------
def test_no_secret_in_logs_storage_or_responses(service):
    """No API key (nor its secret part) and not the Gemini key appear in any Ray log file of this cluster, any
    stored file, or any answer this module received; keys.json holds salted hashes only."""
    import ray

    # a key is ks_<key id>_<secret>; the secret (32 url-safe characters, which may include "_") must not leak
    key_secrets = [k.split("_", 2)[2] for k in service["keys"].values()]
    assert all(len(s) >= 30 for s in key_secrets)
    secrets = [GEMINI_SECRET] + list(service["keys"].values()) + key_secrets
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    places = [p for p in logs.rglob("*") if p.is_file()] + [p for p in service["root"].rglob("*") if p.is_file()]
    assert len(places) > 10
    leaks = []
    for path in places:
        data = path.read_bytes()
        leaks += [f"{path}: {s[:12]}…" for s in secrets if s.encode() in data]
    for text in RESPONSES:
        leaks += [f"a response: {s[:12]}…" for s in secrets if s in text]
    assert not leaks, leaks
    assert len(RESPONSES) > 100
    records = service["storage"].read_json("auth/keys.json")
    assert all(set(r) == {"tenant", "salt", "hash", "created"} for r in records.values())


def test_only_safetensors_are_ever_loaded():
    """No code path unpickles: the one torch.load in the code base reads our own checkpoint with weights_only."""
    root = Path(__file__).resolve().parents[1]
    loaders = re.compile(r"torch\.load\(|pickle\.loads?\(|cloudpickle\.loads?\(|joblib\.load\(|allow_pickle\s*=\s*True|"
                         r"\bdill\.loads?\(|load_state_dict_from_url\(")
    found = []
    for package in ("cluster", "klein", "gemini", "train", "serve"):
        for path in (root / package).rglob("*.py"):
            for line in path.read_text().splitlines():
                if loaders.search(line) and not line.lstrip().startswith("#"):
                    found.append((path.relative_to(root).as_posix(), line.strip()))
    assert all(p == "train/loop.py" and "weights_only=True" in line for p, line in found), found


def test_the_ingress_replicas_never_load_torch(service):
    """After every request of this module (generations, fusions, LoRA imports, training starts), the HTTP tier's
    replicas hold no torch: its routers build requests and check ids with torch-free modules, an uploaded LoRA is
    checked by the Fusion replica and a training job imports its trainer in its own task. The Generator replica
    maps libtorch: the check sees it where it is."""
    def maps_torch(proc) -> bool:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()

    ingress = _processes_of(f"ServeReplica:{APP}:Ingress")
    assert len(ingress) == 2, ingress
    assert not any(maps_torch(p) for p in ingress)
    assert maps_torch(_process_of(f"ServeReplica:{APP}:Generator"))


def test_api_keys_are_hashed_and_compared_in_constant_time(tmp_path, monkeypatch):
    """Only salted hashes are stored, and every presented key costs one hash and one hmac.compare_digest,
    whether its id exists or not, so neither the comparison nor the lookup leaks through timing."""
    import hmac

    from cluster.storage import Storage
    from serve import tenants

    storage = Storage.from_uri(tmp_path)
    key = tenants.create_api_key(storage, "acme")
    raw = storage.read_bytes(tenants.KEYS_KEY).decode()
    assert key not in raw and key.split("_", 2)[2] not in raw
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(tenants.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    store = tenants.KeyStore(storage)
    assert store.tenant_of(key) == "acme"
    for wrong in (key[:-1] + ("x" if key[-1] != "x" else "y"), "ks_ffffffffffff_" + "a" * 32, "not-a-key"):
        with pytest.raises(tenants.AuthError):
            store.tenant_of(wrong)
    assert calls == [(64, 64)] * 4

"""The whole service over real HTTP: one local Ray cluster and one Serve app for this module.

Training runs in the background from the first test on (it takes a while on 2 CPUs); the tests that do
not need the trained LoRA run meanwhile, on synthetic LoRAs stored exactly where training puts them.
"""

import asyncio
import base64
import io
import re
import socket
import time
import zipfile

import httpx
import numpy as np
import pytest
import reliability  # the ledger plugin's own module (tests/ is on sys.path)
import yaml
from jsonschema import Draft202012Validator
from PIL import Image

from cli.serve import read_plan, start
from cluster.ports import free_port
from klein.lora import lora_to_bytes
from klein_style_client import ApiError, AsyncClient, Client
from klein.generate import GenerateRequest, generate_image, set_active_loras
from klein.model import load_pipeline
from serve.fusion import FUSED_PREFIX
from serve.adapter_sets import adapter_set_id
from serve.generator import adapter_names
from serve.testing import random_lora, store_lora

PORT = free_port()  # not Serve's fixed 8000: other Serve instances may run on this machine at the same time
APP = "klein-style-test"
INFLIGHT = 12
# request limits short enough to test in seconds (serve.middleware.Limits; production: 120 s and 15 s)
LIMITS = {"body_timeout_s": 2.0, "body_idle_s": 1.0, "auth_failures_per_s": 0.1, "auth_failure_burst": 5}
TRAIN_OVERRIDES = {"steps": 20, "save_every": 10, "lr": 2e-3, "resolution": 64, "sample_prompts": ["a house"],
                   "sample_steps": 4}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


# Every answer the module's HTTP clients get (raw httpx and the typed clients), checked against /openapi.json by
# the module's last test.
RECORDED: list[dict] = []


def _answer(response: httpx.Response) -> dict:
    return {"method": response.request.method, "path": response.request.url.path, "status": response.status_code,
            "type": response.headers.get("content-type", ""), "body": response.content}


def _record(response: httpx.Response) -> None:
    response.read()
    RECORDED.append(_answer(response))


async def _record_async(response: httpx.Response) -> None:
    await response.aread()
    RECORDED.append(_answer(response))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from cluster.storage import Storage
    from serve.tenants import create_api_key

    root = tmp_path_factory.mktemp("serve-storage")
    storage = Storage.from_uri(root)
    config = {"storage": str(root), "max_loras_per_replica": 2, "max_upload_bytes": 5 * 1024 * 1024,
              "rate_limit_per_s": 5.0, "rate_limit_burst": 40, "train_overrides": TRAIN_OVERRIDES,
              "max_training_jobs_per_tenant": 1, "max_inflight_requests": INFLIGHT}
    # started as `klein-style serve --config FILE` starts it: the file's http_options, app name and args
    serve_file = tmp_path_factory.mktemp("serve-config") / "serve_config.yaml"
    serve_file.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": PORT, "request_timeout_s": 300},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve.app:app_builder",
                          "args": {**config, **LIMITS, "replica_cpus": 0.1}}]}))
    plan = read_plan(str(serve_file))
    start(plan, num_cpus=2)
    keys = {t: create_api_key(storage, t) for t in ("acme", "globex", "hammer")}
    client = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120, event_hooks={"response": [_record]})
    yield {"client": client, "keys": keys, "storage": storage, "plan": plan}
    client.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(service):
    return service["client"]


@pytest.fixture(scope="module")
def transformer():
    from klein.model import load_pipeline

    return load_pipeline("tiny").transformer


@pytest.fixture(scope="module")
def synthetic(service, transformer):
    """Synthetic LoRAs: four for acme, one for globex."""
    from serve.testing import random_lora, store_lora

    storage = service["storage"]
    made = {}
    for i, (tenant, lora_id, scale) in enumerate([("acme", "syn-a1", 0.08), ("acme", "syn-a2", 0.06),
                                                  ("acme", "syn-a3", 0.05), ("acme", "syn-a4", 0.05),
                                                  ("globex", "syn-b1", 0.05)]):
        lora = random_lora(transformer, rank=4, scale=scale, seed=100 + i)
        store_lora(storage, tenant, lora_id, lora)
        made[lora_id] = lora
    return made


@pytest.fixture(scope="module")
def training_job(service, tmp_path_factory):
    """Submit the training job over HTTP (multipart zip) as soon as the service is up."""
    from evaluation.board import make_board

    board = tmp_path_factory.mktemp("board")
    make_board("neon", 6, board, size=256, seed=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted(board.iterdir()):
            z.write(path, path.name)
    with Client(f"http://127.0.0.1:{PORT}", api_key=service["keys"]["acme"], timeout=120,
                event_hooks={"response": [_record]}) as client:
        answer = client.train(buf.getvalue(), trigger="zxy_neon", variant="GEM+B")
    # the variant this request named is its explicit choice, and the answer says so
    assert answer.status == "queued" and answer.variant == "GEM+B" and answer.config_sources["variant"] == "user"
    return {"id": answer.id, "zip": buf.getvalue()}


@pytest.fixture(scope="module")
def trained(service, training_job):
    http, key = service["client"], service["keys"]["acme"]
    deadline = time.time() + 400
    while time.time() < deadline:
        body = http.get(f"/v1/loras/{training_job['id']}", headers=_auth(key)).json()
        # usable from "done" on; its health report follows within seconds ("pending" until then)
        if body["status"] == "failed" or (body["status"] == "done" and body["health"].get("state") != "pending"):
            break
        time.sleep(2)
    assert body["status"] == "done", body
    return body


def _generate(http, key, **body):
    payload = {"prompt": "a house", "steps": 4, "seed": 7, "use_gemini": "off", "response": "json", **body}
    r = http.post("/v1/generate", headers=_auth(key), json=payload)
    assert r.status_code == 200, r.text
    data = r.json()
    return data, base64.b64decode(data["image_base64"])


def _assert_error(r, status, field=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "detail", "field"}, body
    assert "Traceback" not in r.text and 'File "' not in r.text
    if field is not None:
        assert body["field"] == field, body
    return body


# -- tests that run while training runs -------------------------------------------------------------------
def test_training_started_and_a_second_job_is_refused(service, training_job):
    http, key = service["client"], service["keys"]["acme"]
    r = http.post("/v1/loras", headers=_auth(key), files={"refs": ("refs.zip", training_job["zip"], "application/zip")})
    body = _assert_error(r, 429)
    assert "Retry-After" in r.headers and "training" in body["detail"]
    status = http.get(f"/v1/loras/{training_job['id']}", headers=_auth(key)).json()
    assert status["status"] in ("queued", "preparing", "caching", "training", "done")


def test_health_docs_and_metrics(http):
    health = http.get("/healthz").json()  # serve.run returned: the Generator runs, which /healthz learns from Serve
    assert health["status"] == "ok" and health["generator"] == "ready", health
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/loras", "/v1/loras/{lora_id}", "/v1/style-profile"} <= set(paths)
    text = http.get("/metrics").text
    assert "klein_http_requests_total" in text and "klein_http_request_seconds_bucket" in text


def test_auth_is_required_and_checked(http, service):
    _assert_error(http.get("/v1/loras"), 401, "authorization")
    _assert_error(http.get("/v1/loras", headers=_auth("ks_000000000000_wrong")), 401, "authorization")
    _assert_error(http.post("/v1/generate", json={"prompt": "x"}, headers={"X-API-Key": "nope"}), 401)
    assert http.get("/v1/loras", headers={"X-API-Key": service["keys"]["acme"]}).status_code == 200


def test_bad_requests_get_json_errors_with_the_field(http, service):
    key = service["keys"]["acme"]
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "a", "width": 100}), 422, "width")
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "a", "height": 4096}), 422, "height")
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "a", "steps": 0}), 422, "steps")
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"width": 64}), 422, "prompt")
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "a", "fusion": "magic"}), 422, "fusion")
    assert _assert_error(http.post("/v1/generate", headers={**_auth(key), "Content-Type": "application/json"},
                                   content=b"{nope"), 400)["error"] == "invalid_json"
    _assert_error(http.post("/v1/generate", headers={**_auth(key), "Content-Type": "text/plain"},
                            content=b'{"prompt": "a"}'), 415, "content-type")
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "a", "lora_id": "../../etc/passwd"}), 404, "lora_id")
    _assert_error(http.get("/v1/loras/..%2F..%2Fauth", headers=_auth(key)), 404)
    _assert_error(http.get("/v1/nothing-here", headers=_auth(key)), 404)
    other = service["keys"]["globex"]  # acme has a training job running: its POST /v1/loras would be a 429
    _assert_error(http.post("/v1/loras", headers=_auth(other), json={"source_uri": "/etc"}), 422, "source_uri")
    _assert_error(http.post("/v1/loras", headers=_auth(other), json={"source_uri": service["storage"].uri}), 422,
                  "source_uri")
    _assert_error(http.post("/v1/loras", headers=_auth(other), files={"refs": ("r.zip", b"not a zip", "application/zip")}),
                  422, "refs")
    _assert_error(http.post("/v1/loras", headers={**_auth(other), "Content-Type": "text/plain"}, content=b"hi"), 415)
    _assert_error(http.post("/v1/loras", headers=_auth(other), content=b"x" * (6 * 1024 * 1024)), 413)


def test_base_generation_is_deterministic(http, service):
    key = service["keys"]["acme"]
    r1 = http.post("/v1/generate", headers=_auth(key), json={"prompt": "a house", "steps": 4, "seed": 3})
    r2 = http.post("/v1/generate", headers=_auth(key), json={"prompt": "a house", "steps": 4, "seed": 3})
    assert r1.status_code == 200 and r1.headers["content-type"] == "image/png"
    assert r1.content == r2.content
    assert _pixels(r1.content).shape == (64, 64, 3)  # tiny default size


def test_tenant_isolation_on_every_endpoint(http, service, synthetic):
    a, b = service["keys"]["acme"], service["keys"]["globex"]
    listed_a = {item["id"] for item in http.get("/v1/loras", headers=_auth(a)).json()["loras"]}
    listed_b = {item["id"] for item in http.get("/v1/loras", headers=_auth(b)).json()["loras"]}
    assert "syn-a1" in listed_a and "syn-b1" not in listed_a
    assert listed_b == {"syn-b1"}
    assert http.get("/v1/loras/syn-a1", headers=_auth(a)).status_code == 200
    attempts = (
        http.get("/v1/loras/syn-a1", headers=_auth(b)),
        http.delete("/v1/loras/syn-a1", headers=_auth(b)),
        http.get("/v1/loras/syn-a1/files/lora.safetensors", headers=_auth(b)),
        http.post("/v1/generate", headers=_auth(b), json={"prompt": "x", "steps": 2, "lora_id": "syn-a1"}),
        http.post("/v1/generate", headers=_auth(b), json={"prompt": "x", "steps": 2,
                                                          "loras": [{"id": "syn-b1"}, {"id": "syn-a1"}]}),
        http.post("/v1/style-profile", headers=_auth(b), json={"lora_id": "syn-a1"}),
    )
    reliability.record("cross_tenant", len(attempts), sum(r.status_code == 404 for r in attempts), "test_serve_http")
    for r in attempts:
        body = _assert_error(r, 404)
        assert "syn-a1" not in body["detail"] or "not found" in body["detail"]
    # a missing id answers exactly like someone else's
    assert http.get("/v1/loras/syn-zz", headers=_auth(b)).json() == http.get("/v1/loras/syn-a1", headers=_auth(b)).json()
    assert http.get("/v1/loras/syn-a1", headers=_auth(a)).status_code == 200  # B's DELETE did nothing


def test_linear_fusion_equals_the_merged_lora_in_process(http, service, synthetic):
    from klein.generate import GenerateRequest, generate_image, set_active_loras
    from klein.model import load_pipeline
    from serve.fusion import linear_merge

    key = service["keys"]["acme"]
    data, png = _generate(http, key, loras=[{"id": "syn-a1", "weight": 0.7}, {"id": "syn-a2", "weight": 0.5}],
                          fusion="linear")
    assert data["fusion"]["method"] == "linear" and data["fusion"]["rank"] == 8
    again, png2 = _generate(http, key, loras=[{"id": "syn-a1", "weight": 0.7}, {"id": "syn-a2", "weight": 0.5}],
                            fusion="linear")
    assert again["fusion"]["cached"] and png2 == png
    pipe = load_pipeline("tiny")
    set_active_loras(pipe, [("merged", linear_merge([synthetic["syn-a1"], synthetic["syn-a2"]], [0.7, 0.5]), 1.0)])
    expected = generate_image(pipe, GenerateRequest(prompt=data["prompt"], seed=7, steps=4, width=64, height=64))
    assert np.array_equal(_pixels(png), np.asarray(expected.convert("RGB")))


def test_klora_fusion_runs_and_mixes(http, service, synthetic):
    key = service["keys"]["acme"]
    data, png = _generate(http, key, loras=[{"id": "syn-a1"}, {"id": "syn-a3"}], fusion="klora")
    assert data["fusion"]["method"] == "klora"
    assert data["fusion"]["scores_on"] == "fusion"  # CPU-only service: the Fusion replica scores them itself
    _, single1 = _generate(http, key, lora_id="syn-a1")
    _, base = _generate(http, key)
    assert not np.array_equal(_pixels(png), _pixels(base))
    assert not np.array_equal(_pixels(png), _pixels(single1))  # the style LoRA takes some layers late on
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={
        "prompt": "x", "steps": 2, "fusion": "klora",
        "loras": [{"id": i} for i in ("syn-a1", "syn-a2", "syn-a3", "syn-a4")]}), 422, "loras")


def test_adapter_eviction_frees_memory(http, service, synthetic, transformer):
    from ray import serve

    key = service["keys"]["acme"]
    handle = serve.get_deployment_handle("Generator", app_name=APP)
    base_params = sum(p.numel() for p in transformer.parameters())
    per_lora = sum(l.down.numel() + l.up.numel() for l in synthetic["syn-a2"].layers.values())
    seen = []
    for lora_id in ("syn-a2", "syn-a3", "syn-a4"):
        _generate(http, key, lora_id=lora_id)
        stats = handle.stats.remote().result()
        seen.append(stats)
    # max_loras_per_replica=2: the third set evicts the least recently used one, and its parameters go
    assert len(seen[-1]["resident_adapters"]) == 2
    assert seen[-1]["parameters"] == base_params + 2 * per_lora
    resident = {lora_id: set(_adapter_names_of(service["storage"], "acme", lora_id)) for lora_id in ("syn-a2", "syn-a3", "syn-a4")}
    assert resident["syn-a2"] <= set(seen[0]["resident_adapters"]) and resident["syn-a3"] <= set(seen[1]["resident_adapters"])
    assert set(seen[-1]["resident_adapters"]) == resident["syn-a3"] | resident["syn-a4"]  # the LRU one (a2) went


def _adapter_names_of(storage, tenant: str, lora_id: str) -> list[str]:
    """The adapter names a generator replica gives this stored LoRA when it is used alone."""
    sha = storage.read_json(f"tenants/{tenant}/loras/{lora_id}/manifest.json")["files"]["lora.safetensors"]
    return adapter_names(adapter_set_id([{"key": f"tenants/{tenant}/loras/{lora_id}/lora.safetensors", "sha256": sha}]), 1)


def test_style_profile_from_images(http, service, training_job):
    key = service["keys"]["acme"]
    with zipfile.ZipFile(io.BytesIO(training_job["zip"])) as z:
        images = [(n, z.read(n)) for n in z.namelist() if n.endswith(".png")][:3]
    r = http.post("/v1/style-profile", headers=_auth(key),
                  files=[("images", (n, data, "image/png")) for n, data in images])
    assert r.status_code == 200, r.text
    assert r.json()["profile"]["schema_version"]
    _assert_error(http.post("/v1/style-profile", headers=_auth(key),
                            files=[("images", ("x.png", b"not a picture", "image/png"))]), 422, "images")


def test_rate_limit_answers_429_with_retry_after(http, service):
    """Tenant `hammer` (5 requests/s, bursts of 40, one bucket for the whole cluster) sends 120 requests from 8
    threads: the first burst passes, the rest get 429 with Retry-After until tokens refill."""
    from concurrent.futures import ThreadPoolExecutor

    key = service["keys"]["hammer"]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: http.get("/v1/loras", headers=_auth(key)), range(120)))
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 40 <= codes.count(200) <= 40 + 5 * elapsed + 1, (codes.count(200), elapsed)
    if 40 + 5 * elapsed + 1 < 120:  # tokens for all 120 only if a loaded machine took over 16 s to send them
        assert 429 in codes, (codes.count(200), elapsed)
    for r in responses:
        if r.status_code == 429:
            assert _assert_error(r, 429)["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    reliability.record("requests", len(responses), len(responses), "test_serve_http rate limit")


# -- tests that need the trained LoRA ----------------------------------------------------------------------
def test_trained_lora_status_and_files(http, service, trained):
    key = service["keys"]["acme"]
    assert trained["metrics"]["steps"] == 20 and trained["decision"]["variant"]
    assert "text_stage" in trained["decision"]
    assert set(trained["files"]) >= {"contact_sheet.png", "loss.png", "health.png", "health.md"}
    # the health report: a verdict on each of the seeds' symptoms, and its picture and Markdown to download
    assert len(trained["health"]["symptoms"]) == 6 and trained["health"]["overall"] in ("ok", "warn", "fail")
    assert trained["health"]["recommended_step"] in (10, 20)
    report = http.get(trained["files"]["health.md"], headers=_auth(key))
    assert report.status_code == 200 and report.text.startswith(f"# Health of LoRA `{trained['id']}`")
    sheet = http.get(trained["files"]["contact_sheet.png"], headers=_auth(key))
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(sheet.content)).verify()
    _assert_error(http.get(f"/v1/loras/{trained['id']}/files/manifest.json", headers=_auth(key)), 404, "name")
    # the ComfyUI export is listed and downloaded under its job's own name (ComfyUI's loras folder is flat)
    comfy_name = f"{trained['id']}_zxy_neon.safetensors"
    comfy = http.get(trained["files"][comfy_name], headers=_auth(key))
    assert comfy.status_code == 200 and comfy.headers["content-disposition"] == f'attachment; filename="{comfy_name}"'
    # the LoRA under the job's name (the job id, where the request named none), and under the old fixed name
    named = http.get(trained["files"][f"{trained['id']}.safetensors"], headers=_auth(key))
    assert named.status_code == 200
    assert named.headers["content-disposition"] == f'attachment; filename="{trained["id"]}.safetensors"'
    old_name = http.get(trained["files"]["lora.safetensors"], headers=_auth(key))
    assert old_name.status_code == 200 and old_name.content == named.content
    assert trained["id"] in {i["id"] for i in http.get("/v1/loras", headers=_auth(key)).json()["loras"]}


def test_generate_with_the_trained_lora_matches_in_process(http, service, trained):
    from klein.generate import GenerateRequest, generate_image, set_active_loras
    from klein.lora import read_lora
    from klein.model import load_pipeline

    key, storage = service["keys"]["acme"], service["storage"]
    data, png = _generate(http, key, lora_id=trained["id"], use_gemini="auto", seed=11)
    assert data["gemini_source"] in ("offline", "gemini", "none")
    assert "zxy_neon" in data["prompt"]
    _, base_png = _generate(http, key, prompt=data["prompt"], seed=11)
    assert not np.array_equal(_pixels(png), _pixels(base_png))
    manifest = storage.read_json(f"tenants/acme/loras/{trained['id']}/manifest.json")
    lora = read_lora(storage.read_verified(f"tenants/acme/loras/{trained['id']}/lora.safetensors",
                                           manifest["files"]["lora.safetensors"]))
    pipe = load_pipeline("tiny")
    set_active_loras(pipe, [("trained", lora, 1.0)])
    expected = generate_image(pipe, GenerateRequest(prompt=data["prompt"], seed=11, steps=4, width=64, height=64))
    assert np.array_equal(_pixels(png), np.asarray(expected.convert("RGB")))
    r = http.post("/v1/style-profile", headers=_auth(key), json={"lora_id": trained["id"]})
    assert r.status_code == 200 and r.json()["profile"]


def test_delete_removes_the_lora(http, service, trained):
    key = service["keys"]["acme"]
    assert http.delete(f"/v1/loras/{trained['id']}", headers=_auth(key)).json()["deleted"] is True
    _assert_error(http.get(f"/v1/loras/{trained['id']}", headers=_auth(key)), 404)
    _assert_error(http.post("/v1/generate", headers=_auth(key), json={"prompt": "x", "lora_id": trained["id"]}), 404)


def test_cli_client_generates_and_reports_errors(http, service, tmp_path, capsys):
    from types import SimpleNamespace

    from cli.client import generate_remote

    args = SimpleNamespace(prompt="a house", lora=["syn-a1"], seed=1, steps=3, width=64, height=64, guidance=4.0,
                           negative_prompt="", output=str(tmp_path / "out.png"), url=f"http://127.0.0.1:{PORT}",
                           api_key=service["keys"]["acme"], use_gemini="off")
    assert generate_remote(args) == 0
    assert _pixels((tmp_path / "out.png").read_bytes()).shape == (64, 64, 3)
    args.api_key = "ks_000000000000_wrong"
    assert generate_remote(args) == 2
    assert "HTTP 401" in capsys.readouterr().err
    args.api_key, args.width = service["keys"]["acme"], 70
    assert generate_remote(args) == 2
    assert "field: width" in capsys.readouterr().err


# -- request bounds (issue 20): slow bodies, stalled connections, key guessing --------------------------------
def _slow_request(path: str = "/v1/generate", body: bytes = b'{"pro', declared: int | None = 1000,
                  chunked: bool = False) -> socket.socket:
    """A raw connection that sends its headers and part of a body, then stalls (the caller may trickle more)."""
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=15)
    length = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {declared}\r\n"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{length}\r\n".encode()
                 + body)
    return sock


def _status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.reliability("faults")
def test_stalled_bodies_do_not_lock_tenants_out_and_are_cut_off(http, service):
    """More stalled uploads than the in-flight limit: other requests are still answered (a request counts in
    flight only once its body is in), and each stalled one gets a JSON 408 at the body deadline."""
    key = service["keys"]["acme"]
    stalled = [_slow_request() for _ in range(INFLIGHT + 4)]
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        r = http.get("/v1/loras", headers=_auth(key))
        # answered, not refused: the stalled uploads are not counted in flight (a time bound here measured the
        # machine's load, not the product: the 408s below bound the whole exchange)
        assert r.status_code == 200, r.text
        for sock in stalled:
            assert b" 408 " in _status_line(sock) + b" "
        assert time.monotonic() - t0 < LIMITS["body_timeout_s"] + 4
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.reliability("faults")
def test_a_trickling_body_and_an_endless_chunked_body_get_408(http, service):
    trickle = _slow_request(body=b'{', declared=200)
    chunked = _slow_request(body=b"1\r\n{\r\n", chunked=True)
    t0 = time.monotonic()
    try:
        for _ in range(8):  # a byte every 0.4 s: never idle for body_idle_s, but never done either
            if time.monotonic() - t0 > LIMITS["body_timeout_s"] + 1:
                break
            for sock, piece in ((trickle, b" "), (chunked, b"1\r\n \r\n")):
                try:
                    sock.sendall(piece)
                except OSError:
                    pass  # the server answered (408) and closed this one already
            time.sleep(0.4)
        for sock in (trickle, chunked):
            sock.settimeout(10)
            line = _status_line(sock)
            assert b" 408 " in line + b" ", line
        assert time.monotonic() - t0 < LIMITS["body_timeout_s"] + 5
    finally:
        trickle.close()
        chunked.close()


@pytest.mark.reliability("bad_inputs")
def test_failed_authentication_is_rate_limited_per_client(http, service):
    # The guesses come from their own loopback address (127.0.0.2): the limit is per client address, so the
    # module's other tests (127.0.0.1) keep their budget, and this test depends on no other test's guesses.
    burst, per_s = LIMITS["auth_failure_burst"], LIMITS["auth_failures_per_s"]
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120, event_hooks={"response": [_record]},
                      transport=httpx.HTTPTransport(local_address="127.0.0.2")) as guesser:
        started = time.monotonic()
        answers = [guesser.get("/v1/loras", headers=_auth(f"ks_{i:012d}_guess")) for i in range(12)]
        elapsed = time.monotonic() - started
        statuses = [a.status_code for a in answers]
        # The burst, then at most one guess back per 1/per_s seconds (however slow this machine was): the
        # rest are refused before their key is looked at.
        assert statuses[:burst] == [401] * burst and set(statuses) == {401, 429}, statuses
        assert statuses.count(401) <= burst + int(elapsed * per_s) + 1, (statuses, elapsed)
        for refused in (a for a in answers if a.status_code == 429):
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"] == "rate_limited" and refused.json()["field"] == "authorization"
        # while blocked, even a valid key is refused: the address is out of attempts before its key is looked at
        # (a guess comes back only every 10 s, and the guesses above take well under a second)
        valid = guesser.get("/v1/loras", headers=_auth(service["keys"]["acme"]))
        assert valid.status_code == 429 and valid.json()["field"] == "authorization", (valid.text, elapsed)
        assert guesser.get("/v1/loras").status_code == 401  # no key at all is not a guess: not counted, not blocked
        # another address is not blocked by this one's guesses
        assert http.get("/v1/loras", headers=_auth(service["keys"]["acme"])).status_code == 200
        time.sleep(1 / per_s)  # a guess comes back: a valid key from the address works again
        assert guesser.get("/v1/loras", headers=_auth(service["keys"]["acme"])).status_code == 200


# -- issue 23: the user's LoRA weight and the stored LoRA's integrity, where serving uses them -----------------
def test_a_single_lora_at_weight_half_draws_what_the_pipeline_draws_at_half(http, service, synthetic):
    """One LoRA at weight 0.5 over HTTP gives the in-process pipeline's pixels at 0.5, not those at 1.0."""
    key = service["keys"]["acme"]
    data, png = _generate(http, key, loras=[{"id": "syn-a1", "weight": 0.5}])
    assert data["loras"] == [{"id": "syn-a1", "weight": 0.5}] and data["fusion"]["method"] == "single"
    pipe = load_pipeline("tiny")
    request = GenerateRequest(prompt=data["prompt"], seed=7, steps=4, width=64, height=64)
    set_active_loras(pipe, [("a1", synthetic["syn-a1"], 0.5)])
    at_half = np.asarray(generate_image(pipe, request).convert("RGB"))
    set_active_loras(pipe, [("a1", None, 1.0)])
    at_one = np.asarray(generate_image(pipe, request).convert("RGB"))
    assert not np.array_equal(at_half, at_one)  # the weight matters for this LoRA at all
    assert np.array_equal(_pixels(png), at_half)


def _tampered(storage, lora_id: str, lora) -> str:
    """Store `lora` for acme like a trained one, then change bytes of its weights (not of its header): the file
    still parses as safetensors, only its sha256 tells. Returns the weights' key."""
    store_lora(storage, "acme", lora_id, lora)
    key = f"tenants/acme/loras/{lora_id}/lora.safetensors"
    data = bytearray(storage.read_bytes(key))
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    storage.local_path(key).write_bytes(bytes(data))
    return key


def test_a_tampered_stored_lora_is_refused_by_generate_fusion_and_download(http, service, synthetic, transformer):
    """A stored LoRA whose bytes no longer match the sha256 in its manifest is never used: generate (single),
    both fusions and the file download answer a JSON integrity error, and nothing stored changes."""
    key, storage = service["keys"]["acme"], service["storage"]
    weights_key = _tampered(storage, "syn-bad", random_lora(transformer, rank=4, scale=0.05, seed=321))
    folder = "tenants/acme/loras/syn-bad"
    before = {k: storage.read_bytes(k) for k in storage.list(folder)}
    fused_before = storage.list(FUSED_PREFIX, recursive=True)
    attempts = {
        "single": http.post("/v1/generate", headers=_auth(key), json={"prompt": "x", "steps": 2, "lora_id": "syn-bad"}),
        "weighted": http.post("/v1/generate", headers=_auth(key), json={"prompt": "x", "steps": 2,
                                                                        "loras": [{"id": "syn-bad", "weight": 0.5}]}),
        "linear": http.post("/v1/generate", headers=_auth(key), json={
            "prompt": "x", "steps": 2, "fusion": "linear", "loras": [{"id": "syn-a1"}, {"id": "syn-bad"}]}),
        "klora": http.post("/v1/generate", headers=_auth(key), json={
            "prompt": "x", "steps": 2, "fusion": "klora", "loras": [{"id": "syn-a1"}, {"id": "syn-bad"}]}),
        "download": http.get("/v1/loras/syn-bad/files/lora.safetensors", headers=_auth(key)),
    }
    for what, r in attempts.items():
        body = _assert_error(r, 500)
        assert body["error"] == "integrity_error", (what, body)
        assert "sha256" in body["detail"] and "manifest" in body["detail"], (what, body)
        assert str(storage.root) not in r.text, (what, r.text)  # no server paths in the answer
    assert {k: storage.read_bytes(k) for k in storage.list(folder)} == before
    assert storage.read_bytes(weights_key) == before[weights_key]  # refused, not repaired or rewritten
    assert storage.list(FUSED_PREFIX, recursive=True) == fused_before  # no fusion of it stored
    # and the service is fine: the same LoRAs untampered still generate
    _generate(http, key, lora_id="syn-a1")


# -- the HTTP contract: the typed client on every endpoint, and every answer of this module against /openapi.json --
def test_klein_style_serve_listens_where_its_config_file_says(service):
    http_options = service["plan"].start_options["http_options"]
    assert http_options == {"host": "127.0.0.1", "port": PORT, "request_timeout_s": 300}  # the file's, as written
    assert PORT != 8000  # neither Serve's default nor the command's: every test here reached the file's port


@pytest.fixture(scope="module")
def typed_client_calls(service, synthetic, transformer, training_job):
    """Every endpoint through the typed clients (sync and async), each answer checked as it comes; the answers are
    recorded for the contract test below."""
    url, acme = f"http://127.0.0.1:{PORT}", service["keys"]["acme"]
    lora = lora_to_bytes(random_lora(transformer, rank=4, scale=0.05, seed=7))
    with Client(url, api_key=acme, timeout=120, event_hooks={"response": [_record]}) as client:
        assert client.health().generator == "ready"
        assert "klein_http_requests_total" in client.metrics()
        imported = client.import_lora(lora, trigger="zxy_imp")
        assert imported.status == "done" and imported.rank == 4
        assert imported.id in {item.id for item in client.list_loras().loras}
        status = client.get_lora(imported.id)
        assert status.status == "done" and status.trigger == "zxy_imp" and "lora.safetensors" in status.files
        assert client.download_file(imported.id, "lora.safetensors")[:8]  # our safetensors, as stored
        result = client.generate("a house", lora_id=imported.id, steps=2, use_gemini="off", seed=5)
        assert result.loras[0].id == imported.id and result.fusion.method == "single" and "zxy_imp" in result.prompt
        png = client.generate_png("a house", loras=[{"id": "syn-a1", "weight": 0.5}, {"id": "syn-a2"}], steps=2,
                                  use_gemini="off")
        assert _pixels(png).shape == (64, 64, 3)
        assert client.style_profile(imported.id, use_gemini="off").source == "lora"
        with pytest.raises(ApiError) as missing:
            client.get_lora("j-00000000-nothing")
        assert missing.value.status == 404 and missing.value.error == "not_found"
        with pytest.raises(ApiError) as bad:
            client.generate("a house", width=70)
        assert (bad.value.status, bad.value.field) == (422, "width")
        assert client.delete_lora(imported.id).deleted is True

    async def from_images():
        async with AsyncClient(url, api_key=service["keys"]["globex"], timeout=120,
                               event_hooks={"response": [_record_async]}) as client:
            return await client.style_profile_from_images([png], use_gemini="off")

    assert asyncio.run(from_images()).source == "images"
    with Client(url, event_hooks={"response": [_record]}) as anonymous, pytest.raises(ApiError) as refused:
        anonymous.list_loras()
    assert refused.value.status == 401 and refused.value.field == "authorization"
    return imported.id


def _strict(node):
    """A schema in which an object with listed properties has no others: a renamed or extra field fails."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _operation(document: dict, method: str, path: str) -> tuple[str, dict] | tuple[None, None]:
    for template, operations in document["paths"].items():
        if method.lower() in operations and re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            return template, operations[method.lower()]
    return None, None


def test_the_typed_clients_reach_every_endpoint_and_every_answer_matches_the_openapi_document(http, typed_client_calls):
    """The module's last test: each answer its clients got (every endpoint through the typed clients, and, in a run
    of the whole module, the other tests' answers and errors of every kind) has a documented status and content type,
    and its JSON body validates against the documented schema with jsonschema. Every documented operation answered
    2xx at least once."""
    document = http.get("/openapi.json").json()
    components = _strict(document["components"])
    assert {"bearerAuth", "apiKeyHeader"} <= set(components["securitySchemes"])
    problems, answered = [], set()
    for answer in RECORDED:
        where = f"{answer['method']} {answer['path']} -> {answer['status']}"
        template, operation = _operation(document, answer["method"], answer["path"])
        media_type = answer["type"].split(";")[0].strip()
        if operation is None:
            if answer["path"] in ("/openapi.json", "/docs", "/metrics"):
                continue
            schema = {"$ref": "#/components/schemas/ErrorBody"}  # no such route: still the one error shape
            if answer["status"] < 400:
                problems.append(f"{where}: not in the document")
                continue
        else:
            documented = operation["responses"].get(str(answer["status"]))
            if documented is None:
                problems.append(f"{where}: status not documented ({sorted(operation['responses'])})")
                continue
            if media_type not in documented.get("content", {}):
                problems.append(f"{where}: content type {media_type} not documented ({sorted(documented['content'])})")
                continue
            if 200 <= answer["status"] < 300:
                answered.add((answer["method"], template))
            schema = documented["content"][media_type].get("schema", {})
        if media_type == "application/json":
            errors = list(Draft202012Validator({**schema, "components": components}).iter_errors(
                httpx.Response(200, content=answer["body"]).json()))
            problems += [f"{where}: {e.message} at {list(e.absolute_path)}" for e in errors[:2]]
    every = {(method.upper(), template) for template, ops in document["paths"].items() for method in ops}
    assert not problems, f"{len(problems)} answer(s) do not match /openapi.json:\n" + "\n".join(problems[:20])
    assert every <= answered, f"documented but never answered 2xx: {sorted(every - answered)}"

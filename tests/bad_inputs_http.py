"""The bad-input corpus of the HTTP API and of uploaded LoRA files, built in code (no binary blobs).

Each `HttpCase` builds one request (httpx keyword arguments) from a `Ctx` (the tenants' keys, their
LoRAs, the upload limit, a scratch folder) and says exactly what the API must answer: the status, the
`error` code, the `field` at fault and a regex the `detail` must match. `kind` says what the case is:

- `bad`: an invalid request or file, refused with that specific error;
- `unusual`: a valid-but-unusual picture (CMYK, 16-bit, EXIF-rotated, grayscale, ...), accepted (200);
- `cross_tenant`: another tenant's LoRA, refused exactly like one that does not exist.

The runner (tests/test_reliability_serve.py) checks every case against a snapshot of every file in the
service's storage: no case may change anything stored. `REF_CASES` sends every refused case of the
image/zip corpus (tests/bad_inputs.py) through the real upload endpoint as a zip; `LORA_FILES` are the
LoRA-file cases (a FLUX.1 LoRA, pickles, NaN weights, ...) for POST /v1/loras/import.

    python tests/bad_inputs_http.py OUT_DIR     # writes the LoRA files and ref zips, for a look by hand
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

try:
    from tests import bad_inputs
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import bad_inputs


@dataclass
class Ctx:
    keys: dict[str, str]  # tenant -> API key
    own_loras: list[str]  # ready LoRAs of tenant "acme" (at least 4)
    other_lora: str  # a ready LoRA of tenant "globex"
    storage_uri: str
    max_upload_bytes: int
    scratch: Path  # where cases build their files
    transformer: Any  # the served model's transformer (tiny), for LoRA files of the right (or wrong) shapes
    pickle_marker: Path  # a pickle that is ever unpickled creates this file


@dataclass(frozen=True)
class HttpCase:
    name: str
    build: Callable[[Ctx], dict]  # httpx.request keyword arguments (method, url, json/content/files/data/headers)
    status: int
    error: str | None = None  # the `error` code (None for accepted cases)
    field: str | None = None
    detail: str = ""  # regex the `detail` must match
    tenant: str | None = "acme"  # whose key the request carries; None: no key
    kind: str = "bad"  # bad | unusual | cross_tenant
    check: Callable[[Ctx, Any], None] | None = None  # more assertions on (ctx, response)


# -- request builders ---------------------------------------------------------------------------------------
def generate(**body: Any) -> Callable[[Ctx], dict]:
    payload = {"prompt": "a house", "steps": 1, "use_gemini": "off", **body}
    return lambda ctx: {"method": "POST", "url": "/v1/generate", "json": payload}


def good_refs_zip() -> bytes:
    """Three valid, distinct PNGs: a zip that passes every check (for cases whose fault lies elsewhere)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in bad_inputs.good_files(3, start_seed=700).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def train_upload(zip_bytes: bytes | None = None, filename: str = "refs.zip", **fields: str) -> Callable[[Ctx], dict]:
    def build(ctx: Ctx) -> dict:
        files = {"refs": (filename, good_refs_zip() if zip_bytes is None else zip_bytes, "application/zip")}
        return {"method": "POST", "url": "/v1/loras", "files": files, "data": fields}
    return build


def train_json(body: Any, raw: bytes | None = None) -> Callable[[Ctx], dict]:
    def build(ctx: Ctx) -> dict:
        if raw is not None:
            return {"method": "POST", "url": "/v1/loras", "content": raw, "headers": {"Content-Type": "application/json"}}
        return {"method": "POST", "url": "/v1/loras", "json": body(ctx) if callable(body) else body}
    return build


def import_lora(make: Callable[[Ctx], bytes], filename: str = "style.safetensors", **fields: str) -> Callable[[Ctx], dict]:
    def build(ctx: Ctx) -> dict:
        return {"method": "POST", "url": "/v1/loras/import",
                "files": {"lora": (filename, make(ctx), "application/octet-stream")}, "data": fields}
    return build


def profile_images(*pictures: tuple[str, bytes]) -> Callable[[Ctx], dict]:
    def build(ctx: Ctx) -> dict:
        return {"method": "POST", "url": "/v1/style-profile", "data": {"use_gemini": "off"},
                "files": [("images", (name, data, "application/octet-stream")) for name, data in pictures]}
    return build


def _chunked_multipart(total: int, size: int = 64 * 1024):
    """A well-formed multipart upload sent in chunks with no Content-Length, `total` bytes of file content."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="refs"; filename="refs.zip"\r\n'
           b"Content-Type: application/zip\r\n\r\n")
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"x" * n
    yield b"\r\n--xyz--\r\n"


# -- LoRA files -----------------------------------------------------------------------------------------------
class PickleBomb:
    """Unpickling this creates `path` (harmless, but proof that a pickle was loaded)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state(ctx: Ctx, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA state dict that fits the served model (diffusers keys), seeded."""
    from klein.lora import to_diffusers_state
    from serve.testing import random_lora

    state, _ = to_diffusers_state(random_lora(ctx.transformer, rank=rank, scale=0.05, seed=5))
    return state


def lora_good(ctx: Ctx) -> bytes:
    return st_save(_state(ctx))


def lora_nan(ctx: Ctx) -> bytes:
    state = _state(ctx)
    first = sorted(state)[0]
    state[first] = state[first].clone()
    state[first][0, 0] = float("nan")
    return st_save(state)


def lora_inf(ctx: Ctx) -> bytes:
    state = _state(ctx)
    last = sorted(state)[-1]
    state[last] = state[last].clone()
    state[last][-1, -1] = float("inf")
    return st_save(state)


def lora_flux1_kohya(ctx: Ctx) -> bytes:
    """A FLUX.1 LoRA as kohya/musubi write them: hidden 3072, fused qkv, MLP 12288 (wrong shapes for Klein)."""
    gen = torch.Generator().manual_seed(1)
    rank, hidden = 4, 3072
    state = {}
    for block, out_features in (("double_blocks_0_img_attn_qkv", 3 * hidden), ("double_blocks_0_img_attn_proj", hidden),
                                ("single_blocks_0_linear2", hidden)):
        in_features = hidden if "linear2" not in block else hidden + 4 * hidden
        state[f"lora_unet_{block}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
        state[f"lora_unet_{block}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
        state[f"lora_unet_{block}.alpha"] = torch.tensor(float(rank))
    return st_save(state)


def lora_torch_pickle(ctx: Ctx) -> bytes:
    buffer = io.BytesIO()
    torch.save({"transformer.x.lora_A.weight": PickleBomb(ctx.pickle_marker)}, buffer)
    return buffer.getvalue()


def lora_raw_pickle(ctx: Ctx) -> bytes:
    return pickle.dumps({"weights": PickleBomb(ctx.pickle_marker)}, protocol=4)


def lora_truncated(ctx: Ctx) -> bytes:
    data = lora_good(ctx)
    return data[: len(data) - 200]


def lora_header_lies(ctx: Ctx) -> bytes:
    """A header length far past the end of the file (a classic parser attack)."""
    return struct.pack("<Q", 1 << 40) + b'{"__metadata__": {}}'


def lora_no_lora_keys(ctx: Ctx) -> bytes:
    return st_save({"model.diffusion.weight": torch.zeros(4, 4)})


def lora_missing_up(ctx: Ctx) -> bytes:
    state = _state(ctx)
    return st_save({k: v for k, v in state.items() if not k.endswith("lora_B.weight")})


def lora_one_dimensional(ctx: Ctx) -> bytes:
    state = _state(ctx)
    first = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    state[first] = torch.zeros(4)
    return st_save(state)


def lora_wrong_inner_dim(ctx: Ctx) -> bytes:
    state = _state(ctx)
    first = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    rank, width = state[first].shape
    state[first] = torch.zeros(rank, width + 8)
    return st_save(state)


def lora_rank_zero(ctx: Ctx) -> bytes:
    """Every layer of rank 0 (lora_A [0, in], lora_B [out, 0]): K-LoRA's top-k with k = 0 never ended."""
    state = _state(ctx)
    return st_save({k: (v[:0] if k.endswith("lora_A.weight") else v[:, :0]).contiguous() for k, v in state.items()})


def _with_adapter_metadata(ctx: Ctx, text: str) -> bytes:
    return st_save(_state(ctx), metadata={"lora_adapter_metadata": text})


def lora_rank_mismatch(ctx: Ctx) -> bytes:
    state = _state(ctx)
    first = sorted(k for k in state if k.endswith("lora_B.weight"))[0]
    state[first] = state[first][:, :3].contiguous()  # B has 3 columns, A 4 rows
    return st_save(state)


def lora_comfyui_alpha(value: float) -> Callable[[Ctx], bytes]:
    def make(ctx: Ctx) -> bytes:
        from klein.lora import export_lora
        from serve.testing import random_lora

        state = st_load(export_lora(random_lora(ctx.transformer, rank=4, scale=0.05, seed=5), "comfyui"))
        first = sorted(k for k in state if k.endswith(".alpha"))[0]
        state[first] = torch.tensor(value)
        return st_save(state)

    return make


def lora_int_tensors(ctx: Ctx) -> bytes:
    return st_save({k: (v * 100).to(torch.int32) for k, v in _state(ctx).items()})


def lora_outside_the_blocks(ctx: Ctx) -> bytes:
    state = _state(ctx)
    inner = ctx.transformer.x_embedder
    state["transformer.x_embedder.lora_A.weight"] = torch.zeros(4, inner.in_features)
    state["transformer.x_embedder.lora_B.weight"] = torch.zeros(inner.out_features, 4)
    return st_save(state)


def _png_as_lora(ctx: Ctx) -> bytes:
    return bad_inputs.png_bytes(bad_inputs.good_image(3, (64, 64)))


def _check_no_pickle_loaded(ctx: Ctx, response: Any) -> None:
    assert not ctx.pickle_marker.exists(), "a pickle was unpickled: the marker file exists"


LORA_FILES: dict[str, Callable[[Ctx], bytes]] = {
    "good": lora_good, "nan": lora_nan, "inf": lora_inf, "flux1_kohya": lora_flux1_kohya,
    "torch_pickle": lora_torch_pickle, "raw_pickle": lora_raw_pickle, "truncated": lora_truncated,
    "header_lies": lora_header_lies, "no_lora_keys": lora_no_lora_keys, "missing_up": lora_missing_up,
    "one_dimensional": lora_one_dimensional, "wrong_inner_dim": lora_wrong_inner_dim,
    "rank_zero": lora_rank_zero, "rank_mismatch": lora_rank_mismatch, "int_tensors": lora_int_tensors,
    "outside_the_blocks": lora_outside_the_blocks, "comfyui_alpha_nan": lora_comfyui_alpha(float("nan")),
}


def raw_json(method: str, url: str, text: str) -> Callable[[Ctx], dict]:
    return lambda ctx: {"method": method, "url": url, "content": text.encode(),
                        "headers": {"Content-Type": "application/json"}}


def deep_json(depth: int) -> str:
    return '{"lora_id": ' + "[" * depth + "]" * depth + "}"


# -- pictures for the style profile ---------------------------------------------------------------------------
def _img(seed: int, size=(320, 288)):
    return bad_inputs.good_image(seed, size)


UNUSUAL_PICTURES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "cmyk_jpeg": ("cmyk.jpg", bad_inputs.cmyk_jpeg),
    "png_16bit_gray": ("gray16.png", lambda: bad_inputs.encode(Image.new("I;16", (300, 280), 0x8080), "PNG")),
    "png_16bit_rgb": ("rgb16.png", lambda: bad_inputs.png_16bit_rgb(300, 280, (0x1234, 0x8000, 0xFF00))),
    "exif_rotated_jpeg": ("rotated.jpg", bad_inputs.exif_rotated_jpeg),
    "grayscale_png": ("gray.png", lambda: bad_inputs.png_bytes(_img(9).convert("L"))),
    "palette_with_alpha": ("palette.png", bad_inputs._palette_png_with_transparency),
    "unicode_file_name": ("日本の猫 café.png", lambda: bad_inputs.png_bytes(_img(31))),
    "jpeg_named_png": ("photo.png", lambda: bad_inputs.jpeg_bytes(_img(11))),
    "webp_still": ("still.webp", lambda: bad_inputs.encode(_img(12), "WEBP")),
}


def _profile_ok(ctx: Ctx, response: Any) -> None:
    body = response.json()
    assert body["source"] == "images" and body["profile"]["schema_version"], body


# -- the image/zip corpus through the upload endpoint ---------------------------------------------------------
# Cases that do not translate to an upload: the server's own limit replaces `max_upload_bytes=2000`
# (see `upload_over_limit*`), a folder symlink cannot travel in a zip, and "not a zip" is refused before
# the dataset check (see `refs_not_a_zip`).
_NOT_UPLOADABLE = {"zip_over_upload_limit", "broken_symlink_in_folder", "not_a_zip"}


def zip_of(source: Path) -> bytes:
    """A built case as upload bytes: a zip as it is, a folder zipped (names relative to it)."""
    if source.is_file():
        return source.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.writestr(path.relative_to(source).as_posix(), path.read_bytes())
    return buffer.getvalue()


def _ref_case(case: "bad_inputs.Case") -> HttpCase:
    def build(ctx: Ctx) -> dict:
        folder = ctx.scratch / f"refs-{case.name}"
        folder.mkdir(parents=True, exist_ok=True)
        return train_upload(zip_of(case.build(folder)), trigger="zxy_ok")(ctx)

    return HttpCase(f"refs_{case.name}", build, 422, "invalid_request", "refs", case.message)


REF_CASES: list[HttpCase] = [_ref_case(c) for c in bad_inputs.CASES if c.expect == "error" and c.name not in _NOT_UPLOADABLE]


# -- the cases ------------------------------------------------------------------------------------------------
def _other(ctx: Ctx) -> str:
    return ctx.other_lora


CASES: list[HttpCase] = [
    # -- authentication --
    HttpCase("no_api_key", lambda ctx: {"method": "GET", "url": "/v1/loras"}, 401, "unauthorized", "authorization",
             r"no API key", tenant=None),
    HttpCase("wrong_api_key", lambda ctx: {"method": "GET", "url": "/v1/loras",
                                           "headers": {"Authorization": "Bearer ks_000000000000_wrongsecret"}},
             401, "unauthorized", "authorization", r"not valid", tenant=None),
    HttpCase("basic_auth_scheme", lambda ctx: {"method": "GET", "url": "/v1/loras",
                                               "headers": {"Authorization": "Basic YWNtZTpzZWNyZXQ="}},
             401, "unauthorized", "authorization", r"no API key", tenant=None),
    # -- prompts and image parameters --
    HttpCase("prompt_empty", generate(prompt=""), 422, "invalid_request", "prompt", r"at least 1 character"),
    HttpCase("prompt_100k_chars", generate(prompt="a" * 100_000), 422, "invalid_request", "prompt", r"at most 4000 characters"),
    HttpCase("prompt_only_spaces", generate(prompt="   "), 422, "invalid_request", "prompt", r"non-empty"),
    HttpCase("prompt_missing", lambda ctx: {"method": "POST", "url": "/v1/generate", "json": {"steps": 2}},
             422, "invalid_request", "prompt", r"Field required"),
    HttpCase("negative_prompt_too_long", generate(negative_prompt="b" * 5000), 422, "invalid_request", "negative_prompt",
             r"at most 4000"),
    HttpCase("width_not_multiple_of_16", generate(width=100), 422, "invalid_request", "width", r"multiple of 16.*got 100"),
    HttpCase("width_too_small", generate(width=32), 422, "invalid_request", "width", r"between 64 and"),
    HttpCase("height_over_max_side", generate(height=4096), 422, "invalid_request", "height", r"between 64 and 2048, got 4096"),
    HttpCase("width_not_a_number", generate(width="wide"), 422, "invalid_request", "width", r"JSON number, not a string"),
    HttpCase("steps_as_a_string", generate(steps="1"), 422, "invalid_request", "steps", r"JSON number, not a string"),
    HttpCase("width_as_a_boolean", generate(width=True), 422, "invalid_request", "width", r"JSON number, not a boolean"),
    HttpCase("guidance_as_a_string", generate(guidance="3.5"), 422, "invalid_request", "guidance", r"not a string"),
    HttpCase("prompt_with_carriage_return", generate(prompt="a house\r\nX-Injected: 1"), 422, "invalid_request", "prompt",
             r"control characters.*'\\r'"),
    HttpCase("prompt_with_nul", generate(prompt="a\x00house"), 422, "invalid_request", "prompt", r"control characters"),
    HttpCase("prompt_with_escape", generate(prompt="\x1b[31ma red house"), 422, "invalid_request", "prompt",
             r"control characters"),
    HttpCase("negative_prompt_with_delete", generate(negative_prompt="blur\x7f"), 422, "invalid_request",
             "negative_prompt", r"control characters"),
    HttpCase("prompt_not_a_string", generate(prompt=["a", "house"]), 422, "invalid_request", "prompt", r"valid string"),
    HttpCase("steps_zero", generate(steps=0), 422, "invalid_request", "steps", r"between 1 and 200, got 0"),
    HttpCase("steps_too_many", generate(steps=5000), 422, "invalid_request", "steps", r"between 1 and 200, got 5000"),
    HttpCase("guidance_negative", generate(guidance=-1), 422, "invalid_request", "guidance", r"between 0 and 30"),
    HttpCase("guidance_huge", generate(guidance=1e9), 422, "invalid_request", "guidance", r"between 0 and 30"),
    HttpCase("seed_negative", generate(seed=-1), 422, "invalid_request", "seed", r"seed must be an integer in \[0, 2\^63\)"),
    HttpCase("seed_over_2_63", generate(seed=2**64), 422, "invalid_request", "seed", r"2\^63"),
    HttpCase("seed_fractional", generate(seed=1.5), 422, "invalid_request", "seed", r"fractional part"),
    HttpCase("unknown_field", generate(sampler="euler"), 422, "invalid_request", "sampler", r"Extra inputs are not permitted"),
    HttpCase("fusion_unknown", generate(fusion="magic"), 422, "invalid_request", "fusion", r"'linear' or 'klora'"),
    HttpCase("response_unknown", generate(response="gif"), 422, "invalid_request", "response", r"'png' or 'json'"),
    HttpCase("body_is_a_list", lambda ctx: {"method": "POST", "url": "/v1/generate", "json": [1, 2]},
             422, "invalid_request", None, r"valid dictionary"),
    HttpCase("malformed_json", lambda ctx: {"method": "POST", "url": "/v1/generate", "content": b'{"prompt": "a",',
                                            "headers": {"Content-Type": "application/json"}},
             400, "invalid_json", None, r"not valid JSON"),
    HttpCase("wrong_content_type", lambda ctx: {"method": "POST", "url": "/v1/generate", "content": b"prompt=a house",
                                                "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
             415, "unsupported_media_type", "content-type", r"application/json"),
    HttpCase("no_content_type", lambda ctx: {"method": "POST", "url": "/v1/generate", "content": b'{"prompt": "a"}'},
             415, "unsupported_media_type", "content-type", r"application/json"),
    # -- LoRA references --
    HttpCase("unknown_lora_id", generate(lora_id="lora-000000000000"), 404, "not_found", "lora_id", r"^LoRA not found$"),
    HttpCase("lora_id_empty", generate(lora_id=""), 422, "invalid_request", "lora_id", r"at least 1 character"),
    HttpCase("loras_entry_with_empty_id", generate(loras=[{"id": ""}]), 422, "invalid_request", "loras.0.id",
             r"at least 1 character"),
    HttpCase("lora_weight_as_a_string", lambda ctx: generate(loras=[{"id": ctx.own_loras[0], "weight": "1"}])(ctx),
             422, "invalid_request", "loras.0.weight", r"not a string"),
    # -- JSON bounds: depth and size on every endpoint (a RecursionError was a 500) --
    HttpCase("generate_json_10000_deep", raw_json("POST", "/v1/generate", deep_json(10_000)), 400, "invalid_json", None,
             r"nests 10001 levels deep; at most 32"),
    HttpCase("profile_json_10000_deep", raw_json("POST", "/v1/style-profile", deep_json(10_000)), 400, "invalid_json",
             None, r"nests 10001 levels deep"),
    HttpCase("train_json_10000_deep", raw_json("POST", "/v1/loras", deep_json(10_000)), 400, "invalid_json", None,
             r"nests 10001 levels deep"),
    HttpCase("generate_json_over_1_mib", raw_json("POST", "/v1/generate", '{"prompt": "' + "a" * (1 << 20) + '"}'),
             413, "payload_too_large", None, r"a JSON body is at most 1048576 bytes"),
    HttpCase("profile_lora_id_empty", lambda ctx: {"method": "POST", "url": "/v1/style-profile", "json": {"lora_id": ""}},
             422, "invalid_request", "lora_id", r"at least 1 character"),
    HttpCase("lora_id_path_traversal", generate(lora_id="../../auth/keys"), 404, "not_found", "lora_id", r"^LoRA not found$"),
    HttpCase("other_tenants_lora_id", lambda ctx: generate(lora_id=ctx.other_lora)(ctx), 404, "not_found", "lora_id",
             r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("other_tenants_lora_in_a_fusion", lambda ctx: generate(loras=[{"id": ctx.own_loras[0]}, {"id": ctx.other_lora}])(ctx),
             404, "not_found", "loras", r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("lora_weight_out_of_range", lambda ctx: generate(loras=[{"id": ctx.own_loras[0], "weight": 10}])(ctx),
             422, "invalid_request", "loras.0.weight", r"less than or equal to 4"),
    HttpCase("lora_id_and_loras", lambda ctx: generate(lora_id=ctx.own_loras[0], loras=[{"id": ctx.own_loras[1]}])(ctx),
             422, "invalid_request", "loras", r"either lora_id or loras"),
    HttpCase("klora_with_four_loras", lambda ctx: generate(fusion="klora", loras=[{"id": i} for i in ctx.own_loras[:4]])(ctx),
             422, "invalid_request", "loras", r"K-LoRA fuses 2 or 3"),
    HttpCase("nine_loras", generate(loras=[{"id": f"lora-{i:012d}"} for i in range(9)]), 422, "invalid_request", "loras",
             r"at most 8 LoRAs"),
    # -- LoRA endpoints of another tenant --
    HttpCase("get_other_tenants_lora", lambda ctx: {"method": "GET", "url": f"/v1/loras/{ctx.other_lora}"},
             404, "not_found", "id", r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("delete_other_tenants_lora", lambda ctx: {"method": "DELETE", "url": f"/v1/loras/{ctx.other_lora}"},
             404, "not_found", "id", r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("download_other_tenants_lora", lambda ctx: {"method": "GET", "url": f"/v1/loras/{ctx.other_lora}/files/lora.safetensors"},
             404, "not_found", "id", r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("profile_of_other_tenants_lora", lambda ctx: {"method": "POST", "url": "/v1/style-profile",
                                                           "json": {"lora_id": ctx.other_lora}},
             404, "not_found", "lora_id", r"^LoRA not found$", kind="cross_tenant"),
    HttpCase("train_from_other_tenants_storage", lambda ctx: {"method": "POST", "url": "/v1/loras", "json": {
        "source_uri": f"{ctx.storage_uri}/tenants/globex/loras/{ctx.other_lora}"}},
             422, "invalid_request", "source_uri", r"may not point inside the service's storage", kind="cross_tenant"),
    HttpCase("download_manifest_not_public", lambda ctx: {"method": "GET", "url": f"/v1/loras/{ctx.own_loras[0]}/files/manifest.json"},
             404, "not_found", "name", r"^file not found$"),
    HttpCase("download_path_traversal", lambda ctx: {"method": "GET", "url": f"/v1/loras/{ctx.own_loras[0]}/files/..%2F..%2Fauth%2Fkeys.json"},
             404, "not_found", None, r"(?i)not found"),
    # -- training uploads --
    HttpCase("upload_over_the_size_limit", lambda ctx: {"method": "POST", "url": "/v1/loras",
                                                        "content": b"z" * (ctx.max_upload_bytes + 1),
                                                        "headers": {"Content-Type": "application/zip"}},
             413, "payload_too_large", None, r"the limit is"),
    HttpCase("chunked_upload_over_the_size_limit", lambda ctx: {
        "method": "POST", "url": "/v1/loras", "content": _chunked_multipart(ctx.max_upload_bytes + 256 * 1024),
        "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
             413, "payload_too_large", None, r"over the limit of"),
    HttpCase("refs_missing", lambda ctx: {"method": "POST", "url": "/v1/loras", "data": {"trigger": "zxy_ok"},
                                          "files": {"other": ("x.txt", b"hello", "text/plain")}},
             422, "invalid_request", "refs", r"attach the reference images"),
    HttpCase("refs_not_a_zip", train_upload(b"this is not a zip at all"), 422, "invalid_request", "refs", r"must be a zip"),
    HttpCase("empty_trigger", train_upload(trigger=""), 422, "invalid_request", "trigger", r"trigger word is empty"),
    HttpCase("blank_trigger", train_upload(trigger="   "), 422, "invalid_request", "trigger", r"trigger word is empty"),
    HttpCase("common_word_trigger", train_upload(trigger="style"), 422, "invalid_request", "trigger", r"common word.*zxy_style"),
    HttpCase("style_word_trigger", train_upload(trigger="watercolor"), 422, "invalid_request", "trigger", r"common word"),
    HttpCase("trigger_with_spaces", train_upload(trigger="my style"), 422, "invalid_request", "trigger", r"whitespace"),
    HttpCase("steps_not_a_number", train_upload(trigger="zxy_ok", steps="many"), 422, "invalid_request", "steps",
             r"steps must be an integer"),
    HttpCase("train_wrong_content_type", lambda ctx: {"method": "POST", "url": "/v1/loras", "content": b"refs",
                                                      "headers": {"Content-Type": "text/plain"}},
             415, "unsupported_media_type", "content-type", r"multipart/form-data"),
    HttpCase("train_malformed_json", train_json(None, raw=b'{"source_uri": '), 400, "invalid_json", None, r"not valid JSON"),
    HttpCase("train_json_empty_trigger", train_json({"source_uri": "s3://bucket/refs", "trigger": ""}),
             422, "invalid_request", "trigger", r"trigger word is empty"),
    HttpCase("train_json_unknown_variant", train_json({"source_uri": "s3://bucket/refs", "variant": "GEM+Z"}),
             422, "invalid_request", None, r"variant"),
    HttpCase("train_json_rank_zero", train_json({"source_uri": "s3://bucket/refs", "rank": 0}),
             422, "invalid_request", "rank", r"greater than or equal to 1"),
    HttpCase("train_json_rank_as_a_string", train_json({"source_uri": "s3://bucket/refs", "rank": "8"}),
             422, "invalid_request", "rank", r"valid integer"),
    HttpCase("train_json_steps_as_a_boolean", train_json({"source_uri": "s3://bucket/refs", "steps": True}),
             422, "invalid_request", "steps", r"valid integer"),
    HttpCase("train_form_steps_fractional", train_upload(trigger="zxy_ok", steps="1.5"), 422, "invalid_request", "steps",
             r"steps must be an integer"),
    HttpCase("train_form_rank_empty", train_upload(trigger="zxy_ok", rank=""), 422, "invalid_request", "rank",
             r"rank must be an integer"),
    HttpCase("source_uri_inside_storage", lambda ctx: train_json({"source_uri": ctx.storage_uri + "/auth"})(ctx),
             422, "invalid_request", "source_uri", r"may not point inside"),
    HttpCase("source_uri_local_path", train_json({"source_uri": "/etc"}), 422, "invalid_request", "source_uri", r"s3:// or gs://"),
    HttpCase("source_uri_http", train_json({"source_uri": "http://example.invalid/refs.zip"}), 422, "invalid_request",
             "source_uri", r"s3:// or gs://"),
    # -- LoRA files (POST /v1/loras/import) --
    HttpCase("lora_flux1_wrong_shapes", import_lora(lora_flux1_kohya), 422, "invalid_request", "lora",
             r"does not fit this model.*FLUX\.1 adapter"),
    HttpCase("lora_torch_pickle", import_lora(lora_torch_pickle, "style.pt"), 422, "invalid_request", "lora",
             r"not a safetensors file.*never loaded", check=_check_no_pickle_loaded),
    HttpCase("lora_raw_pickle", import_lora(lora_raw_pickle, "style.safetensors"), 422, "invalid_request", "lora",
             r"not a safetensors file", check=_check_no_pickle_loaded),
    HttpCase("lora_png_renamed", import_lora(_png_as_lora), 422, "invalid_request", "lora", r"not a safetensors file"),
    HttpCase("lora_empty_file", import_lora(lambda ctx: b""), 422, "invalid_request", "lora", r"not a safetensors file \(0 bytes\)"),
    HttpCase("lora_nan_weights", import_lora(lora_nan), 422, "invalid_request", "lora", r"NaN or infinite weights"),
    HttpCase("lora_inf_weights", import_lora(lora_inf), 422, "invalid_request", "lora", r"NaN or infinite weights"),
    HttpCase("lora_truncated", import_lora(lora_truncated), 422, "invalid_request", "lora", r"damaged safetensors|not a safetensors"),
    HttpCase("lora_header_length_lies", import_lora(lora_header_lies), 422, "invalid_request", "lora", r"not a safetensors file"),
    HttpCase("lora_without_lora_keys", import_lora(lora_no_lora_keys), 422, "invalid_request", "lora", r"unrecognised LoRA key format"),
    HttpCase("lora_missing_up_matrices", import_lora(lora_missing_up), 422, "invalid_request", "lora", r"lora_A but no lora_B"),
    HttpCase("lora_one_dimensional_tensor", import_lora(lora_one_dimensional), 422, "invalid_request", "lora",
             r"unexpected shapes"),
    HttpCase("lora_wrong_inner_dimension", import_lora(lora_wrong_inner_dim), 422, "invalid_request", "lora",
             r"does not fit this model"),
    HttpCase("lora_bad_trigger", import_lora(lora_good, trigger="art"), 422, "invalid_request", "trigger", r"common word"),
    HttpCase("lora_rank_zero", import_lora(lora_rank_zero), 422, "invalid_request", "lora", r"has rank 0"),
    HttpCase("lora_rank_mismatch_between_a_and_b", import_lora(lora_rank_mismatch), 422, "invalid_request", "lora",
             r"rank mismatch: A .* has 4 rows, B .* has 3 columns"),
    HttpCase("lora_alpha_nan_in_metadata", import_lora(lambda ctx: _with_adapter_metadata(ctx, '{"lora_alpha": NaN}')),
             422, "invalid_request", "lora", r"alpha nan; alpha must be a finite number"),
    HttpCase("lora_alpha_infinite_in_metadata",
             import_lora(lambda ctx: _with_adapter_metadata(ctx, '{"lora_alpha": Infinity}')), 422, "invalid_request",
             "lora", r"alpha inf; alpha must be a finite number"),
    HttpCase("lora_alpha_1e30_in_metadata", import_lora(lambda ctx: _with_adapter_metadata(ctx, '{"lora_alpha": 1e30}')),
             422, "invalid_request", "lora", r"scale must be in \(0, 64\]"),
    HttpCase("lora_comfyui_alpha_tensor_nan", import_lora(lora_comfyui_alpha(float("nan"))), 422, "invalid_request",
             "lora", r"alpha nan"),
    HttpCase("lora_comfyui_alpha_tensor_1e30", import_lora(lora_comfyui_alpha(1e30)), 422, "invalid_request", "lora",
             r"scale must be in"),
    HttpCase("lora_metadata_a_json_list", import_lora(lambda ctx: _with_adapter_metadata(ctx, "[]")), 422,
             "invalid_request", "lora", r"metadata key lora_adapter_metadata must be a JSON object, not list"),
    HttpCase("lora_metadata_alpha_a_string", import_lora(lambda ctx: _with_adapter_metadata(ctx, '{"lora_alpha": "8"}')),
             422, "invalid_request", "lora", r"lora_adapter_metadata: `lora_alpha`"),
    HttpCase("lora_integer_tensors", import_lora(lora_int_tensors), 422, "invalid_request", "lora",
             r"is int32; LoRA tensors must be float32"),
    HttpCase("lora_target_outside_the_served_blocks", import_lora(lora_outside_the_blocks), 422, "invalid_request",
             "lora", r"x_embedder: outside the served blocks"),
    HttpCase("lora_file_missing", lambda ctx: {"method": "POST", "url": "/v1/loras/import", "data": {"trigger": "zxy_ok"},
                                               "files": {"other": ("x.txt", b"x", "text/plain")}},
             422, "invalid_request", "lora", r"attach the LoRA"),
    HttpCase("lora_import_as_json", lambda ctx: {"method": "POST", "url": "/v1/loras/import", "json": {"lora": "AAAA"}},
             415, "unsupported_media_type", "content-type", r"multipart/form-data"),
    # -- style profile from pictures --
    HttpCase("profile_picture_not_an_image", profile_images(("x.png", b"not a picture at all")), 422, "invalid_request",
             "images", r"x.png: is not an image: it contains text"),
    HttpCase("profile_picture_truncated", profile_images(("cut.jpg", bad_inputs.jpeg_bytes(_img(2))[:3000])),
             422, "invalid_request", "images", r"cut.jpg: is truncated"),
    HttpCase("profile_decompression_bomb", profile_images(("bomb.png", bad_inputs.bomb_png_header(100_000, 100_000))),
             422, "invalid_request", "images", r"bomb.png: .*decompression bomb"),
    HttpCase("profile_animated_gif", profile_images(("loop.gif", bad_inputs.animated("GIF"))), 422, "invalid_request",
             "images", r"animated GIF"),
    HttpCase("profile_zero_bytes", profile_images(("empty.png", b"")), 422, "invalid_request", "images", r"is empty \(0 bytes\)"),
    HttpCase("profile_no_pictures", lambda ctx: {"method": "POST", "url": "/v1/style-profile", "data": {"use_gemini": "off"},
                                                 "files": {"other": ("x.txt", b"x", "text/plain")}},
             422, "invalid_request", "images", r"attach 1–10 pictures"),
    HttpCase("profile_eleven_pictures", profile_images(*[(f"p{i}.png", b"x") for i in range(11)]), 400, "bad_request",
             None, r"Too many files"),
    HttpCase("profile_malformed_json", lambda ctx: {"method": "POST", "url": "/v1/style-profile", "content": b"{",
                                                    "headers": {"Content-Type": "application/json"}},
             400, "invalid_json", None, r"not valid JSON"),
    HttpCase("profile_wrong_content_type", lambda ctx: {"method": "POST", "url": "/v1/style-profile", "content": b"x",
                                                        "headers": {"Content-Type": "text/plain"}},
             415, "unsupported_media_type", "content-type", r"multipart/form-data"),
    # -- valid but unusual pictures: accepted and converted (no error) --
    *[HttpCase(f"accepted_{name}", profile_images((filename, make())), 200, kind="unusual", check=_profile_ok)
      for name, (filename, make) in UNUSUAL_PICTURES.items()],
    # -- the image/zip corpus, uploaded --
    *REF_CASES,
]

CASES_BY_NAME = {case.name: case for case in CASES}


if __name__ == "__main__":  # python tests/bad_inputs_http.py OUT_DIR: the generated files, for a look by hand
    import sys

    from klein.model import load_pipeline

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/bad_inputs_http.py OUT_DIR")
    out = Path(sys.argv[1])
    (out / "loras").mkdir(parents=True, exist_ok=True)
    ctx = Ctx({}, [], "", "", 0, out / "scratch", load_pipeline("tiny").transformer, out / "PICKLE_WAS_LOADED")
    for name, make in LORA_FILES.items():
        (out / "loras" / f"{name}.bin").write_bytes(make(ctx))
    for case in REF_CASES:
        request = case.build(ctx)
        (out / f"{case.name}.zip").write_bytes(request["files"]["refs"][1])
    print(f"{len(CASES)} HTTP cases; wrote {len(LORA_FILES)} LoRA files and {len(REF_CASES)} ref zips to {out}")

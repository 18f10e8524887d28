"""The demo's last step: serve the freshly trained LoRA over real HTTP and ask for a styled image.

`klein-style demo` calls `demo_http_generate` after training, on the Ray instance the demo started: Serve
comes up on a free loopback port, the tenant gets an API key, and `POST /v1/generate` must give the same
pixels as the in-process pipeline for the same request (the text stage is off, so the prompt is unchanged).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from ray import serve

from cluster.ports import free_port
from cluster.storage import Storage
from serve.app import APP_NAME, build_app
from serve.tenants import create_api_key


def demo_http_generate(cfg, manifest: dict, out: Path, prompt: str, seed: int, steps: int, side: int, expected=None) -> str:
    """Run the Serve app, generate through HTTP with the trained LoRA, and describe the result in a line."""
    storage = Storage.from_uri(cfg.storage)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"storage": storage.uri, "model": cfg.model, "gemini": "off"}), name=APP_NAME, route_prefix="/")
        key = create_api_key(storage, cfg.tenant)
        payload = {"prompt": prompt, "lora_id": manifest["id"], "seed": seed, "steps": steps, "width": side, "height": side,
                   "guidance": 4.0, "use_gemini": "off", "response": "png"}
        url = f"http://127.0.0.1:{port}/v1/generate"
        response = httpx.post(url, json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=300.0)
        if response.status_code != 200:
            return f"4. HTTP: POST {url} answered {response.status_code}: {response.text[:300]}"
        image = Image.open(io.BytesIO(response.content)).convert("RGB")
        path = out / "http_generate.png"
        image.save(path)
        line = f"4. HTTP: POST {url} with lora_id={manifest['id']} → {path}"
        if expected is not None:
            same = np.array_equal(np.asarray(image), np.asarray(expected.convert("RGB")))
            line += f" ({'the same pixels as' if same else 'DIFFERENT from'} the in-process pipeline for the same seed)"
        return line
    finally:
        serve.shutdown()

"""`klein-style generate --url URL --api-key KEY --lora ID --prompt ... -o out.png`: one image from a server."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx


def _lora_refs(values: list[str] | None) -> list[dict]:
    """`ID` or `ID:WEIGHT` → {"id", "weight"}."""
    refs = []
    for value in values or []:
        head, sep, tail = value.rpartition(":")
        try:
            refs.append({"id": head, "weight": float(tail)} if sep and head else {"id": value, "weight": 1.0})
        except ValueError:
            refs.append({"id": value, "weight": 1.0})
    return refs


def build_payload(args) -> dict:
    payload = {
        "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
        "negative_prompt": getattr(args, "negative_prompt", "") or "", "use_gemini": getattr(args, "use_gemini", "auto"),
        "response": "png",
    }
    for name in ("width", "height"):
        if getattr(args, name, None) is not None:
            payload[name] = getattr(args, name)
    refs = _lora_refs(getattr(args, "lora", None))
    if len(refs) == 1 and refs[0]["weight"] == 1.0:
        payload["lora_id"] = refs[0]["id"]
    elif refs:
        payload["loras"] = refs
        payload["fusion"] = getattr(args, "fusion", None) or "linear"
    return payload


def describe_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("detail") or body.get("error") or response.text
        if body.get("field"):
            text = f"{text} (field: {body['field']})"
        if body.get("request_id"):
            text = f"{text} [request id {body['request_id']}]"
    except ValueError:
        text = response.text.strip()[:300] or response.reason_phrase
    retry = response.headers.get("Retry-After")
    return f"HTTP {response.status_code}: {text}" + (f"; retry after {retry} s" if retry else "")


def generate_remote(args) -> int:
    """POST /v1/generate and write the PNG. Returns 0, 1 (server/network failure) or 2 (bad request)."""
    if not args.api_key:
        print("error: --api-key (or KLEIN_API_KEY) is required with --url", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + "/v1/generate"
    try:
        response = httpx.post(url, json=build_payload(args), headers={"Authorization": f"Bearer {args.api_key}"},
                              timeout=httpx.Timeout(600.0, connect=10.0))
    except httpx.HTTPError as e:
        print(f"error: could not reach {args.url}: {e}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"error: {describe_error(response)}", file=sys.stderr)
        return 2 if 400 <= response.status_code < 500 and response.status_code != 429 else 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(response.content)
    final_prompt = response.headers.get("X-Final-Prompt", args.prompt)
    print(f"wrote {out} (prompt: {final_prompt!r}, gemini: {response.headers.get('X-Gemini-Source', 'none')})")
    return 0

"""`klein-style generate --url URL --api-key KEY --lora ID --prompt ... -o out.png`: one image from a server,
through the typed client (`klein_style_client`: retries on 429/503 after their Retry-After, one deadline)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import ValidationError

from klein_style_client import ApiError, Client, TransportError

DEADLINE_S = 600.0  # the whole call, retries included


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


def generate_options(args) -> dict:
    """The keyword arguments of `Client.generate` that the command line sets."""
    options = {
        "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
        "negative_prompt": getattr(args, "negative_prompt", "") or "", "use_gemini": getattr(args, "use_gemini", "auto"),
    }
    for name in ("width", "height"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    refs = _lora_refs(getattr(args, "lora", None))
    if len(refs) == 1 and refs[0]["weight"] == 1.0:
        options["lora_id"] = refs[0]["id"]
    elif refs:
        options["loras"] = refs
        options["fusion"] = getattr(args, "fusion", None) or "linear"
    return options


def generate_remote(args) -> int:
    """POST /v1/generate and write the PNG. Returns 0, 1 (server/network failure) or 2 (bad request)."""
    if not args.api_key:
        print("error: --api-key (or KLEIN_API_KEY) is required with --url", file=sys.stderr)
        return 2
    try:
        with Client(args.url, api_key=args.api_key, timeout=DEADLINE_S) as client:
            result = client.generate(**generate_options(args))
    except ValidationError as e:  # refused before sending: the request does not fit the API's model
        first = e.errors()[0]
        print(f"error: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if 400 <= e.status < 500 and e.status != 429 else 1
    except TransportError as e:
        print(f"error: could not reach {args.url}: {e}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.image_bytes())
    print(f"wrote {out} ({result.width}×{result.height}, seed {result.seed}, prompt: {result.prompt!r}, "
          f"gemini: {result.gemini_source})")
    return 0

"""`klein-style generate` and `klein-style make-board`: an image or a board, drawn on this machine.

    klein-style generate --model tiny --prompt ...    one image, locally or from a running server (--url)
    klein-style make-board --style neon -n 12 DIR     a procedural style board with content-only captions
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from cli.client import generate_remote
from evaluation import world
from evaluation.board import BOARD_STYLES, make_board
from klein.generate import GenerateRequest, generate_image, set_active_loras
from klein.request import GenerateError
from klein.lora import LoraError, read_lora
from klein.model import ModelLoadError, load_pipeline, native_resolution


def _parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (a Windows drive letter is not split)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def cmd_generate(args: argparse.Namespace) -> int:
    default_side = native_resolution(args.model)  # unset sides: the model's own (local and --url alike)
    args.width, args.height = args.width or default_side, args.height or default_side
    if args.url:
        return generate_remote(args)

    request = GenerateRequest(
        prompt=args.prompt, seed=args.seed, steps=args.steps, width=args.width, height=args.height,
        guidance=args.guidance, negative_prompt=args.negative_prompt or "",
    )
    try:
        request.validate()
        loras = [(f"lora{i}", read_lora(path), weight) for i, (path, weight) in enumerate(map(_parse_lora_arg, args.lora or []))]
        pipe = load_pipeline(args.model, device=args.device)
        set_active_loras(pipe, loras)
    except (GenerateError, LoraError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tqdm(total=request.steps, desc="denoising", unit="step", disable=args.quiet) as bar:
        image = generate_image(pipe, request, on_step=lambda i, n: bar.update(1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}×{image.height}, seed {request.seed}, model {args.model})")
    return 0


def cmd_make_board(args: argparse.Namespace) -> int:
    # Two kinds of board: the procedural world's styles (one subject per picture, what the mini preset knows; its
    # held-out styles are the ones to learn) and the older multi-object scene boards.
    if args.style in world.STYLES:
        paths = world.make_world_board(args.style, args.n, args.dir, seed=args.seed, size=args.size)
        kind = "held-out world style" if args.style in world.HELDOUT_STYLES else "world pretraining style"
    elif args.style in BOARD_STYLES:
        paths = make_board(args.style, args.n, args.dir, size=args.size, seed=args.seed)
        kind = "scene board style"
    else:
        print(f"error: unknown style {args.style!r}; world styles: {', '.join(sorted(world.STYLES))}; "
              f"scene board styles: {', '.join(sorted(BOARD_STYLES))}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images ({kind} {args.style!r}) with content-only captions to {args.dir}")
    return 0


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="`tiny` (random test preset), `mini` (pretrained, draws the procedural world) or a local "
                        "FLUX.2 Klein diffusers folder")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: cuda if available)")


def _cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not break `--help`
        return False


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate one image (locally, or from a server with --url)")
    _add_common_model_args(g)
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]|ID", help="a LoRA file (or an id with --url); repeatable")
    g.add_argument("--seed", type=int, default=0, help="same seed, same pixels (default 0)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    g.add_argument("--width", type=int, default=None, help="multiple of 16 (default 64 for tiny, 1024 otherwise)")
    g.add_argument("--height", type=int, default=None, help="multiple of 16 (default 64 for tiny, 1024 otherwise)")
    g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from")
    g.add_argument("-o", "--output", default="out.png", help="PNG to write (default out.png)")
    g.add_argument("--url", help="base URL of a running `klein-style serve` (then --lora takes LoRA ids)")
    g.add_argument("--api-key", default=os.environ.get("KLEIN_API_KEY"), help="tenant API key for --url (or KLEIN_API_KEY)")
    g.add_argument("--use-gemini", choices=["auto", "on", "off"], default="auto", help="with --url: the Gemini L1/L2 stage")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("make-board", help="write a procedural style board (images + content-only captions)")
    b.add_argument("dir", help="output folder")
    b.add_argument("--style", required=True,
                   help="a procedural world style (held out from mini: stained_glass, risograph, chalkboard, "
                        "cross_stitch) or a scene board style (neon, ukiyo, ...)")
    b.add_argument("-n", type=int, default=12, help="number of images (default 12)")
    b.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_make_board)

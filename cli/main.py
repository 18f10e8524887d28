"""`klein-style`: the command line of the platform.

    klein-style demo                                  board → train on Ray → before/after → HTTP
    klein-style generate --model tiny --prompt ...    one image, locally or from a running server (--url)
    klein-style make-board --style neon -n 12 DIR     a procedural style board with content-only captions
    klein-style train REFS --trigger zxy_style        a style LoRA through Ray Train
    klein-style serve [--config serve.yaml]           the HTTP API on Ray Serve
    klein-style sweep SWEEP.yaml | --example          boards × variants on Ray Train → samples → scores → tables
    klein-style submit --address URL --working-dir . -- python -m evaluation.sweep sweep.yaml
                                                      a command as a Ray job on a cluster (waits, streams logs)

Each command lives in the module that registers it (`register(sub)`). A run imports only its command's module:
`klein-style submit` is a thin client of the job server and starts in about a second, without torch, diffusers or
Ray Train (importing every command's module took ~9 CPU-s). `--help` without a command imports them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> the module that registers it, in the order `--help` lists them
COMMAND_MODULES = {
    "generate": "cli.images",
    "make-board": "cli.images",
    "train": "cli.train",
    "demo": "cli.train",
    "serve": "cli.serve",
    "sweep": "evaluation.sweep",
    "submit": "cluster.jobs",
}


def command_of(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the top-level options take no value)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMAND_MODULES else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone, or of every command when `command` is None."""
    parser = argparse.ArgumentParser(
        prog="klein-style",
        description="Style LoRAs for FLUX.2 Klein: train from 5–50 reference images on Ray Train, serve on Ray Serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `klein-style COMMAND --help` for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMAND_MODULES[command]] if command else list(dict.fromkeys(COMMAND_MODULES.values()))
    for module in modules:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Fast mode against exact on `mini`, judged by the exact world judge (issue 16: "fast mode vs exact on mini").

    python bench/mini_accel_quality.py LORA.safetensors --trigger zxy_stained_glass --style stained_glass [--out DIR]

The same (class, seed) prompts behind the LoRA's trigger are drawn three ways with the product's serving path
(`klein.accel.prepare_for_inference`, the LoRA fused as the Generator fuses it):
- stock: `Flux2KleinPipeline` with the LoRA through peft (`klein.generate.set_active_loras`), no acceleration;
- exact: `prepare_for_inference(mode="exact")` (fused weights, CFG as one batch of 2);
- fast:  `set_inference_mode("fast")` on the same pipeline (float8 base + step cache).
Each side's `content_ok` and `style_prob` (the world judge, in the procedural world: a proxy for the method, not
for Klein's quality) and seconds per image are printed and written to `mini_accel_quality.json`. On a CPU the
float8 matmuls are emulated, so fast mode's time here says nothing about a GPU; its quality does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from evaluation import world  # noqa: E402
from evaluation.quality import MINI_GUIDANCE, MINI_STEPS, draw, world_prompts  # noqa: E402
from evaluation.world_judge import WorldJudge  # noqa: E402
from klein.accel import prepare_for_inference, set_inference_mode  # noqa: E402
from klein.generate import set_active_loras  # noqa: E402
from klein.lora import read_lora  # noqa: E402
from klein.mini import MINI_RESOLUTION  # noqa: E402
from klein.model import load_pipeline  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora", type=Path, help="a LoRA trained on mini (e.g. the demo's lora.safetensors)")
    p.add_argument("--trigger", required=True)
    p.add_argument("--style", required=True, choices=sorted(world.STYLES))
    p.add_argument("--seeds", type=int, default=1, help="seeds per content class (default 1: 12 images a side)")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)

    lora = read_lora(args.lora.read_bytes())
    judge = WorldJudge.load()
    prompts, seeds, contents = world_prompts(args.trigger, world.CONTENT_CLASSES, range(args.seeds))
    pipe = load_pipeline("mini")
    results = {}

    def side(name: str) -> None:
        started = time.perf_counter()
        images = draw(pipe, prompts, seeds, MINI_RESOLUTION, MINI_STEPS, MINI_GUIDANCE)
        seconds = (time.perf_counter() - started) / len(images)
        results[name] = {**judge.summary(images, contents, args.style), "s_per_image": seconds}
        print(f"{name:5s}: content_ok {results[name]['content_ok']:.2f}  style_prob {results[name]['style_prob']:.2f}  "
              f"{seconds:.2f} s/image", flush=True)

    set_active_loras(pipe, [("style", lora, 1.0)])
    side("stock")
    set_active_loras(pipe, [])
    pipe.transformer.delete_adapters(["style"])
    prepare_for_inference(pipe, loras=[("style", lora, 1.0)], mode="exact", compile=False)
    side("exact")
    set_inference_mode(pipe, "fast")
    side("fast")
    report = {"what": "fast vs exact on mini (bench/mini_accel_quality.py)", "judge": "exact world judge",
              "lora": str(args.lora), "style": args.style, "n": len(prompts), "device": "cpu",
              "threads": torch.get_num_threads(), "sides": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mini_accel_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""K-LoRA against naive addition on `mini`: does fusing two held-out styles keep both? (issue 16)

    python bench/mini_klora_quality.py A.safetensors:zxy_stained_glass:stained_glass \
        B.safetensors:zxy_risograph:risograph [--seeds 1] [--out DIR]

Every content class is drawn with both triggers in the prompt ("<trigger A>. <trigger B>. <caption>") three ways:
- `A only`, `B only`: one LoRA at weight 1 (the reference for how much of each style a single LoRA gives);
- `naive`: both LoRAs active at weight 1 through peft (their deltas summed in every layer, every step);
- `K-LoRA`: both resident, and per layer and denoising step only the one that K-LoRA's scores choose
  (`klein.fusion.KLoraSchedule`, the schedule the Generator applies, set through `apply_klora_step` each step).
The exact world judge (a proxy for the method, in our procedural world) gives each image's probability of style A
and of style B and whether its content is recognised. "Keeps both" is the mean of min(p_A, p_B): high only when
an image carries both styles; each style's share is p_X / (p_A + p_B). Writes `mini_klora_quality.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from contracts import KLORA_DEFAULTS, with_trigger  # noqa: E402
from evaluation import world  # noqa: E402
from evaluation.quality import MINI_GUIDANCE, MINI_STEPS  # noqa: E402
from evaluation.world_judge import WorldJudge  # noqa: E402
from klein.fusion import KLoraSchedule, apply_klora_step, klora_layer_scores  # noqa: E402
from klein.generate import GenerateRequest, generate_image, set_active_loras  # noqa: E402
from klein.lora import read_lora  # noqa: E402
from klein.mini import MINI_RESOLUTION  # noqa: E402
from klein.model import load_pipeline  # noqa: E402


def parse_lora(text: str):
    path, trigger, style = text.rsplit(":", 2)
    if style not in world.STYLES:
        raise SystemExit(f"{text}: {style!r} is not a world style ({', '.join(sorted(world.STYLES))})")
    return read_lora(Path(path).read_bytes()), trigger, style


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="PATH:TRIGGER:STYLE of the first LoRA")
    p.add_argument("b", help="PATH:TRIGGER:STYLE of the second LoRA")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    (lora_a, trig_a, style_a), (lora_b, trig_b, style_b) = parse_lora(args.a), parse_lora(args.b)
    judge = WorldJudge.load()
    ia, ib = judge.styles.index(style_a), judge.styles.index(style_b)
    pairs = [(c, s) for s in range(args.seeds) for c in world.CONTENT_CLASSES]
    pipe = load_pipeline("mini")
    names = ["a", "b"]
    set_active_loras(pipe, [("a", lora_a, 1.0), ("b", lora_b, 1.0)])  # both resident from here on
    modules = dict(pipe.transformer.named_modules())
    scores = klora_layer_scores([lora_a, lora_b])
    results = {}

    def draw_side(label: str, weights: list[float] | None) -> None:
        images, contents = [], []
        for content, seed in pairs:
            prompt = with_trigger(trig_a, with_trigger(trig_b, world.caption(content, seed)))
            request = GenerateRequest(prompt=prompt, seed=seed, steps=MINI_STEPS, width=MINI_RESOLUTION,
                                      height=MINI_RESOLUTION, guidance=MINI_GUIDANCE)
            if weights is not None:
                set_active_loras(pipe, [(n, None, w) for n, w in zip(names, weights)])
                images.append(generate_image(pipe, request))
            else:  # K-LoRA: one LoRA per layer and step, as serve/generator.py applies it
                set_active_loras(pipe, [(n, None, 1.0) for n in names])
                schedule = KLoraSchedule.build(scores, request.steps, *KLORA_DEFAULTS)
                apply_klora_step(modules, names, schedule, 0, [1.0, 1.0])

                def on_step(i: int, total: int, schedule=schedule) -> None:
                    if i < total:
                        apply_klora_step(modules, names, schedule, i, [1.0, 1.0])

                images.append(generate_image(pipe, request, on_step=on_step))
            contents.append(content)
        _, style_probs = judge.probabilities(images)
        pa, pb = style_probs[:, ia], style_probs[:, ib]
        verdicts = judge.judge(images, contents)
        results[label] = {
            f"p_{style_a}": float(pa.mean()), f"p_{style_b}": float(pb.mean()),
            "keeps_both_mean_min": float(torch.minimum(pa, pb).mean()),
            f"share_{style_a}": float((pa / (pa + pb + 1e-9)).mean()),
            "content_ok": sum(v.content_ok for v in verdicts) / len(verdicts),
        }
        print(label, json.dumps({k: round(v, 3) for k, v in results[label].items()}), flush=True)

    draw_side("A only", [1.0, 0.0])
    draw_side("B only", [0.0, 1.0])
    draw_side("naive", [1.0, 1.0])
    draw_side("K-LoRA", None)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"what": "K-LoRA vs naive addition on mini (bench/mini_klora_quality.py)",
              "judge": "exact world judge", "a": args.a, "b": args.b, "n": len(pairs), "klora_constants": KLORA_DEFAULTS,
              "sides": results}
    (args.out / "mini_klora_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

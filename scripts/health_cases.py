"""Induce each failure of the seeds' table in the `mini` world, and check that the health report names it.

    python scripts/health_cases.py --work out/health-cases [--cases healthy_s0,lr_x50,...] [--ship tests/data/health]

Every case is a real job (`train.job.run_training_job` on a local Ray cluster, the `mini` preset, a board of 12
world pictures of the held-out style `risograph`), so its health report is the one the product writes into the
manifest (`train/health.py`, run on the inference pool after the LoRA is delivered). Beside it the exact world
judge (`evaluation.world_judge`) measures what really happened to each checkpoint: style probability and content
recognised, with and without the trigger. The judge is the ground truth the report's judge-free measures are
checked against; the report itself never sees it.

The cases (a healthy job per seed, and one job per failure) are `evaluation/health_cases.py`'s.

`--ship DIR` writes the checkpoints the tests use (SHIPPED: fp16, cut by SVD to a small rank) to DIR.
Results: `<work>/health_cases.json` and a Markdown table on stdout (kept in bench/results/health/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cluster.pools import init_local_ray  # noqa: E402
from cluster.storage import Storage  # noqa: E402
from contracts import checkpoint_key, manifest_key  # noqa: E402
from evaluation.health_cases import CASES, STYLE, case_config, write_board  # noqa: E402
from evaluation.quality import side_quality  # noqa: E402
from evaluation.world_judge import WorldJudge  # noqa: E402
from klein.lora import LoraLayer, LoraWeights, lora_to_bytes, read_lora  # noqa: E402
from klein.model import load_pipeline  # noqa: E402
from train.health import SYMPTOMS, diagnose, loss_is_finite, render_health, summary_line  # noqa: E402
from train.job import health_task_args, prepare_dataset, public_config, run_training_job  # noqa: E402


def train_case(case: str, work: Path) -> dict:
    """The case's job (skipped when its manifest exists: a re-run only reports)."""
    board = work / "boards" / case
    write_board(case, board)
    cfg = case_config(case, work / "storage")
    storage = Storage.from_uri(cfg.storage)
    key = manifest_key(cfg.tenant, cfg.job_id)
    if storage.exists(key):
        return storage.read_json(key)
    return run_training_job(board, cfg)


def report_case(case: str, work: Path, manifest: dict, pipe, judge: WorldJudge) -> dict:
    """The product's health report on this case's checkpoints (train.health.render_health, what the job's
    inference-pool task runs), and the exact judge's view of the same checkpoints."""
    cfg = case_config(case, work / "storage")
    storage = Storage.from_uri(cfg.storage)
    prepared, resolved = prepare_dataset(work / "boards" / case, cfg, on_gpu=False)
    checkpoints = [(step, storage.read_bytes(checkpoint_key(cfg.job_id, step))) for step in manifest["checkpoints"]]
    state_log = [{"loss": e["loss"]} for e in manifest["metrics"]["loss_curve"]]
    report, png, md = render_health(**health_task_args(resolved, prepared, checkpoints, manifest["delivered_step"],
                                                       loss_is_finite(state_log)))
    out = work / "reports" / case
    out.mkdir(parents=True, exist_ok=True)
    (out / "health.png").write_bytes(png)
    (out / "health.md").write_text(md)
    truth = {"base": _judged_base(pipe, judge, resolved.trigger)}
    judged_steps = {report["delivered_step"], report["recommended_step"]}
    for step, data in checkpoints:
        if step not in judged_steps:  # the judge looks at what the report speaks of: delivered and recommended
            continue
        lora = read_lora(data)
        t = side_quality(pipe, lora, resolved.trigger, STYLE, JUDGE_CONTENTS, JUDGE_SEEDS, judge=judge)
        p = side_quality(pipe, lora, "", STYLE, JUDGE_CONTENTS, JUDGE_SEEDS, judge=judge)
        truth[str(step)] = {"style_prob": t.style_prob, "content_ok": t.content_ok, "style_prob_plain": p.style_prob,
                            "content_ok_plain": p.content_ok}
    return {"job_id": cfg.job_id, "checkpoints": manifest["checkpoints"], "health": report, "judge": truth}


_BASE_JUDGED: dict[str, dict] = {}


def _judged_base(pipe, judge: WorldJudge, trigger: str) -> dict:
    """The base model's judge figures for the probe with `trigger` (once per trigger)."""
    if trigger not in _BASE_JUDGED:
        base_t = side_quality(pipe, None, trigger, STYLE, JUDGE_CONTENTS, JUDGE_SEEDS, judge=judge)
        base_p = side_quality(pipe, None, "", STYLE, JUDGE_CONTENTS, JUDGE_SEEDS, judge=judge)
        _BASE_JUDGED[trigger] = {"style_prob": base_t.style_prob, "content_ok": base_t.content_ok,
                                 "content_ok_plain": base_p.content_ok}
    return _BASE_JUDGED[trigger]


JUDGE_CONTENTS = ("lighthouse", "cat", "boat", "house", "tree", "car")
JUDGE_SEEDS = (0, 1)


def table(results: dict) -> str:
    ids = [key for key, _, _ in SYMPTOMS]
    lines = ["| case | " + " | ".join(ids) + " | recommended / delivered | judge: style with trigger, content with / "
             "without trigger (delivered) |", "| --- " * (len(ids) + 3) + "|"]
    for case, r in results.items():
        h = r["health"]
        verdicts = {s["id"]: s["verdict"] for s in h["symptoms"]}
        j = r["judge"][str(h["delivered_step"])]
        lines.append(f"| {case} | " + " | ".join(verdicts[i] for i in ids)
                     + f" | {h['recommended_step']} / {h['delivered_step']} | {j['style_prob']:.2f}, {j['content_ok']:.2f} / "
                       f"{j['content_ok_plain']:.2f} |")
    healthy = [r for case, r in results.items() if case.startswith("healthy_s")]
    verdicts = [s["verdict"] for r in healthy for s in r["health"]["symptoms"]]
    alarms = sum(v != "ok" for v in verdicts)
    lines.append(f"\nfalse alarms on healthy jobs: {alarms} of {len(verdicts)} verdicts ({len(healthy)} jobs x "
                 f"{len(SYMPTOMS)} symptoms) are not ok")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/health-cases")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--report-only", action="store_true", help="report on jobs already trained under --work")
    parser.add_argument("--ship", help="write the checkpoints tests/test_health.py uses here (SHIPPED)")
    parser.add_argument("--rediagnose", action="store_true",
                        help="only recompute the verdicts (train.health.diagnose) from the measures already in the JSON")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    cases = args.cases.split(",")
    summary_path = work / "health_cases.json"
    if args.rediagnose:
        results = json.loads(summary_path.read_text())
        for case, r in results.items():
            cfg = case_config(case, work / "storage")
            old = r["health"]
            new = diagnose(old["dataset"], old["checkpoints"], old["delivered_step"], public_config(cfg), cfg.trigger)
            r["health"] = {**old, **new}
            print(f"{case}: {summary_line(r['health'])}")
        summary_path.write_text(json.dumps(results, indent=1))
        print(table(results))
        if args.ship:
            ship(results, work, Path(args.ship))
        return 0
    manifests = {}
    if not args.report_only:
        init_local_ray(num_cpus=2, object_store_memory=300 * 1024**2, log_to_driver=False)
    for case in cases:
        started = time.time()
        if args.report_only:
            cfg = case_config(case, work / "storage")
            manifests[case] = Storage.from_uri(cfg.storage).read_json(manifest_key(cfg.tenant, cfg.job_id))
        else:
            manifests[case] = train_case(case, work)
        print(f"{case}: trained in {time.time() - started:.0f} s", flush=True)
    results = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    pipe, judge = load_pipeline("mini"), WorldJudge.load()
    for case in cases:
        results[case] = report_case(case, work, manifests[case], pipe, judge)
        summary_path.write_text(json.dumps(results, indent=1))
        print(f"{case}: {summary_line(results[case]['health'])}", flush=True)
    print(table(results))
    if args.ship:
        ship(results, work, Path(args.ship))
    return 0


# the checkpoints tests/test_health.py runs the report on (each case's delivered one, and steps_x10's recommended
# one), each cut to its strongest directions to fit the repository's weight budget: {case: {step: rank}}. Rank 8
# keeps every verdict; steps_x10's step 800 needs 24 to stay as varied with the seed as the full LoRA (0.37 at 12)
SHIPPED = {"healthy_s0": {200: 8}, "lr_x50": {200: 8}, "lr_div50": {200: 8}, "steps_x10": {800: 24, 2000: 8}}


def truncated(lora: LoraWeights, rank: int) -> LoraWeights:
    """The best rank-`rank` approximation (SVD) of every layer's update, at the same scale alpha / rank."""
    layers = {}
    for name, layer in lora.layers.items():
        u, s, vh = torch.linalg.svd(layer.up.float() @ layer.down.float(), full_matrices=False)
        layers[name] = LoraLayer(down=vh[:rank].contiguous(), up=(u[:, :rank] * s[:rank]).contiguous(),
                                 alpha=layer.alpha * rank / layer.rank)
    return LoraWeights(layers, dict(lora.meta))


def ship(results: dict, work: Path, out: Path) -> None:
    """`<case>_step<N>.safetensors` (fp16, cut to the rank SHIPPED gives) for the checkpoints in SHIPPED."""
    out.mkdir(parents=True, exist_ok=True)
    storage = Storage.from_uri(str(work / "storage"))
    for case, steps in SHIPPED.items():
        r = results[case]
        for step, rank in steps.items():
            lora = truncated(read_lora(storage.read_bytes(checkpoint_key(r["job_id"], step))), rank)
            (out / f"{case}_step{step}.safetensors").write_bytes(lora_to_bytes(lora, dtype=torch.float16))
            print(f"shipped {case} step {step}")


if __name__ == "__main__":
    raise SystemExit(main())

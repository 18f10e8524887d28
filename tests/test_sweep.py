"""Evaluation sweeps: the sweep file, cell ids, concurrency from the pools, the scores and the tables.

The whole sweep through real Ray Train and Ray Jobs runs in tests/test_submit.py (the example sweep as a job
on a private `ray start` head); these tests cover the parts that run without a cluster.
"""

from __future__ import annotations

import csv
import io
import itertools

import pytest
from PIL import Image, ImageOps

from cluster.storage import Storage
from evaluation.board import render_picture
from train.job import check_job_id
from train.recipe import choose_variant
from evaluation.sweep import (
    BANDS,
    EXAMPLE_SWEEP,
    CONTENT_KEPT_AT,
    SweepError,
    health_cell,
    SweepRun,
    SweepSpec,
    _cell_fingerprint,
    _train_cell,
    cell_job_id,
    compute_tables,
    content_proxy,
    csv_table,
    load_sweep,
    markdown_table,
    prepare_board,
    render_samples,
    sample_name,
    size_band,
    table_png,
    training_concurrency,
)


def _spec(**overrides) -> SweepSpec:
    data = {"name": "t", "boards": [{"name": "a", "make": {"style": "neon", "n": 3}}],
            "variants": ["GEM+A", "B_r128"], "base": {"resolution": 64}}
    data.update(overrides)
    return SweepSpec.from_dict(data)


# -- the sweep file ------------------------------------------------------------------------------------------
def test_example_sweep_has_two_bands_and_deterministic_job_ids():
    spec = load_sweep(EXAMPLE_SWEEP)
    cells = spec.cells()
    assert [(c.board.name, c.variant.name) for c in cells] == [
        ("neon3", "GEM+A"), ("neon3", "B_r128"), ("ukiyo12", "GEM+A"), ("ukiyo12", "B_r128")]
    ids = [c.job_id for c in cells]
    assert len(set(ids)) == 4 and all(check_job_id(i) == i for i in ids)
    assert ids == [c.job_id for c in load_sweep(EXAMPLE_SWEEP).cells()]  # a re-run finds the same jobs
    assert ids[0] == cell_job_id("example", "neon3", "GEM+A") != cell_job_id("other", "neon3", "GEM+A")
    # names that slug alike still get distinct ids
    assert cell_job_id("s", "b", "GEM+A") != cell_job_id("s", "b", "GEM-A")
    assert {size_band(b.make["n"]) for b in spec.boards} == {"1–3", "10–15"}
    cfg = spec.train_config(cells[1])
    assert (cfg.variant, cfg.steps, cfg.resolution, cfg.lr, cfg.save_every, cfg.model) == ("B_r128", 30, 64, 2e-3, 15, "tiny")
    assert cfg.trigger == "zxy_neon" and cfg.job_id == ids[1] and cfg.sample_prompts == spec.prompts
    # the job's contact sheet: the example's `base: sample_steps: 4` wins over `sample: steps: 6` (the sweep's renders)
    assert (cfg.sample_steps, spec.sample.steps, cfg.sample_size) == (4, 6, spec.sample_size())
    unset = _spec(base={"resolution": 64}, boards=[{"name": "a", "make": {"style": "neon", "n": 3}}], variants=["GEM+A"])
    assert unset.train_config(unset.cells()[0]).sample_steps == unset.sample.steps


def test_steps_overrides_and_variant_entries():
    spec = _spec(steps=40, base={"resolution": 64, "steps": 99},
                 boards=[{"name": "a", "make": {"style": "neon", "n": 3}, "steps": 20},
                         {"name": "b", "make": {"style": "ukiyo", "n": 5}}],
                 variants=["GEM+A", {"name": "long", "variant": "B_r128", "steps": 70}, {"name": "r64", "rank": 64}, "auto"])
    steps = {(c.board.name, c.variant.name): spec.train_config(c).steps for c in spec.cells()}
    assert steps[("a", "GEM+A")] == 20 and steps[("b", "GEM+A")] == 40  # board beats the sweep's steps
    assert steps[("a", "long")] == steps[("b", "long")] == 70  # the variant beats both
    variants = {c.variant.name: spec.train_config(c) for c in spec.cells()}
    assert variants["long"].variant == "B_r128" and variants["GEM+A"].variant == "GEM+A"
    assert variants["r64"].variant == "custom" and variants["r64"].rank == 64
    assert variants["auto"].variant == "auto"
    base_only = _spec(base={"resolution": 64, "steps": 99})
    assert base_only.train_config(base_only.cells()[0]).steps == 99


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"name": "Bad Name"}, "name 'Bad Name'"),
    ({"boards": [{"name": "a"}]}, "exactly one of `refs`"),
    ({"boards": [{"name": "a", "make": {"style": "nope", "n": 3}}]}, "make needs style"),
    ({"boards": [{"name": "a", "make": {"style": "neon", "n": 3}}, {"name": "a", "refs": "x"}]}, "repeated: ['a']"),
    ({"variants": ["GEM+A", "GEM+A"]}, "repeated: ['GEM+A']"),
    ({"variants": [{"name": "x", "rnak": 4}]}, "unknown keys ['rnak']"),
    ({"variants": [{"name": "x", "optimizer": "sgd"}]}, "optimizer"),
    ({"base": {"trigger": "zxy_a"}}, "which the sweep sets itself"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"judge": "coin"}, "judge 'coin'"),
    ({"boards": [{"name": "a", "make": {"style": "neon", "n": 3}, "trigger": "the"}]}, "board 'a': the trigger"),
    ({"variants": []}, "`variants` must be a non-empty list"),
    ({"variants": ["GEM+Z"]}, "unknown variant 'GEM+Z'"),
    ({"variants": [{"name": "x", "variant": "GEM+Z"}]}, "variant: choose auto, custom or one of"),
])
def test_sweep_file_errors_name_the_key(change, message):
    with pytest.raises(SweepError) as info:
        _spec(**change)
    assert message in str(info.value)


def test_sweep_yaml_refs_are_relative_to_the_file(tmp_path):
    (tmp_path / "sweep.yaml").write_text("name: rel\nboards: [{name: ink, refs: refs/ink}]\nvariants: [GEM+A]\n")
    spec = load_sweep(tmp_path / "sweep.yaml", storage=str(tmp_path / "st"))
    assert spec.boards[0].refs == str(tmp_path / "refs" / "ink") and spec.storage == str(tmp_path / "st")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SweepError, match="must hold a mapping"):
        load_sweep(tmp_path / "bad.yaml")


# -- bands and pools ------------------------------------------------------------------------------------------
def test_size_bands_group_sizes_as_the_recipe_policy_does():
    policy_of_band = {}
    for n in range(2, 41):
        policy_of_band.setdefault(size_band(n), set()).add(choose_variant(n).variant)
    assert list(policy_of_band) == list(BANDS)
    assert policy_of_band == {"1–3": {"B_r128"}, "5–7": {"GEM+B"}, "10–15": {"GEM+A"}, "30+": {"GEM+A"}}


def test_concurrency_is_the_training_pool_over_gpus_per_job():
    spec = _spec()
    assert training_concurrency(spec, {"train_gpu": 4.0, "infer_gpu": 2.0})[0] == 4
    assert training_concurrency(spec, {"train_gpu": 1.0, "infer_gpu": 1.0})[0] == 1
    two_workers = _spec(base={"resolution": 64, "num_workers": 2})
    n, why = training_concurrency(two_workers, {"train_gpu": 5.0, "infer_gpu": 1.0})
    assert n == 2 and "5 train_gpu ÷ 2 GPU(s) per job" in why
    with pytest.raises(SweepError, match="advertises no train_gpu"):
        training_concurrency(spec, {"CPU": 8.0, "infer_gpu": 1.0})
    with pytest.raises(SweepError, match="infer_gpu"):
        training_concurrency(spec, {"train_gpu": 2.0})
    # a pool that autoscales from zero advertises nothing yet: the file's concurrency is used, with a note
    n, why = training_concurrency(_spec(concurrency=3), {"CPU": 4.0})
    assert n == 3 and "autoscaling from zero" in why


# -- scores ---------------------------------------------------------------------------------------------------
def test_content_proxy_follows_layout_not_palette():
    same_scene = [content_proxy(render_picture(a, 0, i, 256)[0], render_picture(b, 0, i, 256)[0])
                  for a, b in (("neon", "pastel"), ("sepia", "mosaic"), ("bauhaus", "blueprint")) for i in range(3)]
    other_scene = [content_proxy(render_picture(s, 0, i, 256)[0], render_picture(s, 0, i + 4, 256)[0])
                   for s in ("neon", "sepia", "bauhaus") for i in range(3)]
    assert min(same_scene) > CONTENT_KEPT_AT > max(other_scene)
    picture = render_picture("ukiyo", 0, 1, 256)[0]
    assert content_proxy(picture, picture) == pytest.approx(1.0)
    assert content_proxy(picture, ImageOps.invert(picture)) == pytest.approx(1.0, abs=0.05)  # brightness is style
    flat = Image.new("RGB", (64, 64), "red")
    assert content_proxy(flat, flat) == 1.0 and content_proxy(flat, picture) == 0.0


def test_base_samples_render_deterministically_on_the_tiny_model(tiny_dir, tmp_path):
    args = ("tiny", str(tmp_path), None, ["zxy_neon. a house", "zxy_neon. a boat"], [0, 1], 64, 2, 4.0, False)
    first, second = render_samples(*args), render_samples(*args)
    assert sorted(first) == sorted(sample_name(None, p, s) for p in (0, 1) for s in (0, 1))
    assert first == second  # same (prompt, seed), same pixels
    images = {k: Image.open(io.BytesIO(v)) for k, v in first.items()}
    assert all(im.size == (64, 64) for im in images.values())
    assert first[sample_name(None, 0, 0)] != first[sample_name(None, 0, 1)]


# -- resume ---------------------------------------------------------------------------------------------------
def test_a_finished_cell_is_skipped_and_a_changed_one_is_refused(tmp_path):
    spec = _spec(storage=str(tmp_path / "st"))
    storage = Storage.from_uri(spec.storage)
    board = prepare_board(spec.boards[0], tmp_path)
    assert board.n_refs == 3 and board.band == "1–3"
    run = SweepRun(spec, storage, {board.spec.name: board}, use_gpu=False, log=lambda line: None)
    cell = spec.cells()[0]
    cfg = spec.train_config(cell, storage.uri)
    cfg.use_gpu = False
    storage.write_json(f"{run.cell_prefix(cell)}/manifest.json",
                       {"fingerprint": _cell_fingerprint(run, cell, board, cfg), "job_id": cell.job_id})
    outcome = _train_cell(run, cell)
    assert outcome["state"] == "finished" and outcome["manifest"]["job_id"] == cell.job_id

    # the sweep file changed (more steps) but the cell's LoRA was trained with the old settings: refuse to mix
    changed = _spec(storage=str(tmp_path / "st"), steps=77)
    run = SweepRun(changed, storage, {board.spec.name: board}, use_gpu=False, log=lambda line: None)
    old, _ = cfg.resolved(board.n_refs, on_gpu=False)
    storage.write_json(f"tenants/default/loras/{cell.job_id}/manifest.json",
                       {"config": old.to_dict(), "dataset": {"hash": board.dataset_hash}})
    with pytest.raises(SweepError, match=r"exists with other settings \(steps\)"):
        _train_cell(run, changed.cells()[0])


# -- tables ---------------------------------------------------------------------------------------------------
def _manifest(board, variant, n_refs, style_by_step, val_by_step, delivered, content=0.8):
    samples = [{"step": step, "prompt_index": p, "prompt": f"p{p}", "seed": s, "file": f"samples/{sample_name(step, p, s)}",
                "style_distance": d, "content_proxy": content, "val_loss": val_by_step[step]}
               for step, d in style_by_step.items() for p in (0, 1) for s in (0, 1)]
    return {"board": board, "variant": variant, "job_id": f"{board}-{variant}".lower().replace("+", ""), "n_refs": n_refs,
            "band": size_band(n_refs), "decision": {"variant": variant}, "steps": max(style_by_step),
            "checkpoints": sorted(style_by_step), "delivered_step": delivered, "best_step": min(val_by_step, key=val_by_step.get),
            "val_curve": [{"step": k, "val_loss": v} for k, v in sorted(val_by_step.items())], "midpoint_jumps": [],
            "base_style_distance": {"base/p0_s0.png": 1.0}, "samples": samples, "files": {}}


def _pairs(board, winners):
    """One pairwise verdict per (prompt, seed), in order; `winners` names the winning variant of each."""
    keys = list(itertools.product((0, 1), (0, 1)))
    return [{"board": board, "prompt_index": p, "prompt": f"p{p}", "seed": s, "a": "GEM+A", "b": "B_r128",
             "step_a": 0, "step_b": 0, "winner": w, "judge": "offline", "a_shows_content": None, "b_shows_content": None,
             "reason": "style distance"} for (p, s), w in zip(keys, winners)]


def test_tables_count_wins_per_band_and_compare_the_auto_policy():
    spec = _spec(boards=[{"name": "small", "make": {"style": "neon", "n": 3}}, {"name": "big", "make": {"style": "ukiyo", "n": 12}},
                         {"name": "mid", "make": {"style": "sepia", "n": 6}}])
    manifests = [
        _manifest("small", "GEM+A", 3, {10: 0.9, 20: 0.8}, {10: 3.0, 20: 2.9}, 20),
        _manifest("small", "B_r128", 3, {10: 0.7, 20: 0.75}, {10: 2.5, 20: 2.6}, 10, content=0.1),
        _manifest("big", "GEM+A", 12, {10: 0.6, 20: 0.5}, {10: 2.0, 20: 1.9}, 20),
        _manifest("big", "B_r128", 12, {10: 0.7, 20: 0.65}, {10: 2.2, 20: 2.1}, 20),
        _manifest("mid", "GEM+A", 6, {10: 0.6, 20: 0.5}, {10: 2.0, 20: 1.9}, 20),
        _manifest("mid", "B_r128", 6, {10: 0.6, 20: 0.5}, {10: 2.0, 20: 1.9}, 20),
    ]
    # the cell's health column: the LoRA manifest's report in a few words (evaluation.sweep.health_cell)
    manifests[1]["health"] = health_cell({"overall": "fail", "delivered_step": 20, "recommended_step": 10, "symptoms": [
        {"id": "deep_fried", "verdict": "fail"}, {"id": "one_composition", "verdict": "warn"}, {"id": "poor_refs", "verdict": "ok"}]})
    pairs = (_pairs("small", ["B_r128", "B_r128", "B_r128", "GEM+A"]) + _pairs("big", ["GEM+A"] * 3 + ["B_r128"])
             + _pairs("mid", ["GEM+A", "GEM+A", "B_r128", "B_r128"]))
    tables = compute_tables(spec, manifests, pairs)

    seeds = {r[0]: r for r in tables["seeds_table"]["rows"]}
    assert seeds["GEM+A"][1:4] == ["6", "12", "50%"] and seeds["B_r128"][1:4] == ["6", "12", "50%"]
    assert "wins band 10–15" in seeds["GEM+A"][7] and "wins band 1–3" in seeds["B_r128"][7]
    assert "content drifts from the base image on small" in seeds["B_r128"][7]
    assert "content drifts" not in seeds["GEM+A"][7]

    matrix = {r[0]: r for r in tables["size_matrix"]["rows"]}
    assert list(matrix) == ["1–3", "5–7", "10–15"]  # in band order, only the bands the sweep has
    assert matrix["1–3"][2:] == ["25% (1/4)", "75% (3/4)", "B_r128", "B_r128", "agree"]
    assert matrix["10–15"][2:] == ["75% (3/4)", "25% (1/4)", "GEM+A", "GEM+A", "agree"]
    assert matrix["5–7"][4:] == ["tie: GEM+A, B_r128", "GEM+B", "n/a (no single winner)"]
    # the policy disagrees when the other variant wins the band
    flipped = compute_tables(spec, manifests, [dict(p, winner="GEM+A") for p in pairs])
    flipped_matrix = {r[0]: r for r in flipped["size_matrix"]["rows"]}
    assert flipped_matrix["1–3"][-3:] == ["GEM+A", "B_r128", "disagree"]
    only_a = compute_tables(SweepSpec.from_dict({**spec.to_dict(), "sample": {}, "variants": ["GEM+A"]}),
                            [m for m in manifests if m["variant"] == "GEM+A"], [])
    assert {r[0]: r[-1] for r in only_a["size_matrix"]["rows"]}["5–7"] == "n/a (no single winner)"

    board_rows = {(r[0], r[3]): r for r in tables["board_variant"]["rows"]}
    assert board_rows[("small", "B_r128")][5:8] == ["3", "4", "75%"]
    assert board_rows[("small", "B_r128")][8] == "0.700"  # style distance at the delivered step (10)
    assert board_rows[("small", "B_r128")][11] == "0%" and board_rows[("big", "GEM+A")][11] == "100%"  # content kept
    assert tables["board_variant"]["columns"][15] == "health"
    assert board_rows[("small", "B_r128")][15] == "fail (deep_fried fail, one_composition warn); use step 10"
    assert board_rows[("big", "GEM+A")][15] == "—"

    conv = {(r[0], r[1]): r for r in tables["convergence"]["rows"]}
    assert conv[("small", "B_r128")][4] == "2.500@10 → 2.600@20"
    assert conv[("small", "B_r128")][5:9] == ["10", "10", "0.700", "10"]  # best val step, best style step, delivered
    assert conv[("small", "GEM+A")][5:7] == ["20", "20"]
    best = {r[0]: r for r in tables["best_step"]["rows"]}
    assert best["small"][1] == "B_r128 @ step 10" and best["big"][1] == "GEM+A @ step 20"

    assert len(tables["samples"]["rows"]) == 6 * 2 * 4 and len(tables["pairs"]["rows"]) == 12
    md = markdown_table(tables["size_matrix"])
    assert md.splitlines()[0].startswith("| refs band | boards (refs) | GEM+A | B_r128 | winner | auto policy |")
    assert "| 1–3 | small (3) |" in md
    parsed = list(csv.reader(io.StringIO(csv_table(tables["seeds_table"]).decode())))
    assert parsed[0][:4] == ["variant", "wins", "comparisons", "win rate"] and len(parsed) == 3
    png = Image.open(io.BytesIO(table_png(tables["board_variant"])))
    assert png.width > 600 and png.height > 20 * (len(board_rows) + 1)


# -- where sweeps come from ------------------------------------------------------------------------------------
def test_the_rayjob_sweep_file_is_a_valid_sweep():
    import yaml

    docs = list(yaml.safe_load_all((EXAMPLE_SWEEP.parents[2] / "k8s" / "sweep-configmap.yaml").read_text()))
    config_map = next(d for d in docs if d and d.get("kind") == "ConfigMap")
    spec = SweepSpec.from_dict(yaml.safe_load(config_map["data"]["sweep.yaml"]), source="k8s/sweep-configmap.yaml")
    assert len(spec.cells()) == len(spec.boards) * len(spec.variants) >= 4
    # its pools start at zero replicas: the file must say how many jobs to run and that they use GPUs
    n, why = training_concurrency(spec, {"CPU": 4.0})
    assert n == spec.concurrency and spec.base["use_gpu"] is True
    assert all(b.refs.startswith("s3://") for b in spec.boards)


def test_sweep_command_line_errors(tmp_path, capsys):
    from cli.main import main

    assert main(["sweep"]) == 2
    assert "give a sweep YAML or --example" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("name: x\nboards: [{name: a, make: {style: neon, n: 3}}]\nvariants: [GEM+Z]\n")
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 2
    assert "unknown variant 'GEM+Z'" in capsys.readouterr().err


# -- the pairwise judge ----------------------------------------------------------------------------------------
def test_pairs_are_judged_by_gemini_with_a_key_and_by_the_style_score_without(tmp_path, monkeypatch):
    try:
        from tests.gemini_server import TEST_API_KEY, GeminiProtocolServer
    except ImportError:  # tests/ is not a package: pytest put it on sys.path
        from gemini_server import TEST_API_KEY, GeminiProtocolServer
    from evaluation.sweep import judge_cells

    spec = _spec(storage=str(tmp_path / "st"), prompts=["a house by the sea"], seeds=[0, 1])
    storage = Storage.from_uri(spec.storage)
    board = prepare_board(spec.boards[0], tmp_path)  # 3 neon refs
    run = SweepRun(spec, storage, {board.spec.name: board}, use_gpu=False, log=lambda line: None)
    manifests = []
    for cell, style in zip(spec.cells(), ("neon", "bauhaus")):  # GEM+A draws in the refs' style, B_r128 does not
        files, samples = {}, []
        for seed in spec.seeds:
            name = f"samples/{sample_name(10, 0, seed)}"
            buf = io.BytesIO()
            render_picture(style, 1, seed, 256)[0].save(buf, format="PNG")
            files[name] = storage.write_bytes(f"{run.cell_prefix(cell)}/{name}", buf.getvalue())
            samples.append({"step": 10, "prompt_index": 0, "prompt": spec.prompts[0], "seed": seed, "file": name})
        manifests.append({"board": "a", "variant": cell.variant.name, "job_id": cell.job_id, "delivered_step": 10,
                          "samples": samples, "files": files})

    with GeminiProtocolServer() as server:
        monkeypatch.setenv("GEMINI_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("GEMINI_BASE_URL", server.base_url)
        verdict = {"winner": "b", "a_shows_content": True, "b_shows_content": False, "reason": "B's palette; B lost the house"}
        server.push_json(verdict)
        server.push_json(verdict)
        pairs = judge_cells(run, manifests)
        assert [(p["a"], p["b"], p["seed"], p["winner"], p["judge"]) for p in pairs] == [
            ("GEM+A", "B_r128", 0, "B_r128", "gemini"), ("GEM+A", "B_r128", 1, "B_r128", "gemini")]
        assert all(p["a_shows_content"] is True and p["b_shows_content"] is False for p in pairs)
        assert len(server.requests) == 2 and "a house by the sea" in server.requests[0].prompt_text
        assert len(server.requests[0].images) == 3 + 2  # the board's refs, then A and B
        assert judge_cells(run, manifests) == pairs and len(server.requests) == 2  # verdicts are stored, not re-asked

    monkeypatch.delenv("GEMINI_API_KEY")
    offline = judge_cells(run, manifests)
    assert [(p["winner"], p["judge"], p["a_shows_content"]) for p in offline] == [("GEM+A", "offline", None)] * 2
    with pytest.raises(SweepError, match="judge: gemini needs GEMINI_API_KEY"):
        judge_cells(SweepRun(_spec(storage=spec.storage, judge="gemini"), storage, run.boards, False, print), manifests)

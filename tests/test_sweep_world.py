"""The sweep's world judge (`judge: world`): world boards, the per-cell figures, the rule, the tables.

The rule and the tables run on small sets of judged cells written here; the one real part that needs the model
(the Ray task's function that draws and judges a side) runs on the shipped mini base, in process, on one image.
The whole sweep on mini is `evaluation/sweeps/mini.yaml` (README, "The example sweep on mini").
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from evaluation import world
from evaluation.sweep import (
    EXAMPLE_SWEEP,
    WORLD_CONTENT_MIN,
    WORLD_STYLE_TIE,
    SweepError,
    SweepSpec,
    compute_tables,
    judge_in_world,
    load_sweep,
    markdown_table,
    prepare_board,
    size_band,
    world_board_leaders,
    world_pair_winner,
    world_pairs,
)
from train.recipe import choose_variant

MINI_SWEEP = EXAMPLE_SWEEP.with_name("mini.yaml")


def _spec(**overrides) -> SweepSpec:
    data = {"name": "w", "model": "mini", "judge": "world",
            "boards": [{"name": "g3", "make": {"style": "stained_glass", "n": 3}},
                       {"name": "g6", "make": {"style": "stained_glass", "n": 6}},
                       {"name": "g12", "make": {"style": "stained_glass", "n": 12}}],
            "variants": ["GEM+A", "GEM+B", "B_r128"], "base": {"resolution": 128}}
    data.update(overrides)
    return SweepSpec.from_dict(data)


# -- the sweep file --------------------------------------------------------------------------------------------
def test_the_mini_sweep_is_three_recipes_at_three_sizes_of_a_held_out_style():
    spec = load_sweep(MINI_SWEEP)
    assert spec.model == "mini" and spec.judge == "world" and spec.concurrency == 1
    assert [c.variant.name for c in spec.cells()[:3]] == ["GEM+A", "GEM+B", "B_r128"]
    assert sorted(int(b.make["n"]) for b in spec.boards) == [3, 6, 12]
    assert all(b.make["style"] in world.HELDOUT_STYLES for b in spec.boards)
    # the three sizes fall in the seeds' three bands, and the auto policy's pick of each is in the sweep
    assert [size_band(int(b.make["n"])) for b in spec.boards] == ["1–3", "5–7", "10–15"]
    assert {choose_variant(int(b.make["n"])).variant for b in spec.boards} == {"GEM+A", "GEM+B", "B_r128"}


def test_world_judge_needs_mini_and_world_boards():
    with pytest.raises(SweepError, match="set model: mini"):
        _spec(model="tiny")
    with pytest.raises(SweepError, match=r"not world boards: \['neon3'\]"):  # neon is a scene board unless kind: world
        _spec(boards=[{"name": "neon3", "make": {"style": "neon", "n": 3}}])
    _spec(boards=[{"name": "neon3", "make": {"style": "neon", "n": 3, "kind": "world"}}])
    with pytest.raises(SweepError, match="make needs style"):
        _spec(boards=[{"name": "u", "make": {"style": "ukiyo", "n": 3, "kind": "world"}}])  # a scene style only
    with pytest.raises(SweepError, match="make.kind 'photo'"):
        _spec(boards=[{"name": "u", "make": {"style": "neon", "n": 3, "kind": "photo"}}])


def test_a_world_board_is_drawn_from_the_world(tmp_path):
    board = prepare_board(_spec().boards[1], tmp_path)
    assert board.world_style == "stained_glass" and board.n_refs == 6
    picture, caption, _ = world.sample("stained_glass", 4, seed=0, size=256)
    assert board.refs[4].tobytes() == picture.tobytes()
    assert world.board_contents(board.n_refs) == ["lighthouse", "house", "boat", "cat", "fish", "tree"]
    assert world.board_contents(30) == list(world.CONTENT_CLASSES)
    scene = prepare_board(SweepSpec.from_dict({"name": "s", "boards": [{"name": "n", "make": {"style": "neon", "n": 3}}],
                                               "variants": ["GEM+A"]}).boards[0], tmp_path / "scene")
    assert scene.world_style is None  # the example sweep's boards are unchanged


# -- the rule --------------------------------------------------------------------------------------------------
def _fig(style: float, content: float) -> dict:
    return {"style_prob": style, "content_ok": content, "n": 6}


def test_the_pairwise_rule_puts_content_first_then_style_then_content():
    keeps, loses = WORLD_CONTENT_MIN, WORLD_CONTENT_MIN - 0.01
    assert world_pair_winner(_fig(0.2, keeps), _fig(0.99, loses))[0] == "a"  # stylish but the subject is gone
    assert world_pair_winner(_fig(0.5, 1.0), _fig(0.9, 0.5))[0] == "b"  # both keep it: style decides
    assert world_pair_winner(_fig(0.9, 0.1), _fig(0.3, 0.2))[0] == "a"  # neither keeps it: style decides
    assert world_pair_winner(_fig(0.90, 0.5), _fig(0.90 + WORLD_STYLE_TIE / 2, 0.67))[0] == "b"  # style tied: content
    winner, reason = world_pair_winner(_fig(0.8, 0.5), _fig(0.8, 0.5))
    assert winner is None and reason.startswith("tie")

    assert world_board_leaders({"A": _fig(0.4, 1.0), "B": _fig(0.95, 0.0), "C": _fig(0.6, 0.5)}) == (["C"], True)
    assert world_board_leaders({"A": _fig(0.4, 0.0), "B": _fig(0.95, 0.0)}) == (["B"], False)
    assert world_board_leaders({"B": _fig(0.9, 1.0), "R": _fig(0.9, 1.0), "A": _fig(0.7, 1.0)}) == (["B", "R"], True)


# -- the tables ------------------------------------------------------------------------------------------------
def _cell(board: str, variant: str, n_refs: int, lora: dict, base: dict) -> dict:
    samples = [{"step": 20, "prompt_index": 0, "prompt": "p", "seed": 0, "file": "samples/x.png", "style_distance": 0.5,
                "content_proxy": 0.6, "val_loss": 1.0}]
    return {"board": board, "variant": variant, "job_id": f"{board}-{variant}", "n_refs": n_refs, "band": size_band(n_refs),
            "decision": {"variant": variant}, "steps": 20, "checkpoints": [20], "delivered_step": 20, "best_step": 20,
            "val_curve": [{"step": 20, "val_loss": 1.0}], "midpoint_jumps": [], "base_style_distance": {"b": 1.2},
            "samples": samples, "files": {},
            "world": {"style": "stained_glass", "lora": lora, "base": base}}


def test_world_tables_mark_the_winner_and_compare_the_policy_cell_by_cell():
    spec = _spec()
    base = _fig(0.001, 1.0)
    manifests = [
        # 3 refs: B_r128 (the policy's pick) and GEM+B are equal, GEM+A less stylish → agree, co-winner
        _cell("g3", "GEM+A", 3, _fig(0.40, 1.0), base), _cell("g3", "GEM+B", 3, _fig(0.90, 0.67), base),
        _cell("g3", "B_r128", 3, _fig(0.90, 0.67), base),
        # 6 refs: GEM+B (the pick) draws only the style; GEM+A keeps the subject → disagree
        _cell("g6", "GEM+A", 6, _fig(0.70, 0.83), base), _cell("g6", "GEM+B", 6, _fig(0.99, 0.17), base),
        _cell("g6", "B_r128", 6, _fig(0.99, 0.17), base),
        # 12 refs: GEM+A (the pick) is best on both → agree
        _cell("g12", "GEM+A", 12, _fig(0.95, 0.92), base), _cell("g12", "GEM+B", 12, _fig(0.60, 0.50), base),
        _cell("g12", "B_r128", 12, _fig(0.60, 0.50), base),
    ]
    pairs = world_pairs(spec, manifests)
    assert len(pairs) == 9 and {p["judge"] for p in pairs} == {"world"}
    assert [p["winner"] for p in pairs if p["board"] == "g3"] == ["GEM+B", "B_r128", None]
    tables = compute_tables(spec, manifests, pairs)

    policy = {r[0]: r for r in tables["policy"]["rows"]}
    assert list(policy) == ["3", "6", "12"]
    assert policy["3"][2:] == ["B_r128", "tie: GEM+B, B_r128", "agree (co-winner with GEM+B)"]
    assert policy["6"][2:] == ["GEM+B", "GEM+A", "disagree"]
    assert policy["12"][2:] == ["GEM+A", "GEM+A", "agree"]

    matrix = {r[0].split()[0]: r for r in tables["world_matrix"]["rows"]}
    assert tables["world_matrix"]["columns"] == ["refs (board, style)", "base", "GEM+A", "GEM+B", "B_r128", "winner"]
    assert matrix["6"][1:5] == ["0.00 / 1.00", "0.70 / 0.83 ★", "0.99 / 0.17", "0.99 / 0.17"]
    assert matrix["3"][3:5] == ["0.90 / 0.67 ★", "0.90 / 0.67 ★"]

    cells = {(r[0], r[3]): r for r in tables["world_cells"]["rows"]}
    assert cells[("g6", "GEM+B")][5:8] == ["0.990", "0.17", "no"] and cells[("g6", "GEM+A")][12] == "2/2"
    assert cells[("g12", "GEM+A")][14] == "★" and cells[("g12", "GEM+B")][14] == ""

    seeds = {r[0]: r for r in tables["seeds_table"]["rows"]}  # the seeds' table counts the same pairs
    assert seeds["GEM+A"][1:4] == ["4", "6", "67%"] and seeds["GEM+B"][1:3] == ["1", "6"]
    assert "| 6 | g6 | GEM+B | GEM+A | disagree |" in markdown_table(tables["policy"])

    with pytest.raises(SweepError, match=r"no world figures: g3 × GEM\+A"):
        world_pairs(spec, [{k: v for k, v in manifests[0].items() if k != "world"}] + manifests[1:])


# -- the real part: one side drawn by mini and judged --------------------------------------------------------
def test_judge_in_world_draws_and_judges_the_base_on_mini(tmp_path):
    """The Ray task's function, in process: the mini base, one world caption behind the trigger, the exact judge."""
    figures = judge_in_world("mini", str(tmp_path), None, "zxy_stained_glass", "stained_glass", ["lighthouse"], [0],
                             use_gpu=False)
    assert figures["n"] == 1 and len(figures["pngs"]) == 1
    assert Image.open(io.BytesIO(figures["pngs"][0])).size == (128, 128)
    assert figures["style_prob"] < 0.05  # the base has never seen stained glass
    assert figures["content_ok"] == 1.0  # mini v2 reads past the trigger: the lighthouse is drawn
    with pytest.raises(ValueError, match="got style 'watercolour_of_nowhere'"):
        judge_in_world("mini", str(tmp_path), None, "zxy_x", "watercolour_of_nowhere", ["lighthouse"], [0], use_gpu=False)
    with pytest.raises(ValueError, match=r"unknown contents \['dragon'\]"):
        judge_in_world("mini", str(tmp_path), None, "zxy_x", "stained_glass", ["dragon"], [0], use_gpu=False)

"""train.optim: GroupedAdafactor is transformers' Adafactor (settings we use), checkpoints move between them."""

import copy
import io

import pytest
import torch
from transformers.optimization import Adafactor

from train.optim import GroupedAdafactor, make_optimizer
from train.recipe import TrainConfig

KW = dict(lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-4)
SHAPES = [(32, 64), (96, 32), (32, 64), (32, 160), (96, 32), (48,), (32, 64)]


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _run(steps, opt_a, opt_b, pa, pb, seed=1, on_step=None):
    sch = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt_a, opt_b)]
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for s in range(steps):
        for a, b in zip(pa, pb):
            grad = torch.randn(a.shape, generator=g) * (1 + s)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step(), opt_b.step()
        for sc in sch:
            sc.step()
        if on_step:
            on_step(s)
        worst = max(worst, max(_rel(b, a) for a, b in zip(pa, pb)))
    return worst


def test_grouped_adafactor_equals_transformers_adafactor():
    ref, new = _params(), _params()
    opt_ref, opt_new = Adafactor(ref, **KW), GroupedAdafactor(new, **KW)
    assert _run(8, opt_ref, opt_new, ref, new) < 1e-6
    for a, b in zip(ref, new):
        sa, sb = opt_ref.state[a], opt_new.state[b]
        assert sa["step"] == sb["step"] == 8
        for n in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if n in sa:
                assert sb[n].shape == sa[n].shape and _rel(sb[n], sa[n]) < 1e-6


def test_checkpoints_move_between_the_two_both_ways():
    ref, new = _params(), _params()
    opt_ref, opt_new = Adafactor(ref, **KW), GroupedAdafactor(new, **KW)

    def swap(step):
        if step == 2:  # transformers' checkpoint resumes in GroupedAdafactor (through torch.save / torch.load)
            buf = io.BytesIO()
            torch.save(opt_ref.state_dict(), buf)
            buf.seek(0)
            opt_new.load_state_dict(torch.load(buf, weights_only=True))
        if step == 4:  # and the other way
            opt_ref.load_state_dict(copy.deepcopy(opt_new.state_dict()))

    assert _run(7, opt_ref, opt_new, ref, new, on_step=swap) < 1e-6


def test_grouped_adafactor_refuses_settings_it_does_not_cover():
    with pytest.raises(ValueError):
        GroupedAdafactor(_params(), lr=None)
    with pytest.raises(ValueError):
        GroupedAdafactor(_params(), lr=1e-3, beta1=0.9)
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError):
        GroupedAdafactor([p], lr=1e-3).step()


def test_make_optimizer_uses_the_grouped_adafactor_on_cuda_only():
    cfg = TrainConfig(model="tiny", steps=10)
    assert cfg.optimizer == "adafactor"
    assert type(make_optimizer(_params(), cfg, torch.device("cuda"))) is GroupedAdafactor
    assert type(make_optimizer(_params(), cfg, torch.device("cpu"))) is Adafactor
    assert type(make_optimizer(_params(), cfg, "cpu", grouped=True)) is GroupedAdafactor
    opt = make_optimizer(_params(), cfg, "cpu")
    assert opt.defaults["lr"] == cfg.lr and opt.defaults["weight_decay"] == cfg.weight_decay
    cfg.optimizer = "adamw"
    assert isinstance(make_optimizer(_params(), cfg, "cpu"), torch.optim.AdamW)

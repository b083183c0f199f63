"""The learning-rate schedule and the optimizer step (AMP scaler off on CPU, clipping, schedule, state)."""
import copy
import math

import pytest
import torch
from torch import nn

from helpers.training.optim import Optimization, amp_enabled, build_optimizer, build_scheduler, lr_factor


def test_lr_factor_warmup_then_cosine_matches_formula():
    total, warm = 20, 4
    got = [lr_factor(s, total_steps=total, warmup_steps=warm, schedule="cosine", final_ratio=0.1) for s in range(total)]
    for s in range(warm):
        assert got[s] == pytest.approx((s + 1) / warm)
    for s in range(warm, total):
        t = (s - warm) / (total - warm)
        assert got[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lr_factor(total, total_steps=total, schedule="cosine", final_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, total_steps=10, schedule="linear") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=10, schedule="step")


def _model_and_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8)
    return model, lambda: ((model(x).squeeze(1) - y) ** 2).mean() * 100  # large gradients: clipping bites


def test_optimization_step_equals_the_hand_written_step():
    optim_cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    schedule_cfg = {"name": "cosine", "warmup_steps": 1}
    ref, ref_loss = _model_and_loss()
    ref_opt = build_optimizer(list(ref.parameters()), optim_cfg)
    ref_sched = build_scheduler(ref_opt, schedule_cfg, 5)
    model, loss_fn = _model_and_loss()
    opt = Optimization(model.parameters(), optim_cfg=optim_cfg, schedule_cfg=schedule_cfg, total_steps=5,
                       grad_clip=1.0)
    for _ in range(3):
        ref_opt.zero_grad()
        ref_loss().backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0))
        lr = ref_opt.param_groups[0]["lr"]
        ref_opt.step()
        ref_sched.step()
        assert opt.step(loss_fn()) == (lr, norm)
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    assert norm > 1.0  # the clipping did something


def test_optimization_state_round_trip_continues_identically():
    cfgs = dict(optim_cfg={"name": "adamw", "lr": 0.01}, schedule_cfg={"name": "linear"}, total_steps=6)
    model, loss_fn = _model_and_loss()
    opt = Optimization(model.parameters(), **cfgs)
    opt.step(loss_fn())
    saved = copy.deepcopy(opt.state_dict())  # the live dict's tensors move with later steps
    assert set(saved) == {"optimizer", "scheduler", "scaler"}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    steps_a = [opt.step(loss_fn()) for _ in range(2)]
    weights_a = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    other = Optimization(model.parameters(), **cfgs)
    other.load_state_dict(saved)
    steps_b = [other.step(loss_fn()) for _ in range(2)]
    assert [lr for lr, _ in steps_b] == [lr for lr, _ in steps_a] and steps_a[0][0] < 0.01  # the schedule went on
    assert all(torch.equal(v, weights_a[k]) for k, v in model.state_dict().items())  # so did AdamW's moments
    assert all(math.isnan(norm) for _, norm in steps_a + steps_b)  # no clipping: no norm


def test_amp_only_on_cuda():
    assert not amp_enabled("auto", torch.device("cpu")) and not amp_enabled(True, torch.device("cpu"))
    assert amp_enabled("auto", torch.device("cuda", 0)) and amp_enabled(True, torch.device("cuda", 0))
    assert not amp_enabled(False, torch.device("cuda", 0))

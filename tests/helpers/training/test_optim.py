"""The learning-rate schedule (warm-up by steps or by ratio), layer-wise learning-rate decay, and the optimizer step
(AMP scaler off on CPU, clipping, schedule, state)."""
import copy
import math
import re

import pytest
import torch
from torch import nn

from helpers.training.optim import (
    Optimization,
    amp_enabled,
    build_optimizer,
    build_scheduler,
    layer_decay_groups,
    lr_factor,
    no_weight_decay_names,
    warmup_steps,
)
from models.cvnet import CVNetGlobal
from models.timm_global import TimmGlobal


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


def test_warmup_by_ratio_is_that_share_of_the_steps():
    assert warmup_steps({"warmup_ratio": 0.15}, 100) == 15 and warmup_steps({"warmup_ratio": 0.15}, 7) == 1
    assert warmup_steps({"warmup_steps": 4, "warmup_ratio": None}, 100) == 4
    assert warmup_steps({"warmup_steps": 0, "warmup_ratio": 0.0}, 100) == 0
    with pytest.raises(ValueError, match="warmup_steps=0 or warmup_ratio=null"):
        warmup_steps({"warmup_steps": 4, "warmup_ratio": 0.15}, 100)
    model = nn.Linear(2, 1)
    opt = build_optimizer(list(model.parameters()), {"name": "sgd", "lr": 1.0})
    sched = build_scheduler(opt, {"name": "cosine", "warmup_ratio": 0.15}, 40)
    got = []
    for _ in range(40):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([lr_factor(s, total_steps=40, warmup_steps=6) for s in range(40)])
    assert got[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]) and got[-1] < 0.01


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


def _check_groups(module, groups, expected_layer, *, lr, decay, num_layers, weight_decay, no_decay=()):
    """Every trainable parameter in exactly one group, at its expected layer, lr and weight decay."""
    by_param = _group_of(groups)
    assert sum(len(g["params"]) for g in groups) == len(by_param)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_param, name
            continue
        group, layer = by_param[id(p)], expected_layer(name)
        assert group["layer"] == layer, name
        assert group["lr"] == pytest.approx(lr * decay ** (num_layers - 1 - layer)), name
        assert group["weight_decay"] == (0.0 if p.ndim <= 1 or name in no_decay else weight_decay), name


def test_layer_decay_over_a_vit_s_blocks():
    torch.manual_seed(0)
    vit = TimmGlobal("test_vit", dim=8, head="embedding")  # 6 blocks

    def layer(name):  # BEiT's numbering: embedding 0, block i at i + 1 (the final norm with the last), head 7
        if name.startswith(("body.model.cls_token", "body.model.pos_embed", "body.model.patch_embed")):
            return 0
        block = re.match(r"body\.model\.blocks\.(\d+)\.", name)
        if block:
            return int(block.group(1)) + 1
        return 6 if name.startswith("body.model.norm.") else 7

    groups = layer_decay_groups(vit, vit, lr=1e-3, decay=0.65, weight_decay=0.05,
                                no_weight_decay=no_weight_decay_names(vit))
    _check_groups(vit, groups, layer, lr=1e-3, decay=0.65, num_layers=8, weight_decay=0.05,
                  no_decay={"body.model.cls_token", "body.model.pos_embed"})
    assert {n for n, p in vit.named_parameters() if _group_of(groups)[id(p)]["layer"] == 7} == {
        "pool.p", "projection.fc.weight", "projection.fc.bias", "projection.bn.weight", "projection.bn.bias"}
    assert [(g["layer"], g["weight_decay"] > 0) for g in groups][:3] == [(0, True), (0, False), (1, True)]


@pytest.mark.parametrize("kind", ["timm", "cvnet"])
def test_layer_decay_over_a_resnet_s_stages(kind):
    torch.manual_seed(0)
    if kind == "timm":
        model, prefix = TimmGlobal("test_resnet", dim=8), "body.model."
    else:
        model, prefix = CVNetGlobal(50, 16), "backbone."

    def layer(name):  # stem 0, stages 1-4, head (GeM, fc) 5
        if name.startswith((prefix + "conv1.", prefix + "bn1.")):
            return 0
        stage = re.match(re.escape(prefix) + r"layer([1-4])\.", name)
        return int(stage.group(1)) if stage else 5

    groups = layer_decay_groups(model, model, lr=0.1, decay=0.5, weight_decay=0.01)
    _check_groups(model, groups, layer, lr=0.1, decay=0.5, num_layers=6, weight_decay=0.01)
    assert sorted({g["layer"] for g in groups}) == [0, 1, 2, 3, 4, 5]


def test_layer_decay_puts_what_is_not_the_model_on_top_and_refuses_a_model_without_layers():
    torch.manual_seed(0)
    model = TimmGlobal("test_resnet")
    module = nn.ModuleDict({"model": model, "classifier": nn.Linear(96, 3)})
    groups = layer_decay_groups(module, model, lr=0.1, decay=0.5, weight_decay=0.01)
    by_param = _group_of(groups)
    assert by_param[id(module["classifier"].weight)]["lr"] == 0.1
    assert by_param[id(module["classifier"].weight)]["weight_decay"] == 0.01
    assert by_param[id(module["classifier"].bias)]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="layer_decay needs"):
        layer_decay_groups(module, nn.Linear(2, 2), lr=0.1, decay=0.5, weight_decay=0.0)


def test_optimization_schedules_every_group_from_its_own_rate():
    torch.manual_seed(0)
    model = TimmGlobal("test_vit", dim=8)
    groups = layer_decay_groups(model, model, lr=0.01, decay=0.5, weight_decay=0.05)
    base = [g["lr"] for g in groups]
    opt = Optimization(groups, optim_cfg={"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
                       schedule_cfg={"name": "cosine", "warmup_ratio": 0.25}, total_steps=8)
    x = torch.randn(2, 3, 32, 32)
    for step in range(8):
        factor = lr_factor(step, total_steps=8, warmup_steps=2)
        lr, _ = opt.step(model(x).sum())
        assert lr == pytest.approx(0.01 * factor)  # the top group's: the base rate times the schedule
        assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx(
            [b * lr_factor(step + 1, total_steps=8, warmup_steps=2) for b in base])
    assert [g["weight_decay"] for g in opt.optimizer.param_groups] == [g["weight_decay"] for g in groups]
    assert len(opt.params) == sum(1 for p in model.parameters() if p.requires_grad)

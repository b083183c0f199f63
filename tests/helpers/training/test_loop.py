"""The step loop (crash + resume == uninterrupted, on a toy model), its metrics file and its config."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from helpers.distributed import DistEnv
from helpers.schemas import TRAIN_BACKBONE
from helpers.training.loop import METRICS_NAME, JsonlLog, LoopConfig, read_jsonl, run_loop
from helpers.training.state import TRAIN_STATE_NAME, load_train_state


def test_jsonl_log_drops_records_past_the_resumed_step(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": float(s)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    JsonlLog(tmp_path / "m.jsonl", resume_step=2)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


# ------------------------------------------------------------------------------------------------ the loop


class _Toy(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(20, generator=g)

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Crash(RuntimeError):
    pass


def _toy_run(out_dir, *, resume=False, crash_at=None, total=9):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    noise_draws = []

    def step_fn(batch, step):
        if crash_at is not None and step == crash_at:
            raise _Crash
        x, y = batch
        noise = torch.randn(1)  # the global torch RNG is part of the resumed state
        noise_draws.append(float(noise))
        loss = ((model(x).squeeze(1) - y) ** 2).mean() + 0.0 * noise.sum()
        opt.zero_grad()
        (loss + 0.01 * noise.abs().sum() * model.weight.sum()).backward()
        opt.step()
        return {"loss": loss.item()}

    def get_state():
        return {"model": model.state_dict(), "opt": opt.state_dict()}

    def set_state(s):
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])

    cfg = LoopConfig(out_dir=out_dir, batch_size=6, total_steps=total, checkpoint_every=4, log_every=1,
                     num_workers=0, seed=3, progress=False)
    result = run_loop(dataset=_Toy(), env=DistEnv(), cfg=cfg,
                      step_fn=step_fn, get_state=get_state, set_state=set_state, resume=resume)
    return model, result, noise_draws


def test_loop_crash_and_resume_gives_the_uninterrupted_result(tmp_path):
    ref, result, draws = _toy_run(tmp_path / "a")
    assert result.steps == 9 and len(draws) == 9  # 3 steps per epoch, 3 epochs
    with pytest.raises(_Crash):
        _toy_run(tmp_path / "b", crash_at=6)  # checkpoints at 4, crash during step 7 (0-based 6)
    assert load_train_state(tmp_path / "b" / TRAIN_STATE_NAME)["step"] == 4
    resumed, result_b, draws_b = _toy_run(tmp_path / "b", resume=True)
    assert draws_b == draws[4:]
    assert torch.equal(resumed.weight, ref.weight) and torch.equal(resumed.bias, ref.bias)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if "loss" in r]
    assert steps == list(range(1, 10))  # the log holds each step once, crash or not
    losses_a = [r["loss"] for r in read_jsonl(tmp_path / "a" / METRICS_NAME) if "loss" in r]
    losses_b = [r["loss"] for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if "loss" in r]
    assert losses_a == losses_b
    end = [r for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if r.get("event") == "end"]
    assert end and json.dumps(end[-1])


def test_loop_config_from_a_training_config():
    cfg = {**TRAIN_BACKBONE.defaults, "run": {"out_dir": "runs/x", "seed": 7},
           "train": {**TRAIN_BACKBONE.defaults["train"], "steps": 12, "batch_size": 8, "fixed_batch": True}}
    loop = LoopConfig.from_config(cfg, progress=False, desc="backbone")
    assert loop == LoopConfig(out_dir=Path("runs/x"), batch_size=8, total_steps=12, epochs=25, checkpoint_every=1000,
                              log_every=20, num_workers=8, seed=7, max_corrupt=100, fixed_batch=True,
                              progress=False, desc="backbone")

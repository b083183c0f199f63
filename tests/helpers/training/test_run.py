"""The set-up both training scripts share, on a toy task: open_run -> TrainingRun.optimization / train / finish
optimise only the trainable parameters, write the task's weights at every checkpoint, and a run killed after a
checkpoint and opened again with resume ends on the uninterrupted run's weights."""
import copy
import json

import pytest
import torch
from torch import nn

from helpers.schemas import TRAIN_BACKBONE
from helpers.training.loop import METRICS_NAME, read_jsonl
from helpers.training.run import TrainingRun, open_run
from tests.support.toy_regression import ToyRegression


class _Killed(RuntimeError):
    pass


class _ToyTask:
    """Least squares through a frozen first layer; ``kill_at``: raise at that step, as a killed run would stop."""

    def __init__(self, run: TrainingRun, model: nn.Module, kill_at: int | None = None):
        self.run, self.model, self.kill_at, self.saved = run, model, kill_at, []
        self.opt = run.optimization(run.across_ranks(model), run.total_steps(20))

    def step(self, batch, step):
        if step == self.kill_at:
            raise _Killed
        x, y = batch
        loss = ((self.model(x).squeeze(1) - y) ** 2).mean()
        lr, _ = self.opt.step(loss)
        return {"loss": loss.item(), "lr": lr}

    def state_dict(self):
        return {"model": self.model.state_dict(), **self.opt.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state)

    def save_weights(self, step):
        self.saved.append(step)
        torch.save({"step": step, "model": self.model.state_dict()}, self.run.weights_path)


def _train(out_dir, *, resume=False, kill_at=None):
    cfg = copy.deepcopy(TRAIN_BACKBONE.defaults)
    cfg["run"] = {"out_dir": str(out_dir), "seed": 0}
    cfg["train"].update(steps=7, batch_size=4, checkpoint_every=3, log_every=1, num_workers=0, device="cpu")
    with open_run(cfg, desc="toy", resume=resume, progress=False) as run:
        torch.manual_seed(run.seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        model[0].requires_grad_(False)
        task = _ToyTask(run, model, kill_at)
        result = run.train(ToyRegression(), task, extra_log={"stage": "toy"})
        summary = run.finish(stage="toy", result=result, trained=model)
    return run, task, summary


def test_a_task_runs_with_its_trainable_parameters_and_writes_its_weights_at_each_checkpoint(tmp_path):
    run, task, summary = _train(tmp_path / "a")
    model = task.model
    torch.manual_seed(0)
    frozen = nn.Linear(3, 4)
    assert torch.equal(model[0].weight, frozen.weight) and torch.equal(model[0].bias, frozen.bias)
    assert task.opt.params == list(model[1].parameters())
    assert run.amp is False and run.across_ranks(model) is model and run.out_dir == tmp_path / "a"
    assert task.saved == [3, 6, 7]  # every train.checkpoint_every steps, and the last
    weights = torch.load(run.weights_path, weights_only=True)
    assert weights["step"] == 7 and all(torch.equal(v, model.state_dict()[k]) for k, v in weights["model"].items())
    assert summary["steps"] == 7 and summary["ranks_in_sync"] and summary["checkpoint"] == str(run.weights_path)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["stage"] == "toy"
    start = read_jsonl(tmp_path / "a" / METRICS_NAME)[0]
    assert start["event"] == "start" and start["stage"] == "toy" and start["total_steps"] == 7


def test_a_killed_run_opened_again_with_resume_ends_on_the_uninterrupted_weights(tmp_path):
    _, ref, _ = _train(tmp_path / "a")
    with pytest.raises(_Killed):
        _train(tmp_path / "b", kill_at=4)  # checkpointed at step 3, killed during the fifth step
    _, resumed, summary = _train(tmp_path / "b", resume=True)
    assert resumed.saved == [6, 7] and summary["steps"] == 7
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / METRICS_NAME) if "loss" in r] for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 7

"""The step loop (crash + resume == uninterrupted, on a toy model), its metrics file and its config, and the run
directory (an existing run needs --resume or --overwrite; orphans of killed writes are removed)."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.distributed import DistEnv
from helpers.schemas import TRAIN_BACKBONE
from helpers.training.loop import (
    METRICS_NAME,
    WEIGHTS_NAME,
    JsonlLog,
    LoopConfig,
    RunConflict,
    read_jsonl,
    read_run_info,
    run_loop,
    start_run,
)
from helpers.training.state import TRAIN_STATE_NAME, load_train_state
from tests.support.toy_regression import ToyRegression


def test_jsonl_log_drops_records_past_the_resumed_step(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": float(s)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    JsonlLog(tmp_path / "m.jsonl", resume_step=2)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


# ------------------------------------------------------------------------------------------------ the loop


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
    result = run_loop(dataset=ToyRegression(), env=DistEnv(), cfg=cfg,
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


# ------------------------------------------------------------------------------------------------ the run directory


def _cfg(out_dir):
    return {**TRAIN_BACKBONE.defaults, "run": {"out_dir": str(out_dir), "seed": 0}}


def _killed_atomic_write(target: Path) -> Path:
    """Start an atomic write of ``target`` in another process, SIGKILL it mid-write, return its orphan."""
    code = ("import sys, time\nfrom common.io import atomic_write\n"
            "def write(tmp):\n    open(tmp, 'wb').write(b'x' * 4096)\n    time.sleep(120)\n"
            "atomic_write(sys.argv[1], write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=Path(__file__).resolve().parents[3])
    deadline = time.time() + 60
    while time.time() < deadline and not [p for p in target.parent.glob(".*.tmp") if p.stat().st_size == 4096]:
        assert proc.poll() is None, "the writer ended before it was killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (orphan,) = target.parent.glob(".*.tmp")
    return orphan


def test_the_next_start_removes_the_orphan_of_a_killed_checkpoint_write(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    orphan = _killed_atomic_write(out / TRAIN_STATE_NAME)
    assert orphan.name.startswith(f".{TRAIN_STATE_NAME}.") and not (out / TRAIN_STATE_NAME).exists()
    keep = [out / "notes.tmp", out / ".notes.tmp", out / ".x.toolong123.tmp", out / "x.abcd1234.tmp"]
    for path in keep:  # not atomic_write's pattern: left alone
        path.write_text("mine")
    with caplog.at_level(logging.WARNING):
        start_run(_cfg(out), DistEnv())
    assert not orphan.exists() and all(p.is_file() for p in keep)
    assert any(str(orphan) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)


def test_starting_over_a_run_needs_resume_or_overwrite_and_overwrite_deletes_only_its_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run_files = {name: f"old {name}" for name in (TRAIN_STATE_NAME, WEIGHTS_NAME, METRICS_NAME, "summary.json",
                                                  "config.yaml", "mining.pt")}
    for name, text in run_files.items():
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()

    with pytest.raises(RunConflict, match="--resume.*--overwrite") as err:
        start_run(_cfg(out), DistEnv())
    assert "\n" not in str(err.value) and METRICS_NAME in str(err.value)
    assert all((out / name).read_text() == text for name, text in run_files.items())  # refused: nothing touched

    start_run(_cfg(out), DistEnv(), resume=True)  # continues: the run's files stay
    assert (out / METRICS_NAME).read_text() == run_files[METRICS_NAME]

    start_run(_cfg(out), DistEnv(), overwrite=True, extra_files=("mining.pt",))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "eval", "notes.txt"]  # config: the new run's
    assert (out / "config.yaml").read_text() != run_files["config.yaml"]


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(RunConflict, match="start without --resume"):
        start_run(_cfg(tmp_path / "empty"), DistEnv(), resume=True)
    (tmp_path / "killed_early").mkdir()
    (tmp_path / "killed_early" / METRICS_NAME).write_text("")  # killed before its first checkpoint
    with pytest.raises(RunConflict, match="start over with --overwrite"):
        start_run(_cfg(tmp_path / "killed_early"), DistEnv(), resume=True)
    with pytest.raises(RunConflict, match="one of them"):
        start_run(_cfg(tmp_path / "x"), DistEnv(), resume=True, overwrite=True)
    start_run(_cfg(tmp_path / "fresh"), DistEnv())  # an empty or absent out_dir needs neither
    assert (tmp_path / "fresh" / "config.yaml").is_file()


def test_run_info_is_saved_with_every_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    cfg = LoopConfig(out_dir=tmp_path, batch_size=6, total_steps=2, checkpoint_every=1, log_every=1,
                     num_workers=0, seed=0, progress=False)
    run_loop(dataset=ToyRegression(), env=DistEnv(), cfg=cfg, step_fn=lambda batch, step: {},
             get_state=model.state_dict, set_state=model.load_state_dict, run_info={"backbone_sha256": "ab12"})
    assert read_run_info(tmp_path) == {"backbone_sha256": "ab12"}

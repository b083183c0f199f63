"""train_rerank.py on a tiny synthetic split and a random backbone checkpoint: a 5-step run, the complete
official-layout output, SIGKILL + --resume == uninterrupted, two CPU ranks (gloo), corrupt images, a resume refused
once the backbone file changed, and config errors answered before torch is imported."""
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train_rerank
from datasets.synthetic import load_train_split
from helpers.training.loop import METRICS_NAME, read_jsonl
from helpers.training.state import TRAIN_STATE_NAME
from models.checkpoint import load_official_checkpoint, save_official_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from tests.support.launch import run_recording_imports, run_two_cpu_ranks
from tests.support.synthetic import draw_tiny

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_rerank.py"
DIM = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny synthetic split and a random CVNet-Global checkpoint in the official layout (stand-in backbone)."""
    root = tmp_path_factory.mktemp("rr_data")
    draw_tiny(root)
    torch.manual_seed(0)
    backbone = CVNetGlobal(50, DIM)
    path = root / "backbone.pyth"
    save_official_checkpoint(backbone, path, extra={"stage": "cvnet_global", "reduction_dim": DIM})
    return root, path


def _overrides(setup, out_dir, *extra, root=None):
    data_root, ckpt = setup
    return [f"run.out_dir={out_dir}", f"data.root={root or data_root}", "data.synthetic.name=t",
            f"backbone.checkpoint={ckpt}", "data.image_size=64", "mining.image_size=32", "mining.batch_size=12",
            "mining.num_positives=3", "mining.num_negatives=8", "curriculum.pool_start=8", "curriculum.pool_end=2",
            "curriculum.hide_prob_end=0.2", "train.batch_size=4", "train.device=cpu", "train.num_workers=0",
            "train.log_every=1", "optim.lr=0.002", "schedule.warmup_steps=0", *extra]


def _subprocess_args(setup, out_dir, *extra):
    return [sys.executable, str(SCRIPT), "--no-progress",
            *_overrides(setup, out_dir, "train.threads=1", "train.deterministic=true", *extra)]


def _losses(out_dir):
    return [r["loss"] for r in read_jsonl(out_dir / METRICS_NAME) if "loss" in r]


def test_five_steps_decrease_the_loss_and_write_a_complete_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    rc = train_rerank.main(["--no-progress", *_overrides(setup, out, "train.steps=5", "train.fixed_batch=true",
                                                          "train.checkpoint_every=100")])
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 5 and all(np.isfinite(losses)) and losses[-1] < losses[0]

    # the output: the backbone file's encoder_q.* untouched + the trained conv2ds / cv_learner, loadable by all
    backbone = torch.load(setup[1], weights_only=True)["model_state"]
    final = torch.load(out / "last.pyth", weights_only=True)
    state = final["model_state"]
    assert {k for k in state if k.startswith("encoder_q.")} == set(backbone)
    assert all(torch.equal(state[k], backbone[k]) for k in backbone)  # frozen: stages 1-4 and head unchanged
    assert any(k.startswith("conv2ds.") for k in state) and any(k.startswith("cv_learner.") for k in state)
    rerank = CVNetRerank(50)
    load_official_checkpoint(rerank, out / "last.pyth")
    head = torch.load(out / TRAIN_STATE_NAME, weights_only=True)["task"]["head"]
    assert all(torch.equal(rerank.state_dict()[k], v) for k, v in head.items())
    load_official_checkpoint(CVNetGlobal(50, DIM), out / "last.pyth")  # the global model reads it too
    assert final["stage"] == "cvnet_rerank" and final["step"] == 5

    # mining: positives share the label, negatives never do
    _, raw = load_train_split(setup[0], "t")
    labels = torch.as_tensor(np.unique(raw, return_inverse=True)[1])
    mined = torch.load(out / "mining.pt", weights_only=True)
    pos, neg = mined["positives"], mined["negatives"]
    assert (labels[pos.clamp(min=0)] == labels[:, None])[pos >= 0].all()
    assert (labels[neg] != labels[:, None]).all()


def test_missing_backbone_checkpoint_says_what_to_do(setup, tmp_path, capsys):
    rc = train_rerank.main(["--no-progress", *_overrides(setup, tmp_path / "x", "train.steps=1"),
                            f"backbone.checkpoint={tmp_path / 'absent.pyth'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "python train_backbone.py" in err and "Traceback" not in err


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(setup, tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=3")
    ref = subprocess.Popen(_subprocess_args(setup, tmp_path / "ref", *common), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    killed = subprocess.Popen(_subprocess_args(setup, tmp_path / "killed", *common), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    state_path = tmp_path / "killed" / TRAIN_STATE_NAME
    deadline = time.time() + 120
    while not state_path.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(state_path, weights_only=True)["step"] == 3
    args = _subprocess_args(setup, tmp_path / "killed", *common)
    args.insert(3, "--resume")
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    a = torch.load(tmp_path / "ref" / TRAIN_STATE_NAME, weights_only=True)
    b = torch.load(state_path, weights_only=True)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(v, b["task"]["head"][k]) for k, v in a["task"]["head"].items())
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "killed")


def test_two_cpu_ranks_train_in_sync(setup, tmp_path):
    out = tmp_path / "ddp"
    run_two_cpu_ranks(_subprocess_args(setup, out, "train.steps=2", "train.checkpoint_every=100"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["steps"] == 2
    # both ranks mined their half and gathered the same, complete result
    mined = torch.load(out / "mining.pt", weights_only=True)
    assert (mined["negatives"] >= 0).all()


def test_corrupt_image_is_skipped_counted_and_capped(setup, tmp_path, caplog, capsys):
    root = tmp_path / "data"
    shutil.copytree(setup[0], root)
    paths, _ = load_train_split(root, "t")
    paths[2].write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        rc = train_rerank.main(["--no-progress", *_overrides(setup, tmp_path / "run", "train.steps=3",
                                                              "data.max_corrupt=3", "train.checkpoint_every=100",
                                                              root=root)])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["corrupt_images"] == 1 and summary["corrupt_skipped"] >= 1
    mined = torch.load(tmp_path / "run" / "mining.pt", weights_only=True)
    assert (mined["negatives"] != 2).all() and (mined["positives"] != 2).all()  # never mined as a partner
    capsys.readouterr()
    rc = train_rerank.main(["--no-progress", *_overrides(setup, tmp_path / "capped", "train.steps=3",
                                                          "data.max_corrupt=0", "train.checkpoint_every=100",
                                                          root=root)])
    assert rc == 2
    assert "max_corrupt=0" in capsys.readouterr().err  # one line, no traceback


def test_config_errors_answer_at_once_without_importing_torch():
    for args, named in ((["train.stepz=3"], ("'train.stepz'", "'train.steps'")),
                        (["train.pairs=some"], ("train.pairs", "mined")),
                        (["mining.num_negatives=0"], ("mining.num_negatives", ">= 1"))):
        run = run_recording_imports(SCRIPT, *args)
        assert run.returncode == 2 and run.seconds < 5, (args, run.stderr)
        assert all(word in run.stderr for word in named) and "Traceback" not in run.stderr, run.stderr
        assert "torch" not in run.modules
    helped = run_recording_imports(SCRIPT, "--help")
    assert helped.returncode == 0 and helped.seconds < 2 and "torch" not in helped.modules
    assert "--resume" in helped.stdout and "--print-config" in helped.stdout and "helpers/schemas.py" in helped.stdout
    printed = run_recording_imports(SCRIPT, "--print-config", "train.steps=7")
    assert printed.returncode == 0 and "torch" not in printed.modules
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["optim"]["name"] == "adam"  # defaults <- built-in YAML


def test_resume_on_a_changed_backbone_file_is_refused_and_overwrite_starts_over(setup, tmp_path, capsys):
    backbone = tmp_path / "backbone.pyth"
    shutil.copyfile(setup[1], backbone)
    old_sha = hashlib.sha256(backbone.read_bytes()).hexdigest()
    out = tmp_path / "run"
    args = ["--no-progress", *_overrides((setup[0], backbone), out, "train.steps=2", "train.checkpoint_every=1")]
    assert train_rerank.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone_sha256"] == old_sha and summary["backbone_checkpoint"] == str(backbone)
    assert torch.load(out / "last.pyth", weights_only=True)["backbone_sha256"] == old_sha

    torch.manual_seed(1)  # the backbone is retrained: same path, other weights
    save_official_checkpoint(CVNetGlobal(50, DIM), backbone, extra={"stage": "cvnet_global", "reduction_dim": DIM})
    mined, state = (out / "mining.pt").read_bytes(), (out / TRAIN_STATE_NAME).read_bytes()
    capsys.readouterr()
    assert train_rerank.main(["--resume", *args]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "changed" in line[0] and "--overwrite" in line[0] and "Traceback" not in err
    assert (out / "mining.pt").read_bytes() == mined and (out / TRAIN_STATE_NAME).read_bytes() == state

    assert train_rerank.main(["--overwrite", *args]) == 0  # start over on the new backbone
    new_sha = hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert json.loads((out / "summary.json").read_text())["backbone_sha256"] == new_sha != old_sha
    assert (out / "mining.pt").read_bytes() != mined  # mined again, with the new backbone

"""train_backbone.py on a tiny synthetic split: a 5-step run, SIGKILL + --resume == uninterrupted, two CPU ranks
(gloo), corrupt images skipped, counted and capped, a second run in the same directory only with --resume or
--overwrite, a timm backbone (model.arch=timm:...), config errors answered before torch is imported, and the
reference CLIP system's recipe (Circle loss, miner, P-K batches, layer decay, embedding head: resume, two ranks,
configs/finetune_folder.yaml on a class folder)."""
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

import train_backbone
from datasets.synthetic import load_train_split
from helpers.training.data import ResumableDistributedSampler
from helpers.training.loop import METRICS_NAME, read_jsonl
from helpers.training.state import TRAIN_STATE_NAME
from models.checkpoint import OFFICIAL_CONVENTION, load_official_checkpoint
from models.cvnet import CVNetGlobal
from models.timm_global import TIMM_CHECKPOINT_FORMAT, load_timm_global
from tests.support.launch import run_recording_imports, run_two_cpu_ranks
from tests.support.synthetic import draw_tiny

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_backbone.py"
DIM = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return draw_tiny(tmp_path_factory.mktemp("bb_data"))


def _overrides(root, out_dir, *extra):
    return [f"run.out_dir={out_dir}", f"data.root={root}", "data.synthetic.name=t", "data.image_size=32",
            f"model.reduction_dim={DIM}", "loss.queue_size=64", "train.batch_size=4", "train.device=cpu",
            "train.num_workers=0", "train.log_every=1", "optim.lr=0.02", "schedule.warmup_steps=0", *extra]


def _subprocess_args(root, out_dir, *extra):
    # one thread and deterministic kernels: bit-exact replays on CPU
    return [sys.executable, str(SCRIPT), "--no-progress",
            *_overrides(root, out_dir, "train.threads=1", "train.deterministic=true", *extra)]


def _losses(out_dir):
    return [r["loss"] for r in read_jsonl(out_dir / METRICS_NAME) if "loss" in r]


def test_five_steps_on_a_fixed_batch_decrease_the_loss(data_root, tmp_path):
    out = tmp_path / "run"
    rc = train_backbone.main(["--no-progress", *_overrides(data_root, out, "train.steps=5", "train.fixed_batch=true",
                                                            "train.checkpoint_every=100")])
    assert rc == 0
    losses = _losses(out)
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    # the final weights are an official-layout checkpoint that loads strictly and matches the training state
    model = CVNetGlobal(50, DIM)
    meta = load_official_checkpoint(model, out / "last.pyth")
    assert meta["stage"] == "cvnet_global" and meta["step"] == 5
    assert model.input_convention == OFFICIAL_CONVENTION  # random init: the releases' BGR convention
    state = torch.load(out / TRAIN_STATE_NAME, weights_only=True)
    trained = state["task"]["model"]
    for key, value in model.state_dict().items():
        if not key.startswith(("key_", )):
            assert torch.equal(value, trained[key]), key
    assert state["step"] == 5 and int(state["task"]["queue"]["ptr"]) == 5 * 4 % 64


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(data_root, tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=3")  # 12 images / batch 4: two epochs
    ref = subprocess.Popen(_subprocess_args(data_root, tmp_path / "ref", *common), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    killed = subprocess.Popen(_subprocess_args(data_root, tmp_path / "killed", *common),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = tmp_path / "killed" / TRAIN_STATE_NAME
    deadline = time.time() + 120
    while not state_path.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    first = torch.load(state_path, weights_only=True)
    assert first["step"] == 3  # killed part-way: only the first checkpoint exists
    args = _subprocess_args(data_root, tmp_path / "killed", *common)
    args.insert(3, "--resume")
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]

    a = torch.load(tmp_path / "ref" / TRAIN_STATE_NAME, weights_only=True)
    b = torch.load(state_path, weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "classifier", "queue"):
        for key, value in a["task"][part].items():
            assert torch.equal(value, b["task"][part][key]), f"{part}.{key}"
    opt_a, opt_b = a["task"]["optimizer"]["state"], b["task"]["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a  # e.g. AdamW's moments and step counts, every parameter
    for index, slots in opt_a.items():
        assert slots.keys() == opt_b[index].keys()
        assert all(torch.equal(value, opt_b[index][name]) for name, value in slots.items()), index
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "killed")
    official_a = torch.load(tmp_path / "ref" / "last.pyth", weights_only=True)["model_state"]
    official_b = torch.load(tmp_path / "killed" / "last.pyth", weights_only=True)["model_state"]
    assert official_a.keys() == official_b.keys()
    assert all(torch.equal(official_a[k], official_b[k]) for k in official_a)


def test_two_cpu_ranks_share_the_queue_and_stay_in_sync(data_root, tmp_path):
    out = tmp_path / "ddp"
    run_two_cpu_ranks(_subprocess_args(data_root, out, "train.steps=3", "train.checkpoint_every=100"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["queue_filled"] == 3 * 4
    start = read_jsonl(out / METRICS_NAME)[0]
    assert start["world_size"] == 2 and start["batch_size"] == 4
    # the queue holds the keys of both ranks, in rank order, step after step
    _, raw = load_train_split(data_root, "t")
    labels = np.unique(raw, return_inverse=True)[1]
    shards = []
    for rank in range(2):
        s = ResumableDistributedSampler(range(len(raw)), num_replicas=2, rank=rank, seed=0)
        s.set_epoch(0)
        shards.append(list(s))
    expected = [labels[i] for step in range(3) for shard in shards for i in shard[2 * step:2 * step + 2]]
    queue = torch.load(out / TRAIN_STATE_NAME, weights_only=True)["task"]["queue"]
    assert queue["labels"][:12].tolist() == expected and (queue["labels"][12:] == -1).all()


def test_two_cpu_ranks_train_a_timm_convnext_whose_head_norm_the_forward_never_uses(data_root, tmp_path):
    """timm's ConvNeXt keeps a head.norm that forward_features never reaches: unfrozen, DDP
    (find_unused_parameters=False) stops at the second step waiting for its gradient. Frozen, both ranks train."""
    out = tmp_path / "ddp_convnext"
    run_two_cpu_ranks(_subprocess_args(data_root, out, "model.arch=timm:test_convnext", "train.steps=3",
                                       "train.checkpoint_every=100"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["arch"] == "timm:test_convnext"


def test_corrupt_image_is_skipped_counted_and_capped(data_root, tmp_path, caplog, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    paths, _ = load_train_split(root, "t")
    paths[5].write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        rc = train_backbone.main(["--no-progress", *_overrides(root, out, "train.steps=3", "data.max_corrupt=3",
                                                                "train.checkpoint_every=100")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corrupt_images"] == 1 and summary["corrupt_skipped"] >= 1 and summary["steps"] == 3
    records = read_jsonl(out / METRICS_NAME)
    assert records[-1]["event"] == "end" and records[-1]["corrupt_images"] == 1
    assert any(str(paths[5]) in r.getMessage() for r in caplog.records)

    capsys.readouterr()
    rc = train_backbone.main(["--no-progress", *_overrides(root, tmp_path / "capped", "train.steps=3",
                                                            "data.max_corrupt=0", "train.checkpoint_every=100")])
    assert rc == 2
    assert "max_corrupt=0" in capsys.readouterr().err  # one line, no traceback


def test_config_errors_answer_at_once_without_importing_torch():
    for args, named in ((["train.stepz=3"], ("'train.stepz'", "'train.steps'")),
                        (["train.checkpoint_every=0"], ("train.checkpoint_every", ">= 1")),
                        (["model.depth=34"], ("model.depth", "50"))):
        run = run_recording_imports(SCRIPT, *args)
        assert run.returncode == 2 and run.seconds < 5, (args, run.stderr)
        assert all(word in run.stderr for word in named) and "Traceback" not in run.stderr, run.stderr
        assert "torch" not in run.modules
    both = run_recording_imports(SCRIPT, "--resume", "--overwrite")
    assert both.returncode == 2 and "not allowed with" in both.stderr and "torch" not in both.modules
    helped = run_recording_imports(SCRIPT, "--help")
    assert helped.returncode == 0 and helped.seconds < 2 and "torch" not in helped.modules
    assert all(word in helped.stdout for word in ("--resume", "--overwrite", "--print-config", "helpers/schemas.py"))
    printed = run_recording_imports(SCRIPT, "--print-config", "train.steps=7")
    assert printed.returncode == 0 and "torch" not in printed.modules
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["model"]["zero_init_residual"] is True  # defaults <- built-in YAML


def _error_line(err):
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_second_run_in_the_same_directory_needs_resume_or_overwrite(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--no-progress", *_overrides(data_root, out, "train.steps=1", "train.checkpoint_every=100")]
    assert train_backbone.main(args) == 0
    first = {name: (out / name).read_bytes() for name in (METRICS_NAME, TRAIN_STATE_NAME, "last.pyth")}
    capsys.readouterr()
    assert train_backbone.main(args) == 2  # refused: the first run's files are untouched
    line = _error_line(capsys.readouterr().err)
    assert str(out) in line and "--resume" in line and "--overwrite" in line and METRICS_NAME in line
    assert all((out / name).read_bytes() == data for name, data in first.items())

    (out / "notes.txt").write_text("mine")
    orphan = out / ".last.pyth.k1ll3d_0.tmp"  # what a write killed mid-way leaves
    orphan.write_bytes(bytes(1000))
    assert train_backbone.main(["--overwrite", *args]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not orphan.exists()
    events = [r.get("event") for r in read_jsonl(out / METRICS_NAME)]
    assert events.count("start") == 1 and events[0] == "start"  # one run in the log: the new one


def test_a_timm_backbone_trains_with_the_same_losses_and_resumes(data_root, tmp_path):
    timm = ("model.arch=timm:resnet18", "train.threads=1", "train.deterministic=true", "schedule.name=constant")
    out = tmp_path / "timm"
    rc = train_backbone.main(["--no-progress", *_overrides(data_root, out, *timm, "train.steps=5",
                                                            "train.fixed_batch=true", "train.checkpoint_every=100")])
    assert rc == 0
    records = [r for r in read_jsonl(out / METRICS_NAME) if "loss" in r]
    assert len(records) == 5 and all(np.isfinite([r["loss_cls"] + r["loss_con"] for r in records]))
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "timm:resnet18" and summary["queue_filled"] == 5 * 4
    # the final weights: the timm format (the official layout only fits CVNet's ResNet), loadable as they were
    saved = torch.load(out / "last.pyth", weights_only=True)
    assert saved["format"] == TIMM_CHECKPOINT_FORMAT and saved["arch"] == "timm:resnet18" and saved["step"] == 5
    assert saved["reduction_dim"] == DIM and saved["input_convention"]["channel_order"] == "RGB"
    state = torch.load(out / TRAIN_STATE_NAME, weights_only=True)["task"]
    model = load_timm_global(out / "last.pyth")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    ema = state["key_encoder"]  # the EMA key encoder moved, and is not the model
    assert not all(torch.equal(v, ema["encoder." + k]) for k, v in state["model"].items())

    # resumed from step 2 (its key encoder included), a run ends where the uninterrupted one does
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert train_backbone.main(["--no-progress", *_overrides(data_root, ref, *timm, "train.steps=4")]) == 0
    assert train_backbone.main(["--no-progress", *_overrides(data_root, part, *timm, "train.steps=2")]) == 0
    assert train_backbone.main(["--no-progress", "--resume", *_overrides(data_root, part, *timm, "train.steps=4")]) == 0
    a = torch.load(ref / TRAIN_STATE_NAME, weights_only=True)["task"]
    b = torch.load(part / TRAIN_STATE_NAME, weights_only=True)["task"]
    for section in ("model", "key_encoder", "classifier", "queue"):
        assert all(torch.equal(v, b[section][k]) for k, v in a[section].items()), section
    assert _losses(ref) == _losses(part)


# ---------------------------------------------------------------------------------------------------------------
# The reference CLIP retrieval system's recipe (loss.name=circle)
# ---------------------------------------------------------------------------------------------------------------

#: 12 images of 3 landmarks, batches of P 3 x K 2: two steps an epoch, the miner on from epoch 1 (the third step)
RECIPE = ("model.arch=timm:test_vit", "model.head=embedding", "loss.name=circle", "data.sampler.name=pk",
          "data.sampler.k=2", "loss.miner.name=multi_similarity", "loss.miner.start_epoch=1", "train.batch_size=6",
          "optim.name=adamw", "optim.layer_decay=0.5", "schedule.name=constant", "train.threads=1",
          "train.deterministic=true")


def _task_state(out):
    return torch.load(out / TRAIN_STATE_NAME, weights_only=True)["task"]


def test_the_recipe_trains_mines_from_its_epoch_and_resumes_exactly(data_root, tmp_path):
    out = tmp_path / "recipe"
    assert train_backbone.main(["--no-progress", *_overrides(data_root, out, *RECIPE, "train.steps=5")]) == 0
    records = [r for r in read_jsonl(out / METRICS_NAME) if "loss" in r]
    assert [r["mining"] for r in records] == [0, 0, 1, 1, 1] and all(np.isfinite([r["loss"] for r in records]))
    assert [(r["pairs_pos"], r["pairs_neg"]) for r in records[:2]] == [(6, 24)] * 2  # every pair before the miner
    assert all(r["pairs_pos"] <= 6 and r["pairs_neg"] <= 24 for r in records[2:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "circle" and summary["miner_start_step"] == 2 and summary["arch"] == "timm:test_vit"
    state = _task_state(out)
    assert state["metric"] == {"miner_start_step": 2} and "classifier" not in state and "queue" not in state
    groups = state["optimizer"]["param_groups"]  # layer-wise decay over the 6 blocks (layers 0-7, the head on top)
    assert sorted({g["layer"] for g in groups}) == list(range(8))
    assert all(g["lr"] == pytest.approx(0.02 * 0.5 ** (7 - g["layer"])) for g in groups)
    saved = torch.load(out / "last.pyth", weights_only=True)
    assert saved["format"] == TIMM_CHECKPOINT_FORMAT and saved["head"] == "embedding" and saved["reduction_dim"] == DIM
    model = load_timm_global(out / "last.pyth")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())

    # resumed at step 2, just before the miner's switch, a run ends where the uninterrupted one does
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert train_backbone.main(["--no-progress", *_overrides(data_root, ref, *RECIPE, "train.steps=4")]) == 0
    assert train_backbone.main(["--no-progress", *_overrides(data_root, part, *RECIPE, "train.steps=2")]) == 0
    assert train_backbone.main(["--no-progress", "--resume",
                                *_overrides(data_root, part, *RECIPE, "train.steps=4")]) == 0
    a, b = _task_state(ref), _task_state(part)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()) and a["metric"] == b["metric"]
    for index, slots in a["optimizer"]["state"].items():
        assert all(torch.equal(value, b["optimizer"]["state"][index][name]) for name, value in slots.items())
    assert _losses(ref) == _losses(part)
    assert [r["mining"] for r in read_jsonl(part / METRICS_NAME) if "loss" in r] == [0, 0, 1, 1]


def test_the_recipe_on_two_ranks_takes_the_one_rank_steps(data_root, tmp_path):
    # SGD without clipping: a gradient off by the number of ranks would show in the weights; no BatchNorm (a
    # ViT, the linear head), so that the ranks' half batches give the descriptors of the whole
    plain = ("model.head=linear", "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0.0", "optim.layer_decay=null",
             "train.grad_clip=null", "loss.miner.start_epoch=0", "train.steps=2", "train.checkpoint_every=100")
    one, two = tmp_path / "one", tmp_path / "two"
    assert subprocess.run(_subprocess_args(data_root, one, *RECIPE, *plain), capture_output=True).returncode == 0
    run_two_cpu_ranks(_subprocess_args(data_root, two, *RECIPE, *plain))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _task_state(one)["model"], _task_state(two)["model"]
    assert all(torch.allclose(v, b[k], rtol=1e-4, atol=1e-6) for k, v in a.items())  # sums in another order


def test_recipe_choices_that_do_not_go_together_are_refused(data_root, tmp_path, capsys):
    for extra, words in ((("data.sampler.name=pk",), "go with loss.name=circle"),
                         (("loss.miner.name=multi_similarity",), "go with loss.name=circle"),
                         (("model.head=embedding",), "model.head=linear")):
        capsys.readouterr()
        args = ["--no-progress", *_overrides(data_root, tmp_path / "x", "train.steps=1", *extra)]
        assert train_backbone.main(args) == 2
        assert words in _error_line(capsys.readouterr().err)
    capsys.readouterr()
    args = ["--no-progress", *_overrides(data_root, tmp_path / "y", *RECIPE, "train.steps=1", "train.batch_size=8")]
    assert train_backbone.main(args) == 2  # P 4 x K 2 needs 4 landmarks, the data has 3
    assert "needs 4 classes" in _error_line(capsys.readouterr().err)


def test_the_recipe_config_fine_tunes_on_a_class_folder(data_root, tmp_path):
    folder = tmp_path / "training"
    paths, labels = load_train_split(data_root, "t")
    for path, label in zip(paths, labels):
        (folder / f"landmark_{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"landmark_{label}" / path.name).symlink_to(path)
    out = tmp_path / "run"
    args = ["--no-progress", "--config", str(REPO / "configs" / "finetune_folder.yaml"), f"run.out_dir={out}",
            f"data.root={folder}", "model.arch=timm:test_vit", "model.imagenet_weights=false", "data.image_size=32",
            "train.batch_size=6", "data.sampler.k=2", "train.epochs=6", "train.device=cpu", "train.num_workers=0",
            "train.threads=1", "train.log_every=1"]
    assert train_backbone.main(args) == 0
    start, *steps = [r for r in read_jsonl(out / METRICS_NAME) if "step" in r and "event" not in r or
                     r.get("event") == "start"]
    assert start["images"] == 12 and start["num_classes"] == 3 and start["miner_start_step"] == 5 * 2
    assert [r["mining"] for r in steps] == [0] * 10 + [1] * 2  # 6 epochs of 2 steps, the miner from epoch 5
    lrs = [r["lr"] for r in steps]  # 15 % of 12 steps of warm-up: 2, then cosine from the top
    assert lrs[:3] == pytest.approx([0.5e-4, 1e-4, 1e-4]) and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    model = load_timm_global(out / "last.pyth")
    assert (model.pooling, model.head, model.dim, model.head_dropout) == ("token", "embedding", 512, 0.1)

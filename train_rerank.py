"""Train CVNet-Rerank: the correlation-verification head on mined pairs, backbone frozen (CVNet Sec. 3.4).

    python train_rerank.py                                     # built-in demo, after `python train_backbone.py`
    python train_rerank.py --config configs/cvnet_rerank_r50_gldv2.yaml data.root=/data/gldv2 \
        backbone.checkpoint=runs/cvnet_r50_gldv2/last.pyth
    torchrun --nproc_per_node 4 train_rerank.py --config configs/cvnet_rerank_r50_gldv2.yaml ...
    python train_rerank.py --config ... --resume

The backbone checkpoint (from train_backbone.py, or any official-layout CVNet file) is frozen: its global
descriptors mine, for every training image, positives (top-ranked images of its landmark) and hard negatives
(top-ranked images of other landmarks); its stage-3 maps feed the re-ranking head (``conv2ds`` + ``cv_learner``),
trained with cross-entropy on the two-way logits of (query, positive) -> 1 and (query, negative) -> 0 pairs. The
curriculum shrinks the negative pool to the hardest negatives and raises the Hide-and-Seek probability over the
epochs. ``<out_dir>/last.pyth`` is a complete official-layout CVNet checkpoint: the backbone file's ``encoder_q.*``
(stages 1-4 and the global head) plus the trained ``conv2ds.*`` and ``cv_learner.*``, so every model of this
project (and eval.py) loads it.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.augment import ResizedImages, TrainAugment
from helpers.config import save_resolved
from helpers.mining import MinedTriplets, extract_descriptors, mine_distributed
from helpers.training import (
    DistEnv,
    LoopConfig,
    all_gather_objects,
    build_labelled_dataset,
    build_optimizer,
    build_scheduler,
    cleanup_distributed,
    configure_runtime,
    finish_run,
    init_distributed,
    resolve_total_steps,
    run_loop,
    run_training_cli,
    seed_everything,
    steps_per_epoch,
    training_arg_parser,
)
from models import functional as MF
from models.checkpoint import (
    OFFICIAL_CONVENTION,
    InputConvention,
    atomic_torch_save,
    load_official_checkpoint,
    official_state_dict,
)
from models.cvnet import CVNetGlobal, CVNetRerank

log = logging.getLogger("train_rerank")

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "builtin_rerank.yaml"
HEAD_PREFIXES = ("conv2ds.", "cv_learner.")
MINING_FORMAT = "cvnet-mining-v1"

DEFAULTS: dict[str, Any] = {
    "run": {"out_dir": "runs/builtin/rerank", "seed": 0},
    "backbone": {"checkpoint": "runs/builtin/backbone/last.pyth"},
    "model": {"head_init": "random"},
    "data": {"name": "synthetic", "root": "data", "synthetic": {"name": "synth", "config": {}},
             "gldv2": {"split": "train_clean", "exclude_revisited": False, "exclude_landmarks_file": None,
                       "min_class_size": 2},
             "image_size": 512, "max_corrupt": 100,
             "augment": {"scale": [0.5, 1.0], "ratio": [0.75, 1.3333], "flip": 0.0, "brightness": 0.2,
                         "contrast": 0.2, "saturation": 0.2}},
    "mining": {"image_size": 512, "batch_size": 64, "num_positives": 20, "num_negatives": 100},
    "curriculum": {"pool_start": 100, "pool_end": 10, "hide_grid": 4, "hide_prob_start": 0.0,
                   "hide_prob_end": 0.3},
    "optim": {"name": "adam", "lr": 0.0015, "weight_decay": 0.0},
    "schedule": {"name": "cosine", "warmup_steps": 0, "final_ratio": 0.0},
    "train": {"epochs": 25, "steps": None, "batch_size": 144, "grad_clip": 15.0, "amp": "auto", "device": "auto",
              "num_workers": 8, "checkpoint_every": 1000, "log_every": 20, "threads": None,
              "deterministic": False, "fixed_batch": False, "pairs": "mined"},
}


class PairLogits(nn.Module):
    """What DistributedDataParallel wraps: the trainable head of CVNet-Rerank.

    forward(query maps (Bq, 1024, hq, wq), key maps (Bk, 1024, hk, wk), query_index (P,), key_index (P,))
    -> two-way logits (P, 2) of pair p = (query_index[p], key_index[p]): "different" / "same object" (class 1 is
    the score CVNet re-ranks with). Each map goes through the per-scale convs once, whatever its pairs.
    """

    def __init__(self, rerank: CVNetRerank) -> None:
        super().__init__()
        self.conv2ds = rerank.conv2ds
        self.cv_learner = rerank.cv_learner
        self.scales = rerank.scales

    def reduce(self, maps: Tensor) -> list[Tensor]:
        h, w = maps.shape[-2:]
        return [conv(MF.resize_featuremap(maps, MF.correlation_size(h, w, s)))
                for s, conv in zip(self.scales, self.conv2ds)]

    def forward(self, query_maps: Tensor, key_maps: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
        q = [t[query_index] for t in self.reduce(query_maps)]
        k = [t[key_index] for t in self.reduce(key_maps)]
        size = (*q[-1].shape[-2:], *k[-1].shape[-2:])
        return self.cv_learner(MF.cross_scale_correlation(q, k, size))


def training_pairs(labels: Tensor, key_labels: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(query_index, key_index, target) of the pairs a batch trains on.

    Keys are the B positives then the B mined negatives. ``"mined"``: each query with its own positive and its
    own hard negative (2B pairs, the paper's); ``"all"``: each query with every key of the batch (2B^2 pairs from
    the same images: the other queries' keys add easy negatives and extra positives). Target 1 = same landmark.
    """
    b = labels.shape[0]
    if mode == "mined":
        qi = torch.arange(b, device=labels.device).repeat(2)
        kj = torch.arange(2 * b, device=labels.device)
    elif mode == "all":
        qi = torch.arange(b, device=labels.device).repeat_interleave(2 * b)
        kj = torch.arange(2 * b, device=labels.device).repeat(b)
    else:
        raise ValueError(f"train.pairs must be 'mined' or 'all', got {mode!r}")
    return qi, kj, (labels[qi] == key_labels[kj]).long()


def balanced_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean of the cross-entropy over positive pairs and over negative pairs (equal weight to each class)."""
    per_pair = F.cross_entropy(logits.float(), target, reduction="none")
    parts = [per_pair[target == c].mean() for c in (0, 1) if bool((target == c).any())]
    return torch.stack(parts).mean()


def read_backbone_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The backbone file as a dict (weights_only), with a clear message when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone checkpoint not found: {path}. Train it first (`python train_backbone.py` for the built-in "
            "demo, or with your config), or point backbone.checkpoint=<file> at an official-layout CVNet "
            "checkpoint such as CVPR2022_CVNet_R50.pyth (see README, 'Official weights').")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint")
    if "model_state" not in ckpt:
        ckpt = {"model_state": ckpt}
    return ckpt


def checkpoint_geometry(ckpt: dict[str, Any]) -> tuple[int, int]:
    """(ResNet depth, global descriptor dimension) of an official-layout checkpoint."""
    state = ckpt["model_state"]
    prefix = "encoder_q." if any(k.startswith("encoder_q.") for k in state) else "globalmodel."
    blocks = {k.split(".")[2] for k in state if k.startswith(prefix + "s3.")}
    depth = int(ckpt.get("depth") or (101 if len(blocks) > 6 else 50))
    dim = int(state[prefix + "head.fc.weight"].shape[0])
    return depth, dim


def _backbone_only(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in ckpt["model_state"].items() if not k.startswith(HEAD_PREFIXES)}


def build_rerank(ckpt: dict[str, Any], depth: int, head_init: str) -> CVNetRerank:
    """CVNetRerank with the checkpoint's stages 1-3 (frozen) and a random (or the checkpoint's) head."""
    rerank = CVNetRerank(depth)
    state = _backbone_only(ckpt)
    has_head = any(k.startswith(HEAD_PREFIXES) for k in ckpt["model_state"])
    if head_init == "checkpoint":
        if not has_head:
            raise ValueError("model.head_init=checkpoint but the backbone checkpoint has no conv2ds/cv_learner")
        state = dict(ckpt["model_state"])
    elif head_init == "random":
        state.update({k: v for k, v in official_state_dict(rerank).items() if k.startswith(HEAD_PREFIXES)})
    else:
        raise ValueError(f"model.head_init must be random or checkpoint, got {head_init!r}")
    load_official_checkpoint(rerank, {**{k: v for k, v in ckpt.items() if k != "model_state"},
                                      "model_state": state})
    for p in rerank.backbone.parameters():
        p.requires_grad_(False)
    return rerank


def complete_checkpoint(backbone_ckpt: dict[str, Any], rerank: CVNetRerank) -> dict[str, Tensor]:
    """The full official layout: the backbone file's encoder_q.* (s1-s4, head) + the trained conv2ds / cv_learner."""
    state = _backbone_only(backbone_ckpt)
    state.update({k: v for k, v in official_state_dict(rerank).items() if k.startswith(HEAD_PREFIXES)})
    return state


def _mining_key(path: str, labels: Tensor, mcfg: dict[str, Any], convention: InputConvention) -> str:
    st = os.stat(path)
    h = hashlib.sha256()
    h.update(f"{MINING_FORMAT}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(repr(sorted((k, str(v)) for k, v in mcfg.items())).encode())
    h.update(repr(convention.to_dict()).encode())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


def mine(*, ckpt: dict[str, Any], ckpt_path: str, depth: int, dim: int, data, mcfg: dict[str, Any],
         convention: InputConvention, env: DistEnv, out_dir: Path, progress: bool,
         num_workers: int) -> tuple[Tensor, Tensor]:
    """Positives / hard negatives from the frozen backbone's global descriptors, cached in ``mining.pt``."""
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    key = _mining_key(ckpt_path, labels, mcfg, convention)
    cache = out_dir / "mining.pt"
    saved = torch.load(cache, map_location="cpu", weights_only=True) if cache.is_file() else {}
    # every rank must take the same branch (mining uses collectives), e.g. nodes without a shared file system
    if all(all_gather_objects(saved.get("key") == key, env)):
        log.info("mined pairs loaded from %s", cache)
        return saved["positives"], saved["negatives"]
    model = CVNetGlobal(depth, dim)
    load_official_checkpoint(model, ckpt)
    model.to(env.device).eval()
    images = ResizedImages(data.dataset, size=int(mcfg["image_size"]), convention=convention)
    desc, valid = extract_descriptors(model, images, batch_size=int(mcfg["batch_size"]), device=env.device,
                                      num_workers=num_workers, env=env, progress=progress)
    pos, neg = mine_distributed(desc, labels, valid, num_positives=int(mcfg["num_positives"]),
                                num_negatives=int(mcfg["num_negatives"]), env=env)
    if env.is_main:
        same = (labels[neg[:, 0].clamp(min=0)] == labels) & (neg[:, 0] >= 0)
        assert not bool(same.any()), "a mined negative shares the query's label"
        atomic_torch_save({"key": key, "positives": pos, "negatives": neg}, cache)
        log.info("mined %d positives and %d hard negatives per image (%d images, %d undecodable)",
                 pos.shape[1], neg.shape[1], len(labels), int((~valid).sum()))
    return pos, neg


def train_rerank(*, cfg: dict[str, Any], resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) CVNet-Rerank training as configured; returns the run's summary."""
    tcfg = cfg["train"]
    configure_runtime(threads=tcfg.get("threads"), deterministic=bool(tcfg.get("deterministic")))
    env = init_distributed(str(tcfg.get("device", "auto")))
    try:
        return _train(cfg, env, resume=resume, progress=progress)
    finally:
        cleanup_distributed(env)


def _train(cfg: dict[str, Any], env: DistEnv, *, resume: bool, progress: bool) -> dict[str, Any]:
    tcfg, dcfg, ccfg = cfg["train"], cfg["data"], cfg["curriculum"]
    seed = int(cfg["run"]["seed"])
    out_dir = Path(cfg["run"]["out_dir"])
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir)
    device = env.device
    amp = str(tcfg.get("amp", "auto")).lower() in ("auto", "true") and device.type == "cuda"

    ckpt_path = os.fspath(cfg["backbone"]["checkpoint"])
    ckpt = read_backbone_checkpoint(ckpt_path)
    depth, dim = checkpoint_geometry(ckpt)
    convention = InputConvention.from_dict(ckpt["input_convention"]) if ckpt.get("input_convention") \
        else OFFICIAL_CONVENTION
    torch.manual_seed(seed)  # the same random head on every rank
    rerank = build_rerank(ckpt, depth, str(cfg["model"].get("head_init", "random"))).to(device)
    rerank.backbone.eval()
    seed_everything(seed + env.rank)

    data = build_labelled_dataset(dcfg, env=env, progress=progress)
    positives, negatives = mine(ckpt=ckpt, ckpt_path=ckpt_path, depth=depth, dim=dim, data=data,
                                mcfg=cfg["mining"], convention=convention, env=env, out_dir=out_dir,
                                progress=progress, num_workers=int(tcfg["num_workers"]))
    loop = LoopConfig(out_dir=out_dir, batch_size=int(tcfg["batch_size"]), total_steps=tcfg.get("steps"),
                      epochs=tcfg.get("epochs"), checkpoint_every=int(tcfg["checkpoint_every"]),
                      log_every=int(tcfg["log_every"]), num_workers=int(tcfg["num_workers"]), seed=seed,
                      max_corrupt=dcfg.get("max_corrupt"), fixed_batch=bool(tcfg.get("fixed_batch")),
                      progress=progress, desc="rerank")
    total = resolve_total_steps(loop, len(data.labels), env.world_size)
    epochs = math.ceil(total / steps_per_epoch(len(data.labels), loop.batch_size, env.world_size))
    triplets = MinedTriplets(
        data.dataset, positives, negatives,
        augment=TrainAugment.from_config(dict(dcfg.get("augment") or {}), dcfg["image_size"]),
        convention=convention, total_epochs=epochs, pool_start=int(ccfg["pool_start"]),
        pool_end=int(ccfg["pool_end"]), hide_grid=int(ccfg["hide_grid"]),
        hide_prob_start=float(ccfg["hide_prob_start"]), hide_prob_end=float(ccfg["hide_prob_end"]), seed=seed)

    head: nn.Module = PairLogits(rerank)
    if env.distributed:
        head = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    grad_clip = tcfg.get("grad_clip")
    pair_mode = str(tcfg.get("pairs", "mined"))
    if env.is_main:
        log.info("CVNet-Rerank R%d on frozen %s: %s, %d images; %d steps (%d epochs) of %d queries (2 pairs each) "
                 "on %d rank(s) (%s%s)", depth, ckpt_path, data.description, len(triplets), total, epochs,
                 loop.batch_size, env.world_size, device, ", AMP" if amp else "")

    def step_fn(batch: Any, step: int) -> dict[str, float]:
        q, p, n, labels, neg_labels = (t.to(device, non_blocking=True) for t in batch)
        b = q.shape[0]
        qi, kj, target = training_pairs(labels, torch.cat([labels, neg_labels]), pair_mode)
        head.train()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            with torch.no_grad():
                maps = rerank.extract_featuremap(torch.cat([q, p, n]))
            logits = head(maps[:b], maps[b:], qi, kj)
        loss = balanced_cross_entropy(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = float("nan")
        if grad_clip:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(grad_clip)))
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        hit = logits.detach().argmax(1) == target
        acc = 0.5 * (hit[target == 1].float().mean() + hit[target == 0].float().mean()).item()
        return {"loss": loss.item(), "acc": acc, "lr": lr, "grad_norm": grad_norm, "pool": triplets.pool,
                "hide_prob": triplets.hide_prob}

    def get_state() -> dict[str, Any]:
        return {"head": {k: v for k, v in rerank.state_dict().items() if k.startswith(HEAD_PREFIXES)},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()}

    def set_state(state: dict[str, Any]) -> None:
        missing, unexpected = rerank.load_state_dict(state["head"], strict=False)
        if unexpected or any(k.startswith(HEAD_PREFIXES) for k in missing):
            raise ValueError(f"train state does not fit the re-ranking head: {unexpected or missing}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and amp:
            scaler.load_state_dict(state["scaler"])

    def on_checkpoint(step: int) -> None:
        atomic_torch_save({"model_state": complete_checkpoint(ckpt, rerank), "input_convention": convention.to_dict(),
                           "depth": depth, "reduction_dim": dim, "stage": "cvnet_rerank", "step": step,
                           "total_steps": total, "backbone_checkpoint": ckpt_path, "config": cfg},
                          out_dir / "last.pyth")

    result = run_loop(dataset=triplets, env=env, cfg=loop, step_fn=step_fn, get_state=get_state,
                      set_state=set_state, on_checkpoint=on_checkpoint, resume=resume,
                      extra_log={"stage": "rerank", "images": len(triplets), "epochs": epochs})
    return finish_run(stage="rerank", result=result, env=env, trained=head, out_dir=out_dir)


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train the CVNet re-ranking head on mined pairs (backbone frozen).",
                               default_config=DEFAULT_CONFIG, example="train.batch_size=32 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train_rerank, get_args_parser().parse_args(argv), DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())

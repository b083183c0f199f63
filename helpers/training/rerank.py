"""CVNet-Rerank training as ``train_rerank.py`` runs it (CVNet Sec. 3.4): the correlation-verification head on
pairs mined by a frozen backbone checkpoint, in named phases: the run, the frozen backbone, the model, the data and
its mined pairs, the triplets and their curriculum, the optimisation, the step loop, the summary."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.convention import OFFICIAL_CONVENTION, InputConvention
from common.errors import InvalidValueError
from common.io import atomic_torch_save, file_sha256
from datasets.augment import TrainAugment
from helpers.distributed import nonfinite_ranks
from helpers.training.build import (
    RERANK_HEAD_PREFIXES,
    build_training_rerank,
    checkpoint_geometry,
    complete_rerank_checkpoint,
    read_backbone_checkpoint,
)
from helpers.training.data import LabelledData, build_labelled_dataset
from helpers.training.loop import NonFiniteLossError, RunConflict, read_run_info, steps_per_epoch
from helpers.training.mining import MINING_NAME, MinedTriplets, mine_pairs
from helpers.training.objectives import RerankHead
from helpers.training.optim import Optimization
from helpers.training.run import TrainingRun, open_run
from helpers.training.state import seed_everything
from models.cvnet import CVNetRerank
from models.losses import balanced_cross_entropy, training_pairs

log = logging.getLogger(__name__)


def train_rerank(*, cfg: Mapping[str, Any], resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) CVNet-Rerank training as
    configured (a checked ``TRAIN_RERANK`` config); returns the run's summary (every rank)."""
    with open_run(cfg, desc="rerank", resume=resume, overwrite=overwrite, progress=progress,
                  extra_files=(MINING_NAME,)) as run:
        backbone = FrozenBackbone.read(cfg["backbone"]["checkpoint"])
        if resume:  # before mining, which would replace the cached pairs of the old backbone
            check_same_backbone(run.out_dir, backbone)
        rerank = build_rerank_model(backbone, head_init=str(cfg["model"].get("head_init", "random")), run=run)
        seed_everything(run.seed + run.env.rank)
        data = build_labelled_dataset(cfg["data"], env=run.env, progress=progress)
        positives, negatives = mine_pairs(
            backbone=backbone.checkpoint, backbone_path=backbone.path, depth=backbone.depth, dim=backbone.dim,
            data=data, mining_cfg=cfg["mining"], convention=backbone.convention, env=run.env, out_dir=run.out_dir,
            progress=progress, num_workers=int(cfg["train"]["num_workers"]))
        total = run.total_steps(len(data.labels))
        epochs = math.ceil(total / steps_per_epoch(len(data.labels), run.loop.batch_size, run.env.world_size))
        triplets = rerank_triplets(cfg, data, positives, negatives, convention=backbone.convention, epochs=epochs,
                                   seed=run.seed)
        head = run.across_ranks(RerankHead(rerank))
        opt = run.optimization(head, total)
        _log_plan(run, backbone, data, images=len(triplets), total=total, epochs=epochs)
        task = RerankTask(run, backbone, rerank, head, opt, triplets, total_steps=total,
                          pair_mode=str(cfg["train"].get("pairs", "mined")))
        result = run.train(triplets, task, extra_log={"stage": "rerank", "images": len(triplets), "epochs": epochs},
                           run_info=backbone.run_info)
        return run.finish(stage="rerank", result=result, trained=head, extra=backbone.run_info)


@dataclass(frozen=True)
class FrozenBackbone:
    """The backbone checkpoint the head trains on: its path (``backbone.checkpoint``), contents (official layout),
    sha256, ResNet depth, global dimension and input convention."""

    path: str
    checkpoint: dict[str, Any]
    sha256: str
    depth: int
    dim: int
    convention: InputConvention

    @classmethod
    def read(cls, path: str | os.PathLike) -> FrozenBackbone:
        path = os.fspath(path)
        ckpt = read_backbone_checkpoint(path)
        depth, dim = checkpoint_geometry(ckpt)
        convention = InputConvention.from_dict(ckpt["input_convention"]) if ckpt.get("input_convention") \
            else OFFICIAL_CONVENTION
        return cls(path, ckpt, file_sha256(path), depth, dim, convention)

    @property
    def run_info(self) -> dict[str, str]:
        """What the run records of it (train state, ``last.pyth``, ``summary.json``): path and sha256."""
        return {"backbone_checkpoint": self.path, "backbone_sha256": self.sha256}


def check_same_backbone(out_dir: Path, backbone: FrozenBackbone) -> None:
    """Raise :class:`RunConflict` when the run in ``out_dir`` was trained on another backbone file (its sha256);
    a warning when the run recorded none."""
    recorded = read_run_info(out_dir).get("backbone_sha256")
    if recorded is None:
        log.warning("the run in %s recorded no backbone sha256 (made by an older version): cannot check that %s is "
                    "the file it was trained on", out_dir, backbone.path)
    elif recorded != backbone.sha256:
        raise RunConflict(
            f"backbone.checkpoint {backbone.path} changed since this run started (sha256 {recorded[:12]}... then, "
            f"{backbone.sha256[:12]}... now): the head was trained on the old backbone's features and cannot "
            "continue on the new one. Put the old file back to --resume, or start over with --overwrite")


def build_rerank_model(backbone: FrozenBackbone, *, head_init: str, run: TrainingRun) -> CVNetRerank:
    """CVNet-Rerank on ``run.device`` around the frozen backbone (in eval mode), its head ``head_init`` (see
    :func:`build_training_rerank`); a random head comes from the global RNG seeded with ``run.seed`` (the same
    head on every rank)."""
    torch.manual_seed(run.seed)
    rerank = build_training_rerank(backbone.checkpoint, depth=backbone.depth, head_init=head_init)
    rerank.to(run.device).backbone.eval()
    return rerank


def rerank_triplets(cfg: Mapping[str, Any], data: LabelledData, positives: torch.Tensor, negatives: torch.Tensor, *,
                    convention: InputConvention, epochs: int, seed: int) -> MinedTriplets:
    """The training items (query, positive, negative) of the mined pairs, augmented (``data.augment``), with the
    curriculum of ``curriculum`` over ``epochs`` (negative pool, Hide-and-Seek)."""
    dcfg, ccfg = cfg["data"], cfg["curriculum"]
    return MinedTriplets(
        data.dataset, positives, negatives,
        augment=TrainAugment.from_config(dict(dcfg.get("augment") or {}), dcfg["image_size"]),
        convention=convention, total_epochs=epochs, pool_start=int(ccfg["pool_start"]),
        pool_end=int(ccfg["pool_end"]), hide_grid=int(ccfg["hide_grid"]),
        hide_prob_start=float(ccfg["hide_prob_start"]), hide_prob_end=float(ccfg["hide_prob_end"]), seed=seed)


def _log_plan(run: TrainingRun, backbone: FrozenBackbone, data: LabelledData, *, images: int, total: int,
              epochs: int) -> None:
    if run.env.is_main:
        log.info("CVNet-Rerank R%d on frozen %s: %s, %d images; %d steps (%d epochs) of %d queries "
                 "(2 pairs each) on %d rank(s) (%s%s)", backbone.depth, backbone.path, data.description, images,
                 total, epochs, run.loop.batch_size, run.env.world_size, run.device, ", AMP" if run.amp else "")


class RerankTask:
    """One optimizer step of the re-ranking head (balanced cross-entropy on the two-way logits of the ``pair_mode``
    pairs), the head's resumable state, and the weights: ``last.pyth``, a complete official-layout CVNet
    checkpoint (the backbone file's ``encoder_q.*`` and the trained head)."""

    def __init__(self, run: TrainingRun, backbone: FrozenBackbone, rerank: CVNetRerank, head: nn.Module,
                 opt: Optimization, triplets: MinedTriplets, *, total_steps: int, pair_mode: str) -> None:
        self.run, self.backbone, self.rerank, self.head, self.opt = run, backbone, rerank, head, opt
        self.triplets, self.total_steps, self.pair_mode = triplets, total_steps, pair_mode

    def step(self, batch: Any, step: int) -> dict[str, float]:
        device = self.run.device
        q, p, n, labels, neg_labels = (t.to(device, non_blocking=True) for t in batch)
        b = q.shape[0]
        qi, kj, target = training_pairs(labels, torch.cat([labels, neg_labels]), self.pair_mode)
        self.head.train()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.run.amp):
            with torch.no_grad():
                maps = self.rerank.extract_featuremap(torch.cat([q, p, n]))
            logits = self.head(maps[:b], maps[b:], qi, kj)
        loss = balanced_cross_entropy(logits, target)
        bad = nonfinite_ranks(loss, self.run.env)  # every rank stops at the same step (no rank left in DDP)
        if bad:
            raise NonFiniteLossError(f"non-finite loss at step {step} on rank(s) {bad}")
        lr, grad_norm = self.opt.step(loss)
        hit = logits.detach().argmax(1) == target
        acc = 0.5 * (hit[target == 1].float().mean() + hit[target == 0].float().mean()).item()
        return {"loss": loss.item(), "acc": acc, "lr": lr, "grad_norm": grad_norm, "pool": self.triplets.pool,
                "hide_prob": self.triplets.hide_prob}

    def state_dict(self) -> dict[str, Any]:
        head = {k: v for k, v in self.rerank.state_dict().items() if k.startswith(RERANK_HEAD_PREFIXES)}
        return {"head": head, **self.opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing, unexpected = self.rerank.load_state_dict(state["head"], strict=False)
        if unexpected or any(k.startswith(RERANK_HEAD_PREFIXES) for k in missing):
            raise InvalidValueError(f"train state does not fit the re-ranking head: {unexpected or missing}")
        self.opt.load_state_dict(state)

    def save_weights(self, step: int) -> None:
        backbone = self.backbone
        atomic_torch_save({"model_state": complete_rerank_checkpoint(backbone.checkpoint, self.rerank),
                           "input_convention": backbone.convention.to_dict(), "depth": backbone.depth,
                           "reduction_dim": backbone.dim, "stage": "cvnet_rerank", "step": step,
                           "total_steps": self.total_steps, **backbone.run_info, "config": self.run.cfg},
                          self.run.weights_path)

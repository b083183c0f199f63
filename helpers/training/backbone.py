"""CVNet-Global training as ``train_backbone.py`` runs it (CVNet Sec. 3.1): a global model (CVNet's ResNet + GeM +
fc, or a timm backbone) trained with CurricularFace and the momentum contrastive loss, in named phases: the run,
the data, the model and its losses, the pairs, the optimisation, the step loop, the summary."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.io import atomic_torch_save
from datasets.augment import AugmentedPairs, TrainAugment
from datasets.paired import PairedDataset
from helpers.builders import global_dim
from helpers.distributed import DistEnv, all_gather_cat, nonfinite_ranks
from helpers.training.build import build_training_backbone
from helpers.training.data import LabelledData, build_labelled_dataset
from helpers.training.objectives import BackboneObjective, MomentumKeyEncoder
from helpers.training.optim import Optimization
from helpers.training.run import TrainingRun, open_run
from helpers.training.state import seed_everything
from models.checkpoint import save_official_checkpoint
from models.cvnet import CVNetGlobal
from models.losses import CurricularFace, MomentumContrastiveLoss
from models.timm_global import timm_global_checkpoint

log = logging.getLogger(__name__)


def train_backbone(*, cfg: Mapping[str, Any], resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) global-model training as
    configured (a checked ``TRAIN_BACKBONE`` config); returns the run's summary (every rank)."""
    arch = str(cfg["model"].get("arch", "resnet"))
    lambdas = (float(cfg["loss"]["lambda_cls"]), float(cfg["loss"]["lambda_con"]))
    with open_run(cfg, desc="backbone", resume=resume, overwrite=overwrite, progress=progress) as run:
        seed_everything(run.seed + run.env.rank)
        data = build_labelled_dataset(cfg["data"], env=run.env, progress=progress)
        parts = build_backbone_parts(cfg, num_classes=data.num_classes, env=run.env, seed=run.seed)
        seed_everything(run.seed + run.env.rank)
        objective = run.across_ranks(parts.objective)
        pairs = backbone_pairs(cfg["data"], data, parts.model, seed=run.seed)
        total = run.total_steps(len(pairs))
        opt = run.optimization(objective, total)
        _log_plan(run, parts, data, images=len(pairs), total=total, arch=arch)
        task = BackboneTask(run, parts, objective, opt, total_steps=total, lambdas=lambdas)
        result = run.train(pairs, task, extra_log={"stage": "backbone", "num_classes": data.num_classes,
                                                   "images": len(pairs)})
        return run.finish(stage="backbone", result=result, trained=objective,
                          extra={"arch": arch, "queue_filled": len(parts.contrastive.queue)})


@dataclass
class BackboneParts:
    """What global-model training trains and keeps: the model, the momentum key encoder of a model without one of
    its own (None for CVNetGlobal, which carries it), the CurricularFace classifier, the momentum contrastive loss
    with its key queue, and the module DDP wraps (:class:`BackboneObjective` over the first three)."""

    model: nn.Module
    key_encoder: MomentumKeyEncoder | None
    classifier: CurricularFace
    contrastive: MomentumContrastiveLoss
    objective: BackboneObjective

    def state_dict(self) -> dict[str, Any]:
        keys = {} if self.key_encoder is None else {"key_encoder": self.key_encoder.state_dict()}
        return {"model": self.model.state_dict(), **keys, "classifier": self.classifier.state_dict(),
                "queue": self.contrastive.queue.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.key_encoder is not None:
            self.key_encoder.load_state_dict(state["key_encoder"])
        self.classifier.load_state_dict(state["classifier"])
        self.contrastive.queue.load_state_dict(state["queue"])


def build_backbone_parts(cfg: Mapping[str, Any], *, num_classes: int, env: DistEnv, seed: int) -> BackboneParts:
    """The model of ``model`` (see :func:`build_training_backbone`) and the losses of ``loss`` on ``env.device``;
    the random weights of all come from the global RNG seeded with ``seed`` (the same on every rank)."""
    mcfg, lcfg = cfg["model"], cfg["loss"]
    torch.manual_seed(seed)
    model = build_training_backbone(
        depth=int(mcfg["depth"]), reduction_dim=mcfg["reduction_dim"], key_momentum=float(lcfg["key_momentum"]),
        imagenet_weights=mcfg.get("imagenet_weights", "auto"), init_checkpoint=mcfg.get("init_checkpoint"),
        zero_init_residual=bool(mcfg.get("zero_init_residual")), arch=str(mcfg.get("arch", "resnet")),
        pooling=str(mcfg.get("pooling", "gem")), pretrained_file=mcfg.get("pretrained_file")).to(env.device)
    dim = global_dim(model)
    # CVNetGlobal carries its own key encoder (its train state keeps that layout); any other model gets an EMA copy
    key_encoder = None if isinstance(model, CVNetGlobal) else MomentumKeyEncoder(model, float(lcfg["key_momentum"]))
    classifier = CurricularFace(dim, num_classes, margin=float(lcfg["margin"]), scale=float(lcfg["scale"]),
                                t_momentum=float(lcfg["t_momentum"])).to(env.device)
    # every rank enqueues the keys of all ranks, so the queues stay identical
    contrastive = MomentumContrastiveLoss(dim, int(lcfg["queue_size"]), temperature=float(lcfg["temperature"]),
                                          form=str(lcfg["form"]), gather=lambda t: all_gather_cat(t, env))
    contrastive.to(env.device)
    return BackboneParts(model, key_encoder, classifier, contrastive,
                         BackboneObjective(model, classifier, key_encoder))


def backbone_pairs(data_cfg: Mapping[str, Any], data: LabelledData, model: nn.Module, *, seed: int) -> AugmentedPairs:
    """The training items: each image with another of its landmark (:class:`PairedDataset`), both augmented
    (``data.augment``) into ``model``'s input convention; ``(image, positive, label)``."""
    augment = TrainAugment.from_config(dict(data_cfg.get("augment") or {}), data_cfg["image_size"])
    paired = PairedDataset(data.dataset, seed=seed, labels=data.labels, cache_path=data_cfg.get("label_cache"))
    return AugmentedPairs(paired, augment=augment, convention=model.input_convention, seed=seed)


def _log_plan(run: TrainingRun, parts: BackboneParts, data: LabelledData, *, images: int, total: int,
              arch: str) -> None:
    if run.env.is_main:
        model = parts.model
        name = (f"CVNet-Global R{model.depth}" if isinstance(model, CVNetGlobal)
                else f"{arch} ({model.pooling}, {global_dim(model)}-d)")
        log.info("%s: %s, %d images of %d classes; %d steps of batch %d on %d rank(s) (%s%s)", name,
                 data.description, images, data.num_classes, total, run.loop.batch_size, run.env.world_size,
                 run.device, ", AMP" if run.amp else "")


class BackboneTask:
    """One optimizer step of global-model training (``lambdas``: the weights of the CurricularFace and the
    contrastive loss), the run's resumable state, and its weights: ``last.pyth`` in the official CVNet layout, or
    :func:`timm_global_checkpoint` for a timm model."""

    def __init__(self, run: TrainingRun, parts: BackboneParts, objective: nn.Module, opt: Optimization, *,
                 total_steps: int, lambdas: tuple[float, float]) -> None:
        self.run, self.parts, self.objective, self.opt = run, parts, objective, opt
        self.total_steps, self.lambdas = total_steps, lambdas

    def step(self, batch: Any, step: int) -> dict[str, float]:
        device, parts = self.run.device, self.parts
        images, positives, labels = (t.to(device, non_blocking=True) for t in batch)
        self.objective.train()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.run.amp):
            q, loss_cls = self.objective(images, labels)
            k = parts.objective.keys(positives)
        loss_con = parts.contrastive(q, k, labels)  # the queue as it was before this batch, then this batch's keys
        loss = self.lambdas[0] * loss_cls.float() + self.lambdas[1] * loss_con
        loss_cls, loss_con = loss_cls.detach(), loss_con.detach()
        bad = nonfinite_ranks(loss, self.run.env)  # every rank stops at the same step (no rank left in DDP)
        if bad:
            raise FloatingPointError(f"non-finite loss at step {step} on rank(s) {bad}: cls {loss_cls.item()}, "
                                     f"con {loss_con.item()} here")
        lr, grad_norm = self.opt.step(loss)
        parts.objective.update_keys()
        return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_con": loss_con.item(), "lr": lr,
                "grad_norm": grad_norm, "t": float(parts.classifier.t)}

    def state_dict(self) -> dict[str, Any]:
        return {**self.parts.state_dict(), **self.opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.parts.load_state_dict(state)
        self.opt.load_state_dict(state)

    def save_weights(self, step: int) -> None:
        model, cfg = self.parts.model, self.run.cfg
        if isinstance(model, CVNetGlobal):
            save_official_checkpoint(model, self.run.weights_path, extra={
                "stage": "cvnet_global", "reduction_dim": global_dim(model), "step": step,
                "total_steps": self.total_steps, "config": cfg})
        else:  # the official key layout only fits CVNet's ResNet
            atomic_torch_save(timm_global_checkpoint(model, stage="timm_global", step=step,
                                                     total_steps=self.total_steps, config=cfg), self.run.weights_path)

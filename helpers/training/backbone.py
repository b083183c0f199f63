"""Global-model training as ``train_backbone.py`` runs it, in named phases (the run, the data, the model and its
losses, the training items, the optimisation, the step loop, the summary), with one of two objectives:

- ``loss.name=cvnet`` (the default; CVNet Sec. 3.1): CurricularFace and the momentum contrastive loss on
  (image, positive) pairs in the loop's shuffled order;
- ``loss.name=circle``: the reference CLIP retrieval system's fine-tuning: Circle loss on one view per image in
  P-K batches (``data.sampler``), the multi-similarity miner from ``loss.miner.start_epoch`` on
  (:mod:`helpers.training.metric`).

The model is CVNet's ResNet + GeM + fc, or a timm backbone with a linear or an embedding head; layer-wise
learning-rate decay (``optim.layer_decay``) and a warm-up by ratio (``schedule.warmup_ratio``) apply to either.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from common.io import atomic_torch_save
from datasets.augment import AugmentedImages, AugmentedPairs, TrainAugment
from datasets.paired import PairedDataset
from helpers.builders import global_dim
from helpers.config import ConfigError
from helpers.distributed import DistEnv, all_gather_cat, nonfinite_ranks
from helpers.training.build import build_training_backbone
from helpers.training.data import LabelledData, PKSampler, build_labelled_dataset
from helpers.training.loop import NonFiniteLossError, steps_per_epoch
from helpers.training.metric import MetricLoss
from helpers.training.objectives import BackboneObjective, MomentumKeyEncoder
from helpers.training.optim import Optimization
from helpers.training.run import TrainingRun, open_run
from helpers.training.state import seed_everything
from models.checkpoint import save_official_checkpoint
from models.cvnet import CVNetGlobal
from models.losses import CurricularFace, MomentumContrastiveLoss
from models.timm_global import timm_global_checkpoint

log = logging.getLogger(__name__)

#: ``loss.name``: CVNet's CurricularFace + momentum contrastive loss, or Circle loss (the reference CLIP system's)
LOSSES = ("cvnet", "circle")


def train_backbone(*, cfg: Mapping[str, Any], resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) global-model training as
    configured (a checked ``TRAIN_BACKBONE`` config); returns the run's summary (every rank)."""
    if check_objective(cfg) == "circle":
        return train_metric(cfg=cfg, resume=resume, overwrite=overwrite, progress=progress)
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
        opt = run.optimization(objective, total, model=parts.model)
        _log_plan(run, parts.model, data, images=len(pairs), total=total, arch=arch)
        task = BackboneTask(run, parts, objective, opt, total_steps=total, lambdas=lambdas)
        result = run.train(pairs, task, extra_log={"stage": "backbone", "num_classes": data.num_classes,
                                                   "images": len(pairs)})
        return run.finish(stage="backbone", result=result, trained=objective,
                          extra={"arch": arch, "queue_filled": len(parts.contrastive.queue)})


def check_objective(cfg: Mapping[str, Any]) -> str:
    """``loss.name``, once the choices that go with it agree: a miner and P-K batches only with Circle loss."""
    name = str(cfg["loss"].get("name", "cvnet"))
    if name not in LOSSES:
        raise ConfigError(f"loss.name must be one of {LOSSES}, got {name!r}")
    sampler = str((cfg["data"].get("sampler") or {}).get("name", "random"))
    miner = (cfg["loss"].get("miner") or {}).get("name")
    if name == "cvnet" and (sampler != "random" or miner is not None):
        raise ConfigError(f"data.sampler.name={sampler} and loss.miner.name={miner} go with loss.name=circle; "
                          "CVNet's losses (loss.name=cvnet) train on (image, positive) pairs in the shuffled "
                          "order (data.sampler.name=random, loss.miner.name=null)")
    return name


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
    lcfg = cfg["loss"]
    model = build_global_model(cfg, env=env, seed=seed)
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


def _log_plan(run: TrainingRun, model: nn.Module, data: LabelledData, *, images: int, total: int, arch: str,
              objective: str = "CurricularFace + momentum contrast") -> None:
    if run.env.is_main:
        name = (f"CVNet-Global R{model.depth}" if isinstance(model, CVNetGlobal)
                else f"{arch} ({model.pooling}, {model.head} head, {global_dim(model)}-d)")
        log.info("%s, %s: %s, %d images of %d classes; %d steps of batch %d on %d rank(s) (%s%s)", name, objective,
                 data.description, images, data.num_classes, total, run.loop.batch_size, run.env.world_size,
                 run.device, ", AMP" if run.amp else "")


def save_global_weights(model: nn.Module, run: TrainingRun, *, step: int, total_steps: int) -> None:
    """``last.pyth`` of a global model: the official CVNet layout for CVNet-Global, :func:`timm_global_checkpoint`
    for a timm model (the official key layout only fits CVNet's ResNet)."""
    if isinstance(model, CVNetGlobal):
        save_official_checkpoint(model, run.weights_path, extra={
            "stage": "cvnet_global", "reduction_dim": global_dim(model), "step": step, "total_steps": total_steps,
            "config": run.cfg})
    else:
        atomic_torch_save(timm_global_checkpoint(model, stage="timm_global", step=step, total_steps=total_steps,
                                                 config=run.cfg), run.weights_path)


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
            raise NonFiniteLossError(f"non-finite loss at step {step} on rank(s) {bad}: cls {loss_cls.item()}, "
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
        save_global_weights(self.parts.model, self.run, step=step, total_steps=self.total_steps)


# --------------------------------------------------------------------------------------------------------------
# loss.name=circle: the reference CLIP retrieval system's fine-tuning
# --------------------------------------------------------------------------------------------------------------


def train_metric(*, cfg: Mapping[str, Any], resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """:func:`train_backbone` with ``loss.name=circle``: Circle loss, its miner and sampler (the phases of the
    default objective, with one augmented view per image instead of pairs)."""
    arch = str(cfg["model"].get("arch", "resnet"))
    with open_run(cfg, desc="backbone", resume=resume, overwrite=overwrite, progress=progress) as run:
        seed_everything(run.seed + run.env.rank)
        data = build_labelled_dataset(cfg["data"], env=run.env, progress=progress)
        model = build_global_model(cfg, env=run.env, seed=run.seed)
        seed_everything(run.seed + run.env.rank)
        objective = run.across_ranks(model)
        items = metric_items(cfg["data"], data, model, seed=run.seed)
        total = run.total_steps(len(items))
        epoch_steps = steps_per_epoch(len(items), run.loop.batch_size, run.env.world_size)
        loss = metric_loss(cfg["loss"], env=run.env, steps_per_epoch=epoch_steps)
        opt = run.optimization(objective, total, model=model)
        _log_plan(run, model, data, images=len(items), total=total, arch=arch, objective=_describe(loss, cfg))
        task = MetricTask(run, model, objective, loss, opt, total_steps=total)
        result = run.train(items, task, sampler=metric_sampler(cfg["data"], data, run),
                           extra_log={"stage": "backbone", "objective": "circle", "num_classes": data.num_classes,
                                      "images": len(items), "miner_start_step": loss.miner_start_step})
        return run.finish(stage="backbone", result=result, trained=objective,
                          extra={"arch": arch, "objective": "circle", "miner_start_step": loss.miner_start_step})


def build_global_model(cfg: Mapping[str, Any], *, env: DistEnv, seed: int) -> nn.Module:
    """The model of ``model`` (see :func:`build_training_backbone`) on ``env.device``, its random weights drawn
    from the global RNG seeded with ``seed`` (the same on every rank)."""
    mcfg = cfg["model"]
    torch.manual_seed(seed)
    return build_training_backbone(
        depth=int(mcfg["depth"]), reduction_dim=mcfg["reduction_dim"], key_momentum=float(cfg["loss"]["key_momentum"]),
        imagenet_weights=mcfg.get("imagenet_weights", "auto"), init_checkpoint=mcfg.get("init_checkpoint"),
        zero_init_residual=bool(mcfg.get("zero_init_residual")), arch=str(mcfg.get("arch", "resnet")),
        pooling=str(mcfg.get("pooling", "gem")), pretrained_file=mcfg.get("pretrained_file"),
        head=str(mcfg.get("head", "linear")), head_dropout=float(mcfg.get("head_dropout", 0.1))).to(env.device)


def metric_items(data_cfg: Mapping[str, Any], data: LabelledData, model: nn.Module, *, seed: int) -> AugmentedImages:
    """The training items of Circle loss: one augmented view (``data.augment``) of each image in ``model``'s
    input convention; ``(image, label)``."""
    augment = TrainAugment.from_config(dict(data_cfg.get("augment") or {}), data_cfg["image_size"])
    return AugmentedImages(data.dataset, augment=augment, convention=model.input_convention, seed=seed)


def metric_sampler(data_cfg: Mapping[str, Any], data: LabelledData,
                   run: TrainingRun) -> Callable[[int], Sampler] | None:
    """``data.sampler``: ``pk``, this rank's :class:`PKSampler` (K = ``data.sampler.k``, P = the batch / K) for
    a number of steps per epoch; ``random``: None (the loop's shuffled order)."""
    scfg = dict(data_cfg.get("sampler") or {})
    if str(scfg.get("name", "random")) != "pk":
        return None
    k, env = int(scfg["k"]), run.env
    # checked now, before the loop starts: P classes must exist
    PKSampler(data.labels, k=k, batch_size=run.loop.batch_size, steps_per_epoch=1, num_replicas=env.world_size)
    return lambda spe: PKSampler(data.labels, k=k, batch_size=run.loop.batch_size, steps_per_epoch=spe,
                                 num_replicas=env.world_size, rank=env.rank, seed=run.seed)


def metric_loss(loss_cfg: Mapping[str, Any], *, env: DistEnv, steps_per_epoch: int) -> MetricLoss:
    """Circle loss (``loss.circle``) and the miner of ``loss.miner``, on from epoch ``start_epoch``."""
    circle, miner = dict(loss_cfg.get("circle") or {}), dict(loss_cfg.get("miner") or {})
    return MetricLoss(m=float(circle["m"]), gamma=float(circle["gamma"]), env=env, miner=miner.get("name"),
                      epsilon=float(miner.get("epsilon", 0.1)),
                      miner_start_step=int(miner.get("start_epoch", 0)) * steps_per_epoch)


def _describe(loss: MetricLoss, cfg: Mapping[str, Any]) -> str:
    sampler = dict(cfg["data"].get("sampler") or {})
    order = (f"P-K batches (K {sampler['k']})" if sampler.get("name") == "pk" else "shuffled batches")
    mining = (f", multi-similarity miner from step {loss.miner_start_step}" if loss.miner is not None else "")
    return f"Circle loss (m {loss.circle.m}, gamma {loss.circle.gamma}) on {order}{mining}"


class MetricTask:
    """One optimizer step of ``loss.name=circle``: descriptors of the batch's views, Circle loss over the batch
    of all ranks (:class:`MetricLoss`), the step; the run's resumable state (model, optimisation, the miner's
    start step) and its weights (:func:`save_global_weights`)."""

    def __init__(self, run: TrainingRun, model: nn.Module, objective: nn.Module, loss: MetricLoss,
                 opt: Optimization, *, total_steps: int) -> None:
        self.run, self.model, self.objective, self.loss, self.opt = run, model, objective, loss, opt
        self.total_steps = total_steps

    def step(self, batch: Any, step: int) -> dict[str, float]:
        device = self.run.device
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        self.objective.train()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.run.amp):
            embeddings = self.objective(images)
        loss, metrics = self.loss(embeddings, labels, step)
        bad = nonfinite_ranks(loss, self.run.env)  # every rank stops at the same step (no rank left in DDP)
        if bad:
            raise NonFiniteLossError(f"non-finite loss at step {step} on rank(s) {bad}: {metrics['loss']}")
        lr, grad_norm = self.opt.step(loss)
        return {**metrics, "lr": lr, "grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "metric": self.loss.state_dict(), **self.opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["metric"])
        self.opt.load_state_dict(state)

    def save_weights(self, step: int) -> None:
        save_global_weights(self.model, self.run, step=step, total_steps=self.total_steps)

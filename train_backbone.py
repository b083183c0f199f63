"""Train CVNet-Global: ResNet + GeM + fc with CurricularFace and the momentum contrastive loss (CVNet Sec. 3.1).

    python train_backbone.py                                   # built-in demo: synthetic data, CPU, a few minutes
    python train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    torchrun --nproc_per_node 4 train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    python train_backbone.py --config ... --resume              # continue a killed run from its last checkpoint

Writes into ``run.out_dir``: ``last.pyth`` (official CVNet layout: ``load_official_checkpoint`` and ``eval.py``
read it), ``train_state.pth`` (everything needed to resume), ``metrics.jsonl``, ``config.yaml`` (resolved) and
``summary.json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.augment import AugmentedPairs, TrainAugment
from datasets.paired import PairedDataset
from helpers.config import save_resolved
from helpers.training import (
    DistEnv,
    LoopConfig,
    all_gather_cat,
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
    training_arg_parser,
)
from models.checkpoint import (
    OFFICIAL_CONVENTION,
    TORCHVISION_CONVENTION,
    load_official_checkpoint,
    save_official_checkpoint,
)
from models.cvnet import CVNetGlobal
from models.losses import CurricularFace, LabelledQueue, momentum_contrastive_loss

log = logging.getLogger("train_backbone")

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "builtin_backbone.yaml"

DEFAULTS: dict[str, Any] = {
    "run": {"out_dir": "runs/builtin/backbone", "seed": 0},
    "model": {"depth": 50, "reduction_dim": 2048, "imagenet_weights": "auto", "init_checkpoint": None,
              "zero_init_residual": False},
    "data": {"name": "synthetic", "root": "data", "synthetic": {"name": "synth", "config": {}},
             "gldv2": {"split": "train_clean", "exclude_revisited": False, "exclude_landmarks_file": None,
                       "min_class_size": 1},
             "image_size": 512, "max_corrupt": 100, "label_cache": None,
             "augment": {"scale": [0.35, 1.0], "ratio": [0.75, 1.3333], "flip": 0.5, "brightness": 0.2,
                         "contrast": 0.2, "saturation": 0.2}},
    "loss": {"margin": 0.15, "scale": 30.0, "t_momentum": 0.01, "temperature": 1 / 30, "queue_size": 8192,
             "form": "supcon", "lambda_cls": 0.5, "lambda_con": 0.5, "key_momentum": 0.999},
    "optim": {"name": "sgd", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False},
    "schedule": {"name": "cosine", "warmup_steps": 0, "final_ratio": 0.0},
    "train": {"epochs": 25, "steps": None, "batch_size": 128, "grad_clip": 15.0, "amp": "auto", "device": "auto",
              "num_workers": 8, "checkpoint_every": 1000, "log_every": 20, "threads": None,
              "deterministic": False, "fixed_batch": False},
}


class BackboneObjective(nn.Module):
    """What DistributedDataParallel wraps: the global model and the CurricularFace classifier.

    forward(images (B, 3, H, W), labels (B,)) -> (descriptors (B, D), CurricularFace loss ()).
    """

    def __init__(self, model: CVNetGlobal, classifier: CurricularFace) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        q = self.model(images)
        return q, self.classifier(q, labels)


def _imagenet_choice(value: Any) -> str:
    v = str(value).lower()
    if v in ("true", "1", "yes"):
        return "true"
    if v in ("false", "0", "no", "none"):
        return "false"
    if v != "auto":
        raise ValueError(f"model.imagenet_weights must be true, false or auto, got {value!r}")
    return v


def build_model(model_cfg: dict[str, Any], key_momentum: float) -> CVNetGlobal:
    """CVNetGlobal from ImageNet (torchvision, RGB convention), an official-layout checkpoint, or random init."""
    depth, dim = int(model_cfg["depth"]), int(model_cfg["reduction_dim"])
    choice = _imagenet_choice(model_cfg.get("imagenet_weights", "auto"))
    init = model_cfg.get("init_checkpoint")
    if init:
        model = CVNetGlobal(depth, dim, momentum=key_momentum)
        load_official_checkpoint(model, init)  # sets the checkpoint's own input convention
        log.info("initialised from %s (input convention %s)", init, model.input_convention.channel_order)
        return model
    if choice != "false":
        try:
            model = CVNetGlobal(depth, dim, momentum=key_momentum, imagenet_weights=True,
                                input_convention=TORCHVISION_CONVENTION)
            log.info("initialised from torchvision's ImageNet weights (RGB input convention)")
            return model
        except RuntimeError as err:
            if choice == "true":
                raise
            log.warning("%s\n-> training from random initialisation instead (model.imagenet_weights=auto)", err)
    log.info("random initialisation (BGR input convention of the official releases)")
    model = CVNetGlobal(depth, dim, momentum=key_momentum, input_convention=OFFICIAL_CONVENTION)
    if model_cfg.get("zero_init_residual"):
        zero_init_residual(model)
    return model


@torch.no_grad()
def zero_init_residual(model: CVNetGlobal) -> None:
    """Zero the last BN scale of every bottleneck (Goyal et al. 2017): each block starts as the identity, which
    speeds up training from random initialisation. The key encoder is reset to match."""
    for name, module in model.backbone.named_modules():
        if name.endswith(".bn3") and isinstance(module, nn.BatchNorm2d):
            module.weight.zero_()
    model.reset_key_encoder()


def train_backbone(*, cfg: dict[str, Any], resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) CVNet-Global training as configured; returns the run's summary."""
    tcfg = cfg["train"]
    configure_runtime(threads=tcfg.get("threads"), deterministic=bool(tcfg.get("deterministic")))
    env = init_distributed(str(tcfg.get("device", "auto")))
    try:
        return _train(cfg, env, resume=resume, progress=progress)
    finally:
        cleanup_distributed(env)


def _train(cfg: dict[str, Any], env: DistEnv, *, resume: bool, progress: bool) -> dict[str, Any]:
    tcfg, lcfg, dcfg = cfg["train"], cfg["loss"], cfg["data"]
    seed = int(cfg["run"]["seed"])
    out_dir = Path(cfg["run"]["out_dir"])
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out_dir)
    seed_everything(seed + env.rank)
    device = env.device
    amp = str(tcfg.get("amp", "auto")).lower() in ("auto", "true") and device.type == "cuda"

    data = build_labelled_dataset(dcfg, env=env, progress=progress)
    # every rank builds the same initial weights: the model seed does not depend on the rank
    torch.manual_seed(seed)
    model = build_model(cfg["model"], float(lcfg["key_momentum"])).to(device)
    convention = model.input_convention
    classifier = CurricularFace(int(cfg["model"]["reduction_dim"]), data.num_classes, margin=float(lcfg["margin"]),
                                scale=float(lcfg["scale"]), t_momentum=float(lcfg["t_momentum"])).to(device)
    queue = LabelledQueue(int(cfg["model"]["reduction_dim"]), int(lcfg["queue_size"])).to(device)
    seed_everything(seed + env.rank)
    objective: nn.Module = BackboneObjective(model, classifier)
    if env.distributed:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    augment = TrainAugment.from_config(dict(dcfg.get("augment") or {}), dcfg["image_size"])
    paired = PairedDataset(data.dataset, seed=seed, labels=data.labels, cache_path=dcfg.get("label_cache"))
    pairs = AugmentedPairs(paired, augment=augment, convention=convention, seed=seed)

    loop = LoopConfig(out_dir=out_dir, batch_size=int(tcfg["batch_size"]), total_steps=tcfg.get("steps"),
                      epochs=tcfg.get("epochs"), checkpoint_every=int(tcfg["checkpoint_every"]),
                      log_every=int(tcfg["log_every"]), num_workers=int(tcfg["num_workers"]), seed=seed,
                      max_corrupt=dcfg.get("max_corrupt"), fixed_batch=bool(tcfg.get("fixed_batch")),
                      progress=progress, desc="backbone")
    total = resolve_total_steps(loop, len(pairs), env.world_size)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    grad_clip = tcfg.get("grad_clip")
    lam_cls, lam_con = float(lcfg["lambda_cls"]), float(lcfg["lambda_con"])
    temperature, form = float(lcfg["temperature"]), str(lcfg["form"])
    if env.is_main:
        log.info("CVNet-Global R%d: %s, %d images of %d classes; %d steps of batch %d on %d rank(s) (%s%s)",
                 model.depth, data.description, len(pairs), data.num_classes, total, loop.batch_size,
                 env.world_size, device, ", AMP" if amp else "")

    def step_fn(batch: Any, step: int) -> dict[str, float]:
        images, positives, labels = (t.to(device, non_blocking=True) for t in batch)
        objective.train()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            q, loss_cls = objective(images, labels)
            k = model.key_forward(positives)
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        loss_con = momentum_contrastive_loss(q, k, labels, queue.queue, queue.labels, temperature=temperature,
                                             form=form)
        loss = lam_cls * loss_cls.float() + lam_con * loss_con
        loss_cls, loss_con = loss_cls.detach(), loss_con.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: cls {loss_cls.item()}, "
                                     f"con {loss_con.item()}")
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
        model.update_key_encoder()
        # every rank enqueues the keys of all ranks, so the queues stay identical
        queue.enqueue(all_gather_cat(k, env), all_gather_cat(labels, env))
        return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_con": loss_con.item(), "lr": lr,
                "grad_norm": grad_norm, "t": float(classifier.t)}

    def get_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "classifier": classifier.state_dict(), "queue": queue.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()}

    def set_state(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        classifier.load_state_dict(state["classifier"])
        queue.load_state_dict(state["queue"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and amp:
            scaler.load_state_dict(state["scaler"])

    def on_checkpoint(step: int) -> None:
        save_official_checkpoint(model, out_dir / "last.pyth", extra={
            "stage": "cvnet_global", "reduction_dim": int(cfg["model"]["reduction_dim"]), "step": step,
            "total_steps": total, "config": cfg})

    result = run_loop(dataset=pairs, env=env, cfg=loop, step_fn=step_fn, get_state=get_state, set_state=set_state,
                      on_checkpoint=on_checkpoint, resume=resume,
                      extra_log={"stage": "backbone", "num_classes": data.num_classes, "images": len(pairs)})
    return finish_run(stage="backbone", result=result, env=env, trained=objective, out_dir=out_dir,
                      extra={"queue_filled": len(queue)})


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train CVNet-Global (CurricularFace + momentum contrastive loss).",
                               default_config=DEFAULT_CONFIG, example="train.batch_size=64 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train_backbone, get_args_parser().parse_args(argv), DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())

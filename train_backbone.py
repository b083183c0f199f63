"""Train CVNet-Global: ResNet + GeM + fc with CurricularFace and the momentum contrastive loss (CVNet Sec. 3.1),
or any timm backbone with the same losses (``model.arch=timm:<name>``).

    python train_backbone.py                                   # built-in demo: synthetic data, CPU, a few minutes
    python train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    torchrun --nproc_per_node 4 train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    python train_backbone.py --config ... --resume              # continue a killed run from its last checkpoint
    python train_backbone.py --overwrite                        # delete the run in run.out_dir and start over
    python train_backbone.py model.arch=timm:vit_small_patch16_224 model.pretrained_file=weights/vit_s16.pth
    python train_backbone.py --print-config                     # every key (defaults: helpers/schemas.py)

Writes into ``run.out_dir``: ``last.pyth``, ``train_state.pth`` (everything needed to resume), ``metrics.jsonl``,
``config.yaml`` (resolved) and ``summary.json``. ``last.pyth`` of ``model.arch=resnet`` is in the official CVNet
layout (``load_official_checkpoint`` and ``eval.py`` read it); of a timm arch it is
``models.timm_global.timm_global_checkpoint`` (``load_timm_global`` reads it). A directory that holds a run is only
continued with ``--resume`` or replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cli import repo_path, training_arg_parser, training_main
from helpers.schemas import TRAIN_BACKBONE

DEFAULT_CONFIG = repo_path(__file__, "configs", "builtin_backbone.yaml")
log = logging.getLogger("train_backbone")


def train_backbone(*, cfg: dict[str, Any], resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) global-model training as
    configured (a checked config); returns the run's summary."""
    # heavy imports only here, once the config is known good (--help and config errors answer at once)
    import torch
    from torch import nn

    from common.io import atomic_torch_save
    from datasets.augment import AugmentedPairs, TrainAugment
    from datasets.paired import PairedDataset
    from helpers.builders import global_dim
    from helpers.distributed import all_gather_cat
    from helpers.training.build import build_training_backbone
    from helpers.training.data import build_labelled_dataset
    from helpers.training.loop import (
        WEIGHTS_NAME,
        LoopConfig,
        finish_run,
        resolve_total_steps,
        run_loop,
        start_run,
        training_session,
    )
    from helpers.training.objectives import BackboneObjective, MomentumKeyEncoder
    from helpers.training.optim import Optimization, amp_enabled
    from helpers.training.state import seed_everything
    from models.checkpoint import save_official_checkpoint
    from models.cvnet import CVNetGlobal
    from models.losses import CurricularFace, MomentumContrastiveLoss
    from models.timm_global import timm_global_checkpoint

    tcfg, lcfg, dcfg, mcfg = cfg["train"], cfg["loss"], cfg["data"], cfg["model"]
    seed, arch = int(cfg["run"]["seed"]), str(mcfg.get("arch", "resnet"))
    with training_session(tcfg) as env:
        out_dir = start_run(cfg, env, resume=resume, overwrite=overwrite)
        seed_everything(seed + env.rank)
        device = env.device
        amp = amp_enabled(tcfg.get("amp", "auto"), device)

        data = build_labelled_dataset(dcfg, env=env, progress=progress)
        # every rank builds the same initial weights: the model seed does not depend on the rank
        torch.manual_seed(seed)
        model = build_training_backbone(
            depth=int(mcfg["depth"]), reduction_dim=mcfg["reduction_dim"], key_momentum=float(lcfg["key_momentum"]),
            imagenet_weights=mcfg.get("imagenet_weights", "auto"), init_checkpoint=mcfg.get("init_checkpoint"),
            zero_init_residual=bool(mcfg.get("zero_init_residual")), arch=arch,
            pooling=str(mcfg.get("pooling", "gem")), pretrained_file=mcfg.get("pretrained_file")).to(device)
        dim, cvnet = global_dim(model), isinstance(model, CVNetGlobal)
        # CVNetGlobal carries its own key encoder (its train state keeps that layout); any other model gets an
        # EMA copy
        key_encoder = None if cvnet else MomentumKeyEncoder(model, float(lcfg["key_momentum"]))
        classifier = CurricularFace(dim, data.num_classes, margin=float(lcfg["margin"]), scale=float(lcfg["scale"]),
                                    t_momentum=float(lcfg["t_momentum"])).to(device)
        # every rank enqueues the keys of all ranks, so the queues stay identical
        contrastive = MomentumContrastiveLoss(dim, int(lcfg["queue_size"]), temperature=float(lcfg["temperature"]),
                                              form=str(lcfg["form"]), gather=lambda t: all_gather_cat(t, env))
        contrastive.to(device)
        seed_everything(seed + env.rank)
        core = BackboneObjective(model, classifier, key_encoder)
        objective: nn.Module = core
        if env.distributed:
            objective = nn.parallel.DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None)

        augment = TrainAugment.from_config(dict(dcfg.get("augment") or {}), dcfg["image_size"])
        paired = PairedDataset(data.dataset, seed=seed, labels=data.labels, cache_path=dcfg.get("label_cache"))
        pairs = AugmentedPairs(paired, augment=augment, convention=model.input_convention, seed=seed)

        loop = LoopConfig.from_config(cfg, progress=progress, desc="backbone")
        total = resolve_total_steps(loop, len(pairs), env.world_size)
        opt = Optimization([p for p in objective.parameters() if p.requires_grad], optim_cfg=cfg["optim"],
                           schedule_cfg=cfg["schedule"], total_steps=total, amp=amp, grad_clip=tcfg.get("grad_clip"))
        lam_cls, lam_con = float(lcfg["lambda_cls"]), float(lcfg["lambda_con"])
        if env.is_main:
            log.info("%s: %s, %d images of %d classes; %d steps of batch %d on %d rank(s) (%s%s)",
                     f"CVNet-Global R{model.depth}" if cvnet else f"{arch} ({model.pooling}, {dim}-d)",
                     data.description, len(pairs), data.num_classes, total, loop.batch_size,
                     env.world_size, device, ", AMP" if amp else "")

        def step_fn(batch: Any, step: int) -> dict[str, float]:
            images, positives, labels = (t.to(device, non_blocking=True) for t in batch)
            objective.train()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                q, loss_cls = objective(images, labels)
                k = core.keys(positives)
            loss_con = contrastive(q, k, labels)  # the queue as it was before this batch, then this batch's keys
            loss = lam_cls * loss_cls.float() + lam_con * loss_con
            loss_cls, loss_con = loss_cls.detach(), loss_con.detach()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: cls {loss_cls.item()}, "
                                         f"con {loss_con.item()}")
            lr, grad_norm = opt.step(loss)
            core.update_keys()
            return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_con": loss_con.item(), "lr": lr,
                    "grad_norm": grad_norm, "t": float(classifier.t)}

        def get_state() -> dict[str, Any]:
            keys = {} if key_encoder is None else {"key_encoder": key_encoder.state_dict()}
            return {"model": model.state_dict(), **keys, "classifier": classifier.state_dict(),
                    "queue": contrastive.queue.state_dict(), **opt.state_dict()}

        def set_state(state: dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            if key_encoder is not None:
                key_encoder.load_state_dict(state["key_encoder"])
            classifier.load_state_dict(state["classifier"])
            contrastive.queue.load_state_dict(state["queue"])
            opt.load_state_dict(state)

        def on_checkpoint(step: int) -> None:
            if cvnet:
                save_official_checkpoint(model, out_dir / WEIGHTS_NAME, extra={
                    "stage": "cvnet_global", "reduction_dim": dim, "step": step, "total_steps": total,
                    "config": cfg})
            else:  # the official key layout only fits CVNet's ResNet
                atomic_torch_save(timm_global_checkpoint(model, stage="timm_global", step=step, total_steps=total,
                                                         config=cfg), out_dir / WEIGHTS_NAME)

        result = run_loop(dataset=pairs, env=env, cfg=loop, step_fn=step_fn, get_state=get_state,
                          set_state=set_state, on_checkpoint=on_checkpoint, resume=resume,
                          extra_log={"stage": "backbone", "num_classes": data.num_classes, "images": len(pairs)})
        return finish_run(stage="backbone", result=result, env=env, trained=objective, out_dir=out_dir,
                          extra={"arch": arch, "queue_filled": len(contrastive.queue)})


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train CVNet-Global (CurricularFace + momentum contrastive loss).",
                               schema=TRAIN_BACKBONE, default_config=DEFAULT_CONFIG,
                               example="train.batch_size=64 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return training_main(train_backbone, get_args_parser(), schema=TRAIN_BACKBONE, default_config=DEFAULT_CONFIG,
                         argv=argv)


if __name__ == "__main__":
    sys.exit(main())

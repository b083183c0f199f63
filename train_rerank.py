"""Train CVNet-Rerank: the correlation-verification head on mined pairs, backbone frozen (CVNet Sec. 3.4).

    python train_rerank.py                                     # built-in demo, after `python train_backbone.py`
    python train_rerank.py --config configs/cvnet_rerank_r50_gldv2.yaml data.root=/data/gldv2 \
        backbone.checkpoint=runs/cvnet_r50_gldv2/last.pyth
    torchrun --nproc_per_node 4 train_rerank.py --config configs/cvnet_rerank_r50_gldv2.yaml ...
    python train_rerank.py --config ... --resume                # refused if the backbone file changed since
    python train_rerank.py --overwrite                          # delete the run in run.out_dir and start over
    python train_rerank.py --print-config                      # every key (defaults: helpers/schemas.py)

The backbone checkpoint (from train_backbone.py, or any official-layout CVNet file) is frozen: its global
descriptors mine, for every training image, positives (top-ranked images of its landmark) and hard negatives
(top-ranked images of other landmarks); its stage-3 maps feed the re-ranking head (``conv2ds`` + ``cv_learner``),
trained with cross-entropy on the two-way logits of (query, positive) -> 1 and (query, negative) -> 0 pairs. The
curriculum shrinks the negative pool to the hardest negatives and raises the Hide-and-Seek probability over the
epochs. ``<out_dir>/last.pyth`` is a complete official-layout CVNet checkpoint: the backbone file's ``encoder_q.*``
(stages 1-4 and the global head) plus the trained ``conv2ds.*`` and ``cv_learner.*``, so every model of this
project (and eval.py) loads it. The backbone file's sha256 is recorded (training state, ``last.pyth``,
``summary.json``): a run is resumed only on the very file it started with.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from cli import repo_path, training_arg_parser, training_main
from helpers.schemas import TRAIN_RERANK

DEFAULT_CONFIG = repo_path(__file__, "configs", "builtin_rerank.yaml")
log = logging.getLogger("train_rerank")


def train_rerank(*, cfg: dict[str, Any], resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) CVNet-Rerank training as
    configured (a checked config); returns the run's summary."""
    # heavy imports only here, once the config is known good (--help and config errors answer at once)
    import math

    import torch
    from torch import nn

    from common.convention import OFFICIAL_CONVENTION, InputConvention
    from common.errors import InvalidValueError
    from common.io import atomic_torch_save, file_sha256
    from datasets.augment import TrainAugment
    from helpers.training.build import (
        RERANK_HEAD_PREFIXES,
        build_training_rerank,
        checkpoint_geometry,
        complete_rerank_checkpoint,
        read_backbone_checkpoint,
    )
    from helpers.training.data import build_labelled_dataset
    from helpers.training.loop import (
        WEIGHTS_NAME,
        LoopConfig,
        RunConflict,
        finish_run,
        read_run_info,
        resolve_total_steps,
        run_loop,
        start_run,
        steps_per_epoch,
        training_session,
    )
    from helpers.training.mining import MINING_NAME, MinedTriplets, mine_pairs
    from helpers.training.objectives import RerankHead
    from helpers.training.optim import Optimization, amp_enabled
    from helpers.training.state import seed_everything
    from models.losses import balanced_cross_entropy, training_pairs

    tcfg, dcfg, ccfg = cfg["train"], cfg["data"], cfg["curriculum"]
    seed = int(cfg["run"]["seed"])
    with training_session(tcfg) as env:
        out_dir = start_run(cfg, env, resume=resume, overwrite=overwrite, extra_files=(MINING_NAME,))
        device = env.device
        amp = amp_enabled(tcfg.get("amp", "auto"), device)

        ckpt_path = os.fspath(cfg["backbone"]["checkpoint"])
        ckpt = read_backbone_checkpoint(ckpt_path)
        backbone_sha256 = file_sha256(ckpt_path)
        if resume:  # before mining, which would replace the cached pairs of the old backbone
            recorded = read_run_info(out_dir).get("backbone_sha256")
            if recorded is None:
                log.warning("the run in %s recorded no backbone sha256 (made by an older version): cannot check "
                            "that %s is the file it was trained on", out_dir, ckpt_path)
            elif recorded != backbone_sha256:
                raise RunConflict(
                    f"backbone.checkpoint {ckpt_path} changed since this run started (sha256 {recorded[:12]}... "
                    f"then, {backbone_sha256[:12]}... now): the head was trained on the old backbone's features "
                    "and cannot continue on the new one. Put the old file back to --resume, or start over with "
                    "--overwrite")
        depth, dim = checkpoint_geometry(ckpt)
        convention = InputConvention.from_dict(ckpt["input_convention"]) if ckpt.get("input_convention") \
            else OFFICIAL_CONVENTION
        torch.manual_seed(seed)  # the same random head on every rank
        rerank = build_training_rerank(ckpt, depth=depth, head_init=str(cfg["model"].get("head_init", "random")))
        rerank.to(device).backbone.eval()
        seed_everything(seed + env.rank)

        data = build_labelled_dataset(dcfg, env=env, progress=progress)
        positives, negatives = mine_pairs(backbone=ckpt, backbone_path=ckpt_path, depth=depth, dim=dim, data=data,
                                          mining_cfg=cfg["mining"], convention=convention, env=env, out_dir=out_dir,
                                          progress=progress, num_workers=int(tcfg["num_workers"]))
        loop = LoopConfig.from_config(cfg, progress=progress, desc="rerank")
        total = resolve_total_steps(loop, len(data.labels), env.world_size)
        epochs = math.ceil(total / steps_per_epoch(len(data.labels), loop.batch_size, env.world_size))
        triplets = MinedTriplets(
            data.dataset, positives, negatives,
            augment=TrainAugment.from_config(dict(dcfg.get("augment") or {}), dcfg["image_size"]),
            convention=convention, total_epochs=epochs, pool_start=int(ccfg["pool_start"]),
            pool_end=int(ccfg["pool_end"]), hide_grid=int(ccfg["hide_grid"]),
            hide_prob_start=float(ccfg["hide_prob_start"]), hide_prob_end=float(ccfg["hide_prob_end"]), seed=seed)

        head: nn.Module = RerankHead(rerank)
        if env.distributed:
            head = nn.parallel.DistributedDataParallel(
                head, device_ids=[device.index] if device.type == "cuda" else None)
        opt = Optimization([p for p in head.parameters() if p.requires_grad], optim_cfg=cfg["optim"],
                           schedule_cfg=cfg["schedule"], total_steps=total, amp=amp, grad_clip=tcfg.get("grad_clip"))
        pair_mode = str(tcfg.get("pairs", "mined"))
        if env.is_main:
            log.info("CVNet-Rerank R%d on frozen %s: %s, %d images; %d steps (%d epochs) of %d queries "
                     "(2 pairs each) on %d rank(s) (%s%s)", depth, ckpt_path, data.description, len(triplets),
                     total, epochs, loop.batch_size, env.world_size, device, ", AMP" if amp else "")

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
            lr, grad_norm = opt.step(loss)
            hit = logits.detach().argmax(1) == target
            acc = 0.5 * (hit[target == 1].float().mean() + hit[target == 0].float().mean()).item()
            return {"loss": loss.item(), "acc": acc, "lr": lr, "grad_norm": grad_norm, "pool": triplets.pool,
                    "hide_prob": triplets.hide_prob}

        def get_state() -> dict[str, Any]:
            return {"head": {k: v for k, v in rerank.state_dict().items() if k.startswith(RERANK_HEAD_PREFIXES)},
                    **opt.state_dict()}

        def set_state(state: dict[str, Any]) -> None:
            missing, unexpected = rerank.load_state_dict(state["head"], strict=False)
            if unexpected or any(k.startswith(RERANK_HEAD_PREFIXES) for k in missing):
                raise InvalidValueError(f"train state does not fit the re-ranking head: {unexpected or missing}")
            opt.load_state_dict(state)

        def on_checkpoint(step: int) -> None:
            atomic_torch_save({"model_state": complete_rerank_checkpoint(ckpt, rerank),
                               "input_convention": convention.to_dict(), "depth": depth, "reduction_dim": dim,
                               "stage": "cvnet_rerank", "step": step, "total_steps": total,
                               "backbone_checkpoint": ckpt_path, "backbone_sha256": backbone_sha256,
                               "config": cfg}, out_dir / WEIGHTS_NAME)

        result = run_loop(dataset=triplets, env=env, cfg=loop, step_fn=step_fn, get_state=get_state,
                          set_state=set_state, on_checkpoint=on_checkpoint, resume=resume,
                          extra_log={"stage": "rerank", "images": len(triplets), "epochs": epochs},
                          run_info={"backbone_checkpoint": ckpt_path, "backbone_sha256": backbone_sha256})
        return finish_run(stage="rerank", result=result, env=env, trained=head, out_dir=out_dir,
                          extra={"backbone_checkpoint": ckpt_path, "backbone_sha256": backbone_sha256})


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train the CVNet re-ranking head on mined pairs (backbone frozen).",
                               schema=TRAIN_RERANK, default_config=DEFAULT_CONFIG,
                               example="train.batch_size=32 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return training_main(train_rerank, get_args_parser(), schema=TRAIN_RERANK, default_config=DEFAULT_CONFIG,
                         argv=argv)


if __name__ == "__main__":
    sys.exit(main())

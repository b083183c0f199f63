"""Train CVNet-Global: ResNet + GeM + fc with CurricularFace and the momentum contrastive loss (CVNet Sec. 3.1),
or any timm backbone with the same losses (``model.arch=timm:<name>``), or fine-tune one with the reference CLIP
retrieval system's recipe (``configs/finetune_folder.yaml``: embedding head, Circle loss on P-K batches, the
multi-similarity miner after 5 epochs, AdamW with layer-wise learning-rate decay, cosine with 15 % warm-up).

    python train_backbone.py                                   # built-in demo: synthetic data, CPU, a few minutes
    python train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    torchrun --nproc_per_node 4 train_backbone.py --config configs/cvnet_r50_gldv2.yaml data.root=/data/gldv2
    python train_backbone.py --config ... --resume              # continue a killed run from its last checkpoint
    python train_backbone.py --overwrite                        # delete the run in run.out_dir and start over
    python train_backbone.py model.arch=timm:vit_small_patch16_224 model.pretrained_file=weights/vit_s16.pth
    python train_backbone.py --config configs/finetune_folder.yaml data.root=PATH/training   # your class folder
    python train_backbone.py --print-config                     # every key (defaults: helpers/schemas.py)

Writes into ``run.out_dir``: ``last.pyth``, ``train_state.pth`` (everything needed to resume), ``metrics.jsonl``,
``config.yaml`` (resolved) and ``summary.json``. ``last.pyth`` of ``model.arch=resnet`` is in the official CVNet
layout (``load_official_checkpoint`` and ``eval.py`` read it); of a timm arch it is
``models.timm_global.timm_global_checkpoint`` (``load_timm_global`` reads it). A directory that holds a run is only
continued with ``--resume`` or replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from cli import repo_path, training_arg_parser, training_main
from helpers.schemas import TRAIN_BACKBONE

DEFAULT_CONFIG = repo_path(__file__, "configs", "builtin_backbone.yaml")


def train_backbone(*, cfg: dict[str, Any], resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) global-model training as
    configured (a checked config); returns the run's summary (:func:`helpers.training.backbone.train_backbone`)."""
    # torch is imported only here, once the config is known good (--help and config errors answer at once)
    from helpers.training.backbone import train_backbone as train

    return train(cfg=cfg, resume=resume, overwrite=overwrite, progress=progress)


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train CVNet-Global (CurricularFace + momentum contrastive loss), or "
                                           "fine-tune with the reference CLIP system's recipe (Circle loss).",
                               schema=TRAIN_BACKBONE, default_config=DEFAULT_CONFIG,
                               example="train.batch_size=64 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return training_main(train_backbone, get_args_parser(), schema=TRAIN_BACKBONE, default_config=DEFAULT_CONFIG,
                         argv=argv)


if __name__ == "__main__":
    sys.exit(main())

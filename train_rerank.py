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
import sys
from typing import Any

from cli import repo_path, training_arg_parser, training_main
from helpers.schemas import TRAIN_RERANK

DEFAULT_CONFIG = repo_path(__file__, "configs", "builtin_rerank.yaml")


def train_rerank(*, cfg: dict[str, Any], resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Run (``resume``: continue; ``overwrite``: replace the run in ``run.out_dir``) CVNet-Rerank training as
    configured (a checked config); returns the run's summary (:func:`helpers.training.rerank.train_rerank`)."""
    # torch is imported only here, once the config is known good (--help and config errors answer at once)
    from helpers.training.rerank import train_rerank as train

    return train(cfg=cfg, resume=resume, overwrite=overwrite, progress=progress)


def get_args_parser() -> argparse.ArgumentParser:
    return training_arg_parser(description="Train the CVNet re-ranking head on mined pairs (backbone frozen).",
                               schema=TRAIN_RERANK, default_config=DEFAULT_CONFIG,
                               example="train.batch_size=32 data.root=/data")


def main(argv: list[str] | None = None) -> int:
    return training_main(train_rerank, get_args_parser(), schema=TRAIN_RERANK, default_config=DEFAULT_CONFIG,
                         argv=argv)


if __name__ == "__main__":
    sys.exit(main())

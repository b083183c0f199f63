"""Metric learning on the pairs of a batch, as the reference CLIP retrieval system fine-tunes: Circle loss (Sun et
al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020) over the batch of all
ranks, with the multi-similarity miner (Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
Metric Learning", CVPR 2019, Sec. 4.1) switched on at a given step. Both are pytorch-metric-learning's (imported
when a :class:`MetricLoss` is built); tests/helpers/training/test_metric.py checks them against the papers'
formulas.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from common.errors import InvalidValueError
from helpers.distributed import DistEnv, all_gather_cat, all_gather_objects

log = logging.getLogger(__name__)

#: the miners ``loss.miner.name`` names (None: every pair of the batch)
MINERS = ("multi_similarity",)


def gather_batch(embeddings: Tensor, labels: Tensor, env: DistEnv) -> tuple[Tensor, Tensor]:
    """The batch of all ranks in rank order: (N, D) embeddings whose own rank's rows are ``embeddings`` itself
    (the gradient flows into them) and the others' are copies without gradient, and their (N,) labels. One rank:
    the inputs as they are.

    Every rank then computes the same loss L of the whole batch; its backward reaches exactly the terms of its own
    rows, so that the gradients DistributedDataParallel averages, times the number of ranks, are those of L.
    """
    if not env.distributed:
        return embeddings, labels
    sizes = all_gather_objects(int(embeddings.shape[0]), env)
    start = sum(sizes[:env.rank])
    others = all_gather_cat(embeddings, env)
    joined = torch.cat([others[:start], embeddings, others[start + sizes[env.rank]:]])
    return joined, all_gather_cat(labels, env)


class MetricLoss:
    """Circle loss (margin ``m``, scale ``gamma``) on the batch gathered over the ranks (:func:`gather_batch`),
    on every positive and negative pair of it, or, from optimizer step ``miner_start_step`` on, on the pairs the
    multi-similarity miner (``miner="multi_similarity"``, margin ``epsilon``) keeps.

    ``loss(embeddings (b, D), labels (b,), step) -> (what to backward (), metrics)``: the loss to backward is the
    world size times the batch loss (see :func:`gather_batch`); the metrics hold the batch loss itself, whether the
    miner ran and the positive / negative pairs the loss saw. ``state_dict`` keeps the miner's start step, so that
    a resumed run switches where the interrupted one would have.
    """

    def __init__(self, *, m: float, gamma: float, env: DistEnv, miner: str | None = None, epsilon: float = 0.1,
                 miner_start_step: int = 0) -> None:
        from pytorch_metric_learning import losses, miners

        if miner is not None and miner not in MINERS:
            raise InvalidValueError(f"loss.miner.name must be one of {MINERS} or null, got {miner!r}")
        self.circle = losses.CircleLoss(m=float(m), gamma=float(gamma))
        self.miner = None if miner is None else miners.MultiSimilarityMiner(epsilon=float(epsilon))
        self.miner_start_step = int(miner_start_step)
        self.env = env

    def mining(self, step: int) -> bool:
        """Whether the miner chooses the pairs of optimizer step ``step``."""
        return self.miner is not None and step >= self.miner_start_step

    def __call__(self, embeddings: Tensor, labels: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        # at least float32 whatever the autocast: Circle loss's gamma = 80 scales similarities into exp()
        emb = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        emb, lab = gather_batch(emb, labels, self.env)
        mined = self.mining(step)
        if mined:
            pairs = self.miner(emb.detach(), lab)
            n_pos, n_neg = len(pairs[0]), len(pairs[2])
        else:
            pairs = None
            same = lab[:, None] == lab[None, :]
            n_pos = int(same.sum()) - len(lab)
            n_neg = int((~same).sum())
        loss = self.circle(emb, lab, pairs)
        return loss * self.env.world_size, {"loss": float(loss.detach()), "mining": float(mined),
                                            "pairs_pos": float(n_pos), "pairs_neg": float(n_neg)}

    def state_dict(self) -> dict[str, Any]:
        return {"miner_start_step": self.miner_start_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = int(state["miner_start_step"])
        if self.miner is not None and saved != self.miner_start_step:
            log.warning("the resumed run switches the miner on at step %d (its own), not at step %d (this config)",
                        saved, self.miner_start_step)
        self.miner_start_step = saved

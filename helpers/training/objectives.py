"""The thin modules DistributedDataParallel wraps: they hold exactly the trained parameters and forward to the
models' own methods (the maths stays in :mod:`models`), and the momentum key encoder of any global model."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.cvnet import CVNetRerank
from models.functional import ema_update_
from models.losses import CurricularFace


class MomentumKeyEncoder(nn.Module):
    """The momentum (key) encoder of CVNet's contrastive loss for any global model (CVNetGlobal carries its own,
    ``key_backbone`` / ``key_head``): a frozen deep copy of ``model``, moved towards it by EMA after each step.

    forward(images (B, 3, H, W)) -> keys (B, D), without gradient. It follows its owner's train / eval mode.
    """

    def __init__(self, model: nn.Module, momentum: float) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.momentum = float(momentum)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """EMA step: key <- m * key + (1 - m) * query, for parameters and float buffers (BN statistics) alike;
        integer buffers (BN's batch counter) are copied. The rule of ``CVNetGlobal.update_key_encoder``."""
        ema_update_(self.encoder.state_dict(), model.state_dict(), self.momentum)


class BackboneObjective(nn.Module):
    """Global-model training: the model, the CurricularFace classifier and, for models without a built-in one
    (anything but CVNetGlobal), the :class:`MomentumKeyEncoder` (registered here so that DDP keeps its buffers
    in step across ranks).

    forward(images (B, 3, H, W), labels (B,)) -> (descriptors (B, D), CurricularFace loss ()).
    """

    def __init__(self, model: nn.Module, classifier: CurricularFace,
                 key_encoder: MomentumKeyEncoder | None = None) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.key_encoder = key_encoder

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        q = self.model(images)
        return q, self.classifier(q, labels)

    def keys(self, images: Tensor) -> Tensor:
        """The momentum encoder's descriptors (B, D), no gradient."""
        if self.key_encoder is None:
            return self.model.key_forward(images)
        return self.key_encoder(images)

    def update_keys(self) -> None:
        """One EMA step of the momentum encoder towards the model (after the optimizer step)."""
        if self.key_encoder is None:
            self.model.update_key_encoder()
        else:
            self.key_encoder.update(self.model)


class RerankHead(nn.Module):
    """CVNet-Rerank training: the trainable head of ``rerank`` (``conv2ds``, ``cv_learner``; the frozen backbone
    stays outside, so DDP neither syncs nor broadcasts it).

    forward(query_maps, key_maps, query_index, key_index) is :meth:`models.cvnet.CVNetRerank.pair_logits` ->
    (P, 2) two-way logits.
    """

    def __init__(self, rerank: CVNetRerank) -> None:
        super().__init__()
        self.conv2ds = rerank.conv2ds
        self.cv_learner = rerank.cv_learner
        self._pair_logits = rerank.pair_logits  # a bound method: rerank is not registered as a submodule

    def forward(self, query_maps: Tensor, key_maps: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
        return self._pair_logits(query_maps, key_maps, query_index, key_index)

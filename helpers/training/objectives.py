"""The thin modules DistributedDataParallel wraps: they hold exactly the trained parameters and forward to the
models' own methods (the maths stays in :mod:`models`)."""
from __future__ import annotations

from torch import Tensor, nn

from models.cvnet import CVNetGlobal, CVNetRerank
from models.losses import CurricularFace


class BackboneObjective(nn.Module):
    """CVNet-Global training: the global model and the CurricularFace classifier.

    forward(images (B, 3, H, W), labels (B,)) -> (descriptors (B, D), CurricularFace loss ()).
    """

    def __init__(self, model: CVNetGlobal, classifier: CurricularFace) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        q = self.model(images)
        return q, self.classifier(q, labels)


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

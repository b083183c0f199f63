"""CVNet (Lee et al., CVPR 2022): the global model (CVNet-Global) and the re-ranking model (CVNet-Rerank)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.errors import InvalidValueError

from . import functional as MF
from .backbone import ResNetBackbone
from .checkpoint import OFFICIAL_CONVENTION, InputConvention
from .layers import CVLearner, GlobalHead, l2n

CORRELATION_SCALES = (0.25, 0.5, 1.0)


class CVNetGlobal(nn.Module):
    """CVNet-Global: ResNet -> GeM (learned p) -> fc -> L2, single scale.

    ``model(images)``: (B, 3, H, W) normalised images -> (B, reduction_dim) L2-normalised descriptors.
    Multi-scale test descriptors are assembled by :mod:`helpers.extraction` (resize of the uint8 image, as the
    release does). For training it carries the momentum (key) encoder of the paper's contrastive loss,
    updated by EMA with :meth:`update_key_encoder`; it is never used on the inference path.
    """

    official_ignored_prefixes = ("conv2ds.", "cv_learner.")
    derived_prefixes = ("key_backbone.", "key_head.")

    def __init__(
        self,
        depth: int = 50,
        reduction_dim: int = 2048,
        momentum: float = 0.999,
        imagenet_weights: bool = False,
        input_convention: InputConvention = OFFICIAL_CONVENTION,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.momentum = momentum
        self.input_convention = input_convention
        self.backbone = ResNetBackbone(depth, num_stages=4, imagenet_weights=imagenet_weights)
        self.head = GlobalHead(2048, reduction_dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in self._key_parameters():
            p.requires_grad_(False)

    def _key_parameters(self):
        yield from self.key_backbone.parameters()
        yield from self.key_head.parameters()

    @staticmethod
    def _describe(backbone: ResNetBackbone, head: GlobalHead, images: Tensor) -> Tensor:
        x = backbone(images)
        return l2n(head.fc(head.pool(x)))

    def forward(self, images: Tensor) -> Tensor:
        return self._describe(self.backbone, self.head, images)

    @torch.no_grad()
    def key_forward(self, images: Tensor) -> Tensor:
        """Descriptors from the momentum encoder, (B, reduction_dim), no gradient."""
        return self._describe(self.key_backbone, self.key_head, images)

    @torch.no_grad()
    def update_key_encoder(self, momentum: float | None = None) -> None:
        """EMA step: key <- m * key + (1 - m) * query, for parameters and BN statistics alike."""
        m = self.momentum if momentum is None else momentum
        for key_mod, query_mod in ((self.key_backbone, self.backbone), (self.key_head, self.head)):
            MF.ema_update_(key_mod.state_dict(), query_mod.state_dict(), m)

    @torch.no_grad()
    def reset_key_encoder(self) -> None:
        """Copy the query encoder into the key encoder (after loading weights)."""
        self.key_backbone.load_state_dict(self.backbone.state_dict())
        self.key_head.load_state_dict(self.head.state_dict())

    def after_official_load(self) -> None:
        self.reset_key_encoder()


class CVNetRerank(nn.Module):
    """CVNet-Rerank: correlation verification of a (query, key) image pair.

    ``extract_featuremap(images) -> (B, 1024, H/16, W/16)``; ``score(query_maps, key_maps) -> (B,)`` the
    probability that the pair shows the same object; ``model(query_images, key_images) -> (B,)`` both steps.
    A query batch of 1 is broadcast over B keys. :meth:`reduce_featuremap` is the query-independent part of
    the key side (per-scale resize + 3x3 conv), which can be cached per database image. Training optimises
    :meth:`pair_logits`, the two-way logits of index-chosen pairs, through the same :meth:`logits_reduced`.
    """

    official_ignored_prefixes = ("head.", "backbone.layer4.")
    derived_prefixes = ()

    def __init__(
        self,
        depth: int = 50,
        scales: Sequence[float] = CORRELATION_SCALES,
        input_convention: InputConvention = OFFICIAL_CONVENTION,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.scales = tuple(scales)
        if self.scales[-1] != 1.0:
            raise InvalidValueError(f"the last correlation scale must be 1.0 (it sets the 4D size), got {self.scales}")
        self.input_convention = input_convention
        self.backbone = ResNetBackbone(depth, num_stages=3)
        self.conv2ds = nn.ModuleList(nn.Conv2d(1024, 256, 3, padding=1, bias=False) for _ in self.scales)
        self.cv_learner = CVLearner(len(self.scales) ** 2)

    def extract_featuremap(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> the stage-3 pre-ReLU map (B, 1024, H/16, W/16)."""
        return self.backbone.stage3_preact(images)

    def reduce_featuremap(self, maps: Tensor) -> list[Tensor]:
        """Per correlation scale s: bilinear resize to round(h*sqrt(s)) then that scale's 3x3 conv.

        (B, 1024, h, w) -> list of (B, 256, h_s, w_s), one per scale; the last scale keeps (h, w).
        """
        h, w = maps.shape[-2:]
        return [
            conv(MF.resize_featuremap(maps, MF.correlation_size(h, w, s)))
            for s, conv in zip(self.scales, self.conv2ds)
        ]

    def logits_reduced(self, query: list[Tensor], key: list[Tensor]) -> Tensor:
        """Two-way logits ("different", "same object") of reduced maps paired row by row.

        query / key: per scale (Bq, 256, h_s, w_s) / (B, 256, h_s, w_s) from :meth:`reduce_featuremap`, Bq in
        {1, B} (a single query is broadcast) -> (B, 2). The one place the correlation and the 4D network run on
        the faithful path: scoring (:meth:`score_reduced`) and training (:meth:`pair_logits`) both call it.
        """
        b = max(query[0].shape[0], key[0].shape[0])
        query = [q.expand(b, *q.shape[1:]) for q in query]
        key = [k.expand(b, *k.shape[1:]) for k in key]
        size = (*query[-1].shape[-2:], *key[-1].shape[-2:])
        return self.cv_learner(MF.cross_scale_correlation(query, key, size))

    def score_reduced(self, query: list[Tensor], key: list[Tensor]) -> Tensor:
        """Pair scores from reduced maps (see :meth:`reduce_featuremap`) -> (B,) probabilities of class 1."""
        return torch.softmax(self.logits_reduced(query, key), dim=1)[:, 1]

    def pair_logits(self, query_maps: Tensor, key_maps: Tensor, query_index: Tensor, key_index: Tensor) -> Tensor:
        """Two-way logits of the pairs ``(query_index[p], key_index[p])`` of two batches of stage-3 maps.

        query_maps (Bq, 1024, hq, wq), key_maps (Bk, 1024, hk, wk), query_index / key_index (P,) -> (P, 2):
        class 0 "different", class 1 "same object" (softmax class 1 is :meth:`score`). Each map goes through the
        per-scale convs once, however many pairs it is in; this is what CVNet-Rerank training optimises.
        """
        query = [t[query_index] for t in self.reduce_featuremap(query_maps)]
        key = [t[key_index] for t in self.reduce_featuremap(key_maps)]
        return self.logits_reduced(query, key)

    def score(self, query_maps: Tensor, key_maps: Tensor) -> Tensor:
        """(Bq, 1024, hq, wq) and (B, 1024, hk, wk) stage-3 maps, Bq in {1, B} -> (B,) scores."""
        return self.score_reduced(self.reduce_featuremap(query_maps), self.reduce_featuremap(key_maps))

    def forward(self, query_images: Tensor, key_images: Tensor) -> Tensor:
        return self.score(self.extract_featuremap(query_images), self.extract_featuremap(key_images))

    # ----------------------------------------------------------------------------------------------------------
    # Fast path: same scores as score_reduced (to 1e-5), without the (B, 9, hq, wq, hk, wk) tensor
    # ----------------------------------------------------------------------------------------------------------

    def prepare_reduced(self, reduced: list[Tensor]) -> Tensor:
        """Reduced maps (see :meth:`reduce_featuremap`) -> (B, S, h, w, 256): per scale, every position
        L2-normalised and resized to the scale-1.0 size. Query-independent, like the reduced maps."""
        return MF.normalized_upsampled(reduced, tuple(reduced[-1].shape[-2:]))

    def score_prepared(self, query: Tensor, key: Tensor) -> Tensor:
        """Pair scores from :meth:`prepare_reduced` outputs: query (Bq, S, hq, wq, C) with Bq in {1, B}, key
        (B, S, hk, wk, C) -> (B,) probabilities of class 1, equal to :meth:`score_reduced` within 1e-5.

        The cross-scale correlation is built as two GEMMs that give only the slices the first center-pivot
        conv reads, and the 4D network runs channels-last (:mod:`models.functional`, fast path section).
        """
        learner = self.cv_learner
        first = learner.block1[0]
        by_key, by_query = MF.pivot_correlations(query, key, first.stride)
        x = MF.center_pivot_conv4d_slices(by_key, by_query, first.conv1.weight, first.conv1.bias,
                                          first.conv2.weight, first.conv2.bias, first.stride, first.padding)
        del by_key, by_query  # the largest tensors of the pass: free them before the next layer allocates
        x = self.run_channels_last(x, list(learner.block1)[1:])
        for block in (learner.block2, learner.block3, learner.block4):
            x = self.run_channels_last(x, list(block))
        return self.head_channels_last(x)

    @staticmethod
    def run_channels_last(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
        """CVLearner layers (center-pivot convs, GroupNorms, ReLUs) on a channels-last (B, ha, wa, hb, wb, C)
        tensor; a GroupNorm and the ReLU after it run as one in-place step on the conv's fresh output."""
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.GroupNorm):
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                x = MF.group_norm_channels_last_(x, layer.num_groups, layer.weight, layer.bias, layer.eps,
                                                 relu=relu)
                i += 2 if relu else 1
                continue
            if isinstance(layer, nn.ReLU):
                x = x.relu_()
            else:
                x = MF.center_pivot_conv4d_channels_last(x, layer.conv1.weight, layer.conv1.bias,
                                                         layer.conv2.weight, layer.conv2.bias, layer.stride,
                                                         layer.padding)
            i += 1
        return x

    def head_channels_last(self, x: Tensor) -> Tensor:
        """Mean over all 4D positions of a channels-last (B, ..., 128) tensor -> MLP -> (B,) P(class 1)."""
        pooled = x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
        return torch.softmax(self.cv_learner.mlp(pooled), dim=1)[:, 1]

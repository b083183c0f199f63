"""Any backbone as a global descriptor model: a module that returns (B, C, H, W) feature maps (or a ViT's patch
tokens), a pooling (GeM, SuperGlobal's GeM+ or Regional-GeM + GeM+), an optional head (a linear projection, or
the reference CLIP retrieval system's embedding head: Linear, BatchNorm, Dropout), L2.

    model = TimmGlobal("resnet50", pretrained=False, pooling="gem")                 # random weights, no download
    model = TimmGlobal("vit_small_patch16_224", pooling="gem+", dim=512)            # ViT patch tokens -> maps
    model = TimmGlobal("resnet50", pretrained=True,                                 # local weights file
                       pretrained_file="weights/resnet50_a1_0-14fe96d1.pth")
    model = TimmGlobal("vit_small_patch16_224", dim=512, head="embedding")          # Linear, BN, Dropout 0.1, L2
    model = FeatureMapGlobal(my_module, channels=512)                              # any map-returning module

timm is imported when a :class:`TimmGlobal` is built, not before.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.convention import TORCHVISION_CONVENTION, InputConvention
from common.errors import InvalidValueError, MissingFileError
from models.checkpoint import CheckpointError, read_checkpoint

from . import functional as MF
from .layers import EmbeddingHead, GeM

#: "token": the backbone's own pooled vector (a timm ViT's class token after its final norm; a CNN's average)
POOLINGS = ("gem", "gem+", "rgem", "token")
#: "linear": SuperGlobal's order (L2, fc, L2); "embedding": the reference CLIP retrieval system's head (fc,
#: BatchNorm, Dropout, L2), :class:`models.layers.EmbeddingHead`
HEADS = ("linear", "embedding")


class FeatureMapGlobal(nn.Module):
    """A global descriptor from any module ``body`` with ``body(images) -> (B, C, H, W)``.

    ``pooling``: ``"gem"`` (learnable p, init 3, CVNet's), ``"gem+"`` (fixed p = 4.6, SuperGlobal's) or
    ``"rgem"`` (SuperGlobal's Regional-GeM on the rectified map, then GeM+) or ``"token"`` (the pooled vector
    ``body.pooled(images)`` of a body that has one, e.g. a timm ViT's class token). ``dim`` with ``head="linear"``: a
    linear projection to ``dim`` of the L2-normalised pooled vector (SuperGlobal's order: L2, fc, L2; None: keep
    C); with ``head="embedding"``: :class:`~models.layers.EmbeddingHead` (fc to ``dim``, BatchNorm, Dropout
    ``head_dropout``) on the pooled vector. Output (B, D), L2-normalised.
    """

    def __init__(self, body: nn.Module, channels: int, *, pooling: str = "gem", dim: int | None = None,
                 head: str = "linear", head_dropout: float = 0.1,
                 input_convention: InputConvention = TORCHVISION_CONVENTION) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InvalidValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if head not in HEADS:
            raise InvalidValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "embedding" and dim is None:
            raise InvalidValueError("the embedding head needs its output dim")
        if pooling == "token" and not hasattr(body, "pooled"):
            raise InvalidValueError("pooling='token' needs a body with its own pooled vector, not "
                                    f"{type(body).__name__}")
        self.body = body
        self.pooling = pooling
        self.channels = channels
        self.pool = GeM(p=3.0) if pooling == "gem" else None
        self.head = head
        self.head_dropout = float(head_dropout)
        if dim is None:
            self.projection = None
        else:
            self.projection = (nn.Linear(channels, dim) if head == "linear"
                               else EmbeddingHead(channels, dim, dropout=self.head_dropout))
        self.dim = dim if dim is not None else channels
        self.input_convention = input_convention

    def feature_maps(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w)."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        if self.pooling == "token":
            return self._head(self.body.pooled(images))
        maps = self.feature_maps(images)
        if maps.ndim != 4 or maps.shape[1] != self.channels:
            raise InvalidValueError(f"the backbone must return (B, {self.channels}, H, W) maps, got "
                                    f"{tuple(maps.shape)}")
        if self.pooling == "gem":
            pooled = self.pool(maps)
        elif self.pooling == "gem+":
            pooled = MF.gem(maps, 4.6, 1e-8)
        else:  # Regional-GeM's LP-pool needs non-negative input (a ViT's tokens are signed)
            pooled = MF.gem(MF.regional_gem(maps.clamp(min=0)), 4.6, 1e-8)
        return self._head(pooled)

    def _head(self, pooled: Tensor) -> Tensor:
        """(B, C) pooled -> (B, D) descriptors: the head, then L2."""
        if self.head == "embedding":
            pooled = self.projection(pooled)
        elif self.projection is not None:
            pooled = self.projection(F.normalize(pooled, dim=-1))
        return F.normalize(pooled, dim=-1)


class _TimmMaps(nn.Module):
    """A timm model's ``forward_features`` as (B, C, h, w) maps: CNN maps as they are, a ViT's patch tokens
    (prefix tokens dropped) laid back on their grid; ``pooled``: the model's own pooled (B, C) vector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def pooled(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C): timm's ``forward_head(pre_logits=True)`` (a ViT's class token after its final
        norm, a CNN's global pooling)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.model.forward_features(images)
        if feats.ndim == 4:
            return feats
        if feats.ndim != 3:
            raise InvalidValueError(f"unsupported feature shape {tuple(feats.shape)} from {type(self.model).__name__}")
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        tokens = feats[:, prefix:]
        # the grid of the (padded, see TimmGlobal) image
        h, w = self.model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))
        if h * w != tokens.shape[1]:
            raise InvalidValueError(f"{tokens.shape[1]} patch tokens do not fit a {h} x {w} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class TimmGlobal(FeatureMapGlobal):
    """Any timm model as a global descriptor model (its classifier and pooling removed).

    ``pretrained=True`` loads timm's weights: from the local file ``pretrained_file`` when given (no download),
    else through timm's own download, which needs the network. ViTs are built with ``dynamic_img_size=True``
    and ``dynamic_img_pad=True``, so that any input size works (an image whose sides are not multiples of the
    patch size is zero-padded on the right and bottom, after normalisation: the mean colour).
    ``input_convention`` defaults to timm's pretrained config (RGB, its mean/std). Extra ``timm_kwargs`` go to
    ``timm.create_model``.
    """

    def __init__(self, model_name: str, pretrained: bool = False, pooling: str = "gem", *, dim: int | None = None,
                 head: str = "linear", head_dropout: float = 0.1, pretrained_file: str | os.PathLike | None = None,
                 **timm_kwargs: Any) -> None:
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs}
        if pretrained_file is not None:
            if not os.path.isfile(pretrained_file):
                raise MissingFileError(f"pretrained_file {pretrained_file} not found")
            kwargs["pretrained_cfg_overlay"] = {"file": os.fspath(pretrained_file)}
            pretrained = True
        if "vit" in model_name or "deit" in model_name or "eva" in model_name:
            kwargs.setdefault("dynamic_img_size", True)
            kwargs.setdefault("dynamic_img_pad", True)
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        convention = InputConvention("RGB", tuple(cfg.get("mean", TORCHVISION_CONVENTION.mean)),
                                     tuple(cfg.get("std", TORCHVISION_CONVENTION.std)))
        super().__init__(_TimmMaps(model), int(model.num_features), pooling=pooling, dim=dim, head=head,
                         head_dropout=head_dropout, input_convention=convention)
        self.model_name = model_name
        self.depth = None  # not a ResNet of this project: no official checkpoint fits it

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, pooling={self.pooling!r}, dim={self.dim}, head={self.head!r}"


#: The ``format`` of a trained TimmGlobal's weights file (the official CVNet key layout only fits the ResNet).
#: How a timm model is named wherever a model is chosen by name: ``timm:<timm model name>``.
TIMM_ARCH_PREFIX = "timm:"
TIMM_CHECKPOINT_FORMAT = "timm-global-v1"


def timm_global_checkpoint(model: TimmGlobal, **extra: Any) -> dict[str, Any]:
    """A trained TimmGlobal's weights file as a dict (tensors and builtins only: weights_only loads it):
    ``format`` (:data:`TIMM_CHECKPOINT_FORMAT`), ``arch`` (``"timm:<name>"``), ``model_name``, ``pooling``,
    ``dim`` (the projection's, None without one), ``head`` and ``head_dropout`` (files without them have the
    linear head), ``reduction_dim`` (the descriptor's D), ``model_state`` (``model.state_dict()``),
    ``input_convention``, then ``extra``."""
    return {"format": TIMM_CHECKPOINT_FORMAT, "arch": TIMM_ARCH_PREFIX + model.model_name,
            "model_name": model.model_name, "pooling": model.pooling,
            "dim": None if model.projection is None else int(model.dim), "head": model.head,
            "head_dropout": model.head_dropout, "reduction_dim": int(model.dim),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input_convention": model.input_convention.to_dict(), **extra}


def is_timm_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded weights file is a :func:`timm_global_checkpoint`."""
    return isinstance(checkpoint, Mapping) and checkpoint.get("format") == TIMM_CHECKPOINT_FORMAT


def load_timm_global(checkpoint: str | os.PathLike | Mapping[str, Any]) -> TimmGlobal:
    """The TimmGlobal of a :func:`timm_global_checkpoint` (path or dict), loaded strictly, in eval mode (the
    architecture's random initialisation is drawn on a forked RNG: the global one is left untouched)."""
    source = "checkpoint" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    if not is_timm_checkpoint(checkpoint):
        raise CheckpointError(f"{source} is not a trained timm global model (format {TIMM_CHECKPOINT_FORMAT})")
    with torch.random.fork_rng(devices=[]):
        model = TimmGlobal(checkpoint["model_name"], pooling=checkpoint["pooling"], dim=checkpoint["dim"],
                           head=checkpoint.get("head", "linear"), head_dropout=checkpoint.get("head_dropout", 0.1))
    model.load_state_dict(checkpoint["model_state"], strict=True)
    model.input_convention = InputConvention.from_dict(checkpoint["input_convention"])
    return model.eval()

"""Inference copies of a model: BatchNorm folded into the convolutions (torch's conv-BN fusion) and weights in
channels-last layout; the same outputs as the model in eval mode up to float rounding."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from models.backbone import ResNetBackbone


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` with ``bn``'s running statistics (torch's conv-BN fusion):
    w' = w * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps).

    torch's fusion is handed s already divided (unit variance, zero eps): its own rsqrt-then-multiply rounds s
    differently in the last bit, enough to flip near-ties in the built-in rankings; this way the folded weights, and
    every figure, stay those this repository has always produced."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                    torch.ones_like(bn.running_var), 0.0, scale, bn.bias)
    return fused


def fold_batchnorm_(backbone: nn.Module) -> nn.Module:
    """Fold every BatchNorm of a :class:`models.backbone.ResNetBackbone` (stem, bottlenecks, shortcuts) into the
    conv before it, in place; the BNs become ``nn.Identity``. Evaluation-mode maths only: one memory-bound pass
    less per conv, the same outputs up to float rounding."""
    backbone.conv1, backbone.bn1 = fuse_conv_bn(backbone.conv1, backbone.bn1), nn.Identity()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, name, ()):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                setattr(block, conv, fuse_conv_bn(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
            if block.downsample is not None:
                block.downsample[0] = fuse_conv_bn(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    return backbone


def inference_copy(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """An evaluation-only copy of ``model`` for fast inference: no gradients, BatchNorm folded into the convs of its
    ResNet ``backbone`` (when it has one), weights channels-last (feed it channels-last images: oneDNN's fast
    layout on CPUs, cuDNN's on tensor cores). The original model is untouched."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    backbone = getattr(fast, "backbone", None)
    if fold_bn and backbone is not None and isinstance(getattr(backbone, "bn1", None), nn.BatchNorm2d):
        fold_batchnorm_(backbone)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def fast_runner(model: nn.Module) -> nn.Module:
    """What the fast path runs: an :func:`inference_copy` of the project's ResNet-based models; any other model
    as it is (its inputs still go channels-last)."""
    return inference_copy(model) if isinstance(getattr(model, "backbone", None), ResNetBackbone) else model

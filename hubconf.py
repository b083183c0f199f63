"""torch.hub entry points: one line loads a model with the official CVNet weights (or random weights, loudly).

    model = torch.hub.load("path/to/this/repo", "superglobal_r50", source="local",
                           weights="weights/CVPR2022_CVNet_R50.pyth")

Every entry takes ``weights`` (an official-layout file: ``CVPR2022_CVNet_R50.pyth`` / ``..._R101.pyth``, or this
project's training output; None gives random weights with a warning), ``seed`` (for random weights) and the model's
options (e.g. SuperGlobal's ``gemp``, ``rgem``, ``sgem``, ``relup``, ``scales``, ``antialias``). Models come in
eval mode. Fetch the files with ``python prepare_data.py weights R50 R101``.
"""
from __future__ import annotations

import os
from typing import Any

dependencies = ["torch", "torchvision", "numpy", "cv2"]


def _build(kind: str, depth: int, weights: str | os.PathLike | None, seed: int, options: dict[str, Any]):
    from helpers.builders import build_model

    return build_model(kind, depth=depth, weights=weights, seed=seed, options=options)


def cvnet_global_r50(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """CVNet-Global, ResNet-50: (B, 3, H, W) BGR-normalised images -> (B, 2048) L2-normalised descriptors."""
    return _build("cvnet_global", 50, weights, seed, options)


def cvnet_global_r101(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """CVNet-Global, ResNet-101."""
    return _build("cvnet_global", 101, weights, seed, options)


def cvnet_rerank_r50(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """CVNet-Rerank, ResNet-50: ``model(query_images, key_images)`` -> (B,) match probabilities."""
    return _build("cvnet_rerank", 50, weights, seed, options)


def cvnet_rerank_r101(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """CVNet-Rerank, ResNet-101."""
    return _build("cvnet_rerank", 101, weights, seed, options)


def superglobal_r50(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """SuperGlobal on the CVNet ResNet-50 weights: (B, 3, H, W) -> (B, 2048) L2-normalised descriptors."""
    return _build("superglobal", 50, weights, seed, options)


def superglobal_r101(weights: str | os.PathLike | None = None, seed: int = 0, **options: Any):
    """SuperGlobal on the CVNet ResNet-101 weights."""
    return _build("superglobal", 101, weights, seed, options)

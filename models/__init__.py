"""Models of CVNet (CVPR 2022) and SuperGlobal (ICCV 2023) on one shared ResNet backbone.

The public names are imported on first use, so that the torch-free modules (``models.weights``: the official
files and their fetcher) load without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "CVNetGlobal": "cvnet", "CVNetRerank": "cvnet", "SuperGlobal": "superglobal", "SuperGlobalRerank": "superglobal",
    "ClassificationByRetrieval": "classification", "TimmGlobal": "timm_global", "FeatureMapGlobal": "timm_global",
    "ResNetBackbone": "backbone", "InputConvention": "checkpoint", "OFFICIAL_CONVENTION": "checkpoint",
    "TORCHVISION_CONVENTION": "checkpoint", "CheckpointError": "checkpoint",
    "load_official_checkpoint": "checkpoint", "save_official_checkpoint": "checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

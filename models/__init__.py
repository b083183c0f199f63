"""Models of CVNet (CVPR 2022) and SuperGlobal (ICCV 2023) on one shared ResNet backbone."""
from .backbone import ResNetBackbone
from .checkpoint import (
    OFFICIAL_CONVENTION,
    TORCHVISION_CONVENTION,
    CheckpointError,
    InputConvention,
    load_official_checkpoint,
    save_official_checkpoint,
)
from .classification import ClassificationByRetrieval
from .cvnet import CVNetGlobal, CVNetRerank
from .superglobal import SuperGlobal, SuperGlobalRerank
from .timm_global import FeatureMapGlobal, TimmGlobal

__all__ = [
    "CVNetGlobal",
    "CVNetRerank",
    "SuperGlobal",
    "SuperGlobalRerank",
    "ClassificationByRetrieval",
    "TimmGlobal",
    "FeatureMapGlobal",
    "ResNetBackbone",
    "InputConvention",
    "OFFICIAL_CONVENTION",
    "TORCHVISION_CONVENTION",
    "CheckpointError",
    "load_official_checkpoint",
    "save_official_checkpoint",
]

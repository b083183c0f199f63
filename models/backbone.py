"""The one ResNet backbone shared by all four models, built on torchvision's ResNet.

torchvision's ResNet-50/101 (v1.5: stride on the 3x3 conv, BN eps 1e-5, momentum 0.1) is exactly the pycls
network of the official checkpoints; :func:`models.checkpoint.official_to_model_key` maps the names.
The forward pass is written here, block by block, because the models need what torchvision's forward hides:
the last stage-3 block *before* its final ReLU (CVNet's re-ranking feature map) and SuperGlobal's ReLU-up.
"""
from __future__ import annotations

import logging

import torch
import torchvision
from torch import Tensor, nn

from common.errors import InvalidValueError, ProjectRuntimeError

from .functional import relu_up

log = logging.getLogger(__name__)

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
RELU_UP_ALPHA = 0.014


def _relu(x: Tensor) -> Tensor:
    return torch.relu(x)


def _relu_up(x: Tensor) -> Tensor:
    return relu_up(x, RELU_UP_ALPHA)


class ResNetBackbone(nn.Module):
    """ResNet-50/101 trunk (stem + 4 stages, no classifier).

    Args:
        depth: 50 or 101.
        num_stages: 4 for global descriptors, 3 when only the stage-3 map is needed (CVNet re-ranking).
        imagenet_weights: initialise from torchvision's ImageNet weights (RGB input; needs them downloaded).
    """

    def __init__(self, depth: int = 50, num_stages: int = 4, imagenet_weights: bool = False) -> None:
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise InvalidValueError(f"ResNet depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        if num_stages not in (3, 4):
            raise InvalidValueError(f"num_stages must be 3 or 4, got {num_stages}")
        self.depth = depth
        self.num_stages = num_stages
        net = _torchvision_resnet(depth, imagenet_weights)
        self.conv1, self.bn1, self.maxpool = net.conv1, net.bn1, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        if num_stages == 4:
            self.layer4 = net.layer4

    @property
    def out_channels(self) -> int:
        return 2048 if self.num_stages == 4 else 1024

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(torch.relu(self.bn1(self.conv1(x))))

    @staticmethod
    def _block(block: nn.Module, x: Tensor, inner_act, out_act) -> tuple[Tensor, Tensor]:
        """One bottleneck; returns (output, pre-activation output = shortcut + residual branch)."""
        shortcut = x if block.downsample is None else block.downsample(x)
        y = inner_act(block.bn1(block.conv1(x)))
        y = inner_act(block.bn2(block.conv2(y)))
        pre = shortcut + block.bn3(block.conv3(y))
        return out_act(pre), pre

    def _stage(self, index: int, x: Tensor, relup: bool) -> tuple[Tensor, Tensor]:
        """Run stage ``index`` (1-based); returns (output, pre-ReLU output of its last block)."""
        # ReLU-up (SuperGlobal): block outputs of stages 1-3, and the two inner activations of stage 1 only.
        out_act = _relu_up if relup and index <= 3 else _relu
        inner_act = _relu_up if relup and index == 1 else _relu
        pre = x
        for block in getattr(self, f"layer{index}"):
            x, pre = self._block(block, x, inner_act, out_act)
        return x, pre

    def forward(self, x: Tensor, relup: bool = False) -> Tensor:
        """(B, 3, H, W) normalised images -> the last stage's map, (B, 2048, H/32, W/32) for 4 stages."""
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x, _ = self._stage(i, x, relup)
        return x

    def stage3_preact(self, x: Tensor) -> Tensor:
        """CVNet's re-ranking feature map: the last stage-3 block before its final ReLU, (B, 1024, H/16, W/16).

        Plain ReLU everywhere (the CVNet release), whatever SuperGlobal's ReLU-up setting.
        """
        x = self.stem(x)
        x, _ = self._stage(1, x, False)
        x, _ = self._stage(2, x, False)
        _, pre = self._stage(3, x, False)
        return pre


def _torchvision_resnet(depth: int, imagenet_weights: bool) -> nn.Module:
    builder = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    if not imagenet_weights:
        return builder(weights=None)
    weights = {50: "IMAGENET1K_V1", 101: "IMAGENET1K_V1"}[depth]
    try:
        return builder(weights=weights)
    except Exception as exc:  # offline: torchvision cannot fetch the file
        cache = torch.hub.get_dir()
        raise ProjectRuntimeError(
            f"Could not load torchvision's ImageNet weights for ResNet-{depth} ({exc}). Download them on a machine "
            f"with internet (torchvision.models.resnet{depth}(weights='{weights}')) and copy the .pth file into "
            f"{cache}/checkpoints/, or train from random initialisation (imagenet_weights=False)."
        ) from exc

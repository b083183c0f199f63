"""Thin ``nn.Module`` wrappers over :mod:`models.functional`; they own parameters and nothing else.

Attribute names follow the official checkpoints (``pool.p``, ``conv1``/``conv2`` of a 4D layer,
``blockN.I`` of the CVLearner, ``mlp.0``/``mlp.2``) so that weights map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as MF


class GeM(nn.Module):
    """Generalized-mean pooling with a learnable exponent ``p`` (a 1-element tensor, CVNet init 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) or (B, C, N) -> (B, C)."""
        return MF.gem(x, self.p, self.eps)


class GeMPlus(nn.Module):
    """SuperGlobal's GeM+: GeM with a fixed exponent ``p = 4.6`` (eps 1e-8), no parameters."""

    def __init__(self, p: float = 4.6, eps: float = 1e-8) -> None:
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return MF.gem(x, self.p, self.eps)


class RegionalGeM(nn.Module):
    """SuperGlobal's Regional-GeM (p = 2.5, 5 x 5 regions), (B, C, H, W) -> same shape."""

    def __init__(self, p: float = 2.5, kernel_size: int = 5) -> None:
        super().__init__()
        self.p = p
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return MF.regional_gem(x, self.p, self.kernel_size)


class ScaleGeM(nn.Module):
    """SuperGlobal's Scale-GeM over scales (``mode="max"``) or a plain mean (``mode="mean"``)."""

    def __init__(self, mode: str = "max") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, descriptors: list[Tensor]) -> Tensor:
        return MF.scale_gem(descriptors, self.mode)


class GlobalHead(nn.Module):
    """The global head of the official checkpoints: ``pool`` (GeM, learnable p) and ``fc`` (with bias)."""

    def __init__(self, in_dim: int = 2048, out_dim: int = 2048, p: float = 3.0) -> None:
        super().__init__()
        self.pool = GeM(p=p)
        self.fc = nn.Linear(in_dim, out_dim, bias=True)


class EmbeddingHead(nn.Module):
    """The embedding head of the reference CLIP retrieval system's fine-tuning: ``fc`` (Linear to ``dim``), ``bn``
    (BatchNorm1d), ``dropout`` (Dropout(``dropout``)); (B, C) -> (B, dim), left for the caller to L2-normalise."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.bn(self.fc(x)))


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D conv (HSNet): ``conv1`` over the query dims, ``conv2`` over the key dims, summed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: tuple[int, int]) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.stride = tuple(stride)
        self.padding = (pad, pad)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride[0], padding=pad, bias=True)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride[1], padding=pad, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, ha, wa, hb, wb) -> (B, Cout, ha', wa', hb', wb')."""
        return MF.center_pivot_conv4d(
            x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, self.stride, self.padding
        )


def _building_block(in_channels: int, specs: list[tuple[int, int, int]], groups: int = 4) -> nn.Sequential:
    """A CVLearner block: for each (out_channels, kernel, stride) a 4D conv, GroupNorm(4) and ReLU."""
    layers: list[nn.Module] = []
    for out_channels, kernel, stride in specs:
        layers += [
            CenterPivotConv4d(in_channels, out_channels, kernel, (stride, stride)),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class CVLearner(nn.Module):
    """CVNet's 4D correlation-verification network: 4 blocks of center-pivot 4D convs, mean pool, MLP.

    Input: the (B, 9, hq, wq, hk, wk) cross-scale correlation; output: (B, 2) logits.
    """

    def __init__(self, in_channels: int = 9) -> None:
        super().__init__()
        self.block1 = _building_block(in_channels, [(16, 5, 2)])
        self.block2 = _building_block(16, [(16, 3, 1), (32, 3, 2)])
        self.block3 = _building_block(32, [(32, 3, 1), (32, 3, 1), (64, 3, 2)])
        self.block4 = _building_block(64, [(64, 3, 1), (64, 3, 1), (128, 3, 1)])
        self.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, corr: Tensor) -> Tensor:
        x = self.block4(self.block3(self.block2(self.block1(corr))))
        return self.mlp(x.flatten(2).mean(dim=-1))


def l2n(x: Tensor) -> Tensor:
    """L2-normalise the last dimension."""
    return F.normalize(x, p=2, dim=-1)

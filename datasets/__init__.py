"""Datasets: revisited Oxford/Paris (+1M), GLDv2-clean, image folders, the built-in synthetic benchmark.

``PairedDataset`` is imported on first use, so that the torch-free modules (``datasets.download``,
``datasets.synthetic``) load without torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PairedDataset"]


def __getattr__(name: str) -> Any:
    if name == "PairedDataset":
        from datasets.paired import PairedDataset

        return PairedDataset
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")

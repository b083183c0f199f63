"""Datasets: revisited Oxford/Paris (+1M), GLDv2-clean, image folders, the built-in synthetic benchmark."""
from datasets.paired import PairedDataset

__all__ = ["PairedDataset"]

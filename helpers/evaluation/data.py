"""The datasets of an evaluation: revisited Oxford / Paris (or the built-in benchmark in their layout), the R1M
distractors, and the reader of ranked images that a report draws its thumbnails from."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.errors import MissingFileError
from datasets.revisited import RevisitedDataset, Revisitop1M


def dataset_label(name: str, distractors: str | None) -> str:
    """``roxford5k`` or, with the R1M distractors, ``roxford5k+1m``."""
    return f"{name}+1m" if distractors else name


def open_revisited(*, root: str, name: str, split: str, convention: Any, scales: Sequence[float],
                   min_side: int | None) -> RevisitedDataset:
    """ROxford5k / RParis6k, or any dataset in their layout (the built-in benchmark), through one class."""
    return RevisitedDataset(root, name, split, convention=convention, scales=tuple(scales), min_side=min_side)


def build_builtin_dataset(*, root: str, synthetic: Mapping[str, Any], progress: bool) -> str:
    """Build (idempotently) the synthetic benchmark ``synthetic["name"]`` under ``root``; returns its name."""
    from datasets.synthetic import SyntheticConfig, build_synthetic

    name = synthetic["name"]
    build_synthetic(root, name=name, config=SyntheticConfig(**(synthetic.get("config") or {})), progress=progress)
    return name


def open_distractors(*, root: str, convention: Any, scales: Sequence[float], min_side: int | None,
                     progress: bool = False, check: bool = False) -> Revisitop1M:
    """The R1M distractors; with ``check``, every listed image must be on disk (a missing one changes mAP)."""
    r1m = Revisitop1M(root, convention=convention, scales=tuple(scales), min_side=min_side)
    if not check:
        return r1m
    report = r1m.check_complete(progress=progress)
    if not report.complete:
        raise MissingFileError(
            f"revisitop1m: {len(report.missing)} of {report.n_listed} listed images are missing under "
            f"{r1m.image_dir} (e.g. {report.missing[0]}); a +1M evaluation needs all of them. Re-run "
            f"`python prepare_data.py download --root {root} --datasets revisitop1m`.")
    return r1m


class CombinedReader:
    """``read(j)`` and ``name(j)`` (the file name) over the database followed by the distractors (indices
    continue after the database)."""

    def __init__(self, db: Any, distractors: Any | None) -> None:
        self.db, self.distractors = db, distractors

    def read(self, j: int) -> np.ndarray:
        n = len(self.db)
        return self.db.read(j) if j < n else self.distractors.read(j - n)

    def name(self, j: int) -> str:
        n = len(self.db)
        return os.path.basename(self.db.image_paths[j] if j < n else self.distractors.image_paths[j - n])


def stored_distractors(vectors: torch.Tensor | None, dtype: str) -> torch.Tensor | None:
    """The distractors' descriptors as kept for ranking: float32 (faithful) or float16 (half the memory, 4 GB
    instead of 8 GB per model for R1M; scores then carry float16 rounding, so the +1M figures can move slightly)."""
    return vectors.half() if vectors is not None and dtype == "float16" else vectors

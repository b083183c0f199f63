"""The tiny synthetic training split that the training-script and bench tests draw (no download, a second or
two): 3 landmarks x 4 views at 128 x 96 unless changed, beside the smallest retrieval set the builder makes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from datasets.synthetic import SyntheticConfig, build_synthetic

TINY_TRAIN = SyntheticConfig(n_landmarks=2, views_per_landmark=2, queries_per_landmark=1, n_distractors=0,
                             image_size=(128, 96), train_landmarks=3, train_views_per_landmark=4)


def draw_tiny(root: Path, name: str = "t", **changes: Any) -> Path:
    """``root`` with the synthetic set ``name`` of :data:`TINY_TRAIN` (``changes``: fields to replace) drawn in it."""
    build_synthetic(root, name=name, config=replace(TINY_TRAIN, **changes), progress=False)
    return root

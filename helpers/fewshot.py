"""Few-shot classification by retrieval on the built-in synthetic landmarks: k labelled views per landmark form
the index of a :class:`models.ClassificationByRetrieval`, the remaining views are classified, top-1 accuracy is
averaged over seeded draws of the k views.

The landmarks are those of the built-in *test* split (``<root>/<name>/views.csv``), which the built-in training
run never sees: its query images and the database views labelled easy or hard (junk views show too little of the
landmark, distractors none).
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from common.constants import CVNET_TEST_SCALES
from common.errors import InvalidValueError, MissingFileError
from datasets.transforms import read_image
from helpers.extraction import ImageArrays, extract_global_descriptors
from models.classification import ClassificationByRetrieval

log = logging.getLogger(__name__)


def landmark_views(root: str | os.PathLike, name: str = "synth") -> tuple[list[Path], np.ndarray]:
    """(image paths, landmark labels) of the query images and the easy and hard database views of the built-in
    test split (6 to 9 per landmark with the default configuration)."""
    folder = Path(root) / name
    table = folder / "views.csv"
    if not table.is_file():
        raise MissingFileError(f"{table} not found: build the built-in benchmark first "
                               f"(python prepare_data.py synthetic --root {root} --name {name})")
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["landmark"]) >= 0
                and (r["role"] == "query" or (r["role"] == "database" and r["label"] in ("easy", "hard")))]
    if not rows:
        raise InvalidValueError(f"{table} lists no easy or hard database view of a landmark")
    return [folder / "jpg" / f"{r['image']}.jpg" for r in rows], np.asarray([int(r["landmark"]) for r in rows])


def describe_images(model: nn.Module, paths: Sequence[os.PathLike], *, device: torch.device | str = "cpu",
                    batch_size: int = 8, progress: bool = True) -> Tensor:
    """Global descriptors (n, d) of image files through the extraction engine (CVNet-Global at its three test
    scales, other models at scale 1)."""
    scales = CVNET_TEST_SCALES if type(model).__name__ == "CVNetGlobal" else (1.0,)
    images = [read_image(p) for p in paths]
    return extract_global_descriptors(model=model, dataset=ImageArrays(images, scales=scales,
                                                                       convention=model.input_convention),
                                      device=device, batch_size=batch_size, progress=progress, desc="few-shot")


@dataclass(frozen=True)
class FewShotResult:
    shots: int
    accuracy: float  # mean top-1 over trials, in [0, 1]
    std: float
    trials: int
    queries_per_trial: float


def few_shot_accuracy(embeddings: Tensor, labels: Sequence[int] | np.ndarray, shots: int, *, trials: int = 10,
                      seed: int = 0, k: int = 5, aggregation: str = "max") -> FewShotResult:
    """Top-1 accuracy of classification by retrieval with ``shots`` indexed examples per class.

    Per trial, ``shots`` examples of every class are drawn (seeded) into the index and all other examples are
    classified; a class needs more than ``shots`` examples. Returns the mean and standard deviation over trials.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = {c: int((labels == c).sum()) for c in classes}
    short = [c for c, n in counts.items() if n <= shots]
    if short:
        raise InvalidValueError(f"{shots} shots need more than {shots} examples per class; classes {short[:5]} have "
                                f"{[counts[c] for c in short[:5]]}")
    rng = np.random.default_rng(seed)
    accs, n_queries = [], []
    for _ in range(trials):
        index = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes])
        query = np.setdiff1d(np.arange(len(labels)), index)
        cbr = ClassificationByRetrieval(embedding_dim=embeddings.shape[1], k=k, aggregation=aggregation)
        cbr.add_index_data(embeddings[index], labels[index].tolist())
        predicted = np.asarray(cbr.predict(embeddings[query]))
        accs.append(float((predicted == labels[query]).mean()))
        n_queries.append(len(query))
    return FewShotResult(shots=shots, accuracy=float(np.mean(accs)), std=float(np.std(accs)), trials=trials,
                         queries_per_trial=float(np.mean(n_queries)))
